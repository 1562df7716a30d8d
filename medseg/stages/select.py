"""select: the best of several trained configurations (2D against 3D, one network against another)
by cross-validated Dice, as nnU-Net's ``nnUNetv2_find_best_configuration`` chooses.

Each candidate is the results folder of one workflow run (its own config: ``plan.dims: 2``, another
network, ...). Its ``evaluation/metrics.csv`` holds the out-of-fold predictions of all its folds,
scored in each scan's own geometry, so every case was predicted by a model that did not see it.
The candidate with the highest mean Dice over the foreground classes wins; a tie goes to the
candidate listed first. Candidates must have been scored on the same cases and classes, or the
comparison is refused.

Output: ``selection.json`` with each candidate's mean Dice (overall and per class), cases and folds,
the winner, the margin to the runner-up, and the ``model.json`` files of the winner's folds (what
``medseg predict --model-info`` takes to predict with their ensemble).
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import DataError
from medseg.io import write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelectResult:
    path: Path
    chosen: str
    scores: dict[str, float]


def read_scores(results: Path) -> dict[str, Any]:
    """Mean Dice per class and overall from ``results/evaluation/metrics.csv``, and its case ids."""
    table = Path(results) / "evaluation" / "metrics.csv"
    if not table.is_file():
        raise DataError(f"{table}: expected the evaluation of a finished workflow run, found no such file")
    per_class: dict[str, list[float]] = defaultdict(list)
    cases: set[str] = set()
    with table.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"case_id", "label_name", "dice"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{table}: expected columns case_id, label_name and dice, found {reader.fieldnames}")
        for row in reader:
            cases.add(row["case_id"])
            try:
                value = float(row["dice"])
            except ValueError:
                raise DataError(f"{table}: expected a number in column dice, found {row['dice']!r} "
                                f"(case {row['case_id']})") from None
            if math.isfinite(value):  # a class absent from both reference and mask has no Dice
                per_class[row["label_name"]].append(value)
    if not cases:
        raise DataError(f"{table}: expected one row per case and class, found none")
    means = {name: sum(v) / len(v) for name, v in sorted(per_class.items()) if v}
    infos = sorted(str(p) for p in (Path(results) / "train").glob("fold_*/model.json"))
    return {"mean_dice": sum(means.values()) / len(means), "classes": means, "cases": sorted(cases),
            "n_cases": len(cases), "model_infos": infos, "results": str(results)}


def select(candidates: Mapping[str, Path], out_path: Path) -> SelectResult:
    """Score every candidate results folder, choose the best by mean Dice, write ``out_path``."""
    if len(candidates) < 2:
        raise DataError(f"select: expected at least 2 candidates to compare, found {len(candidates)}: {list(candidates)}")
    scored = {name: read_scores(Path(path)) for name, path in candidates.items()}
    first_name, first = next(iter(scored.items()))
    for name, s in scored.items():
        if set(s["cases"]) != set(first["cases"]):
            only = sorted(set(s["cases"]) ^ set(first["cases"]))
            raise DataError(f"select: candidates '{first_name}' ({first['results']}) and '{name}' ({s['results']}) "
                            f"were evaluated on different cases ({len(only)} in one only, e.g. {only[:3]}); "
                            "expected the same dataset and folds")
        if set(s["classes"]) != set(first["classes"]):
            raise DataError(f"select: candidates '{first_name}' and '{name}' score different classes: "
                            f"{sorted(first['classes'])} against {sorted(s['classes'])}")
        if not s["model_infos"]:
            raise DataError(f"select: {s['results']}/train: expected fold_*/model.json of candidate '{name}', found none")
    ranking = sorted(scored, key=lambda n: -scored[n]["mean_dice"])  # stable: a tie keeps the listed order
    chosen, runner_up = ranking[0], ranking[1]
    margin = scored[chosen]["mean_dice"] - scored[runner_up]["mean_dice"]
    why = (f"'{chosen}' has the highest cross-validated mean Dice, {scored[chosen]['mean_dice']:.4f} over "
           f"{scored[chosen]['n_cases']} cases, {margin:.4f} above '{runner_up}'")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    write_json(out_path, {
        "chosen": chosen, "why": why, "margin": margin, "model_infos": scored[chosen]["model_infos"],
        "candidates": {n: {k: v for k, v in s.items() if k != "cases"} for n, s in scored.items()},
    })
    log.info("select: %s", why)
    return SelectResult(Path(out_path), chosen, {n: s["mean_dice"] for n, s in scored.items()})
