"""``python -m medseg`` runs the command line where no ``medseg`` script is installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_python_dash_m_medseg_lists_the_stages_from_a_bare_path(tmp_path: Path) -> None:
    # PYTHONPATH alone, as on a machine whose packages come from a folder: no console script used
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "medseg", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for stage in ("ingest", "plan", "preprocess", "train", "predict", "evaluate", "review"):
        assert stage in done.stdout


def test_python_dash_m_medseg_fails_with_the_command_line_exit_status(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "medseg", "evaluate", "--predictions", str(tmp_path / "none"),
                           "--labels", str(tmp_path), "--output", str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr  # MedsegError's status, as from the console script
    assert f"expected a folder of predicted masks, found nothing at {tmp_path / 'none'}" in done.stderr
    assert "Traceback" not in done.stderr
