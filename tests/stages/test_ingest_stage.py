"""ingest on small real files: good cases, every kind of bad input, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import hippocampus_subset, huge_header, synthetic_msd, write_nifti

from medseg.cli import main
from medseg.config import IngestConfig
from medseg.errors import DataError
from medseg.io import sha256
from medseg.manifest import load_manifest
from medseg.stages.ingest import ingest


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*.nii.gz"))}


def test_real_cases_keep_voxels_and_geometry(shared_data: Path, tmp_path: Path) -> None:
    src = hippocampus_subset(shared_data, tmp_path / "msd", ["hippocampus_001", "hippocampus_004"])
    result = ingest(src, tmp_path / "out")
    manifest, root = load_manifest(result.manifest_path)
    assert result.n_cases == 2 and result.n_failed == 0
    record = manifest.case("hippocampus_001")
    original = nib.load(str(src / "imagesTr" / "hippocampus_001.nii.gz"))
    converted = nib.load(str(root / record.image))
    np.testing.assert_array_equal(converted.get_fdata(), original.get_fdata())
    np.testing.assert_allclose(converted.affine, original.affine)
    assert record.shape == list(original.shape)
    assert record.orientation == "RAS"
    assert manifest.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    label = np.asarray(nib.load(str(src / "labelsTr" / "hippocampus_001.nii.gz")).dataobj)
    assert record.label_voxels == {int(v): int((label == v).sum()) for v in np.unique(label)}
    assert record.sources[0].sha256 == sha256(src / "imagesTr" / "hippocampus_001.nii.gz")
    assert record.intensity[0].max == float(original.get_fdata().max())


def _break(src: Path, kind: str) -> Path:
    """Damage case_001 of a synthetic MSD folder in one way; return the file that is wrong."""
    image = src / "imagesTr" / "case_001.nii.gz"
    label = src / "labelsTr" / "case_001.nii.gz"
    if kind == "shape":
        write_nifti(label, np.zeros((10, 10, 10), dtype=np.uint8))
        return label
    if kind == "undeclared":
        data = np.asarray(nib.load(str(label)).dataobj).copy()
        data[0, 0, 0] = 7
        write_nifti(label, data)
        return label
    if kind == "truncated":
        raw = image.read_bytes()
        image.write_bytes(raw[: len(raw) // 2])
        return image
    if kind == "missing":
        label.unlink()
        return label
    if kind == "nan":
        data = nib.load(str(image)).get_fdata().astype(np.float32)
        data[1, 2, 3] = np.nan
        write_nifti(image, data)
        return image
    if kind == "affine":
        img = nib.load(str(label))
        affine = img.affine.copy()
        affine[0, 3] += 5.0
        write_nifti(label, np.asarray(img.dataobj), affine)
        return label
    if kind == "not_gzip":
        image.write_bytes(b"this is not an image")
        return image
    if kind in ("random_gz", "random_nii"):  # random bytes under a NIfTI name
        image.unlink()
        bad = image if kind == "random_gz" else image.with_name("case_001.nii")
        bad.write_bytes(np.random.default_rng(5).bytes(4000))
        _point_at(src, bad)
        return bad
    if kind == "empty_file":
        image.write_bytes(b"")
        return image
    if kind == "huge_header":
        image.write_bytes(huge_header(image.read_bytes()))
        return image
    if kind in ("float_noise", "inf", "constant", "two_d", "five_d"):
        img = nib.load(str(image if kind in ("inf", "constant", "two_d", "five_d") else label))
        data = img.get_fdata().astype(np.float32)
        if kind == "float_noise":  # a label resampled with interpolation: fractions at the edges
            write_nifti(label, data + np.float32(0.25) * (data > 0))
            return label
        if kind == "inf":
            data[2, 2, 2] = -np.inf
        elif kind == "constant":
            data[:] = 0
        elif kind == "two_d":
            data = data[:, :, 0]
        else:
            data = data[..., None, None].repeat(2, axis=-1)
        write_nifti(image, data)
        return image
    raise AssertionError(kind)


def _point_at(src: Path, image: Path) -> None:
    """Make dataset.json list ``image`` as case_001's image."""
    info = json.loads((src / "dataset.json").read_text())
    info["training"][1]["image"] = f"./imagesTr/{image.name}"
    (src / "dataset.json").write_text(json.dumps(info))


