"""Labels stored as DICOM objects (DICOM-SEG and RTSTRUCT) as label volumes on the grid of their image series.

A label object is read against the ``SeriesVolume`` of the series it was drawn on and becomes a
``LabelVolume``: a uint8 array of exactly ``image.data.shape[:3]`` in the same voxel order, so it
is saved with ``image.affine``.

- ``referenced_series_uid``: the SeriesInstanceUID a SEG or RTSTRUCT header refers to, to attach
  a label object found by ``scan`` to its series group;
- ``read_seg``: a Segmentation (binary, fractional, or the Label Map Segmentation SOP class),
  decoded with highdicom (``Segmentation.get_volume``) and placed on the image grid by its frame
  geometry, without resampling: permuted, flipped, sparse (missing frames) and cropped
  segmentations are accepted; frames off the image grid are refused;
- ``read_rtstruct``: a structure set, whose closed planar contours (LPS mm) are mapped to voxel
  coordinates, checked to lie on a slice plane and filled with ``skimage.draw.polygon``; the
  contours of one ROI on one slice are combined by XOR (even-odd), so inner contours cut holes;
- ``read_labels``: either of the two, chosen by the SOP class.

Label values: by default a SEG segment number is its value and the n-th ROI of a structure set
(in StructureSetROISequence order) has value n. With a ``label_map`` (value -> name), segments and
ROIs are matched by name (SegmentLabel, ROIName; case-insensitive) and one that is not named is
refused. Where labels overlap the higher value wins and a warning gives the voxel counts.

References are checked before any pixel is read: the label object must name only image
instances of the series (the SOPInstanceUIDs of its slices, or the classic images a legacy
converted multi-frame image was made from); when it names none, its series, and failing that
its frame of reference, must be the image's. A frame-of-reference UID that differs although the
instances match is only a warning (rt-utils, for one, writes a new one into its structure sets).

A structure set without contours is not an error: it gives an empty label volume and a warning
(an RTSTRUCT is also how "nothing to delineate" is recorded).

Limits: 4D series are matched on their first time point; SEG segment numbers and ROI counts above
255 need a ``label_map``; fractional segments are thresholded at 0.5; open contours and points in
a structure set are skipped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medseg.dicom.sop import RTSTRUCT_STORAGE, SEG_STORAGE, sop_class_uid
from medseg.dicom.volume import LPS_TO_RAS, SeriesVolume
from medseg.errors import ConfigError, DicomLabelError

log = logging.getLogger(__name__)

BACKGROUND = "background"
MAX_VALUE = int(np.iinfo(np.uint8).max)
FILLED_CONTOURS = ("CLOSED_PLANAR", "CLOSED_PLANAR_XOR")


@dataclass(frozen=True)
class LabelVolume:
    """A label object on the voxel grid of its image.

    ``data`` (uint8) has the shape ``image.data.shape[:3]`` and the image's voxel order
    (column, row, slice); ``names`` maps each value to its name (0 is the background);
    ``source`` is the SEG or RTSTRUCT file it was read from.
    """

    data: np.ndarray
    names: dict[int, str]
    source: Path


@dataclass(frozen=True)
class _ImageRefs:
    """What a label object may reference to be drawn on the image: its series, frame of reference, instances."""

    series_uid: str
    frame_of_reference_uid: str | None
    sop_uids: frozenset[str]
    slice_of_sop: dict[str, int] = field(default_factory=dict)  # single-frame SOP (or conversion source) -> slice


# --- references -----------------------------------------------------------------------------------


def _rt_referenced_series(header: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The RTReferencedSeriesSequence items of a structure set, across frames of reference and studies."""
    return [
        series
        for frame in header.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for series in study.get("RTReferencedSeriesSequence", [])
    ]


def referenced_series_uid(header: pydicom.Dataset) -> str | None:
    """The SeriesInstanceUID of the image series a SEG or RTSTRUCT header refers to, or None if it names none.

    SEG: ReferencedSeriesSequence; RTSTRUCT: ReferencedFrameOfReferenceSequence ->
    RTReferencedStudySequence -> RTReferencedSeriesSequence. Where several series are named,
    the first is returned (and the others logged).
    """
    sop_class = sop_class_uid(header)
    if sop_class in SEG_STORAGE:
        items = list(header.get("ReferencedSeriesSequence", []))
    elif sop_class == RTSTRUCT_STORAGE:
        items = _rt_referenced_series(header)
    else:
        where = getattr(header, "filename", None) or "header"
        raise DicomLabelError(f"{where}: expected a SEG or RTSTRUCT, found SOP class {sop_class or 'none'}")
    uids = list(dict.fromkeys(str(item.SeriesInstanceUID) for item in items if item.get("SeriesInstanceUID")))
    if len(uids) > 1:
        where = getattr(header, "filename", None) or "label object"
        log.info("%s references %d series; using the first, %s", where, len(uids), uids[0])
    return uids[0] if uids else None


