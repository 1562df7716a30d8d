"""Unit tests of medseg.dicom.read_series: the failing dicom2nifti series, and synthetic series with known answers.

The comparison of every real series with its reference (dcm2niix, dicom2nifti) is in
test_dicom_reference.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_ct_slice
from pydicom.uid import generate_uid

from medseg.dicom import read_series
from medseg.errors import DicomSeriesError

D2N = Path("dicom/dicom2nifti")

# Every folder under failing/, and why it must be refused (with the default min_slices of ingest, 3).
FAILING = {
    "gantrytilting": "gantry tilt",
    "gantrytilting/001": "gantry tilt",
    "notavolume": "all its images lie at one position",
    "notavolume/001": "all its images lie at one position",
    "slicecount": "it has 2",
    "slicecount/001": "it has 2",
    "sliceincrement": "expected one series, found 2",
    "sliceincrement/001": "missing slice",
    "sliceincrement/002": "gantry tilt",
    "sliceorientation": "expected one series, found 2",
    "sliceorientation/001": "expected one series, found 2",
}


@pytest.mark.parametrize("rel", sorted(FAILING))
def test_failing_series_are_refused_with_the_folder_and_the_problem(shared_data: Path, rel: str) -> None:
    folder = shared_data / D2N / "failing" / rel
    with pytest.raises(DicomSeriesError, match=FAILING[rel]) as info:
        read_series(folder, min_slices=3)
    assert str(folder) in str(info.value)
    assert "\n" not in str(info.value)


def test_failing_list_covers_every_folder(shared_data: Path) -> None:
    root = shared_data / D2N / "failing"
    found = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}
    assert found == set(FAILING)


def test_sliceorientation_parts_are_each_refused_as_too_few_slices(shared_data: Path) -> None:
    """The folder mixes two orientations of one SeriesInstanceUID: two parts of 2 slices, each refused."""
    from medseg.dicom import build_volume, scan

    found = scan(shared_data / D2N / "failing/sliceorientation/001")
    assert len(found.series) == 2
    normals = {tuple(np.round(g.frames[0].normal, 2)) for g in found.series}
    assert len(normals) == 2
    for group in found.series:
        assert len(group.frames) == 2
        with pytest.raises(DicomSeriesError, match="at least 3 slices, it has 2"):
            build_volume(group.frames, group.name, min_slices=3)


def test_gantry_tilt_names_the_angle(shared_data: Path) -> None:
    with pytest.raises(DicomSeriesError, match=r"sheared by 14\.00 degrees \(gantry tilt\)"):
        read_series(shared_data / D2N / "failing/gantrytilting/001")


def test_rgb_series_becomes_three_channels(shared_data: Path) -> None:
    volume = read_series(shared_data / D2N / "generic/rgb/001")
    assert volume.rgb and volume.data.shape == (52, 77, 4, 3) and volume.data.dtype == np.uint8


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
    """Slice k at z: stored _raw_slice(k), rescaled 2 x - 100, PixelSpacing 0.5 (between rows), 0.7 (columns)."""
    write_ct_slice(
        path,
        _raw_slice(k),
        position=(ORIGIN_XY[0], ORIGIN_XY[1], z),
        series_uid=series_uid,
        study_uid=study_uid,
        instance=k + 1,
        slice_thickness=2.5,
        rescale=(2, -100),
    )


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
    series = read_series(folder)
    volume, affine = series.data, series.affine
    assert volume.dtype == np.int16  # slope 2, intercept -100: whole numbers, range -100..346
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
    series = read_series(_synthetic_series(tmp_path / "series", seed))
    volume, affine = series.data, series.affine
    np.testing.assert_array_equal(volume, _expected_volume())
    np.testing.assert_allclose(affine, EXPECTED_AFFINE, rtol=0, atol=1e-9)


def test_non_dicom_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    folder = _synthetic_series(tmp_path / "series")
    (folder / "README.txt").write_text("a note beside the series")
    (folder / ".DS_Store").write_bytes(b"\0\1\2")
    series = read_series(folder)
    volume, affine = series.data, series.affine
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
    series = read_series(folder)
    volume, affine = series.data, series.affine
    assert volume.shape == (COLS, ROWS, 1)
    np.testing.assert_allclose(affine, EXPECTED_AFFINE, rtol=0, atol=1e-9)  # thickness 2.5 = the step
    np.testing.assert_array_equal(volume[..., 0], _expected_volume()[..., 0])


def _tilted_series(folder: Path) -> Path:
    """Three slices 2.5 mm apart whose origins move +0.5 mm (one row) in y per slice: an 11.3 degree tilt.

    A bright pixel at row 2 - k of slice k lies at world y = y0 + 1 mm in every slice, so on the
    resampled orthogonal grid it sits at row 2 of every slice.
    """
    folder.mkdir(parents=True)
    series_uid, study_uid = generate_uid(), generate_uid()
    for k, z in enumerate(Z_POSITIONS):
        path = folder / f"IM{k}.dcm"
        _write_ct_slice(path, k, z, series_uid, study_uid)
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [ORIGIN_XY[0], ORIGIN_XY[1] + 0.5 * k, z]
        pixels = np.full((ROWS, COLS), 50, dtype=np.uint16)
        pixels[2 - k, 1] = 1050
        ds.PixelData = pixels.tobytes()
        ds.save_as(str(path), enforce_file_format=True)
    return folder


def test_gantry_tilt_is_refused_unless_resampling_is_asked(tmp_path: Path) -> None:
    folder = _tilted_series(tmp_path / "tilted")
    with pytest.raises(DicomSeriesError, match=r"sheared by 11\.31 degrees \(gantry tilt\)"):
        read_series(folder)
    series = read_series(folder, resample_tilt=True)
    assert series.tilt_resampled
    # slope 2, intercept -100: background 0, the bright pixel 2000, now at row 2 of every slice.
    bright = np.argwhere(series.data == 2000)
    assert bright.tolist() == [[1, 2, 0], [1, 2, 1], [1, 2, 2]]
    assert np.count_nonzero(series.data) == 3
    # The affine is orthogonal, from the first slice's origin, 2.5 mm along the normal.
    np.testing.assert_allclose(series.affine, EXPECTED_AFFINE, rtol=0, atol=1e-9)


def test_time_series_becomes_4d_in_acquisition_order(tmp_path: Path) -> None:
    """Two time points of three slices, files shuffled: (columns, rows, slices, 2), t ordered by AcquisitionNumber."""
    folder = tmp_path / "fmri"
    folder.mkdir()
    series_uid, study_uid = generate_uid(), generate_uid()
    names = iter(random.Random(4).sample(range(6), 6))
    for t in (2, 1):
        for k, z in enumerate(Z_POSITIONS):
            path = folder / f"IM{next(names)}.dcm"
            _write_ct_slice(path, k, z, series_uid, study_uid)
            ds = pydicom.dcmread(path)
            ds.AcquisitionNumber = t
            ds.InstanceNumber = 10 * t + k
            ds.PixelData = (_raw_slice(k) + 1000 * t).tobytes()
            ds.save_as(str(path), enforce_file_format=True)
    series = read_series(folder)
    assert series.data.shape == (COLS, ROWS, 3, 2)
    expected = _expected_volume()
    np.testing.assert_array_equal(series.data[..., 0], expected + 2000)  # t = 1: stored + 1000, slope 2
    np.testing.assert_array_equal(series.data[..., 1], expected + 4000)
    np.testing.assert_allclose(series.affine, EXPECTED_AFFINE, rtol=0, atol=1e-9)


def test_worker_processes_only_where_they_pay_and_forking_is_safe() -> None:
    import threading

    from medseg.dicom.scan import PARALLEL_MIN_FILES, process_pool

    with process_pool(PARALLEL_MIN_FILES - 1, 4) as pool:
        assert pool is None  # too few files
    with process_pool(10 * PARALLEL_MIN_FILES, 1) as pool:
        assert pool is None  # one worker asked for
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with process_pool(10 * PARALLEL_MIN_FILES, 4) as pool:
            assert pool is None  # a thread runs: forking could deadlock
    finally:
        stop.set()
        thread.join()


def _smooth_slice(k: int, rows: int = 16, cols: int = 24) -> np.ndarray:
    """A smooth 8-bit ramp (what lossy JPEG keeps well), different on every slice."""
    r, c = np.indices((rows, cols))
    return (40 + 4 * r + 3 * c + 10 * k).astype(np.uint16)


def _series_in_syntax(folder: Path, edit_for: Callable[[int], Callable[[pydicom.Dataset], None]]) -> None:
    series_uid, study_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for k in range(3):
        write_ct_slice(folder / f"IM{k}.dcm", _smooth_slice(k), position=(-20.0, 30.0, 2.5 * k), series_uid=series_uid,
                       study_uid=study_uid, instance=k + 1, edit=edit_for(k))


def test_jpeg_baseline_series_is_read_within_its_loss(tmp_path: Path) -> None:
    """JPEG baseline (lossy, 8-bit) is not in the test data: encode one with Pillow, decode with medseg."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    def to_jpeg(k: int) -> Callable[[pydicom.Dataset], None]:
        def edit(ds: pydicom.Dataset) -> None:
            buffer = io.BytesIO()
            Image.fromarray(_smooth_slice(k).astype(np.uint8), mode="L").save(buffer, format="JPEG", quality=95)
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
            ds.PixelData = encapsulate([buffer.getvalue()])
            ds["PixelData"].VR = "OB"
            ds.LossyImageCompression = "01"

        return edit

    _series_in_syntax(tmp_path / "s", to_jpeg)
    volume = read_series(tmp_path / "s")
    expected = np.stack([_smooth_slice(k).T for k in range(3)], axis=-1).astype(np.int64)
    assert volume.data.shape == (24, 16, 3) and volume.data.dtype == np.uint8
    assert np.abs(volume.data.astype(np.int64) - expected).max() <= 3  # JPEG at quality 95 on a smooth ramp
    np.testing.assert_allclose(volume.affine[:3, 3], [20.0, -30.0, 0.0])


