"""A short run of each atheris harness of ``tests/fuzz`` inside the test suite: a few seconds each, from
its seeds, in a subprocess (libFuzzer takes over the process it runs in).

A run passes when libFuzzer finishes its time without a crash (exit 0); it prints how many inputs it
ran. A crash fails the test with the path of the input libFuzzer wrote and the traceback; reproduce it
with ``python tests/fuzz/fuzz_<target>.py <input>``. Coverage is measured in medseg alone here (``MEDSEG_FUZZ_SHALLOW=1``),
which starts sooner; ``make fuzz`` runs the same harnesses for minutes, guided by pydicom's and nibabel's
coverage too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent
SECONDS = 5  # of fuzzing per target; with start-up, about 22 s for the three here
TARGETS = ["dicom_header", "dicom_series", "nifti"]


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_runs_briefly_without_a_crash(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    env = dict(os.environ, MEDSEG_FUZZ_DIR=str(tmp_path), MEDSEG_FUZZ_SHALLOW="1")
    cmd = [sys.executable, str(FUZZ / f"fuzz_{target}.py"), f"-max_total_time={SECONDS}", "-seed=1",
           "-print_final_stats=1", f"-artifact_prefix={tmp_path}/", str(corpus)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=SECONDS + 120, cwd=FUZZ.parents[1],
                          check=False)
    out = proc.stderr + proc.stdout
    runs = re.findall(r"stat::number_of_executed_units: (\d+)", out)
    print(f"{target}: {runs[-1] if runs else '?'} executions in {SECONDS} s")
    if proc.returncode != 0:
        written = re.findall(r"Test unit written to (\S+)", out)
        start = out.find("=== Uncaught Python exception: ===")
        trace = out[start:start + 6000] if start >= 0 else out[-6000:]
        pytest.fail(
            f"fuzz_{target}.py exited {proc.returncode}; crash input: {written[-1] if written else 'none written'} "
            f"(reproduce: {sys.executable} tests/fuzz/fuzz_{target}.py <input>)\n{trace}",
            pytrace=False,
        )
    assert runs and int(runs[-1]) > 0, out[-3000:]
