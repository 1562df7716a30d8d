"""review: the masks of one or more prediction folders, queued for a person to check, flagged first.

Inputs: prediction folders (``medseg predict``'s output: the masks, their ``qc/`` records with the
flags, the uncertainty score and the scan each was made from, and ``failed/`` records); optionally
the evaluation's ``metrics.csv`` (Dice and distances of cases with a reference), a manifest whose
labels are drawn as reference outlines, and the predict input (``scans``) for folders whose
records do not name their scans.

The queue's order: cases that could not be predicted or shown first, then the flagged cases (most
flags first, then the most uncertain), then the others, most uncertain first.

Outputs in ``out_dir``, each written atomically:

- ``queue.json``: the cases in that order, with their paths, flags and their reasons, uncertainty,
  volumes and metrics;
- ``cases/<case>.png``: the axial, coronal and sagittal slices with the most foreground, the mask
  over the scan (``medseg.review.render``);
- ``index.html``: the queue as a page that opens from the file system, read-only;
  ``medseg review --serve`` serves the folder with slice scrolling and a verdict form per case
  (``medseg.review.server``);
- ``review.json``: counts of cases, problems, flags and verdicts and, with an evaluation, the
  mean Dice of the flagged and of the other cases, of the cases with each flag, of the first
  quarter of the queue and of the rest, and Spearman's rank correlation of the uncertainty
  score with the Dice: whether the queue puts the worse masks first.

The verdicts (``verdicts.csv``, ``medseg.review.verdicts``) are the reviewers': a new build keeps
them, and a verdict on a mask that has since changed counts as outdated.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import ReviewConfig
from medseg.errors import DataError
from medseg.io import atomic_path, read_json, write_json
from medseg.qc import FAILED_DIR, QC_DIR
from medseg.review import page, render, verdicts
from medseg.review.cases import load_entry, scan_image, states, status, summarize
from medseg.review.folder import INDEX, PICTURES, QUEUE, SUMMARY, load_queue, mask_digest, prediction_models

log = logging.getLogger(__name__)

# Re-exported: the stage's readers of its own folder live below it, in medseg.review.
__all__ = ["INDEX", "PICTURES", "QUEUE", "SUMMARY", "ReviewResult", "load_entry", "load_queue", "log_to_mlflow",
           "mask_digest", "review", "scan_image", "states", "status", "summarize"]

@dataclass(frozen=True)
class ReviewResult:
    out_dir: Path
    entries: list[dict[str, Any]]
    summary: dict[str, Any]


def _order(entry: dict[str, Any]) -> tuple:
    group = 0 if entry["problem"] else 1 if entry["flags"] else 2
    uncertainty = entry["uncertainty"] if entry["uncertainty"] is not None else math.inf
    return group, -len(entry["flags"]), -uncertainty, entry["case_id"]


def _entry(folder: Path, case_id: str, record: dict[str, Any], *, predicted: bool) -> dict[str, Any]:
    """A queue entry from a QC record (``predicted``) or from a failure record."""
    mask = folder / f"{case_id}.nii.gz"
    uncertainty_map = folder / "uncertainty" / f"{case_id}.nii.gz"
    if predicted:
        problem = None if mask.is_file() else f"{mask}: the mask of this QC record is missing"
    else:
        problem = f"prediction failed: {record.get('error', 'no reason recorded')}"
    volumes = dict(record.get("volumes_ml", {}))
    return {
        "case_id": case_id, "prediction_dir": str(folder.resolve()),
        "mask": str(mask.resolve()) if predicted and mask.is_file() else None,
        "scan": record.get("scan") or [], "scan_kind": record.get("scan_kind", "nifti"),
        "uncertainty_map": str(uncertainty_map.resolve()) if predicted and uncertainty_map.is_file() else None,
        "flags": list(record.get("flags", [])), "details": dict(record.get("details", {})),
        "uncertainty": record.get("uncertainty"), "volumes_ml": volumes,
        "labels": record.get("labels") or {str(k): n for k, n in enumerate(volumes, start=1)},
        "problem": problem,
    }


def _records(folder: Path) -> list[dict[str, Any]]:
    """The cases of one prediction folder: its QC records, and its failures not predicted since."""
    if not folder.is_dir():
        raise DataError(f"prediction folder not found: {folder}")
    qc_files = sorted((folder / QC_DIR).glob("*.json"))
    failed_files = sorted((folder / FAILED_DIR).glob("*.json"))
    if not qc_files and not failed_files:
        raise DataError(f"{folder}: expected the output of medseg predict (records under {QC_DIR}/), found none")
    entries = [_entry(folder, path.stem, read_json(path), predicted=True) for path in qc_files]
    done = {e["case_id"] for e in entries}
    entries += [_entry(folder, path.stem, read_json(path), predicted=False)
                for path in failed_files if path.stem not in done]
    return entries


def _metrics(path: Path) -> dict[str, dict[str, Any]]:
    """Per case, from the evaluation's metrics.csv: each metric per class, and the mean Dice."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"case_id", "label_name", "dice"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: expected evaluate's metrics.csv with columns case_id, label_name, dice; "
                            f"missing {sorted(missing)}")
        cases: dict[str, dict[str, Any]] = {}
        for line, row in enumerate(reader, start=2):
            per_case = cases.setdefault(row["case_id"], {})
            for metric in ("dice", "hd95_mm", "surface_dice"):
                if metric not in row:
                    continue
                try:
                    value = float(row[metric])
                except ValueError:
                    raise DataError(f"{path}:{line}: expected a number for {metric}, found {row[metric]!r}") from None
                per_case.setdefault(metric, {})[row["label_name"]] = value
    for per_case in cases.values():
        dice = [v for v in per_case.get("dice", {}).values() if math.isfinite(v)]
        per_case["mean_dice"] = float(np.mean(dice)) if dice else None
    return cases


