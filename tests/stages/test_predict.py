"""predict at scale: other geometries, one model load for many scans, resume after a kill, outputs.

One small model is trained once for the module (about 10 s) on synthetic cases: two adjacent
boxes (labels 1 and 2, 12 x 20 x 20 mm each) brighter than a noisy background, which it learns
to a validation Dice above 0.95.
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
from conftest import write_nifti
from nibabel.processing import resample_from_to

import medseg.stages.predict as predict_module
from medseg.config import NetworkConfig, PlanConfig, PredictConfig, TrainConfig
from medseg.errors import DataError
from medseg.stages.ingest import ingest
from medseg.stages.plan import plan
from medseg.stages.predict import predict
from medseg.stages.preprocess import preprocess
from medseg.stages.train import train

SHAPE = (40, 40, 32)
LABELS = {"0": "background", "1": "left", "2": "right"}


def boxes(rng: np.random.Generator, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Image and label: boxes of label 1 (x 8..19) and 2 (x 20..31), moved by up to 3 voxels."""
    label = np.zeros(shape, dtype=np.uint8)
    ox, oy, oz = rng.integers(-3, 4, size=3)
    label[8 + ox : 20 + ox, 10 + oy : 30 + oy, 6 + oz : 26 + oz] = 1
    label[20 + ox : 32 + ox, 10 + oy : 30 + oy, 6 + oz : 26 + oz] = 2
    image = rng.normal(10.0, 1.0, size=shape).astype(np.float32)
    image[label == 1] += 6
    image[label == 2] += 12
    return image, label


def dice(mask: np.ndarray, ref: np.ndarray, c: int) -> float:
    p, r = mask == c, ref == c
    return float(2 * (p & r).sum() / (p.sum() + r.sum()))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model")
    rng = np.random.default_rng(0)
    training = []
    for i in range(6):
        image, label = boxes(rng)
        write_nifti(root / "msd" / "imagesTr" / f"c{i}.nii.gz", image)
        write_nifti(root / "msd" / "labelsTr" / f"c{i}.nii.gz", label)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    info = {"name": "boxes", "modality": {"0": "MRI"}, "labels": LABELS, "training": training, "test": []}
    (root / "msd" / "dataset.json").write_text(json.dumps(info))
    manifest = ingest(root / "msd", root / "ingest").manifest_path
    plan(manifest, root / "plan", PlanConfig(n_folds=3, target_spacing_mm=(1.0, 1.0, 1.0), batch_size=2))
    preprocess(manifest, root / "plan" / "plan.json", root / "pre")
    config = TrainConfig(network=NetworkConfig(channels=(4, 8), num_res_units=0), epochs=60, val_every=5,
                         num_workers=0, seed=3, learning_rate=3e-2)
    result = train(root / "pre", root / "plan" / "plan.json", root / "plan" / "splits.json", root / "fold_0", config)
    assert result.best_dice > 0.95, result.best_dice
    return root / "fold_0" / "best.pt"


