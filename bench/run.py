"""Benchmark: the medseg demo workflow against a plain MONAI script, in one run.

    .venv/bin/python bench/run.py --data ../shared/data/hippocampus [--peer-minutes M]

Runs the whole medseg workflow (configs/experiments/hippocampus.yaml, fresh results folder),
then the plain MONAI script of bench/plain_monai.py on the same validation cases, for as many
training minutes as medseg trained (or --peer-minutes). Prints a table and writes
bench/results/demo.json. Nothing is timed inside unit tests.
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

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="an MSD Task04 Hippocampus folder")
    ap.add_argument("--peer-minutes", type=float, default=None,
                    help="the peer's training minutes (default: as many as medseg trained)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    results = args.out / "medseg"
    shutil.rmtree(results, ignore_errors=True)
    shutil.rmtree(REPO / ".snakemake" / "incomplete", ignore_errors=True)
    medseg_s = run([str(bin_dir / "snakemake"), "--cores", "all", "--configfile",
                    "configs/experiments/hippocampus.yaml", "--config", f"dataset={args.data.resolve()}",
                    f"results={results}", "--forceall", "--quiet"], env)
    summary = json.loads((results / "evaluation" / "summary.json").read_text())
    history = json.loads((results / "train" / "fold_0" / "history.json").read_text())
    train_s = sum(h["epoch_seconds"] for h in history)
    peer_minutes = args.peer_minutes if args.peer_minutes is not None else train_s / 60
    peer_json = args.out / "peer.json"
    peer_s = run([sys.executable, str(REPO / "bench" / "plain_monai.py"), "--data", str(args.data.resolve()),
                  "--splits", str(results / "plan" / "splits.json"), "--minutes", f"{peer_minutes:.3f}",
                  "--output", str(peer_json)], env)
    peer = json.loads(peer_json.read_text())
    rows = [
        ("medseg workflow (all stages)", medseg_s, train_s, summary["mean_dice"],
         summary["classes"]["Anterior"]["dice"]["mean"], summary["classes"]["Posterior"]["dice"]["mean"]),
        (f"plain MONAI script ({peer['epochs']} epochs)", peer_s, peer["train_seconds"], peer["mean_dice"], peer["dice_anterior"], peer["dice_posterior"]),
    ]
    print(f"\n{'':32} {'wall s':>8} {'train s':>8} {'mean Dice':>10} {'anterior':>9} {'posterior':>9}")
    for name, wall, tr, dice, a, p in rows:
        print(f"{name:32} {wall:8.0f} {tr:8.0f} {dice:10.4f} {a:9.4f} {p:9.4f}")
    ratio = {"wall": medseg_s / peer_s, "mean_dice": summary["mean_dice"] / peer["mean_dice"]}
    print(f"{'ratio medseg / peer':32} {ratio['wall']:8.2f} {'':8} {ratio['mean_dice']:10.3f}")
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "validation_cases": summary["n_cases"],
        "medseg": {"wall_seconds": medseg_s, "train_seconds": train_s, "epochs": len(history), "summary": summary},
        "peer": {"wall_seconds": peer_s, "minutes_given": peer_minutes, **peer},
        "ratio": ratio,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten {args.out / 'demo.json'}")


if __name__ == "__main__":
    main()
