"""The prediction settings a model was validated with, kept with the model.

Cross-validation scores each fold's model on cases it did not train on, with the workflow's
``predict`` settings, and chooses the post-processing. ``evaluate`` then records, for each model it
scored, the settings that change the masks (``SETTINGS``: window overlap, Gaussian weighting,
test-time flips and the largest-component decision) and the Dice they gave, in ``validated.json``:

- beside the model's checkpoint (``train/fold_<k>/validated.json``);
- beside the checkpoint in the registered model's artifacts (``artifacts/validated.json``), so
  ``models:/<name>/<version>`` and the pyfunc model carry them;
- and on the model version, as the tags ``medseg.validated_dice`` and ``medseg.validated_settings``.

A record names the digest of the weights it was made for, so it is used only with those weights:
a checkpoint trained again beside a stale record is not taken for the validated model.

``resolve`` makes the settings of a prediction: the settings of the command (or of the caller's
``PredictConfig``) that were given explicitly win; every other one of ``SETTINGS`` comes from the
models' record; the rest keep their defaults.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from medseg.config import PredictConfig
from medseg.errors import DataError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FILE = "validated.json"
SETTINGS = ("overlap", "gaussian", "tta_flips", "largest_component")  # the PredictConfig keys that change masks
TAG_DICE = "medseg.validated_dice"
TAG_SETTINGS = "medseg.validated_settings"


class Validated(BaseModel):
    """What cross-validation measured for one model's predictions."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    weights: str = Field(description="Digest of the weights that were validated (weights_digest).")
    settings: dict[str, Any] = Field(description="The prediction settings of SETTINGS that made the scored masks.")
    mean_dice: float | None = Field(description="Mean Dice over the labels of all scored cases, after the post-processing.")
    n_cases: int = Field(ge=0, description="Cases scored, of all the folds.")
    evaluation: str = Field(description="The evaluation folder that scored them.")


def weights_digest(net: torch.nn.Module) -> str:
    """A digest of a network's weights: the same weights give the same digest on any device."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def read(folder: Path, net: torch.nn.Module) -> Validated | None:
    """The record in ``folder`` if there is one and it was made for ``net``'s weights."""
    from medseg.io import read_json

    path = Path(folder) / FILE
    if not path.exists():
        return None
    try:
        record = Validated.model_validate(read_json(path))
    except ValueError as err:  # pydantic's ValidationError is one
        raise DataError(f"{path}: expected the validated prediction settings evaluate writes, found something else: "
                        f"{str(err).splitlines()[0]}") from None
    digest = weights_digest(net)
    if record.weights != digest:
        log.warning("%s: made for other weights (%s, the model's are %s): not used", path, record.weights, digest)
        return None
    return record


def resolve(config: PredictConfig | None, records: Sequence[Validated | None],
            refs: Sequence[str]) -> tuple[PredictConfig, dict[str, Any] | None]:
    """The settings to predict with, and what came from the models' record (None: nothing).

    The fields of ``config`` that were set explicitly win (``PredictConfig.model_fields_set``: a
    config read from files has all of them); the other ``SETTINGS`` come from the first model's
    record. Models of an ensemble validated differently are reported."""
    config = config if config is not None else PredictConfig()
    found = [(ref, r) for ref, r in zip(refs, records) if r is not None]
    if not found:
        return config, None
    ref, record = found[0]
    others = [other for other, r in zip(refs, records) if r is None or r.settings != record.settings]
    if others:
        log.warning("the models were not all validated with the same settings: using those of %s (not those of %s)",
                    ref, ", ".join(others))
    explicit = config.model_fields_set
    taken = {k: v for k, v in record.settings.items() if k in SETTINGS and k not in explicit}
    if not taken:
        log.info("predicting with the settings given, not those %s was validated with", ref)
        return config, None
    merged = PredictConfig.model_validate({**config.model_dump(), **taken})
    dice = f"{record.mean_dice:.4f}" if record.mean_dice is not None else "n/a"
    log.info("predicting with the settings %s was validated with (mean Dice %s over %d cases, %s): %s%s", ref, dice,
             record.n_cases, record.evaluation, ", ".join(f"{k}={v}" for k, v in taken.items()),
             f"; given: {', '.join(f'{k}={getattr(config, k)}' for k in sorted(explicit))}" if explicit else "")
    origin = {"model": ref, "mean_dice": record.mean_dice, "n_cases": record.n_cases, "evaluation": record.evaluation,
              "taken": sorted(taken), "given": sorted(explicit)}
    return merged, origin


def publish(record: Validated, folder: Path, model_uri: str | None, tracking_uri: str | None) -> Path:
    """Write ``record`` into ``folder`` (the checkpoint's) and, for a registered model
    (``models:/<name>/<version>``), beside its checkpoint artifact and onto the model version."""
    from medseg.io import write_json

    path = Path(folder) / FILE
    write_json(path, record.model_dump(mode="json"))
    parts = (model_uri or "").removeprefix("models:/").split("/")
    if not (model_uri or "").startswith("models:/") or len(parts) != 2 or not parts[1].isdigit():
        if model_uri:
            log.warning("%s: not a registered model version (models:/<name>/<version>); its validated settings are "
                        "only in %s", model_uri, path)
        return path
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    name, version = parts
    found = client.get_model_version(name, version)
    # MLflow 3 keeps a registered model's files in its logged model (source models:/m-<id>).
    model_id = getattr(found, "model_id", None) or (found.source.removeprefix("models:/")
                                                    if found.source.startswith("models:/m-") else None)
    if model_id is None:
        log.warning("%s: its files are not a logged model (source %s); its validated settings are only on the "
                    "version's tags and in %s", model_uri, found.source, path)
    else:
        client.log_model_artifact(model_id, str(path), "artifacts")  # beside medseg_model.pt
    dice = "" if record.mean_dice is None else f"{record.mean_dice:.4f}"
    client.set_model_version_tag(name, version, TAG_DICE, dice)
    client.set_model_version_tag(name, version, TAG_SETTINGS, json.dumps(record.settings, sort_keys=True))
    return path
