"""What the network looked at: a gradient saliency map of one class on the slice a reviewer is viewing.

For a case of a review folder, the first model of its prediction folder (``predict.json``) runs on
one window of the scan preprocessed as predict does (the model's own plan), centred on the chosen
slice. The score is the class's mean softmax probability over the voxels of that slice inside the
window; MONAI's ``VanillaGrad`` gives its gradient with respect to the input, whose magnitude
(summed over channels) is taken back onto the scan's grid with the preprocessing's inverse and
scaled to 0..1. Computed on request and cached in the review folder (``saliency/``), keyed by the
model, case, class, view and slice.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from medseg.errors import ConfigError, ModelError
from medseg.io import atomic_path
from medseg.review.folder import PREDICT_RECORD, prediction_models

log = logging.getLogger(__name__)

FOLDER = "saliency"
VIEW_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # the RAS axis across each view
_MODELS: dict[str, tuple[nn.Module, Any]] = {}


class SliceScore(nn.Module):
    """The network's softmax, averaged per class over ``region`` (a boolean mask of the window)."""

    def __init__(self, net: nn.Module, region: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.region = region

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, (list, tuple)):  # deep supervision: the full-resolution output
            out = out[0]
        elif out.ndim == x.ndim + 1:
            out = out[:, 0]
        probs = torch.softmax(out.float(), dim=1)
        return (probs * self.region).sum(dim=tuple(range(2, probs.ndim))) / self.region.sum().clamp(min=1)


def _model_ref(entry: dict[str, Any]) -> str:
    models = prediction_models(entry["prediction_dir"])
    if not models:
        raise ConfigError(f"case {entry['case_id']}: {Path(entry['prediction_dir']) / PREDICT_RECORD} names no "
                          "model, so there is nothing to explain")
    return models[0]


def _load(ref: str, tracking_uri: str | None) -> tuple[nn.Module, Any]:
    from medseg.modelio import load_model

    if ref not in _MODELS:
        net, spec = load_model(ref, torch.device("cpu"), tracking_uri)
        _MODELS.clear()  # one model in memory at a time
        _MODELS[ref] = (net.eval(), spec)
    return _MODELS[ref]


def _window(shape: tuple[int, ...], roi: tuple[int, ...], centre: np.ndarray) -> tuple[slice, ...]:
    """A window of ``roi`` voxels (clipped to the image) around ``centre``."""
    out = []
    for size, edge, middle in zip(shape, roi, centre):
        start = int(np.clip(round(middle - edge / 2), 0, max(0, size - edge)))
        out.append(slice(start, min(size, start + edge)))
    return tuple(out)


def compute(entry: dict[str, Any], net: nn.Module, spec: Any, *, label: int, view: str, index: int) -> np.ndarray:
    """The saliency map (float32, 0..1) on the scan's grid; see the module doc."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd, SpatialPad
    from monai.visualize import VanillaGrad

    from medseg.review.cases import scan_image
    from medseg.transforms import preprocessing

    if not 1 <= label < spec.plan.n_classes:
        raise ConfigError(f"case {entry['case_id']}: expected a class from 1 to {spec.plan.n_classes - 1}, found {label}")
    scan, _ = scan_image(entry)
    chain = preprocessing(spec.plan, crop_foreground=spec.preprocess.crop_foreground, with_label=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(scan.dataobj, dtype=np.float32), scan.affine), str(path))
        data = chain({"image": str(path)})
    image = data["image"]
    # the slice on the preprocessed grid: the scan's RAS voxel plane -> world -> preprocessed voxels
    canonical = nib.as_closest_canonical(scan)
    axis = VIEW_AXIS[view]
    middle = (np.array(canonical.shape[:3], float) - 1) / 2
    middle[axis] = index
    world = canonical.affine @ np.append(middle, 1.0)
    voxel = np.linalg.solve(np.asarray(image.affine, dtype=float), world)[:3]
    grid = tuple(image.shape[1:])
    plane = int(np.clip(round(voxel[axis]), 0, grid[axis] - 1))
    window = _window(grid, tuple(spec.roi_size), voxel)
    x = image.as_tensor()[(slice(None), *window)]
    padder = SpatialPad(spec.roi_size, method="end")
    padded = padder(x)
    region = torch.zeros((1, 1, *padded.shape[1:]))
    local = plane - window[axis].start
    index_region: list[Any] = [0, 0, slice(0, x.shape[1]), slice(0, x.shape[2]), slice(0, x.shape[3])]
    index_region[2 + axis] = local
    region[tuple(index_region)] = 1
    gradient = VanillaGrad(SliceScore(net, region))(torch.as_tensor(padded)[None].clone(), index=label)
    magnitude = gradient[0].abs().sum(0)[tuple(slice(0, s) for s in x.shape[1:])]
    full = torch.zeros(grid)
    full[window] = magnitude
    inverter = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)
    restored = inverter({**data, "pred": MetaTensor(full[None], meta=dict(image.meta))})["pred"]
    values = torch.as_tensor(restored)[0].numpy().astype(np.float32)
    top = float(np.percentile(values[values > 0], 99.5)) if np.any(values > 0) else 0.0
    return np.clip(values / top, 0, 1).astype(np.float32) if top > 0 else values


def saliency_volume(review_dir: Path, entry: dict[str, Any], *, label: int, view: str, index: int,
                    tracking_uri: str | None = None) -> bytes:
    """The saliency map of a queue entry as gzipped NIfTI bytes on the scan's grid, cached."""
    ref = _model_ref(entry)
    key = hashlib.sha256(f"{ref}|{entry['case_id']}|{label}|{view}|{index}".encode()).hexdigest()[:24]
    cached = Path(review_dir) / FOLDER / f"{key}.nii.gz"
    if cached.is_file():
        return cached.read_bytes()
    try:
        net, spec = _load(ref, tracking_uri)
    except ModelError as err:
        raise ConfigError(f"case {entry['case_id']}: the model {ref} that predicted it cannot be loaded: {err}") from None
    values = compute(entry, net, spec, label=label, view=view, index=index)
    reference = nib.load(str(entry["mask"]))
    body = gzip.compress(nib.Nifti1Image(values, reference.affine).to_bytes(), compresslevel=1)
    with atomic_path(cached) as tmp:
        tmp.write_bytes(body)
    log.info("case %s: saliency of class %d on %s slice %d -> %s", entry["case_id"], label, view, index, cached)
    return body
