"""Predictions as DICOM-SEG objects that reference their source series, and read back onto its grid.

``write_seg`` turns a label volume on the voxel grid of a ``SeriesVolume`` into a BINARY
Segmentation (highdicom): one frame per source slice and segment, each frame referencing the
SOP instance (and frame, for an enhanced multi-frame source) it was derived from, so the SEG
attaches to the source series and study in any viewer. ``read_seg_labels`` reads a SEG back
through those references, independently of the order the frames were written in.

Segments are numbered 1..n over the non-zero label values of ``names`` in ascending order.
When those values are 1..n (the usual case) the segment number is the label value; otherwise
``read_seg_labels`` needs ``names`` to map each segment back to its value by its label.
A value declared in ``names`` but absent from the prediction is written as a segment with no
frames. Only what highdicom copies from the source for a derived object of the same study
(Patient, General Study, Patient Study and Clinical Trial modules, equipment) is carried over.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import medseg
from medseg.dicom.volume import SeriesVolume
from medseg.errors import DataError, GeometryMismatchError, LabelValueError
from medseg.io import atomic_path

log = logging.getLogger(__name__)

SEG_SERIES_NUMBER = 9000
# CID 7150 "Tissue" / CID 7151-compatible "Anatomical Structure": neutral codes for any class.
PROPERTY_CATEGORY = codes.SCT.Tissue
PROPERTY_TYPE = codes.SCT.AnatomicalStructure
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence
MAX_LABEL_CHARS = 64  # SegmentLabel is LO
# Patient and General Study attributes (Type 2) that highdicom reads from the source; a source
# without them gets them empty (in memory only), which is what the standard asks of the SEG.
TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)


def write_seg(
    labels: np.ndarray,
    image: SeriesVolume,
    out_path: Path,
    *,
    names: Mapping[int, str],
    algorithm: str = "medseg",
    version: str = medseg.__version__,
    description: str = "medseg prediction",
) -> Path:
    """Write ``labels`` as a DICOM-SEG of the series ``image`` was read from; return ``out_path``.

    ``labels`` (integer, shape ``image.data.shape[:3]``) is indexed (column, row, slice) like
    ``image.data``. ``names`` maps each non-zero label value to its segment label (0 is
    background and skipped). The file is written atomically.
    """
    out_path = Path(out_path)
    started = time.perf_counter()
    names = _check_names(names, image)
    values = sorted(names)
    numbers = _segment_numbers(labels, image, values)
    sources = _read_sources(image)
    frames = _frames_for_sources(numbers, image, sources)
    absent = [value for n, value in enumerate(values, start=1) if not np.any(frames == n)]
    if absent:
        log.info("%s: label values %s are absent from the prediction; their segments have no frames", image.name, absent)
    descriptions = [
        _segment_description(n, names[value], algorithm, version) for n, value in enumerate(values, start=1)
    ]
    seg = _build_segmentation(sources, frames, descriptions, image, algorithm, version, description)
    _repair_age(seg, image)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    log.info(
        "%s: wrote %s (%d segments, %d frames) in %.2f s",
        image.name, out_path, len(values), int(seg.NumberOfFrames), time.perf_counter() - started,
    )
    return out_path


def read_seg_labels(path: Path, image: SeriesVolume, *, names: Mapping[int, str] | None = None) -> np.ndarray:
    """The labels of the SEG at ``path`` on the grid of ``image`` (uint8, ``image.data.shape[:3]``).

    Frames are placed by the SOP instance (and frame) they reference, not by their order in
    the file. Segment numbers are the label values unless ``names`` is given, in which case
    each segment's label is looked up in ``names``.
    """
    path = Path(path)
    seg = _read_seg(path)
    _check_references(seg, image, path)
    mapping = _segment_values(seg, names, path)
    frame_numbers = image.frame_numbers
    try:
        if frame_numbers[0] is None:
            planes = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=list(image.slice_uids),
                combine_segments=True,
                assert_missing_frames_are_empty=True,
                dtype=np.uint16,
            )
        else:
            planes = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=image.slice_uids[0],
                source_frame_numbers=[int(n) for n in frame_numbers],
                combine_segments=True,
                assert_missing_frames_are_empty=True,
                dtype=np.uint16,
            )
    except (ValueError, RuntimeError, KeyError, AttributeError) as err:
        raise DataError(f"{path}: expected a SEG that maps onto {image.name}, highdicom refused it: {err}") from None
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for number, value in mapping.items():
        lut[number] = value
    if planes.max(initial=0) >= len(lut):
        raise DataError(f"{path}: expected segment numbers up to {len(lut) - 1}, found {int(planes.max())}")
    return np.ascontiguousarray(lut[planes].transpose(2, 1, 0))


# ---------------------------------------------------------------- writing


def _check_names(names: Mapping[int, str], image: SeriesVolume) -> dict[int, str]:
    """The non-zero label values of ``names`` (1..255) with their segment labels."""
    try:
        checked = {int(value): label for value, label in names.items() if int(value) != 0}
    except (TypeError, ValueError):
        raise LabelValueError(f"{image.name}: expected integer label values in names, found {list(names)}") from None
    if not checked:
        raise LabelValueError(f"{image.name}: expected at least one non-zero label value in names, found {dict(names)}")
    if min(checked) < 0 or max(checked) > 255:
        raise LabelValueError(f"{image.name}: expected label values 1..255 in names, found {sorted(checked)}")
    for value, label in checked.items():
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL_CHARS:
            raise LabelValueError(
                f"{image.name}: expected a name of 1..{MAX_LABEL_CHARS} characters for label {value}, found {label!r}"
            )
    return checked


def _segment_numbers(labels: np.ndarray, image: SeriesVolume, values: Sequence[int]) -> np.ndarray:
    """``labels`` checked against ``image`` and ``values``, with each value replaced by its segment number (uint8)."""
    labels = np.asarray(labels)
    shape = tuple(image.data.shape[:3])
    if labels.shape != shape:
        raise GeometryMismatchError(f"{image.name}: expected labels of shape {shape}, found {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise LabelValueError(f"{image.name}: expected integer labels, found dtype {labels.dtype}")
    if image.tilt_resampled:
        raise DataError(
            f"{image.name}: expected a series on its acquired grid, found one resampled for gantry tilt "
            f"(a SEG must match its source slices pixel for pixel)"
        )
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0 or hi > 255:
        raise LabelValueError(f"{image.name}: expected label values in {[0, *values]} (names), found {lo}..{hi}")
    small = labels.astype(np.uint8, copy=False)
    lut = np.zeros(256, dtype=np.uint8)
    lut[list(values)] = np.arange(1, len(values) + 1)
    declared = np.zeros(256, dtype=bool)
    declared[[0, *values]] = True
    undeclared = ~declared[small]
    if undeclared.any():
        found = np.unique(small[undeclared]).tolist()
        raise LabelValueError(f"{image.name}: expected label values in {[0, *values]} (names), found {found} in the labels")
    return lut[small]


def _read_sources(image: SeriesVolume) -> list[Dataset]:
    """The source datasets in highdicom's order: one per slice, or the one enhanced multi-frame object."""
    frame_numbers = image.frame_numbers
    multiframe = [n is not None for n in frame_numbers]
    if any(multiframe) and not all(multiframe):
        raise DataError(f"{image.name}: expected slices all single-frame or all from one multi-frame object, found both")
    if all(multiframe):
        files = sorted(set(image.slice_files))
        if len(files) != 1:
            raise DataError(
                f"{image.name}: expected the slices of one multi-frame object (highdicom takes one enhanced "
                f"source), found {len(files)} files: {files[0]}, {files[1]}"
            )
        sources = [_share_frame_geometry(_read_header(files[0]), image)]
    else:
        sources = [_read_header(path) for path in image.slice_files]
    _give_frame_of_reference(sources, image)
    if len(sources) > 1 or image.frame_numbers[0] is None:
        _give_slice_thickness(sources, image)
        _share_orientation(sources, image)
    return sources


