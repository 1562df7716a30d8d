"""Unit tests of medseg.dicom.read_series on real series (dicom2nifti test data) and a synthetic one.

The real series are compared with dicom2nifti's ``*_ground_truth.nii.gz`` in world space:
dicom2nifti sometimes stores the slices in the opposite order (its affine's third column then
points the other way), so voxel arrays are compared only after mapping every voxel of ours
through ``inv(gt.affine) @ our_affine``.
"""

from __future__ import annotations

import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medseg.dicom import read_series
from medseg.errors import DicomSeriesError

D2N = Path("dicom/dicom2nifti")

# Single-series folders with a ground truth beside them: (folder, expected shape, slices reversed
# in the ground truth?). The flags were read off the ground-truth affines: their third column
# is the negative of ours exactly when dicom2nifti stacked the slices the other way.
SERIES = [
    ("anatomical/001", (256, 256, 4), True),
    ("anatomical/001_implicit", (256, 256, 4), True),
    ("ge/anatomical/001", (256, 256, 4), False),
    ("ge/anatomical/001_implicit", (256, 256, 4), False),
    ("ge/anatomical/001_single_slice", (256, 256, 1), None),  # one slice: either order
    ("generic/anatomical/001", (256, 256, 4), True),
    ("generic/anatomical/001_implicit", (256, 256, 4), True),
    ("generic/anatomical/002_non_isotropic", (64, 28, 4), False),
    ("hitachi/anatomical/001", (64, 64, 4), True),
    ("hitachi/anatomical/001_implicit", (64, 64, 4), True),
    ("siemens/anatomical/001", (256, 256, 4), True),
    ("siemens/anatomical/001_implicit", (256, 256, 4), True),
    ("failing/slicecount/001", (256, 256, 2), True),  # only 2 slices; accepted for now
    ("generic/compressed/001", (256, 256, 4), True),
    ("generic/compressed_j2k/001", (256, 256, 4), True),
    ("generic/compressed_jpeg/001", (256, 256, 4), True),
    ("generic/compressed_jpegls/001", (256, 256, 4), True),
    ("generic/compressed_rle/001", (256, 256, 4), True),
]

# Every folder under failing/ (series folders and the folders holding them), slicecount excepted.
FAILING = [
    "gantrytilting",
    "gantrytilting/001",
    "notavolume",
    "notavolume/001",
    "sliceincrement",  # two series in one folder
    "sliceincrement/001",
    "sliceincrement/002",
    "sliceorientation",
    "sliceorientation/001",
]

MULTIFRAME = [
    "hyperfine/anatomical/001",
    "philips_enhanced/anatomical/001",
    "philips_enhanced/anatomical/001_implicit",
    "siemens_multiframe/anatomical/001",
]