def _references(manifest_path: Path) -> dict[str, str]:
    from medseg.stages.evaluate import references

    return {case_id: str(path.resolve()) for case_id, path in references(manifest_path, None)[0].items()}


def _scans_from_input(scans: Path) -> dict[str, dict[str, Any]]:
    """Each case's ``scan`` and ``scan_kind`` as predict records them, from the predict input."""
    from medseg.stages.predict import cases_from_input, scan_record

    return {c.case_id: scan_record(c) for c in cases_from_input(scans)}


def review(
    prediction_dirs: Sequence[Path],
    out_dir: Path,
    config: ReviewConfig | None = None,
    *,
    scans: Path | None = None,
    manifest: Path | None = None,
    evaluation: Path | None = None,
) -> ReviewResult:
    """Build the review folder ``out_dir`` of the masks in ``prediction_dirs``; see the module doc."""
    config = config or ReviewConfig()
    if not prediction_dirs:
        raise DataError("review: expected at least one prediction folder, found none")
    entries: dict[str, dict[str, Any]] = {}
    for folder in prediction_dirs:
        for entry in _records(Path(folder)):
            other = entries.get(entry["case_id"])
            if other is not None:
                raise DataError(f"case {entry['case_id']}: found in both {other['prediction_dir']} and "
                                f"{entry['prediction_dir']}; expected each case in one prediction folder")
            entries[entry["case_id"]] = entry
    given = _scans_from_input(Path(scans)) if scans is not None else {}
    references = _references(Path(manifest)) if manifest is not None else {}
    metrics = _metrics(Path(evaluation)) if evaluation is not None else {}
    for case_id, entry in entries.items():
        entry.update(given.get(case_id, {}))
        entry["reference"] = references.get(case_id)
        entry["metrics"] = metrics.get(case_id)
        entry["mask_sha256"] = mask_digest(entry["mask"])
    out_dir = Path(out_dir)
    pictures = out_dir / PICTURES
    pictures.mkdir(parents=True, exist_ok=True)
    for case_id, entry in sorted(entries.items()):
        entry["overview"], entry["shown"] = None, {}
        if entry["problem"]:
            log.error("case %s: %s", case_id, entry["problem"])
            continue
        try:
            images = load_entry(entry, config)
            picture, entry["shown"] = render.overview(images, alpha=config.alpha, size=config.thumbnail_size)
        except DataError as err:
            entry["problem"] = f"cannot be shown: {err}"
            log.error("case %s %s", case_id, entry["problem"])
            continue
        target = pictures / f"{case_id}.png"
        with atomic_path(target) as tmp:
            tmp.write_bytes(render.png(picture))
        entry["overview"] = f"{PICTURES}/{case_id}.png"
    for stale in pictures.glob("*.png"):
        if stale.stem not in entries or entries[stale.stem]["overview"] is None:
            stale.unlink()
    queue = sorted(entries.values(), key=_order)
    current = verdicts.current(out_dir)
    summary = summarize(queue, current)
    write_json(out_dir / QUEUE, {"cases": queue})
    write_json(out_dir / SUMMARY, summary)
    with atomic_path(out_dir / INDEX) as tmp:
        tmp.write_text(page.index_page(queue, states(queue, current), current, summary, served=False))
    log.info("review of %d cases (%d flagged, %d with problems) -> %s", summary["n_cases"], summary["n_flagged"],
             summary["n_problems"], out_dir / INDEX)
    return ReviewResult(out_dir, queue, summary)


