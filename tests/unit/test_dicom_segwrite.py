"""Unit tests of medseg.dicom.segwrite: predictions written as DICOM-SEG and read back onto the source grid.

Every round trip is checked twice: with ``read_seg_labels`` (highdicom, by referenced SOP
instance) and with plain pydicom, decoding each frame and placing it by the
ReferencedSOPInstanceUID (and frame number) in its DerivationImageSequence, so a mistake
shared by the writer and highdicom's reader would still be caught.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import write_ct_slice
from pydicom.uid import SegmentationStorage, generate_uid

from medseg.dicom import SeriesVolume, read_series
from medseg.dicom.segwrite import read_seg_labels, write_seg
from medseg.errors import DataError, GeometryMismatchError, LabelValueError

CT_3SLICE = Path("dicom/dicom_seg/ct-3slice")
GE_SAGITTAL = Path("dicom/dicom2nifti/ge/anatomical/001")
MULTIFRAME = [Path("dicom/dicom2nifti/philips_enhanced/anatomical/001"), Path("dicom/dicom2nifti/siemens_multiframe/anatomical/001")]
NAMES = {1: "body", 2: "bone"}


# ---------------------------------------------------------------- helpers

# A synthetic CT series: 5 rows x 7 columns (35 bits a frame, so BINARY frames are not
# byte-aligned), 4 slices 2.5 mm apart, written under file names in shuffled order.
ROWS, COLS = 5, 7
Z_POSITIONS = (10.0, 12.5, 15.0, 17.5)


def _synthetic_series(folder: Path, seed: int = 0) -> dict[str, str]:
    """The series in ``folder`` (file names in shuffled slice order); returns its UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"series": generate_uid(), "study": generate_uid(), "frame": generate_uid()}
    order = list(range(len(Z_POSITIONS)))
    random.Random(seed).shuffle(order)
    if order == sorted(order):
        order.reverse()
    r, c = np.indices((ROWS, COLS))
    for name_index, k in enumerate(order):  # slice k at z = Z_POSITIONS[k], CT numbers rescaled by x - 1024
        write_ct_slice(
            folder / f"IM{name_index:04d}.dcm",
            (1000 + 100 * k + 10 * r + c).astype(np.uint16),
            position=(-20.0, 30.0, Z_POSITIONS[k]),
            series_uid=uids["series"],
            study_uid=uids["study"],
            frame_uid=uids["frame"],
            instance=k + 1,
            slice_thickness=2.5,
            rescale=(1, -1024),
        )
    return uids