EXPECTED = {
    "shape": "expected the image's shape",
    "undeclared": "undeclared [7]",
    "truncated": "cannot read",
    "missing": "file not found",
    "nan": "NaN or infinite",
    "affine": "expected the image's affine",
    "not_gzip": "cannot read",
    "random_gz": "cannot read",
    "random_nii": "cannot read",
    "empty_file": "Empty file",
    "huge_header": "its header declares 30000 x 30000 x 30000 voxels",
    "float_noise": "expected whole-number label values, found fractions",
    "inf": "found 1 NaN or infinite voxels",
    "constant": "expected an image whose intensities vary, found every voxel 0",
    "two_d": "expected a 3D image (or 4D with channels last), found 2D",
    "five_d": "expected a 3D image (or 4D with channels last), found 5D",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_case_is_reported_and_others_go_on(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str],
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Through the command: the bad case gets one log line naming its file and problem, the other
    cases are ingested, the manifest lists the refusal, and the raw inputs are untouched."""
    src = synthetic_msd(tmp_path / "msd", n_cases=4)
    bad_file = _break(src, kind)
    before = _hashes(src)
    assert main(["ingest", str(src), "--output", str(tmp_path / "out"), "--workers", "1"]) == 0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(bad_file) in errors[0] and EXPECTED[kind] in errors[0], errors
    assert "ingested 3 cases (1 left out)" in capsys.readouterr().out
    manifest, _ = load_manifest(tmp_path / "out" / "manifest.json")
    assert sorted(c.case_id for c in manifest.cases) == ["case_000", "case_002", "case_003"]
    (failed,) = manifest.failed
    assert failed.case_id == "case_001"
    assert failed.file == str(bad_file)
    assert str(bad_file) in failed.error and EXPECTED[kind] in failed.error
    assert "\n" not in failed.error
    assert _hashes(src) == before  # raw inputs untouched
    assert not (tmp_path / "out" / "images" / "case_001.nii.gz").exists()


def test_cli_reports_one_line_per_bad_case(tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    src = synthetic_msd(tmp_path / "msd", n_cases=3)
    bad = _break(src, "undeclared")
    assert main(["ingest", "--input", str(src), "--output", str(tmp_path / "out")]) == 0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and str(bad) in errors[0] and "undeclared" in errors[0]
    assert "ingested 2 cases (1 left out)" in capsys.readouterr().out


def test_unknown_config_key_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = synthetic_msd(tmp_path / "msd", n_cases=2)
    config = tmp_path / "exp.yaml"
    config.write_text("ingest:\n  modality: CT\n  lables: {0: bg}\n")
    assert main(["ingest", "--input", str(src), "--output", str(tmp_path / "out"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown key 'ingest.lables'" in err and str(config) in err
    assert not (tmp_path / "out").exists()


def test_missing_input_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ingest", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")]) == 2
    assert f"input not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_all_cases_bad_is_an_error(tmp_path: Path) -> None:
    src = synthetic_msd(tmp_path / "msd", n_cases=1)
    (src / "labelsTr" / "case_000.nii.gz").unlink()
    with pytest.raises(DataError, match="no case could be ingested"):
        ingest(src, tmp_path / "out")


def test_case_sheet_with_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for c in range(2):
        write_nifti(tmp_path / "scans" / f"a_{c:04d}.nii.gz", rng.normal(size=(8, 9, 10)).astype(np.float32))
    write_nifti(tmp_path / "scans" / "a_seg.nii.gz", (rng.random((8, 9, 10)) > 0.5).astype(np.uint8))
    sheet = tmp_path / "cases.tsv"
    sheet.write_text("case_id\timage\tlabel\na\tscans/a_0000.nii.gz;scans/a_0001.nii.gz\tscans/a_seg.nii.gz\n")
    result = ingest(sheet, tmp_path / "out", IngestConfig(labels={0: "background", 1: "lesion"}, modality="MR"))
    manifest, root = load_manifest(result.manifest_path)
    record = manifest.case("a")
    assert record.channels == 2 and manifest.channels == 2
    assert nib.load(str(root / record.image)).shape == (8, 9, 10, 2)


def test_case_sheet_without_label_names_is_refused(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4), np.float32))
    write_nifti(tmp_path / "a_seg.nii.gz", np.zeros((4, 4, 4), np.uint8))
    sheet = tmp_path / "cases.tsv"
    sheet.write_text("case_id\timage\tlabel\na\ta.nii.gz\ta_seg.nii.gz\n")
    with pytest.raises(DataError, match="set ingest.labels"):
        ingest(sheet, tmp_path / "out")


def test_nnunet_folder_channels_grouped(tmp_path: Path) -> None:
    root = tmp_path / "Dataset001_X"
    rng = np.random.default_rng(2)
    for case in ("x_001", "x_002"):
        for c in range(2):
            write_nifti(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", rng.normal(size=(6, 6, 6)).astype(np.float32))
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", np.ones((6, 6, 6), np.uint8))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz",
        "numTraining": 2,
    }))
    manifest, _ = load_manifest(ingest(root, tmp_path / "out").manifest_path)
    assert [c.case_id for c in manifest.cases] == ["x_001", "x_002"]
    assert manifest.channels == 2 and manifest.labels == {0: "background", 1: "organ"}


def test_dicom_folder_of_series(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    folder.mkdir()
    (folder / "patient_a").symlink_to(shared_data / "dicom" / "dicom2nifti" / "anatomical" / "001")
    manifest, root = load_manifest(ingest(folder, tmp_path / "out").manifest_path)
    (record,) = manifest.cases
    truth = nib.load(str(shared_data / "dicom" / "dicom2nifti" / "anatomical" / "001_ground_truth.nii.gz"))
    ours = nib.load(str(root / record.image))
    assert ours.shape == truth.shape
    # The same voxel in world space: dicom2nifti stacks the slices in the other order.
    last = truth.shape[2] - 1
    np.testing.assert_allclose(ours.affine @ [10, 20, 0, 1], truth.affine @ [10, 20, last, 1], atol=1e-3)
    np.testing.assert_array_equal(ours.get_fdata()[:, :, ::-1], truth.get_fdata())


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32])
@pytest.mark.parametrize("size", [1, 2, 7, 10_001])
def test_percentiles_equal_numpy_on_exact_values(monkeypatch: pytest.MonkeyPatch, dtype: type, size: int) -> None:
    """Counted percentiles (integers, in chunks of 1,000 here) equal numpy's linear ones computed in
    float64; integer data is counted, so no sort and no overflow of int16 differences."""
    from medseg.stages import ingest_cases

    monkeypatch.setattr(ingest_cases, "HISTOGRAM_CHUNK", 1000)
    rng = np.random.default_rng(size)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    low, high = (info.min, info.max) if info is not None and info.bits <= 16 else (-70_000, 70_000)
    values = rng.integers(low, high, size=size, endpoint=True).astype(dtype)
    q = [0, 0.5, 33.3, 50, 99.5, 100]
    expected = np.percentile(values.astype(np.float64), q)
    np.testing.assert_allclose(ingest_cases.percentiles(values, q), expected, rtol=1e-12, atol=1e-9)


def test_percentiles_of_int16_do_not_overflow() -> None:
    from medseg.stages.ingest_cases import percentiles

    values = np.array([-31685, -30083, -27838, -21282, -15088, -12595, 20529], dtype=np.int16)
    # numpy interpolates int16 in int16: 20529 - (-12595) wraps, and its 99.5th percentile exceeds the maximum.
    assert np.percentile(values, 99.5) > values.max()
    assert percentiles(values, [99.5]) == pytest.approx([-12595 + 0.97 * (20529 + 12595)])


def test_percentiles_of_a_wide_integer_range_use_numpy() -> None:
    from medseg.stages.ingest_cases import HISTOGRAM_MAX_RANGE, percentiles

    values = np.array([0, 5, HISTOGRAM_MAX_RANGE * 4, 7], dtype=np.int64)
    assert percentiles(values, [50, 100]) == [6.0, float(HISTOGRAM_MAX_RANGE * 4)]
