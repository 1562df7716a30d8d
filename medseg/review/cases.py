"""The cases of a review folder as the pages show them: each case's state, the queue's summary, and a
case's scan and mask loaded for drawing. Shared by the review stage and the server."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.config import ReviewConfig
from medseg.errors import DataError
from medseg.io import is_nifti, load_nifti
from medseg.qc import QC_DIR
from medseg.review import render, verdicts
from medseg.review.folder import mask_digest


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