def _share_orientation(sources: Sequence[Dataset], image: SeriesVolume) -> None:
    """Give every source the first one's ImageOrientationPatient when they agree within 1e-4, in memory.

    highdicom compares the orientations as written; a series read as one volume may spell them
    slightly differently from slice to slice.
    """
    first = sources[0].ImageOrientationPatient
    for ds in sources[1:]:
        if ds.ImageOrientationPatient == first:
            continue
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), np.asarray(first, dtype=float), atol=1e-4):
            raise DataError(f"{image.name}: expected one slice orientation, {ds.filename} differs from {sources[0].filename}")
        ds.ImageOrientationPatient = first


def _share_frame_geometry(source: Dataset, image: SeriesVolume) -> Dataset:
    """Copy a pixel spacing and orientation that every frame repeats into the shared functional group, in memory.

    highdicom reads them from the shared group only; enhanced objects may state them per frame instead.
    """
    if "SharedFunctionalGroupsSequence" not in source or not source.SharedFunctionalGroupsSequence:
        source.SharedFunctionalGroupsSequence = [Dataset()]
    shared = source.SharedFunctionalGroupsSequence[0]
    per_frame = source.get("PerFrameFunctionalGroupsSequence") or []
    for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if keyword in shared:
            continue
        items = [group[keyword][0] for group in per_frame if keyword in group]
        if not items or len(items) != len(per_frame):
            raise DataError(
                f"{image.slice_files[0]}: expected {keyword} in the shared or every per-frame functional group, "
                f"found it in {len(items)} of {len(per_frame)} frames"
            )
        if not all(_same_geometry(items[0], item) for item in items[1:]):
            raise DataError(f"{image.slice_files[0]}: expected one {keyword} for all frames, found several")
        setattr(shared, keyword, [items[0]])
    return source


