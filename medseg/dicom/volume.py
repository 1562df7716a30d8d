"""Stack the frames of one series into a volume with its NIfTI (RAS) affine.

The frames are sorted along their slice normal. Every distinct position must hold the same
number of frames: one gives a 3D volume, several a 4D one (time points or repeats, ordered
by temporal position, acquisition, trigger time and instance number). Stored values are
mapped through RescaleSlope and RescaleIntercept into the smallest type that holds them
exactly (an integer type when slope and intercept are whole numbers, float32 otherwise).

Series that cannot be one volume are refused with a ``DicomSeriesError`` that names the
series and the problem: mixed orientations or sizes, slices stacked off their normal (gantry
tilt, unless ``resample_tilt`` asks to resample it), missing slices or uneven spacing, two
frames at one position with nothing to tell them apart, fewer slices than ``min_slices``,
positions too far apart for a finite slice step; and a file whose pixel data is shorter than
its header says is refused before any memory is taken for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from medseg.dicom.frames import Frame
from medseg.errors import DicomSeriesError

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SeriesVolume:
    """A series as a volume, with what is needed to map it back onto its DICOM objects.

    ``data`` is indexed (column, row, slice), with a fourth axis for time points (or RGB
    channels), so that NIfTI's first axis runs along the DICOM row direction. ``affine``
    maps those indices to RAS millimetres. ``slice_files``, ``slice_uids`` and
    ``frame_numbers`` say where slice ``k`` of the first volume is stored (file,
    SOPInstanceUID and, for multi-frame objects, the 1-based frame number).
    """

    data: np.ndarray
    affine: np.ndarray
    slice_files: tuple[Path, ...]
    slice_uids: tuple[str, ...]
    frame_numbers: tuple[int | None, ...]
    name: str
    rgb: bool = False
    tilt_resampled: bool = False


def _sort_positions(frames: Sequence[Frame], normal: np.ndarray, tolerance_mm: float) -> list[list[Frame]]:
    """Frames grouped by slice position (within ``tolerance_mm`` along the normal), in order."""
    along = np.array([f.position @ normal for f in frames])
    order = np.argsort(along, kind="stable")
    groups: list[list[Frame]] = []
    last = None
    for i in order:
        if last is None or along[i] - last > tolerance_mm:
            groups.append([])
            last = along[i]
        groups[-1].append(frames[i])
    return groups


def stack_geometry(
    frames: Sequence[Frame], name: str, *, tolerance_mm: float = 1e-2, min_slices: int = 1, resample_tilt: bool = False
) -> tuple[list[list[Frame]], np.ndarray, np.ndarray | None]:
    """Check the frames form a volume: ``(slices, affine_lps, tilt_shifts)``.

    ``slices[k]`` lists the frames of slice position k in acquisition order (one per volume).
    ``tilt_shifts`` (slices, 2) holds the in-plane offsets in pixels (rows, columns) of each
    slice when a gantry tilt is to be resampled, else None.
    """
    if not frames:
        raise DicomSeriesError(f"{name}: expected image frames, found none")
    first = frames[0]
    # The checks of every frame against the first, as arrays; the first frame that fails is named.
    orientation_ok = np.isclose(np.array([f.orientation for f in frames]), first.orientation, rtol=1e-5, atol=1e-4).all(axis=1)
    size_ok = np.array([(f.rows, f.columns) == (first.rows, first.columns) for f in frames])
    spacing_ok = np.isclose(np.array([f.spacing for f in frames]), first.spacing, rtol=1e-4, atol=1e-5).all(axis=1)
    for i in np.flatnonzero(~(orientation_ok & size_ok & spacing_ok))[:1]:
        f = frames[i]
        if not orientation_ok[i]:
            raise DicomSeriesError(f"{name}: expected one slice orientation, {f.path} differs")
        if not size_ok[i]:
            raise DicomSeriesError(
                f"{name}: expected {first.rows} x {first.columns} pixels per slice, {f.path} has {f.rows} x {f.columns}"
            )
        raise DicomSeriesError(f"{name}: expected one pixel spacing {list(first.spacing)}, {f.path} has {list(f.spacing)}")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    slices = _sort_positions(frames, normal, tolerance_mm)
    counts = {len(s) for s in slices}
    if len(counts) > 1:
        raise DicomSeriesError(
            f"{name}: expected the same number of images at every slice position, found from {min(counts)} to "
            f"{max(counts)} (missing images of a time series, or several series in one)"
        )
    repeats = counts.pop()
    if len(slices) < min_slices:
        what = "all its images lie at one position" if len(slices) == 1 and repeats > 1 else f"it has {len(slices)}"
        raise DicomSeriesError(
            f"{name}: expected a volume of at least {min_slices} slices, {what} (a localizer or not a volume?)"
        )
    for group in slices:
        group.sort(key=lambda f: f.order)
        keys = [f.order for f in group]
        if len(set(keys)) != len(keys):
            raise DicomSeriesError(
                f"{name}: two images share one slice position and nothing orders them ({group[0].path}, "
                f"{group[1].path}): duplicate files, or several volumes in one series"
            )
    positions = np.array([s[0].position for s in slices])
    tilt_shifts = None
    if len(slices) > 1:
        steps = np.diff(positions, axis=0)
        along = steps @ normal
        off_axis = steps - np.outer(along, normal)
        shear = np.linalg.norm(off_axis, axis=1)
        if np.any(shear > tolerance_mm * 10 + 1e-3 * np.abs(along)):
            # Consistent shear from slice to slice: a gantry tilt. Anything else: not one volume.
            angle = float(np.degrees(np.arctan2(np.median(shear), np.median(np.abs(along)))))
            per_mm = np.median(off_axis / along[:, None], axis=0)  # sideways shift per mm along the normal
            if np.abs(off_axis - np.outer(along, per_mm)).max() > tolerance_mm * 10:
                raise DicomSeriesError(
                    f"{name}: expected slices stacked along their normal, found them moved sideways by uneven "
                    f"amounts (up to {shear.max():.3f} mm a step): not one volume, nor a gantry tilt"
                )
            if not resample_tilt:
                raise DicomSeriesError(
                    f"{name}: expected slices stacked along their normal, found them sheared by {angle:.2f} degrees "
                    f"(gantry tilt); set resample_tilt to resample onto an orthogonal grid"
                )
            offsets = positions - positions[0]
            in_plane = np.stack([offsets @ col_dir / first.spacing[0], offsets @ row_dir / first.spacing[1]], axis=1)
            tilt_shifts = in_plane
            positions = positions - np.outer(offsets @ row_dir, row_dir) - np.outer(offsets @ col_dir, col_dir)
            steps = np.diff(positions, axis=0)
            along = steps @ normal
        spread = float(np.ptp(along))
        if spread > max(tolerance_mm, 0.01 * float(np.median(along))):
            median = float(np.median(along))
            gaps = int(np.sum(along > 1.5 * median))
            raise DicomSeriesError(
                f"{name}: expected equal slice spacing, found steps from {along.min():.3f} to {along.max():.3f} mm"
                + (f" ({gaps} missing slice{'s' if gaps > 1 else ''}?)" if gaps else " (uneven spacing)")
            )
        slice_step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        slice_step = normal * _single_slice_thickness(first)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * first.spacing[1]
    affine[:3, 1] = col_dir * first.spacing[0]
    affine[:3, 2] = slice_step
    affine[:3, 3] = positions[0]
    if not (np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 0):
        # positions each finite, but so far apart that their differences are not (1e308 and -1e308)
        raise DicomSeriesError(
            f"{name}: expected slice positions a finite step apart, found a step of {slice_step.tolist()} mm "
            f"from {positions[0].tolist()} ({slices[0][0].path}) to {positions[-1].tolist()} ({slices[-1][0].path})"
        )
    return slices, affine, tilt_shifts


def _single_slice_thickness(frame: Frame) -> float:
    try:
        ds = pydicom.dcmread(frame.path, stop_before_pixels=True, specific_tags=["SliceThickness", "SpacingBetweenSlices"])
        value = ds.get("SliceThickness") or ds.get("SpacingBetweenSlices")
        return float(value) if value not in (None, "") and float(value) > 0 else 1.0
    except Exception:  # a thickness is a nicety for one slice; 1 mm will do
        return 1.0


def _load_pixels(path: Path, location: PixelLocation | None = None) -> np.ndarray:
    """The decoded pixel data of ``path``: read straight from the file where the scan found plain
    pixels (``location``), else decoded by pydicom (compressed, big endian, multi-frame, ...)."""
    try:
        if location is not None:
            return location.read(path)
        ds = _read_full(path)
        pixels = ds.pixel_array
        if "PixelData" in ds and not ds.file_meta.TransferSyntaxUID.is_encapsulated:
            # pydicom drops native pixel data beyond what Rows x Columns hold: then one of them is wrong
            expected = pydicom.pixels.utils.get_expected_length(ds)
            if len(ds.PixelData) > expected + expected % 2:
                raise ValueError(f"expected {expected} bytes for {ds.Rows} x {ds.Columns} pixels, found {len(ds.PixelData)}")
    except Exception as err:  # pydicom and its decoders raise many kinds for bad pixel data
        syntax = ""
        try:
            syntax = f" ({pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name})"
        except Exception:  # noqa: S110 - only decorates the message
            pass
        raise DicomSeriesError(f"{path}: cannot decode pixel data{syntax}: {err}") from None
    return np.asarray(pixels)


def _read_full(path: Path) -> pydicom.Dataset:
    """The whole data set of ``path``, also where it lacks the Part 10 preamble."""
    try:
        return pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        ds = read_without_preamble(path, defer_size=None)
        if ds is None:
            raise
        return ds


def read_without_preamble(path: Path, *, defer_size: int | None) -> pydicom.Dataset | None:
    """A DICOM data set stored without the Part 10 preamble and file meta (older archives, which
    dcm2niix reads too), or None. Only a file that starts with a group 0008 element and names a SOP
    class and a series counts; its transfer syntax (little endian, implicit or explicit VR) is
    the one pydicom finds, recorded in a file meta made for it."""
    try:
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x08\x00":
                return None
        ds = pydicom.dcmread(path, force=True, defer_size=defer_size)
        if not (ds.get("SOPClassUID") and ds.get("SeriesInstanceUID")):
            return None
    except Exception:  # not a data set after all
        return None
    implicit, little = ds.original_encoding
    if not little:
        return None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if implicit else pydicom.uid.ExplicitVRLittleEndian
    return ds


NATIVE_LITTLE_ENDIAN = (pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian)
PIXEL_DATA = 0x7FE00010


@dataclass(frozen=True)
class PixelLocation:
    """Where the plain pixels of a single-frame, little-endian, monochrome image lie in its file.

    Such pixels (the common case) are read with one ``numpy.fromfile``, without parsing the file
    again or going through pydicom's decoders (5x slower for them)."""

    offset: int  # of the PixelData value, from the start of the file
    length: int  # of the PixelData value, as its header gives it
    dtype: str  # little-endian numpy type of one stored value
    rows: int
    columns: int
    bits_stored: int  # of the bits of each value; the others are cleared (or carry the sign), as pydicom does

    def read(self, path: Path) -> np.ndarray:
        count = self.rows * self.columns
        expected = count * np.dtype(self.dtype).itemsize
        if not expected <= self.length <= expected + 1:  # one byte of padding to an even length
            raise ValueError(f"expected {expected} bytes for {self.rows} x {self.columns} pixels, found {self.length}")
        available = max(os.stat(path).st_size - self.offset, 0)
        if available < expected:  # before numpy takes the memory the header declares
            raise ValueError(f"expected {expected} bytes of pixel data, the file ends after {available}")
        pixels = np.fromfile(path, dtype=self.dtype, count=count, offset=self.offset)
        if pixels.size != count:
            raise ValueError(f"expected {expected} bytes of pixel data, the file ends after {pixels.nbytes}")
        unused = pixels.itemsize * 8 - self.bits_stored
        if unused:  # PS3.5 8.1.1: the unused high bits may hold anything
            np.left_shift(pixels, unused, out=pixels)
            np.right_shift(pixels, unused, out=pixels)
        return pixels.reshape(self.rows, self.columns)


