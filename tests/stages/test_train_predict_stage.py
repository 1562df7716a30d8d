"""plan -> preprocess -> train -> predict on small synthetic cases: checkpoints, resume, geometry."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import synthetic_case, synthetic_msd, write_nifti

from medseg.config import NetworkConfig, PlanConfig, PredictConfig, TrainConfig
from medseg.errors import ModelError
from medseg.stages.ingest import ingest
from medseg.stages.plan import plan
from medseg.stages.predict import predict
from medseg.stages.preprocess import preprocess
from medseg.stages.train import train

TINY = TrainConfig(
    network=NetworkConfig(channels=(4, 8), num_res_units=0), epochs=3, val_every=1, num_workers=0, seed=3,
)

# LPS-oriented, anisotropic voxels with a translation: nothing like the RAS 1 mm grid the model sees.
ODD_AFFINE = np.array([[-0.8, 0, 0, 40.0], [0, -0.9, 0, 12.0], [0, 0, 1.5, -7.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    src = synthetic_msd(root / "msd", n_cases=6, affine=ODD_AFFINE)
    manifest = ingest(src, root / "ingest").manifest_path
    plan(manifest, root / "plan", PlanConfig(n_folds=3, target_spacing_mm=(1.0, 1.0, 1.0), batch_size=2))
    preprocess(manifest, root / "plan" / "plan.json", root / "pre")
    return root


def _train(root: Path, out: Path, config: TrainConfig = TINY, **kwargs: object):  # noqa: ANN202
    return train(root / "pre", root / "plan" / "plan.json", root / "plan" / "splits.json", out, config, **kwargs)


def test_train_writes_checkpoints_and_history(prepared: Path, tmp_path: Path) -> None:
    result = _train(prepared, tmp_path / "fold_0")
    assert result.epochs_run == 3
    for name in ("last.pt", "best.pt", "history.json", "model.json"):
        assert (tmp_path / "fold_0" / name).exists()
    history = __import__("json").loads((tmp_path / "fold_0" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert max(h["val_dice"] for h in history) == pytest.approx(result.best_dice)
    for h in history:  # throughput and the loader's stalls, for the GPU checks of docs/benchmarks.md
        assert h["iterations_per_second"] > 0
        assert 0 <= h["data_wait_fraction"] < 1
    assert result.model_uri == str((tmp_path / "fold_0" / "best.pt").resolve())
    assert not list((tmp_path / "fold_0").glob(".*"))  # no temporary files left behind


def test_resume_gives_the_same_weights(prepared: Path, tmp_path: Path) -> None:
    _train(prepared, tmp_path / "straight")
    _train(prepared, tmp_path / "resumed", stop_after_epoch=1)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["epoch"] == 1
    result = _train(prepared, tmp_path / "resumed", resume=True)
    assert result.epochs_run == 3
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_resume_without_checkpoint_is_an_error(prepared: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="expected a checkpoint at"):
        _train(prepared, tmp_path / "none", resume=True)


def test_resume_with_another_network_is_refused(prepared: Path, tmp_path: Path) -> None:
    _train(prepared, tmp_path / "f", stop_after_epoch=1)
    other = TINY.model_copy(update={"network": NetworkConfig(channels=(4, 8, 16), num_res_units=0)})
    with pytest.raises(ModelError, match="another plan or network"):
        _train(prepared, tmp_path / "f", other, resume=True)


def test_predict_restores_original_geometry(prepared: Path, tmp_path: Path) -> None:
    _train(prepared, tmp_path / "fold_0")
    scans = tmp_path / "scans"
    rng = np.random.default_rng(9)
    image, _ = synthetic_case(rng, (30, 22, 13))  # a shape and grid the training never saw
    write_nifti(scans / "new_case.nii.gz", image, ODD_AFFINE)
    write_nifti(scans / "other.nii.gz", image[:20], ODD_AFFINE @ np.diag([1, 1, 2, 1]))
    config = PredictConfig(tta_flips=True)
    result = predict(scans, tmp_path / "masks", [str(tmp_path / "fold_0" / "best.pt")] * 2, config)
    assert sorted(p.name for p in result.written) == ["new_case.nii.gz", "other.nii.gz"]
    for name in ("new_case", "other"):
        src, mask = nib.load(str(scans / f"{name}.nii.gz")), nib.load(str(tmp_path / "masks" / f"{name}.nii.gz"))
        assert mask.shape == src.shape
        np.testing.assert_allclose(mask.affine, src.affine, atol=1e-6)
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


def test_predict_reports_bad_scan_and_goes_on(prepared: Path, tmp_path: Path) -> None:
    _train(prepared, tmp_path / "fold_0", stop_after_epoch=None)
    scans = tmp_path / "scans"
    image, _ = synthetic_case(np.random.default_rng(1), (24, 24, 16))
    write_nifti(scans / "good.nii.gz", image)
    (scans / "broken.nii.gz").write_bytes(b"\x1f\x8b truncated")
    result = predict(scans, tmp_path / "masks", [str(tmp_path / "fold_0" / "best.pt")])
    assert [p.name for p in result.written] == ["good.nii.gz"]
    assert "broken" in result.failed and str(scans / "broken.nii.gz") in result.failed["broken"]


def test_predict_unknown_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="checkpoint not found"):
        predict(tmp_path, tmp_path / "out", [str(tmp_path / "nope.pt")])


def test_2d_plan_trains_and_predicts(tmp_path: Path) -> None:
    src = synthetic_msd(tmp_path / "msd", n_cases=4, shape=(24, 24, 8))
    manifest = ingest(src, tmp_path / "ingest").manifest_path
    result = plan(manifest, tmp_path / "plan", PlanConfig(n_folds=2, dims=2, batch_size=2))
    assert result.plan.dims == 2 and result.plan.patch_size[2] == 1
    preprocess(manifest, tmp_path / "plan" / "plan.json", tmp_path / "pre")
    config = TINY.model_copy(update={"epochs": 1})
    trained = train(tmp_path / "pre", tmp_path / "plan" / "plan.json", tmp_path / "plan" / "splits.json",
                    tmp_path / "fold_0", config)
    out = predict(src / "imagesTr", tmp_path / "masks", [trained.model_uri], case_ids=["case_000"])
    mask = nib.load(str(out.written[0]))
    assert mask.shape == (24, 24, 8)


@pytest.mark.parametrize("name", ["dynunet", "resenc"])
def test_deep_supervised_network_on_the_plan_topology_trains_and_predicts(
    prepared: Path, tmp_path: Path, name: str
) -> None:
    """A plan with small feature maps (8 to 32); its topology builds the network, deep supervision
    trains it, and predict loads it back from the checkpoint's spec."""
    small = plan(prepared / "ingest" / "manifest.json", tmp_path / "plan",
                 PlanConfig(n_folds=3, target_spacing_mm=(1.0, 1.0, 1.0), batch_size=2, base_features=8,
                            max_features=32)).plan
    assert small.topology is not None and small.topology.features[0] == 8
    network = NetworkConfig(name=name, **({"blocks_per_stage": (1, 2, 2, 2, 2)} if name == "resenc" else {}))
    config = TINY.model_copy(update={"network": network, "epochs": 2})
    result = train(prepared / "pre", tmp_path / "plan" / "plan.json", prepared / "plan" / "splits.json",
                   tmp_path / "fold_0", config)
    assert result.epochs_run == 2 and np.isfinite(result.best_dice)
    scans = tmp_path / "scans"
    image, _ = synthetic_case(np.random.default_rng(5), (24, 24, 16))
    write_nifti(scans / "case.nii.gz", image)
    out = predict(scans, tmp_path / "masks", [result.model_uri])
    assert nib.load(str(out.written[0])).shape == (24, 24, 16)