def _image_refs(image: SeriesVolume) -> _ImageRefs:
    """The UIDs of ``image`` that label objects may reference (read from the headers of its files)."""
    if not image.slice_files:
        raise DicomLabelError(f"{image.name}: expected the files of its slices, the volume names none")
    first = pydicom.dcmread(
        image.slice_files[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "FrameOfReferenceUID"]
    )
    slice_of_sop: dict[str, int] = {}
    sops = set(image.slice_uids)
    multiframe: dict[Path, list[tuple[int, int]]] = {}
    for k, (path, uid, frame) in enumerate(zip(image.slice_files, image.slice_uids, image.frame_numbers)):
        if frame is None:
            slice_of_sop[uid] = k
        else:
            multiframe.setdefault(path, []).append((k, frame))
    for path, frames in multiframe.items():
        # A legacy converted (enhanced) image names the classic images each frame was made from.
        per_frame = pydicom.dcmread(path, stop_before_pixels=True).get("PerFrameFunctionalGroupsSequence", [])
        for k, frame in frames:
            if frame > len(per_frame):
                continue
            for source in per_frame[frame - 1].get("ConversionSourceAttributesSequence", []):
                uid = str(source.get("ReferencedSOPInstanceUID", ""))
                if uid:
                    sops.add(uid)
                    slice_of_sop[uid] = k
    frame_of_reference = first.get("FrameOfReferenceUID")
    return _ImageRefs(
        series_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(frame_of_reference) if frame_of_reference else None,
        sop_uids=frozenset(sops),
        slice_of_sop=slice_of_sop,
    )


def _check_references(
    path: Path,
    what: str,
    image: SeriesVolume,
    refs: _ImageRefs,
    *,
    sop_uids: set[str],
    series_uids: set[str],
    frame_of_reference_uids: set[str],
) -> None:
    """Refuse a label object that names instances, a series or a frame of reference other than the image's."""
    series_note = ""
    if series_uids and refs.series_uid not in series_uids:
        series_note = f"; it references series {', '.join(sorted(series_uids))}, the image is series {refs.series_uid}"
    elif not series_uids:
        series_note = "; it names no referenced series"
    if sop_uids:
        missing = sorted(sop_uids - refs.sop_uids)
        if missing:
            raise DicomLabelError(
                f"{path}: expected a {what} of the images of {image.name}, found {len(missing)} of its "
                f"{len(sop_uids)} referenced images not in that series (first: {missing[0]}){series_note}"
            )
    elif series_uids:
        if refs.series_uid not in series_uids:
            raise DicomLabelError(f"{path}: expected a {what} of {image.name}{series_note}")
    elif frame_of_reference_uids:
        if refs.frame_of_reference_uid not in frame_of_reference_uids:
            raise DicomLabelError(
                f"{path}: expected a {what} in the frame of reference {refs.frame_of_reference_uid} of {image.name}, "
                f"found {', '.join(sorted(frame_of_reference_uids))} (and no referenced series or images)"
            )
        return
    else:
        raise DicomLabelError(
            f"{path}: expected a {what} that references its image series, instances or frame of reference, found none"
        )
    image_frame = refs.frame_of_reference_uid
    if frame_of_reference_uids and image_frame and image_frame not in frame_of_reference_uids:
        log.warning(
            "%s: its frame of reference %s differs from that of %s (%s), although it references that series; "
            "using the image's geometry",
            path, ", ".join(sorted(frame_of_reference_uids)), image.name, image_frame,
        )


# --- label values ---------------------------------------------------------------------------------


def _name_lookup(label_map: Mapping[int, str]) -> dict[str, int]:
    """``label_map`` (value -> name) as name (case-folded) -> value, checked."""
    lookup: dict[str, int] = {}
    for value, name in label_map.items():
        if not isinstance(value, (int, np.integer)) or not 0 <= int(value) <= MAX_VALUE:
            raise ConfigError(f"label_map: expected values from 0 to {MAX_VALUE}, found {value!r} ({name!r})")
        key = str(name).strip().casefold()
        if key in lookup:
            raise ConfigError(
                f"label_map: expected distinct names, found {name!r} for values {lookup[key]} and {value}"
            )
        lookup[key] = int(value)
    return lookup


