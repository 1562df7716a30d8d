"""Unit tests of medseg.dicom.labels: DICOM-SEG and RTSTRUCT read as label volumes on the grid of their series.

Real data (dicom/dicom_seg, dicom/rtstruct) is checked against independent answers: the NRRD
label maps stored beside the SEG files, highdicom's own decoding, the shoelace area of the
contours, the image intensities under the mask. Synthetic series and structure sets built in
tmp_path give exact voxel answers.
"""

from __future__ import annotations

import gzip
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import new_dicom_file, write_ct_slice
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, generate_uid

from medseg.dicom import SeriesVolume, read_series, scan
from medseg.dicom.labels import (
    LabelVolume,
    read_labels,
    read_rtstruct,
    read_seg,
    referenced_series_uid,
)
from medseg.dicom.sop import RTSTRUCT_STORAGE
from medseg.errors import ConfigError, DataError, DicomLabelError

SEG = Path("dicom/dicom_seg")
RT = Path("dicom/rtstruct")
LOGGER = "medseg.dicom.labels"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about an invalid UID in rt.dcm


# --- helpers ----------------------------------------------------------------------------------------


def read_nrrd(path: Path) -> np.ndarray:
    """A small 3D NRRD (raw or gzip, little-endian short) as an (x, y, z) array; checks its frame is LPS-aligned."""
    blob = path.read_bytes()
    end = blob.index(b"\n\n")
    fields = dict(line.split(": ", 1) for line in blob[:end].decode().splitlines()[1:] if ": " in line)
    assert fields["type"] == "short" and fields["endian"] == "little" and fields["dimension"] == "3"
    assert fields["space"] == "left-posterior-superior"
    vectors = re.findall(r"\(([^)]*)\)", fields["space directions"])
    directions = np.array([[float(v) for v in vector.split(",")] for vector in vectors])
    assert np.allclose(directions, np.diag(np.diag(directions))) and np.all(np.diag(directions) > 0)
    raw = blob[end + 2:]
    if fields["encoding"] == "gzip":
        raw = gzip.decompress(raw)
    sizes = [int(s) for s in fields["sizes"].split()]
    return np.frombuffer(raw, dtype="<i2").reshape(sizes[::-1]).transpose()  # first axis fastest


def counts(data: np.ndarray) -> dict[int, int]:
    values, n = np.unique(data, return_counts=True)
    return dict(zip(values.tolist(), n.tolist()))


def shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(x @ np.roll(y, -1) - y @ np.roll(x, -1)))


def perimeter(points: np.ndarray) -> float:
    return float(np.sum(np.linalg.norm(np.roll(points, -1, axis=0) - points, axis=1)))


def assert_refused(info: pytest.ExceptionInfo, path: Path) -> str:
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def ct3(shared_data: Path) -> SeriesVolume:
    return read_series(shared_data / SEG / "ct-3slice")


@pytest.fixture(scope="module")
def small(shared_data: Path) -> dict[str, SeriesVolume]:
    return {
        f"{grid}/{kind}": read_series(shared_data / SEG / grid / kind)
        for grid in ("23x38x3", "24x38x3")
        for kind in ("image", "multiframe")
    }


@pytest.fixture(scope="module")
def mock_ct(shared_data: Path) -> SeriesVolume:
    return read_series(shared_data / RT / "mock_data")


# --- references -------------------------------------------------------------------------------------


