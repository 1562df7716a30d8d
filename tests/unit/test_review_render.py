"""Pictures of a case: display orientation, square millimetre pixels, overlay colours, grid checks."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from medseg.errors import GeometryMismatchError
from medseg.review import render


def _ras_and_lps(tmp_path: Path, image: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float]):
    """The same scan and mask stored in RAS and in LPS voxel order (x and y axes reversed)."""
    ras = np.diag([*spacing, 1.0])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    shift = np.eye(4)
    shift[:3, 3] = [(image.shape[0] - 1) * spacing[0], (image.shape[1] - 1) * spacing[1], 0]
    lps = shift @ ras @ flip  # index (i, j, k) of the LPS array is the RAS voxel (X-1-i, Y-1-j, k)
    out = {}
    for name, affine, data, labels in (("ras", ras, image, mask), ("lps", lps, image[::-1, ::-1], mask[::-1, ::-1])):
        scan = write_nifti(tmp_path / f"{name}_scan.nii.gz", np.ascontiguousarray(data), affine)
        out[name] = (scan, write_nifti(tmp_path / f"{name}_mask.nii.gz", np.ascontiguousarray(labels), affine))
    return out


def _load(scan: Path, mask: Path, **kwargs) -> render.CaseImages:
    return render.load_case(nib.load(str(scan)), str(scan), mask, **kwargs)


def test_views_follow_the_radiological_convention_whatever_the_voxel_order(tmp_path: Path) -> None:
    shape = (6, 5, 4)
    image = np.zeros(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    image[5, 4, 2] = 100.0  # the patient's right-most, most anterior voxel (RAS: x grows to the right)
    mask[5, 4, 2] = 1
    files = _ras_and_lps(tmp_path, image, mask, (1.0, 1.0, 1.0))
    ras, lps = (_load(*files[k]) for k in ("ras", "lps"))
    for view in render.VIEWS:
        for index in range(ras.slices(view)):
            np.testing.assert_array_equal(render.render(ras, view, index, size=24), render.render(lps, view, index, size=24))
    axial = render.plane(ras.image, "axial", 2)
    assert axial.shape == (5, 6)  # rows: anterior-posterior, columns: right-left
    assert axial[0, 0] == 100.0  # anterior up, the patient's right on the picture's left
    coronal = render.plane(ras.image, "coronal", 4)
    assert coronal.shape == (4, 6) and coronal[1, 0] == 100.0  # superior up (z=2 of 0..3 is row 1), right on the left
    sagittal = render.plane(ras.image, "sagittal", 5)
    assert sagittal.shape == (4, 5) and sagittal[1, 0] == 100.0  # anterior on the left


def test_pixels_are_square_in_millimetres(tmp_path: Path) -> None:
    shape = (8, 6, 4)
    files = _ras_and_lps(tmp_path, np.ones(shape, np.float32), np.zeros(shape, np.uint8), (0.5, 1.0, 3.0))
    case = _load(*files["ras"])
    assert case.spacing == (0.5, 1.0, 3.0)
    # coronal: 4 rows of 3 mm (12 mm) by 8 columns of 0.5 mm (4 mm)
    assert render.pixel_mm(case.spacing, "coronal") == (3.0, 0.5)
    assert render.render(case, "coronal", 0, size=60).shape == (60, 20, 3)
    # axial: 6 rows of 1 mm by 8 columns of 0.5 mm: 6 mm by 4 mm
    assert render.render(case, "axial", 0, size=60).shape == (60, 40, 3)
    assert render.display_shape((4, 8), (3.0, 0.5), 120) == (120, 40)


def test_mask_fill_outline_and_reference_colours(tmp_path: Path) -> None:
    shape = (12, 12, 12)
    image = np.full(shape, 100.0, dtype=np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:9, 2:9, 2:9] = 2
    reference = np.zeros(shape, dtype=np.uint8)
    reference[3:10, 3:10, 3:10] = 1
    write_nifti(tmp_path / "scan.nii.gz", image)
    write_nifti(tmp_path / "mask.nii.gz", mask)
    write_nifti(tmp_path / "ref.nii.gz", reference)
    case = _load(tmp_path / "scan.nii.gz", tmp_path / "mask.nii.gz", reference_path=tmp_path / "ref.nii.gz",
                 window=(0.0, 200.0))
    picture = render.render(case, "axial", 5, layers=("mask",), alpha=0.5, size=12)  # one pixel per voxel
    grey = 100.0 / 200.0 * 255
    colour = np.array(render.label_colour(2), dtype=float)
    # displayed row r is y = 11 - r and column c is x = 11 - c: the mask's x and y 2..8 are rows and columns 3..9
    np.testing.assert_array_equal(picture[6, 6], np.round(grey * 0.5 + colour * 0.5).astype(np.uint8))
    np.testing.assert_array_equal(picture[3, 6], colour.astype(np.uint8))  # its outline
    np.testing.assert_array_equal(picture[0, 0], np.full(3, round(grey), dtype=np.uint8))  # outside
    with_ref = render.render(case, "axial", 5, layers=("mask", "reference"), alpha=0.5, size=12)
    np.testing.assert_array_equal(with_ref[2, 5], render.REFERENCE_COLOUR)  # reference outline: y 9, x 6
    np.testing.assert_array_equal(with_ref[6, 6], picture[6, 6])  # inside both: the fill only


def test_busiest_slice_and_overview(tmp_path: Path) -> None:
    shape = (10, 8, 6)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:4, 1:3, 4] = 1
    mask[5, 5, 1] = 2
    write_nifti(tmp_path / "scan.nii.gz", np.random.default_rng(0).normal(size=shape).astype(np.float32))
    write_nifti(tmp_path / "mask.nii.gz", mask)
    write_nifti(tmp_path / "empty.nii.gz", np.zeros(shape, dtype=np.uint8))
    case = _load(tmp_path / "scan.nii.gz", tmp_path / "mask.nii.gz")
    assert case.busiest("axial") == 4 and case.busiest("sagittal") in (2, 3) and case.busiest("coronal") in (1, 2)
    picture, shown = render.overview(case, size=40, gap=4)
    assert shown["axial"] == 4
    views = [render.render(case, v, shown[v], size=40) for v in ("axial", "coronal", "sagittal")]
    assert [v.shape[:2] for v in views] == [(32, 40), (24, 40), (30, 40)]  # 8x10, 6x10 and 6x8 voxels of 1 mm
    assert picture.shape == (32, 40 * 3 + 8, 3)
    np.testing.assert_array_equal(picture[:, :40], views[0])
    np.testing.assert_array_equal(picture[4:28, 44:84], views[1])  # centred: (32 - 24) / 2 rows above
    empty = _load(tmp_path / "scan.nii.gz", tmp_path / "empty.nii.gz")
    assert empty.busiest("axial") == 3 and empty.busiest("sagittal") == 5


def test_window_defaults_to_percentiles(tmp_path: Path) -> None:
    image = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    write_nifti(tmp_path / "scan.nii.gz", image)
    write_nifti(tmp_path / "mask.nii.gz", np.zeros(image.shape, dtype=np.uint8))
    case = _load(tmp_path / "scan.nii.gz", tmp_path / "mask.nii.gz")
    assert case.low == pytest.approx(np.percentile(image, 0.5)) and case.high == pytest.approx(np.percentile(image, 99.5))


def test_png_round_trip() -> None:
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(render.png(rgb)))), rgb)


def test_a_mask_on_another_grid_is_refused_by_name(tmp_path: Path) -> None:
    write_nifti(tmp_path / "scan.nii.gz", np.zeros((6, 6, 6), dtype=np.float32))
    write_nifti(tmp_path / "small.nii.gz", np.zeros((6, 6, 5), dtype=np.uint8))
    write_nifti(tmp_path / "moved.nii.gz", np.zeros((6, 6, 6), dtype=np.uint8), np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(GeometryMismatchError, match=r"small\.nii\.gz: expected the grid of the scan .*scan\.nii\.gz "
                       r"\(shape \(6, 6, 6\)\), found shape \(6, 6, 5\)"):
        _load(tmp_path / "scan.nii.gz", tmp_path / "small.nii.gz")
    with pytest.raises(GeometryMismatchError, match=r"moved\.nii\.gz: .* and another affine"):
        _load(tmp_path / "scan.nii.gz", tmp_path / "moved.nii.gz")
    good = tmp_path / "good.nii.gz"
    write_nifti(good, np.zeros((6, 6, 6), dtype=np.uint8))
    with pytest.raises(GeometryMismatchError, match=r"small\.nii\.gz: expected the grid"):
        _load(tmp_path / "scan.nii.gz", good, uncertainty_path=tmp_path / "small.nii.gz")
