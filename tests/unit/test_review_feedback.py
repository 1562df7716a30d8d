"""Unit tests of medseg.review.feedback: which reviewed cases train the next model, with which label."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import boxes, write_nifti

from medseg.errors import DataError
from medseg.io import sha256
from medseg.review import verdicts
from medseg.review.feedback import read_feedback, reviewed_cases

LABELS = {"1": "left", "2": "right"}
MODEL = "models:/boxes/3"


def _review_folder(root: Path, case_ids: list[str]) -> Path:
    """A built review folder (its queue.json) of a prediction folder of box masks made by ``MODEL``."""
    rng = np.random.default_rng(0)
    pred = root / "pred"
    entries = []
    for case in case_ids:
        image, label = boxes(rng)
        scan = write_nifti(root / "scans" / f"{case}.nii.gz", image)
        mask = write_nifti(pred / f"{case}.nii.gz", label)
        entries.append({"case_id": case, "prediction_dir": str(pred.resolve()), "mask": str(mask.resolve()),
                        "scan": [str(scan.resolve())], "scan_kind": "nifti", "labels": LABELS, "flags": [],
                        "problem": None})
    (pred / "predict.json").write_text(json.dumps({"models": [{"model": MODEL, "weights": "x"}]}))
    review = root / "review"
    review.mkdir()
    (review / "queue.json").write_text(json.dumps({"cases": entries}))
    return review


def _correct(review: Path, case: str, name: str = "v1.nii.gz") -> tuple[str, Path]:
    """A reviewer's correction of the case's predicted mask (label 2 removed), saved as the server
    saves one; its path relative to the folder."""
    mask = np.asarray(nib.load(str(review.parent / "pred" / f"{case}.nii.gz")).dataobj)
    rel = f"{verdicts.CORRECTIONS}/{case}/{name}"
    write_nifti(review / rel, np.where(mask == 2, 0, mask).astype(np.uint8))
    return rel, review / rel


def _digest(review: Path, case: str) -> str:
    return sha256(review.parent / "pred" / f"{case}.nii.gz")


def test_review_feedback_uses_accepted_and_corrected_masks_only(tmp_path: Path) -> None:
    review = _review_folder(tmp_path, ["accepted", "fixed_then_accepted", "fixed", "fix_only", "rejected", "open",
                                       "outdated", "broken"])
    for case in ("accepted", "rejected", "outdated"):
        verdicts.record(review, case, "reject" if case == "rejected" else "accept", reviewer="ann",
                        mask_sha256=_digest(review, case), time="2026-01-01T10:00:00+00:00")
    rel, corrected = _correct(review, "fixed_then_accepted")
    verdicts.record(review, "fixed_then_accepted", "fix", reviewer="bob", mask_sha256=_digest(review, "fixed_then_accepted"),
                    correction=rel, base_sha256=_digest(review, "fixed_then_accepted"),
                    correction_sha256=sha256(corrected), time="2026-01-02T09:00:00+00:00")
    verdicts.record(review, "fixed_then_accepted", "accept", reviewer="cy",
                    mask_sha256=_digest(review, "fixed_then_accepted"), time="2026-01-03T09:00:00+00:00")
    rel_fixed, fixed = _correct(review, "fixed")
    verdicts.record(review, "fixed", "fix", reviewer="bob", mask_sha256=_digest(review, "fixed"), correction=rel_fixed,
                    correction_sha256=sha256(fixed), time="2026-01-04T09:00:00+00:00")
    verdicts.record(review, "fix_only", "fix", reviewer="bob", mask_sha256=_digest(review, "fix_only"))
    # the outdated case's prediction changed after its verdict
    write_nifti(tmp_path / "pred" / "outdated.nii.gz", np.zeros((4, 4, 4), dtype=np.uint8))
    queue = json.loads((review / "queue.json").read_text())
    queue["cases"][-1]["problem"] = "cannot be shown: its scan is gone"
    (review / "queue.json").write_text(json.dumps(queue))
    verdicts.record(review, "broken", "accept", mask_sha256=_digest(review, "broken"))

    cases = {c.case_id: c for c in reviewed_cases(review)}

    assert sorted(cases) == ["accepted", "fixed", "fixed_then_accepted"]
    accepted = cases["accepted"]
    assert accepted.label == tmp_path / "pred" / "accepted.nii.gz"
    assert accepted.label_sha256 == _digest(review, "accepted")
    assert (accepted.origin, accepted.reviewer, accepted.corrected_by) == ("accepted", "ann", "")
    assert accepted.reviewed_at == "2026-01-01T10:00:00+00:00"
    assert accepted.predicted_by == (MODEL,) and accepted.review_dir == review.resolve()
    assert accepted.scan == (tmp_path / "scans" / "accepted.nii.gz",) and accepted.scan_kind == "nifti"
    assert accepted.labels == {1: "left", 2: "right"}
    # accept after a correction: the correction the reviewer saw
    again = cases["fixed_then_accepted"]
    assert again.label == corrected and again.label_sha256 == sha256(corrected)
    assert (again.origin, again.reviewer, again.reviewed_at) == ("corrected", "cy", "2026-01-03T09:00:00+00:00")
    assert (again.corrected_by, again.corrected_at) == ("bob", "2026-01-02T09:00:00+00:00")
    assert cases["fixed"].label == fixed and cases["fixed"].origin == "corrected"
    assert cases["fixed"].reviewer == cases["fixed"].corrected_by == "bob"
    feedback = read_feedback(review)
    assert feedback.left_out == {"fix without a correction": 1, "rejected": 1, "open": 1, "outdated": 1,
                                 "problem": 1}
    assert feedback.refused == ()


def test_review_feedback_of_a_new_prediction_leaves_the_old_correction_out(tmp_path: Path) -> None:
    review = _review_folder(tmp_path, ["a"])
    rel, corrected = _correct(review, "a")
    verdicts.record(review, "a", "fix", mask_sha256=_digest(review, "a"), correction=rel,
                    correction_sha256=sha256(corrected))
    assert [c.label for c in reviewed_cases(review)] == [corrected]
    image, _ = boxes(np.random.default_rng(5))
    write_nifti(tmp_path / "pred" / "a.nii.gz", (image > 15).astype(np.uint8))  # a new model's mask
    assert reviewed_cases(review) == []
    assert read_feedback(review).left_out == {"outdated": 1}


def test_review_feedback_refuses_a_changed_correction_by_name(tmp_path: Path) -> None:
    review = _review_folder(tmp_path, ["a", "b"])
    rel, corrected = _correct(review, "a")
    verdicts.record(review, "a", "fix", mask_sha256=_digest(review, "a"), correction=rel,
                    correction_sha256=sha256(corrected))
    verdicts.record(review, "b", "accept", mask_sha256=_digest(review, "b"))
    write_nifti(corrected, np.zeros((40, 40, 32), dtype=np.uint8))  # changed after it was saved
    feedback = read_feedback(review)
    assert [c.case_id for c in feedback.cases] == ["b"]
    assert [(r.case_id, r.file) for r in feedback.refused] == [("a", str(corrected))]
    with pytest.raises(DataError, match="found a file changed since") as err:
        reviewed_cases(review)
    assert str(corrected) in str(err.value)


def test_review_feedback_refuses_a_missing_or_unbuilt_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="review folder not found: .*nowhere"):
        reviewed_cases(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="expected a review folder built by medseg review"):
        reviewed_cases(tmp_path / "empty")
