"""Reviewed masks as training labels: the cases of a review folder that may train the next model.

A case is used when its current verdict judged the predicted mask the folder shows now (a verdict
on a mask since replaced is outdated) and the case has no problem:

- ``accept``: the label is the mask the reviewer saw: the latest correction made on this predicted
  mask when there is one (``origin`` "corrected"), else the predicted mask (``origin`` "accepted");
- ``fix``: the label is that latest correction; a ``fix`` without one is not used (the mask still
  needs fixing);
- ``reject``, open (no verdict) and outdated cases are never used.

A correction's file must still hold what the reviewer saved (the SHA-256 its verdict recorded);
a changed one is refused, naming the file. Below the stages: ingest reads this.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medseg.errors import DataError
from medseg.io import sha256
from medseg.review import verdicts
from medseg.review.folder import load_queue, mask_digest, prediction_models

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ReviewedCase:
    """One case whose reviewed mask may train a model, and where that mask came from."""

    case_id: str
    scan: tuple[Path, ...]  # one NIfTI per channel, or the DICOM files of a series
    scan_kind: str  # "nifti" or "dicom"
    label: Path  # the predicted mask or a correction, on the scan's grid
    label_sha256: str
    origin: Literal["accepted", "corrected"]
    reviewer: str  # of the verdict that accepted or fixed the mask
    reviewed_at: str  # that verdict's time (ISO 8601, UTC)
    corrected_by: str  # who saved the correction ('' when the predicted mask was accepted)
    corrected_at: str
    predicted_by: tuple[str, ...]  # the models of the prediction folder (predict.json)
    review_dir: Path
    labels: dict[int, str]  # the foreground labels of the model that predicted it (queue.json)


@dataclass(frozen=True)
class RefusedCase:
    """A case that would be used but whose label cannot be trusted or read."""

    case_id: str
    file: str
    error: str


@dataclass(frozen=True)
class Feedback:
    """What a review folder gives the next training: the cases used, those refused, and why the
    others are left out (counts by reason)."""

    review_dir: Path
    cases: tuple[ReviewedCase, ...]
    refused: tuple[RefusedCase, ...]
    left_out: dict[str, int]


def _predicted_by(folder: str, cache: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    if folder not in cache:
        cache[folder] = prediction_models(folder)
    return cache[folder]


def _checked_correction(path: Path, row: verdicts.Verdict) -> str:
    """The SHA-256 of a correction's file, refused when it is not what the verdict recorded."""
    found = sha256(path)
    if row.correction_sha256 and found != row.correction_sha256:
        raise DataError(f"{path}: expected the corrected mask that {row.reviewer or '-'} saved at {row.time} "
                        f"(SHA-256 {row.correction_sha256[:12]}...), found a file changed since "
                        f"(SHA-256 {found[:12]}...)")
    if not row.correction_sha256:
        log.warning("%s: its verdict recorded no SHA-256, so it is used unchecked", path)
    return found


def _reason(entry: dict[str, Any], verdict: verdicts.Verdict | None) -> str | None:
    """Why a case is left out before its label is looked at (None: it may be used)."""
    if entry.get("problem") or not entry.get("mask"):
        return "problem"
    if verdict is None:
        return "open"
    if verdict.mask_sha256 != mask_digest(entry["mask"]):
        return "outdated"
    if verdict.verdict == "reject":
        return "rejected"
    return None


def reviewed_case(review_dir: Path, entry: dict[str, Any], verdict: verdicts.Verdict,
                  cache: dict[str, tuple[str, ...]] | None = None) -> ReviewedCase | None:
    """The training case of a queue ``entry`` whose current ``verdict`` judged its present mask
    (accept or fix); None for a ``fix`` without a correction. ``DataError`` when the label file
    is missing or changed."""
    review_dir = Path(review_dir)
    case_id = entry["case_id"]
    origin: Literal["accepted", "corrected"]
    shown, row = verdicts.shown_mask(review_dir, case_id, verdict.mask_sha256)
    if shown is not None and row is not None:
        label, digest, origin = shown, _checked_correction(shown, row), "corrected"
        corrected_by, corrected_at = row.reviewer, row.time
    elif verdict.verdict == "fix":
        return None
    else:
        label, digest, origin = Path(entry["mask"]), verdict.mask_sha256, "accepted"
        corrected_by = corrected_at = ""
    return ReviewedCase(
        case_id=case_id, scan=tuple(Path(p) for p in entry.get("scan") or ()),
        scan_kind=entry.get("scan_kind", "nifti"), label=label, label_sha256=digest, origin=origin,
        reviewer=verdict.reviewer, reviewed_at=verdict.time, corrected_by=corrected_by, corrected_at=corrected_at,
        predicted_by=_predicted_by(entry["prediction_dir"], {} if cache is None else cache),
        review_dir=review_dir.resolve(),
        labels={int(k): str(v) for k, v in (entry.get("labels") or {}).items() if int(k) != 0},
    )


def _named_file(message: str, review_dir: Path) -> str:
    """The file of the review folder that an error message names (its store when it names none)."""
    found = re.search(re.escape(str(review_dir)) + r"\S*", message)
    return found.group(0).rstrip(":;,.") if found else str(review_dir / verdicts.STORE)


def read_feedback(review_dir: Path) -> Feedback:
    """Every case of the built review folder ``review_dir`` that may train a model (see the module
    doc); a case whose label is missing or changed is refused and the others go on."""
    review_dir = Path(review_dir)
    if not review_dir.is_dir():
        raise DataError(f"review folder not found: {review_dir}")
    queue = load_queue(review_dir)
    current = verdicts.current(review_dir)
    cases: list[ReviewedCase] = []
    refused: list[RefusedCase] = []
    left_out: Counter[str] = Counter()
    cache: dict[str, tuple[str, ...]] = {}
    for entry in queue:
        verdict = current.get(entry["case_id"])
        reason = _reason(entry, verdict)
        if reason is not None or verdict is None:
            left_out[reason or "open"] += 1
            continue
        try:
            case = reviewed_case(review_dir, entry, verdict, cache)
        except DataError as err:
            message = str(err)
            refused.append(RefusedCase(entry["case_id"], _named_file(message, review_dir), message))
            log.error("reviewed case %s left out: %s", entry["case_id"], message)
            continue
        if case is None:
            left_out["fix without a correction"] += 1
        else:
            cases.append(case)
    origins = Counter(c.origin for c in cases)
    log.info("%s: %d reviewed cases to train on (%d accepted, %d corrected); left out: %s", review_dir, len(cases),
             origins["accepted"], origins["corrected"],
             ", ".join(f"{n} {why}" for why, n in sorted(left_out.items())) or "none")
    return Feedback(review_dir, tuple(cases), tuple(refused), dict(left_out))


def reviewed_cases(review_dir: Path) -> list[ReviewedCase]:
    """The cases of ``review_dir`` that may train a model; ``DataError`` naming the first label
    that is missing or changed."""
    feedback = read_feedback(review_dir)
    if feedback.refused:
        raise DataError(feedback.refused[0].error)
    return list(feedback.cases)
