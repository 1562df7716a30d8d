"""Unit tests of medseg.stages.evaluate: per-case metrics (known answers) and the evaluate stage.

Geometry used throughout: a 10x10x10 cube ``A`` (x 4..13, y 5..14, z 5..14) and the same cube
shifted by +2 voxels along x, ``B`` (x 6..15). Both lie away from the volume border.

Known answers for A vs B (derived by hand; MONAI's surface voxels are the voxels of a mask that
have a 6-neighbour outside it, i.e. the 10^3 - 8^3 = 488 voxels of the cube's shell, and each
shell voxel's distance is to the nearest shell voxel of the other mask):

- Dice: overlap is x 6..13 = 8*10*10 = 800 voxels, so 2*800 / (1000+1000) = 0.8.
- Distances from B's shell to A's shell (spacing 1 mm), by symmetry the same from A to B:
  * B's far face x=15 (100 voxels): 2 mm to A's face x=13;
  * B's ring x=14 (36 voxels, the shell of that slab outside the face): 1 mm to A's face x=13;
  * B's near face x=6 lies *inside* A: its 8x8 interior part (64 voxels) is not on A's shell.
    Its outer ring of that 8x8 (28 voxels, y or z at 6 or 13) is 1 mm from A's side faces; its
    inner 6x6 (36 voxels) is 2 mm away (from A's face x=4 and from A's side faces alike);
  * everything else of B's shell (x 6..13 on the side faces) is on A's shell: 0 mm.
  So per direction: 288 x 0 mm, 64 x 1 mm, 136 x 2 mm (488 in all).
- HD95 (MONAI: the 95th percentile, linear interpolation, of each direction, then the larger):
  the top 136/488 = 28% of distances are 2 mm, so HD95 = 2.0 mm.
- Surface Dice, tolerance 1 mm: (288 + 64) per direction within tolerance -> 352/488.
  Tolerance 2 mm: all -> 1.0.
- Spacing (2, 1, 1) (x voxels are 2 mm): the far face is 4 mm from A's face x=13, the ring x=14
  is 2 mm away; a voxel (6, y, z) of the inner 8x8 of B's near face is min(4, y-5, 14-y, z-5,
  14-z) mm from A's shell. So 4 mm occurs 100 + 4 (y, z in 9..10) = 104 times = 21% > 5%:
  HD95 = 4.0 mm. Within 1 mm: 288 + 28 = 316 -> surface Dice 316/488.
- IoU: 800 / (1000 + 1000 - 800) = 2/3.
- Average surface distance (MONAI, symmetric: the mean of both directions' distances, which are
  the same here): unit spacing (64 x 1 + 136 x 2) / 488 = 336/488 mm. Spacing (2, 1, 1): the far
  face 100 x 4, the ring 36 x 2, the near face's outer ring 28 x 1, and its inner 6x6 sum to
  92 (min of y and z distances, each 2, 3, 4, 4, 3, 2 mm): (400 + 72 + 28 + 92) / 488 mm.

Spheres (``spheres``) check the same metrics on curved surfaces on an anisotropic grid against
their continuous values, to within half the largest voxel edge (the surface voxels' centres lie
up to that far from the true surface).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import DataError, GeometryMismatchError
from medseg.io import save_nifti
from medseg.stages.evaluate import case_metrics, evaluate

SHAPE = (20, 20, 20)


def cube(x0: int, shape: tuple[int, int, int] = SHAPE, value: int = 1) -> np.ndarray:
    """A 10^3 cube of ``value`` starting at x=x0, y=5, z=5."""
    mask = np.zeros(shape, dtype=np.int64)
    mask[x0 : x0 + 10, 5:15, 5:15] = value
    return mask


REF = cube(4)
SHIFTED = cube(6)


@pytest.fixture(scope="module", autouse=True)
def _metrics_backend_imported() -> None:
    """Import torch and MONAI once (about 7 s) in setup, so each test's own time stays short."""
    import monai.metrics  # noqa: F401
    import torch  # noqa: F401


# ---------------------------------------------------------------- case_metrics: known answers


