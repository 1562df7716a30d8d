"""Reading a built review folder: its queue (``queue.json``) and the digests of the masks it shows.

Below both the review stage (which writes the folder) and the server and the training feedback
(which read it), so neither imports the other.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from medseg.errors import DataError
from medseg.io import read_json, sha256

QUEUE = "queue.json"
SUMMARY = "review.json"
INDEX = "index.html"
PICTURES = "cases"
PREDICT_RECORD = "predict.json"  # medseg predict's record of the models that made a folder's masks


@functools.lru_cache(maxsize=4096)
def _digest(path: str, mtime_ns: int, size: int) -> str:  # the stat fields key the cache to the file's version
    return sha256(Path(path))


def mask_digest(path: Path | str | None) -> str:
    """The SHA-256 of a mask file ('' when there is none), remembered while the file is unchanged."""
    if not path or not Path(path).is_file():
        return ""
    stat = os.stat(path)
    return _digest(str(path), stat.st_mtime_ns, stat.st_size)


def prediction_models(prediction_dir: Path | str) -> tuple[str, ...]:
    """The models that made a prediction folder's masks, from its ``predict.json`` (() without one)."""
    path = Path(prediction_dir) / PREDICT_RECORD
    record = read_json(path) if path.is_file() else {}
    models = record.get("models", []) if isinstance(record, dict) else []
    return tuple(str(m["model"]) for m in models if isinstance(m, dict) and "model" in m)


def load_queue(review_dir: Path) -> list[dict[str, Any]]:
    """The queue a build wrote into ``review_dir``."""
    path = Path(review_dir) / QUEUE
    if not path.is_file():
        raise DataError(f"{review_dir}: expected a review folder built by medseg review ({QUEUE}), found none")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
        raise DataError(f"{path}: expected {{'cases': [...]}}, found another structure")
    return data["cases"]
