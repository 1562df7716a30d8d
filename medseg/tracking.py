"""MLflow helpers: the default store, experiments, parent runs for fold groups, parameters and tags."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_RESULTS = Path("data/results")
TRAINING_KEY_TAG = "medseg.training_key"


def default_tracking_uri(results: Path = DEFAULT_RESULTS) -> str:
    """The local SQLite store of a results folder (no server needed)."""
    return f"sqlite:///{(Path(results) / 'mlflow.db').resolve()}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; values as strings cut to MLflow's length limit."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def git_commit(cwd: Path | None = None) -> str | None:
    """The git commit of the medseg checkout (or of ``cwd``), if it is one."""
    if cwd is None:
        cwd = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def experiment_id(tracking_uri: str, name: str, artifact_root: Path | None) -> str:
    """Set the tracking URI and return the experiment's id, creating it (artifacts under ``artifact_root``)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another job created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def parent_run(
    experiment: str, key: str, name: str, lock: Path, tags: dict[str, str], params: dict[str, str] | None = None
) -> str:
    """The id of the parent run of a training (one per key), created by the first fold to ask."""
    import mlflow

    client = mlflow.MlflowClient()
    with file_lock(lock):
        exp = client.get_experiment_by_name(experiment)
        assert exp is not None
        runs = client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{TRAINING_KEY_TAG}` = '{key}'", max_results=1
        )
        if runs:
            return runs[0].info.run_id
        run = client.create_run(exp.experiment_id, run_name=name, tags={TRAINING_KEY_TAG: key, **tags})
        log_params(run.info.run_id, params or {})
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id


def log_params(run_id: str, params: dict[str, str]) -> None:
    """Log many parameters to a run, in batches of the size MLflow accepts."""
    import mlflow
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    client = mlflow.MlflowClient()
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def latest_model_version(tracking_uri: str) -> str:
    """``models:/<name>/<version>`` of the most recently registered model version in the store."""
    import mlflow

    from medseg.errors import ModelError

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(order_by=["creation_timestamp DESC"], max_results=1)
    if not versions:
        raise ModelError(f"no registered model in {tracking_uri}: train one first (make demo) or pass --model")
    v = versions[0]
    return f"models:/{v.name}/{v.version}"
