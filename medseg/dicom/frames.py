"""The 2D frames of DICOM image objects, with the geometry each one carries.

Every image object becomes one or more ``Frame``s, whatever its encoding:

- a classic single-frame image (CT, MR, ...) is one frame;
- an enhanced multi-frame object (Enhanced CT/MR, Philips and Siemens) has one frame per
  item of its Per-frame Functional Groups, its geometry taken from the per-frame or shared
  groups (plane position and orientation, pixel measures, pixel value transformation);
- a Siemens mosaic holds its slices as tiles of one image; the tile count and the slice
  normal come from the Siemens CSA header (read with nibabel's reader), and the position of
  the first tile is corrected as dcm2niix and nibabel do.

Frames are read from headers alone (no pixel data); ``volume`` stacks them into volumes.
Positions are in the DICOM patient frame (LPS, mm) and denote the centre of the first pixel.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from medseg.errors import DicomSeriesError


class Header(Protocol):
    """What frames read of a header: a pydicom data set, or the fast reader's ``RawHeader``."""

    def get(self, keyword: str, default: Any = None) -> Any: ...

    def __contains__(self, keyword: str) -> bool: ...


@dataclass(frozen=True)
class Frame:
    """One 2D image: where it lies, how its stored values map to real values, where it is stored."""

    path: Path
    frame_index: int | None  # 0-based frame of a multi-frame object; None for a single-frame file
    tile: int | None  # 0-based tile of a Siemens mosaic; None otherwise
    n_tiles: int  # tiles per side of a mosaic (1 otherwise)
    position: np.ndarray  # (3,) LPS mm, centre of the first pixel
    orientation: np.ndarray  # (6,) row direction cosines then column direction cosines
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns) in mm
    rows: int
    columns: int
    slope: float
    intercept: float
    order: tuple[float, ...]  # keys that order repeated acquisitions of one position (time, echo)
    echo: float | None  # echo time or number, used to split multi-echo series
    sop_uid: str

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])


def _float(value: Any, default: float) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _number(ds: Header, keyword: str, default: float, where: str) -> float:
    """The value of a numeric tag that maps stored values (``default`` if absent); refuse one that is no number."""
    value = ds.get(keyword)
    if value in (None, ""):
        return default
    number = _float(value, math.nan)
    if not math.isfinite(number):
        raise DicomSeriesError(f"{where}: expected a number in {keyword}, found {value!r}")
    return number


def _values(value: Any) -> list:
    """The values of a multi-valued tag; one value reads as a number, not a list."""
    return list(value) if isinstance(value, pydicom.multival.MultiValue | list | tuple) else [value]


def _first(ds: pydicom.Dataset, sequence: str) -> pydicom.Dataset | None:
    seq = ds.get(sequence)
    return seq[0] if seq else None


