"""Property tests (hypothesis) of the geometry from ingest through preprocess to predict's inverse.

Random scans: shapes of 8 to 24 voxels per axis, spacings of 0.4 to 3 mm, axes permuted and
flipped, and oblique (rotated up to 0.6 rad about each axis), with a non-zero body (what
preprocess crops to) holding two labelled boxes. Each scan goes through the real stages:

- ``ingest`` (an MSD folder of one case, written in a temporary folder) makes the case's NIfTI;
- ``preprocess`` (the stage, with ``preprocessing(plan, with_label=True)``: reorientation to RAS,
  crop to the non-zero region, resampling to the plan's spacing) caches the image and label;
- predict's chain (``preprocessing(plan, with_label=False)``) and its inverse (MONAI's ``Invertd``
  on that chain, then ``medseg.inference.restore``, as ``medseg.prediction.predict_cases`` builds
  them) bring class probabilities on the preprocessed grid back to the scan's grid.

Properties:

1. ``predict_cases`` (with a stand-in network that marks bright voxels, at any target spacing
   within a factor 2 of the scan's) writes a mask with exactly the scan's shape and affine, the
   inverse's own grid is the scan's grid (shape, affine to 1e-4 mm), and the mask lies where the
   bright boxes lie (centroid within one voxel);
2. with the target spacing equal to the scan's (in RAS order), the label cached by preprocess,
   one-hot as probabilities, comes back through predict's inverse voxel for voxel.

Examples are derandomized and no database is kept, so every run (and CI) tries the same ones.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_nifti
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from medseg.config import NetworkConfig, PredictConfig, PreprocessConfig
from medseg.modelio import ModelSpec
from medseg.sources import CaseSource
from medseg.stages.ingest import ingest
from medseg.stages.plan import Fingerprint, Plan
from medseg.stages.predict import predict_cases
from medseg.stages.preprocess import load_case, preprocess
from medseg.transforms import preprocessing

LABELS = {0: "background", 1: "left", 2: "right"}
ROI = (8, 8, 8)
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- scans


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        out = r @ out
    return out


@st.composite
def scans(draw: st.DrawFn) -> dict:
    """A scan (image, label, affine) with a non-zero body and two labelled boxes inside it."""
    shape = tuple(draw(st.integers(8, 24)) for _ in range(3))
    spacing = np.array([draw(st.floats(0.4, 3.0)) for _ in range(3)])
    permutation = np.eye(3)[list(draw(st.permutations([0, 1, 2])))]
    flips = np.diag([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    oblique = draw(st.booleans())
    angles = tuple(draw(st.floats(-0.6, 0.6)) for _ in range(3)) if oblique else (0.0, 0.0, 0.0)
    affine = np.eye(4)
    affine[:3, :3] = _rotation(angles) @ permutation @ flips @ np.diag(spacing)
    affine[:3, 3] = [draw(st.floats(-100.0, 100.0)) for _ in range(3)]
    # body: a margin of 0 to 2 voxels of zeros on each side; boxes of at least 4 voxels per axis inside it
    lo = [draw(st.integers(0, 2)) for _ in range(3)]
    hi = [s - draw(st.integers(0, 2)) for s in shape]
    box_lo = [draw(st.integers(a, b - 4)) for a, b in zip(lo, hi)]
    box_hi = [draw(st.integers(a + 4, b)) for a, b in zip(box_lo, hi)]
    split_axis = draw(st.integers(0, 2))
    image = np.zeros(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    image[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1.0
    box = tuple(slice(a, b) for a, b in zip(box_lo, box_hi))
    label[box] = 1
    second = list(box)
    middle = (box_lo[split_axis] + box_hi[split_axis]) // 2
    second[split_axis] = slice(middle, box_hi[split_axis])
    label[tuple(second)] = 2
    image[label == 1] = 6.0
    image[label == 2] = 8.0
    return {"image": image, "label": label, "affine": affine}


def ras_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel spacing along the axes of the scan reoriented to RAS (the closest canonical axes)."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    ornt = nib.orientations.io_orientation(affine)
    out = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        out[int(target)] = float(zooms[axis])
    return tuple(out)  # type: ignore[return-value]


def make_plan(target: tuple[float, float, float]) -> Plan:
    fingerprint = Fingerprint(
        n_cases=1, spacing_median_mm=list(target), spacing_p10_mm=list(target), shape_median=[16.0] * 3,
        shape_min=[8] * 3, shape_max=[24] * 3,
        foreground_intensity=[{"p00_5": 1.0, "p50": 6.0, "p99_5": 8.0, "mean": 6.0, "std": 2.0}],
        class_frequency={0: 0.8, 1: 0.1, 2: 0.1},
    )
    return Plan(modality="MR", channels=1, labels=LABELS, target_spacing_mm=target, patch_size=ROI, batch_size=1,
                normalization="zscore", dims=3, median_shape_resampled=[16, 16, 16], fingerprint=fingerprint)


def ingested(scan: dict, root: Path) -> tuple[Path, Path]:
    """``ingest`` of an MSD folder holding the scan as its one case: (manifest, the case's image)."""
    msd = root / "msd"
    write_nifti(msd / "imagesTr" / "case.nii.gz", scan["image"], scan["affine"])
    write_nifti(msd / "labelsTr" / "case.nii.gz", scan["label"], scan["affine"])
    (msd / "dataset.json").write_text(json.dumps({
        "name": "geometry", "modality": {"0": "MRI"}, "labels": {str(k): v for k, v in LABELS.items()},
        "training": [{"image": "./imagesTr/case.nii.gz", "label": "./labelsTr/case.nii.gz"}], "test": [],
    }))
    result = ingest(msd, root / "ingest", workers=1)
    assert result.n_cases == 1, f"ingest left the case out: {result}"
    return result.manifest_path, root / "ingest" / "images" / "case.nii.gz"


def predict_inverse(plan: Plan, image: Path) -> tuple[dict, object]:
    """Predict's chain applied to ``image`` and its inverse, built as ``predict_cases`` builds them."""
    from monai.transforms import Invertd

    chain = preprocessing(plan, crop_foreground=True, with_label=False)
    return chain({"image": str(image)}), Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)