def test_referenced_series_uid_links_each_label_object_to_its_series(shared_data: Path) -> None:
    found = scan(shared_data / SEG)
    by_folder = {g.folder.relative_to(shared_data / SEG).as_posix(): g.series_uid for g in found.series}
    linked = {f.path.relative_to(shared_data / SEG).as_posix(): f.references for f in found.labels}
    assert linked == {
        "liver.dcm": by_folder["ct-3slice"],
        "partial_overlaps.dcm": by_folder["ct-3slice"],
        "23x38x3/seg/label.seg": by_folder["23x38x3/image"],
        "24x38x3/seg/label.seg": by_folder["24x38x3/image"],
        "sparse-labelmap-noppv.dcm": by_folder["24x38x3/image"],
        "sparse-labelmap-ppv5.dcm": by_folder["24x38x3/image"],
    }
    rt = scan(shared_data / RT / "mock_data")
    rt_links = {f.path.name: f.references for f in rt.labels}
    assert rt_links == {
        "rt.dcm": rt.series[0].series_uid,
        "invalid_reference_rt.dcm": rt.series[0].series_uid,  # the right series, but images it does not hold
        "non_existent_reference_rt.dcm": None,  # no RTReferencedStudySequence at all
    }


def test_referenced_series_uid_refuses_an_image_header(shared_data: Path) -> None:
    header = pydicom.dcmread(shared_data / SEG / "ct-3slice" / "01.dcm", stop_before_pixels=True)
    with pytest.raises(DicomLabelError, match="expected a SEG or RTSTRUCT"):
        referenced_series_uid(header)


# --- DICOM-SEG --------------------------------------------------------------------------------------


def test_liver_seg_matches_its_nrrd_and_highdicom_and_lies_in_the_liver(shared_data: Path, ct3: SeriesVolume) -> None:
    import highdicom

    label = read_seg(shared_data / SEG / "liver.dcm", ct3)
    assert isinstance(label, LabelVolume) and label.source == shared_data / SEG / "liver.dcm"
    assert label.data.dtype == np.uint8 and label.data.shape == ct3.data.shape == (512, 512, 3)
    assert label.names == {0: "background", 1: "Liver"}
    assert counts(label.data) == {0: 679334, 1: 107098}
    # Independent answers: highdicom's own decoding, and the label map the SEG was made from.
    assert int(highdicom.seg.segread(shared_data / SEG / "liver.dcm").get_volume().array.sum()) == 107098
    np.testing.assert_array_equal(label.data, read_nrrd(shared_data / SEG / "liver_seg.nrrd"))
    # The files are stored head first (01.dcm is the top slice); the volume runs foot to head.
    assert [p.name for p in ct3.slice_files] == ["03.dcm", "02.dcm", "01.dcm"]
    assert [int(label.data[..., k].sum()) for k in range(3)] == [
        int(np.sum(read_nrrd(shared_data / SEG / "liver_seg.nrrd")[..., k])) for k in range(3)
    ]
    # Under the mask: soft tissue (median 45 HU), hardly any air (132 voxels of 107098 below -500 HU, at the edge).
    hu = ct3.data[label.data == 1]
    assert 30 < np.median(hu) < 70
    assert np.mean(hu > -500) > 0.998
    assert np.median(ct3.data[label.data == 0]) < np.median(hu)


@pytest.mark.parametrize("grid, voxels", [("23x38x3", 322), ("24x38x3", 315)])
def test_small_grids_match_their_nrrd_on_classic_and_multiframe_images(
    shared_data: Path, small: dict[str, SeriesVolume], grid: str, voxels: int
) -> None:
    """23 columns: 874 pixels a frame, so the 1-bit frames do not start on byte boundaries."""
    expected = read_nrrd(shared_data / SEG / grid / "nrrd" / "label.nrrd")
    for kind in ("image", "multiframe"):
        image = small[f"{grid}/{kind}"]
        label = read_seg(shared_data / SEG / grid / "seg" / "label.seg", image)
        assert label.data.shape == image.data.shape == expected.shape
        assert label.names == {0: "background", 1: "Liver"}
        np.testing.assert_array_equal(label.data, expected)
        assert int(label.data.sum()) == voxels
    # The multi-frame image is another series: it is accepted because its frames name the classic images
    # they were converted from (ConversionSourceAttributesSequence), which the SEG references.
    assert small[f"{grid}/multiframe"].slice_uids[0] != small[f"{grid}/image"].slice_uids[0]