def test_identical_masks_are_perfect() -> None:
    m = case_metrics(REF, REF.copy(), [1], (1.0, 1.0, 1.0), 1.0)
    assert set(m) == {1}
    assert m[1]["dice"] == pytest.approx(1.0, abs=1e-7)
    assert m[1]["hd95_mm"] == 0.0
    assert m[1]["surface_dice"] == pytest.approx(1.0, abs=1e-7)
    assert m[1]["ref_voxels"] == 1000
    assert m[1]["pred_voxels"] == 1000


def test_result_keys() -> None:
    m = case_metrics(REF, REF, [1], (1.0, 1.0, 1.0), 1.0)
    assert set(m[1]) == {"dice", "iou", "hd95_mm", "asd_mm", "surface_dice", "ref_voxels", "pred_voxels"}


def test_shift_of_two_voxels_dice() -> None:
    m = case_metrics(SHIFTED, REF, [1], (1.0, 1.0, 1.0), 1.0)
    assert m[1]["dice"] == pytest.approx(2 * 800 / 2000, abs=1e-6)
    assert m[1]["ref_voxels"] == 1000
    assert m[1]["pred_voxels"] == 1000


def test_shift_of_two_voxels_hd95_unit_spacing() -> None:
    m = case_metrics(SHIFTED, REF, [1], (1.0, 1.0, 1.0), 1.0)
    assert m[1]["hd95_mm"] == pytest.approx(2.0, abs=1e-6)


def test_shift_of_two_voxels_hd95_scales_with_spacing_along_the_shift() -> None:
    m = case_metrics(SHIFTED, REF, [1], (2.0, 1.0, 1.0), 1.0)
    assert m[1]["hd95_mm"] == pytest.approx(4.0, abs=1e-6)


def test_hd95_ignores_spacing_across_the_shift() -> None:
    # Spacing along y and z does not change the x distances of the far face (100 of 488
    # shell voxels at 2 mm), which keep the 95th percentile at 2 mm.
    m = case_metrics(SHIFTED, REF, [1], (1.0, 3.0, 3.0), 1.0)
    assert m[1]["hd95_mm"] == pytest.approx(2.0, abs=1e-6)


def test_shift_of_two_voxels_surface_dice() -> None:
    unit = case_metrics(SHIFTED, REF, [1], (1.0, 1.0, 1.0), 1.0)
    assert unit[1]["surface_dice"] == pytest.approx(352 / 488, abs=1e-6)
    loose = case_metrics(SHIFTED, REF, [1], (1.0, 1.0, 1.0), 2.0)
    assert loose[1]["surface_dice"] == pytest.approx(1.0, abs=1e-6)
    anisotropic = case_metrics(SHIFTED, REF, [1], (2.0, 1.0, 1.0), 1.0)
    assert anisotropic[1]["surface_dice"] == pytest.approx(316 / 488, abs=1e-6)


def test_shift_of_two_voxels_iou_and_average_surface_distance() -> None:
    unit = case_metrics(SHIFTED, REF, [1], (1.0, 1.0, 1.0), 1.0)
    assert unit[1]["iou"] == pytest.approx(2 / 3, abs=1e-6)
    assert unit[1]["asd_mm"] == pytest.approx(336 / 488, abs=1e-6)
    anisotropic = case_metrics(SHIFTED, REF, [1], (2.0, 1.0, 1.0), 1.0)
    assert anisotropic[1]["iou"] == pytest.approx(2 / 3, abs=1e-6)
    assert anisotropic[1]["asd_mm"] == pytest.approx((400 + 72 + 28 + 92) / 488, abs=1e-6)


# ---------------------------------------------------------------- spheres: continuous answers

SPHERE_SPACING = (0.5, 0.5, 1.0)
HALF_VOXEL = max(SPHERE_SPACING) / 2


def spheres(radius: float, shift: float, other_radius: float, size_mm: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """A sphere of ``radius`` (the reference) and one of ``other_radius`` whose centre is ``shift`` mm
    further along x (the prediction), on a ``SPHERE_SPACING`` grid of ``size_mm`` per side."""
    shape = [int(size_mm / s) for s in SPHERE_SPACING]
    x, y, z = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, SPHERE_SPACING)), indexing="ij")
    cx, cy, cz = size_mm / 2 - shift / 2, size_mm / 2 + 0.1, size_mm / 2 - 0.1  # off the voxel centres
    ref = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= radius**2
    pred = (x - cx - shift) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= other_radius**2
    return pred.astype(np.int64), ref.astype(np.int64)