def _geometry_tags(ds: Header, where: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    missing = [k for k in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing") if not ds.get(k)]
    if missing:
        raise DicomSeriesError(f"{where}: expected the geometry tags {', '.join(missing)}, they are missing (not a volume?)")
    try:
        orientation = np.asarray([float(v) for v in _values(ds.get("ImageOrientationPatient"))], dtype=np.float64)
        position = np.asarray([float(v) for v in _values(ds.get("ImagePositionPatient"))], dtype=np.float64)
        spacing = tuple(float(v) for v in _values(ds.get("PixelSpacing")))
    except (TypeError, ValueError) as err:
        raise DicomSeriesError(f"{where}: expected numbers in the geometry tags, found {err}") from None
    _check_geometry(orientation, position, spacing, where)
    return orientation, position, (spacing[0], spacing[1])  # type: ignore[return-value]


def _check_geometry(orientation: np.ndarray, position: np.ndarray, spacing: tuple, where: str) -> None:
    if orientation.shape != (6,) or position.shape != (3,) or len(spacing) != 2:
        raise DicomSeriesError(
            f"{where}: expected 6 orientation cosines, 3 position and 2 spacing values, found "
            f"{orientation.size}, {position.size} and {len(spacing)}"
        )
    if not (np.all(np.isfinite(orientation)) and np.all(np.isfinite(position)) and np.all(np.isfinite(spacing))):
        raise DicomSeriesError(f"{where}: expected finite geometry values, found NaN or infinity")
    row, col = orientation[:3], orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise DicomSeriesError(
            f"{where}: expected ImageOrientationPatient to hold two orthogonal unit vectors, found {orientation.tolist()}"
        )
    if min(spacing) <= 0:
        raise DicomSeriesError(f"{where}: expected positive PixelSpacing, found {list(spacing)}")


def _order_keys(ds: Header) -> tuple[float, ...]:
    """Keys that order the repeats of one slice position (classic images): time, then instance."""
    return (
        _float(ds.get("TemporalPositionIdentifier"), 0.0),
        _float(ds.get("AcquisitionNumber"), 0.0),
        _float(ds.get("TriggerTime"), 0.0),
        _float(ds.get("InstanceNumber"), 0.0),
    )


def _echo(ds: Header) -> float | None:
    number = ds.get("EchoNumbers")
    if number not in (None, ""):
        try:
            return float(_values(number)[0])
        except (TypeError, ValueError):
            return None
    return None


def image_type(value: Any) -> list[str]:
    """ImageType's values, upper case, however a reader gives them (a backslash-joined text, a list, a
    pydicom MultiValue; one value of another VR in a damaged file); [] for none."""
    if value is None:
        return []
    if isinstance(value, str):
        values: list[Any] = value.split("\\")
    elif isinstance(value, (list, tuple, MultiValue)):
        values = list(value)
    else:
        values = [value]
    return [str(v).strip().upper() for v in values]


def _mosaic_tiles(ds: Header, where: str) -> tuple[int, np.ndarray] | None:
    """(number of tiles, slice normal) of a Siemens mosaic, or None when ``ds`` is not one."""
    if "MOSAIC" not in image_type(ds.get("ImageType")):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel.nicom warns that it is experimental on import
        from nibabel.nicom import csareader

    try:
        csa = csareader.get_csa_header(ds, "image")
        n = csareader.get_n_mosaic(csa) if csa else None
        normal = csareader.get_slice_normal(csa) if csa else None
    except Exception as err:  # the CSA reader raises its own kinds for damaged headers
        raise DicomSeriesError(f"{where}: cannot read the Siemens CSA header of a mosaic image: {err}") from None
    if not n:
        raise DicomSeriesError(f"{where}: a MOSAIC image without NumberOfImagesInMosaic in its CSA header")
    return int(n), (np.asarray(normal, dtype=np.float64) if normal is not None else None)


def frames_of(ds: Header, path: Path) -> list[Frame]:
    """The frames of one image object (header only), in the order its pixel data stores them."""
    where = str(path)
    rows, columns = ds.get("Rows") or 0, ds.get("Columns") or 0
    if not (isinstance(rows, int) and isinstance(columns, int) and rows > 0 and columns > 0):  # not a list either
        # a damaged Rows can hold a sequence, which pydicom parses (and fails on) when it is printed
        shown = [v if isinstance(v, int) else type(v).__name__ for v in (rows, columns)]
        raise DicomSeriesError(f"{where}: expected positive Rows and Columns, found {shown[0]} x {shown[1]}")
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    n_frames = int(_float(ds.get("NumberOfFrames"), 1))
    if "PerFrameFunctionalGroupsSequence" in ds or n_frames > 1:
        return _multiframe(ds, path, rows, columns, n_frames, sop_uid)
    orientation, position, spacing = _geometry_tags(ds, where)
    slope, intercept = _number(ds, "RescaleSlope", 1.0, where), _number(ds, "RescaleIntercept", 0.0, where)
    mosaic = _mosaic_tiles(ds, where)
    if mosaic is None:
        return [Frame(path, None, None, 1, position, orientation, spacing, rows, columns, slope, intercept,
                      _order_keys(ds), _echo(ds), sop_uid)]
    n_tiles, csa_normal = mosaic
    per_side = math.ceil(math.sqrt(n_tiles))
    if rows % per_side or columns % per_side:
        raise DicomSeriesError(f"{where}: a {rows} x {columns} mosaic cannot hold {per_side} x {per_side} tiles")
    tile_rows, tile_cols = rows // per_side, columns // per_side
    row_dir, col_dir = orientation[:3], orientation[3:]
    # ImagePositionPatient of a mosaic is that of the whole mosaic image; shift it to the first tile.
    fix_rows, fix_cols = (rows - tile_rows) / 2.0, (columns - tile_cols) / 2.0
    first = position + col_dir * spacing[0] * fix_rows + row_dir * spacing[1] * fix_cols
    normal = np.cross(row_dir, col_dir)
    if csa_normal is not None and csa_normal @ normal < 0:
        normal = -normal  # tiles are stored along the CSA slice normal
    step = _float(ds.get("SpacingBetweenSlices"), _float(ds.get("SliceThickness"), 1.0))
    return [
        Frame(path, None, t, per_side, first + normal * step * t, orientation, spacing, tile_rows, tile_cols,
              slope, intercept, _order_keys(ds), _echo(ds), sop_uid)
        for t in range(n_tiles)
    ]


def _group_item(ds: pydicom.Dataset, frame: pydicom.Dataset | None, sequence: str) -> pydicom.Dataset | None:
    """A functional group item of one frame: the per-frame one, else the shared one."""
    if frame is not None and sequence in frame:
        return _first(frame, sequence)
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    if shared is not None and sequence in shared:
        return _first(shared, sequence)
    return None


def _multiframe(ds: pydicom.Dataset, path: Path, rows: int, columns: int, n_frames: int, sop_uid: str) -> list[Frame]:
    """The frames of a multi-frame object. pydicom reads a sequence (and its items' values) on first
    use, and raises many kinds (OSError, ValueError, ...) where one is damaged: each is refused here."""
    _check_declared_lengths(ds, path, ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"))
    try:
        return _multiframe_frames(ds, path, rows, columns, n_frames, sop_uid)
    except (DicomSeriesError, MemoryError):  # MemoryError: not damage this check can name (a bug to fix)
        raise
    except Exception as err:  # noqa: BLE001 - pydicom's many kinds for a damaged sequence
        raise DicomSeriesError(
            f"{path}: unreadable DICOM header: expected readable functional groups in a multi-frame image "
            f"({n_frames} frames), found a damaged sequence ({type(err).__name__}: {err})"
        ) from None


def _check_declared_lengths(ds: pydicom.Dataset, path: Path, keywords: tuple[str, ...]) -> None:
    """Refuse a sequence not yet read whose declared length runs past the end of the file: pydicom
    would take that much memory (up to 4 GiB) before finding out."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    for keyword in keywords:
        tag = pydicom.datadict.tag_for_keyword(keyword)
        element = ds.get_item(tag, keep_deferred=True) if tag in ds else None
        length, start = getattr(element, "length", None), getattr(element, "value_tell", None)
        if not getattr(element, "is_raw", False) or length in (None, 0xFFFFFFFF) or start is None:
            continue
        if start + length > size:
            raise DicomSeriesError(
                f"{path}: expected {keyword} to end within the file ({size} bytes), its length says "
                f"{length} bytes from byte {start}"
            )


def _multiframe_frames(
    ds: pydicom.Dataset, path: Path, rows: int, columns: int, n_frames: int, sop_uid: str
) -> list[Frame]:
    where = str(path)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        raise DicomSeriesError(
            f"{where}: a multi-frame image ({n_frames} frames) without Per-frame Functional Groups; "
            "its frames have no position"
        )
    if len(per_frame) != n_frames:
        raise DicomSeriesError(
            f"{where}: expected {n_frames} Per-frame Functional Groups items (NumberOfFrames), found {len(per_frame)}"
        )
    frames = []
    for index, item in enumerate(per_frame):
        fwhere = f"{where} frame {index + 1}"
        pos = _group_item(ds, item, "PlanePositionSequence")
        ori = _group_item(ds, item, "PlaneOrientationSequence")
        meas = _group_item(ds, item, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None:
            raise DicomSeriesError(f"{fwhere}: expected plane position, plane orientation and pixel measures, one is missing")
        merged = pydicom.Dataset()
        merged.ImagePositionPatient = pos.get("ImagePositionPatient")
        merged.ImageOrientationPatient = ori.get("ImageOrientationPatient")
        merged.PixelSpacing = meas.get("PixelSpacing")
        orientation, position, spacing = _geometry_tags(merged, fwhere)
        transform = _group_item(ds, item, "PixelValueTransformationSequence")
        slope = _number(transform if transform else ds, "RescaleSlope", 1.0, fwhere)
        intercept = _number(transform if transform else ds, "RescaleIntercept", 0.0, fwhere)
        content = _first(item, "FrameContentSequence")
        temporal = _float(content.get("TemporalPositionIndex"), 0.0) if content else 0.0
        echo_item = _group_item(ds, item, "MREchoSequence")
        echo = _float(echo_item.get("EffectiveEchoTime"), 0.0) if echo_item else None
        stack_pos = _float(content.get("InStackPositionNumber"), 0.0) if content else 0.0
        frames.append(
            Frame(path, index, None, 1, position, orientation, spacing, rows, columns, slope, intercept,
                  (temporal, 0.0, 0.0, float(index), stack_pos), echo, sop_uid)
        )
    return frames