def _read_or_skip_undecodable(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """read_series, skipping compressed series whose decoder plugin is not installed."""
    try:
        return read_series(folder)
    except DicomSeriesError as err:
        if "compressed" in folder.parent.name and "cannot decode pixel data" in str(err):
            pytest.skip(f"no pixel-data decoder installed for {folder.parent.name}: {str(err).splitlines()[0]}")
        raise


def _voxel_to_world(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    idx = np.indices(shape).reshape(3, -1).astype(np.float64)
    return affine[:3, :3] @ idx + affine[:3, 3:4]


# ---------------------------------------------------------------- real series vs dicom2nifti


@pytest.mark.parametrize(("rel", "shape", "reversed_in_gt"), SERIES, ids=[s[0] for s in SERIES])
def test_series_matches_dicom2nifti_in_world_space(
    shared_data: Path, rel: str, shape: tuple[int, int, int], reversed_in_gt: bool | None
) -> None:
    folder = shared_data / D2N / rel
    gt_img = nib.load(str(folder.parent / f"{folder.name}_ground_truth.nii.gz"))
    gt = np.asanyarray(gt_img.dataobj)

    volume, affine = _read_or_skip_undecodable(folder)

    assert volume.dtype == np.float32
    assert volume.shape == shape == gt.shape
    assert affine.shape == (4, 4)
    np.testing.assert_array_equal(affine[3], [0, 0, 0, 1])

    # Every voxel centre of ours, in world (RAS) coordinates, mapped into the ground-truth grid.
    world = _voxel_to_world(affine, volume.shape)
    gt_index_f = np.linalg.inv(gt_img.affine)[:3] @ np.vstack([world, np.ones((1, world.shape[1]))])
    gt_index = np.round(gt_index_f).astype(int)
    # The mapped point is a ground-truth voxel centre, within 1e-3 mm.
    gt_world = _voxel_to_world(gt_img.affine, gt.shape)
    flat = np.ravel_multi_index(tuple(gt_index), gt.shape)  # raises if any index is outside the grid
    np.testing.assert_allclose(gt_world[:, flat], world, rtol=0, atol=1e-3)
    # The mapping is one-to-one (a permutation of the ground-truth voxels).
    assert np.unique(flat).size == volume.size

    # Same voxel grid, up to the order of the slices.
    i, j, k = np.indices(volume.shape).reshape(3, -1)
    assert np.array_equal(gt_index[0], i) and np.array_equal(gt_index[1], j)
    n = volume.shape[2]
    if reversed_in_gt is True:
        assert np.array_equal(gt_index[2], n - 1 - k)
    elif reversed_in_gt is False:
        assert np.array_equal(gt_index[2], k)

    # Intensities agree voxel for voxel through that mapping.
    ours = volume.reshape(-1)
    theirs = gt[tuple(gt_index)]
    if np.issubdtype(gt.dtype, np.integer):
        np.testing.assert_array_equal(ours, theirs.astype(np.float32))
        expected = gt[:, :, ::-1] if reversed_in_gt else gt
        np.testing.assert_array_equal(volume, expected.astype(np.float32))
    else:
        # 002_non_isotropic: dicom2nifti applies the non-integer rescale slope in float64, we in
        # float32 (pixel * slope + intercept): a few float32 ulps apart, no more.
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=0)


def test_affine_of_anatomical_001(shared_data: Path) -> None:
    """Spot values: 1 mm in-plane, 1 mm slice step, RAS axis codes of the LPS header."""
    volume, affine = read_series(shared_data / D2N / "anatomical/001")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    gt = nib.load(str(shared_data / D2N / "anatomical/001_ground_truth.nii.gz"))
    np.testing.assert_allclose(zooms, gt.header.get_zooms()[:3], atol=1e-4)
    # Same first two axes as dicom2nifti; third axis reversed (it stacks the slices the other way).
    np.testing.assert_allclose(affine[:3, :2], gt.affine[:3, :2], atol=1e-4)
    np.testing.assert_allclose(affine[:3, 2], -gt.affine[:3, 2], atol=1e-4)
    assert nib.aff2axcodes(affine)[:2] == nib.aff2axcodes(gt.affine)[:2]


@pytest.mark.parametrize("rel", FAILING)
def test_failing_series_are_refused_with_the_folder_in_the_message(shared_data: Path, rel: str) -> None:
    folder = shared_data / D2N / "failing" / rel
    with pytest.raises(DicomSeriesError) as info:
        read_series(folder)
    assert str(folder) in str(info.value)


def test_failing_list_covers_every_folder(shared_data: Path) -> None:
    root = shared_data / D2N / "failing"
    found = {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_dir() and p.relative_to(root).parts[0] != "slicecount"
    }
    assert found == set(FAILING)


@pytest.mark.parametrize(
    ("rel", "reason"),
    [
        ("gantrytilting/001", "gantry tilt"),
        ("notavolume/001", "share one position"),
        ("sliceincrement", "one series"),
        ("sliceincrement/001", "equal slice spacing"),
        ("sliceorientation/001", "one slice orientation"),
    ],
)
def test_failing_series_say_what_is_wrong(shared_data: Path, rel: str, reason: str) -> None:
    with pytest.raises(DicomSeriesError, match=reason):
        read_series(shared_data / D2N / "failing" / rel)


@pytest.mark.parametrize("rel", MULTIFRAME)
def test_multiframe_is_refused(shared_data: Path, rel: str) -> None:
    folder = shared_data / D2N / rel
    with pytest.raises(DicomSeriesError, match="multi-frame") as info:
        read_series(folder)
    assert str(folder) in str(info.value)


def test_rgb_series_is_refused(shared_data: Path) -> None:
    folder = shared_data / D2N / "generic/rgb/001"
    with pytest.raises(DicomSeriesError, match="expected a greyscale series") as info:
        read_series(folder)
    assert str(folder) in str(info.value)


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(DicomSeriesError, match="found none") as info:
        read_series(tmp_path)
    assert str(tmp_path) in str(info.value)


# ---------------------------------------------------------------- a synthetic series, known answers

ROWS, COLS = 3, 4
Z_POSITIONS = (10.0, 12.5, 15.0)
ORIGIN_XY = (-20.0, 30.0)  # LPS x, y of the first voxel


def _raw_slice(k: int) -> np.ndarray:
    """Stored pixel values of slice k (rows x columns): 100 k + 10 row + column."""
    r, c = np.indices((ROWS, COLS))
    return (100 * k + 10 * r + c).astype(np.uint16)


def _write_ct_slice(path: Path, k: int, z: float, series_uid: str, study_uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.PatientID = "synthetic"
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [ORIGIN_XY[0], ORIGIN_XY[1], z]
    ds.PixelSpacing = [0.5, 0.7]  # row spacing (between rows), column spacing (between columns)
    ds.SliceThickness = 2.5
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -100
    ds.Rows, ds.Columns = ROWS, COLS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = _raw_slice(k).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _synthetic_series(folder: Path, seed: int = 0) -> Path:
    """Three slices at z = 10, 12.5, 15 written under names whose sorted order is shuffled."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    order = list(range(len(Z_POSITIONS)))
    random.Random(seed).shuffle(order)
    if order == sorted(order):
        order.reverse()
    for name_index, k in enumerate(order):
        _write_ct_slice(folder / f"IM{name_index:04d}.dcm", k, Z_POSITIONS[k], series_uid, study_uid)
    return folder


def _expected_volume() -> np.ndarray:
    # volume[column, row, slice] = slope * stored + intercept
    return np.stack([_raw_slice(k).T.astype(np.float32) * 2 - 100 for k in range(len(Z_POSITIONS))], axis=-1)


EXPECTED_AFFINE = np.array(
    [
        # LPS -> RAS negates the first two rows of the LPS affine.
        [-0.7, 0.0, 0.0, 20.0],  # i runs along the row direction (+x LPS), 0.7 mm column spacing
        [0.0, -0.5, 0.0, -30.0],  # j runs along the column direction (+y LPS), 0.5 mm row spacing
        [0.0, 0.0, 2.5, 10.0],  # k runs up the slices, 2.5 mm apart, from z = 10
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def test_synthetic_series_was_written_shuffled(tmp_path: Path) -> None:
    folder = _synthetic_series(tmp_path / "series")
    z_in_name_order = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in sorted(folder.iterdir())]
    assert z_in_name_order != sorted(z_in_name_order)


def test_synthetic_series_affine_and_values(tmp_path: Path) -> None:
    folder = _synthetic_series(tmp_path / "series")
    volume, affine = read_series(folder)
    assert volume.dtype == np.float32
    assert volume.shape == (COLS, ROWS, 3)
    np.testing.assert_allclose(affine, EXPECTED_AFFINE, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(volume, _expected_volume())
    # Spot checks by hand: column 3, row 2 of the slice at z = 15 (k = 2): 2 * 223 - 100.
    assert volume[3, 2, 2] == 346.0
    assert volume[0, 0, 0] == -100.0
    # Its world position: LPS (-20 + 3*0.7, 30 + 2*0.5, 15) -> RAS (17.9, -31, 15).
    np.testing.assert_allclose(affine @ [3, 2, 2, 1], [17.9, -31.0, 15.0, 1.0], atol=1e-9)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_synthetic_series_does_not_depend_on_file_order(tmp_path: Path, seed: int) -> None:
    volume, affine = read_series(_synthetic_series(tmp_path / "series", seed))
    np.testing.assert_array_equal(volume, _expected_volume())
    np.testing.assert_allclose(affine, EXPECTED_AFFINE, rtol=0, atol=1e-9)


def test_non_dicom_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    folder = _synthetic_series(tmp_path / "series")
    (folder / "README.txt").write_text("a note beside the series")
    (folder / ".DS_Store").write_bytes(b"\0\1\2")
    volume, affine = read_series(folder)
    np.testing.assert_array_equal(volume, _expected_volume())
    np.testing.assert_allclose(affine, EXPECTED_AFFINE, rtol=0, atol=1e-9)


def test_synthetic_missing_slice_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    series_uid, study_uid = generate_uid(), generate_uid()
    for k, z in enumerate((10.0, 12.5, 17.5)):  # the slice at 15 is missing
        _write_ct_slice(folder / f"IM{k}.dcm", k, z, series_uid, study_uid)
    with pytest.raises(DicomSeriesError, match="equal slice spacing") as info:
        read_series(folder)
    assert str(folder) in str(info.value)


def test_synthetic_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    folder = tmp_path / "series"
    folder.mkdir()
    _write_ct_slice(folder / "IM0.dcm", 0, 10.0, generate_uid(), generate_uid())
    volume, affine = read_series(folder)
    assert volume.shape == (COLS, ROWS, 1)
    np.testing.assert_allclose(affine, EXPECTED_AFFINE, rtol=0, atol=1e-9)  # thickness 2.5 = the step
    np.testing.assert_array_equal(volume[..., 0], _expected_volume()[..., 0])