def _assign_values(
    path: Path, items: list[tuple[int, int, str]], label_map: Mapping[int, str] | None, what: str
) -> tuple[dict[int, int], dict[int, str]]:
    """Label values for ``items`` ((key, number, name) of segments or ROIs): (key -> value, value -> name).

    Without ``label_map`` a key is its own value (SEG segment numbers; ROI positions). ``number``
    is how messages name the segment or ROI.
    """
    names: dict[int, str] = {0: BACKGROUND}
    values: dict[int, int] = {}
    if label_map is None:
        for key, number, name in items:
            if not 1 <= key <= MAX_VALUE:
                raise DicomLabelError(
                    f"{path}: expected label values 1 to {MAX_VALUE} for an 8-bit label volume, found {what} {number} "
                    f"'{name}' at value {key}; give a label_map"
                )
            values[key] = key
            names[key] = name
        return values, names
    lookup = _name_lookup(label_map)
    names.update({int(v): str(n) for v, n in label_map.items()})
    for key, number, name in items:
        value = lookup.get(name.strip().casefold())
        if value is None or value == 0:
            known = ", ".join(f"{v}: {n}" for v, n in sorted(label_map.items()))
            raise DicomLabelError(
                f"{path}: expected only {what}s named in the label map ({known}), found {what} {number} '{name}'"
            )
        values[key] = value
    return values, names


def _paint(out: np.ndarray, mask: np.ndarray, value: int, overwritten: dict[tuple[int, int], int]) -> None:
    """Write ``value`` where ``mask`` is set, the higher value winning; count the voxels taken from other values."""
    under = out[mask]
    taken = under[(under != 0) & (under != value)]
    for other, count in zip(*np.unique(taken, return_counts=True)):
        loser, winner = sorted((int(other), value))
        overwritten[(loser, winner)] = overwritten.get((loser, winner), 0) + int(count)
    out[mask] = np.maximum(under, value)


def _report(path: Path, out: np.ndarray, names: dict[int, str], overwritten: dict[tuple[int, int], int]) -> None:
    for (low, high), count in sorted(overwritten.items()):
        log.warning(
            "%s: labels overlap: %d voxels of %d '%s' are also %d '%s' and keep the higher value, %d",
            path, count, low, names.get(low, "?"), high, names.get(high, "?"), high,
        )
    found = dict(zip(*(a.tolist() for a in np.unique(out, return_counts=True))))
    log.info("%s: voxels per label %s", path, {v: found.get(v, 0) for v in sorted(names) if v})


def _read_dataset(path: Path, classes: Iterable[str], what: str) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError) as err:
        raise DicomLabelError(
            f"{path}: expected a DICOM {what}, cannot read it ({type(err).__name__}: {err})"
        ) from None
    found = sop_class_uid(ds)
    if found not in tuple(classes):
        raise DicomLabelError(f"{path}: expected a DICOM {what}, found SOP class {found or 'none'}")
    return ds


# --- DICOM-SEG ------------------------------------------------------------------------------------


def _segments(seg: pydicom.Dataset) -> list[tuple[int, str]]:
    """(segment number, label) of each segment, without the background of a label map."""
    labelmap = str(seg.get("SegmentationType", "")) == "LABELMAP"
    padding = seg.get("PixelPaddingValue") if labelmap else None
    out = []
    for item in seg.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        if labelmap and (number == 0 or number == padding):
            continue
        out.append((number, str(item.get("SegmentLabel", "") or f"segment {number}")))
    return sorted(out)