def test_supervised_loss_weighs_heads_one_half_one_quarter_normalized() -> None:
    from medseg.stages.train import SupervisedLoss

    class MeanLoss(torch.nn.Module):
        def forward(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            return output.mean()

    loss = SupervisedLoss(MeanLoss())
    label = torch.zeros(2, 1, 4, 4, 4)
    heads = torch.stack([torch.full((2, 3, 4, 4, 4), float(v)) for v in (1, 2, 3)], dim=1)
    assert float(loss(heads, label)) == pytest.approx((1 * 1 + 0.5 * 2 + 0.25 * 3) / 1.75)
    assert float(loss(heads[:, 0], label)) == pytest.approx(1.0)  # no heads axis: the loss itself


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # poly over 4 epochs: (1 - e / 4)^0.9
        ({"epochs": 4}, [1.0, 0.75**0.9, 0.5**0.9, 0.25**0.9]),
        # 2 warm-up epochs (1/2, 2/2), then cosine over the other 4: (1 + cos(pi t)) / 2, t = 0, 1/4, 1/2, 3/4
        ({"epochs": 6, "warmup_epochs": 2, "schedule": "cosine"},
         [0.5, 1.0, 1.0, (1 + np.cos(np.pi / 4)) / 2, 0.5, (1 + np.cos(3 * np.pi / 4)) / 2]),
        ({"epochs": 3, "warmup_epochs": 1, "schedule": "constant"}, [1.0, 1.0, 1.0]),
    ],
)
def test_learning_rate_schedule(overrides: dict, expected: list[float]) -> None:
    from medseg.stages.train import lr_factor

    config = TrainConfig(**overrides)
    assert [lr_factor(e, config) for e in range(config.epochs)] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("elapsed", "epochs", "budget", "expected"),
    [
        (50.0, [], 100.0, False),  # nothing measured yet: go on while within the budget
        (120.0, [], 100.0, True),  # already past it
        (60.0, [30.0, 35.0], 100.0, False),  # 60 + 35 = 95 fits
        (70.0, [30.0, 35.0], 100.0, True),  # 70 + 35 = 105 would not
        (1e9, [1e9], None, False),  # no budget
    ],
)
def test_out_of_time_judges_by_the_longest_epoch(elapsed: float, epochs: list[float], budget: float | None,
                                                 expected: bool) -> None:
    from medseg.stages.train import out_of_time

    assert out_of_time(elapsed, epochs, budget) is expected