def _same_geometry(a: Dataset, b: Dataset) -> bool:
    """Two PixelMeasures or PlaneOrientation items agree (numbers within 1e-4)."""
    for keyword in ("PixelSpacing", "ImageOrientationPatient", "SliceThickness"):
        if (keyword in a) != (keyword in b):
            return False
        if keyword in a and not np.allclose(np.atleast_1d(np.asarray(a[keyword].value, dtype=float)),
                                            np.atleast_1d(np.asarray(b[keyword].value, dtype=float)), atol=1e-4):
            return False
    return True


def _give_frame_of_reference(sources: Sequence[Dataset], image: SeriesVolume) -> None:
    """Give sources without a FrameOfReferenceUID (anonymised files) one derived from their series, in memory.

    A SEG of a volume needs a frame of reference; the one given is the same for every SEG of
    the series (derived from its Study and Series Instance UIDs), and the frames still
    reference their source instances one by one.
    """
    have = {ds.get("FrameOfReferenceUID") for ds in sources}
    if have != {None}:
        return
    first = sources[0]
    uid = generate_uid(entropy_srcs=["medseg frame of reference", str(first.StudyInstanceUID), str(first.SeriesInstanceUID)])
    log.warning("%s: the source images have no FrameOfReferenceUID; the SEG uses %s, derived from the series", image.name, uid)
    for ds in sources:
        ds.FrameOfReferenceUID = uid


def _read_header(path: Path) -> Dataset:
    """The header of one source file, with the empty Type 2 attributes highdicom reads filled in."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # pydicom raises many kinds for damaged files
        raise DataError(f"{path}: expected a readable DICOM source image, found {type(err).__name__}: {err}") from None
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")  # empty, as the standard allows: nothing is added
    sex = str(ds.PatientSex or "").strip().upper()
    if sex not in ("M", "F", "O", ""):
        log.info("%s: PatientSex %r is not M, F or O; the SEG leaves it empty", path, ds.PatientSex)
        sex = ""
    ds.PatientSex = sex
    return ds


def _give_slice_thickness(sources: Sequence[Dataset], image: SeriesVolume) -> None:
    """Give single-frame sources without a SliceThickness (Type 2, often stripped) the slice spacing, in memory."""
    missing = [ds for ds in sources if ds.get("SliceThickness") in (None, "")]
    if not missing:
        return
    step_mm = float(np.linalg.norm(image.affine[:3, 2]))
    log.warning("%s: %d source images have no SliceThickness; the SEG states the slice spacing, %.4g mm",
                image.name, len(missing), step_mm)
    for ds in missing:
        ds.SliceThickness = f"{step_mm:.6g}"


def _frames_for_sources(labels: np.ndarray, image: SeriesVolume, sources: Sequence[Dataset]) -> np.ndarray:
    """The labels as (frames, rows, columns), frame i matching source image (or source frame) i."""
    planes = labels.transpose(2, 1, 0)  # (slice, row, column)
    if len(sources) > 1 or image.frame_numbers[0] is None:
        return np.ascontiguousarray(planes)
    source = sources[0]
    n_frames = int(source.get("NumberOfFrames", 1))
    frames = np.zeros((n_frames, *planes.shape[1:]), dtype=planes.dtype)
    for k, number in enumerate(image.frame_numbers):
        if not 1 <= int(number) <= n_frames:
            raise DataError(f"{image.slice_files[k]}: expected frame numbers 1..{n_frames}, found {number}")
        frames[int(number) - 1] = planes[k]
    return frames


def _segment_description(number: int, label: str, algorithm: str, version: str) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=PROPERTY_CATEGORY,
        segmented_property_type=PROPERTY_TYPE,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm, family=ALGORITHM_FAMILY, version=version
        ),
    )


def _build_segmentation(
    sources: Sequence[Dataset],
    frames: np.ndarray,
    descriptions: Sequence[hd.seg.SegmentDescription],
    image: SeriesVolume,
    algorithm: str,
    version: str,
    description: str,
) -> hd.seg.Segmentation:
    """The highdicom Segmentation; highdicom's refusals become a ``DataError`` naming the series."""
    try:
        with warnings.catch_warnings():
            # The source's PatientName is copied as it is; a one-part name is not ours to fix.
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            return hd.seg.Segmentation(
                source_images=list(sources),
                pixel_array=frames,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=list(descriptions),
                series_instance_uid=hd.UID(),
                series_number=SEG_SERIES_NUMBER,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="medseg",
                manufacturer_model_name=algorithm,
                software_versions=version,
                device_serial_number="none",
                series_description=description[:64],
                content_description=description[:64],
                omit_empty_frames=True,
                specific_character_set=_character_set(sources[0]),
            )
    except (ValueError, TypeError, AttributeError) as err:
        raise DataError(
            f"{image.name}: expected source images highdicom can derive a SEG from ({image.slice_files[0]}), "
            f"found: {err}"
        ) from None


