"""predict at scale: other geometries, one model load for many scans, resume after a kill, outputs.

One small model (``box_model`` in conftest) is trained once for the session (about 10 s) on
synthetic cases of two adjacent boxes, which it learns to a validation Dice above 0.95.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SHAPE, boxes, dice, train_box_model, write_nifti
from nibabel.processing import resample_from_to

import medseg.stages.predict as predict_module
from medseg.config import PredictConfig
from medseg.errors import ConfigError, DataError, ModelError
from medseg.stages.predict import predict


def scans(folder: Path, n: int, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_nifti(folder / f"scan_{i:02d}.nii.gz", boxes(rng)[0])
    return folder


def test_scan_resampled_and_flipped_is_segmented_on_its_own_grid(box_model: Path, tmp_path: Path) -> None:
    # A new case on the training grid (1 mm, RAS), and the same case resampled to 0.8 x 0.8 x 2 mm
    # voxels with x running the other way (an LPS-like first axis): image trilinear, label nearest.
    image, label = boxes(np.random.default_rng(42))
    grid = (50, 50, 16)
    affine = np.array([[-0.8, 0, 0, 39.2], [0, 0.8, 0, 0.0], [0, 0, 2.0, 0.0], [0, 0, 0, 1]])
    moved = resample_from_to(nib.Nifti1Image(image, np.eye(4)), (grid, affine), order=1, mode="nearest")
    reference = np.asarray(resample_from_to(nib.Nifti1Image(label, np.eye(4)), (grid, affine), order=0).dataobj)
    write_nifti(tmp_path / "scans" / "moved.nii.gz", np.asarray(moved.dataobj, dtype=np.float32), affine)

    predict(tmp_path / "scans", tmp_path / "masks", [str(box_model)])

    out = nib.load(str(tmp_path / "masks" / "moved.nii.gz"))
    assert out.shape == grid
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    mask = np.asarray(out.dataobj)
    assert dice(mask, reference, 1) >= 0.95
    assert dice(mask, reference, 2) >= 0.95
    # and the model did not simply memorize a position: the boxes are mirrored on this grid
    assert dice(mask[::-1], reference, 1) < 0.5


def test_twenty_scans_load_the_model_once_and_get_qc(box_model: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = scans(tmp_path / "scans", 19)
    noise = np.random.default_rng(5).normal(10.0, 1.0, size=SHAPE).astype(np.float32)
    write_nifti(folder / "scan_19.nii.gz", noise)  # nothing to find, but noise normalized looks like boxes
    loads: list[str] = []
    real = predict_module.load_model

    def counting(ref: str, *args: object) -> object:
        loads.append(ref)
        return real(ref, *args)

    monkeypatch.setattr(predict_module, "load_model", counting)
    result = predict(folder, tmp_path / "masks", [str(box_model)], PredictConfig(prefetch=2))

    assert loads == [str(box_model)]
    assert len(result.written) == 20 and not result.failed and not result.skipped
    with open(tmp_path / "masks" / "cases.csv", newline="") as handle:
        rows = {r["case_id"]: r for r in csv.DictReader(handle)}
    assert sorted(rows) == [f"scan_{i:02d}" for i in range(20)]
    for case_id in sorted(rows)[:19]:
        qc = json.loads((tmp_path / "masks" / "qc" / f"{case_id}.json").read_text())
        mask = np.asarray(nib.load(str(tmp_path / "masks" / f"{case_id}.nii.gz")).dataobj)
        assert qc["volumes_ml"]["left"] == pytest.approx((mask == 1).sum() / 1000)  # 1 mm^3 voxels
        assert abs(qc["volumes_ml"]["left"] - 4.8) < 0.5  # the 12 x 20 x 20 mm box
        assert 0 < qc["uncertainty"] < 0.25
        assert qc["flags"] == []
    flags = rows["scan_19"]["flags"].split(";")
    assert "volume" in flags and "uncertain" in flags  # junk, and the flags say so
    assert float(rows["scan_19"]["uncertainty"]) > 0.25


def test_killed_prediction_resumes_with_the_missing_cases(box_model: Path, tmp_path: Path, venv_bin: Path) -> None:
    folder = scans(tmp_path / "scans", 20)
    out = tmp_path / "masks"
    command = [str(venv_bin / "medseg"), "predict", "--input", str(folder), "--output", str(out),
               "--model", str(box_model), "--params", json.dumps({"tta_flips": True})]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "qc").glob("*.json"))) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted(p.stem for p in (out / "qc").glob("*.json"))
    assert 3 <= len(done) < 20, f"expected the kill mid-way, found {len(done)} of 20 cases done"
    stamps = {case: (out / f"{case}.nii.gz").stat().st_mtime_ns for case in done}

    result = predict(folder, out, [str(box_model)], PredictConfig(tta_flips=True))

    assert sorted(result.skipped) == done
    assert len(result.written) == 20 and not result.failed
    assert {case: (out / f"{case}.nii.gz").stat().st_mtime_ns for case in done} == stamps  # not redone
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no partial files left
    with open(out / "cases.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 20


def test_folder_of_other_models_or_settings_is_refused_unless_overwritten(box_model: Path, tmp_path: Path) -> None:
    folder = scans(tmp_path / "scans", 2)
    out = tmp_path / "masks"
    predict(folder, out, [str(box_model)])
    again = predict(folder, out, [str(box_model)])
    assert sorted(again.skipped) == ["scan_00", "scan_01"]
    with pytest.raises(DataError, match=r"masks: expected an empty folder or one with predictions of the same"):
        predict(folder, out, [str(box_model)], PredictConfig(tta_flips=True))
    redone = predict(folder, out, [str(box_model)], PredictConfig(tta_flips=True), overwrite=True)
    assert redone.skipped == [] and len(redone.written) == 2
    assert json.loads((out / "predict.json").read_text())["config"]["tta_flips"] is True


def test_uncertainty_and_probability_maps(box_model: Path, tmp_path: Path) -> None:
    folder = scans(tmp_path / "scans", 1)
    config = PredictConfig(uncertainty_maps=True, probability_maps=True, tta_flips=True)
    predict(folder, tmp_path / "masks", [str(box_model)], config)
    mask = np.asarray(nib.load(str(tmp_path / "masks" / "scan_00.nii.gz")).dataobj)
    uncertainty = nib.load(str(tmp_path / "masks" / "uncertainty" / "scan_00.nii.gz"))
    probs = nib.load(str(tmp_path / "masks" / "probabilities" / "scan_00.nii.gz"))
    assert uncertainty.shape == SHAPE and probs.shape == (*SHAPE, 3)
    assert probs.get_data_dtype() == np.uint8
    u, p = uncertainty.get_fdata(), probs.get_fdata()
    assert 0 <= u.min() and u.max() <= 1
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=2 / 255)
    assert (p.argmax(-1) == mask).mean() > 0.999
    # uncertain where the classes meet or end, certain inside the boxes and the background
    assert u[mask == 0].mean() < 0.1
    edge = (mask != np.roll(mask, 1, axis=0)) | (mask != np.roll(mask, -1, axis=0))
    assert u[edge].mean() > 3 * u[~edge].mean()


def test_scan_touching_the_edge_is_flagged(box_model: Path, tmp_path: Path) -> None:
    image, _ = boxes(np.random.default_rng(3))
    write_nifti(tmp_path / "scans" / "cut.nii.gz", image[14:])  # the left box (x 5..22 at most) runs into the x = 0 face
    predict(tmp_path / "scans", tmp_path / "masks", [str(box_model)])
    qc = json.loads((tmp_path / "masks" / "qc" / "cut.json").read_text())
    assert "edge" in qc["flags"] and "left" in qc["details"]["edge"]


def test_bad_scans_are_reported_by_name_and_the_others_go_on(box_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    folder = tmp_path / "scans"
    good, _ = boxes(rng)
    with_nan = good.copy()
    with_nan[3, 3, 3] = np.nan
    write_nifti(folder / "good.nii.gz", good)
    write_nifti(folder / "tiny.nii.gz", good[18:23, 18:23, 14:19])  # smaller than the window: padded, fine
    write_nifti(folder / "two_channels.nii.gz", np.stack([good, good], axis=-1))
    write_nifti(folder / "flat.nii.gz", good[:, :, 0])
    write_nifti(folder / "with_nan.nii.gz", with_nan)
    write_nifti(folder / "blank.nii.gz", np.zeros(SHAPE, dtype=np.float32))

    result = predict(folder, tmp_path / "masks", [str(box_model)])

    assert sorted(p.name for p in result.written) == ["good.nii.gz", "tiny.nii.gz"]
    expected = {
        "two_channels": "two_channels.nii.gz: expected a 3D scan for this model, found shape (40, 40, 32, 2)",
        "flat": "flat.nii.gz: expected a 3D scan for this model, found shape (40, 40)",
        "with_nan": "with_nan.nii.gz: expected finite voxel values, found NaN or infinite ones",
        "blank": "blank.nii.gz: expected a scan whose intensities vary, found every voxel is 0",
    }
    assert sorted(result.failed) == sorted(expected)
    for case_id, message in expected.items():
        assert message in result.failed[case_id]
    assert not (tmp_path / "masks" / "qc" / "blank.json").exists()
    # each failure is recorded in the folder, for review, until the case is predicted
    failures = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "masks" / "failed").glob("*.json")}
    assert sorted(failures) == sorted(expected)
    assert failures["blank"]["error"] == result.failed["blank"]
    assert failures["blank"]["scan"] == [str((folder / "blank.nii.gz").resolve())]
    qc = json.loads((tmp_path / "masks" / "qc" / "good.json").read_text())
    assert qc["scan"] == [str((folder / "good.nii.gz").resolve())] and qc["scan_kind"] == "nifti"
    assert qc["labels"] == {"1": "left", "2": "right"}
    write_nifti(folder / "blank.nii.gz", good)
    again = predict(folder, tmp_path / "masks", [str(box_model)])
    assert sorted(again.skipped) == ["good", "tiny"] and "blank" not in again.failed
    assert not (tmp_path / "masks" / "failed" / "blank.json").exists()
    assert (tmp_path / "masks" / "failed" / "flat.json").exists()


def test_largest_component_drops_a_second_pair_of_boxes(box_model: Path, tmp_path: Path) -> None:
    image, label = boxes(np.random.default_rng(21))
    extra = np.random.default_rng(22).normal(10.0, 1.0, size=(40, 40, 32)).astype(np.float32)
    extra[10:16, 12:20, 12:20] += 6   # a smaller pair of boxes, apart from the first
    extra[16:22, 12:20, 12:20] += 12
    write_nifti(tmp_path / "scans" / "two_pairs.nii.gz", np.concatenate([image, extra], axis=2))
    reference = np.concatenate([label, np.zeros_like(label)], axis=2)

    predict(tmp_path / "scans", tmp_path / "plain", [str(box_model)])
    (tmp_path / "decision.json").write_text(json.dumps({"largest_component": [1, 2]}))
    from medseg.cli import main

    assert main(["predict", "--input", str(tmp_path / "scans"), "--output", str(tmp_path / "kept"),
                 "--model", str(box_model), "--postprocessing", str(tmp_path / "decision.json")]) == 0

    plain = np.asarray(nib.load(str(tmp_path / "plain" / "two_pairs.nii.gz")).dataobj)
    kept = np.asarray(nib.load(str(tmp_path / "kept" / "two_pairs.nii.gz")).dataobj)
    assert (plain[:, :, 32:] == 1).sum() > 100 and (plain[:, :, 32:] == 2).sum() > 100  # the second pair is found
    assert not kept[:, :, 32:].any()  # and dropped
    assert np.all((kept == plain) | (kept == 0))  # voxels are only removed
    assert int((kept[:, :, :32] != plain[:, :, :32]).sum()) < 50  # in the first pair, only stray islands
    assert dice(kept, reference, 1) >= 0.95 and dice(kept, reference, 2) >= 0.95
    record = json.loads((tmp_path / "kept" / "predict.json").read_text())
    assert record["config"]["largest_component"] == [1, 2]


def test_shards_share_one_folder_and_its_table(box_model: Path, tmp_path: Path) -> None:
    folder = scans(tmp_path / "scans", 5)
    out = tmp_path / "masks"
    first = predict(folder, out, [str(box_model)], shard=(0, 2))
    second = predict(folder, out, [str(box_model)], shard=(1, 2))
    assert [p.name for p in first.written] == ["scan_00.nii.gz", "scan_02.nii.gz", "scan_04.nii.gz"]
    assert [p.name for p in second.written] == ["scan_01.nii.gz", "scan_03.nii.gz"]
    with (out / "cases.csv").open(newline="") as handle:
        assert [row["case_id"] for row in csv.DictReader(handle)] == [f"scan_{i:02d}" for i in range(5)]
    assert predict(folder, out, [str(box_model)], shard=(5, 6)).written == []  # 5 cases: nothing for this one
    with pytest.raises(ConfigError, match=r"shard: expected K/N with 0 <= K < N, found 2/2"):
        predict(folder, out, [str(box_model)], shard=(2, 2))


def test_replace_others_resumes_the_same_run_and_restarts_another(box_model: Path, tmp_path: Path) -> None:
    folder = scans(tmp_path / "scans", 3)
    out = tmp_path / "masks"
    predict(folder, out, [str(box_model)])
    same = predict(folder, out, [str(box_model)], replace_others=True)
    assert same.skipped == ["scan_00", "scan_01", "scan_02"]
    other = predict(folder, out, [str(box_model)], PredictConfig(tta_flips=True), replace_others=True)
    assert other.skipped == [] and len(other.written) == 3
    assert json.loads((out / "predict.json").read_text())["config"]["tta_flips"] is True


@pytest.fixture(scope="module")
def coarse_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another configuration: the box model on a plan of 2 mm voxels."""
    return train_box_model(tmp_path_factory.mktemp("coarse"), (2.0, 2.0, 2.0))


