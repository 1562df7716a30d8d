"""medseg.walltime: a SLURM job's end time and the stop request built from it."""

from __future__ import annotations

import os
import signal
from datetime import datetime

import pytest

from medseg.walltime import StopRequest, job_stop_request, parse_end_time, slurm_end_time


def test_parse_end_time_reads_squeue_local_time() -> None:
    assert parse_end_time("2026-12-06T20:40:01\n") == datetime(2026, 12, 6, 20, 40, 1).timestamp()
    for text in ("N/A", "Unknown", "", "NONE"):
        assert parse_end_time(text) is None


@pytest.mark.parametrize(("now", "epoch", "due"), [(100.0, 39.0, False), (100.0, 41.0, True), (140.0, 0.5, True)])
def test_stop_is_due_when_another_epoch_would_end_inside_the_margin(now: float, epoch: float, due: bool) -> None:
    request = StopRequest(end_time=200.0, margin_s=60.0)  # stop by 140
    assert request.due(epoch, now=now) is due


def test_no_limit_is_never_due_and_a_signal_always_is() -> None:
    assert not StopRequest().due(1e9)
    assert StopRequest(signalled=True).due(0.0)


def test_sigusr1_asks_for_the_stop() -> None:
    old = signal.getsignal(signal.SIGUSR1)
    try:
        request = job_stop_request({}, 60.0)  # not in a SLURM job: no end time
        assert request.end_time is None and not request.due(1.0)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.signalled and request.due(0.0)
        assert "SIGUSR1" in request.why()
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_outside_a_job_there_is_no_end_time() -> None:
    assert slurm_end_time({}) is None