def test_time_budget_stops_with_a_usable_checkpoint(prepared: Path, tmp_path: Path) -> None:
    """A budget shorter than one epoch: training stops after the first, validated, with best.pt and
    model.json that predict can use; resume goes on from there with the same schedule."""
    config = TINY.model_copy(update={"epochs": 4, "val_every": 3, "max_minutes": 1e-4})
    result = _train(prepared, tmp_path / "fold_0", config)
    assert result.epochs_run == 1 and result.best_epoch == 1
    history = __import__("json").loads((tmp_path / "fold_0" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1] and "val_dice" in history[0]
    info = __import__("json").loads((tmp_path / "fold_0" / "model.json").read_text())
    assert info["best_epoch"] == 1
    scans = tmp_path / "scans"
    image, _ = synthetic_case(np.random.default_rng(2), (24, 24, 16))
    write_nifti(scans / "case.nii.gz", image)
    assert len(predict(scans, tmp_path / "masks", [result.model_uri]).written) == 1
    resumed = _train(prepared, tmp_path / "fold_0", config.model_copy(update={"max_minutes": None}), resume=True)
    assert resumed.epochs_run == 4
    state = torch.load(tmp_path / "fold_0" / "last.pt", weights_only=False)
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4]
    assert [h["lr"] for h in state["history"]] == pytest.approx([1e-3 * (1 - e / 4) ** 0.9 for e in range(4)])