def test_seg_of_another_series_is_refused(shared_data: Path, ct3: SeriesVolume, small: dict[str, SeriesVolume]) -> None:
    path = shared_data / SEG / "liver.dcm"
    with pytest.raises(DicomLabelError) as info:
        read_seg(path, small["24x38x3/image"])
    message = assert_refused(info, path)
    assert "3 of its 3 referenced images not in that series" in message and "it references series" in message
    path = shared_data / SEG / "23x38x3" / "seg" / "label.seg"  # same geometry, other series
    with pytest.raises(DicomLabelError, match="not in that series"):
        read_seg(path, small["24x38x3/image"])
    with pytest.raises(DicomLabelError, match="not in that series"):
        read_seg(path, ct3)


def test_overlapping_segments_keep_the_higher_value_and_warn_with_counts(
    shared_data: Path, ct3: SeriesVolume, caplog: pytest.LogCaptureFixture
) -> None:
    path = shared_data / SEG / "partial_overlaps.dcm"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        label = read_seg(path, ct3)
    assert label.names == {0: "background", 1: "GREEN", 2: "ORANGE", 3: "PURPLE", 4: "LIGHT_BLUE", 5: "DARK_BLUE"}
    # The SEG was made from three label maps (1, 4, 5 in one; 2; 3): segments hold 9602, 11888, 10743, 6693, 4713.
    parts = [read_nrrd(shared_data / SEG / f"partial_overlaps-{i}.nrrd") for i in (1, 2, 3)]
    per_segment = [int(np.sum(np.any([p == v for p in parts], axis=0))) for v in range(1, 6)]
    assert per_segment == [9602, 11888, 10743, 6693, 4713]
    np.testing.assert_array_equal(label.data, np.maximum.reduce(parts))
    assert counts(label.data) == {0: 745927, 1: 6518, 2: 11838, 3: 10743, 4: 6693, 5: 4713}
    # Painted in increasing value, a voxel of several segments ends with the highest: value b takes from a
    # the voxels of b whose highest lower value is a (one voxel is in 1, 2 and 3: it counts for 1->2 and 2->3).
    masks = np.stack([np.any([p == v for p in parts], axis=0) for v in range(1, 6)])
    taken = {}
    for b in range(2, 6):
        below = np.max(masks[: b - 1] * np.arange(1, b)[:, None, None, None], axis=0)
        for a in range(1, b):
            if n := int(np.sum(masks[b - 1] & (below == a))):
                taken[(a, b)] = n
    assert taken == {(1, 2): 3017, (1, 3): 67, (2, 3): 50}
    assert int(np.sum(masks[0] & masks[2])) == 95  # 28 of the voxels of 1 and 3 are also 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    for (low, high), n in taken.items():
        assert any(f"{n} voxels of {low} " in w and f"keep the higher value, {high}" in w for w in warnings)


def test_label_map_matches_segment_labels_case_insensitively(shared_data: Path, ct3: SeriesVolume) -> None:
    path = shared_data / SEG / "partial_overlaps.dcm"
    label_map = {10: "green", 20: "Orange", 30: "purple", 40: "light_blue", 50: "Dark_Blue", 60: "spleen"}
    label = read_seg(path, ct3, label_map)
    assert label.names == {0: "background", **label_map}
    assert counts(label.data) == {0: 745927, 10: 6518, 20: 11838, 30: 10743, 40: 6693, 50: 4713}
    liver = read_seg(shared_data / SEG / "liver.dcm", ct3, {3: "LIVER"})
    assert counts(liver.data) == {0: 679334, 3: 107098} and liver.names == {0: "background", 3: "LIVER"}
    with pytest.raises(DicomLabelError) as info:
        read_seg(path, ct3, {1: "green", 2: "orange", 3: "purple", 4: "light_blue"})
    assert "segment 5 'DARK_BLUE'" in assert_refused(info, path)
    with pytest.raises(ConfigError, match="from 0 to 255"):
        read_seg(path, ct3, {300: "green"})