def test_ensemble_of_configurations_with_other_plans(box_model: Path, coarse_model: Path, tmp_path: Path) -> None:
    image, label = boxes(np.random.default_rng(31))
    write_nifti(tmp_path / "scans" / "case.nii.gz", image)
    config = PredictConfig(uncertainty_maps=True)
    result = predict(tmp_path / "scans", tmp_path / "both", [str(box_model), str(coarse_model)], config)
    predict(tmp_path / "scans", tmp_path / "fine", [str(box_model)], config)
    predict(tmp_path / "scans", tmp_path / "coarse", [str(coarse_model)], config)

    assert not result.failed
    both = np.asarray(nib.load(str(tmp_path / "both" / "case.nii.gz")).dataobj)
    assert dice(both, label, 1) >= 0.95 and dice(both, label, 2) >= 0.95
    record = json.loads((tmp_path / "both" / "predict.json").read_text())
    assert [m["model"] for m in record["models"]] == [str(box_model), str(coarse_model)]
    qc = json.loads((tmp_path / "both" / "qc" / "case.json").read_text())
    assert 0.0 < qc["uncertainty"] < 1.0
    # where both configurations agree the ensemble does too; it is not one of them alone
    fine = np.asarray(nib.load(str(tmp_path / "fine" / "case.nii.gz")).dataobj)
    coarse = np.asarray(nib.load(str(tmp_path / "coarse" / "case.nii.gz")).dataobj)
    agree = fine == coarse
    np.testing.assert_array_equal(both[agree], fine[agree])
    assert (fine != coarse).any()
    assert nib.load(str(tmp_path / "both" / "uncertainty" / "case.nii.gz")).shape == image.shape


def test_ensemble_of_models_with_other_labels_is_refused(box_model: Path, tmp_path: Path) -> None:
    import torch

    state = torch.load(box_model, weights_only=False)
    state["spec"]["plan"]["labels"] = {"0": "background", "1": "liver", "2": "tumour"}
    torch.save(state, tmp_path / "other.pt")
    write_nifti(tmp_path / "scans" / "case.nii.gz", boxes(np.random.default_rng(32))[0])
    with pytest.raises(ModelError, match=r"model .*other\.pt: expected the labels and channels of .*best\.pt for an "
                                         r"ensemble, found \{0: 'background', 1: 'liver', 2: 'tumour'\}"):
        predict(tmp_path / "scans", tmp_path / "out", [str(box_model), str(tmp_path / "other.pt")])
