"""One case checked and written as canonical NIfTI: the part of ingest that ``ingest`` (folders and
case sheets) and ``ingest_dicom`` share; ``medseg.stages.ingest``'s module doc says what is checked
and written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.config import IngestConfig
from medseg.errors import DataError, GeometryMismatchError, LabelValueError
from medseg.io import load_nifti, save_nifti, sha256
from medseg.manifest import CaseRecord, IntensityStats, SourceFile
from medseg.sources import CaseSource


@dataclass(frozen=True)
class IngestResult:
    manifest_path: Path
    n_cases: int
    n_failed: int


@dataclass(frozen=True)
class _Volume:
    data: np.ndarray  # (x, y, z, channels) float32
    affine: np.ndarray
    path: Path


def _load_image(case: CaseSource, config: IngestConfig) -> _Volume:
    if case.kind == "dicom":  # a series folder of a case sheet, or the files of one series
        from medseg.dicom import read_series

        one_folder = len(case.images) == 1 and case.images[0].is_dir()
        series = read_series(case.images[0] if one_folder else list(case.images),
                             tolerance_mm=config.slice_tolerance_mm, min_slices=config.min_slices,
                             resample_tilt=config.resample_tilt)
        data = series.data if series.data.ndim == 4 else series.data[..., None]
        return _Volume(data.astype(np.float32), series.affine, case.images[0])
    channels = []
    affine = None
    for path in case.images:
        img = load_nifti(path)
        data = np.asanyarray(img.dataobj)
        if data.ndim == 3:
            data = data[..., None]
        elif data.ndim != 4:
            raise DataError(f"{path}: expected a 3D image (or 4D with channels last), found {data.ndim}D {data.shape}")
        if affine is None:
            affine = img.affine
        elif channels and data.shape[:3] != channels[0].shape[:3]:
            raise GeometryMismatchError(
                f"{path}: expected the shape of the first channel {channels[0].shape[:3]}, found {data.shape[:3]}"
            )
        elif not np.allclose(img.affine, affine, atol=1e-3):
            raise GeometryMismatchError(f"{path}: its affine differs from the first channel {case.images[0]}")
        channels.append(data.astype(np.float32))
    data = np.concatenate(channels, axis=-1)
    return _Volume(data, np.asarray(affine, dtype=np.float64), case.images[0])


def _check_finite(volume: _Volume) -> None:
    if volume.data.size == 0:
        raise DataError(f"{volume.path}: expected an image with voxels, found shape {volume.data.shape[:3]}")
    bad = ~np.isfinite(volume.data)
    if bad.any():
        raise DataError(f"{volume.path}: expected finite intensities, found {int(bad.sum())} NaN or infinite voxels")
    for c in range(volume.data.shape[-1]):  # a blank scan (or channel) holds nothing to learn and breaks normalization
        channel = volume.data[..., c]
        if channel.size and channel.min() == channel.max():
            which = f" in channel {c}" if volume.data.shape[-1] > 1 else ""
            raise DataError(f"{volume.path}: expected an image whose intensities vary, found every voxel "
                            f"{float(channel.flat[0]):g}{which}")


def _load_label(path: Path, image: _Volume, labels: dict[int, str] | None, tolerance: float) -> np.ndarray:
    img = load_nifti(path)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.shape != image.data.shape[:3]:
        raise GeometryMismatchError(
            f"{path}: expected the image's shape {image.data.shape[:3]} ({image.path.name}), found {data.shape}"
        )
    if not np.allclose(img.affine, image.affine, atol=tolerance):
        worst = float(np.abs(img.affine - image.affine).max())
        raise GeometryMismatchError(
            f"{path}: expected the image's affine ({image.path.name}), found one that differs by {worst:.4g} mm"
        )
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise LabelValueError(f"{path}: expected whole-number label values, found fractions or NaN")
    values = np.unique(data).astype(np.int64)
    if labels is not None:
        undeclared = sorted(set(values.tolist()) - set(labels))
        if undeclared:
            raise LabelValueError(f"{path}: expected label values {sorted(labels)}, found undeclared {undeclared}")
    if values.min(initial=0) < 0 or values.max(initial=0) > 255:
        raise LabelValueError(f"{path}: expected label values in 0..255, found {values.min()}..{values.max()}")
    return data.astype(np.uint8)


HISTOGRAM_MAX_RANGE = 1 << 20  # integer values spanning less than this: percentiles from counts
HISTOGRAM_CHUNK = 1 << 24  # values counted at a time (bounds the memory of the count)


def percentiles(values: np.ndarray, q: Sequence[float]) -> list[float]:
    """``np.percentile(values, q)`` (linear interpolation). For integer data of a modest range the
    order statistics come from value counts, in chunks: the same result without sorting a copy,
    which for a large CT saves seconds and gigabytes."""
    flat = values.reshape(-1)
    if flat.dtype.kind not in "iu" or flat.size == 0:
        return [float(v) for v in np.percentile(flat, q)]
    lo, hi = int(flat.min()), int(flat.max())
    if hi - lo >= HISTOGRAM_MAX_RANGE:
        return [float(v) for v in np.percentile(flat, q)]
    counts = np.zeros(hi - lo + 1, dtype=np.int64)
    for start in range(0, flat.size, HISTOGRAM_CHUNK):
        chunk = flat[start:start + HISTOGRAM_CHUNK].astype(np.int64) - lo
        counts += np.bincount(chunk, minlength=counts.size)
    cumulative = np.cumsum(counts)
    out = []
    for p in q:
        index = p / 100 * (flat.size - 1)
        below = int(np.floor(index))
        # The k-th smallest value (0-based) is the first value whose cumulative count exceeds k.
        first, second = lo + np.searchsorted(cumulative, [below + 1, min(below + 2, flat.size)])
        out.append(float(first + (index - below) * (second - first)))
    return out


def intensity_stats(data: np.ndarray, label: np.ndarray | None) -> list[IntensityStats]:
    out = []
    fg = label > 0 if label is not None and (label > 0).any() else None
    for c in range(data.shape[-1]):
        channel = data[..., c]
        p_lo, p_hi = percentiles(channel, [0.5, 99.5])
        fg_values = channel[fg] if fg is not None else None
        out.append(
            IntensityStats(
                min=float(channel.min()),
                max=float(channel.max()),
                mean=float(channel.mean()),
                std=float(channel.std()),
                p00_5=float(p_lo),
                p99_5=float(p_hi),
                foreground_mean=float(fg_values.mean()) if fg_values is not None else None,
                foreground_std=float(fg_values.std()) if fg_values is not None else None,
            )
        )
    return out


def ingest_case(
    case: CaseSource, out_dir: Path, labels: dict[int, str] | None, config: IngestConfig
) -> CaseRecord:
    """Check and convert one case; raise a ``DataError`` that names the bad file."""
    for path in case.images + ((case.label,) if case.label else ()):
        if not path.exists():
            raise DataError(f"file not found: {path}")
    image = _load_image(case, config)
    _check_finite(image)
    label = _load_label(case.label, image, labels, config.affine_tolerance_mm) if case.label else None
    files = [p for p in case.images if p.is_file()] + ([case.label] if case.label else [])
    data = image.data[..., 0] if image.data.shape[-1] == 1 else image.data
    return write_case(out_dir, case.case_id, data, image.data, image.affine, label, files)


def write_case(
    out_dir: Path,
    case_id: str,
    image: np.ndarray,
    channels: np.ndarray,
    affine: np.ndarray,
    label: np.ndarray | None,
    sources: Sequence[Path],
) -> CaseRecord:
    """Write a checked case as ``images/<case>.nii.gz`` (and ``labels/<case>.nii.gz``) and describe it.

    ``image`` is written as it is (3D, or 4D with its volumes); ``channels`` is the same data as
    (x, y, z, channel) for the intensity statistics; ``sources`` are the input files, hashed."""
    image_rel = f"images/{case_id}.nii.gz"
    save_nifti(out_dir / image_rel, image, affine)
    label_rel = None
    label_voxels = None
    if label is not None:
        label_rel = f"labels/{case_id}.nii.gz"
        save_nifti(out_dir / label_rel, label, affine)
        values, counts = np.unique(label, return_counts=True)
        label_voxels = {int(v): int(n) for v, n in zip(values, counts)}
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return CaseRecord(
        case_id=case_id,
        image=image_rel,
        label=label_rel,
        sources=[SourceFile(path=str(p), sha256=sha256(p)) for p in sources],
        shape=list(channels.shape[:3]),
        channels=int(channels.shape[-1]),
        spacing_mm=[float(z) for z in zooms],
        orientation="".join(nib.aff2axcodes(affine)),
        affine=affine.tolist(),
        intensity=intensity_stats(channels, label),
        label_voxels=label_voxels,
    )
