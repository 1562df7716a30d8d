"""medseg's MLflow pyfunc: scan paths in, mask paths out, the same masks as ``predict``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import boxes, write_nifti

from medseg.config import PredictConfig
from medseg.errors import DataError
from medseg.modelio import load_checkpoint_model
from medseg.pyfunc import CHECKPOINT, COLUMNS, save_pyfunc
from medseg.stages.predict import predict


@pytest.fixture(scope="module")
def saved(box_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pyfunc")
    net, spec = load_checkpoint_model(box_model, torch.device("cpu"))
    (root / "tmp").mkdir()
    return save_pyfunc(root / "model", net, spec, root / "tmp")


def _load(path: Path) -> object:
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(str(path))


def test_saved_model_carries_weights_spec_and_code(saved: Path, box_model: Path) -> None:
    assert (saved / "artifacts" / CHECKPOINT).is_file()
    assert (saved / "code" / "medseg" / "pyfunc.py").is_file()
    net, spec = load_checkpoint_model(saved / "artifacts" / CHECKPOINT, torch.device("cpu"))
    ref_net, ref_spec = load_checkpoint_model(box_model, torch.device("cpu"))
    assert spec == ref_spec
    for (k, v), (k2, v2) in zip(net.state_dict().items(), ref_net.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    requirements = (saved / "requirements.txt").read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and "monai" in requirements
    assert "medseg" not in requirements.replace("# ", "")  # it travels as code


def test_paths_in_mask_paths_out_same_masks_as_predict(saved: Path, box_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    first = write_nifti(tmp_path / "in" / "a.nii.gz", boxes(rng)[0])
    big = np.pad(boxes(rng)[0], ((6, 18), (0, 8), (3, 0)), mode="edge")  # another size: 64 x 48 x 35
    second = write_nifti(tmp_path / "in" / "b.nii.gz", big, np.diag([0.9, 1.1, 1.0, 1.0]))
    model = _load(saved)

    frame = model.predict(pd.DataFrame({"image": [str(first), str(second)], "case": ["", "renamed"]}),
                          params={"output_dir": str(tmp_path / "out"), "largest_component": [1, 2]})

    assert list(frame.columns) == COLUMNS
    assert list(frame["case"]) == ["a", "renamed"]
    assert list(frame["error"]) == ["", ""]
    assert list(frame["mask"]) == [str(tmp_path / "out" / "a.nii.gz"), str(tmp_path / "out" / "renamed.nii.gz")]
    assert all(0.0 <= u <= 1.0 for u in frame["uncertainty"])
    predict(tmp_path / "in", tmp_path / "reference", [str(box_model)], PredictConfig(largest_component=(1, 2)))
    for mask_path, name, scan in zip(frame["mask"], ("a", "b"), (first, second), strict=True):
        mask, scan_img = nib.load(mask_path), nib.load(str(scan))
        assert mask.shape == scan_img.shape
        np.testing.assert_allclose(mask.affine, scan_img.affine, atol=1e-6)
        expected = np.asarray(nib.load(str(tmp_path / "reference" / f"{name}.nii.gz")).dataobj)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)
        assert set(np.unique(expected)) == {0, 1, 2}


def test_a_folder_row_predicts_every_scan_in_it(saved: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    for name in ("x", "y"):
        write_nifti(tmp_path / "folder" / f"{name}.nii.gz", boxes(rng)[0])
    frame = _load(saved).predict(pd.DataFrame({"image": [str(tmp_path / "folder")]}),
                                 params={"output_dir": str(tmp_path / "out")})
    assert list(frame["case"]) == ["x", "y"]
    assert all(Path(m).is_file() for m in frame["mask"])


def test_a_bad_scan_gets_its_error_and_the_others_go_on(saved: Path, tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "in" / "good.nii.gz", boxes(np.random.default_rng(13))[0])
    nan = np.full((40, 40, 32), np.nan, dtype=np.float32)
    bad = write_nifti(tmp_path / "in" / "nan.nii.gz", nan)
    frame = _load(saved).predict(pd.DataFrame({"image": [str(good), str(bad)]}),
                                 params={"output_dir": str(tmp_path / "out")})
    assert frame.loc[0, "error"] == "" and Path(frame.loc[0, "mask"]).is_file()
    assert frame.loc[1, "mask"] == ""
    assert "nan.nii.gz" in frame.loc[1, "error"] and "NaN or infinite" in frame.loc[1, "error"]


@pytest.mark.parametrize(("name", "make", "message"), [
    ("missing.nii.gz", None, "row 0: scan {path} not found"),
    ("notes.txt", "text", "row 0: {path}: expected a NIfTI file (.nii, .nii.gz) or a folder, found another file"),
])
def test_bad_rows_are_refused_by_row_and_path(saved: Path, tmp_path: Path, name: str, make: str | None,
                                              message: str) -> None:
    path = tmp_path / name
    if make:
        path.write_text(make)
    with pytest.raises(DataError) as err:
        _load(saved).predict(pd.DataFrame({"image": [str(path)]}), params={"output_dir": str(tmp_path / "out")})
    assert message.format(path=path) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_models_logged_with_the_pytorch_flavour_before_still_load(box_model: Path, tmp_path: Path) -> None:
    import mlflow
    import mlflow.pytorch

    from medseg.modelio import SPEC_FILE, load_mlflow_model

    net, spec = load_checkpoint_model(box_model, torch.device("cpu"))
    (tmp_path / SPEC_FILE).write_text(spec.model_dump_json())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:  # what medseg logged before its pyfunc
        mlflow.pytorch.log_model(net, name="model", serialization_format="pickle",
                                 extra_files=[str(tmp_path / SPEC_FILE)])
    loaded, loaded_spec = load_mlflow_model(f"runs:/{run.info.run_id}/model", torch.device("cpu"), uri)
    assert loaded_spec == spec
    x = torch.randn(1, 1, 40, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
