"""ingest.reviewed: the accepted and corrected masks of a review folder become training cases, their
labels on the ingested image's grid voxel for voxel, with their provenance in the manifest and in
the training's MLflow run; the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import box_msd, boxes, nifti_to_dicom_series, write_nifti

from medseg.cli import main
from medseg.config import IngestConfig
from medseg.errors import DataError
from medseg.io import sha256
from medseg.manifest import load_manifest
from medseg.review import verdicts
from medseg.stages.ingest import ingest
from medseg.stages.review import review

LABELS = {"1": "left", "2": "right"}
MODEL = "models:/boxes/3"
# Not RAS, axes permuted: the canonical grid differs from the scans' own.
ODD = np.array([[-0.9, 0, 0, 30.0], [0, 0, 1.2, -10.0], [0, -1.1, 0, 20.0], [0, 0, 0, 1]])
USED = ["r_accept", "r_fixed", "r_fixed_accepted", "d_accept"]  # d_: a DICOM series
LEFT_OUT = ["r_fix_only", "r_open", "r_reject"]


def _prediction_folder(root: Path, scans: dict[str, tuple[list[Path], str, np.ndarray, np.ndarray]]) -> Path:
    """A folder as medseg predict leaves it: masks, their qc/ records naming the scans, predict.json.
    ``scans``: case -> (scan files, scan kind, mask, the mask's affine)."""
    folder = root / "pred"
    (folder / "qc").mkdir(parents=True)
    for case, (files, kind, mask, affine) in scans.items():
        write_nifti(folder / f"{case}.nii.gz", mask, affine)
        (folder / "qc" / f"{case}.json").write_text(json.dumps({
            "case_id": case, "volumes_ml": {"left": 4.8, "right": 4.8}, "uncertainty": 0.1, "flags": [],
            "details": {}, "scan": [str(p.resolve()) for p in files], "scan_kind": kind, "labels": LABELS}))
    (folder / "predict.json").write_text(json.dumps({"models": [{"model": MODEL, "weights": "abc"}]}))
    return folder


def _dicom_case(root: Path, case: str, rng: np.random.Generator) -> tuple[list[Path], str, np.ndarray, np.ndarray]:
    from medseg.dicom import read_series

    image, label = boxes(rng)
    series = nifti_to_dicom_series(write_nifti(root / "dicom_src" / f"{case}.nii.gz", image, ODD), root / "dicom" / case)
    volume = read_series(series)
    assert volume.data.shape == label.shape
    return sorted(series.iterdir()), "dicom", label, volume.affine


def _correct(review_dir: Path, case: str, mask_path: Path, *, shape: tuple[int, ...] | None = None) -> tuple[str, Path]:
    """A correction saved as the server saves one (label 2 removed, the scan's affine) under corrections/."""
    img = nib.load(str(mask_path))
    mask = np.asarray(img.dataobj)
    fixed = np.where(mask == 2, 0, mask).astype(np.uint8)
    if shape is not None:
        fixed = fixed[tuple(slice(0, n) for n in shape)]
    rel = f"{verdicts.CORRECTIONS}/{case}/20260102T090000.nii.gz"
    write_nifti(review_dir / rel, fixed, img.affine)
    return rel, review_dir / rel


def _fix(review_dir: Path, case: str, mask: Path, reviewer: str, time: str, **kw: object) -> Path:
    rel, path = _correct(review_dir, case, mask, **kw)  # type: ignore[arg-type]
    verdicts.record(review_dir, case, "fix", reviewer=reviewer, mask_sha256=sha256(mask), correction=rel,
                    base_sha256=sha256(mask), correction_sha256=sha256(path), time=time)
    return path


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MSD folder of four box cases whose test cases (imagesTs) were predicted and reviewed, with
    a DICOM series predicted beside them; the review folder with its verdicts; the ingest of both."""
    root = tmp_path_factory.mktemp("reviewed")
    rng = np.random.default_rng(0)
    msd = box_msd(root / "msd", 4, rng)
    scans = {}
    for case in [c for c in USED + LEFT_OUT if c.startswith("r_")]:
        image, label = boxes(rng)
        scans[case] = ([write_nifti(msd / "imagesTs" / f"{case}.nii.gz", image, ODD)], "nifti", label, ODD)
    scans["d_accept"] = _dicom_case(root, "d_accept", rng)
    info = json.loads((msd / "dataset.json").read_text())
    info["test"] = [f"./imagesTs/{c}.nii.gz" for c in sorted(scans) if c.startswith("r_")]
    (msd / "dataset.json").write_text(json.dumps(info))
    pred = _prediction_folder(root, scans)
    out = root / "review"
    review([pred], out)
    mask = {c: pred / f"{c}.nii.gz" for c in scans}
    for case in ("r_accept", "d_accept"):
        verdicts.record(out, case, "accept", reviewer="ann", mask_sha256=sha256(mask[case]),
                        time="2026-01-01T10:00:00+00:00")
    _fix(out, "r_fixed", mask["r_fixed"], "bob", "2026-01-02T09:00:00+00:00")
    _fix(out, "r_fixed_accepted", mask["r_fixed_accepted"], "bob", "2026-01-02T09:30:00+00:00")
    verdicts.record(out, "r_fixed_accepted", "accept", reviewer="cy", mask_sha256=sha256(mask["r_fixed_accepted"]),
                    time="2026-01-03T09:00:00+00:00")
    verdicts.record(out, "r_fix_only", "fix", reviewer="bob", mask_sha256=sha256(mask["r_fix_only"]))
    verdicts.record(out, "r_reject", "reject", reviewer="ann", mask_sha256=sha256(mask["r_reject"]))
    ingest(msd, root / "ingest", IngestConfig(reviewed=[str(out)]))
    return root


def test_ingest_review_adds_the_accepted_and_corrected_cases_with_provenance(reviewed: Path) -> None:
    manifest, _ = load_manifest(reviewed / "ingest" / "manifest.json")
    review_dir = str((reviewed / "review").resolve())
    assert [c.case_id for c in manifest.cases] == ["c0", "c1", "c2", "c3", *sorted(USED)]
    assert sorted(c.case_id for c in manifest.test_cases) == LEFT_OUT  # the scans no review labelled
    assert manifest.failed == []
    by_id = {c.case_id: c for c in manifest.cases}
    assert all(by_id[c].provenance is None for c in ("c0", "c1", "c2", "c3"))
    correction = reviewed / "review" / verdicts.CORRECTIONS / "r_fixed_accepted" / "20260102T090000.nii.gz"
    assert by_id["r_fixed_accepted"].provenance.model_dump() == {
        "origin": "corrected", "review_dir": review_dir, "reviewer": "cy", "reviewed_at": "2026-01-03T09:00:00+00:00",
        "corrected_by": "bob", "corrected_at": "2026-01-02T09:30:00+00:00", "predicted_by": [MODEL],
        "label_sha256": sha256(correction),
    }
    assert by_id["r_accept"].provenance.model_dump() == {
        "origin": "accepted", "review_dir": review_dir, "reviewer": "ann", "reviewed_at": "2026-01-01T10:00:00+00:00",
        "corrected_by": "", "corrected_at": "", "predicted_by": [MODEL],
        "label_sha256": sha256(reviewed / "pred" / "r_accept.nii.gz"),
    }
    assert {c: by_id[c].provenance.origin for c in USED} == {
        "r_accept": "accepted", "r_fixed": "corrected", "r_fixed_accepted": "corrected", "d_accept": "accepted"}
    # the corrections removed label 2
    assert {c: sorted(by_id[c].label_voxels) for c in USED} == {
        "r_accept": [0, 1, 2], "r_fixed": [0, 1], "r_fixed_accepted": [0, 1], "d_accept": [0, 1, 2]}
    rows = manifest.reviewed_cases()
    assert [r["case_id"] for r in rows] == sorted(USED) and rows[0]["reviewer"] == "ann"


def test_ingest_review_labels_equal_the_saved_masks_voxel_for_voxel(reviewed: Path) -> None:
    manifest, root = load_manifest(reviewed / "ingest" / "manifest.json")
    for case in USED:
        record = manifest.case(case)
        saved = nib.load(str(reviewed / "review" / verdicts.CORRECTIONS / case / "20260102T090000.nii.gz")
                         if record.provenance.origin == "corrected" else reviewed / "pred" / f"{case}.nii.gz")
        label, image = nib.load(str(root / record.label)), nib.load(str(root / record.image))
        assert label.shape == image.shape == (40, 40, 32)
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-6)
        np.testing.assert_allclose(label.affine, saved.affine, atol=1e-4)  # the scan's own grid (ODD for NIfTI)
        # in the canonical (RAS) space the training reads, the label is what the reviewer saved
        ras_label, ras_saved = nib.as_closest_canonical(label), nib.as_closest_canonical(saved)
        np.testing.assert_allclose(ras_label.affine, ras_saved.affine, atol=1e-4)
        assert np.array_equal(np.asarray(ras_label.dataobj), np.asarray(ras_saved.dataobj))
        assert np.array_equal(np.asarray(label.dataobj), np.asarray(saved.dataobj))
        assert sha256(Path(saved.get_filename())) == record.provenance.label_sha256
    scan = nib.load(str(reviewed / "msd" / "imagesTs" / "r_fixed.nii.gz"))
    ingested = nib.load(str(root / manifest.case("r_fixed").image))
    assert np.array_equal(np.asarray(ingested.dataobj), np.asarray(scan.dataobj))


def _small_review(root: Path, cases: list[str], *, odd_shape: str | None = None) -> Path:
    """A review folder of accepted box cases (``odd_shape``: one fixed with a mask off its scan's grid)."""
    rng = np.random.default_rng(1)
    scans = {}
    for case in cases:
        image, label = boxes(rng)
        scans[case] = ([write_nifti(root / "scans" / f"{case}.nii.gz", image)], "nifti", label, np.eye(4))
    pred = _prediction_folder(root, scans)
    out = root / "review"
    review([pred], out)
    for case in cases:
        if case == odd_shape:
            _fix(out, case, pred / f"{case}.nii.gz", "bob", "2026-01-02T09:00:00+00:00", shape=(40, 40, 30))
        else:
            verdicts.record(out, case, "accept", reviewer="ann", mask_sha256=sha256(pred / f"{case}.nii.gz"))
    return out


def test_ingest_review_reports_a_label_off_its_scan_grid_and_goes_on(tmp_path: Path) -> None:
    msd = box_msd(tmp_path / "msd", 2, np.random.default_rng(0))
    out = _small_review(tmp_path, ["good", "off"], odd_shape="off")
    result = ingest(msd, tmp_path / "ingest", IngestConfig(reviewed=[str(out)]))
    manifest, _ = load_manifest(result.manifest_path)
    assert [c.case_id for c in manifest.cases] == ["c0", "c1", "good"]
    correction = out / verdicts.CORRECTIONS / "off" / "20260102T090000.nii.gz"
    assert [(f.case_id, f.file) for f in manifest.failed] == [("off", str(correction))]
    assert "expected the image's shape (40, 40, 32)" in manifest.failed[0].error
    assert "found (40, 40, 30)" in manifest.failed[0].error


def test_ingest_review_refuses_a_case_in_the_dataset_or_in_two_folders(tmp_path: Path) -> None:
    msd = box_msd(tmp_path / "msd", 2, np.random.default_rng(0))
    out = _small_review(tmp_path / "a", ["c1", "new"])
    with pytest.raises(DataError) as err:
        ingest(msd, tmp_path / "ingest", IngestConfig(reviewed=[str(out)]))
    message = str(err.value)
    assert "case c1: found in the dataset" in message and str(msd / "imagesTr" / "c1.nii.gz") in message
    assert str(out.resolve()) in message
    other = _small_review(tmp_path / "b", ["new"])
    with pytest.raises(DataError, match="case new: found in the review folders") as err:
        ingest(msd, tmp_path / "ingest", IngestConfig(reviewed=[str(_small_review(tmp_path / "c", ["new"])), str(other)]))
    assert str(other.resolve()) in str(err.value) and str((tmp_path / "c" / "review").resolve()) in str(err.value)


def test_ingest_review_command_names_a_missing_or_unbuilt_folder(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    msd = box_msd(tmp_path / "msd", 2, np.random.default_rng(0))
    (tmp_path / "not_built").mkdir()
    for folder, expected in [(tmp_path / "nowhere", "review folder not found"),
                             (tmp_path / "not_built", "expected a review folder built by medseg review")]:
        code = main(["ingest", "--input", str(msd), "--output", str(tmp_path / "ingest"),
                     "--params", json.dumps({"reviewed": [str(folder)]})])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1
        assert expected in err[0] and str(folder) in err[0]
    assert not (tmp_path / "ingest" / "manifest.json").exists()


def test_review_provenance_is_logged_in_the_training_run(reviewed: Path, tmp_path: Path) -> None:
    import mlflow

    from medseg.config import PlanConfig
    from medseg.stages.plan import plan
    from medseg.stages.preprocess import preprocess

    manifest_path = reviewed / "ingest" / "manifest.json"
    plan(manifest_path, tmp_path / "plan", PlanConfig(n_folds=2, target_spacing_mm=(2.0, 2.0, 2.0), batch_size=2))
    preprocess(manifest_path, tmp_path / "plan" / "plan.json", tmp_path / "pre")
    params = {"network": {"channels": [4, 8], "num_res_units": 0}, "epochs": 1, "num_workers": 0}
    db = tmp_path / "mlflow.db"
    code = main(["train", "--preprocessed", str(tmp_path / "pre"), "--plan", str(tmp_path / "plan" / "plan.json"),
                 "--splits", str(tmp_path / "plan" / "splits.json"), "--output", str(tmp_path / "fold_0"),
                 "--manifest", str(manifest_path), "--params", json.dumps(params), "--device", "cpu",
                 "--tracking-uri", f"sqlite:///{db}", "--artifact-root", str(tmp_path / "artifacts")])
    assert code == 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.fold = '0'")
    assert run.data.tags["data.reviewed_cases"] == "4"
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data/reviewed_cases.json",
                                                dst_path=str(tmp_path / "got"), tracking_uri=f"sqlite:///{db}")
    logged = json.loads(Path(local).read_text())
    assert logged == load_manifest(manifest_path)[0].reviewed_cases()
    assert [(r["case_id"], r["origin"]) for r in logged] == [
        ("d_accept", "accepted"), ("r_accept", "accepted"), ("r_fixed", "corrected"), ("r_fixed_accepted", "corrected")]


def test_ingest_review_labels_a_series_of_a_dicom_dataset(tmp_path: Path) -> None:
    """A DICOM folder predicted and reviewed: the reviewed series takes the place of the unlabelled
    one (the same files), with the label names of the model that predicted it."""
    from medseg.dicom import read_series
    from medseg.sources import read_dicom_tree

    rng = np.random.default_rng(2)
    masks = {}
    for number, name in enumerate(("a", "b"), start=1):
        image, masks[name] = boxes(rng)
        nifti_to_dicom_series(write_nifti(tmp_path / "src" / f"{name}.nii.gz", image, ODD), tmp_path / "tree" / name,
                              series_number=number)
    series = {c.images[0].parent.name: c for c in read_dicom_tree(tmp_path / "tree").cases}
    case_a = series["a"]
    volume = read_series(list(case_a.images))
    pred = _prediction_folder(tmp_path, {case_a.case_id: (list(case_a.images), "dicom", masks["a"], volume.affine)})
    review([pred], tmp_path / "review")
    verdicts.record(tmp_path / "review", case_a.case_id, "accept", reviewer="ann",
                    mask_sha256=sha256(pred / f"{case_a.case_id}.nii.gz"))
    result = ingest(tmp_path / "tree", tmp_path / "ingest", IngestConfig(reviewed=[str(tmp_path / "review")]))
    manifest, root = load_manifest(result.manifest_path)
    assert manifest.kind == "dicom" and manifest.labels == {0: "background", 1: "left", 2: "right"}
    assert [(c.case_id, c.label is not None) for c in manifest.cases] == [
        (series["b"].case_id, False), (case_a.case_id, True)]
    record = manifest.case(case_a.case_id)
    assert record.provenance is not None and record.provenance.origin == "accepted"
    label = nib.load(str(root / record.label))
    np.testing.assert_allclose(label.affine, nib.load(str(root / record.image)).affine, atol=1e-6)
    np.testing.assert_allclose(label.affine, volume.affine, atol=1e-4)
    assert np.array_equal(np.asarray(label.dataobj), masks["a"])
