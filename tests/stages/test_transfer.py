"""Transfer learning (medseg.transfer through train): weights taken from a checkpoint or an MLflow
model, all of them or the encoder's, kept fixed for the first epochs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import synthetic_msd

from medseg.config import NetworkConfig, PlanConfig, TrainConfig
from medseg.errors import ModelError
from medseg.stages.ingest import ingest
from medseg.stages.plan import plan
from medseg.stages.preprocess import preprocess
from medseg.stages.train import Tracking, train
from medseg.transfer import ENCODER_PREFIXES

DYN = TrainConfig(network=NetworkConfig(name="dynunet"), epochs=2, val_every=1, num_workers=0, seed=5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("transfer")
    src = synthetic_msd(root / "msd", n_cases=6)
    manifest = ingest(src, root / "ingest").manifest_path
    plan(manifest, root / "plan", PlanConfig(n_folds=3, target_spacing_mm=(1.0, 1.0, 1.0), batch_size=2,
                                             base_features=4, max_features=16))
    preprocess(manifest, root / "plan" / "plan.json", root / "pre")
    return root


def _train(root: Path, out: Path, config: TrainConfig, fold: int = 0, **kwargs: object):  # noqa: ANN202
    return train(root / "pre", root / "plan" / "plan.json", root / "plan" / "splits.json", out, config, fold=fold,
                 **kwargs)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def test_all_weights_frozen_for_every_epoch_stay_the_source_weights(prepared: Path, tmp_path: Path) -> None:
    source = _train(prepared, tmp_path / "source", DYN)
    config = DYN.model_copy(update={"init_from": source.model_uri, "freeze_epochs": 2})
    _train(prepared, tmp_path / "target", config, fold=1)
    before, after = _weights(Path(source.model_uri)), _weights(tmp_path / "target" / "last.pt")
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)


def test_encoder_taken_and_frozen_for_one_epoch_then_learns(prepared: Path, tmp_path: Path) -> None:
    """After epoch 1 the encoder is the source's and the decoder is not; after epoch 2 the encoder
    has learned too (resumed from epoch 1, as a cluster job would be)."""
    source = _train(prepared, tmp_path / "source", DYN)
    before = _weights(Path(source.model_uri))
    config = DYN.model_copy(update={"init_from": source.model_uri, "init_part": "encoder", "freeze_epochs": 1})
    _train(prepared, tmp_path / "target", config, fold=1, stop_after_epoch=1)
    first = _weights(tmp_path / "target" / "last.pt")
    encoder = [k for k in first if k.startswith(ENCODER_PREFIXES["dynunet"])]
    decoder = [k for k in first if k not in encoder and k.endswith("weight")]
    assert encoder and decoder
    for name in encoder:
        torch.testing.assert_close(first[name], before[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(first[k], before[k]) for k in decoder)
    _train(prepared, tmp_path / "target", config, fold=1, resume=True)
    second = _weights(tmp_path / "target" / "last.pt")
    assert any(not torch.equal(second[k], before[k]) for k in encoder if k.endswith("weight"))


def test_from_a_registered_mlflow_model(prepared: Path, tmp_path: Path) -> None:
    tracking = Tracking(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=tmp_path / "artifacts")
    source = _train(prepared, tmp_path / "source", DYN, tracking=tracking)
    assert source.model_uri.startswith("models:/")
    config = DYN.model_copy(update={"init_from": source.model_uri, "freeze_epochs": 2, "epochs": 1})
    _train(prepared, tmp_path / "target", config, fold=1, tracking=tracking)
    before = _weights(tmp_path / "source" / "best.pt")
    after = _weights(tmp_path / "target" / "last.pt")
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)


def test_another_network_or_an_unknown_model_is_refused(prepared: Path, tmp_path: Path) -> None:
    source = _train(prepared, tmp_path / "source", DYN.model_copy(update={"epochs": 1}))
    other = TrainConfig(network=NetworkConfig(name="unet", channels=(4, 8), num_res_units=0), epochs=1,
                        num_workers=0, init_from=source.model_uri)
    with pytest.raises(ModelError, match="expected a 'unet' network to start from, found 'dynunet'"):
        _train(prepared, tmp_path / "t1", other, fold=1)
    encoder_of_unet = other.model_copy(update={"init_part": "encoder"})
    with pytest.raises(ModelError, match="no separate encoder"):
        _train(prepared, tmp_path / "t2", encoder_of_unet.model_copy(
            update={"init_from": str(_train(prepared, tmp_path / "u", other.model_copy(update={"init_from": None})).model_uri)}),
            fold=1)
    with pytest.raises(ModelError, match="checkpoint not found"):
        _train(prepared, tmp_path / "t3", DYN.model_copy(update={"init_from": str(tmp_path / "nope.pt")}), fold=1)