def test_concentric_spheres_are_their_radii_apart_everywhere() -> None:
    # Radii 10 and 12 mm: every point of either surface is 2 mm from the other.
    pred, ref = spheres(10.0, 0.0, 12.0)
    tight = case_metrics(pred, ref, [1], SPHERE_SPACING, 2.0 - 2 * HALF_VOXEL - 0.01)[1]
    loose = case_metrics(pred, ref, [1], SPHERE_SPACING, 2.0 + 2 * HALF_VOXEL)[1]
    assert tight["dice"] == pytest.approx(2 * 10**3 / (10**3 + 12**3), abs=2e-3)
    assert tight["iou"] == pytest.approx(10**3 / 12**3, abs=2e-3)
    assert tight["hd95_mm"] == pytest.approx(2.0, abs=HALF_VOXEL)
    assert tight["asd_mm"] == pytest.approx(2.0, abs=HALF_VOXEL)
    assert tight["surface_dice"] == 0.0
    assert loose["surface_dice"] == pytest.approx(1.0, abs=1e-6)


def test_shifted_spheres_match_the_continuous_distances() -> None:
    # Two spheres of radius R = 10 mm, centres d = 3 mm apart. A point of one surface at angle t
    # from the shift lies |sqrt(R^2 + 2 R d cos t + d^2) - R| from the other surface, and cos t is
    # uniform over a sphere's area; the lens they share has volume pi (4R + d)(2R - d)^2 / 12.
    radius, shift = 10.0, 3.0
    pred, ref = spheres(radius, shift, radius)
    cos_t = np.linspace(-1.0, 1.0, 100_001)
    distance = np.abs(np.sqrt(radius**2 + 2 * radius * shift * cos_t + shift**2) - radius)
    lens = math.pi * (4 * radius + shift) * (2 * radius - shift) ** 2 / 12
    ball = 4 / 3 * math.pi * radius**3
    m = case_metrics(pred, ref, [1], SPHERE_SPACING, 2.0)[1]
    assert m["dice"] == pytest.approx(lens / ball, abs=2e-3)
    assert m["iou"] == pytest.approx(lens / (2 * ball - lens), abs=2e-3)
    assert m["hd95_mm"] == pytest.approx(np.percentile(distance, 95), abs=HALF_VOXEL)
    assert m["asd_mm"] == pytest.approx(distance.mean(), abs=HALF_VOXEL)
    assert (distance <= 2.0 - HALF_VOXEL).mean() <= m["surface_dice"] <= (distance <= 2.0 + HALF_VOXEL).mean()
    # every metric is symmetric: swapping mask and reference changes nothing
    backward = case_metrics(ref, pred, [1], SPHERE_SPACING, 2.0)[1]
    for key in ("dice", "iou", "hd95_mm", "asd_mm", "surface_dice"):
        assert backward[key] == pytest.approx(m[key], abs=1e-6)


def test_metrics_are_symmetric_for_this_shift() -> None:
    forward = case_metrics(SHIFTED, REF, [1], (1.0, 1.0, 1.0), 1.0)
    backward = case_metrics(REF, SHIFTED, [1], (1.0, 1.0, 1.0), 1.0)
    for key in ("dice", "iou", "hd95_mm", "asd_mm", "surface_dice"):
        assert forward[1][key] == pytest.approx(backward[1][key], abs=1e-6)


def test_class_absent_from_both() -> None:
    m = case_metrics(REF, REF, [1, 2], (1.0, 1.0, 1.0), 1.0)
    assert m[2]["dice"] == 1.0
    assert m[2]["iou"] == 1.0
    assert m[2]["surface_dice"] == 1.0
    assert math.isnan(m[2]["hd95_mm"])
    assert math.isnan(m[2]["asd_mm"])
    assert m[2]["ref_voxels"] == 0
    assert m[2]["pred_voxels"] == 0