@pytest.mark.parametrize("name", ["sparse-labelmap-noppv.dcm", "sparse-labelmap-ppv5.dcm"])
def test_label_map_segmentation_with_a_missing_frame(
    shared_data: Path, small: dict[str, SeriesVolume], name: str
) -> None:
    """Label Map Segmentation SOP class: two frames (slices 0 and 2) of the 24x38x3 series; segment 0 is background."""
    image = small["24x38x3/image"]
    header = pydicom.dcmread(shared_data / SEG / name, stop_before_pixels=True)
    assert header.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
    label = read_seg(shared_data / SEG / name, image)
    assert label.names == {0: "background", 1: "Liver"}
    assert [int(label.data[..., k].sum()) for k in range(3)] == [315, 0, 315]
    expected = read_nrrd(shared_data / SEG / name.replace("-", "_").replace(".dcm", "_seg.nrrd"))
    # The ppv5 reference fills the missing frame with the padding value 5, which is no segment: it is background here.
    np.testing.assert_array_equal(label.data, expected == 1)
    # Its two frames repeat the one segmented slice of label.seg (the middle one) on the outer slices.
    binary = read_seg(shared_data / SEG / "24x38x3/seg/label.seg", image).data
    assert [int(binary[..., k].sum()) for k in range(3)] == [0, 315, 0]
    for k in (0, 2):
        np.testing.assert_array_equal(label.data[..., k], binary[..., 1])


def _shifted_seg(source: Path, dest: Path, shift_lps: tuple[float, float, float]) -> Path:
    ds = pydicom.dcmread(source)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        position = frame.PlanePositionSequence[0]
        position.ImagePositionPatient = [float(v) + d for v, d in zip(position.ImagePositionPatient, shift_lps)]
    ds.save_as(dest)
    return dest


def test_seg_frames_are_placed_by_geometry_and_refused_off_the_grid(
    shared_data: Path, ct3: SeriesVolume, tmp_path: Path
) -> None:
    source = shared_data / SEG / "liver.dcm"
    reference = read_seg(source, ct3).data
    spacing = 0.810547
    # One column to the patient's left (+x in LPS) is one step along i: the mask moves by one voxel.
    moved = read_seg(_shifted_seg(source, tmp_path / "left.dcm", (spacing, 0, 0)), ct3).data
    assert int(moved.sum()) == int(reference.sum()) == 107098
    np.testing.assert_array_equal(moved[1:], reference[:-1])
    refused = {
        (spacing / 2, 0, 0): "expected frames on the voxel grid",  # half a column off
        (0, 0, 0.5): "expected frames on the voxel grid",  # half a slice off
        (0, 0, 1.0): "expected segments inside the grid",  # one slice up: the top slice leaves the image
    }
    for n, (shift, problem) in enumerate(refused.items()):
        path = _shifted_seg(source, tmp_path / f"shifted{n}.dcm", shift)
        with pytest.raises(DicomLabelError) as info:
            read_seg(path, ct3)
        assert problem in assert_refused(info, path)


# --- RTSTRUCT: real data ----------------------------------------------------------------------------


def test_mock_rtstruct_fills_the_ring_between_its_two_contours(
    shared_data: Path, mock_ct: SeriesVolume, caplog: pytest.LogCaptureFixture
) -> None:
    path = shared_data / RT / "mock_data" / "rt.dcm"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        label = read_rtstruct(path, mock_ct)
    # rt-utils writes a new frame-of-reference UID into its structure sets; the series and images match.
    assert any("frame of reference" in r.getMessage() for r in caplog.records)
    assert label.data.shape == mock_ct.data.shape == (512, 512, 2)
    assert label.names == {0: "background", 1: "ROI-1"}
    assert [int(label.data[..., k].sum()) for k in range(2)] == [1443, 0]  # both contours lie at z = 60 (slice 0)
    # The outer square (24 mm) minus the inner octagon (a hole), in voxels of 0.488281 mm: 2415.9 - 941.6 = 1474.3.
    contours = pydicom.dcmread(path).ROIContourSequence[0].ContourSequence
    points = [np.asarray(c.ContourData, dtype=float).reshape(-1, 3)[:, :2] / 0.488281 for c in contours]
    area = shoelace(points[0]) - shoelace(points[1])
    assert area == pytest.approx(1474.3, abs=0.1)
    assert abs(1443 - area) < 0.25 * (perimeter(points[0]) + perimeter(points[1]))
    # The centre of the hole is empty; the ring is set. LPS (x, y) -> i = (x + 125) / 0.488281.
    def index(x: float, y: float) -> tuple[int, int, int]:
        return round((x + 125) / 0.488281), round((y + 125) / 0.488281), 0
    assert label.data[index(-39.5, -39.5)] == 0
    assert label.data[index(-49, -39.5)] == 1 and label.data[index(-29, -29)] == 1
    assert label.data[index(-55, -39.5)] == 0
    assert mock_ct.data[label.data == 1].min() > -500  # the phantom, not air


