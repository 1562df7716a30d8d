"""medseg select: the best of several finished runs by cross-validated Dice.

Each candidate is a results folder whose ``evaluation/metrics.csv`` the real ``evaluate`` stage writes
from small masks made here: candidate "exact" predicts the references, candidate "eroded" loses a
border of each structure, so its Dice is known (computed here with numpy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_nifti
from medseg.errors import DataError
from medseg.stages.evaluate import evaluate
from medseg.stages.select import read_scores, select

LABELS = {1: "left", 2: "right"}
CASES = ("case_a", "case_b", "case_c")


def _reference(i: int) -> np.ndarray:
    ref = np.zeros((16, 16, 16), dtype=np.uint8)
    ref[2:8, 3:10, 3:9 + i] = 1
    ref[9:14, 4:12 - i, 5:12] = 2
    return ref


def _eroded(ref: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    out = np.zeros_like(ref)
    for label in LABELS:
        out[binary_erosion(ref == label)] = label
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def _run(root: Path, name: str, predict, cases=CASES) -> Path:  # noqa: ANN001
    """A results folder as a finished workflow run leaves it: evaluation/ and train/fold_0/model.json."""
    results = root / name
    for i, case in enumerate(cases):
        ref = _reference(i)
        write_nifti(root / "labels" / f"{case}.nii.gz", ref)
        write_nifti(results / "predictions" / f"{case}.nii.gz", predict(ref))
    evaluate([results / "predictions"], results / "evaluation", labels_dir=root / "labels", labels=LABELS)
    (results / "train" / "fold_0").mkdir(parents=True)
    (results / "train" / "fold_0" / "model.json").write_text(json.dumps({"model_uri": f"{name}.pt"}))
    return results


def test_reads_the_cross_validated_scores(tmp_path: Path) -> None:
    scores = read_scores(_run(tmp_path, "eroded", _eroded))
    expected = {name: np.mean([_dice(_eroded(_reference(i)) == k, _reference(i) == k) for i in range(3)])
                for k, name in LABELS.items()}
    assert scores["classes"] == pytest.approx(expected, abs=1e-6)
    assert scores["mean_dice"] == pytest.approx(np.mean(list(expected.values())), abs=1e-6)
    assert scores["n_cases"] == 3 and scores["model_infos"][0].endswith("train/fold_0/model.json")


def test_chooses_the_best_and_writes_why(tmp_path: Path) -> None:
    eroded, exact = _run(tmp_path, "eroded", _eroded), _run(tmp_path, "exact", lambda r: r)
    result = select({"2d": eroded, "3d": exact}, tmp_path / "selection.json")
    assert result.chosen == "3d"
    assert result.scores["3d"] == pytest.approx(1.0)
    assert result.scores["2d"] == pytest.approx(read_scores(eroded)["mean_dice"])
    written = json.loads((tmp_path / "selection.json").read_text())
    assert written["chosen"] == "3d"
    assert written["margin"] == pytest.approx(1.0 - result.scores["2d"])
    assert written["model_infos"] == [str(exact / "train" / "fold_0" / "model.json")]
    assert "'3d' has the highest cross-validated mean Dice, 1.0000 over 3 cases" in written["why"]
    assert set(written["candidates"]) == {"2d", "3d"}


def test_a_tie_goes_to_the_first_listed(tmp_path: Path) -> None:
    a, b = _run(tmp_path, "a", lambda r: r), _run(tmp_path, "b", lambda r: r)
    assert select({"b": b, "a": a}, tmp_path / "s.json").chosen == "b"
    assert select({"a": a, "b": b}, tmp_path / "s.json").chosen == "a"


def test_refuses_runs_evaluated_on_different_cases(tmp_path: Path) -> None:
    a = _run(tmp_path, "a", lambda r: r)
    b = _run(tmp_path, "b", lambda r: r, cases=CASES[:2])
    with pytest.raises(DataError, match=r"evaluated on different cases \(1 in one only, e.g. \['case_c'\]\)"):
        select({"a": a, "b": b}, tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_refuses_a_run_without_evaluation(tmp_path: Path) -> None:
    a = _run(tmp_path, "a", lambda r: r)
    with pytest.raises(DataError, match=r"unfinished/evaluation/metrics.csv: expected the evaluation of a finished"):
        select({"a": a, "b": tmp_path / "unfinished"}, tmp_path / "s.json")


def test_refuses_a_run_without_models(tmp_path: Path) -> None:
    a, b = _run(tmp_path, "a", lambda r: r), _run(tmp_path, "b", lambda r: r)
    (b / "train" / "fold_0" / "model.json").unlink()
    with pytest.raises(DataError, match=r"expected fold_\*/model.json of candidate 'b', found none"):
        select({"a": a, "b": b}, tmp_path / "s.json")


def test_refuses_a_damaged_metrics_table(tmp_path: Path) -> None:
    a, b = _run(tmp_path, "a", lambda r: r), _run(tmp_path, "b", lambda r: r)
    table = b / "evaluation" / "metrics.csv"
    table.write_text(table.read_text().replace(",1.0,", ",high,", 1))
    with pytest.raises(DataError, match=r"metrics.csv: expected a number in column dice, found 'high' \(case case_a\)"):
        select({"a": a, "b": b}, tmp_path / "s.json")


def test_needs_two_candidates(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="expected at least 2 candidates to compare, found 1"):
        select({"a": _run(tmp_path, "a", lambda r: r)}, tmp_path / "s.json")


def test_command(tmp_path: Path) -> None:
    a, b = _run(tmp_path, "a", _eroded), _run(tmp_path, "b", lambda r: r)
    cmd = [sys.executable, "-m", "medseg.cli", "select", f"--candidate=2d={a}", f"--candidate=3d={b}",
           "--output", str(tmp_path / "selection.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("chose 3d (mean Dice 2d 0.")
    bad = subprocess.run(cmd[:4] + ["--candidate", f"3d{b}", "--output", str(tmp_path / "s.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "expected --candidate NAME=RESULTS_FOLDER, found" in bad.stderr
