"""The prediction settings a model was validated with: read beside its checkpoint, used where not given."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import boxes, write_nifti

from medseg.config import PredictConfig, section_from_sources
from medseg.errors import DataError
from medseg.modelio import load_checkpoint_model
from medseg.pyfunc import CHECKPOINT, save_pyfunc, settings
from medseg.stages.predict import predict
from medseg.validated import FILE, Validated, publish, read, resolve, weights_digest

FLIPS = {"overlap": 0.25, "gaussian": False, "tta_flips": True, "largest_component": [1]}


def _record(weights: str = "0" * 16, **settings: object) -> Validated:
    return Validated(weights=weights, settings={**FLIPS, **settings}, mean_dice=0.8123, n_cases=7, evaluation="/e")


def test_the_record_fills_every_setting_not_given() -> None:
    config, origin = resolve(PredictConfig(overlap=0.6, sw_batch_size=2), [_record()], ["models:/m/1"])
    assert config.overlap == 0.6  # given
    assert (config.gaussian, config.tta_flips, config.largest_component) == (False, True, (1,))  # validated
    assert config.sw_batch_size == 2 and config.dicom_seg is True  # given, and a default
    assert origin == {"model": "models:/m/1", "mean_dice": 0.8123, "n_cases": 7, "evaluation": "/e",
                      "taken": ["gaussian", "largest_component", "tta_flips"], "given": ["overlap", "sw_batch_size"]}


def test_without_a_record_or_with_every_setting_given_the_config_is_kept(tmp_path: Path) -> None:
    given = PredictConfig(tta_flips=False)
    assert resolve(given, [None], ["a.pt"]) == (given, None)
    assert resolve(None, [None], ["a.pt"]) == (PredictConfig(), None)
    files = tmp_path / "c.yaml"
    files.write_text("predict:\n  overlap: 0.3\n")
    from_files = section_from_sources(PredictConfig, "predict", config_files=[files], params_json=None)
    config, origin = resolve(from_files, [_record()], ["models:/m/1"])  # a config file sets every key
    assert origin is None and (config.overlap, config.tta_flips, config.largest_component) == (0.3, False, ())
    from_params = section_from_sources(PredictConfig, "predict", config_files=[], params_json='{"tta_flips": false}')
    config, origin = resolve(from_params, [_record()], ["models:/m/1"])
    assert config.tta_flips is False and config.overlap == 0.25 and origin["given"] == ["tta_flips"]


def test_an_ensemble_validated_differently_takes_the_first_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="medseg.validated"):
        config, origin = resolve(None, [_record(), _record(tta_flips=False), None], ["m1", "m2", "m3"])
    assert config.tta_flips is True and origin["model"] == "m1"
    assert "using those of m1 (not those of m2, m3)" in caplog.text


def test_a_record_of_other_weights_is_not_used(box_model: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "fold_0"
    folder.mkdir()
    shutil.copyfile(box_model, folder / "best.pt")
    net, spec = load_checkpoint_model(folder / "best.pt", torch.device("cpu"))
    assert spec.validated is None
    publish(_record(weights_digest(net)), folder, None, None)
    assert load_checkpoint_model(folder / "best.pt", torch.device("cpu"))[1].validated == _record(weights_digest(net))
    assert "validated" not in spec.model_dump()  # never saved into a checkpoint
    publish(_record("f" * 16), folder, None, None)
    with caplog.at_level(logging.WARNING, logger="medseg.validated"):
        assert load_checkpoint_model(folder / "best.pt", torch.device("cpu"))[1].validated is None
    assert f"{folder / FILE}: made for other weights (ffffffffffffffff" in caplog.text


def test_a_damaged_record_is_named(box_model: Path, tmp_path: Path) -> None:
    net, _ = load_checkpoint_model(box_model, torch.device("cpu"))
    (tmp_path / FILE).write_text(json.dumps({"weights": "x", "settings": {}}))
    with pytest.raises(DataError, match=rf"{tmp_path / FILE}: expected the validated prediction settings"):
        read(tmp_path, net)


def test_predict_and_the_pyfunc_take_the_record_and_give_the_same_masks(box_model: Path, tmp_path: Path) -> None:
    import mlflow.pyfunc

    rng = np.random.default_rng(5)
    scan = write_nifti(tmp_path / "in" / "a.nii.gz", boxes(rng)[0])
    folder = tmp_path / "fold_0"
    folder.mkdir()
    shutil.copyfile(box_model, folder / "best.pt")
    net, spec = load_checkpoint_model(folder / "best.pt", torch.device("cpu"))
    record = _record(weights_digest(net))
    publish(record, folder, None, None)
    (tmp_path / "tmp").mkdir()
    saved = save_pyfunc(tmp_path / "model", net, spec, tmp_path / "tmp")
    publish(record, saved / "artifacts", None, None)  # where evaluate puts it in a registered model
    assert (saved / "artifacts" / CHECKPOINT).is_file()

    predict(scan.parent, tmp_path / "validated", [str(folder / "best.pt")])
    predict(scan.parent, tmp_path / "explicit", [str(box_model)], PredictConfig(**FLIPS))  # no record beside it
    predict(scan.parent, tmp_path / "defaults", [str(box_model)])
    model = mlflow.pyfunc.load_model(str(saved))
    for out, params in (("pyfunc", {}), ("pyfunc_given", {"tta_flips": False}),
                        ("pyfunc_defaults", {"validated_settings": False})):
        model.predict(pd.DataFrame({"image": [str(scan)]}), params={"output_dir": str(tmp_path / out), **params})

    def made(out: str) -> tuple[dict, np.ndarray]:
        record = json.loads((tmp_path / out / "predict.json").read_text())
        return record, np.asarray(nib.load(str(tmp_path / out / "a.nii.gz")).dataobj)

    explicit = made("explicit")[1]
    for out in ("validated", "pyfunc"):
        info, mask = made(out)
        assert info["config"]["tta_flips"] is True and info["config"]["overlap"] == 0.25, out
        assert info["validated"]["taken"] == ["gaussian", "largest_component", "overlap", "tta_flips"], out
        np.testing.assert_array_equal(mask, explicit, err_msg=out)
    info, _ = made("pyfunc_given")
    assert info["config"]["tta_flips"] is False and info["validated"]["given"] == ["tta_flips"]
    assert made("pyfunc_defaults")[0]["validated"] is None and made("defaults")[0]["validated"] is None
    assert made("pyfunc_defaults")[0]["config"] == made("defaults")[0]["config"]
    assert settings({}).model_fields_set == set()
