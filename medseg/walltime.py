"""A job's wall-time limit: when a SLURM job ends, and a stop asked for by a signal.

Under Snakemake's SLURM executor the rule's command runs inside a job step together with
Snakemake itself, so a SLURM warning signal (``--signal=USR1@120``) would reach Snakemake too.
medseg therefore reads the job's end time from SLURM (``squeue -j $SLURM_JOB_ID -o %e``) and
stops before it on its own; SIGUSR1, where a user sends it (``srun --signal``, ``scancel -s
USR1``), asks for the same stop after the current epoch.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

log = logging.getLogger(__name__)


def slurm_end_time(environ: Mapping[str, str]) -> float | None:
    """The end of the SLURM job this process runs in (seconds since the epoch), or None: not in a
    job, no time limit, or SLURM did not say."""
    job = environ.get("SLURM_JOB_ID")
    squeue = shutil.which("squeue")
    if not job or squeue is None:
        return None
    try:
        out = subprocess.run([squeue, "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("SLURM job %s: could not read its end time (%s); its time limit is not watched", job, err)
        return None
    return parse_end_time(out.stdout.strip())


def parse_end_time(text: str) -> float | None:
    """squeue's ``%e`` (local time, ``2026-12-06T20:40:01``) as seconds since the epoch; None for
    ``N/A``, ``Unknown`` or anything else that is not a time."""
    try:
        return datetime.fromisoformat(text.splitlines()[0].strip()).timestamp()
    except (ValueError, IndexError):
        return None


@dataclass
class StopRequest:
    """When a training must stop with a checkpoint: ``end_time - margin_s`` (wall clock), or as
    soon as a signal asked for it."""

    end_time: float | None = None
    margin_s: float = 0.0
    signalled: bool = field(default=False)

    def due(self, next_epoch_s: float, now: float | None = None) -> bool:
        """Whether another epoch of ``next_epoch_s`` seconds would end past the limit less the margin."""
        if self.signalled:
            return True
        if self.end_time is None:
            return False
        now = time.time() if now is None else now
        return now + next_epoch_s > self.end_time - self.margin_s

    def why(self) -> str:
        if self.signalled:
            return "SIGUSR1 asked for a stop"
        assert self.end_time is not None
        ends = datetime.fromtimestamp(self.end_time).isoformat(timespec="seconds")
        return f"another epoch could end later than {self.margin_s:.0f} s before the job's time limit ({ends})"

    def listen(self, signum: int = signal.SIGUSR1) -> None:
        """Make ``signum`` ask for the stop (main thread only)."""
        def handler(received: int, frame: object) -> None:
            log.warning("received signal %d: stopping after this epoch with a checkpoint", received)
            self.signalled = True

        signal.signal(signum, handler)


def job_stop_request(environ: Mapping[str, str], margin_s: float | None) -> StopRequest:
    """The stop request of this process: its SLURM job's end time less ``margin_s`` (None: the
    limit is ignored), and SIGUSR1."""
    end = slurm_end_time(environ) if margin_s is not None else None
    if end is not None:
        log.info("SLURM job %s ends at %s: training stops with a checkpoint %.0f s before that",
                 environ.get("SLURM_JOB_ID"), datetime.fromtimestamp(end).isoformat(timespec="seconds"), margin_s)
    request = StopRequest(end_time=end, margin_s=margin_s or 0.0)
    request.listen()
    return request
