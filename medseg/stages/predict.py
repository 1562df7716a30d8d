"""predict: masks for new scans, written in each scan's own geometry.

Each scan goes through the training-time preprocessing (from the model's spec), a MONAI
sliding-window inference with Gaussian weighting (optionally averaged over flips and over
several models), and MONAI's ``Invertd``, which undoes the resampling, crop and
reorientation on the class probabilities. The mask (argmax) is written as
``<out_dir>/<case>.nii.gz`` with the original scan's shape and affine, so it overlays it.
The models are loaded once for all cases. A case that fails is logged and skipped.

Scans that come from DICOM (a DICOM folder as input, or a manifest of ingested DICOM series)
also get ``<out_dir>/<case>_seg.dcm``: a DICOM-SEG that references the source series, one
segment per label, on exactly the voxels of the NIfTI mask.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.config import PredictConfig
from medseg.errors import DataError, MedsegError, ModelError
from medseg.io import load_nifti, save_nifti
from medseg.manifest import load_manifest
from medseg.modelio import ModelSpec, load_model, resolve_device
from medseg.sources import CaseSource, discover

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictResult:
    out_dir: Path
    written: list[Path]
    failed: dict[str, str] = field(default_factory=dict)


def cases_from_input(path: Path, case_ids: Collection[str] | None = None) -> list[CaseSource]:
    """The scans to predict: a manifest JSON, or anything ``discover`` reads (test cases first)."""
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        manifest, root = load_manifest(path)
        records = manifest.cases + manifest.test_cases
        cases = [
            CaseSource(r.case_id, (root / r.image,),
                       dicom_files=tuple(Path(s.path) for s in r.sources) if manifest.kind == "dicom" else ())
            for r in records
        ]
    else:
        found = discover(path)
        cases = list(found.test_cases or found.cases)
    if case_ids is not None:
        wanted = set(case_ids)
        unknown = wanted - {c.case_id for c in cases}
        if unknown:
            raise DataError(f"{path}: cases asked for but not found: {sorted(unknown)[:5]}")
        cases = [c for c in cases if c.case_id in wanted]
    if not cases:
        raise DataError(f"{path}: found no scans to predict")
    return cases


def _as_single_file(case: CaseSource, tmp: Path) -> Path:
    """One NIfTI file per case in its original geometry (DICOM and multi-file cases are converted)."""
    if case.kind == "dicom":
        from medseg.dicom import read_series

        volume = read_series(case.images)
        out = tmp / f"{case.case_id}.nii.gz"
        save_nifti(out, volume.data.astype(np.float32), volume.affine)
        return out
    if len(case.images) == 1:
        return case.images[0]
    channels = [load_nifti(p) for p in case.images]
    for path, img in zip(case.images[1:], channels[1:]):
        if img.shape != channels[0].shape or not np.allclose(img.affine, channels[0].affine, atol=1e-3):
            raise DataError(f"{path}: expected the grid of {case.images[0]}, found another shape or affine")
    out = tmp / f"{case.case_id}.nii.gz"
    stacked = np.stack([np.asarray(c.dataobj, dtype=np.float32) for c in channels], axis=-1)
    save_nifti(out, stacked, channels[0].affine)
    return out


def _write_dicom_seg(mask: np.ndarray, affine: np.ndarray, case: CaseSource, spec: ModelSpec, target: Path) -> None:
    """Write ``mask`` as a DICOM-SEG of the case's source series (same grid, checked)."""
    from medseg.dicom import read_series
    from medseg.dicom.segwrite import write_seg

    series = read_series(case.dicom_files)
    if series.data.shape[:3] != mask.shape or not np.allclose(series.affine, affine, atol=1e-3):
        raise DataError(
            f"{case.case_id}: expected the mask on the grid of its DICOM series {series.name}, "
            f"found shape {mask.shape} against {series.data.shape[:3]} or another affine"
        )
    names = {k: v for k, v in spec.plan.labels.items() if k != 0}
    write_seg(mask, series, target, names=names, description=f"medseg prediction of {case.case_id}")


