"""The registered model as an MLflow ``python_function``: scan paths in, mask paths out.

Training registers every model this way (``log_pyfunc``), so any MLflow tool can
use it without medseg's commands::

    mlflow models predict -m models:/<name>/<version> -t json -i scans.json -o masks.json

with ``scans.json``::

    {"dataframe_records": [{"image": "/data/ct_001.nii.gz"}, {"image": "/data/ct_002"}],
     "params": {"output_dir": "/data/masks"}}

Each row names a NIfTI file or a folder (a DICOM series or a folder of NIfTI scans; every scan
found in it becomes a case). An optional ``case`` column names the case of a file; the default
is the file's name without its extension. The answer has a row per case: ``case``, ``image``,
``mask`` (the path of the mask, written as ``medseg predict`` writes it, in the scan's own
geometry, with QC in ``qc/`` and ``cases.csv``), ``qc_flags``, ``uncertainty`` and ``error``
(empty unless the case failed; the other cases go on). Params: ``output_dir`` (default
``medseg-predictions`` in the working folder), ``overwrite``, ``tta_flips`` (the 8 flips) and
``largest_component`` (the labels of evaluate's ``postprocessing.json``). A model that evaluate
scored predicts with the settings it was validated with (``medseg.validated``: flips, overlap,
Gaussian weighting, the largest-component decision): ``tta_flips`` and a non-empty
``largest_component`` override them, and ``validated_settings: false`` leaves them for medseg's
defaults.

The model carries everything it needs: the network's weights and its spec (the plan and the
preprocessing) in one checkpoint file (``medseg_model.pt``, an artifact), and medseg's own code
(``code_paths``), so it needs medseg's dependencies but not medseg installed. The network is
stored as weights, not as an exported graph, so it takes scans of any size. ``MEDSEG_DEVICE``
(``auto``, ``cpu``, ``cuda:1``) picks the device where it is loaded.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
import torch

from medseg.config import PredictConfig
from medseg.errors import DataError, MedsegError
from medseg.io import NIFTI_SUFFIXES, strip_nifti_suffix
from medseg.modelio import CHECKPOINT, SPEC_FILE, ModelSpec, load_checkpoint_model, resolve_device

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "medseg-predictions"
COLUMNS = ["case", "image", "mask", "qc_flags", "uncertainty", "error"]


def save_checkpoint(path: Path, net: torch.nn.Module, spec: ModelSpec) -> Path:
    """The weights and spec in the checkpoint format ``load_checkpoint_model`` reads."""
    torch.save({"spec": spec.model_dump(mode="json"), "model": net.state_dict()}, path)
    return path


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "case", required=False)]),
        outputs=Schema([ColSpec("string", c) for c in ("case", "image", "mask", "qc_flags")]
                       + [ColSpec("double", "uncertainty"), ColSpec("string", "error")]),
        params=ParamSchema([
            ParamSpec("output_dir", "string", DEFAULT_OUTPUT),
            ParamSpec("tta_flips", "boolean", None),  # None: as validated
            ParamSpec("overwrite", "boolean", False),
            ParamSpec("largest_component", "long", [], shape=(-1,)),  # empty: as validated
            ParamSpec("validated_settings", "boolean", True),
        ]),
    )


def requirements() -> list[str]:
    """medseg's own dependencies (it travels as code), with this torch pinned."""
    torch_version = torch.__version__.split("+")[0]
    out = [f"torch=={torch_version}"]
    for req in metadata.requires("medseg") or []:
        if "extra ==" in req or req.replace(" ", "").lower().startswith("torch"):
            continue
        out.append(req.split(";")[0].strip())
    return out


def settings(params: dict[str, Any]) -> PredictConfig:
    """The prediction settings of the params: those given are set explicitly, so the others come from
    the model's validation (``medseg.validated``), unless ``validated_settings`` is false."""
    given: dict[str, Any] = {}
    if params.get("tta_flips") is not None:
        given["tta_flips"] = bool(params["tta_flips"])
    if params.get("largest_component"):
        given["largest_component"] = tuple(int(c) for c in params["largest_component"])
    config = PredictConfig(**given)
    if params.get("validated_settings", True) is False:
        return PredictConfig.model_validate(config.model_dump())  # every setting given: the defaults
    return config


