"""Unit tests of medseg.stages.plan: fold splits, and plan() on an ingested dataset (the patch,
topology and batch rules themselves are tested in test_planning.py).

The synthetic MSD dataset (built in tmp_path and ingested with medseg.stages.ingest.ingest):
five cases whose RAS grid is (20, 24, 10) voxels of 1 x 1 x z mm, z = 3, 4, 4, 5, 6. Two cases are
stored in another voxel order so that the RAS rule matters:

- c3 is stored as (z, x, y): shape (10, 20, 24), spacing (4, 1, 1) in voxel order;
- c4 is stored with x flipped (affine diag(-1, 1, 5)).

Measured in RAS order the spacings are (1, 1, z) for every case, so:

- median spacing (1, 1, 4): 4 / 1 > 3 (the anisotropy threshold) -> 2D, coarse axis 2;
- target spacing axis 2 = 10th percentile of z = 3, 4, 4, 5, 6 -> 3 + 0.4 * (4 - 3) = 3.4
  (numpy's linear interpolation: position 0.1 * (5 - 1) = 0.4 between the two smallest);
- median shape after resampling: (20, 24, median(10 z / 3.4)) = (20, 24, 40 / 3.4 = 11.76);
- patch (2D, on axes 0 and 1 at 1 x 1 mm): the median in-plane shape (20, 24), smaller than
  2048^2 voxels. Each axis is pooled twice (20 -> 10 -> 5 and 24 -> 12 -> 6: a third pool would
  leave fewer than 8), so the divisor is 4 and (20, 24) stays; 1 on the coarse axis -> (20, 24, 1);
- batch: the 8 GB budget would hold thousands of these small patches, but a batch covers at
  most 5% of the dataset's voxels: 5 cases x 20 x 24 x 11.76 = 28,235 voxels, 5% = 1,412, over
  480 voxels per patch = 2.94 -> 3.

Had the voxel order been used instead, c3 would count as 4 mm along axis 0 and 1 mm along
axis 2, and the 10th percentile along axis 2 would be 1.8.

Foreground: a 5 x 4 x 2 = 40-voxel box of label 1 per case (fewer than the 10,000 samples per
case, so every foreground voxel is pooled), holding intensities 40 i + 0..39 for case i, so the
pooled foreground is exactly 0, 1, ..., 199. Background voxels are -1000. Hence for CT:
ct_clip = (0.995, 198.005) (positions 0.005 * 199 and 0.995 * 199), ct_mean = 99.5 (clipping
moves 0 up by 0.995 and 199 down by 0.995), ct_std = the standard deviation of the clipped values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.config import PlanConfig
from medseg.errors import DataError
from medseg.io import save_nifti
from medseg.stages.ingest import ingest
from medseg.stages.plan import load_plan, load_splits, make_splits, plan

# ---------------------------------------------------------------- make_splits

IDS = [f"case_{i:02d}" for i in range(11)]


@pytest.mark.parametrize("n_folds", [2, 3, 5, 11])
def test_splits_partition_the_cases(n_folds: int) -> None:
    splits = make_splits(IDS, n_folds, seed=7)
    assert len(splits) == n_folds
    vals = [s["val"] for s in splits]
    seen = [c for v in vals for c in v]
    assert sorted(seen) == sorted(IDS)  # covering, and disjoint (no case twice)
    assert len(seen) == len(set(seen))
    sizes = sorted(len(v) for v in vals)
    assert sizes[-1] - sizes[0] <= 1  # dealt evenly
    for s in splits:
        assert s["train"] == sorted(set(IDS) - set(s["val"]))
        assert s["val"] == sorted(s["val"])


def test_splits_are_deterministic_and_ignore_input_order() -> None:
    first = make_splits(IDS, 5, seed=3)
    assert make_splits(IDS, 5, seed=3) == first
    assert make_splits(list(reversed(IDS)), 5, seed=3) == first


def test_splits_follow_the_documented_deal() -> None:
    # Cases sorted by id, shuffled with the seed, dealt into folds: fold k gets order[k::n].
    ids = ["e", "c", "a", "d", "b", "f", "g"]
    order = np.random.default_rng(0).permutation(7)
    s = sorted(ids)
    expected_vals = [sorted(s[i] for i in order[k::3]) for k in range(3)]
    assert [f["val"] for f in make_splits(ids, 3, seed=0)] == expected_vals


def test_one_case_per_fold() -> None:
    splits = make_splits(["a", "b", "c"], 3, seed=1)
    assert sorted(v for s in splits for v in s["val"]) == ["a", "b", "c"]
    assert all(len(s["val"]) == 1 and len(s["train"]) == 2 for s in splits)


def test_fewer_cases_than_folds_raise() -> None:
    with pytest.raises(DataError, match="n_folds=5"):
        make_splits(["a", "b", "c", "d"], 5, seed=0)


# ---------------------------------------------------------------- plan() on an ingested dataset

RAS_SHAPE = (20, 24, 10)
Z_SPACINGS = {"c1": 3.0, "c2": 4.0, "c3": 4.0, "c4": 5.0, "c5": 6.0}
POOLED_FOREGROUND = np.arange(200, dtype=np.float64)


def _ras_case(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and label in RAS voxel order: a 5x4x2 box of label 1 holding 40 i + 0..39."""
    image = np.full(RAS_SHAPE, -1000.0, dtype=np.float32)
    label = np.zeros(RAS_SHAPE, dtype=np.uint8)
    label[6:11, 8:12, 4:6] = 1
    image[label == 1] = 40 * i + np.arange(40, dtype=np.float32)
    return image, label


