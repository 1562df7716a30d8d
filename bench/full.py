"""Benchmark: the full recipe (configs/experiments/hippocampus-full.yaml), five folds, out-of-fold Dice.

    .venv/bin/python bench/full.py --data ../shared/data/hippocampus      # run the workflow, then score it
    .venv/bin/python bench/full.py --results data/results-full           # score a finished run

Runs the whole workflow of the full recipe into a fresh results folder (every stage, the five folds
one after another), timed, unless ``--results`` names a finished run. Then, from its outputs:

- per fold: its training minutes and epochs (``train/fold_k/history.json``), its best validation Dice
  in training (whole validation cases, no flips), and its out-of-fold Dice: its validation cases as the
  workflow predicted them (with the recipe's flips), before and after the largest-component
  post-processing that evaluation chose from all five folds' cases (``evaluation/postprocessing.json``);
- the mean of the five folds' out-of-fold Dice, and the mean over all cases (``evaluation/summary.json``);
- the curve of validation Dice against training minutes (every ``val_every`` epochs, each fold and
  their mean), where it levels off (the first point within ``--level`` of the mean curve's best), and a
  plot of it (``--plot``).

Prints the tables and writes ``bench/results/full.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "experiments" / "hippocampus-full.yaml"


def run_workflow(data: Path, results: Path) -> float:
    """The recipe's workflow as the README runs it (make demo), into ``results``; its wall seconds."""
    shutil.rmtree(results, ignore_errors=True)
    start = time.monotonic()
    subprocess.run(["make", "demo", f"DATA={data.resolve()}", f"EXPERIMENT={RECIPE}", f"RESULTS={results}"],
                   cwd=REPO, check=True)
    return time.monotonic() - start


def fold_scores(results: Path, fold: int, refs: dict[str, Path], names: dict[int, str],
                keep: list[int]) -> dict[str, Any]:
    """The out-of-fold Dice of one fold's predicted validation cases, before and after ``keep``."""
    from medseg.io import load_nifti
    from medseg.postprocess import case_effect

    folder = results / "predictions" / f"fold_{fold}"
    before: list[float] = []
    after: list[float] = []
    cases = sorted(p for p in folder.glob("*.nii.gz"))
    for path in cases:
        case = path.name.removesuffix(".nii.gz")
        pred = np.asarray(load_nifti(path).dataobj).round().astype(np.int64)
        ref = np.asarray(load_nifti(refs[case]).dataobj).round().astype(np.int64)
        effect = case_effect(pred, ref, list(names))
        before.append(float(np.mean([effect[c][0] for c in names])))
        after.append(float(np.mean([effect[c][1] if c in keep else effect[c][0] for c in names])))
    return {"n_cases": len(cases), "dice": float(np.mean(before)), "dice_postprocessed": float(np.mean(after)),
            "sem": float(np.std(after, ddof=1) / np.sqrt(len(after)))}


def curve(histories: dict[int, list[dict]], level: float) -> dict[str, Any]:
    """Validation Dice against training minutes: per fold, their mean, and where the mean levels off."""
    per_fold = {k: [(sum(h["epoch_seconds"] for h in hist[: i + 1]) / 60, h["epoch"], h["val_dice"])
                    for i, h in enumerate(hist) if "val_dice" in h] for k, hist in histories.items()}
    epochs = sorted(set.intersection(*({e for _, e, _ in pts} for pts in per_fold.values())))
    mean = []
    for epoch in epochs:
        points = [next((m, d) for m, e, d in pts if e == epoch) for pts in per_fold.values()]
        mean.append({"epoch": epoch, "minutes": float(np.mean([m for m, _ in points])),
                     "dice": float(np.mean([d for _, d in points]))})
    best = max(p["dice"] for p in mean)
    levels = next(p for p in mean if p["dice"] >= best - level)
    return {"per_fold": {str(k): [{"minutes": m, "epoch": e, "dice": d} for m, e, d in pts]
                         for k, pts in per_fold.items()},
            "mean": mean, "best_mean": best, "levels_off": {**levels, "within": level}}