@pytest.mark.parametrize(
    "rel, problem",
    [
        ("mock_data/invalid_reference_rt.dcm", "3 of its 5 referenced images not in that series"),
        ("mock_data/non_existent_reference_rt.dcm", "1 of its 3 referenced images not in that series (first: "),
        # Not an empty structure set: the same bytes as invalid_reference_rt.dcm.
        ("empty/dummy_rt.dcm", "3 of its 5 referenced images not in that series"),
    ],
)
def test_rtstruct_with_references_outside_the_series_is_refused(
    shared_data: Path, mock_ct: SeriesVolume, rel: str, problem: str
) -> None:
    path = shared_data / RT / rel
    with pytest.raises(DicomLabelError) as info:
        read_rtstruct(path, mock_ct)
    message = assert_refused(info, path)
    assert problem in message and mock_ct.name in message
    if "non_existent" in rel:
        assert "it names no referenced series" in message


def test_read_labels_dispatches_on_the_sop_class(shared_data: Path, ct3: SeriesVolume, mock_ct: SeriesVolume) -> None:
    assert int(read_labels(shared_data / SEG / "liver.dcm", ct3).data.sum()) == 107098
    assert int(read_labels(shared_data / RT / "mock_data" / "rt.dcm", mock_ct).data.sum()) == 1443
    image_file = shared_data / SEG / "ct-3slice" / "01.dcm"
    ct_image = re.escape("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    with pytest.raises(DicomLabelError, match=f"expected a DICOM SEG or RTSTRUCT, found SOP class {ct_image}$"):
        read_labels(image_file, ct3)
    with pytest.raises(DicomLabelError, match="expected a DICOM RT structure set"):
        read_rtstruct(shared_data / SEG / "liver.dcm", ct3)
    assert issubclass(DicomLabelError, DataError)


# --- RTSTRUCT: synthetic ----------------------------------------------------------------------------

ROWS, COLS = 8, 10
ORIGIN_XY = (-20.0, 30.0)
SPACING = (0.5, 0.7)  # PixelSpacing: between rows, between columns
Z_POSITIONS = (10.0, 12.5, 15.0)


def _synthetic_ct(folder: Path) -> tuple[SeriesVolume, dict[str, str], list[str]]:
    folder.mkdir(parents=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    sops = [
        write_ct_slice(
            folder / f"IM{2 - k}.dcm",
            np.full((ROWS, COLS), 1000 + k, dtype=np.uint16),
            position=(ORIGIN_XY[0], ORIGIN_XY[1], Z_POSITIONS[k]),
            spacing=SPACING,
            series_uid=uids["series"],
            study_uid=uids["study"],
            frame_uid=uids["frame"],
            instance=k + 1,
            slice_thickness=2.5,
        )
        for k in range(len(Z_POSITIONS))
    ]
    return read_series(folder), uids, sops


def _item(**values: object) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def _write_rtstruct(
    path: Path, uids: dict[str, str], image_sops: list[str], rois: dict[str, list[tuple[np.ndarray, str | None]]]
) -> Path:
    """A structure set on the series ``uids``; ``rois``: name -> contours as ((n, 3) LPS mm points, image SOP)."""
    ds = new_dicom_file(path, RTSTRUCT_STORAGE)
    ds.Modality, ds.PatientID = "RTSTRUCT", "synthetic"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], generate_uid()
    images = [_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=uid) for uid in image_sops]
    series = _item(SeriesInstanceUID=uids["series"], ContourImageSequence=Sequence(images))
    study = _item(ReferencedSOPInstanceUID=uids["study"], RTReferencedSeriesSequence=Sequence([series]))
    ds.ReferencedFrameOfReferenceSequence = Sequence(
        [_item(FrameOfReferenceUID=uids.get("frame", ""), RTReferencedStudySequence=Sequence([study]))]
    )
    ds.StructureSetROISequence = Sequence(
        [_item(ROINumber=10 * (n + 1), ROIName=name) for n, name in enumerate(rois)]
    )
    contours = []
    for n, contour_list in enumerate(rois.values()):
        items = []
        for points, sop in contour_list:
            item = _item(ContourGeometricType="CLOSED_PLANAR", NumberOfContourPoints=len(points),
                         ContourData=[f"{v:.6f}" for v in np.asarray(points, dtype=float).ravel()])
            if sop:
                reference = _item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=sop)
                item.ContourImageSequence = Sequence([reference])
            items.append(item)
        roi = _item(ReferencedROINumber=10 * (n + 1))
        if items:
            roi.ContourSequence = Sequence(items)
        contours.append(roi)
    ds.ROIContourSequence = Sequence(contours)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _rectangle(i0: float, i1: float, j0: float, j1: float, z: float) -> np.ndarray:
    """A rectangle in LPS mm between column positions i0..i1 and row positions j0..j1 of the synthetic grid."""
    xs = [ORIGIN_XY[0] + SPACING[1] * i for i in (i0, i1, i1, i0)]
    ys = [ORIGIN_XY[1] + SPACING[0] * j for j in (j0, j0, j1, j1)]
    return np.column_stack([xs, ys, [z] * 4])