def scans(folder: Path, n: int, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_nifti(folder / f"scan_{i:02d}.nii.gz", boxes(rng)[0])
    return folder


def test_scan_resampled_and_flipped_is_segmented_on_its_own_grid(model: Path, tmp_path: Path) -> None:
    # A new case on the training grid (1 mm, RAS), and the same case resampled to 0.8 x 0.8 x 2 mm
    # voxels with x running the other way (an LPS-like first axis): image trilinear, label nearest.
    image, label = boxes(np.random.default_rng(42))
    grid = (50, 50, 16)
    affine = np.array([[-0.8, 0, 0, 39.2], [0, 0.8, 0, 0.0], [0, 0, 2.0, 0.0], [0, 0, 0, 1]])
    moved = resample_from_to(nib.Nifti1Image(image, np.eye(4)), (grid, affine), order=1, mode="nearest")
    reference = np.asarray(resample_from_to(nib.Nifti1Image(label, np.eye(4)), (grid, affine), order=0).dataobj)
    write_nifti(tmp_path / "scans" / "moved.nii.gz", np.asarray(moved.dataobj, dtype=np.float32), affine)

    predict(tmp_path / "scans", tmp_path / "masks", [str(model)])

    out = nib.load(str(tmp_path / "masks" / "moved.nii.gz"))
    assert out.shape == grid
    np.testing.assert_allclose(out.affine, affine, atol=1e-6)
    mask = np.asarray(out.dataobj)
    assert dice(mask, reference, 1) >= 0.95
    assert dice(mask, reference, 2) >= 0.95
    # and the model did not simply memorize a position: the boxes are mirrored on this grid
    assert dice(mask[::-1], reference, 1) < 0.5


def test_twenty_scans_load_the_model_once_and_get_qc(model: Path, tmp_path: Path,
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
    result = predict(folder, tmp_path / "masks", [str(model)], PredictConfig(prefetch=2))

    assert loads == [str(model)]
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


def test_killed_prediction_resumes_with_the_missing_cases(model: Path, tmp_path: Path, venv_bin: Path) -> None:
    folder = scans(tmp_path / "scans", 20)
    out = tmp_path / "masks"
    command = [str(venv_bin / "medseg"), "predict", "--input", str(folder), "--output", str(out),
               "--model", str(model), "--params", json.dumps({"tta_flips": True})]
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

    result = predict(folder, out, [str(model)], PredictConfig(tta_flips=True))

    assert sorted(result.skipped) == done
    assert len(result.written) == 20 and not result.failed
    assert {case: (out / f"{case}.nii.gz").stat().st_mtime_ns for case in done} == stamps  # not redone
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no partial files left
    with open(out / "cases.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 20


def test_folder_of_other_models_or_settings_is_refused_unless_overwritten(model: Path, tmp_path: Path) -> None:
    folder = scans(tmp_path / "scans", 2)
    out = tmp_path / "masks"
    predict(folder, out, [str(model)])
    again = predict(folder, out, [str(model)])
    assert sorted(again.skipped) == ["scan_00", "scan_01"]
    with pytest.raises(DataError, match=r"masks: expected an empty folder or one with predictions of the same"):
        predict(folder, out, [str(model)], PredictConfig(tta_flips=True))
    redone = predict(folder, out, [str(model)], PredictConfig(tta_flips=True), overwrite=True)
    assert redone.skipped == [] and len(redone.written) == 2
    assert json.loads((out / "predict.json").read_text())["config"]["tta_flips"] is True


def test_uncertainty_and_probability_maps(model: Path, tmp_path: Path) -> None:
    folder = scans(tmp_path / "scans", 1)
    config = PredictConfig(uncertainty_maps=True, probability_maps=True, tta_flips=True)
    predict(folder, tmp_path / "masks", [str(model)], config)
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


def test_scan_touching_the_edge_is_flagged(model: Path, tmp_path: Path) -> None:
    image, _ = boxes(np.random.default_rng(3))
    write_nifti(tmp_path / "scans" / "cut.nii.gz", image[14:])  # the left box (x 5..22 at most) runs into the x = 0 face
    predict(tmp_path / "scans", tmp_path / "masks", [str(model)])
    qc = json.loads((tmp_path / "masks" / "qc" / "cut.json").read_text())
    assert "edge" in qc["flags"] and "left" in qc["details"]["edge"]


def test_bad_scans_are_reported_by_name_and_the_others_go_on(model: Path, tmp_path: Path) -> None:
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

    result = predict(folder, tmp_path / "masks", [str(model)])

    assert sorted(p.name for p in result.written) == ["good.nii.gz", "tiny.nii.gz"]
    expected = {
        "two_channels": "two_channels.nii.gz: expected a 3D scan for this model, found shape (40, 40, 32, 2)",
        "flat": "flat.nii.gz: expected a 3D scan for this model, found shape (40, 40)",
        "with_nan": "with_nan.nii.gz: expected finite voxel values, found NaN or infinite ones",
        "blank": "blank.nii.gz: could not be preprocessed: every voxel is 0",
    }
    assert sorted(result.failed) == sorted(expected)
    for case_id, message in expected.items():
        assert message in result.failed[case_id]
    assert not (tmp_path / "masks" / "qc" / "blank.json").exists()