def plot(result: dict[str, Any], path: Path, goal: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for fold, pts in result["curve"]["per_fold"].items():
        ax.plot([p["minutes"] for p in pts], [p["dice"] for p in pts], lw=0.8, alpha=0.6, label=f"fold {fold}")
    mean = result["curve"]["mean"]
    ax.plot([p["minutes"] for p in mean], [p["dice"] for p in mean], "k-", lw=2, label="mean of the folds")
    lv = result["curve"]["levels_off"]
    ax.axvline(lv["minutes"], color="k", ls=":", lw=1)
    ax.annotate(f"within {lv['within']} of the best\nafter {lv['minutes']:.0f} min", (lv["minutes"], lv["dice"]),
                textcoords="offset points", xytext=(6, -30), fontsize=8)
    for fold, row in result["folds"].items():
        ax.plot(row["train_minutes"], row["dice_postprocessed"], "o", ms=4, color="C" + str(int(fold)))
    ax.axhline(goal, color="grey", ls="--", lw=1, label=f"goal {goal}")
    ax.set_xlabel("training minutes (2-core CPU)")
    ax.set_ylabel("validation Dice (mean of the classes)")
    ax.set_title("Full recipe: validation Dice in training (lines) and out-of-fold with flips (dots)", fontsize=9)
    ax.set_ylim(0.78, 0.91)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def score(results: Path, level: float) -> dict[str, Any]:
    from medseg.io import read_json
    from medseg.stages.evaluate import references

    refs, _ = references(results / "ingest" / "manifest.json", None)
    summary = read_json(results / "evaluation" / "summary.json")
    decision = read_json(results / "evaluation" / "postprocessing.json")
    names = {int(c["label"]): n for n, c in decision["classes"].items()}
    keep = [int(c) for c in decision["largest_component"]]
    folds = sorted(int(p.name.removeprefix("fold_")) for p in (results / "train").glob("fold_*"))
    histories = {k: read_json(results / "train" / f"fold_{k}" / "history.json") for k in folds}
    rows: dict[str, Any] = {}
    for k in folds:
        hist = histories[k]
        rows[str(k)] = {"train_minutes": sum(h["epoch_seconds"] for h in hist) / 60, "epochs": len(hist),
                        "best_val_dice_in_training": max(h["val_dice"] for h in hist if "val_dice" in h),
                        **fold_scores(results, k, refs, names, keep)}
    return {"results": str(results), "folds": rows,
            "mean_of_folds": float(np.mean([r["dice_postprocessed"] for r in rows.values()])),
            "mean_of_folds_before_postprocessing": float(np.mean([r["dice"] for r in rows.values()])),
            "all_cases": {"n_cases": summary["n_cases"], "mean_dice": summary["mean_dice"]},
            "postprocessing": decision["largest_component"],
            "train_minutes": sum(r["train_minutes"] for r in rows.values()),
            "curve": curve(histories, level)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="an MSD Task04 Hippocampus folder: run the workflow")
    ap.add_argument("--results", type=Path, help="a finished run of the recipe to score instead")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--plot", type=Path, default=REPO / "bench" / "results" / "full_curve.png")
    ap.add_argument("--level", type=float, default=0.002, help="levelled off: within this of the best")
    ap.add_argument("--goal", type=float, default=0.89)
    args = ap.parse_args()
    if (args.data is None) == (args.results is None):
        ap.error("give --data (run the recipe) or --results (a finished run), one of them")
    wall = None
    results = args.results
    if args.data is not None:
        results = args.out / "full"
        wall = run_workflow(args.data, results)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "wall_seconds": wall, **score(results, args.level)}
    print(f"\n{'fold':>4} {'cases':>5} {'train min':>9} {'epochs':>6} {'in training':>11} {'out-of-fold':>11} "
          f"{'+ post-proc.':>12}")
    for k, r in result["folds"].items():
        print(f"{k:>4} {r['n_cases']:5d} {r['train_minutes']:9.1f} {r['epochs']:6d} {r['best_val_dice_in_training']:11.4f} "
              f"{r['dice']:11.4f} {r['dice_postprocessed']:12.4f}")
    print(f"{'mean':>4} {'':5} {result['train_minutes']:9.1f} {'':6} {'':11} "
          f"{result['mean_of_folds_before_postprocessing']:11.4f} {result['mean_of_folds']:12.4f}")
    print(f"\nall {result['all_cases']['n_cases']} cases (evaluation/summary.json): mean Dice "
          f"{result['all_cases']['mean_dice']:.4f}; largest component kept for {result['postprocessing']}")
    if wall is not None:
        print(f"workflow wall time: {wall / 60:.1f} min")
    print(f"\n{'minutes':>8} {'epoch':>6} {'mean Dice in training':>22}")
    for p in result["curve"]["mean"]:
        print(f"{p['minutes']:8.1f} {p['epoch']:6d} {p['dice']:22.4f}")
    lv = result["curve"]["levels_off"]
    print(f"levels off (within {lv['within']} of the best mean {result['curve']['best_mean']:.4f}) at epoch "
          f"{lv['epoch']}, {lv['minutes']:.1f} min")
    plot(result, args.plot, args.goal)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "full.json").write_text(json.dumps(result, indent=2))
    print(f"\nwritten {args.out / 'full.json'} and {args.plot}")


if __name__ == "__main__":
    sys.exit(main())