def _grid_mapping(
    path: Path, affine_lps: np.ndarray, shape: tuple[int, ...], image: SeriesVolume, tolerance_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """(offset, steps): image index = offset + steps @ (slice, row, column) index of the highdicom volume.

    Refuse frames whose pixels do not fall on image voxels: another orientation or pixel spacing,
    or an offset that is not a whole number of voxels. Whole steps of several slices are accepted
    (a segmentation that omits empty frames).
    """
    image_lps = LPS_TO_RAS @ image.affine
    spacing_mm = np.linalg.norm(image.affine[:3, :3], axis=0)
    to_image = np.linalg.inv(image_lps) @ affine_lps
    steps = np.zeros((3, 3), dtype=np.int64)
    used: set[int] = set()
    for axis in range(3):
        if shape[axis] == 1:
            continue
        column = to_image[:3, axis]
        whole = np.round(column)
        target = np.flatnonzero(whole)
        drift_mm = float(np.max(np.abs(column - whole) * spacing_mm) * (shape[axis] - 1))
        in_plane = axis > 0  # highdicom's axes: slice, row, column
        if (
            len(target) != 1 or int(target[0]) in used or drift_mm > tolerance_mm
            or (in_plane and abs(whole[target[0]]) != 1)
        ):
            kind = "pixel" if in_plane else "frame"
            raise DicomLabelError(
                f"{path}: expected frames on the voxel grid of {image.name}, found one {kind} step to be "
                f"{np.round(column, 3).tolist()} image voxels (another orientation or spacing)"
            )
        used.add(int(target[0]))
        steps[:, axis] = whole.astype(np.int64)
    origin = to_image[:3, 3]
    offset = np.round(origin)
    off_mm = np.abs(origin - offset) * spacing_mm
    if np.max(off_mm) > tolerance_mm:
        raise DicomLabelError(
            f"{path}: expected frames on the voxel grid of {image.name}, found them offset by "
            f"{np.round(origin - offset, 3).tolist()} voxels ({np.max(off_mm):.3f} mm) from it"
        )
    return offset.astype(np.int64), steps


def _place(
    path: Path, array: np.ndarray, affine_lps: np.ndarray, image: SeriesVolume, tolerance_mm: float
) -> np.ndarray:
    """A (slice, row, column) array with its LPS affine moved onto the image grid (no resampling).

    Its non-zero voxels must fall inside the image.
    """
    offset, steps = _grid_mapping(path, affine_lps, array.shape, image, tolerance_mm)
    shape = image.data.shape[:3]
    out = np.zeros(shape, dtype=array.dtype)
    where = np.nonzero(array)
    if not where[0].size:
        return out
    target = offset[:, None] + steps @ np.stack(where)
    inside = np.all((target >= 0) & (target < np.asarray(shape)[:, None]), axis=0)
    if not np.all(inside):
        raise DicomLabelError(
            f"{path}: expected segments inside the grid of {image.name} {tuple(shape)}, found "
            f"{int(np.sum(~inside))} segmented pixels outside it"
        )
    out[tuple(target)] = array[where]
    return out


def _seg_volume(path: Path, seg: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
    """(spatial array, LPS affine) of ``seg.get_volume(**kwargs)``; the channel of one segment is dropped."""
    try:
        volume = seg.get_volume(**kwargs)  # type: ignore[attr-defined]
    except (RuntimeError, ValueError) as err:
        raise DicomLabelError(
            f"{path}: expected segmentation frames that form a regularly spaced stack, found: {err}"
        ) from None
    array = np.asarray(volume.array)
    return (array[..., 0] if array.ndim == 4 else array), np.asarray(volume.affine)


def read_seg(
    path: Path, image: SeriesVolume, label_map: Mapping[int, str] | None = None, *, tolerance_mm: float = 0.1
) -> LabelVolume:
    """A DICOM Segmentation as a label volume on the grid of ``image``.

    ``label_map`` (value -> name) maps segments by SegmentLabel (case-insensitive); without it a
    segment's number is its value. Fractional segments count where they reach 0.5. Frames must
    lie within ``tolerance_mm`` of the image's voxel grid.
    """
    import highdicom

    path = Path(path)
    header = _read_dataset(path, SEG_STORAGE, "segmentation")
    try:
        seg = highdicom.seg.Segmentation.from_dataset(header, copy=False)
    except Exception as err:  # highdicom raises many kinds on objects it cannot use
        raise DicomLabelError(
            f"{path}: expected a segmentation highdicom can read, found: {type(err).__name__}: {err}"
        ) from None
    refs = _image_refs(image)
    _check_references(
        path, "segmentation", image, refs,
        sop_uids={str(uid) for _, _, uid in seg.get_source_image_uids()},
        series_uids={str(s.get("SeriesInstanceUID", "")) for s in seg.get("ReferencedSeriesSequence", [])} - {""},
        frame_of_reference_uids={str(seg.FrameOfReferenceUID)} if seg.get("FrameOfReferenceUID") else set(),
    )
    segments = _segments(seg)
    values, names = _assign_values(path, [(n, n, name) for n, name in segments], label_map, "segment")
    out = np.zeros(image.data.shape[:3], dtype=np.uint8)
    overwritten: dict[tuple[int, int], int] = {}
    if str(seg.get("SegmentationType", "")) == "LABELMAP":
        stored, affine_lps = _seg_volume(path, seg, combine_segments=True)
        lut = np.zeros(max([int(stored.max())] + [n for n, _ in segments]) + 1, dtype=np.uint8)
        for number, value in values.items():
            lut[number] = value  # the background and the padding value stay 0
        out[...] = _place(path, lut[stored], affine_lps, image, tolerance_mm)
    else:
        for number, _ in sorted(segments, key=lambda s: (values[s[0]], s[0])):
            array, affine_lps = _seg_volume(
                path, seg, segment_numbers=[number], combine_segments=False, skip_overlap_checks=True
            )
            inside = array >= 0.5  # binary: 0 or 1; fractional: rescaled to [0, 1]
            _paint(out, _place(path, inside, affine_lps, image, tolerance_mm), values[number], overwritten)
    _report(path, out, names, overwritten)
    return LabelVolume(data=out, names=names, source=path)


# --- RTSTRUCT -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Contour:
    kind: str
    points_lps: np.ndarray  # (n, 3) mm
    sop_uid: str | None


@dataclass(frozen=True)
class _Roi:
    number: int
    name: str
    contours: tuple[_Contour, ...]


def _rois(path: Path, ds: pydicom.Dataset) -> list[_Roi]:
    """The ROIs of a structure set in StructureSetROISequence order, with their contours."""
    contours_of: dict[int, list[_Contour]] = {}
    for item in ds.get("ROIContourSequence", []):
        number = int(item.ReferencedROINumber)
        found = contours_of.setdefault(number, [])
        for contour in item.get("ContourSequence", []):
            data = np.asarray([float(v) for v in contour.get("ContourData", [])], dtype=np.float64)
            if data.size % 3:
                raise DicomLabelError(
                    f"{path}: expected ContourData in x, y, z triplets, found {data.size} values (ROI {number})"
                )
            images = contour.get("ContourImageSequence", [])
            sop = str(images[0].ReferencedSOPInstanceUID) if images else None
            found.append(_Contour(str(contour.get("ContourGeometricType", "")).upper(), data.reshape(-1, 3), sop))
    rois = []
    for item in ds.get("StructureSetROISequence", []):
        number = int(item.ROINumber)
        name = str(item.get("ROIName", "") or f"ROI {number}").strip()
        rois.append(_Roi(number, name, tuple(contours_of.pop(number, []))))
    if contours_of:
        raise DicomLabelError(
            f"{path}: expected contours of the ROIs in StructureSetROISequence, found contours of ROI "
            f"{', '.join(str(n) for n in sorted(contours_of))} which it does not list"
        )
    return rois


def _rtstruct_references(ds: pydicom.Dataset) -> tuple[set[str], set[str], set[str]]:
    """(image SOPInstanceUIDs, series UIDs, frame-of-reference UIDs) a structure set names."""
    series = _rt_referenced_series(ds)
    sops = {str(i.ReferencedSOPInstanceUID) for s in series for i in s.get("ContourImageSequence", [])}
    for roi in ds.get("ROIContourSequence", []):
        for contour in roi.get("ContourSequence", []):
            sops.update(str(i.ReferencedSOPInstanceUID) for i in contour.get("ContourImageSequence", []))
    frames = {str(f.get("FrameOfReferenceUID") or "") for f in ds.get("ReferencedFrameOfReferenceSequence", [])}
    frames |= {str(r.get("ReferencedFrameOfReferenceUID") or "") for r in ds.get("StructureSetROISequence", [])}
    frames.discard("")
    return sops, {str(s.SeriesInstanceUID) for s in series if s.get("SeriesInstanceUID")}, frames


def _rasterize(path: Path, roi: _Roi, image: SeriesVolume, refs: _ImageRefs, tolerance_mm: float) -> np.ndarray:
    """The voxels inside the closed contours of ``roi``, XOR-combined per slice (inner contours are holes)."""
    from skimage.draw import polygon

    shape = image.data.shape[:3]
    to_voxel = np.linalg.inv(image.affine)
    slice_mm = float(np.linalg.norm(image.affine[:3, 2]))
    mask = np.zeros(shape, dtype=bool)
    skipped: dict[str, int] = {}
    for contour in roi.contours:
        if contour.kind not in FILLED_CONTOURS or len(contour.points_lps) < 3:
            skipped[contour.kind or "empty"] = skipped.get(contour.kind or "empty", 0) + 1
            continue
        ras = contour.points_lps * np.array([-1.0, -1.0, 1.0])
        voxels = ras @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        k = int(np.round(np.median(voxels[:, 2])))
        off_mm = float(np.max(np.abs(voxels[:, 2] - k)) * slice_mm)
        z = float(np.median(contour.points_lps[:, 2]))
        if off_mm > tolerance_mm:
            raise DicomLabelError(
                f"{path}: expected each contour of ROI '{roi.name}' on a slice plane of {image.name}, found one "
                f"(near z = {z:.2f} mm) {off_mm:.3f} mm off the plane of slice {k}"
            )
        if not 0 <= k < shape[2]:
            raise DicomLabelError(
                f"{path}: expected the contours of ROI '{roi.name}' within the {shape[2]} slices of {image.name}, "
                f"found one at slice index {k} (z = {z:.2f} mm)"
            )
        drawn_on = refs.slice_of_sop.get(contour.sop_uid) if contour.sop_uid else None
        if drawn_on is not None and drawn_on != k:
            raise DicomLabelError(
                f"{path}: expected each contour of ROI '{roi.name}' on the image it references, found one on slice {k} "
                f"that references the image of slice {drawn_on}"
            )
        rows, cols = polygon(voxels[:, 0], voxels[:, 1], shape=shape[:2])
        mask[rows, cols, k] ^= True
    for kind, count in skipped.items():
        log.warning(
            "%s: skipped %d %s contours of ROI '%s' (only closed planar contours enclose voxels)",
            path, count, kind, roi.name,
        )
    return mask


def read_rtstruct(
    path: Path, image: SeriesVolume, label_map: Mapping[int, str] | None = None, *, tolerance_mm: float = 0.1
) -> LabelVolume:
    """An RT Structure Set as a label volume on the grid of ``image``.

    Without ``label_map`` the n-th ROI of StructureSetROISequence has value n; with it, ROIs are
    matched by ROIName (case-insensitive) and an ROI the map does not name is refused. A voxel
    belongs to an ROI when its centre lies inside the ROI's contours on its slice (even-odd).
    Every contour must lie within ``tolerance_mm`` of a slice plane. A structure set without
    contours gives an empty label volume and a warning.
    """
    path = Path(path)
    ds = _read_dataset(path, (RTSTRUCT_STORAGE,), "RT structure set")
    refs = _image_refs(image)
    sops, series, frames = _rtstruct_references(ds)
    _check_references(
        path, "structure set", image, refs, sop_uids=sops, series_uids=series, frame_of_reference_uids=frames
    )
    rois = _rois(path, ds)
    values, names = _assign_values(
        path, [(i, roi.number, roi.name) for i, roi in enumerate(rois, start=1)], label_map, "ROI"
    )
    out = np.zeros(image.data.shape[:3], dtype=np.uint8)
    overwritten: dict[tuple[int, int], int] = {}
    for position, roi in sorted(enumerate(rois, start=1), key=lambda item: (values[item[0]], item[0])):
        if not roi.contours:
            log.warning("%s: ROI %d '%s' has no contours", path, roi.number, roi.name)
            continue
        _paint(out, _rasterize(path, roi, image, refs, tolerance_mm), values[position], overwritten)
    if not any(roi.contours for roi in rois):
        log.warning("%s: the structure set holds no contours (%d ROIs); its label volume is empty", path, len(rois))
    _report(path, out, names, overwritten)
    return LabelVolume(data=out, names=names, source=path)


def read_labels(
    path: Path, image: SeriesVolume, label_map: Mapping[int, str] | None = None, *, tolerance_mm: float = 0.1
) -> LabelVolume:
    """A SEG or RTSTRUCT file (told apart by its SOP class) as a label volume on the grid of ``image``."""
    path = Path(path)
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, EOFError) as err:
        raise DicomLabelError(
            f"{path}: expected a DICOM SEG or RTSTRUCT, cannot read it ({type(err).__name__}: {err})"
        ) from None
    sop_class = sop_class_uid(header)
    if sop_class in SEG_STORAGE:
        return read_seg(path, image, label_map, tolerance_mm=tolerance_mm)
    if sop_class == RTSTRUCT_STORAGE:
        return read_rtstruct(path, image, label_map, tolerance_mm=tolerance_mm)
    raise DicomLabelError(f"{path}: expected a DICOM SEG or RTSTRUCT, found SOP class {sop_class or 'none'}")