def _cases(frame: pd.DataFrame) -> list[Any]:
    """The cases a table of scan paths names, in its order."""
    from medseg.sources import CaseSource, discover

    if "image" not in frame.columns:
        raise DataError(f"expected a column 'image' of scan paths, found columns {list(frame.columns)}")
    cases: list[CaseSource] = []
    for i, row in enumerate(frame.to_dict("records")):
        path = Path(str(row["image"])).expanduser()
        if not path.exists():
            raise DataError(f"row {i}: scan {path} not found")
        if path.is_dir():
            found = discover(path)
            cases += list(found.test_cases or found.cases)
            continue
        if not path.name.endswith(NIFTI_SUFFIXES):
            raise DataError(f"row {i}: {path}: expected a NIfTI file (.nii, .nii.gz) or a folder, found another file")
        name = row.get("case")
        case_id = str(name) if isinstance(name, str) and name else strip_nifti_suffix(path.name)
        cases.append(CaseSource(case_id, (path.resolve(),)))
    if not cases:
        raise DataError("expected at least one scan, found an empty table")
    return cases


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """medseg's network with its plan: ``predict`` takes a table of scan paths (see the module doc)."""

    def load_context(self, context: Any) -> None:
        self.device = resolve_device(os.environ.get("MEDSEG_DEVICE", "auto"))
        self.loaded = load_checkpoint_model(Path(context.artifacts["checkpoint"]), self.device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from medseg.qc import read_case_qc
        from medseg.prediction import predict_cases

        params = params or {}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame({"image": list(model_input)})
        cases = _cases(frame)
        out_dir = Path(str(params.get("output_dir") or DEFAULT_OUTPUT)).expanduser().resolve()
        config = settings(params)
        try:
            result = predict_cases(cases, out_dir, [self.loaded], ["mlflow pyfunc"], config, device=self.device,
                                   overwrite=bool(params.get("overwrite", False)), source="the input table")
            failed = result.failed
        except MedsegError as err:
            if "no scan could be predicted" not in str(err):
                raise
            failed = {c.case_id: str(err) for c in cases}
        rows = []
        for case in cases:
            error = failed.get(case.case_id, "")
            mask = out_dir / f"{case.case_id}.nii.gz"
            flags, score = "", float("nan")
            if not error:
                qc = read_case_qc(out_dir, case.case_id)
                flags, score = ";".join(qc.get("flags", [])), float(qc.get("uncertainty", float("nan")))
            rows.append({"case": case.case_id, "image": str(case.images[0]), "mask": "" if error else str(mask),
                         "qc_flags": flags, "uncertainty": score, "error": error})
        return pd.DataFrame(rows, columns=COLUMNS)


def _model_parts(net: torch.nn.Module, spec: ModelSpec, tmp_dir: Path) -> dict[str, Any]:
    checkpoint = save_checkpoint(Path(tmp_dir) / CHECKPOINT, net.cpu().eval(), spec)
    spec_file = Path(tmp_dir) / SPEC_FILE
    spec_file.write_text(spec.model_dump_json(indent=2))
    return {
        "python_model": SegmentationModel(),
        "artifacts": {"checkpoint": str(checkpoint), "spec": str(spec_file)},
        "code_paths": [str(Path(__file__).resolve().parent)],
        "signature": signature(),
        "pip_requirements": requirements(),
    }


def save_pyfunc(path: Path, net: torch.nn.Module, spec: ModelSpec, tmp_dir: Path) -> Path:
    """Save ``net`` with its spec as a ``SegmentationModel`` in the folder ``path`` (MLflow's model layout)."""
    with _no_example_warning():
        mlflow.pyfunc.save_model(path=str(path), **_model_parts(net, spec, tmp_dir))
    return Path(path)


def log_pyfunc(net: torch.nn.Module, spec: ModelSpec, tmp_dir: Path, registered_name: str | None) -> Any:
    """Log ``net`` with its spec as a ``SegmentationModel`` to the active run; register it if a name is given."""
    with _no_example_warning():
        return mlflow.pyfunc.log_model(name="model", registered_model_name=registered_name,
                                       **_model_parts(net, spec, tmp_dir))


@contextmanager
def _no_example_warning() -> Iterator[None]:
    """MLflow asks for an input example; paths to scans on this machine would not be one elsewhere."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided.*", category=UserWarning)
        yield
