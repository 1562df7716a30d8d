"""medseg's side of the training benchmarks: its data prepared once, and a timed ``medseg train``.

Used by ``bench/loader.py``, ``bench/accuracy.py`` and ``bench/gpu.py``; nothing runs at import time.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medseg.config import PlanConfig

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "experiments" / "hippocampus.yaml"
log = logging.getLogger("bench")


def medseg_data(msd: Path, work: Path, config: PlanConfig | None = None) -> tuple[Path, Path, Path]:
    """medseg's preprocessed cases, plan (``config``, default the defaults) and splits under
    ``work/medseg`` (made once)."""
    from medseg.stages.ingest import ingest
    from medseg.stages.plan import plan
    from medseg.stages.preprocess import preprocess

    out = work / "medseg"
    if not (out / "preprocessed" / "index.json").exists():
        ingest(msd, out / "ingest", workers=os.cpu_count() or 1)
        plan(out / "ingest" / "manifest.json", out / "plan", config)
        preprocess(out / "ingest" / "manifest.json", out / "plan" / "plan.json", out / "preprocessed")
    return out / "preprocessed", out / "plan" / "plan.json", out / "plan" / "splits.json"


def timed_train(pre: Path, plan_path: Path, splits: Path, out: Path, params: dict[str, Any]) -> tuple[float, float, list[dict]]:
    """Run ``medseg train`` on fold 0 into ``out`` with the demo config and ``params`` (its train section),
    without tracking. Returns the start (seconds since the epoch), the wall seconds, and the history,
    each epoch with ``seconds``: the wall time from the start to its end. What the command spent
    outside epochs (imports, cases read, model written) is put before the first epoch."""
    cmd = [sys.executable, "-m", "medseg", "train", "--preprocessed", str(pre), "--plan", str(plan_path),
           "--splits", str(splits), "--fold", "0", "--output", str(out), "--no-tracking",
           "--config", str(DEMO), "--params", json.dumps(params)]
    log.info("medseg: %s", " ".join(cmd))
    started = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.time() - started
    history = json.loads((out / "history.json").read_text())
    elapsed = wall - sum(h["epoch_seconds"] for h in history)
    for h in history:
        elapsed += h["epoch_seconds"]
        h["seconds"] = elapsed
    return started, wall, history
