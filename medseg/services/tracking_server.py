"""A team's MLflow tracking server: ``mlflow server`` on 127.0.0.1 with a PostgreSQL backend store
(Debian's ``postgresql``, a real server process) and a shared artifact root.

``start(folder, port=...)`` creates (first time) and starts a PostgreSQL cluster in
``folder/postgres`` on a port of its own, the database ``mlflow``, then ``mlflow server`` with
artifacts in ``folder/artifacts`` (``--artifacts-destination``: clients send them over HTTP, so
compute nodes need no access to that folder). ``stop(folder)`` stops both; the data stay, and a
later ``start`` goes on with them.

Connections: jobs talk to the MLflow server over HTTP and never to PostgreSQL; each server
worker keeps a SQLAlchemy pool of at most ``pool_size + max_overflow`` connections, so however
many jobs run, PostgreSQL sees at most ``workers * (pool_size + max_overflow)`` of them from
MLflow, below its ``max_connections``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import ServiceError
from medseg.services import process

log = logging.getLogger(__name__)

DATABASE = "mlflow"


@dataclass(frozen=True)
class Server:
    folder: Path
    uri: str
    port: int
    pg_port: int
    backend_uri: str
    workers: int
    pool_size: int
    max_overflow: int
    max_connections: int

    @property
    def connection_bound(self) -> int:
        """The most PostgreSQL connections the MLflow server opens."""
        return self.workers * (self.pool_size + self.max_overflow)

    @classmethod
    def read(cls, folder: Path) -> Server:
        path = Path(folder) / "server.json"
        if not path.is_file():
            raise ServiceError(f"{path}: expected the record of a tracking server started there, found none")
        data = json.loads(path.read_text())
        data["folder"] = Path(data["folder"])
        return cls(**data)


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    return process.program(name, "postgresql")


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _psql(pg_port: int, sql: str) -> str:
    return process.run([process.program("psql", "postgresql-client"), "-h", "127.0.0.1", "-p", str(pg_port),
                        "-U", "postgres", "-d", "postgres", "-tAc", sql], what="psql").strip()


def start_postgres(folder: Path, pg_port: int, max_connections: int = 100) -> None:
    if os.geteuid() == 0 and subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(folder)]).returncode:
        raise ServiceError(f"{folder}: PostgreSQL runs as the user postgres, who cannot enter this folder (or one "
                           "above it): choose a folder that user can reach, or open its mode (chmod o+x)")
    data = folder / "postgres"
    if not (data / "PG_VERSION").is_file():
        data.mkdir(parents=True, exist_ok=True)
        _own(data)
        process.run(_as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                  "-E", "UTF8"]), what="initdb", timeout=180)
    sockets = folder / "sockets"
    sockets.mkdir(exist_ok=True)
    _own(sockets)
    log_file = folder / "postgres.log"
    log_file.touch()
    _own(log_file)
    options = (f"-p {pg_port} -k {sockets} -c listen_addresses=127.0.0.1 -c max_connections={max_connections}")
    process.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-l", str(log_file), "-o", options, "-w",
                              "-t", "60", "start"]), what="starting PostgreSQL", timeout=90)
    if _psql(pg_port, f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'") != "1":
        _psql(pg_port, f"CREATE DATABASE {DATABASE}")


def health(uri: str) -> bool:
    with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
        return response.status == 200


def health_or_false(uri: str) -> bool:
    """Whether the server answers its health check now."""
    try:
        return health(uri)
    except OSError:
        return False


def start_mlflow(server: Server, timeout: float = 120) -> None:
    """Start the MLflow server of ``server`` (its PostgreSQL running), e.g. again after ``stop_mlflow``."""
    folder = server.folder
    (folder / "artifacts").mkdir(exist_ok=True)
    env = dict(os.environ, MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=str(server.pool_size),
               MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=str(server.max_overflow))
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    cmd = [mlflow if Path(mlflow).is_file() else "mlflow", "server", "--backend-store-uri", server.backend_uri,
           "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(server.port),
           "--workers", str(server.workers)]
    log_file = folder / "mlflow.log"
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    (folder / "mlflow.pid").write_text(str(proc.pid))
    uri = server.uri

    def up() -> bool:
        if proc.poll() is not None:
            raise ServiceError(f"mlflow server exited ({proc.returncode}); see {log_file}")
        return health(uri)

    try:
        process.wait_for(up, what=f"mlflow server on {uri}", timeout=timeout, log_file=log_file)
    except ServiceError:
        stop_mlflow(folder)
        raise


def start(folder: Path, *, port: int | None = None, pg_port: int | None = None, workers: int = 2,
          pool_size: int = 5, max_overflow: int = 5, max_connections: int = 100) -> Server:
    """Start PostgreSQL and the MLflow server of ``folder`` (see the module doc); returns where they are."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if workers * (pool_size + max_overflow) >= max_connections:
        raise ServiceError(f"tracking server: {workers} workers x ({pool_size} + {max_overflow}) pooled connections "
                           f"would reach PostgreSQL's max_connections={max_connections}: lower them")
    record = folder / "server.json"
    if record.is_file():  # the same ports as before, so that clients keep their URI
        old = Server.read(folder)
        port, pg_port = port or old.port, pg_port or old.pg_port
    port = port or process.free_port()
    pg_port = pg_port or process.free_port()
    if process.port_open(port):
        raise ServiceError(f"tracking server: port {port} on 127.0.0.1 is taken; pass another --port")
    start_postgres(folder, pg_port, max_connections)
    backend = f"postgresql://postgres@127.0.0.1:{pg_port}/{DATABASE}"
    server = Server(folder, f"http://127.0.0.1:{port}", port, pg_port, backend, workers, pool_size, max_overflow,
                    max_connections)
    record.write_text(process.record_json(server))
    try:
        start_mlflow(server)
    except ServiceError:
        stop_postgres(folder)
        raise
    log.info("MLflow server on %s (PostgreSQL on port %d, artifacts in %s)", server.uri, pg_port, folder / "artifacts")
    return server


def stop_mlflow(folder: Path) -> None:
    """Stop the MLflow server (its whole process group: the workers too); PostgreSQL keeps running."""
    pid = process.read_pid(Path(folder) / "mlflow.pid")
    if pid is not None and process.alive(pid):
        try:
            os.killpg(pid, 15)
        except ProcessLookupError:
            pass
    process.stop_pid(pid, what="mlflow server")


def stop_postgres(folder: Path) -> None:
    data = Path(folder) / "postgres"
    if (data / "postmaster.pid").is_file():
        process.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                    what="stopping PostgreSQL", timeout=90)


def stop(folder: Path) -> None:
    """Stop the MLflow server and PostgreSQL of ``folder``; the data stay."""
    folder = Path(folder).resolve()
    stop_mlflow(folder)
    stop_postgres(folder)
    log.info("tracking server of %s stopped", folder)


def database_connections(server: Server) -> int:
    """Connections to the MLflow database now (PostgreSQL's pg_stat_activity)."""
    return int(_psql(server.pg_port, f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{DATABASE}'"))