def _repair_age(seg: Dataset, image: SeriesVolume) -> None:
    """PatientAge, copied from the source, in the form its VR (AS) requires: three digits and D, W,
    M or Y. A short number is padded ("0Y" -> "000Y"); anything else is left out, with a warning."""
    age = str(seg.get("PatientAge") or "")
    if not age or re.fullmatch(r"\d{3}[DWMY]", age):
        return
    if re.fullmatch(r"\d{1,2}[DWMY]", age):
        seg.PatientAge = age[:-1].zfill(3) + age[-1]
    else:
        log.warning("%s: left the source's PatientAge out of the SEG: not an age string (nnnD/W/M/Y)", image.name)
        del seg.PatientAge


def _character_set(source: Dataset) -> str | list[str] | None:
    """The source's SpecificCharacterSet for the SEG; None for the default repertoire (empty or absent)."""
    value = source.get("SpecificCharacterSet")
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    values = list(value)
    return values if any(values) else None


# ---------------------------------------------------------------- reading


def _read_seg(path: Path) -> hd.seg.Segmentation:
    if not path.exists():
        raise DataError(f"file not found: {path}")
    try:
        return hd.seg.segread(path)
    except Exception as err:  # pydicom and highdicom raise many kinds for a file that is not a SEG
        raise DataError(f"{path}: expected a DICOM Segmentation, found {type(err).__name__}: {err}") from None


def _check_references(seg: hd.seg.Segmentation, image: SeriesVolume, path: Path) -> None:
    """Refuse a SEG that references none of the slices of ``image``."""
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.get("ReferencedSeriesSequence", [])
        for item in series.get("ReferencedInstanceSequence", [])
    }
    if not referenced & set(image.slice_uids):
        raise DataError(
            f"{path}: expected a SEG referencing the slices of {image.name}, found none of its "
            f"{len(set(image.slice_uids))} SOP instances among its {len(referenced)} references"
        )


def _segment_values(seg: hd.seg.Segmentation, names: Mapping[int, str] | None, path: Path) -> dict[int, int]:
    """Segment number -> label value: the number itself, or the value ``names`` gives the segment's label."""
    numbers = [int(n) for n in seg.segment_numbers]
    if names is None:
        if max(numbers) > 255:
            raise DataError(f"{path}: expected segment numbers up to 255 for uint8 labels, found {max(numbers)}")
        return {n: n for n in numbers}
    by_name = {label: int(value) for value, label in names.items() if int(value) != 0}
    mapping = {}
    for n in numbers:
        label = seg.get_segment_description(n).SegmentLabel
        if label not in by_name:
            raise LabelValueError(f"{path}: expected segment labels among {sorted(by_name)}, found {label!r} (segment {n})")
        mapping[n] = by_name[label]
    return mapping
