"""Determinism: the same seed and config give the same plan, preprocessed arrays and (on a CPU) training.

What changes a result, and what medseg pins:
- ingest and preprocessing have no randomness: two runs give the same NIfTI files, manifest, plan and
  split, and two runs and a run with two worker processes give preprocessed arrays with
  the same bytes, and .npz files with the same bytes (numpy stamps their members 1980-01-01);
- a training reseeds Python, NumPy, torch and MONAI's transforms from ``train.seed`` + epoch, and
  MONAI's ``set_determinism`` pins cuDNN (deterministic, no benchmark); two trainings with the same
  seed on the CPU with the same torch thread count give the same losses, validation Dice and weights;
- torch's thread count changes the float rounding of the weights (not the Dice at this size):
  results are equal bitwise only for equal thread counts;
- ``train.num_workers`` changes the random draws of augmentation (MONAI seeds each loader worker
  from the loader's seed): each value is reproducible, but 0 and 2 train differently.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_msd

from medseg.config import NetworkConfig, PlanConfig, PreprocessConfig, TrainConfig
from medseg.io import sha256

TINY = TrainConfig(network=NetworkConfig(channels=(4, 8), num_res_units=0), epochs=3, val_every=1,
                   iterations_per_epoch=4, num_workers=0, seed=3)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def array_digests(folder: Path) -> dict[str, str]:
    """Each preprocessed case -> the SHA-256 of its arrays (names, dtypes, shapes and bytes)."""
    out = {}
    for path in sorted(folder.glob("*.npz")):
        digest = hashlib.sha256()
        with np.load(path) as data:
            for name in sorted(data.files):
                array = np.ascontiguousarray(data[name])
                digest.update(f"{name} {array.dtype} {array.shape}".encode())
                digest.update(array.tobytes())
        out[path.stem] = digest.hexdigest()
    return out


def _prepare(src: Path, root: Path, *, workers: int = 1, spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
             ) -> Path:
    from medseg.stages.ingest import ingest
    from medseg.stages.plan import plan
    from medseg.stages.preprocess import preprocess

    manifest = ingest(src, root / "ingest").manifest_path
    plan(manifest, root / "plan", PlanConfig(n_folds=2, target_spacing_mm=spacing_mm, batch_size=2))
    preprocess(manifest, root / "plan" / "plan.json", root / "pre", PreprocessConfig(workers=workers))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same synthetic cases ingested, planned and preprocessed twice, and once with 2 workers."""
    base = tmp_path_factory.mktemp("determinism")
    src = synthetic_msd(base / "msd", n_cases=4, seed=11)
    return {"a": _prepare(src, base / "a"), "b": _prepare(src, base / "b"),
            "workers": _prepare(src, base / "workers", workers=2)}


def test_same_config_gives_the_same_plan_split_and_preprocessed_arrays(runs: dict[str, Path]) -> None:
    digests = {name: array_digests(root / "pre") for name, root in runs.items()}
    assert len(set(digests["a"].values())) == 4  # four cases, four digests
    assert digests["a"] == digests["b"] == digests["workers"]
    files = {name: {p.name: sha256(p) for p in (root / "pre").glob("*.npz")} for name, root in runs.items()}
    assert files["a"] == files["b"] == files["workers"]
    for name in ("plan.json", "splits.json"):
        assert (runs["a"] / "plan" / name).read_text() == (runs["b"] / "plan" / name).read_text()
    ingested = [{str(p.relative_to(root)): sha256(p) for p in sorted((root / "ingest").rglob("*.*"))}
                for root in (runs["a"], runs["b"])]
    assert ingested[0] == ingested[1] and len(ingested[0]) == 4 + 4 + 1  # NIfTI (gzip without a time) and manifest
    print({case: d[:12] for case, d in digests["a"].items()})