def _synthetic_labels(shape: tuple[int, ...]) -> np.ndarray:
    """Labels 0, 1, 2 with no symmetry (a transposed or flipped read-back differs); slice 3 is empty."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, size=shape).astype(np.uint8)
    labels[:, :, 3] = 0
    return labels


def _decode_with_pydicom(seg_path: Path, image: SeriesVolume) -> np.ndarray:
    """The SEG's labels on ``image``'s grid, placed frame by frame through the references (pydicom only)."""
    ds = pydicom.dcmread(seg_path)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    slot = {(uid, n): k for k, (uid, n) in enumerate(zip(image.slice_uids, image.frame_numbers))}
    out = np.zeros(image.data.shape[:3], dtype=np.uint8)
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        number = int(source.ReferencedFrameNumber) if "ReferencedFrameNumber" in source else None
        k = slot[(source.ReferencedSOPInstanceUID, number)]
        plane = out[:, :, k]
        assert not np.any(plane[frame.T == 1]), "segments overlap"
        plane[frame.T == 1] = segment
    return out


def _threshold_labels(image: SeriesVolume, body: float, bone: float) -> np.ndarray:
    labels = np.zeros(image.data.shape[:3], dtype=np.uint8)
    labels[image.data > body] = 1
    labels[image.data > bone] = 2
    return labels


def _assert_round_trip(seg_path: Path, image: SeriesVolume, labels: np.ndarray) -> None:
    np.testing.assert_array_equal(read_seg_labels(seg_path, image), labels)
    np.testing.assert_array_equal(_decode_with_pydicom(seg_path, image), labels)


# ---------------------------------------------------------------- a synthetic series


def test_synthetic_round_trip_and_references(tmp_path: Path) -> None:
    uids = _synthetic_series(tmp_path / "series")
    image = read_series(tmp_path / "series")
    # The files were written out of slice order, so file order cannot stand in for slice order.
    assert [p.name for p in image.slice_files] != sorted(p.name for p in image.slice_files)
    labels = _synthetic_labels(image.data.shape[:3])
    assert image.data.shape == (COLS, ROWS, 4)

    out = write_seg(labels, image, tmp_path / "out" / "pred.dcm", names=NAMES)

    assert out == tmp_path / "out" / "pred.dcm"
    assert [p.name for p in out.parent.iterdir()] == ["pred.dcm"]  # no temporary file left
    _assert_round_trip(out, image, labels)
    ds = pydicom.dcmread(out)
    assert ds.StudyInstanceUID == uids["study"]
    assert ds.FrameOfReferenceUID == uids["frame"]
    assert ds.SeriesInstanceUID not in (uids["series"], uids["study"])
    assert [s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence] == [uids["series"]]
    referenced = {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(image.slice_uids)
    # Empty (slice, segment) pairs are omitted: slice 3 is empty, the others hold both classes.
    assert int(ds.NumberOfFrames) == 3 * 2
    # Each frame lies where the slice it references lies.
    position = {str(s.SOPInstanceUID): [float(x) for x in s.ImagePositionPatient]
                for s in map(pydicom.dcmread, image.slice_files)}
    for group in ds.PerFrameFunctionalGroupsSequence:
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_allclose([float(x) for x in group.PlanePositionSequence[0].ImagePositionPatient], position[uid])


def test_synthetic_segment_descriptions(tmp_path: Path) -> None:
    _synthetic_series(tmp_path / "series")
    image = read_series(tmp_path / "series")
    out = write_seg(_synthetic_labels(image.data.shape[:3]), image, tmp_path / "pred.dcm", names=NAMES,
                    algorithm="unet-test", version="9.9", description="test prediction")
    ds = pydicom.dcmread(out)
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [1, 2]
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["body", "bone"]
    for item in ds.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("unet-test", "9.9")
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "85756007")  # Tissue
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodingSchemeDesignator, kind.CodeValue) == ("SCT", "91723000")  # Anatomical structure
    assert ds.SeriesDescription == "test prediction"
    assert ds.ContentDescription == "test prediction"


def test_synthetic_copies_no_patient_data_it_was_not_given(tmp_path: Path) -> None:
    _synthetic_series(tmp_path / "series")  # the source carries a PatientID and nothing else about the patient
    image = read_series(tmp_path / "series")
    ds = pydicom.dcmread(write_seg(_synthetic_labels(image.data.shape[:3]), image, tmp_path / "p.dcm", names=NAMES))
    assert ds.PatientID == "synthetic"
    patient = {e.keyword for e in ds if e.tag.group == 0x0010 and e.value not in (None, "")}
    assert patient == {"PatientID"}
    for keyword in ("PatientName", "PatientBirthDate", "PatientSex"):
        assert ds[keyword].value in (None, "")  # Type 2: present and empty


def test_absent_class_is_a_segment_without_frames(tmp_path: Path) -> None:
    _synthetic_series(tmp_path / "series")
    image = read_series(tmp_path / "series")
    labels = _synthetic_labels(image.data.shape[:3])
    labels[labels == 2] = 0
    out = write_seg(labels, image, tmp_path / "pred.dcm", names={1: "body", 2: "bone", 3: "tumour"})
    ds = pydicom.dcmread(out)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["body", "bone", "tumour"]
    used = {int(g.SegmentIdentificationSequence[0].ReferencedSegmentNumber) for g in ds.PerFrameFunctionalGroupsSequence}
    assert used == {1}
    _assert_round_trip(out, image, labels)


def test_label_values_with_gaps_map_back_by_name(tmp_path: Path) -> None:
    _synthetic_series(tmp_path / "series")
    image = read_series(tmp_path / "series")
    labels = _synthetic_labels(image.data.shape[:3]) * 3  # values 0, 3, 6
    names = {0: "background", 3: "liver", 6: "tumour"}
    out = write_seg(labels, image, tmp_path / "pred.dcm", names=names)
    np.testing.assert_array_equal(read_seg_labels(out, image, names=names), labels)
    # Without names, segment numbers (1, 2) stand for the values.
    np.testing.assert_array_equal(read_seg_labels(out, image), labels // 3)


# ---------------------------------------------------------------- real series


def test_ct_3slice_threshold_round_trip(shared_data: Path, tmp_path: Path) -> None:
    image = read_series(shared_data / CT_3SLICE)
    assert image.data.shape == (512, 512, 3)
    labels = _threshold_labels(image, body=-500, bone=300)
    expected_counts = {1: int(np.sum((image.data > -500) & (image.data <= 300))), 2: int(np.sum(image.data > 300))}
    assert expected_counts == {1: 341887, 2: 10962}  # measured once; the thresholds give both classes

    started = time.perf_counter()
    out = write_seg(labels, image, tmp_path / "ct.dcm", names=NAMES)
    assert time.perf_counter() - started < 10

    back = read_seg_labels(out, image)
    assert back.dtype == np.uint8
    assert back.shape == image.data.shape
    np.testing.assert_array_equal(back, labels)
    assert {v: int(np.sum(back == v)) for v in (1, 2)} == expected_counts
    np.testing.assert_array_equal(_decode_with_pydicom(out, image), labels)
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    source = pydicom.dcmread(image.slice_files[0], stop_before_pixels=True)
    assert ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert [s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence] == [source.SeriesInstanceUID]


def test_sagittal_mr_round_trip(shared_data: Path, tmp_path: Path) -> None:
    image = read_series(shared_data / GE_SAGITTAL)
    normal = np.cross(*np.reshape(pydicom.dcmread(image.slice_files[0]).ImageOrientationPatient, (2, 3)))
    assert abs(normal[0]) > 0.99  # slices are sagittal: their normal runs left-right
    labels = _threshold_labels(image, *np.percentile(image.data, [60, 90]))
    assert set(np.unique(labels)) == {0, 1, 2}
    out = write_seg(labels, image, tmp_path / "mr.dcm", names=NAMES)
    _assert_round_trip(out, image, labels)
    # These anonymised files carry no FrameOfReferenceUID: the SEG gets one derived from the series.
    again = write_seg(labels, image, tmp_path / "mr2.dcm", names=NAMES)
    assert pydicom.dcmread(out).FrameOfReferenceUID == pydicom.dcmread(again).FrameOfReferenceUID


@pytest.mark.parametrize("rel", MULTIFRAME, ids=lambda p: p.parts[2])
def test_enhanced_multiframe_round_trip(shared_data: Path, tmp_path: Path, rel: Path) -> None:
    image = read_series(shared_data / rel)
    assert len(set(image.slice_files)) == 1 and None not in image.frame_numbers
    labels = _threshold_labels(image, *np.percentile(image.data, [60, 90]))
    out = write_seg(labels, image, tmp_path / "mf.dcm", names=NAMES)
    _assert_round_trip(out, image, labels)
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    sources = {s.ReferencedFrameNumber for g in ds.PerFrameFunctionalGroupsSequence
               for s in g.DerivationImageSequence[0].SourceImageSequence}
    assert sources <= set(image.frame_numbers)


# ---------------------------------------------------------------- bad input


def test_wrong_shape_is_refused_naming_the_series(tmp_path: Path) -> None:
    _synthetic_series(tmp_path / "series")
    image = read_series(tmp_path / "series")
    with pytest.raises(GeometryMismatchError, match=r"expected labels of shape \(7, 5, 4\), found \(5, 7, 4\)") as info:
        write_seg(np.zeros((ROWS, COLS, 4), np.uint8), image, tmp_path / "pred.dcm", names=NAMES)
    assert str(tmp_path / "series") in str(info.value)
    assert not (tmp_path / "pred.dcm").exists()


def test_label_value_not_in_names_is_refused(tmp_path: Path) -> None:
    _synthetic_series(tmp_path / "series")
    image = read_series(tmp_path / "series")
    labels = _synthetic_labels(image.data.shape[:3])
    labels[0, 0, 0] = 5
    with pytest.raises(LabelValueError, match=r"expected label values in \[0, 1, 2\] \(names\), found \[5\]") as info:
        write_seg(labels, image, tmp_path / "pred.dcm", names=NAMES)
    assert str(tmp_path / "series") in str(info.value)
    assert list(tmp_path.glob("*.dcm")) == []


def test_float_labels_and_empty_names_are_refused(tmp_path: Path) -> None:
    _synthetic_series(tmp_path / "series")
    image = read_series(tmp_path / "series")
    with pytest.raises(LabelValueError, match="expected integer labels, found dtype float32"):
        write_seg(np.zeros(image.data.shape, np.float32), image, tmp_path / "p.dcm", names=NAMES)
    with pytest.raises(LabelValueError, match="at least one non-zero label value"):
        write_seg(np.zeros(image.data.shape, np.uint8), image, tmp_path / "p.dcm", names={0: "background"})


def test_seg_of_another_series_is_refused(tmp_path: Path) -> None:
    _synthetic_series(tmp_path / "a")
    _synthetic_series(tmp_path / "b", seed=1)
    a, b = read_series(tmp_path / "a"), read_series(tmp_path / "b")
    out = write_seg(_synthetic_labels(a.data.shape[:3]), a, tmp_path / "a.dcm", names=NAMES)
    with pytest.raises(DataError, match="expected a SEG referencing the slices of") as info:
        read_seg_labels(out, b)
    assert str(out) in str(info.value)


# ---------------------------------------------------------------- a valid SEG file


def test_seg_file_is_valid(shared_data: Path, tmp_path: Path) -> None:
    image = read_series(shared_data / CT_3SLICE)
    out = write_seg(_threshold_labels(image, -500, 300), image, tmp_path / "ct.dcm", names=NAMES)
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == SegmentationStorage
    assert ds.file_meta.MediaStorageSOPClassUID == SegmentationStorage
    assert ds.Modality == "SEG"
    assert ds.SegmentationType == "BINARY"
    assert (int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)) == (512, 512, 1)
    seg = hd.seg.segread(out)
    assert seg.segment_numbers == [1, 2]
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == ["body", "bone"]
    assert seg.get_segment_description(1).algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC


# ---------------------------------------------------------------- conformance (dciodvfy)

DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.parametrize("rel", [CT_3SLICE, GE_SAGITTAL, *MULTIFRAME], ids=lambda p: "/".join(p.parts[2:4]))
def test_seg_passes_dciodvfy(shared_data: Path, tmp_path: Path, rel: Path) -> None:
    """David Clunie's DICOM validator finds no error in the SEG (warnings about the source's own
    values, such as a one-part PatientName, are the source's)."""
    if DCIODVFY is None:
        pytest.fail("dciodvfy not installed: install the Debian package dicom3tools (.ci/run does)")
    image = read_series(shared_data / rel)
    labels = (image.data > np.percentile(image.data, 70)).astype(np.uint8)
    out = write_seg(labels, image, tmp_path / "seg.dcm", names={1: "bright"})
    report = subprocess.run([DCIODVFY, str(out)], capture_output=True, text=True, timeout=60)
    lines = (report.stdout + report.stderr).splitlines()
    assert "Segmentation" in lines  # the IOD it recognised
    assert [line for line in lines if line.startswith("Error")] == []


def test_patient_age_copied_from_the_source_is_repaired_or_left_out() -> None:
    from medseg.dicom.segwrite import _repair_age

    image = SimpleNamespace(name="series 1")
    for given, kept in [("0Y", "000Y"), ("45Y", "045Y"), ("006M", "006M"), ("", None), ("forty", None)]:
        ds = pydicom.Dataset()
        if given:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # pydicom warns of the invalid ages we set
                ds.PatientAge = given
        _repair_age(ds, image)
        assert ds.get("PatientAge") == kept, given