def test_class_missing_from_prediction() -> None:
    empty = np.zeros(SHAPE, dtype=np.int64)
    m = case_metrics(empty, REF, [1], (1.0, 1.0, 1.0), 1.0)
    assert m[1]["dice"] == 0.0
    assert m[1]["iou"] == 0.0
    assert math.isnan(m[1]["hd95_mm"])
    assert math.isnan(m[1]["asd_mm"])
    assert m[1]["surface_dice"] == 0.0
    assert (m[1]["ref_voxels"], m[1]["pred_voxels"]) == (1000, 0)


def test_class_missing_from_reference() -> None:
    empty = np.zeros(SHAPE, dtype=np.int64)
    m = case_metrics(REF, empty, [1], (1.0, 1.0, 1.0), 1.0)
    assert m[1]["dice"] == 0.0
    assert math.isnan(m[1]["hd95_mm"])
    assert m[1]["surface_dice"] == 0.0
    assert (m[1]["ref_voxels"], m[1]["pred_voxels"]) == (0, 1000)


def test_two_labels_are_scored_independently() -> None:
    # Label 1: a 10^3 cube at x 4..13 in a (40, 20, 20) volume, predicted exactly.
    # Label 2: a 10^3 cube at x 24..33, predicted shifted by +2 along x (the A/B geometry).
    shape = (40, 20, 20)
    ref = cube(4, shape, 1) + cube(24, shape, 2)
    pred = cube(4, shape, 1) + cube(26, shape, 2)
    m = case_metrics(pred, ref, [1, 2], (1.0, 1.0, 1.0), 1.0)
    assert m[1]["dice"] == pytest.approx(1.0, abs=1e-7)
    assert m[1]["hd95_mm"] == 0.0
    assert m[1]["surface_dice"] == pytest.approx(1.0, abs=1e-7)
    assert m[2]["dice"] == pytest.approx(0.8, abs=1e-6)
    assert m[2]["hd95_mm"] == pytest.approx(2.0, abs=1e-6)
    assert m[2]["surface_dice"] == pytest.approx(352 / 488, abs=1e-6)
    # Scoring label 2 alone gives the same numbers: the other label does not leak in.
    alone = case_metrics(pred, ref, [2], (1.0, 1.0, 1.0), 1.0)
    assert alone[2] == pytest.approx(m[2], abs=1e-7)


def test_other_label_values_do_not_count_as_foreground() -> None:
    # The prediction puts label 2 where the reference has label 1: label 1 is missed entirely.
    m = case_metrics(cube(4, value=2), REF, [1, 2], (1.0, 1.0, 1.0), 1.0)
    assert m[1]["dice"] == 0.0
    assert m[2]["dice"] == 0.0
    assert (m[1]["ref_voxels"], m[1]["pred_voxels"]) == (1000, 0)
    assert (m[2]["ref_voxels"], m[2]["pred_voxels"]) == (0, 1000)


def test_mismatched_shapes_raise() -> None:
    with pytest.raises(GeometryMismatchError, match=r"\(20, 20, 20\)"):
        case_metrics(np.zeros((20, 20, 19), dtype=np.int64), REF, [1], (1.0, 1.0, 1.0), 1.0)


# ---------------------------------------------------------------- evaluate: the stage end to end

# Spacing 2 mm along x, so the shifted cube's HD95 is 4 mm (see the module doc).
AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])
NAMES = {0: "bg", 1: "a", 2: "b"}
VOL = (40, 20, 20)


def _two_cubes(x1: int | None, x2: int | None) -> np.ndarray:
    out = np.zeros(VOL, dtype=np.uint8)
    if x1 is not None:
        out += cube(x1, VOL, 1).astype(np.uint8)
    if x2 is not None:
        out += cube(x2, VOL, 2).astype(np.uint8)
    return out


# case id -> (prediction, reference); expected Dice per class:
#   c1: both exact                         -> a 1.0, b 1.0
#   c2: b shifted by 2 voxels along x      -> a 1.0, b 0.8 (HD95 4 mm at 2 mm spacing)
#   c3: a missing from the prediction      -> a 0.0 (HD95 NaN), b 1.0
CASES = {
    "c1": (_two_cubes(4, 24), _two_cubes(4, 24)),
    "c2": (_two_cubes(4, 26), _two_cubes(4, 24)),
    "c3": (_two_cubes(None, 24), _two_cubes(4, 24)),
}
EXPECTED_DICE = {("c1", 1): 1.0, ("c1", 2): 1.0, ("c2", 1): 1.0, ("c2", 2): 0.8, ("c3", 1): 0.0, ("c3", 2): 1.0}


