"""The summary printed at the end of a workflow run (``medseg report``)."""

from __future__ import annotations

from pathlib import Path

from medseg.errors import DataError
from medseg.io import read_json


def report(results: Path, tracking_uri: str) -> str:
    """Validation Dice, where the outputs are, and how to open the experiment."""
    results = Path(results)
    summary_path = results / "evaluation" / "summary.json"
    if not summary_path.exists():
        raise DataError(f"no evaluation at {summary_path}: has the workflow finished?")
    summary = read_json(summary_path)
    lines = [f"Validation ({summary['n_cases']} held-out cases, in their original geometry):"]
    for name, stats in summary["classes"].items():
        d, h, s = (stats[m]["mean"] for m in ("dice", "hd95_mm", "surface_dice"))
        lines.append(f"  {name:<12} Dice {d:.4f}   HD95 {h if h is None else round(h, 2)} mm   surface Dice {s:.4f}")
    lines.append(f"  mean Dice    {summary['mean_dice']:.4f}")
    models = sorted(results.glob("train/fold_*/model.json"))
    for info in models:
        data = read_json(info)
        lines.append(f"Model (fold {data['fold']}): {data['model_uri']}  (best validation Dice {data['best_val_dice']:.4f})")
    lines += _left_out(results, summary)
    lines += [
        f"Predictions: {results / 'predictions'}",
        f"Reports:     {results / 'evaluation'} (metrics.csv, summary.json, metrics.png, postprocessing.json)",
        f"Experiment:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri}",
        f"Review:      {results / 'review' / 'index.html'}; to record verdicts: .venv/bin/medseg review "
        f"--output {results / 'review'} --serve",
        "Predict new scans: .venv/bin/medseg predict --input <folder of scans> --output <folder>  "
        "(with the settings the model was validated with)",
    ]
    return "\n".join(lines)


def _left_out(results: Path, summary: dict) -> list[str]:
    """Every case a stage refused or left out, with its reason: the numbers above are without them."""
    entries: list[str] = []
    manifest = results / "ingest" / "manifest.json"
    if manifest.exists():
        for failed in read_json(manifest).get("failed", []):
            entries.append(f"  ingest    {failed.get('case_id') or failed.get('file')}: {failed.get('error')}")
    for record in sorted(results.glob("predictions/*/failed/*.json")):
        entries.append(f"  predict   {record.stem} ({record.parent.parent.name}): {read_json(record).get('error')}")
    for case_id, reason in sorted(summary.get("left_out", {}).items()):
        entries.append(f"  evaluate  {case_id}: {reason}")
    if summary.get("not_predicted"):
        entries.append(f"  evaluate  no mask for {len(summary['not_predicted'])} reference case(s): "
                       + ", ".join(summary["not_predicted"]))
    if not entries:
        return ["Left out:    no case"]
    return [f"Left out:    {len(entries)} (see the stage's report for each)", *entries]