STATES = (*verdicts.CHOICES, "open", "outdated")


def _model_version(client: Any, ref: str) -> Any | None:
    """The registered model version of ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""
    from mlflow.exceptions import MlflowException

    path = ref.removeprefix("models:/")
    try:
        if "@" in path:
            name, alias = path.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = path.rpartition("/")
        return client.get_model_version(name, version) if name and version.isdigit() else None
    except MlflowException as err:
        log.warning("%s: not found in the model registry (%s); its verdicts are not logged", ref, err)
        return None


def log_to_mlflow(review_dir: Path, tracking_uri: str) -> dict[str, dict[str, int]]:
    """Record the verdicts on each registered model version whose masks the review holds: tags
    ``review.<state>`` (counts of accept, fix, reject, open and outdated masks), ``review.cases`` and
    ``review.folder``, and ``verdicts.csv`` under ``review/`` in the version's run. Cases with a
    problem (no mask to judge) are left out; a prediction folder of an ensemble counts for each of its
    models. Returns the counts by model reference."""
    import mlflow

    review_dir = Path(review_dir)
    queue = load_queue(review_dir)
    current = verdicts.current(review_dir)
    records: dict[str, list[str]] = {}
    counts: dict[str, dict[str, int]] = {}
    for entry in queue:
        if entry.get("problem"):  # no mask to judge
            continue
        folder = entry["prediction_dir"]
        if folder not in records:
            records[folder] = list(prediction_models(folder))
        state = status(entry, current.get(entry["case_id"]))
        for ref in records[folder]:
            if ref.startswith("models:/"):
                counts.setdefault(ref, dict.fromkeys(STATES, 0))[state] += 1
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    logged = {}
    for ref, per_model in counts.items():
        version = _model_version(client, ref)
        if version is None:
            continue
        for state, n in per_model.items():
            client.set_model_version_tag(version.name, version.version, f"review.{state}", str(n))
        client.set_model_version_tag(version.name, version.version, "review.cases", str(sum(per_model.values())))
        client.set_model_version_tag(version.name, version.version, "review.folder", str(review_dir.resolve()))
        if (review_dir / verdicts.FILE).is_file() and version.run_id:
            client.log_artifact(version.run_id, str(review_dir / verdicts.FILE), artifact_path="review")
        logged[ref] = per_model
        log.info("%s: %s", ref, ", ".join(f"{s} {n}" for s, n in per_model.items()))
    return logged
