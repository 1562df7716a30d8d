"""Local services for trying the cluster and team set-up on one machine, and for the tests:
a one-node SLURM cluster (``slurm``) and a team tracking server, PostgreSQL behind
``mlflow server`` (``tracking_server``). Each runs as real daemons on 127.0.0.1."""
