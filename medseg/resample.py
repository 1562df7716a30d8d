"""Resampling to a new voxel spacing, axis by axis, for scans too large for MONAI's grid resampler.

MONAI's ``Spacingd`` keeps a scan's axis directions and changes only its voxel size, so each
output voxel's position in the input's voxel grid is ``i * step + offset`` along each axis
separately. MONAI still resamples through a full coordinate grid and ``grid_sample``: on a
512 x 512 x 300 scan (a 0.29 GiB float copy) resampled from 0.8 x 0.8 x 1 mm to 1 mm, MONAI
1.6.1's ``Spacingd`` took the process from 1.0 GiB resident to a peak of 4.0 GiB, and its
inverse to a peak of 5.7 GiB (sampled every 5 ms on the development machine, 2026-12-02). Linear
interpolation on such a grid is separable, so ``AxisSpacingd`` does it one axis at a time: a
gather of the lower neighbours, then a lerp towards the upper ones a few planes at a time. The
values are the same to float rounding, and the peak is about the input plus one output.

``AxisSpacingd`` takes MONAI's own output shape and affine (``zoom_affine`` and
``compute_shape_offset``, as ``Spacing`` computes them), records itself on the MetaTensor like
any MONAI invertible transform, and inverts onto the recorded original grid, so MONAI's
``Invertd`` undoes it together with the rest of a chain. Linear interpolation only (images and
probabilities); labels keep MONAI's ``Spacingd`` with nearest neighbours.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform

from medseg.errors import MedsegError

DIAGONAL_TOL = 1e-4
CHUNK = 16  # output planes interpolated at a time


def resample_axis(x: torch.Tensor, axis: int, size: int, step: float, offset: float = 0.0) -> torch.Tensor:
    """``x`` sampled along ``axis`` at positions ``offset + i * step`` (i < size), linearly; positions
    past either end take the end value (MONAI's ``border`` padding)."""
    n = x.shape[axis]
    positions = torch.arange(size, dtype=torch.float64) * step + offset
    positions = positions.clamp(0, n - 1)
    low = positions.floor().long()
    high = (low + 1).clamp(max=n - 1)
    weight = (positions - low).to(x.dtype).to(x.device)
    shape = [1] * x.ndim
    shape[axis] = -1
    out = x.index_select(axis, low.to(x.device))
    high = high.to(x.device)
    for start in range(0, size, CHUNK):  # the upper neighbours a few planes at a time: one output in memory
        n = min(CHUNK, size - start)
        out.narrow(axis, start, n).lerp_(x.index_select(axis, high[start : start + n]),
                                         weight[start : start + n].reshape(shape))
    return out


def resample_axes(x: torch.Tensor, shape: Sequence[int], steps: Sequence[float], offsets: Sequence[float]) -> torch.Tensor:
    """``x`` (channels, *spatial) resampled to ``shape`` (output voxel i of axis a at input position
    ``offsets[a] + i * steps[a]``), axis by axis, the most shrinking axis first."""
    order = sorted(range(len(shape)), key=lambda a: shape[a] / x.shape[1 + a])
    out = x
    for a in order:
        if out.shape[1 + a] == shape[a] and abs(steps[a] - 1) < 1e-9 and abs(offsets[a]) < 1e-9:
            continue
        out = resample_axis(out, 1 + a, int(shape[a]), float(steps[a]), float(offsets[a]))
    return out


def _voxel_map(source: np.ndarray, target: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Per axis, step and offset of the target grid's voxels in the source's voxel coordinates."""
    mapping = np.linalg.solve(source, target)
    linear = mapping[:3, :3]
    if np.abs(linear - np.diag(np.diag(linear))).max() > DIAGONAL_TOL:
        raise MedsegError(f"{where}: expected a change of voxel size along the scan's own axes, found a rotation")
    return np.diag(linear).copy(), mapping[:3, 3].copy()


class AxisSpacingd(MapTransform, InvertibleTransform):
    """``Spacingd(keys, pixdim, mode="bilinear")`` with the same output grid, resampled axis by axis."""

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float]) -> None:
        super().__init__(keys)
        self.pixdim = np.asarray(pixdim, dtype=np.float64)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data.utils import compute_shape_offset, zoom_affine

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, MetaTensor):
                raise MedsegError(f"AxisSpacingd: expected a MetaTensor with an affine for '{key}', found {type(img)}")
            affine = img.affine.numpy().astype(np.float64)
            shape_in = list(img.shape[1:])
            new_affine = zoom_affine(affine, self.pixdim[: len(shape_in)], diagonal=False)
            shape_out, offset = compute_shape_offset(shape_in, affine, new_affine, False)
            new_affine[:3, 3] = offset[:3]
            steps, offsets = _voxel_map(affine, new_affine, str(img.meta.get("filename_or_obj", key)))
            out = resample_axes(img.as_tensor(), [int(s) for s in shape_out], steps, offsets)
            result = MetaTensor(out, meta=dict(img.meta))
            result.applied_operations = list(img.applied_operations)
            result.affine = torch.as_tensor(new_affine)
            self.push_transform(result, orig_size=shape_in, extra_info={"orig_affine": affine.tolist()})
            d[key] = result
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            record = self.pop_transform(img)
            orig_affine = np.asarray(record["extra_info"]["orig_affine"], dtype=np.float64)
            shape = [int(s) for s in record["orig_size"]]
            steps, offsets = _voxel_map(img.affine.numpy().astype(np.float64), orig_affine, "inverse resampling")
            out = resample_axes(img.as_tensor(), shape, steps, offsets)
            result = MetaTensor(out, meta=dict(img.meta))
            result.applied_operations = list(img.applied_operations)
            result.affine = torch.as_tensor(orig_affine)
            d[key] = result
        return d
