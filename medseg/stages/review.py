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
import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.config import ReviewConfig
from medseg.errors import DataError
from medseg.io import atomic_path, is_nifti, load_nifti, read_json, sha256, write_json
from medseg.qc import FAILED_DIR, QC_DIR
from medseg.review import page, render, verdicts

log = logging.getLogger(__name__)

QUEUE = "queue.json"
SUMMARY = "review.json"
INDEX = "index.html"
PICTURES = "cases"


@dataclass(frozen=True)
class ReviewResult:
    out_dir: Path
    entries: list[dict[str, Any]]
    summary: dict[str, Any]


@functools.lru_cache(maxsize=4096)
def _digest(path: str, mtime_ns: int, size: int) -> str:  # the stat fields key the cache to the file's version
    return sha256(Path(path))


def mask_digest(path: Path | str | None) -> str:
    """The SHA-256 of a mask file ('' when there is none), remembered while the file is unchanged."""
    if not path or not Path(path).is_file():
        return ""
    stat = os.stat(path)
    return _digest(str(path), stat.st_mtime_ns, stat.st_size)


def status(entry: dict[str, Any], verdict: verdicts.Verdict | None) -> str:
    """``open`` (no verdict), ``outdated`` (on a mask since replaced) or the verdict."""
    if verdict is None:
        return "open"
    if verdict.mask_sha256 != mask_digest(entry.get("mask")):
        return "outdated"
    return verdict.verdict


def states(queue: Sequence[dict[str, Any]], current: dict[str, verdicts.Verdict]) -> dict[str, str]:
    """The ``status`` of every case of the queue."""
    return {e["case_id"]: status(e, current.get(e["case_id"])) for e in queue}


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


def scan_image(entry: dict[str, Any]) -> tuple[nib.Nifti1Image, str]:
    """The scan of a queue entry as an image (DICOM series are read), and its name for messages."""
    paths = [Path(p) for p in entry["scan"]]
    if not paths:
        raise DataError(f"case {entry['case_id']}: no scan is recorded for it in {entry['prediction_dir']}/{QC_DIR}; "
                        "give the predict input (--scans)")
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"case {entry['case_id']}: expected its scan at {missing[0]}, found nothing there")
    if entry["scan_kind"] == "dicom":
        from medseg.dicom import read_series

        volume = read_series(paths)
        data = volume.data if volume.data.ndim == 3 else volume.data[..., 0]
        return nib.Nifti1Image(np.asarray(data), volume.affine), str(paths[0].parent)
    if not is_nifti(paths[0]):
        raise DataError(f"case {entry['case_id']}: expected a NIfTI scan, found {paths[0]}")
    return load_nifti(paths[0]), str(paths[0])


def load_entry(entry: dict[str, Any], config: ReviewConfig) -> render.CaseImages:
    """The pictures' data of a queue entry: its scan, mask, reference and uncertainty map."""
    scan, name = scan_image(entry)
    return render.load_case(
        scan, name, Path(entry["mask"]),
        reference_path=Path(entry["reference"]) if entry.get("reference") else None,
        uncertainty_path=Path(entry["uncertainty_map"]) if entry.get("uncertainty_map") else None,
        window=tuple(config.window) if config.window else None,  # type: ignore[arg-type]
    )


def summarize(entries: Sequence[dict[str, Any]], current: dict[str, verdicts.Verdict]) -> dict[str, Any]:
    flags: dict[str, int] = {}
    for entry in entries:
        for flag in entry["flags"]:
            flags[flag] = flags.get(flag, 0) + 1
    counts: dict[str, int] = {}
    for state in states(entries, current).values():
        counts[state] = counts.get(state, 0) + 1
    summary: dict[str, Any] = {
        "n_cases": len(entries),
        "n_problems": sum(1 for e in entries if e["problem"]),
        "n_flagged": sum(1 for e in entries if e["flags"]),
        "flags": dict(sorted(flags.items())),
        "verdicts": dict(sorted(counts.items())),
    }
    scored = [e for e in entries if e.get("metrics") and e["metrics"].get("mean_dice") is not None]
    if scored:
        def group(members: list[dict[str, Any]]) -> dict[str, Any]:
            values = [e["metrics"]["mean_dice"] for e in members]
            return {"n": len(values), "mean_dice": float(np.mean(values)) if values else None}

        summary["dice"] = {
            "flagged": group([e for e in scored if e["flags"]]),
            "not_flagged": group([e for e in scored if not e["flags"]]),
            "by_flag": {f: group([e for e in scored if f in e["flags"]]) for f in sorted(flags)},
            # does the queue put the worse masks first? (entries come in queue order)
            "queue_first_quarter": group(scored[: math.ceil(len(scored) / 4)]),
            "queue_rest": group(scored[math.ceil(len(scored) / 4) :]),
            "uncertainty_spearman": _spearman([e for e in scored if e["uncertainty"] is not None]),
        }
    return summary


def _spearman(entries: Sequence[dict[str, Any]]) -> float | None:
    """Spearman's rank correlation of the uncertainty score with the mean Dice (None under 3 cases)."""
    if len(entries) < 3:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr([e["uncertainty"] for e in entries], [e["metrics"]["mean_dice"] for e in entries]).statistic
    return float(rho) if math.isfinite(rho) else None


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


def load_queue(review_dir: Path) -> list[dict[str, Any]]:
    """The queue a build wrote into ``review_dir``."""
    path = Path(review_dir) / QUEUE
    if not path.is_file():
        raise DataError(f"{review_dir}: expected a review folder built by medseg review ({QUEUE}), found none")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise DataError(f"{path}: expected {{'cases': [...]}}, found another structure")
    return data["cases"]


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
            path = Path(folder) / "predict.json"
            records[folder] = [m["model"] for m in read_json(path).get("models", [])] if path.is_file() else []
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
