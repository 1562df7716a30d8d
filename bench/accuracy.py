"""Benchmark: validation Dice against wall time, medseg against nnU-Net v2, same fold, same machine, one run.

    .venv/bin/python bench/accuracy.py [--data ../shared/data/hippocampus] [--minutes 30]

Both tools preprocess the MSD folder their own way (kept in ``--work``; not counted) and train on
the training cases of fold 0 of medseg's split (given to nnU-Net as ``splits_final.json``) for
``--minutes`` of wall time each, one after the other, on the CPU:

- medseg: ``medseg train`` with ``configs/experiments/hippocampus.yaml`` and ``--medseg-params``
  (epochs that fit the time, ``max_minutes`` as the limit), then ``predict`` with flips and
  ``evaluate`` of the validation cases in their own geometry. The curve is the validation Dice
  that training records (whole validation cases, sliding window, no flips).
- nnU-Net: ``nnUNetTrainer`` with its plan, network, loss, augmentation and data loader, run as
  ``nnUNetv2_train ... -device cpu`` runs it (torch threads = cores, its default augmentation
  processes), with a time limit: epochs of ``--nnunet-iterations`` batches, and after the
  first epoch its poly schedule set to the epochs that fit the time. Then its own final
  validation (sliding window with mirroring) of the validation cases. Its curve is the
  "pseudo Dice" it logs per epoch (on validation patches, not whole cases).

Prints Dice per class against time and the final scores, and writes ``bench/results/accuracy.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
log = logging.getLogger("bench.accuracy")

MEDSEG_PARAMS = {"epochs": 130, "val_every": 5}


def run_medseg(work: Path, minutes: float, params: dict[str, Any]) -> dict[str, Any]:
    from common import DEMO, medseg_data, timed_train

    from medseg.config import PredictConfig, load_workflow_config
    from medseg.stages.evaluate import evaluate
    from medseg.stages.plan import load_splits, plan
    from medseg.stages.predict import predict

    pre, _, splits = medseg_data(DATA, work)
    # the demo's plan (its batch of 2); the preprocessing does not depend on the batch
    plan_path = plan(work / "medseg" / "ingest" / "manifest.json", work / "medseg" / "plan-demo",
                     load_workflow_config(DEMO).plan).plan_path
    out = work / "medseg" / f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    params = {"max_minutes": minutes, **params}
    _, train_s, history = timed_train(pre, plan_path, splits, out / "fold_0", params)
    curve = [{"seconds": h["seconds"], "epoch": h["epoch"], "mean": h["val_dice"],
              **{k.removeprefix("val_dice_").lower(): v for k, v in h.items() if k.startswith("val_dice_")}}
             for h in history if "val_dice" in h]
    start = time.monotonic()
    val = load_splits(splits, 0)["val"]
    manifest = work / "medseg" / "ingest" / "manifest.json"
    predict(manifest, out / "predictions", [str(out / "fold_0" / "best.pt")], PredictConfig(tta_flips=True),
            case_ids=val, device="cpu")
    summary = evaluate([out / "predictions"], out / "evaluation", manifest_path=manifest).summary
    final = {"mean": summary["mean_dice"], **{n.lower(): c["dice"]["mean"] for n, c in summary["classes"].items()}}
    return {"train_seconds": train_s, "epochs": len(history), "curve": curve, "final": final,
            "final_seconds": time.monotonic() - start, "n_val": summary["n_cases"], "params": params,
            "iterations_per_second": sorted(h["iterations_per_second"] for h in history)[len(history) // 2]}


def run_nnunet(work: Path, minutes: float, iterations: int, val_iterations: int) -> dict[str, Any]:
    import multiprocessing

    import nnunet
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class nnUNetTrainer_TimeLimit(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming)
        """nnUNetTrainer with a wall-time limit: its loop, epochs of ``iterations`` batches, the poly
        schedule fitted after the first epoch to the epochs that fit the time."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")) -> None:  # nnU-Net reads this signature
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = iterations
            self.num_val_iterations_per_epoch = val_iterations
            self.curve: list[dict[str, Any]] = []

        def run_training(self) -> None:
            budget = minutes * 60 - (time.monotonic() - STARTED)
            begin = time.monotonic()
            self.on_train_start()
            longest = 0.0
            while self.current_epoch < self.num_epochs:
                t0 = time.monotonic()
                self.on_epoch_start()
                self.on_train_epoch_start()
                outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
                self.on_train_epoch_end(outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val = [self.validation_step(next(self.dataloader_val)) for _ in range(self.num_val_iterations_per_epoch)]
                    self.on_validation_epoch_end(val)
                self.on_epoch_end()  # advances current_epoch
                longest = max(longest, time.monotonic() - t0)
                if self.current_epoch == 1:
                    fit = max(1, int((budget - (time.monotonic() - begin)) / longest) + 1)
                    self.num_epochs = min(self.num_epochs, fit)
                    self.lr_scheduler.max_steps = self.num_epochs
                    self.print_to_log_file(f"time limit: {self.num_epochs} epochs fit {minutes} minutes")
                dice = [float(d) for d in self.logger.get_value("dice_per_class_or_region", step=-1)]
                self.curve.append({"seconds": time.monotonic() - STARTED, "epoch": self.current_epoch,
                                   "mean": sum(dice) / len(dice), **{str(i + 1): d for i, d in enumerate(dice)}})
                if time.monotonic() - begin + longest > budget:
                    break
            self.on_train_end()

    torch.set_num_threads(multiprocessing.cpu_count())  # as nnUNetv2_train -device cpu does
    STARTED = time.monotonic()
    pre = work / "nnunet" / "preprocessed" / nnunet.DATASET_NAME
    trainer: Any = nnunet.trainer(pre, 0, nnUNetTrainer_TimeLimit)
    trainer.run_training()
    train_s = time.monotonic() - STARTED
    start = time.monotonic()
    trainer.perform_actual_validation(False)
    summary = json.loads((Path(trainer.output_folder) / "validation" / "summary.json").read_text())
    names = {str(v): k for k, v in trainer.dataset_json["labels"].items()}
    final = {"mean": summary["foreground_mean"]["Dice"],
             **{names[k].lower(): v["Dice"] for k, v in summary["mean"].items()}}
    curve = [{(names[k].lower() if k in names else k): v for k, v in row.items()} for row in trainer.curve]
    return {"train_seconds": train_s, "epochs": trainer.current_epoch, "curve": curve, "final": final,
            "final_seconds": time.monotonic() - start, "iterations_per_epoch": iterations,
            "batch_size": trainer.batch_size}


def main() -> None:
    global DATA
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data")) / "hippocampus")
    ap.add_argument("--work", type=Path, default=REPO / "data" / "bench", help="preprocessed data of both tools, kept")
    ap.add_argument("--minutes", type=float, default=30.0, help="wall time of each tool's training")
    ap.add_argument("--medseg-params", type=json.loads, default=MEDSEG_PARAMS,
                    help=f"medseg's train section over the demo config, as JSON (default {json.dumps(MEDSEG_PARAMS)})")
    ap.add_argument("--nnunet-iterations", type=int, default=50, help="nnU-Net batches per epoch (its default: 250)")
    ap.add_argument("--nnunet-val-iterations", type=int, default=10, help="nnU-Net validation batches per epoch (50)")
    ap.add_argument("--only", choices=["medseg", "nnunet"], help="run one tool only")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "accuracy.json")
    args = ap.parse_args()
    DATA = args.data
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    import nnunet
    from common import medseg_data

    nnunet.set_environment(args.work / "nnunet")  # before nnunetv2 is imported
    _, _, splits = medseg_data(args.data, args.work)
    nn_pre = nnunet.plan_and_preprocess(args.data, args.work / "nnunet", os.cpu_count() or 1)
    nnunet.use_split(nn_pre, splits)

    results: dict[str, Any] = {}
    if args.only in (None, "medseg"):
        results["medseg"] = run_medseg(args.work, args.minutes, args.medseg_params)
    if args.only in (None, "nnunet"):
        results["nnU-Net"] = run_nnunet(args.work, args.minutes, args.nnunet_iterations, args.nnunet_val_iterations)

    for tool, r in results.items():
        classes = [k for k in r["final"] if k != "mean"]
        print(f"\n{tool}: {r['epochs']} epochs in {r['train_seconds'] / 60:.1f} min")
        print(f"{'minutes':>8} {'epoch':>6} {'mean':>7} " + " ".join(f"{c:>10}" for c in classes))
        for row in r["curve"]:
            print(f"{row['seconds'] / 60:>8.1f} {row['epoch']:>6} {row['mean']:>7.4f} "
                  + " ".join(f"{row.get(c, float('nan')):>10.4f}" for c in classes))
        print(f"{'final':>8} {'':>6} {r['final']['mean']:>7.4f} " + " ".join(f"{r['final'][c]:>10.4f}" for c in classes)
              + f"   (validation of whole cases with flips, {r['final_seconds']:.0f} s)")
    import torch

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "minutes": args.minutes, "results": results,
    }, indent=1))
    print(f"written {args.out}")


DATA = Path()

if __name__ == "__main__":
    main()
