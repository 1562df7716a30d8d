"""DICOM in and out: find series in a folder tree, turn them into volumes, read and write labels.

- ``scan``: headers of every file under a folder, grouped into series (split where a series
  mixes orientations, sizes or echoes), label objects, ignored files;
- ``frames``: the 2D frames of classic, enhanced multi-frame and Siemens mosaic images;
- ``volume``: frames stacked into a checked volume (3D or 4D) with its RAS affine;
- ``read_series``: all of the above for a folder that holds one series.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medseg.dicom.scan import ScanResult, SeriesGroup, scan
from medseg.dicom.volume import SeriesVolume, build_volume
from medseg.errors import DicomSeriesError

__all__ = ["ScanResult", "SeriesGroup", "SeriesVolume", "build_volume", "is_dicom_series_folder", "read_series", "scan"]


def read_series(
    folder: Path | Sequence[Path],
    *,
    tolerance_mm: float = 1e-2,
    min_slices: int = 1,
    resample_tilt: bool = False,
    workers: int = 4,
) -> SeriesVolume:
    """The one image series under ``folder`` (or in a list of files) as a volume; refuse none or several."""
    found = scan(folder)
    folder = found.root
    if not found.series:
        detail = f"; refused: {found.refused[0][1]}" if found.refused else ""
        raise DicomSeriesError(f"{folder}: expected DICOM image files with pixel data, found none{detail}")
    if len(found.series) > 1:
        names = "; ".join(g.name for g in found.series[:4])
        raise DicomSeriesError(f"{folder}: expected one series, found {len(found.series)}: {names}")
    if found.refused:  # an unusable file may be a slice of the series: a volume without it could lack one
        raise DicomSeriesError(
            f"{folder}: expected every image file to be usable, {len(found.refused)} refused: {found.refused[0][1]}"
        )
    group = found.series[0]
    return build_volume(
        group.frames, group.name, tolerance_mm=tolerance_mm, min_slices=min_slices,
        resample_tilt=resample_tilt, workers=workers, locations=group.pixels,
    )


def is_dicom_series_folder(folder: Path, files: Sequence[Path] | None = None) -> bool:
    """True if ``folder`` holds a readable DICOM file among its first 50 files (or of ``files``)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medseg.dicom.scan import list_files

    for path in (list_files(Path(folder)) if files is None else list(files))[:50]:
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
            return True
        except (InvalidDicomError, OSError):
            continue
    return False
