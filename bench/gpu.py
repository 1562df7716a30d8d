"""GPU check: time to a validation Dice, iterations per second and how busy the GPU is, one training.

    .venv/bin/python bench/gpu.py [--data ../shared/data/hippocampus] [--minutes 3] [--target 0.88]

Trains fold 0 of the hippocampus with ``medseg train`` (``configs/experiments/hippocampus.yaml``
and ``--params``; the plan is made for this machine, so its memory budget is the GPU's) with
validation after every epoch, while ``nvidia-smi`` samples the GPU's utilization every 200 ms.
Reports the wall time to the first validation Dice at or above ``--target`` (counted from the
command's start), the median iterations per second, the share of training time spent waiting for
batches (``data_wait_fraction``) and the mean GPU utilization while training ran. Prints a table
and writes ``bench/results/gpu.json``. Without a GPU it runs on the CPU and reports no utilization.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
log = logging.getLogger("bench.gpu")

GPU_PARAMS = {"epochs": 60, "val_every": 1, "num_workers": 4, "amp": True}


def sample_gpu(path: Path) -> subprocess.Popen[bytes] | None:
    """``nvidia-smi`` writing 'seconds-since-epoch, utilization %' lines every 200 ms, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = path.open("w")
    return subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used,name",
                             "--format=csv,noheader,nounits", "-lms", "200"], stdout=out, stderr=subprocess.DEVNULL)


def read_samples(path: Path) -> list[tuple[float, float, float, str]]:
    from datetime import datetime

    rows = []
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            try:
                stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                rows.append((stamp, float(parts[1]), float(parts[2]), parts[3]))
            except ValueError:
                continue
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data")) / "hippocampus")
    ap.add_argument("--work", type=Path, default=REPO / "data" / "bench-gpu")
    ap.add_argument("--minutes", type=float, default=3.0, help="training time limit (max_minutes)")
    ap.add_argument("--target", type=float, default=0.88, help="validation Dice to time")
    ap.add_argument("--params", type=json.loads, default=GPU_PARAMS, help="the train section over the demo config")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch
    from common import medseg_data, timed_train

    pre, plan_path, splits = medseg_data(args.data, args.work)  # the plan of this machine (GPU memory)
    out = args.work / f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    sampler = sample_gpu(out / "nvidia-smi.csv")
    params = {"max_minutes": args.minutes, **args.params}
    try:
        started, wall, history = timed_train(pre, plan_path, splits, out, params)
    finally:
        if sampler is not None:
            sampler.terminate()
            sampler.wait()
    begin = started + history[0]["seconds"] - history[0]["epoch_seconds"]  # the first epoch's start
    reached = next(({"seconds": h["seconds"], "epoch": h["epoch"], "val_dice": h["val_dice"]} for h in history
                    if h.get("val_dice", 0.0) >= args.target), None)
    util: dict[str, Any] = {}
    if sampler is not None:
        rows = [r for r in read_samples(out / "nvidia-smi.csv") if begin <= r[0] <= started + wall]
        if rows:
            util = {"gpu": rows[0][3], "mean_utilization": statistics.mean(r[1] for r in rows),
                    "samples": len(rows), "max_memory_mib": max(r[2] for r in rows)}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "params": params, "wall_seconds": wall, "epochs": len(history),
        "target": args.target, "reached": reached, "best_val_dice": max(h.get("val_dice", 0.0) for h in history),
        "iterations_per_second": statistics.median(h["iterations_per_second"] for h in history),
        "data_wait_fraction": statistics.median(h["data_wait_fraction"] for h in history), **util,
    }
    print(f"\ndevice {result['device']}: {result['epochs']} epochs in {wall:.0f} s, best validation Dice "
          f"{result['best_val_dice']:.4f}")
    print(f"time to Dice {args.target}: " + (f"{reached['seconds']:.0f} s (epoch {reached['epoch']})" if reached else "not reached"))
    print(f"iterations/s (median epoch): {result['iterations_per_second']:.1f}; waiting for batches: "
          f"{100 * result['data_wait_fraction']:.1f}% of training time")
    if util:
        print(f"GPU utilization while training: {util['mean_utilization']:.1f}% mean of {util['samples']} samples; "
              f"peak memory {util['max_memory_mib']:.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