def _train(root: Path, out: Path, threads: int = 1, **changes: object) -> dict:
    from medseg.stages.train import train

    with torch_threads(threads):
        train(root / "pre", root / "plan" / "plan.json", root / "plan" / "splits.json", out,
              TINY.model_copy(update=changes), device="cpu")
    return torch.load(out / "last.pt", weights_only=False)


def _scores(state: dict) -> list[list[float]]:
    """Per epoch: the train loss and the validation Dice (mean and per class)."""
    return [[h[k] for k in sorted(h) if k.startswith("val_dice") or k == "train_loss"] for h in state["history"]]


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def baseline(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """TINY trained on the CPU with one torch thread: 3 epochs of 4 iterations."""
    return _train(runs["a"], tmp_path_factory.mktemp("baseline"))


def test_same_seed_gives_the_same_validation_metrics_and_weights_on_the_cpu(runs: dict[str, Path], baseline: dict,
                                                                          tmp_path: Path) -> None:
    again = _train(runs["a"], tmp_path / "again")
    assert _scores(again) == _scores(baseline) and len(_scores(baseline)) == 3
    assert _same_weights(again, baseline)
    other_seed = _train(runs["a"], tmp_path / "seed4", seed=4, epochs=1)  # epoch 1 does not depend on epochs
    assert _scores(other_seed)[0] != _scores(baseline)[0]
    # medseg (MONAI's set_determinism) pins cuDNN: no benchmark autotuning, deterministic kernels
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    print(f"val Dice by epoch: {[h['val_dice'] for h in baseline['history']]}; torch's deterministic algorithms "
          f"(GPU atomics): {'on' if torch.are_deterministic_algorithms_enabled() else 'off'}")


def test_torch_thread_count_changes_the_weights_by_rounding(runs: dict[str, Path], tmp_path: Path) -> None:
    one = _train(runs["a"], tmp_path / "one", threads=1, epochs=1)
    two = _train(runs["a"], tmp_path / "two", threads=2, epochs=1)
    again = _train(runs["a"], tmp_path / "again", threads=2, epochs=1)
    assert _same_weights(two, again)  # the same thread count: the same weights
    assert not _same_weights(one, two)  # another: other rounding in the reductions
    difference = max(float((one["model"][k] - two["model"][k]).abs().max()) for k in two["model"])
    steps = TINY.iterations_per_epoch
    print(f"largest weight difference between 1 and 2 threads after {steps} steps: {difference:.2e}")
    assert difference <= steps * TINY.learning_rate  # AdamW moves a weight at most its rate per step
    np.testing.assert_allclose(np.array(_scores(two)), np.array(_scores(one)), rtol=1e-3)


def test_loader_workers_change_the_augmentation_draws(runs: dict[str, Path], baseline: dict, tmp_path: Path) -> None:
    """Each num_workers value is reproducible, but another one draws other augmentations: a training
    resumed with another num_workers (resume="auto" allows it) goes on differently."""
    two = _train(runs["a"], tmp_path / "w2", num_workers=2, epochs=1)
    again = _train(runs["a"], tmp_path / "w2_again", num_workers=2, epochs=1)
    assert _same_weights(two, again) and _scores(two) == _scores(again)
    loss = {"0": baseline["history"][0]["train_loss"], "2": two["history"][0]["train_loss"]}
    print(f"first-epoch train loss by num_workers: {loss}")
    assert loss["0"] != loss["2"]  # other samples, not rounding: the first epoch of one thread


def test_preprocess_leaves_the_callers_torch_threads(tmp_path: Path) -> None:
    src = synthetic_msd(tmp_path / "msd", n_cases=2, shape=(16, 16, 8))
    from medseg.stages.ingest import ingest
    from medseg.stages.plan import plan
    from medseg.stages.preprocess import preprocess

    manifest = ingest(src, tmp_path / "ingest").manifest_path
    plan(manifest, tmp_path / "plan", PlanConfig(n_folds=2, batch_size=2))
    with torch_threads(2):
        preprocess(manifest, tmp_path / "plan" / "plan.json", tmp_path / "pre")
        assert torch.get_num_threads() == 2