def _stored(case_id: str, image: np.ndarray, label: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The voxel order a case is written in, with the affine that keeps it at the same RAS place."""
    if case_id == "c3":  # stored (z, x, y): stored[a, b, c] = ras[b, c, a]
        affine = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [z, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
        return np.transpose(image, (2, 0, 1)), np.transpose(label, (2, 0, 1)), affine
    if case_id == "c4":  # x flipped: stored[a] = ras[19 - a]
        affine = np.array([[-1, 0, 0, 19], [0, 1, 0, 0], [0, 0, z, 0], [0, 0, 0, 1]], dtype=float)
        return image[::-1].copy(), label[::-1].copy(), affine
    return image, label, np.diag([1.0, 1.0, z, 1.0])


def _msd(root: Path, modality: str) -> Path:
    training = []
    for i, (case_id, z) in enumerate(Z_SPACINGS.items()):
        image, label, affine = _stored(case_id, *_ras_case(i), z)
        save_nifti(root / "imagesTr" / f"{case_id}.nii.gz", image, affine)
        save_nifti(root / "labelsTr" / f"{case_id}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    info = {
        "name": "tiny",
        "labels": {"0": "background", "1": "a"},
        "modality": {"0": modality},
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(info))
    return root


def _manifest(tmp_path: Path, modality: str) -> Path:
    result = ingest(_msd(tmp_path / "raw", modality), tmp_path / "ingested")
    assert result.n_cases == 5 and result.n_failed == 0
    return result.manifest_path


@pytest.fixture
def ct_manifest(tmp_path: Path) -> Path:
    return _manifest(tmp_path, "CT")


def test_synthetic_cases_are_stored_in_other_voxel_orders(ct_manifest: Path) -> None:
    manifest = json.loads(ct_manifest.read_text())
    by_id = {c["case_id"]: c for c in manifest["cases"]}
    assert by_id["c3"]["shape"] == [10, 20, 24]
    assert by_id["c3"]["spacing_mm"] == pytest.approx([4.0, 1.0, 1.0])
    assert by_id["c4"]["orientation"] == "LAS"
    assert by_id["c1"]["orientation"] == "RAS"


def test_plan_anisotropic_ct(ct_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan"
    result = plan(ct_manifest, out, PlanConfig(device="cuda"))  # the rules of a GPU, planned without one
    p = result.plan

    assert result.plan_path == out / "plan.json"
    assert result.splits_path == out / "splits.json"
    assert load_plan(result.plan_path) == p

    assert p.modality == "CT"
    assert p.channels == 1
    assert p.labels == {0: "background", 1: "a"}
    assert p.n_classes == 2
    # Spacing in RAS order; coarse axis 2 takes the 10th percentile of 3, 4, 4, 5, 6.
    assert p.target_spacing_mm == pytest.approx((1.0, 1.0, 3.4), abs=1e-9)
    assert p.dims == 2
    assert p.patch_size == (20, 24, 1)
    assert p.median_shape_resampled == [20, 24, 12]  # 40 / 3.4 = 11.76
    assert p.batch_size == 3
    assert p.topology is not None
    assert p.topology.strides == ((1, 1), (2, 2), (2, 2))
    assert p.topology.kernels == ((3, 3), (3, 3), (3, 3))
    assert p.topology.features == (32, 64, 128)
    assert p.memory_budget_gb == 8.0  # no CUDA here
    assert set(p.decisions) == {"target_spacing_mm", "dims", "device", "memory_budget_gb", "patch_size",
                                "batch_size", "topology", "normalization", "mirror_axes"}
    assert p.decisions["device"] == "cuda: set in the config (plan.device)"
    assert "5% of the dataset's voxels" in p.decisions["batch_size"]
    assert "10th percentile" in p.decisions["target_spacing_mm"]

    fp = p.fingerprint
    assert fp.n_cases == 5
    assert fp.spacing_median_mm == pytest.approx([1.0, 1.0, 4.0])
    assert fp.spacing_p10_mm == pytest.approx([1.0, 1.0, 3.4])
    assert fp.shape_median == [20.0, 24.0, 10.0]
    assert fp.shape_min == [20, 24, 10]
    assert fp.shape_max == [20, 24, 10]
    # 40 foreground voxels of 4800 per case.
    assert fp.class_frequency == pytest.approx({0: 4760 / 4800, 1: 40 / 4800})

    # CT normalization from the pooled foreground 0..199. The images are float32, and numpy
    # computes percentiles, means and deviations of float32 samples in float32: the known
    # answers hold to float32 precision (about 1e-7 relative), hence the tolerances below.
    assert p.normalization == "ct"
    assert p.ct_clip is not None and len(p.ct_clip) == 1
    lo, hi = p.ct_clip[0]
    assert (lo, hi) == pytest.approx((0.995, 198.005), rel=1e-6)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(POOLED_FOREGROUND, [0.5, 99.5])), rel=1e-6)
    clipped = np.clip(POOLED_FOREGROUND, 0.995, 198.005)
    assert p.ct_mean == pytest.approx([99.5], rel=1e-6)
    assert p.ct_std == pytest.approx([float(clipped.std())], rel=1e-6)
    fg = fp.foreground_intensity[0]
    assert fg["p00_5"] == pytest.approx(0.995, rel=1e-6)
    assert fg["p99_5"] == pytest.approx(198.005, rel=1e-6)
    assert fg["p50"] == pytest.approx(99.5, rel=1e-6)
    assert fg["mean"] == pytest.approx(99.5, rel=1e-6)
    assert fg["std"] == pytest.approx(float(POOLED_FOREGROUND.std()), rel=1e-6)


def test_plan_writes_the_documented_splits(ct_manifest: Path, tmp_path: Path) -> None:
    config = PlanConfig(n_folds=5, seed=4)
    result = plan(ct_manifest, tmp_path / "plan", config)
    splits = json.loads(result.splits_path.read_text())
    assert splits == make_splits(list(Z_SPACINGS), 5, 4)
    assert sorted(v for s in splits for v in s["val"]) == sorted(Z_SPACINGS)
    assert load_splits(result.splits_path, 2) == splits[2]
    with pytest.raises(DataError):
        load_splits(result.splits_path, 5)


def test_explicit_config_values_win(ct_manifest: Path, tmp_path: Path) -> None:
    config = PlanConfig(target_spacing_mm=(2, 2, 2), patch_size=(16, 16, 16), batch_size=3, dims=3)
    p = plan(ct_manifest, tmp_path / "plan", config).plan
    assert p.target_spacing_mm == (2.0, 2.0, 2.0)
    assert p.patch_size == (16, 16, 16)
    assert p.batch_size == 3
    assert p.dims == 3
    # Resampled to 2 mm: 20 / 2, 24 / 2, median(10 z / 2) = 10 * 4 / 2.
    assert p.median_shape_resampled == [10, 12, 20]
    # The fingerprint is measured all the same.
    assert p.fingerprint.spacing_p10_mm == pytest.approx([1.0, 1.0, 3.4])


def test_training_on_a_cpu_takes_the_least_batch_and_says_what_a_gpu_would_take(ct_manifest: Path,
                                                                                tmp_path: Path) -> None:
    p = plan(ct_manifest, tmp_path / "plan", PlanConfig(device="cpu")).plan
    assert p.batch_size == 2
    assert p.decisions["device"] == "cpu: set in the config (plan.device)"
    assert "training on a CPU" in p.decisions["memory_budget_gb"]
    assert "on a GPU it would be 3, set by 5% of the dataset's voxels" in p.decisions["batch_size"]
    # auto on this machine (no CUDA): the same, and the decision says why
    auto = plan(ct_manifest, tmp_path / "auto", PlanConfig()).plan
    assert auto.batch_size == 2
    assert auto.decisions["device"] == "cpu: auto: no CUDA device here"
    # a batch set in the config wins on a CPU too
    assert plan(ct_manifest, tmp_path / "set", PlanConfig(batch_size=4)).plan.batch_size == 4


def test_explicit_normalization_wins(ct_manifest: Path, tmp_path: Path) -> None:
    p = plan(ct_manifest, tmp_path / "plan", PlanConfig(normalization="zscore")).plan
    assert p.normalization == "zscore"
    assert p.ct_clip is None and p.ct_mean is None and p.ct_std is None


def test_isotropic_spacing_chosen_as_3d_when_threshold_is_not_reached(ct_manifest: Path, tmp_path: Path) -> None:
    # Ratio 4 / 1 = 4 is not above a threshold of 5: 3D, median spacing (no 10th percentile).
    p = plan(ct_manifest, tmp_path / "plan", PlanConfig(anisotropy_threshold=5.0)).plan
    assert p.dims == 3
    assert p.target_spacing_mm == pytest.approx((1.0, 1.0, 4.0))
    # Resampled to 4 mm: median(10 z / 4) = 10, so the median shape (20, 24, 10). At spacing
    # (1, 1, 4) axis 2 is 4x coarser: it is never pooled (kernel 1) while axes 0 and 1 are
    # pooled twice, and then it alone would need at least 12 voxels: strides (1, 1, 1),
    # (2, 2, 1), (2, 2, 1), divisor (4, 4, 1), so (20, 24, 10) stays.
    assert p.median_shape_resampled == [20, 24, 10]
    assert p.patch_size == (20, 24, 10)
    assert p.topology is not None
    assert p.topology.strides == ((1, 1, 1), (2, 2, 1), (2, 2, 1))
    assert p.topology.kernels == ((3, 3, 1), (3, 3, 1), (3, 3, 3))
    # 5% of 5 x 4,800 voxels is 1,200, a quarter of one patch: the minimum batch of 2.
    assert p.batch_size == 2
    assert p.decisions["batch_size"] == "set by the minimum of 2"


def test_patch_size_of_wrong_length_is_refused(ct_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="patch_size"):
        plan(ct_manifest, tmp_path / "plan", PlanConfig(patch_size=(16, 16)))


def test_mri_modality_gives_zscore(tmp_path: Path) -> None:
    p = plan(_manifest(tmp_path, "MRI"), tmp_path / "plan", PlanConfig()).plan
    assert p.modality == "MRI"
    assert p.normalization == "zscore"
    assert p.ct_clip is None and p.ct_mean is None and p.ct_std is None
    assert p.dims == 2
    assert p.target_spacing_mm == pytest.approx((1.0, 1.0, 3.4), abs=1e-9)


def test_too_few_cases_for_the_folds_raise(ct_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="n_folds=6"):
        plan(ct_manifest, tmp_path / "plan", PlanConfig(n_folds=6))
    assert not (tmp_path / "plan" / "plan.json").exists()


def _two_class_msd(root: Path, affine: np.ndarray, n_cases: int = 6, swap_every: int = 0) -> Path:
    """Cases with class 2 always 6 voxels above class 1 along RAS A-P (y) and at a random side of it
    along R-L (x); along S-I (z) both at the same height. With ``swap_every`` = k, every k-th case
    has them the other way round along y."""
    rng = np.random.default_rng(1)
    training = []
    for i in range(n_cases):
        label = np.zeros((16, 20, 8), dtype=np.uint8)
        dx = int(rng.choice([-3, 3]))
        dy = -6 if swap_every and i % swap_every == 0 else 6
        label[6:9, 6:9, 3:5] = 1
        label[6 + dx:9 + dx, 6 + dy:9 + dy, 3:5] = 2
        image = rng.normal(0, 1, label.shape).astype(np.float32) + 3 * label
        save_nifti(root / "imagesTr" / f"c{i}.nii.gz", image, affine)
        save_nifti(root / "labelsTr" / f"c{i}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    info = {"name": "two", "labels": {"0": "background", "1": "front", "2": "back"}, "modality": {"0": "MRI"},
            "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(info))
    return root


# Stored as LPS with 2 mm voxels along y: voxel axes 0 and 1 run against RAS x and y.
LPS = np.diag([-1.0, -2.0, 1.0, 1.0])


def test_mirror_axes_leave_out_an_axis_along_which_the_classes_keep_their_order(tmp_path: Path) -> None:
    manifest = ingest(_two_class_msd(tmp_path / "raw", LPS), tmp_path / "ingested").manifest_path
    planned = plan(manifest, tmp_path / "plan", PlanConfig(n_folds=2, mirror_axes="auto")).plan
    assert planned.mirror_axes == (0, 2)
    order = {o.axis: o for o in planned.fingerprint.class_order}
    # y voxels 6 apart at 2 mm, against RAS y: class 2 lies 12 mm from class 1, in every case
    assert order[1].classes == (1, 2) and order[1].cases == 6
    assert order[1].mean_offset_mm == pytest.approx(-12.0) and order[1].same_side == 1.0
    assert order[2].mean_offset_mm == 0.0 and order[2].same_side == 0.0
    assert planned.decisions["mirror_axes"] == (
        "mirrored along R-L (axis 0), S-I (axis 2); not A-P (axis 1): back lies on the same side of front in "
        "100% of the 6 cases holding both, 12.0 mm apart on average, so mirroring would show layouts the data "
        "never show"
    )
    saved = load_plan(tmp_path / "plan" / "plan.json")
    assert saved.mirror_axes == (0, 2) and saved.fingerprint.class_order == planned.fingerprint.class_order
    default = plan(manifest, tmp_path / "default", PlanConfig(n_folds=2)).plan  # nnU-Net's: every axis
    assert default.mirror_axes == (0, 1, 2)
    assert default.decisions["mirror_axes"] == (
        "every axis, as nnU-Net (plan.mirror_axes: all); plan.mirror_axes: auto would mirror R-L (axis 0), "
        "S-I (axis 2): not A-P (axis 1): back lies on the same side of front in 100% of the 6 cases holding "
        "both, 12.0 mm apart on average, so mirroring would show layouts the data never show"
    )


def test_mirror_axes_keep_an_axis_whose_order_often_flips(tmp_path: Path) -> None:
    """One case in three the other way round: 67% < 90%, so A-P is mirrored too."""
    manifest = ingest(_two_class_msd(tmp_path / "raw", LPS, swap_every=3), tmp_path / "ingested").manifest_path
    planned = plan(manifest, tmp_path / "plan", PlanConfig(n_folds=2, mirror_axes="auto")).plan
    assert planned.mirror_axes == (0, 1, 2)
    assert {o.axis: o.same_side for o in planned.fingerprint.class_order}[1] == pytest.approx(4 / 6, abs=1e-4)
    assert planned.decisions["mirror_axes"].endswith("no two classes keep their order along an axis in 90% of the cases")


def test_mirror_axes_with_one_class_and_from_the_config(ct_manifest: Path, tmp_path: Path) -> None:
    planned = plan(ct_manifest, tmp_path / "plan", PlanConfig(n_folds=2, mirror_axes="auto")).plan  # one class
    assert planned.fingerprint.class_order == []
    assert planned.decisions["mirror_axes"].endswith("fewer than two foreground classes, so no order of classes to keep")
    assert planned.dims == 2 and planned.patch_size[2] == 1
    assert planned.mirror_axes == (0, 1)  # the slice axis is not convolved, so not mirrored
    chosen = plan(ct_manifest, tmp_path / "chosen", PlanConfig(n_folds=2, mirror_axes=(2, 1))).plan
    assert chosen.mirror_axes == (1,) and chosen.decisions["mirror_axes"] == "set in the config"


@pytest.mark.parametrize("axes", [(0, 0), (3,), (-1,)])
def test_bad_mirror_axes_are_refused(axes: tuple[int, ...]) -> None:
    from medseg.config import validate
    from medseg.errors import ConfigError

    with pytest.raises(ConfigError, match="'mirror_axes': expected distinct axes among 0, 1 and 2"):
        validate(PlanConfig, {"mirror_axes": list(axes)}, "test")
    with pytest.raises(ConfigError, match="mirror_axes"):
        validate(PlanConfig, {"mirror_axes": "some"}, "test")


def test_class_order_prefers_a_constant_pair_far_apart_to_a_more_constant_close_one() -> None:
    """Along x: classes 1 and 2 touch (centroids 1 voxel apart, always in that order); class 3 lies
    10 voxels from class 1, on the same side in 19 of 20 cases. The rule needs the far pair."""
    from medseg.stages.plan import _OrderCounts

    counts = _OrderCounts(4)
    for case in range(20):
        label = np.zeros((30, 8, 8), dtype=np.uint8)
        label[10:12, 2:4, 2:4] = 1
        label[11:13, 4:6, 2:4] = 2  # y apart too, so the one voxel of x offset is its own
        if case == 0:
            label[0:2, 2:4, 5:7] = 3  # the one case the other way round along x
        else:
            label[20:22, 2:4, 5:7] = 3
        counts.add(label, label > 0, np.diag([1.0, 1.0, 1.0, 1.0]))
    x = next(o for o in counts.most_constant() if o.axis == 0)
    assert x.classes == (1, 3) and x.cases == 20 and x.same_side == 0.95
    assert x.mean_offset_mm == pytest.approx((19 * 10 - 10) / 20)