def pixel_location(ds: pydicom.Dataset) -> PixelLocation | None:
    """The ``PixelLocation`` of a data set read from a file with its pixel data deferred (not yet
    read); None for any other encoding, which ``_load_pixels`` leaves to pydicom."""
    try:
        syntax = str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or "")
        element = ds.get_item(PIXEL_DATA, keep_deferred=True)  # not read: only where it lies
        if element is None or not getattr(element, "is_raw", False):
            return None
        return locate_pixels(syntax, int(element.value_tell), int(element.length), ds.get)
    except Exception:  # anything unusual: pydicom decodes it, and reports what is wrong
        return None


def locate_pixels(syntax: str, offset: int, length: int, get: Callable[..., Any]) -> PixelLocation | None:
    """The ``PixelLocation`` of pixel data of ``length`` bytes at ``offset`` in a file of transfer
    syntax ``syntax``, the pixel module read with ``get`` (a data set's ``get``); None where the
    pixels are not plain single-frame monochrome little-endian ones."""
    bits, stored, rows, columns = get("BitsAllocated"), get("BitsStored"), get("Rows"), get("Columns")
    if (
        syntax not in NATIVE_LITTLE_ENDIAN or length == 0xFFFFFFFF or get("SamplesPerPixel", 1) != 1
        or bits not in (8, 16, 32) or not isinstance(stored, int) or not 0 < stored <= bits
        or int(get("NumberOfFrames") or 1) != 1 or get("PixelRepresentation") not in (0, 1)
        or not isinstance(rows, int) or not isinstance(columns, int)
    ):
        return None
    kind = "u" if get("PixelRepresentation") == 0 else "i"
    return PixelLocation(offset, length, f"<{kind}{bits // 8}", rows, columns, stored)