def _write_cases(tmp_path: Path) -> tuple[Path, Path]:
    preds, refs = tmp_path / "pred", tmp_path / "refs"
    for case_id, (pred, ref) in CASES.items():
        save_nifti(preds / f"{case_id}.nii.gz", pred, AFFINE)
        save_nifti(refs / f"{case_id}.nii.gz", ref, AFFINE)
    return preds, refs


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_csv_summary_and_plot(tmp_path: Path) -> None:
    preds, refs = _write_cases(tmp_path)
    out = tmp_path / "eval"
    result = evaluate([preds], out, labels_dir=refs, labels=NAMES)

    assert result.n_cases == 3
    assert result.out_dir == out

    rows = _read_rows(out / "metrics.csv")
    assert len(rows) == 6  # 3 cases x 2 foreground classes; background is not scored
    assert {(r["case_id"], int(r["label"])) for r in rows} == set(EXPECTED_DICE)
    for r in rows:
        key = (r["case_id"], int(r["label"]))
        assert r["label_name"] == NAMES[key[1]]
        assert float(r["dice"]) == pytest.approx(EXPECTED_DICE[key], abs=1e-6)
    by_key = {(r["case_id"], int(r["label"])): r for r in rows}
    assert float(by_key[("c2", 2)]["hd95_mm"]) == pytest.approx(4.0, abs=1e-6)
    assert float(by_key[("c1", 1)]["hd95_mm"]) == 0.0
    assert math.isnan(float(by_key[("c3", 1)]["hd95_mm"]))
    assert int(by_key[("c3", 1)]["pred_voxels"]) == 0
    assert int(by_key[("c3", 1)]["ref_voxels"]) == 1000
    assert float(by_key[("c3", 1)]["ref_volume_ml"]) == pytest.approx(1000 * 2 / 1000)  # 2 mm^3 voxels
    assert float(by_key[("c2", 2)]["iou"]) == pytest.approx(2 / 3, abs=1e-6)
    assert float(by_key[("c2", 2)]["asd_mm"]) == pytest.approx((400 + 72 + 28 + 92) / 488, abs=1e-6)
    assert all(r["qc_flags"] == "" for r in rows)  # no QC records beside these masks

    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    assert summary["n_cases"] == 3
    mean_a = (1.0 + 1.0 + 0.0) / 3
    mean_b = (1.0 + 0.8 + 1.0) / 3
    assert summary["classes"]["a"]["dice"]["mean"] == pytest.approx(mean_a, abs=1e-6)
    assert summary["classes"]["b"]["dice"]["mean"] == pytest.approx(mean_b, abs=1e-6)
    assert summary["mean_dice"] == pytest.approx((mean_a + mean_b) / 2, abs=1e-6)
    assert set(summary["classes"]) == {"a", "b"}
    # HD95 means count only finite values: class a has NaN for c3.
    assert summary["classes"]["a"]["hd95_mm"]["n"] == 2
    assert summary["classes"]["a"]["hd95_mm"]["mean"] == 0.0
    assert summary["classes"]["b"]["hd95_mm"]["n"] == 3
    assert summary["classes"]["b"]["hd95_mm"]["mean"] == pytest.approx(4.0 / 3, abs=1e-6)
    assert summary["classes"]["b"]["dice"]["p25"] == pytest.approx(0.9, abs=1e-6)  # of 0.8, 1, 1
    assert summary["classes"]["b"]["dice"]["p75"] == pytest.approx(1.0, abs=1e-6)
    assert summary["flagged_cases"] == {}

    png = out / "metrics.png"
    assert png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prediction_with_another_affine_is_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    preds, refs = _write_cases(tmp_path)
    shifted_affine = AFFINE.copy()
    shifted_affine[0, 3] = 5.0  # same shape, origin moved 5 mm
    save_nifti(preds / "c4.nii.gz", _two_cubes(4, 24), shifted_affine)
    save_nifti(refs / "c4.nii.gz", _two_cubes(4, 24), AFFINE)

    with caplog.at_level(logging.ERROR, logger="medseg.stages.evaluate"):
        result = evaluate([preds], tmp_path / "eval", labels_dir=refs, labels=NAMES)

    assert result.n_cases == 3
    rows = _read_rows(tmp_path / "eval" / "metrics.csv")
    assert {r["case_id"] for r in rows} == {"c1", "c2", "c3"}
    messages = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert any("c4" in m and "affine" in m for m in messages), messages


