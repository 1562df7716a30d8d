"""MLflow helpers: the default store, experiments, parent runs for fold groups, parameters and tags."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def is_server(tracking_uri: str | None) -> bool:
    """Whether the store is an MLflow server (http, https), not a local file or database."""
    return bool(tracking_uri) and str(tracking_uri).split(":", 1)[0] in ("http", "https")


def unreachable(err: BaseException) -> bool:
    """Whether an error of an MLflow call means the server did not answer (refused, timed out, or a
    5xx while it restarts), not that the request was wrong."""
    import requests

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                             TimeoutError)):
            return True
        text = str(seen)
        if "Max retries exceeded" in text or "Connection refused" in text or "error code 50" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def configure_client(tracking_uri: str | None, environ: dict[str, str]) -> None:
    """Short MLflow HTTP retries for a server (unless the user set them): medseg's own wait
    (``patient``) bounds the whole time a job waits, and says so in one line."""
    if is_server(tracking_uri):
        environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def patient(call: Callable[[], T], *, what: str, uri: str | None, wait_s: float, hint: str = "") -> T:
    """``call()``, tried again while the tracking server does not answer, for ``wait_s`` seconds in
    all (pauses of 1, 2, 4, ... 30 s); then a TrackingError that names the server, what was being
    done and ``hint``. Other errors pass at once. ``call`` must be safe to repeat."""
    from medseg.errors import TrackingError

    deadline = time.monotonic() + wait_s
    pause = 1.0
    while True:
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - sorted below
            if not unreachable(err):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
                raise TrackingError(f"the MLflow tracking server {uri} did not answer for {wait_s:.0f} s (tracking."
                                    f"server_wait_s) while {what} ({first}){'; ' + hint if hint else ''}") from None
            log.warning("MLflow server %s does not answer while %s; trying again in %.0f s (%.0f s left)",
                        uri, what, min(pause, left), left)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 30.0)


def experiment_id(tracking_uri: str, name: str, artifact_root: Path | None, lock: Path | None = None) -> str:
    """Set the tracking URI and return the experiment's id, creating it: under ``lock`` (a file on the
    file system the jobs share), so that parallel fold jobs create it once (MLflow's concurrent
    ``create_experiment`` on a fresh store races). A local store keeps artifacts under
    ``artifact_root``; a server keeps them where it was told (``--artifacts-destination``)."""
    import mlflow

    create_store_whole(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (Path(artifact_root).resolve().as_uri()
                if artifact_root is not None and not is_server(tracking_uri) else None)
    with file_lock(lock) if lock is not None else contextlib.nullcontext():
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # another job, outside the lock, created it meanwhile
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id


def create_store_whole(tracking_uri: str) -> None:
    """Create a local SQLite store that does not exist yet whole, or not at all. MLflow builds a new
    store's tables and runs its schema migrations in many steps, and a process killed among them leaves
    a store that every later run refuses ("index ... already exists"). So the store is built in a
    temporary file beside its path and linked there once complete (of processes that race, the first
    wins)."""
    if not str(tracking_uri).startswith("sqlite:///"):
        return
    path = Path(str(tracking_uri)[len("sqlite:///") :].split("?", 1)[0])
    if path.exists():
        return
    import mlflow

    from medseg.io import atomic_path

    with atomic_path(path, replace=False) as tmp:
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp.resolve()}").search_experiments(max_results=1)


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
    experiment_id: str, key: str, name: str, lock: Path, tags: dict[str, str], params: dict[str, str] | None = None
) -> str:
    """The id of the parent run of a training (one per key), created by the first fold to ask."""
    import mlflow

    client = mlflow.MlflowClient()
    with file_lock(lock):
        runs = client.search_runs(
            [experiment_id], filter_string=f"tags.`{TRAINING_KEY_TAG}` = '{key}'", max_results=1
        )
        if runs:
            return runs[0].info.run_id
        run = client.create_run(experiment_id, run_name=name, tags={TRAINING_KEY_TAG: key, **tags})
        log_params(run.info.run_id, params or {})
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id


def fold_run(experiment_id: str, parent: str, fold: int) -> str | None:
    """The run of ``fold`` under ``parent`` that holds no metric yet (one that an earlier try of the same
    job created before it lost its connection or was killed), to go on in instead of a second run."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs([experiment_id], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent}' and tags.fold = '{fold}'"))
    empty = [r for r in runs if not r.data.metrics]
    return empty[0].info.run_id if empty else None


def registered_version(model_name: str, run_id: str) -> str | None:
    """The version of ``model_name`` registered from ``run_id`` already (a retried job), if any."""
    import mlflow

    versions = mlflow.MlflowClient().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return str(versions[0].version) if versions else None


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