class Bright(nn.Module):
    """A stand-in network: class 1 where the (normalized) image is above its mean, background elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x[:, :1]
        return torch.cat([-c, c, -c - 1.0], dim=1)


# ---------------------------------------------------------------- properties


@PROPERTY
@given(scan=scans(), factors=st.tuples(*[st.floats(0.5, 2.0)] * 3))
def test_predicted_masks_lie_on_the_scans_grid(scan: dict, factors: tuple[float, float, float]) -> None:
    from monai.data import MetaTensor

    target = tuple(float(s * f) for s, f in zip(ras_spacing(scan["affine"]), factors))
    plan = make_plan(target)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, image = ingested(scan, root)
        original = nib.load(str(image))
        np.testing.assert_allclose(original.affine, scan["affine"], atol=1e-4)
        spec = ModelSpec(plan=plan, preprocess=PreprocessConfig(), network=NetworkConfig(), roi_size=ROI)
        config = PredictConfig(tta_flips=False, prefetch=0, sw_batch_size=1)
        result = predict_cases([CaseSource("case", (image,))], root / "out", [(Bright(), spec)], ["bright"], config,
                               device=torch.device("cpu"))
        assert not result.failed, result.failed
        mask_img = nib.load(str(root / "out" / "case.nii.gz"))
        mask = np.asanyarray(mask_img.dataobj)
        assert mask.shape == scan["image"].shape
        np.testing.assert_allclose(mask_img.affine, scan["affine"], atol=1e-4)

        # the inverse's own grid (what predict writes the mask onto) is the scan's
        data, inverter = predict_inverse(plan, image)
        pred = MetaTensor(torch.zeros((1, *data["image"].shape[1:])), meta=dict(data["image"].meta))
        back = inverter({**data, "pred": pred})["pred"]
        assert tuple(back.shape[1:]) == scan["image"].shape
        np.testing.assert_allclose(np.asarray(back.affine, dtype=np.float64), scan["affine"], atol=1e-4)

    # and the mask lies where the bright boxes lie: centroids one voxel apart at most (world, mm)
    assert mask.any(), "the bright boxes vanished on the way"
    world = scan["affine"][:3, :3]
    expected = world @ np.argwhere(scan["label"] > 0).mean(axis=0)
    found = world @ np.argwhere(mask > 0).mean(axis=0)
    tolerance = max(max(target), float(np.sqrt((world ** 2).sum(axis=0)).max()))
    assert np.linalg.norm(found - expected) <= tolerance, (found, expected, tolerance)


@PROPERTY
@given(scan=scans())
def test_a_label_comes_back_voxel_for_voxel_at_the_scans_spacing(scan: dict) -> None:
    from medseg.inference import restore

    plan = make_plan(ras_spacing(scan["affine"]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, image = ingested(scan, root)
        (root / "plan.json").write_text(plan.model_dump_json())
        preprocess(manifest, root / "plan.json", root / "pre")
        cached = load_case(root / "pre", "case")
        data, inverter = predict_inverse(plan, image)
    label = torch.as_tensor(cached["label"][0].astype(np.int64))
    assert tuple(label.shape) == tuple(data["image"].shape[1:]), "preprocess and predict resample onto other grids"
    probs = torch.nn.functional.one_hot(label, len(LABELS)).permute(3, 0, 1, 2).float()
    restored = restore(probs, data, inverter, uncertainty=False, keep_probabilities=False)
    assert restored.mask.shape == scan["label"].shape
    differ = int((restored.mask != scan["label"]).sum())
    assert differ == 0, f"{differ} of {scan['label'].size} voxels changed label on the way"


@pytest.mark.parametrize("flip", [1.0, -1.0])
def test_ras_spacing_follows_the_axes(flip: float) -> None:
    """The helper's own known answer: a scan stored (y, x, z) at 2, 1, 3 mm is 1, 2, 3 mm in RAS order."""
    affine = np.eye(4)
    affine[:3, :3] = np.array([[0, 1, 0], [flip, 0, 0], [0, 0, 1]]) @ np.diag([2.0, 1.0, 3.0])
    assert ras_spacing(affine) == (1.0, 2.0, 3.0)