def test_synthetic_square_on_slice_1_sets_exactly_its_voxels(tmp_path: Path) -> None:
    image, uids, sops = _synthetic_ct(tmp_path / "ct")
    assert image.data.shape == (COLS, ROWS, 3) and image.slice_uids == tuple(sops)
    # Voxel centres i = 2..5, j = 3..6 lie inside the square from 1.5 to 5.5 and 2.5 to 6.5 (no centre on its edge).
    square = _rectangle(1.5, 5.5, 2.5, 6.5, Z_POSITIONS[1])
    path = _write_rtstruct(tmp_path / "rt.dcm", uids, sops, {"Tumour": [(square, sops[1])]})
    label = read_rtstruct(path, image)
    expected = np.zeros((COLS, ROWS, 3), dtype=np.uint8)
    expected[2:6, 3:7, 1] = 1
    np.testing.assert_array_equal(label.data, expected)
    assert label.names == {0: "background", 1: "Tumour"} and label.source == path
    assert int(label.data.sum()) == shoelace(square[:, :2] / [SPACING[1], SPACING[0]]) == 16
    assert np.all(image.data[label.data == 1] == 1001)  # slice 1 (z = 12.5) holds 1000 + 1
    assert int(read_rtstruct(path, image, {7: "TUMOUR"}).data.sum()) == 7 * 16


