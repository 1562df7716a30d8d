"""medseg.services: the config of the local SLURM cluster and the tracking server's checks of its inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medseg.errors import ServiceError
from medseg.services import slurm, tracking_server
from medseg.services.process import free_port, port_open


def test_slurm_conf_has_no_accounting_a_long_min_job_age_and_memory_per_cpu(tmp_path: Path) -> None:
    text = slurm.slurm_conf(tmp_path, host="vm", node="n1", cpus=2, memory_mb=20000, ctld_port=7001, slurmd_port=7002)
    lines = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith(("#", "Node",
                                                                                                          "Partition")))
    assert lines["AccountingStorageType"] == "accounting_storage/none"
    assert int(lines["MinJobAge"]) >= 3 * 40  # outlasts the SLURM plugin's status checks
    assert lines["DefMemPerCPU"] == "10000"  # each job its share of the node, not all of it
    assert lines["SlurmctldHost"] == "vm(127.0.0.1)" and lines["SlurmctldPort"] == "7001"
    assert lines["StateSaveLocation"] == f"{tmp_path}/state"
    assert "NodeName=n1 NodeAddr=127.0.0.1 NodeHostname=vm CPUs=2 RealMemory=20000" in text


def test_tracking_server_refuses_pools_that_would_exhaust_postgres(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match=r"4 workers x \(20 \+ 10\) pooled connections would reach PostgreSQL's "
                                           r"max_connections=100"):
        tracking_server.start(tmp_path, workers=4, pool_size=20, max_overflow=10)


def test_tracking_server_refuses_a_folder_postgres_cannot_enter(tmp_path: Path) -> None:
    # As root (as .ci/run runs, and as the local services need) PostgreSQL runs as the user postgres;
    # pytest's tmp_path sits under a folder only root may enter.
    assert os.geteuid() == 0, "the service tests run as root, as .ci/run does"
    with pytest.raises(ServiceError, match="PostgreSQL runs as the user postgres, who cannot enter this folder"):
        tracking_server.start_postgres(tmp_path / "db", free_port())


def test_a_missing_server_record_is_named(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match=r"server.json: expected the record of a tracking server"):
        tracking_server.Server.read(tmp_path)


def test_free_port_is_free() -> None:
    assert not port_open(free_port())
