"""Unit tests of medseg.resample: AxisSpacingd gives MONAI Spacingd's grid and values, and inverts like it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Spacingd

from medseg.errors import MedsegError
from medseg.resample import AxisSpacingd, resample_axis


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


GRIDS = {  # shape, spacing, target spacing, direction
    "LPS, anisotropic, finer and coarser": ((30, 26, 12), (0.7, 0.9, 2.5), (1.3, 1.3, 1.3), np.diag([-1.0, -1.0, 1.0])),
    "halving every axis": ((21, 31, 41), (1.0, 1.0, 1.0), (2.0, 2.0, 2.0), np.eye(3)),
    "oblique, thick slices": ((40, 33, 20), (0.8, 0.8, 3.0), (1.0, 1.0, 1.0), _rotation(0.3)),
    "oblique and flipped, one axis kept": ((17, 19, 5), (1.1, 0.6, 4.0), (0.5, 0.9, 4.0),
                                           _rotation(-0.2) @ np.diag([1.0, -1.0, 1.0])),
}


def _scan(shape: tuple[int, int, int], spacing: tuple[float, ...], direction: np.ndarray) -> MetaTensor:
    rng = np.random.default_rng(0)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = rng.normal(size=3) * 10
    return MetaTensor(torch.as_tensor(rng.normal(size=(2, *shape)).astype(np.float32)), affine=torch.as_tensor(affine))


@pytest.mark.parametrize("name", list(GRIDS))
def test_same_grid_values_and_inverse_as_monai_spacing(name: str) -> None:
    shape, spacing, target, direction = GRIDS[name]
    scan = _scan(shape, spacing, direction)
    monai, ours = Spacingd("image", pixdim=target, mode="bilinear"), AxisSpacingd("image", pixdim=target)
    expected, got = monai({"image": scan.clone()})["image"], ours({"image": scan.clone()})["image"]
    assert got.shape == expected.shape
    torch.testing.assert_close(got.affine, expected.affine, rtol=0, atol=1e-9)
    torch.testing.assert_close(got.as_tensor(), expected.as_tensor(), rtol=0, atol=1e-5)
    back = {}
    for transform, out in ((monai, expected), (ours, got)):
        inverter = Invertd("pred", transform=Compose([transform]), orig_keys="image", nearest_interp=False)
        pred = MetaTensor(out.as_tensor().clone(), meta=dict(out.meta))
        back[transform] = inverter({"image": out, "pred": pred})["pred"]
    assert back[ours].shape == scan.shape
    torch.testing.assert_close(back[ours].affine, scan.affine, rtol=0, atol=1e-9)
    torch.testing.assert_close(back[ours].as_tensor(), back[monai].as_tensor(), rtol=0, atol=1e-5)


def test_linear_samples_and_border_values() -> None:
    ramp = torch.arange(5, dtype=torch.float32).reshape(1, 5) * 10  # 0, 10, 20, 30, 40
    out = resample_axis(ramp, 1, 7, 0.75)  # positions 0, 0.75, ..., 4.5 (past the end: the last value)
    assert out[0].tolist() == pytest.approx([0.0, 7.5, 15.0, 22.5, 30.0, 37.5, 40.0])


def test_a_grid_with_rotation_between_the_voxel_axes_is_refused() -> None:
    from medseg.resample import _voxel_map

    with pytest.raises(MedsegError, match="scan.nii.gz: expected a change of voxel size along the scan's own axes"):
        rotated = np.eye(4)
        rotated[:3, :3] = _rotation(0.5)
        _voxel_map(np.eye(4), rotated, "scan.nii.gz")