def test_synthetic_inner_contour_is_a_hole_and_overlaps_keep_the_higher_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image, uids, sops = _synthetic_ct(tmp_path / "ct")
    z = Z_POSITIONS[1]
    rois = {
        "ring": [(_rectangle(1.5, 5.5, 2.5, 6.5, z), sops[1]), (_rectangle(2.5, 4.5, 3.5, 5.5, z), sops[1])],
        "bar": [(_rectangle(4.5, 7.5, 0.5, 7.5, z), sops[1])],  # i = 5..7, j = 1..7
    }
    path = _write_rtstruct(tmp_path / "rt.dcm", uids, sops, rois)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        label = read_rtstruct(path, image)
    expected = np.zeros((COLS, ROWS, 3), dtype=np.uint8)
    expected[2:6, 3:7, 1] = 1
    expected[3:5, 4:6, 1] = 0  # the hole: 16 - 4 = 12 voxels of the ring
    expected[5:8, 1:8, 1] = 2  # the bar wins where it covers the ring (i = 5, j = 3..6: 4 voxels)
    np.testing.assert_array_equal(label.data, expected)
    assert counts(label.data) == {0: 3 * COLS * ROWS - 8 - 21, 1: 8, 2: 21}
    assert label.names == {0: "background", 1: "ring", 2: "bar"}
    assert any("4 voxels of 1 'ring' are also 2 'bar'" in r.getMessage() for r in caplog.records)
    # With a label map the lower value is the bar, so the ring wins where they overlap.
    swapped = read_rtstruct(path, image, {5: "Bar", 9: "Ring"})
    assert counts(swapped.data) == {0: 3 * COLS * ROWS - 12 - 17, 5: 17, 9: 12}
    with pytest.raises(DicomLabelError, match="found ROI 20 'bar'"):
        read_rtstruct(path, image, {1: "ring"})


@pytest.mark.parametrize(
    "z, sop_slice, problem",
    [
        (13.5, 1, "1.000 mm off the plane of slice 1"),  # 1 mm above slice 1 (0.4 of the 2.5 mm spacing)
        (20.0, None, "found one at slice index 4"),  # beyond the last slice
        (12.5, 0, "found one on slice 1 that references the image of slice 0"),
    ],
)
def test_synthetic_contours_off_the_slices_are_refused(
    tmp_path: Path, z: float, sop_slice: int | None, problem: str
) -> None:
    image, uids, sops = _synthetic_ct(tmp_path / "ct")
    contour = _rectangle(1.5, 5.5, 2.5, 6.5, z)
    sop = None if sop_slice is None else sops[sop_slice]
    path = _write_rtstruct(tmp_path / "rt.dcm", uids, sops, {"Tumour": [(contour, sop)]})
    with pytest.raises(DicomLabelError) as info:
        read_rtstruct(path, image)
    assert problem in assert_refused(info, path)


def test_synthetic_tilted_contour_is_refused(tmp_path: Path) -> None:
    image, uids, sops = _synthetic_ct(tmp_path / "ct")
    contour = _rectangle(1.5, 5.5, 2.5, 6.5, Z_POSITIONS[1])
    contour[2:, 2] += 1.0  # two corners 1 mm above the plane
    path = _write_rtstruct(tmp_path / "rt.dcm", uids, sops, {"Tumour": [(contour, None)]})
    with pytest.raises(DicomLabelError, match="off the plane of slice"):
        read_rtstruct(path, image)


def test_synthetic_empty_structure_set_gives_an_empty_volume_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image, uids, sops = _synthetic_ct(tmp_path / "ct")
    path = _write_rtstruct(tmp_path / "rt.dcm", uids, sops, {"Nothing": []})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        label = read_rtstruct(path, image)
    assert label.data.shape == (COLS, ROWS, 3) and not label.data.any()
    assert label.names == {0: "background", 1: "Nothing"}
    assert any("holds no contours" in r.getMessage() for r in caplog.records)


def test_synthetic_structure_set_of_another_series_is_refused(tmp_path: Path) -> None:
    image, uids, sops = _synthetic_ct(tmp_path / "ct")
    other, other_uids, other_sops = _synthetic_ct(tmp_path / "other")
    square = _rectangle(1.5, 5.5, 2.5, 6.5, Z_POSITIONS[1])
    path = _write_rtstruct(tmp_path / "rt.dcm", other_uids, other_sops, {"Tumour": [(square, other_sops[1])]})
    with pytest.raises(DicomLabelError) as info:
        read_rtstruct(path, image)
    assert "3 of its 3 referenced images not in that series" in str(info.value)
    message = assert_refused(info, path)
    assert f"it references series {other_uids['series']}, the image is series {uids['series']}" in message
    assert int(read_rtstruct(path, other).data.sum()) == 16


