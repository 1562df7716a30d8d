"""A one-node SLURM cluster on 127.0.0.1, from Debian's ``slurm-wlm`` and ``munge``, daemons
started directly (no systemd): for trying the SLURM profile on one machine, and for the tests.

``start(folder)`` writes ``/etc/slurm/slurm.conf`` (job steps find the config only there; a
file that was there is kept as ``slurm.conf.medseg-saved`` and put back by ``stop``), starts
``munged`` if no munge daemon answers, then ``slurmctld`` and ``slurmd``, and waits until the
node is idle. State, spool, logs and pid files live under ``folder``. ``stop(folder)`` stops
them again. Needs root (the daemons and /etc/slurm).

The facts the config follows: without an accounting daemon ``sacct`` fails, so the profile's
job status comes from ``squeue``, and ``MinJobAge`` (how long squeue still shows a finished job)
outlasts the executor plugin's status checks; ``DefMemPerCPU`` is set, or each job would take
the node's whole memory and jobs could not run side by side.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import ServiceError
from medseg.services import process

log = logging.getLogger(__name__)

CONF = Path("/etc/slurm/slurm.conf")
SAVED = CONF.with_name("slurm.conf.medseg-saved")
PARTITION = "debug"


@dataclass(frozen=True)
class Cluster:
    folder: Path
    node: str
    cpus: int
    memory_mb: int
    partition: str
    started_munge: bool


def node_memory_mb(reserve_mb: int = 2048) -> int:
    """The node's memory for jobs: MemTotal less what the system keeps."""
    with open("/proc/meminfo") as fh:
        total_kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    return max(total_kb // 1024 - reserve_mb, 1024)


def slurm_conf(folder: Path, *, host: str, node: str, cpus: int, memory_mb: int, ctld_port: int,
               slurmd_port: int, min_job_age_s: int = 600) -> str:
    """The text of a one-node slurm.conf whose state, spool and logs are under ``folder``."""
    mem_per_cpu = max(memory_mb // max(cpus, 1), 256)
    return f"""# written by medseg.services.slurm: a one-node cluster on 127.0.0.1
ClusterName=medseg
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge={min_job_age_s}
DefMemPerCPU={mem_per_cpu}
ReturnToService=2
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _munge_answers() -> bool:
    munge = shutil.which("munge")
    if munge is None:
        return False
    proc = subprocess.run([munge, "-n"], capture_output=True, timeout=10)
    return proc.returncode == 0


def _start_munge(folder: Path) -> bool:
    """Start munged unless one answers; True when this call started it."""
    if _munge_answers():
        return False
    munged = process.program("munged", "munge", "/usr/sbin")
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        process.run([process.program("mungekey", "munge", "/usr/sbin"), "--create"], what="creating the munge key")
        shutil.chown(key, "munge", "munge")
    for path in (Path("/run/munge"), Path("/var/lib/munge"), Path("/var/log/munge")):
        path.mkdir(parents=True, exist_ok=True)
        shutil.chown(path, "munge", "munge")
    pid_file = Path("/run/munge/munged.pid")
    process.run(["runuser", "-u", "munge", "--", munged, "--pid-file", str(pid_file)], what="starting munged")
    (folder / "munged.pid").write_text(pid_file.read_text() if pid_file.is_file() else "")
    process.wait_for(_munge_answers, what="munged", timeout=20, log_file=Path("/var/log/munge/munged.log"))
    return True


def node_state(node: str) -> str:
    out = subprocess.run([process.program("sinfo", "slurm-client"), "-h", "-n", node, "-o", "%t"],
                         capture_output=True, text=True, timeout=10)
    return out.stdout.strip()


def start(folder: Path, *, cpus: int | None = None, memory_mb: int | None = None, timeout: float = 90) -> Cluster:
    """Start the one-node cluster (see the module doc); returns what it is."""
    if os.geteuid() != 0:
        raise ServiceError("the local SLURM cluster needs root: slurmd runs jobs as their users and its "
                           f"config must be at {CONF}")
    slurmctld = process.program("slurmctld", "slurm-wlm", "/usr/sbin")
    slurmd = process.program("slurmd", "slurm-wlm", "/usr/sbin")
    folder = Path(folder).resolve()
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    running = process.read_pid(folder / "slurmctld.pid")
    if running is not None and process.alive(running):
        raise ServiceError(f"a local SLURM cluster of {folder} runs already: stop it first (medseg slurm-local stop)")
    host = socket.gethostname().split(".")[0]
    node = "medseg-node"
    cpus = cpus or os.cpu_count() or 1
    memory_mb = memory_mb or node_memory_mb()
    ctld_port, slurmd_port = process.free_port(), process.free_port()
    CONF.parent.mkdir(parents=True, exist_ok=True)
    if CONF.exists() and not SAVED.exists() and "medseg.services.slurm" not in CONF.read_text():
        shutil.copy2(CONF, SAVED)
    CONF.write_text(slurm_conf(folder, host=host, node=node, cpus=cpus, memory_mb=memory_mb,
                               ctld_port=ctld_port, slurmd_port=slurmd_port))
    started_munge = _start_munge(folder)
    # -i: ignore the state of an earlier cluster in this folder; -c: clear its jobs.
    process.run([slurmctld, "-i", "-c", "-f", str(CONF)], what="starting slurmctld")
    process.wait_for(lambda: process.port_open(ctld_port), what="slurmctld", timeout=timeout,
                     log_file=folder / "slurmctld.log")
    process.run([slurmd, "-N", node, "-f", str(CONF)], what="starting slurmd")
    process.wait_for(lambda: node_state(node) in ("idle", "mix", "alloc"), what=f"slurmd (node {node} idle)",
                     timeout=timeout, log_file=folder / "slurmd.log")
    cluster = Cluster(folder, node, cpus, memory_mb, PARTITION, started_munge)
    (folder / "cluster.json").write_text(process.record_json(cluster))
    log.info("local SLURM cluster up: node %s, %d CPUs, %d MB, partition %s; state in %s",
             node, cpus, memory_mb, PARTITION, folder)
    return cluster


def stop(folder: Path) -> None:
    """Stop the daemons that ``start(folder)`` started and put back an earlier slurm.conf."""
    folder = Path(folder).resolve()
    process.stop_pid(process.read_pid(folder / "slurmd.pid"), what="slurmd")
    process.stop_pid(process.read_pid(folder / "slurmctld.pid"), what="slurmctld")
    info = folder / "cluster.json"
    if info.is_file() and json.loads(info.read_text()).get("started_munge"):
        process.stop_pid(process.read_pid(folder / "munged.pid"), what="munged")
    if CONF.is_file() and "medseg.services.slurm" in CONF.read_text():
        if SAVED.exists():
            shutil.move(SAVED, CONF)
        else:
            CONF.unlink()
    log.info("local SLURM cluster of %s stopped", folder)
