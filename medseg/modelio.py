"""Trained models on disk and in the MLflow registry, with the spec that says how to use them.

A model is a network plus a ``ModelSpec``: the plan, the preprocess settings, the network
config and the window size, so predict needs nothing but the model to reproduce the
training-time preprocessing. In MLflow a model is logged as medseg's pyfunc
(``medseg.pyfunc``): the weights and spec in one checkpoint artifact, which accepts any
input size (unlike an exported graph), and medseg's code.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from medseg.config import NetworkConfig, PreprocessConfig
from medseg.errors import ModelError
from medseg.plans import Plan
from medseg.validated import Validated
from medseg.validated import read as read_validated

log = logging.getLogger(__name__)

SPEC_FILE = "medseg_spec.json"
CHECKPOINT = "medseg_model.pt"  # the weights and spec of medseg's pyfunc, one artifact


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    plan: Plan
    preprocess: PreprocessConfig
    network: NetworkConfig
    roi_size: tuple[int, int, int]
    fold: int | None = None
    # What cross-validation measured with these weights (medseg.validated), read from beside the
    # checkpoint when it is loaded; never saved into a checkpoint.
    validated: Validated | None = Field(default=None, exclude=True)


def build_from_spec(spec: ModelSpec) -> nn.Module:
    from medseg.networks import build_network

    return build_network(
        spec.network, patch_size=spec.roi_size, in_channels=spec.plan.channels, out_channels=spec.plan.n_classes,
        topology=spec.plan.unet_topology(),
    )


def load_checkpoint_model(path: Path, device: torch.device) -> tuple[nn.Module, ModelSpec]:
    """A network and its spec from a medseg checkpoint (``best.pt`` / ``last.pt``), with the settings it
    was validated with when ``validated.json`` beside it was made for its weights."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        spec = ModelSpec.model_validate(state["spec"])
        weights = state["model"]
    except (KeyError, TypeError, IndexError, AttributeError, RuntimeError, ValueError, EOFError, OSError,
            pickle.UnpicklingError) as err:
        reason = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(f"{path}: expected a medseg checkpoint, could not read it (truncated or not a "
                         f"checkpoint?): {reason}") from None
    net = build_from_spec(spec)
    try:
        net.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(f"{path}: its weights do not fit the network its spec describes: {reason}") from None
    validated = read_validated(path.parent, net)
    if validated is not None:
        spec = spec.model_copy(update={"validated": validated})
    return net.to(device).eval(), spec


def load_mlflow_model(uri: str, device: torch.device, tracking_uri: str | None) -> tuple[nn.Module, ModelSpec]:
    """A network and its spec from ``models:/<name>/<version|@alias>`` or ``runs:/<id>/model``: medseg's
    pyfunc (its checkpoint artifact), or the pytorch flavour with a spec file that medseg logged before."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as err:  # MLflow raises several kinds for unknown names/versions
        raise ModelError(f"cannot load model {uri} from {tracking_uri or 'the default store'}: {err}") from None
    checkpoints = list(local.rglob(CHECKPOINT))
    if checkpoints:
        return load_checkpoint_model(checkpoints[0], device)
    spec_files = list(local.rglob(SPEC_FILE))
    if not spec_files:
        raise ModelError(f"model {uri}: expected {CHECKPOINT} or {SPEC_FILE} in it, found neither: it was not logged by medseg")
    try:
        import mlflow.pytorch

        net = mlflow.pytorch.load_model(str(local), map_location=device)
    except Exception as err:
        raise ModelError(f"cannot load model {uri} from {tracking_uri or 'the default store'}: {err}") from None
    spec = ModelSpec.model_validate(json.loads(spec_files[0].read_text()))
    return net.to(device).eval(), spec


def load_model(ref: str, device: torch.device, tracking_uri: str | None) -> tuple[nn.Module, ModelSpec]:
    """Load a model from an MLflow URI or a checkpoint path."""
    if ref.startswith(("models:/", "runs:/")):
        return load_mlflow_model(ref, device, tracking_uri)
    return load_checkpoint_model(Path(ref), device)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ModelError(f"unknown device '{name}': {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{name}' asked for, but CUDA is not available here")
    return device