def test_prediction_without_reference_is_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    preds, refs = _write_cases(tmp_path)
    save_nifti(preds / "orphan.nii.gz", _two_cubes(4, 24), AFFINE)
    with caplog.at_level(logging.ERROR, logger="medseg.stages.evaluate"):
        result = evaluate([preds], tmp_path / "eval", labels_dir=refs, labels=NAMES)
    assert result.n_cases == 3
    assert any("orphan" in rec.getMessage() for rec in caplog.records)


def test_no_predictions_raise(tmp_path: Path) -> None:
    _, refs = _write_cases(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no predicted masks"):
        evaluate([empty], tmp_path / "eval", labels_dir=refs, labels=NAMES)
    assert not (tmp_path / "eval" / "metrics.csv").exists()


def test_a_predictions_folder_that_is_missing_or_a_file_is_named(tmp_path: Path) -> None:
    preds, refs = _write_cases(tmp_path)
    missing = tmp_path / "missing"
    with pytest.raises(DataError, match=f"found nothing at {missing}"):
        evaluate([preds, missing], tmp_path / "eval", labels_dir=refs, labels=NAMES)
    a_file = next(preds.iterdir())
    with pytest.raises(DataError, match=f"expected a folder of predicted masks, found a file at {a_file}"):
        evaluate([a_file], tmp_path / "eval", labels_dir=refs, labels=NAMES)
    assert not (tmp_path / "eval" / "metrics.csv").exists()


def test_no_references_raise(tmp_path: Path) -> None:
    preds, _ = _write_cases(tmp_path)
    with pytest.raises(DataError, match="references"):
        evaluate([preds], tmp_path / "eval", labels=NAMES)


def test_classes_found_in_any_case_are_scored_without_declared_labels(tmp_path: Path) -> None:
    preds, refs = tmp_path / "pred", tmp_path / "refs"
    only_a = _two_cubes(4, None)
    both = _two_cubes(4, 24)
    save_nifti(preds / "c1.nii.gz", only_a, AFFINE)
    save_nifti(refs / "c1.nii.gz", only_a, AFFINE)
    save_nifti(preds / "c2.nii.gz", both, AFFINE)
    save_nifti(refs / "c2.nii.gz", both, AFFINE)
    evaluate([preds], tmp_path / "eval", labels_dir=refs)
    rows = _read_rows(tmp_path / "eval" / "metrics.csv")
    assert {(r["case_id"], int(r["label"])) for r in rows} == {("c1", 1), ("c1", 2), ("c2", 1), ("c2", 2)}


def test_quality_flags_of_predict_join_the_table(tmp_path: Path) -> None:
    preds, refs = _write_cases(tmp_path)
    qc = {"case_id": "c3", "volumes_ml": {"a": 0.0, "b": 2.0}, "uncertainty": 0.31, "flags": ["volume", "uncertain"],
          "details": {}}
    (preds / "qc").mkdir()
    (preds / "qc" / "c3.json").write_text(json.dumps(qc))
    result = evaluate([preds], tmp_path / "eval", labels_dir=refs, labels=NAMES)
    rows = _read_rows(tmp_path / "eval" / "metrics.csv")
    flagged = {(r["case_id"], r["label"]): (r["qc_flags"], r["uncertainty"]) for r in rows}
    assert flagged[("c3", "1")] == ("volume;uncertain", "0.31")
    assert flagged[("c1", "1")] == ("", "nan")
    assert result.summary["flagged_cases"] == {"c3": ["volume", "uncertain"]}