def test_resume_after_a_kill_continues_the_same_schedule_and_mlflow_run(
    prepared: Path, tmp_path: Path, venv_bin: Path
) -> None:
    """``medseg train`` killed (SIGKILL) after its second epoch's checkpoint, then ``--resume``: the
    same epochs, learning rates and losses as a run never interrupted, in one MLflow run that has
    every epoch's metrics once."""
    import json
    import signal
    import subprocess
    import time

    import mlflow

    params = json.dumps({**TINY.model_dump(mode="json"), "epochs": 5, "iterations_per_epoch": 6, "val_every": 2})

    def command(out: Path, db: Path, *extra: str) -> list[str]:
        return [str(venv_bin / "medseg"), "train", "--preprocessed", str(prepared / "pre"),
                "--plan", str(prepared / "plan" / "plan.json"), "--splits", str(prepared / "plan" / "splits.json"),
                "--output", str(out), "--params", params, "--tracking-uri", f"sqlite:///{db}",
                "--artifact-root", str(tmp_path / "artifacts"), "--device", "cpu", *extra]

    subprocess.run(command(tmp_path / "straight", tmp_path / "a.db"), check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, tmp_path / "b.db"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            last = killed / "last.pt"
            if last.exists() and torch.load(last, weights_only=False)["epoch"] >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    epoch_at_kill = torch.load(killed / "last.pt", weights_only=False)["epoch"]
    assert 2 <= epoch_at_kill < 5
    subprocess.run(command(killed, tmp_path / "b.db", "--resume"), check=True, capture_output=True)

    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(killed / "last.pt", weights_only=False)
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3, 4, 5]
    assert [h["lr"] for h in b["history"]] == [h["lr"] for h in a["history"]]
    assert [h["train_loss"] for h in b["history"]] == [h["train_loss"] for h in a["history"]]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'b.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.fold = '0'")
    assert len(runs) == 1 and runs[0].info.run_id == b["run_id"]
    steps = [m.step for m in client.get_metric_history(b["run_id"], "train_loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert [m.step for m in client.get_metric_history(b["run_id"], "val_dice")] == [2, 4, 5]


@pytest.mark.slow
def test_compiled_training_saves_the_plain_network(prepared: Path, tmp_path: Path) -> None:
    """torch.compile (about 80 s to compile on a 2-core CPU, hence slow): the checkpoint holds the
    network's own weights (no compiled wrapper's key prefix), which predict loads."""
    result = _train(prepared, tmp_path / "fold_0", TINY.model_copy(update={"epochs": 1, "compile": True}))
    state = torch.load(tmp_path / "fold_0" / "best.pt", weights_only=False)
    assert not any(k.startswith("_orig_mod.") for k in state["model"])
    scans = tmp_path / "scans"
    image, _ = synthetic_case(np.random.default_rng(4), (24, 24, 16))
    write_nifti(scans / "case.nii.gz", image)
    assert len(predict(scans, tmp_path / "masks", [result.model_uri]).written) == 1


def test_torchrun_trains_in_two_gloo_processes(prepared: Path, tmp_path: Path, venv_bin: Path) -> None:
    """``torchrun --nproc_per_node 2 -m medseg.cli train`` on CPUs (gloo): each process takes one of
    the batch of 2; the main process alone writes checkpoints, history and one MLflow run."""
    import json
    import subprocess

    import mlflow

    params = json.dumps({**TINY.model_dump(mode="json"), "epochs": 2, "processes": 2})
    db = tmp_path / "mlflow.db"
    result = subprocess.run(
        [str(venv_bin / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "medseg.cli", "train",
         "--preprocessed", str(prepared / "pre"), "--plan", str(prepared / "plan" / "plan.json"),
         "--splits", str(prepared / "plan" / "splits.json"), "--output", str(tmp_path / "fold_0"),
         "--params", params, "--tracking-uri", f"sqlite:///{db}", "--artifact-root", str(tmp_path / "artifacts"),
         "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "fold_0" / "last.pt", weights_only=False)
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]
    assert not any(k.startswith("module.") for k in state["model"])  # the network's own weights, not DDP's
    history = json.loads((tmp_path / "fold_0" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and "val_dice" in history[-1]
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.fold = '0'")
    assert len(runs) == 1
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")) == [1, 2]


def test_cases_read_from_disk_train_as_those_kept_in_memory(prepared: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The same samples, losses and weights whether the training cases are kept or read per sample."""
    import logging

    with caplog.at_level(logging.INFO, logger="medseg.stages.train"):
        _train(prepared, tmp_path / "memory", TINY.model_copy(update={"epochs": 2}))
        _train(prepared, tmp_path / "disk", TINY.model_copy(update={"epochs": 2, "cache": "disk"}))
    assert "training cases in memory" in caplog.text and "training cases in disk" in caplog.text
    a = torch.load(tmp_path / "memory" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "disk" / "last.pt", weights_only=False)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert [h["val_dice"] for h in a["history"]] == [h["val_dice"] for h in b["history"]]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)


def test_augmentation_on_the_device_trains_and_resumes_the_same(prepared: Path, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """augment_device=device: the loader crops, the training device augments each batch (here the CPU,
    the same code as on a GPU); its own seeds per epoch keep a resumed run equal to a straight one."""
    import logging

    config = TINY.model_copy(update={"augment_device": "device"})
    with caplog.at_level(logging.INFO, logger="medseg.stages.train"):
        _train(prepared, tmp_path / "straight", config)
    assert "augmentation on cpu, after a crop in the loader" in caplog.text
    _train(prepared, tmp_path / "resumed", config, stop_after_epoch=1)
    _train(prepared, tmp_path / "resumed", config, resume=True)
    loader = _train(prepared, tmp_path / "loader", TINY.model_copy(update={"augment_device": "loader"}))
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    c = torch.load(tmp_path / "loader" / "last.pt", weights_only=False)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    losses = [h["train_loss"] for h in a["history"]]
    assert losses == [h["train_loss"] for h in b["history"]] and all(np.isfinite(losses))
    assert losses != [h["train_loss"] for h in c["history"]]  # other random draws than in the loader
    assert loader.epochs_run == 3


def test_channels_last_training_learns_the_same_and_saves_loadable_weights(prepared: Path, tmp_path: Path) -> None:
    """train.channels_last changes only the memory order: the same losses as the default order up to
    float rounding, a checkpoint that loads into a plain network, and the same predictions from it."""
    from medseg.stages.train import _memory_format

    assert _memory_format(TINY.model_copy(update={"channels_last": True}), 3) == torch.channels_last_3d
    assert _memory_format(TINY.model_copy(update={"channels_last": True}), 2) == torch.channels_last
    assert _memory_format(TINY, 3) == torch.contiguous_format
    plain = _train(prepared, tmp_path / "plain", TINY.model_copy(update={"epochs": 2}))
    last = _train(prepared, tmp_path / "last", TINY.model_copy(update={"epochs": 2, "channels_last": True}))
    a = torch.load(tmp_path / "plain" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "last" / "last.pt", weights_only=False)
    np.testing.assert_allclose([h["train_loss"] for h in b["history"]], [h["train_loss"] for h in a["history"]],
                               rtol=1e-4)
    assert any(v.dim() == 5 and not v.is_contiguous() for v in b["model"].values())  # stored channels-last
    for key in a["model"]:  # Adam turns rounding-sized gradient differences into steps of up to its rate (1e-3)
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=5e-3)
    manifest = prepared / "ingest" / "manifest.json"
    out_a = predict(manifest, tmp_path / "pred_a", [plain.model_uri], PredictConfig(), device="cpu")
    out_b = predict(manifest, tmp_path / "pred_b", [last.model_uri], PredictConfig(), device="cpu")
    assert out_a.written and len(out_a.written) == len(out_b.written)
    for x, y in zip(sorted(out_a.written), sorted(out_b.written)):
        same = np.asarray(nib.load(x).dataobj) == np.asarray(nib.load(y).dataobj)
        assert same.mean() > 0.999


def test_stop_request_ends_with_a_checkpoint_and_auto_resume_finishes_the_same(prepared: Path, tmp_path: Path) -> None:
    """A due stop request (a SLURM time limit, SIGUSR1) raises TrainingInterrupted after the epoch, with
    last.pt written and no model.json; resume="auto" then gives the uninterrupted weights and history."""
    from medseg.errors import TrainingInterrupted
    from medseg.walltime import StopRequest

    _train(prepared, tmp_path / "straight")
    stopped = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted, match=r"stopped after epoch 1 of 3: SIGUSR1 asked for a stop"):
        _train(prepared, stopped, stop=StopRequest(signalled=True))
    assert torch.load(stopped / "last.pt", weights_only=False)["epoch"] == 1
    assert not (stopped / "model.json").exists()
    # a limit far away does not stop it; "auto" takes the checkpoint up
    result = _train(prepared, stopped, resume="auto", stop=StopRequest(end_time=4e9, margin_s=60))
    assert result.epochs_run == 3
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(stopped / "last.pt", weights_only=False)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_auto_resume_starts_afresh_from_another_schedule_and_without_a_checkpoint(
        prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "f"
    assert _train(prepared, out, resume="auto").epochs_run == 3  # no last.pt: a fresh start, no error
    _train(prepared, out, stop_after_epoch=1)
    longer = TINY.model_copy(update={"epochs": 4})
    result = _train(prepared, out, longer, resume="auto")  # the checkpoint's schedule spans 3 epochs: afresh
    assert result.epochs_run == 4
    history = torch.load(out / "last.pt", weights_only=False)["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # a setting that does not change what is computed (max_minutes) resumes
    _train(prepared, out, stop_after_epoch=2)
    budget = TINY.model_copy(update={"max_minutes": 30.0, "num_workers": 0})
    assert _train(prepared, out, budget, resume="auto").epochs_run == 3
    assert len(torch.load(out / "last.pt", weights_only=False)["history"]) == 3
