"""medseg report: the end-of-run summary names every case a stage left out."""

from __future__ import annotations

import json
from pathlib import Path

from medseg.report import report


def _summary(**extra: object) -> dict:
    stats = {"dice": {"mean": 0.9}, "hd95_mm": {"mean": 1.5}, "surface_dice": {"mean": 0.95}}
    return {"n_cases": 2, "classes": {"left": stats}, "mean_dice": 0.9, **extra}


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_report_lists_each_left_out_case_with_its_reason(tmp_path: Path) -> None:
    _write(tmp_path / "evaluation" / "summary.json",
           _summary(left_out={"c7": "c7.nii.gz: expected the affine of ..."}, not_predicted=["c9"]))
    _write(tmp_path / "ingest" / "manifest.json",
           {"failed": [{"case_id": "c3", "file": "x/c3.nii.gz", "error": "x/c3.nii.gz: expected finite intensities"}]})
    _write(tmp_path / "predictions" / "fold_0" / "failed" / "c5.json", {"error": "c5.nii.gz: cannot read"})
    text = report(tmp_path, "sqlite:///x.db")
    assert "Left out:    4 (see the stage's report for each)" in text
    assert "  ingest    c3: x/c3.nii.gz: expected finite intensities" in text
    assert "  predict   c5 (fold_0): c5.nii.gz: cannot read" in text
    assert "  evaluate  c7: c7.nii.gz: expected the affine of ..." in text
    assert "  evaluate  no mask for 1 reference case(s): c9" in text


def test_report_says_when_no_case_was_left_out(tmp_path: Path) -> None:
    _write(tmp_path / "evaluation" / "summary.json", _summary())
    _write(tmp_path / "ingest" / "manifest.json", {"failed": []})
    assert "Left out:    no case" in report(tmp_path, "sqlite:///x.db")
