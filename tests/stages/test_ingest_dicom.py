"""`medseg ingest <DICOM root> --out <folder>`: every series converted or refused, no patient data out."""

from __future__ import annotations

import gzip
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import write_ct_slice

from medseg.dicom.scan import list_files
from medseg.dicom.sidecar import IDENTIFYING_KEYWORDS
from medseg.io import sha256
from medseg.manifest import load_manifest
from medseg.stages.ingest import ingest

D2N = Path("dicom/dicom2nifti")


@pytest.fixture(scope="module")
def converted(shared_data: Path, venv_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = shared_data / D2N
    out = tmp_path_factory.mktemp("ingest_dicom") / "out"
    before = {p: sha256(p) for p in list_files(root)}
    proc = subprocess.run(
        [str(venv_bin / "medseg"), "ingest", str(root), "--out", str(out), "--workers", "2"],
        capture_output=True, text=True, timeout=300,
    )
    after = {p: sha256(p) for p in list_files(root)}
    return {"root": root, "out": out, "proc": proc, "before": before, "after": after}


def test_converts_every_volume_and_reports_every_refusal(converted: dict) -> None:
    proc, out = converted["proc"], converted["out"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    # 29 series groups: 21 volumes, 8 refused (the failing/ ones and the single slice under min_slices 3).
    assert len(report["converted"]) == 21
    refused = {Path(r["file"]).relative_to(converted["root"]).as_posix(): r["error"] for r in report["refused"]}
    assert set(refused) == {
        "failing/gantrytilting/001", "failing/notavolume/001", "failing/slicecount/001",
        "failing/sliceincrement/001", "failing/sliceincrement/002", "failing/sliceorientation/001",
        "ge/anatomical/001_single_slice",
    }
    assert "gantry tilt" in refused["failing/gantrytilting/001"]
    assert "missing slice" in refused["failing/sliceincrement/001"]
    assert "it has 1" in refused["ge/anatomical/001_single_slice"]
    assert len(report["refused"]) == 8  # sliceorientation/001 holds two series, both refused
    # Non-image files (the ground-truth NIfTIs) are listed as ignored, not errors.
    assert all(not r["file"].endswith(".dcm") for r in report["ignored"])
    assert any(r["file"].endswith("_ground_truth.nii.gz") for r in report["ignored"])
    assert "ingested 21 cases" in proc.stdout


def test_outputs_match_the_volumes_and_sidecars_describe_them(converted: dict) -> None:
    out = converted["out"]
    manifest, root = load_manifest(out / "manifest.json")
    assert manifest.kind == "dicom" and manifest.modality == "MR"
    # The RGB series has 3 channels, the rest 1: the manifest keeps the 20 one-channel series.
    assert manifest.channels == 1 and len(manifest.cases) == 20
    for record in manifest.cases:
        img = nib.load(str(root / record.image))
        assert list(img.shape[:3]) == record.shape
        np.testing.assert_allclose(img.affine, np.asarray(record.affine), atol=1e-5)
        side = json.loads((root / record.image.replace(".nii.gz", ".json")).read_text())
        assert side["case_id"] == record.case_id and side["shape"][:3] == record.shape
        assert side["Modality"] == "MR"
        assert all(Path(s.path).is_file() for s in record.sources)
    philips = [r for r in manifest.cases if "philips_enhanced/anatomical/001/" in r.sources[0].path]
    assert len(philips) == 1 and philips[0].shape == [256, 256, 8]
    side = json.loads((root / philips[0].image.replace(".nii.gz", ".json")).read_text())
    assert side["SOPClass"] == "Enhanced MR Image Storage" and side["dtype"] == "float32"


def test_raw_inputs_are_unchanged(converted: dict) -> None:
    assert converted["before"] == converted["after"]


def _identifying_values(root: Path) -> set[str]:
    values: set[str] = set()
    for path in list_files(root):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        for keyword in IDENTIFYING_KEYWORDS:
            value = str(ds.get(keyword) or "").strip()
            if len(value) >= 4 and value.lower() not in {"anonymous", "anon"}:
                values.add(value)
    return values


def test_no_patient_data_in_outputs_logs_or_file_names(converted: dict) -> None:
    # Values that are also in the input's own path (the test data names patients "dicom2nifti")
    # reach the logs through the folder names the user chose; they are not taken from headers.
    values = {v for v in _identifying_values(converted["root"]) if v not in str(converted["root"])}
    assert len(values) >= 5  # the test data does carry names, IDs, dates and institutions
    texts = [converted["proc"].stdout, converted["proc"].stderr]
    for path in sorted(converted["out"].rglob("*")):
        texts.append(path.name)
        if path.suffix == ".json":
            texts.append(path.read_text())
        elif path.name.endswith(".nii.gz"):
            with gzip.open(path) as handle:
                texts.append(handle.read(2048).decode("latin-1"))  # header and extensions
    leaked = sorted(v for v in values if any(v in text for text in texts))
    assert leaked == []


def test_case_ids_from_patient_only_when_asked(shared_data: Path, tmp_path: Path) -> None:
    from medseg.config import IngestConfig

    folder = shared_data / D2N / "hitachi/anatomical/001"
    result = ingest(folder, tmp_path / "derived")
    manifest, _ = load_manifest(result.manifest_path)
    patient_id = str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).PatientID)
    assert [c.case_id for c in manifest.cases] == ["mr010_37f34842"]
    result = ingest(folder, tmp_path / "patient", IngestConfig(case_ids="patient"))
    manifest, _ = load_manifest(result.manifest_path)
    assert manifest.cases[0].case_id.startswith(patient_id.replace(" ", "-") + "_mr010_")