def _flip_sets(roi: Sequence[int], enabled: bool, mirror_axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """The flips of test-time augmentation (tensor dims of a batch): every combination of the
    plan's mirror axes (None: every spatial axis) that the network convolves."""
    if not enabled:
        return [()]
    axes = [2 + i for i, r in enumerate(roi) if r > 1 and (mirror_axes is None or i in mirror_axes)]
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


def probabilities(
    image: torch.Tensor, models: list[tuple[nn.Module, ModelSpec]], config: PredictConfig, device: torch.device
) -> torch.Tensor:
    """Softmax probabilities (classes, X, Y, Z) averaged over models and flips."""
    from monai.inferers import sliding_window_inference

    batch = image[None].to(device)
    total: torch.Tensor | None = None
    count = 0
    with torch.no_grad():
        for net, spec in models:
            for flips in _flip_sets(spec.roi_size, config.tta_flips, spec.plan.mirror_axes):
                x = torch.flip(batch, flips) if flips else batch
                logits = sliding_window_inference(
                    x, spec.roi_size, config.sw_batch_size, net, overlap=config.overlap,
                    mode="gaussian" if config.gaussian else "constant",
                )
                probs = torch.softmax(logits.float(), dim=1)
                probs = torch.flip(probs, flips) if flips else probs
                total = probs if total is None else total + probs
                count += 1
    assert total is not None
    return (total / count)[0].cpu()


def predict(
    input_path: Path,
    out_dir: Path,
    models: Sequence[str],
    config: PredictConfig | None = None,
    *,
    case_ids: Collection[str] | None = None,
    device: str = "auto",
    tracking_uri: str | None = None,
) -> PredictResult:
    """Write one mask per scan found at ``input_path`` into ``out_dir``; see the module doc."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from medseg.transforms import preprocessing

    config = config or PredictConfig()
    if not models:
        raise ModelError("expected at least one model, found none")
    dev = resolve_device(device)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    loaded = [load_model(ref, dev, tracking_uri) for ref in models]
    first = loaded[0][1]
    for ref, (_, spec) in zip(models[1:], loaded[1:]):
        if spec.plan != first.plan or spec.preprocess != first.preprocess:
            raise ModelError(f"model {ref}: expected the plan and preprocessing of {models[0]} for an ensemble, found others")
    chain = preprocessing(first.plan, crop_foreground=first.preprocess.crop_foreground, with_label=False)
    inverter = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)
    cases = cases_from_input(input_path, case_ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failed: dict[str, str] = {}
    log.info("predicting %d scans with %d model(s) on %s", len(cases), len(loaded), dev)
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            try:
                scan = _as_single_file(case, Path(tmp))
                original = load_nifti(scan)
                data = chain({"image": str(scan)})
                image = data["image"]
                probs = probabilities(image.as_tensor() if isinstance(image, MetaTensor) else image, loaded, config, dev)
                data["pred"] = MetaTensor(probs, meta=dict(image.meta))
                restored = inverter(data)["pred"]
                mask = np.asarray(torch.as_tensor(restored).argmax(0).numpy(), dtype=np.uint8)
                if mask.shape != original.shape[:3]:
                    raise DataError(
                        f"{scan}: internal error, restored mask has shape {mask.shape}, expected {original.shape[:3]}"
                    )
                target = out_dir / f"{case.case_id}.nii.gz"
                save_nifti(target, mask, original.affine)
                written.append(target)
                if config.dicom_seg and case.dicom_files:
                    _write_dicom_seg(mask, original.affine, case, first, out_dir / f"{case.case_id}_seg.dcm")
            except MedsegError as err:
                failed[case.case_id] = str(err)
                log.error("case %s failed: %s", case.case_id, err)
    log.info("wrote %d masks to %s (%d failed)", len(written), out_dir, len(failed))
    if not written:
        raise DataError(f"{input_path}: no scan could be predicted ({len(failed)} failed)")
    return PredictResult(out_dir, written, failed)
