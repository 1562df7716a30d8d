"""The CUDA paths on a real GPU: mixed precision, augmentation on the device, torch.compile with
channels-last, sliding-window prediction on the device, and the plan's GPU batch. Marked ``gpu``:
``pytest -m gpu`` (bench/gpu_check.sh) runs them on a GPU machine; ``make test`` deselects them
(pyproject.toml's addopts). Selected without a GPU they fail, naming what is missing: they are
never skipped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import synthetic_msd

from medseg.config import NetworkConfig, PlanConfig, PredictConfig, TrainConfig
from medseg.stages.ingest import ingest
from medseg.stages.plan import plan
from medseg.stages.predict import predict
from medseg.stages.preprocess import preprocess
from medseg.stages.train import train

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail(f"these tests need a CUDA device; found none (torch {torch.__version__}, built for CUDA "
                    f"{torch.version.cuda}); make test leaves them out")

TINY = TrainConfig(
    network=NetworkConfig(channels=(8, 16), num_res_units=0), epochs=3, val_every=1, num_workers=0, seed=3,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    src = synthetic_msd(root / "msd", n_cases=6)
    manifest = ingest(src, root / "ingest").manifest_path
    plan(manifest, root / "plan", PlanConfig(n_folds=3, target_spacing_mm=(1.0, 1.0, 1.0), batch_size=2))
    preprocess(manifest, root / "plan" / "plan.json", root / "pre")
    return root


def _train(root: Path, out: Path, config: TrainConfig, device: str = "cuda"):  # noqa: ANN202
    return train(root / "pre", root / "plan" / "plan.json", root / "plan" / "splits.json", out, config, device=device)


def _masks(paths: list[Path]) -> list[np.ndarray]:
    return [np.asarray(nib.load(p).dataobj) for p in sorted(paths)]


@pytest.mark.parametrize("amp, dtype", [(False, "float16"), (True, "float16"), (True, "bfloat16")],
                         ids=["float32", "float16", "bfloat16"])
def test_training_on_the_gpu_in_each_precision_augments_there_and_learns(
        prepared: Path, tmp_path: Path, amp: bool, dtype: str, caplog: pytest.LogCaptureFixture) -> None:
    config = TINY.model_copy(update={"amp": amp, "amp_dtype": dtype, "epochs": 6})
    with caplog.at_level(logging.INFO, logger="medseg.stages.train"):
        result = _train(prepared, tmp_path / "fold_0", config)
    assert "augmentation on cuda" in caplog.text and "after a crop in the loader" in caplog.text  # auto on a GPU
    history = json.loads((tmp_path / "fold_0" / "history.json").read_text())
    losses = [h["train_loss"] for h in history]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # it learns in every precision (float16 through the loss scaler)
    assert 0 <= result.best_dice <= 1
    checkpoint = torch.load(tmp_path / "fold_0" / "last.pt", map_location="cpu", weights_only=False)
    assert all(v.dtype == torch.float32 for v in checkpoint["model"].values() if v.is_floating_point())


def test_gpu_prediction_agrees_with_the_cpu(prepared: Path, tmp_path: Path) -> None:
    """The same checkpoint, sliding-window prediction on the GPU (float16 autocast, stitching on the
    device) and on the CPU (float32): the masks agree on almost every voxel."""
    model = _train(prepared, tmp_path / "fold_0", TINY.model_copy(update={"epochs": 4}), device="cpu").model_uri
    manifest = prepared / "ingest" / "manifest.json"
    config = PredictConfig(tta_flips=True)
    on_cpu = predict(manifest, tmp_path / "cpu", [model], config, device="cpu")
    on_gpu = predict(manifest, tmp_path / "gpu", [model], config, device="cuda")
    assert len(on_gpu.written) == len(on_cpu.written) == 6
    for a, b in zip(_masks(on_cpu.written), _masks(on_gpu.written)):
        assert a.shape == b.shape
        assert (a == b).mean() > 0.999
    record = json.loads((tmp_path / "gpu" / "predict.json").read_text())
    assert record["config"]["amp"] is True


def test_compiled_channels_last_training_on_the_gpu_saves_the_plain_network(prepared: Path, tmp_path: Path) -> None:
    config = TINY.model_copy(update={"compile": True, "channels_last": True, "epochs": 2})
    result = _train(prepared, tmp_path / "fold_0", config)
    checkpoint = torch.load(tmp_path / "fold_0" / "last.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("_orig_mod.") for k in checkpoint["model"])  # loadable without compiling
    assert all(np.isfinite(h["train_loss"]) for h in checkpoint["history"])
    out = predict(prepared / "ingest" / "manifest.json", tmp_path / "pred", [result.model_uri], PredictConfig(),
                  device="cuda")
    assert len(out.written) == 6


def test_the_plan_on_a_gpu_takes_its_memory_for_the_batch(prepared: Path, tmp_path: Path) -> None:
    manifest = prepared / "ingest" / "manifest.json"
    auto = plan(manifest, tmp_path / "auto", PlanConfig(n_folds=3)).plan
    assert auto.decisions["device"].startswith(f"cuda: auto: CUDA device 0 ({torch.cuda.get_device_name(0)})")
    assert "the memory of CUDA device 0" in auto.decisions["memory_budget_gb"]
    total_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert f"{total_gb:.1f} GB budget" in auto.decisions["patch_size"]
    on_cpu = plan(manifest, tmp_path / "cpu", PlanConfig(n_folds=3, device="cpu")).plan
    assert on_cpu.batch_size == 2 <= auto.batch_size