@pytest.mark.parametrize("folder, file", [("oriented_data", "1.dcm"), ("one_slice_data", "0.dcm")])
def test_contour_on_an_oblique_series_lands_on_the_pixels_it_was_drawn_on(
    shared_data: Path, tmp_path: Path, folder: str, file: str
) -> None:
    """The contour is built from the image's own DICOM tags (not from the volume's affine): pixel centres
    columns 3..6 and rows 10..14 of the slice in ``file``, with an oblique ImageOrientationPatient."""
    image = read_series(shared_data / RT / folder)
    ds = pydicom.dcmread(shared_data / RT / folder / file, stop_before_pixels=True)
    position = np.asarray(ds.ImagePositionPatient, dtype=float)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    corners = [(2.5, 9.5), (6.5, 9.5), (6.5, 14.5), (2.5, 14.5)]  # (column, row)
    contour = np.array([position + c * col_spacing * row_dir + r * row_spacing * col_dir for c, r in corners])
    uids = {"study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID)}
    rois = {"box": [(contour, str(ds.SOPInstanceUID))]}
    path = _write_rtstruct(tmp_path / "rt.dcm", uids, list(image.slice_uids), rois)
    label = read_rtstruct(path, image)
    k = image.slice_uids.index(str(ds.SOPInstanceUID))
    expected = np.zeros(image.data.shape[:3], dtype=np.uint8)
    expected[3:7, 10:15, k] = 1
    np.testing.assert_array_equal(label.data, expected)
    assert image.data.shape[:2] == (int(ds.Columns), int(ds.Rows))


def test_seg_is_tied_to_its_series_by_references_not_by_path(
    shared_data: Path, ct3: SeriesVolume, tmp_path: Path
) -> None:
    """A SEG outside the series folder, renamed, still reads (references, not paths, tie it to the series)."""
    copy = tmp_path / "renamed.seg"
    shutil.copy(shared_data / SEG / "liver.dcm", copy)
    label = read_seg(copy, ct3)
    assert label.source == copy and int(label.data.sum()) == 107098


def test_fractional_seg_written_by_highdicom_is_thresholded_at_one_half(
    shared_data: Path, small: dict[str, SeriesVolume], tmp_path: Path
) -> None:
    """A FRACTIONAL SEG made here with highdicom (which omits the empty frame of slice 1): values 0.25 and 0.75."""
    import highdicom
    from highdicom.sr.coding import CodedConcept

    image = small["23x38x3/image"]
    sources = [pydicom.dcmread(p) for p in image.slice_files]  # volume order: slice k is sources[k]
    rng = np.random.default_rng(0)
    fractions = np.zeros((3, 38, 23), dtype=np.float32)  # (frame, row, column)
    fractions[0] = rng.choice([0.0, 0.25, 0.75, 1.0], size=(38, 23))
    fractions[2, 5:9, 2:4] = 0.75
    tissue = CodedConcept("85756007", "SCT", "Tissue")
    description = highdicom.seg.SegmentDescription(
        segment_number=1, segment_label="Lesion", segmented_property_category=tissue,
        segmented_property_type=tissue, algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = highdicom.seg.Segmentation(
        source_images=sources, pixel_array=fractions, segmentation_type=highdicom.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[description], series_instance_uid=generate_uid(), series_number=99,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="medseg tests",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0",
    )
    assert seg.NumberOfFrames == 2
    path = tmp_path / "fractional.dcm"
    seg.save_as(path)
    label = read_seg(path, image)
    expected = (fractions >= 0.5).transpose(2, 1, 0).astype(np.uint8)  # -> (column, row, slice)
    np.testing.assert_array_equal(label.data, expected)
    assert int(label.data.sum()) == int(np.sum(fractions >= 0.5)) == int(np.sum(fractions[0] >= 0.5)) + 8
    assert label.names == {0: "background", 1: "Lesion"}