def test_a_folder_without_any_volume_is_a_clear_error(shared_data: Path, tmp_path: Path) -> None:
    from medseg.errors import DataError

    with pytest.raises(DataError, match="no DICOM series could be converted"):
        ingest(shared_data / D2N / "failing/gantrytilting", tmp_path / "out")
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert "gantry tilt" in report["refused"][0]["error"]


def _series(folder: Path, n: int = 4, *, number: int = 1, edit=None) -> list[Path]:
    """``n`` CT slices 2 mm apart in ``folder``, one series; returns their paths in slice order."""
    from pydicom.uid import generate_uid

    series_uid, study_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        path = folder / f"IM{k:03d}.dcm"
        pixels = np.full((6, 5), 100 * k + number, dtype=np.uint16)
        write_ct_slice(path, pixels, position=(0.0, 0.0, 2.0 * k), series_uid=series_uid, study_uid=study_uid,
                       instance=k + 1, series_number=number, edit=edit)
        paths.append(path)
    return paths


def test_a_damaged_file_beside_a_series_refuses_that_series_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    damaged = _series(root / "a", number=1)
    _series(root / "b", number=2)
    # Cut the last slice of series 1 inside its header: its series UID can no longer be read.
    damaged[-1].write_bytes(damaged[-1].read_bytes()[:200])
    result = ingest(root, tmp_path / "out")
    manifest, _ = load_manifest(result.manifest_path)
    assert [c.case_id[:5] for c in manifest.cases] == ["ct002"]
    report = json.loads((tmp_path / "out/report.json").read_text())
    errors = {Path(r["file"]).name: r["error"] for r in report["refused"]}
    assert set(errors) == {"a", damaged[-1].name}
    assert "series 1 in" in errors["a"] and "found 1 damaged" in errors["a"] and damaged[-1].name in errors["a"]


def test_a_copied_file_is_ignored_and_the_series_converted(tmp_path: Path) -> None:
    import shutil

    paths = _series(tmp_path / "root/s", n=3)
    shutil.copy(paths[1], paths[1].with_name("copy of IM001.dcm"))
    result = ingest(tmp_path / "root", tmp_path / "out")
    manifest, root = load_manifest(result.manifest_path)
    assert manifest.cases[0].shape == [5, 6, 3] and not manifest.failed
    data = np.asanyarray(nib.load(str(root / manifest.cases[0].image)).dataobj)
    assert [int(data[0, 0, k]) for k in range(3)] == [1, 101, 201]
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert [(Path(r["file"]).name, r["reason"]) for r in report["ignored"]] == [
        ("copy of IM001.dcm", f"a second copy of the image in {paths[1]} (same SOPInstanceUID)")
    ]


def test_a_damaged_sidecar_value_is_left_out_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def kvp(ds: pydicom.Dataset) -> None:
        ds.KVP = "1e99"

    for path in _series(tmp_path / "root/s", n=3, edit=kvp):  # then damage the value in the file
        path.write_bytes(path.read_bytes().replace(b"DS\x04\x001e99", b"XX\x04\x001e99"))  # an unknown VR
    with caplog.at_level("WARNING"):
        result = ingest(tmp_path / "root", tmp_path / "out")
    manifest, root = load_manifest(result.manifest_path)
    side = json.loads((root / manifest.cases[0].image.replace(".nii.gz", ".json")).read_text())
    assert "KVP" not in side and side["Modality"] == "CT"
    assert any("left KVP out of the sidecar" in r.getMessage() for r in caplog.records)


def test_worker_processes_give_the_same_outputs_as_one_process(converted: dict, tmp_path: Path) -> None:
    """The fixture's run parsed and converted in 2 worker processes (144 files); this one in one."""
    from medseg.config import IngestConfig
    from medseg.stages.ingest_dicom import ingest_dicom

    serial = ingest_dicom(converted["root"], tmp_path / "serial", IngestConfig(), workers=1)
    parallel_manifest = json.loads((converted["out"] / "manifest.json").read_text())
    serial_manifest = json.loads(serial.manifest_path.read_text())
    assert serial_manifest["cases"] == parallel_manifest["cases"]
    assert serial_manifest["failed"] == parallel_manifest["failed"]
    for case in serial_manifest["cases"]:
        a = nib.load(str(tmp_path / "serial" / case["image"]))
        b = nib.load(str(converted["out"] / case["image"]))
        np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)


def test_plain_pixels_read_straight_equal_pydicom(shared_data: Path) -> None:
    """Every file whose pixels the scan locates (read with numpy.fromfile) decodes as pydicom does."""
    from medseg.dicom.volume import pixel_location

    located = 0
    for path in list_files(shared_data / D2N):
        try:
            ds = pydicom.dcmread(path, defer_size=16384)
        except pydicom.errors.InvalidDicomError:
            continue
        location = pixel_location(ds)
        if location is None:
            continue
        located += 1
        expected = pydicom.dcmread(path).pixel_array
        pixels = location.read(path)
        assert pixels.dtype == expected.dtype and np.array_equal(pixels, expected), path
    assert located >= 50