def test_deflated_series_is_read_exactly(tmp_path: Path) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    def deflate(k: int) -> Callable[[pydicom.Dataset], None]:
        def edit(ds: pydicom.Dataset) -> None:
            ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

        return edit

    _series_in_syntax(tmp_path / "s", deflate)
    raw = (tmp_path / "s/IM0.dcm").read_bytes()
    assert _smooth_slice(0).tobytes() not in raw  # the data set is really deflated
    volume = read_series(tmp_path / "s")
    np.testing.assert_array_equal(volume.data, np.stack([_smooth_slice(k).T for k in range(3)], axis=-1))


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit VR", "explicit VR"])
def test_series_without_preamble_and_file_meta_is_read_exactly(tmp_path: Path, implicit: bool) -> None:
    """Older archives store the bare data set (no 128-byte preamble, no DICM, no file meta)."""

    def bare(k: int) -> Callable[[pydicom.Dataset], None]:
        def edit(ds: pydicom.Dataset) -> None:
            bare_set = pydicom.Dataset(ds)  # the elements alone: no preamble, no file meta
            bare_set.save_as(tmp_path / f"bare{k}", implicit_vr=implicit, little_endian=True, enforce_file_format=False)

        return edit

    _series_in_syntax(tmp_path / "part10", bare)  # writes part10/IM<k>.dcm and, bare, bare<k>
    folder = tmp_path / "bare"
    folder.mkdir()
    for k in range(3):
        (tmp_path / f"bare{k}").rename(folder / f"IM{k}")
        assert (folder / f"IM{k}").read_bytes()[:4] == b"\x08\x00\x16\x00"  # starts with (0008,0016) SOPClassUID
    volume = read_series(folder)
    np.testing.assert_array_equal(volume.data, np.stack([_smooth_slice(k).T for k in range(3)], axis=-1))
    np.testing.assert_allclose(volume.affine, read_series(tmp_path / "part10").affine)
    # Decoded by pydicom too (the path for encodings the scan does not read straight).
    from medseg.dicom.volume import _load_pixels

    np.testing.assert_array_equal(_load_pixels(folder / "IM1"), _smooth_slice(1))