def _frame_pixels(frame: Frame, pixels: np.ndarray) -> np.ndarray:
    if frame.frame_index is not None:
        if pixels.ndim < 3 or frame.frame_index >= pixels.shape[0]:
            raise DicomSeriesError(f"{frame.path}: expected frame {frame.frame_index + 1} in its pixel data, found shape {pixels.shape}")
        return pixels[frame.frame_index]
    if frame.tile is not None:
        r, c = divmod(frame.tile, frame.n_tiles)
        return pixels[r * frame.rows:(r + 1) * frame.rows, c * frame.columns:(c + 1) * frame.columns]
    return pixels


def _output_dtype(stored: np.dtype, slopes: np.ndarray, intercepts: np.ndarray, lo: float, hi: float) -> np.dtype:
    """The smallest type holding every rescaled value exactly."""
    whole = np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    if not whole:
        return np.dtype(np.float32)
    for candidate in (stored, np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.int32)):
        if np.issubdtype(candidate, np.integer):
            info = np.iinfo(candidate)
            if info.min <= lo and hi <= info.max:
                return np.dtype(candidate).newbyteorder("=")
    return np.dtype(np.float64) if max(abs(lo), abs(hi)) > 2**24 else np.dtype(np.float32)


def assemble(
    slices: list[list[Frame]],
    affine_lps: np.ndarray,
    name: str,
    *,
    workers: int = 4,
    tilt_shifts: np.ndarray | None = None,
    locations: Mapping[Path, PixelLocation] | None = None,
) -> SeriesVolume:
    """Read the pixel data of the checked frames and build the ``SeriesVolume``.

    Files with a ``locations`` entry (plain pixels, found by the scan) are read straight; the
    others are decoded by pydicom on ``workers`` threads (its decoders are C code)."""
    paths = sorted({f.path for s in slices for f in s})
    where = locations or {}
    decode = [p for p in paths if p not in where]
    pixels = {p: _load_pixels(p, where[p]) for p in paths if p in where}
    if len(decode) > 1 and workers > 1:
        with ThreadPoolExecutor(max_workers=min(workers, len(decode))) as pool:
            pixels.update(zip(decode, pool.map(_load_pixels, decode)))
    else:
        pixels.update((p, _load_pixels(p)) for p in decode)
    first = slices[0][0]
    sample = _frame_pixels(first, pixels[first.path])
    rgb = sample.ndim == 3
    if sample.shape[:2] != (first.rows, first.columns):
        raise DicomSeriesError(f"{first.path}: expected {first.rows} x {first.columns} pixels, decoded {sample.shape}")
    n_slices, n_volumes = len(slices), len(slices[0])
    slopes = np.array([f.slope for s in slices for f in s])
    intercepts = np.array([f.intercept for s in slices for f in s])
    stored_lo = min(float(v.min()) for v in pixels.values())
    stored_hi = max(float(v.max()) for v in pixels.values())
    ends = np.concatenate([slopes * stored_lo + intercepts, slopes * stored_hi + intercepts])
    dtype = np.dtype(np.uint8) if rgb else _output_dtype(sample.dtype, slopes, intercepts, float(ends.min()), float(ends.max()))
    shape = (first.columns, first.rows, n_slices) + ((3,) if rgb else ((n_volumes,) if n_volumes > 1 else ()))
    if rgb and n_volumes > 1:
        raise DicomSeriesError(f"{name}: expected one RGB volume, found {n_volumes} images per slice position")
    data = np.empty(shape, dtype=dtype)
    exact_int = np.issubdtype(dtype, np.integer)
    for k, group in enumerate(slices):
        for t, frame in enumerate(group):
            values = _frame_pixels(frame, pixels[frame.path])
            if values.shape[:2] != (first.rows, first.columns):
                raise DicomSeriesError(f"{frame.path}: expected {first.rows} x {first.columns} pixels, decoded {values.shape}")
            if rgb:
                data[:, :, k, :] = np.swapaxes(values, 0, 1)
                continue
            if frame.slope != 1 or frame.intercept != 0:
                calc = np.int64 if exact_int else np.float64
                values = values.astype(calc) * (int(frame.slope) if exact_int else frame.slope) + (
                    int(frame.intercept) if exact_int else frame.intercept
                )
            plane = values.T.astype(dtype, copy=False)
            if n_volumes > 1:
                data[:, :, k, t] = plane
            else:
                data[:, :, k] = plane
    if tilt_shifts is not None:
        data = _resample_tilt(data, tilt_shifts)
    firsts = [s[0] for s in slices]
    return SeriesVolume(
        data=data,
        affine=LPS_TO_RAS @ affine_lps,
        slice_files=tuple(f.path for f in firsts),
        slice_uids=tuple(f.sop_uid for f in firsts),
        frame_numbers=tuple(None if f.frame_index is None else f.frame_index + 1 for f in firsts),
        name=name,
        rgb=rgb,
        tilt_resampled=tilt_shifts is not None,
    )


def _resample_tilt(data: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Shift each slice in plane so the sheared stack lies on an orthogonal grid (linear interpolation)."""
    from scipy.ndimage import shift as nd_shift

    out = np.empty(data.shape, dtype=np.float32)
    for k in range(data.shape[2]):
        rows_px, cols_px = shifts[k]
        # data is (columns, rows, ...): the column index moves with the row direction.
        offset = (cols_px, rows_px) + (0,) * (data.ndim - 3)
        out[:, :, k] = nd_shift(data[:, :, k].astype(np.float32), offset, order=1, mode="constant", cval=float(data.min()))
    return out


def build_volume(
    frames: Sequence[Frame],
    name: str,
    *,
    tolerance_mm: float = 1e-2,
    min_slices: int = 1,
    resample_tilt: bool = False,
    workers: int = 4,
    locations: Mapping[Path, PixelLocation] | None = None,
) -> SeriesVolume:
    """Check the frames of one series and read them into a ``SeriesVolume``."""
    slices, affine_lps, shifts = stack_geometry(
        frames, name, tolerance_mm=tolerance_mm, min_slices=min_slices, resample_tilt=resample_tilt
    )
    return assemble(slices, affine_lps, name, workers=workers, tilt_shifts=shifts, locations=locations)
