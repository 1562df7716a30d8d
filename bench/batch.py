"""Benchmark: the batch on a CPU. The demo's network trained for the same minutes with each batch size.

    .venv/bin/python bench/batch.py --data ../shared/data/hippocampus [--minutes 10] [--batches 2 7]

For each batch (2, the least, against 7, what nnU-Net's rules plan for the hippocampus): the demo's
plan with that batch, one epoch to measure the epoch's time, then ``medseg train`` of fold 0 with the
demo's config and as many epochs as fit ``--minutes`` (so that each run's poly schedule ends), then
``predict`` with flips and ``evaluate`` of the 42 validation cases in their own geometry. Reports the
iterations and samples per second, the optimizer steps, the best validation Dice in training and the
final Dice. Prints a table and writes ``bench/results/batch.json``. This is what ``plan.device``'s
rule for a CPU rests on (``medseg/stages/plan.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_batch(data: Path, work: Path, batch: int, minutes: float) -> dict[str, Any]:
    from common import DEMO, medseg_data, timed_train

    from medseg.config import PredictConfig, load_workflow_config
    from medseg.stages.evaluate import evaluate
    from medseg.stages.plan import load_splits, plan
    from medseg.stages.predict import predict

    pre, _, splits = medseg_data(data, work)
    manifest = work / "medseg" / "ingest" / "manifest.json"
    config = load_workflow_config(DEMO).plan.model_copy(update={"batch_size": batch})
    plan_path = plan(manifest, work / "medseg" / f"plan-batch{batch}", config).plan_path
    out = work / "medseg" / f"batch{batch}-{time.strftime('%Y%m%d-%H%M%S')}"
    _, _, probe = timed_train(pre, plan_path, splits, out / "probe", {"epochs": 1, "val_every": 1})
    epoch_s = probe[0]["epoch_seconds"]
    epochs = max(1, int(minutes * 60 * 0.97 / epoch_s))
    params = {"epochs": epochs, "val_every": max(1, epochs // 20), "max_minutes": minutes}
    _, wall, history = timed_train(pre, plan_path, splits, out / "fold_0", params)
    split = load_splits(splits, 0)
    predict(manifest, out / "predictions", [str(out / "fold_0" / "best.pt")], PredictConfig(tta_flips=True),
            case_ids=split["val"], device="cpu")
    summary = evaluate([out / "predictions"], out / "evaluation", manifest_path=manifest).summary
    its = statistics.median_high(h["iterations_per_second"] for h in history)
    per_epoch = len(split["train"]) // batch  # one pass per epoch, the last part-batch dropped
    return {
        "batch": batch, "epochs": len(history), "planned_epochs": epochs, "probe_epoch_seconds": epoch_s,
        "train_minutes": wall / 60, "iterations_per_second": its, "samples_per_second": its * batch,
        "optimizer_steps": per_epoch * len(history),
        "best_val_dice_in_training": max(h["val_dice"] for h in history if "val_dice" in h),
        "final_dice": summary["mean_dice"],
        "final_classes": {n: c["dice"]["mean"] for n, c in summary["classes"].items()},
        "n_val": summary["n_cases"],
        "curve": [{"seconds": h["seconds"], "epoch": h["epoch"], "dice": h["val_dice"]}
                  for h in history if "val_dice" in h],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
                    / "hippocampus", help="an MSD Task04 Hippocampus folder")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 7])
    ap.add_argument("--work", type=Path, default=REPO / "data" / "bench", help="preprocessed data, kept")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = [run_batch(args.data, args.work, b, args.minutes) for b in args.batches]
    print(f"\n{'batch':>5} {'epochs':>6} {'train min':>9} {'it/s':>6} {'samples/s':>9} {'steps':>6} "
          f"{'in training':>11} {'with flips':>10}")
    for r in rows:
        print(f"{r['batch']:5d} {r['epochs']:6d} {r['train_minutes']:9.1f} {r['iterations_per_second']:6.2f} "
              f"{r['samples_per_second']:9.1f} {r['optimizer_steps']:6d} {r['best_val_dice_in_training']:11.4f} "
              f"{r['final_dice']:10.4f}")
    base = rows[0]
    for r in rows[1:]:
        print(f"batch {r['batch']} / batch {base['batch']}: samples/s {r['samples_per_second'] / base['samples_per_second']:.2f}, "
              f"steps {r['optimizer_steps'] / base['optimizer_steps']:.2f}, final Dice {r['final_dice'] - base['final_dice']:+.4f}")
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "minutes": args.minutes, "runs": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.out / 'batch.json'}")


if __name__ == "__main__":
    main()
