"""Read one classic single-frame DICOM series into a volume with its NIfTI (RAS) affine.

This covers the common case (one series of parallel, equally spaced slices). Series that
cannot be one volume (gantry tilt, missing slices, mixed orientations) are refused with a
``DicomSeriesError`` that names the folder and what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from medseg.errors import DicomSeriesError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _read_headers(folder: Path) -> list[pydicom.Dataset]:
    datasets = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, force=False)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if "PixelData" in ds:
            ds.filename = str(path)
            datasets.append(ds)
    return datasets


def is_dicom_series_folder(folder: Path) -> bool:
    """True if ``folder`` holds at least one readable DICOM file with pixel data."""
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file())[:20]:
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
            return True
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
    return False


def read_series(folder: Path, *, tolerance_mm: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(volume, affine)``: voxels indexed (column, row, slice) and the RAS affine."""
    folder = Path(folder)
    datasets = _read_headers(folder)
    if not datasets:
        raise DicomSeriesError(f"{folder}: expected DICOM files with pixel data, found none")
    uids = {ds.get("SeriesInstanceUID") for ds in datasets}
    if len(uids) > 1:
        raise DicomSeriesError(f"{folder}: expected one series, found {len(uids)} SeriesInstanceUIDs")
    first = datasets[0]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise DicomSeriesError(f"{folder}: enhanced multi-frame DICOM is not supported yet (found NumberOfFrames > 1)")
    for key in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        if key not in first:
            raise DicomSeriesError(f"{folder}: expected tag {key} in {first.filename}, it is missing (not a volume?)")
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    for ds in datasets:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), orientation, atol=1e-4):
            raise DicomSeriesError(f"{folder}: expected one slice orientation, {ds.filename} differs")
    if int(first.get("SamplesPerPixel", 1) or 1) != 1:
        raise DicomSeriesError(
            f"{folder}: expected a greyscale series (SamplesPerPixel 1), found {first.SamplesPerPixel} "
            f"({first.get('PhotometricInterpretation', '?')}) in {first.filename}"
        )
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets])
    order = np.argsort(positions @ normal)
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    if len(datasets) > 1:
        steps = positions[1:] - positions[:-1]
        along = steps @ normal
        if np.any(np.abs(along) < tolerance_mm):
            raise DicomSeriesError(f"{folder}: two slices share one position (duplicate or several volumes)")
        off_axis = np.linalg.norm(steps - np.outer(along, normal), axis=1)
        if np.any(off_axis > tolerance_mm * 10 + 1e-3 * np.abs(along)):
            raise DicomSeriesError(
                f"{folder}: expected slices stacked along their normal, found a shear of "
                f"{off_axis.max():.3f} mm (gantry tilt?)"
            )
        if np.ptp(along) > max(tolerance_mm, 0.01 * np.median(along)):
            raise DicomSeriesError(
                f"{folder}: expected equal slice spacing, found steps from {along.min():.3f} to "
                f"{along.max():.3f} mm (missing slices?)"
            )
        slice_step = positions[1] - positions[0]
    else:
        thickness = float(first.get("SliceThickness", 1.0) or 1.0)
        slice_step = normal * thickness
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    shape = (int(first.Rows), int(first.Columns))
    slices = []
    for ds in datasets:
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise DicomSeriesError(f"{folder}: expected {shape} pixels per slice, {ds.filename} differs")
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as err:  # pydicom raises many kinds for undecodable pixel data
            raise DicomSeriesError(f"cannot decode pixel data of {ds.filename}: {err}") from None
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(pixels * slope + intercept)
    # pixel_array is (rows, columns); NIfTI voxel index i runs along columns (the row direction).
    volume = np.stack([s.T for s in slices], axis=-1)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing
    affine_lps[:3, 1] = col_dir * row_spacing
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = positions[0]
    return volume, LPS_TO_RAS @ affine_lps
