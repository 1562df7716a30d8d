"""preprocess: reorient, crop, resample and normalize every case as the plan says, and cache it.

Outputs in ``out_dir``: ``<case>.npz`` (``image`` float32 (C, X, Y, Z), ``label`` uint8
(1, X, Y, Z)) and ``index.json`` (the settings used and each case's cached shape), which
train reads (``medseg.preprocessed``).
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.config import PreprocessConfig
from medseg.errors import DataError
from medseg.io import atomic_path, write_json
from medseg.manifest import load_manifest
from medseg.plans import Plan, load_plan
from medseg.preprocessed import load_case, read_index

__all__ = ["PreprocessResult", "load_case", "preprocess", "read_index"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessResult:
    index_path: Path
    n_cases: int


@functools.lru_cache(maxsize=2)
def _chain(plan_json: str, crop: bool) -> Any:
    from medseg.transforms import preprocessing

    return preprocessing(Plan.model_validate_json(plan_json), crop_foreground=crop, with_label=True)


def _one_thread() -> None:
    """A pool worker's torch runs one thread: the workers share the cores. (Set in workers only, so a
    caller in whose process ``workers=1`` runs the cases keeps its own thread count.)"""
    import torch

    torch.set_num_threads(1)


def _one(args: tuple[str, Path, Path, Plan, bool, Path]) -> tuple[str, list[int]]:
    case_id, image, label, plan, crop, out = args
    chain = _chain(plan.model_dump_json(), crop)
    for path in (image, label):
        if not path.is_file():
            raise DataError(f"file not found: {path} (ingested, then moved or removed? run ingest again)")
    try:
        data = chain({"image": str(image), "label": str(label)})
    except (RuntimeError, ValueError, OSError, EOFError) as err:  # MONAI wraps a failing step's error
        reason = str(err.__cause__ or err).splitlines()[0]
        raise DataError(f"{image}: could not be preprocessed: {reason}") from None
    img = np.asarray(data["image"].numpy(), dtype=np.float32)
    lab = np.asarray(data["label"].numpy()).round().astype(np.uint8)
    with atomic_path(out / f"{case_id}.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, image=img, label=lab)
    return case_id, list(img.shape[1:])


def preprocess(
    manifest_path: Path, plan_path: Path, out_dir: Path, config: PreprocessConfig | None = None
) -> PreprocessResult:
    """Preprocess every labelled case of the manifest into ``out_dir``."""
    config = config or PreprocessConfig()
    manifest, root = load_manifest(manifest_path)
    plan = load_plan(plan_path)
    if plan.channels != manifest.channels or plan.labels != manifest.labels:
        raise DataError(
            f"{plan_path}: expected a manifest of {plan.channels} channel(s) and labels {plan.labels}, found "
            f"{manifest.channels} and {manifest.labels} in {manifest_path} (a plan of another dataset? plan it again)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [
        (r.case_id, root / r.image, root / r.label, plan, config.crop_foreground, out_dir)
        for r in manifest.cases
        if r.label is not None
    ]
    if not jobs:
        raise DataError(f"{manifest_path}: no labelled case to preprocess")
    shapes: dict[str, list[int]] = {}
    if config.workers > 1:
        with ProcessPoolExecutor(config.workers, initializer=_one_thread) as pool:
            for case_id, shape in pool.map(_one, jobs, chunksize=4):
                shapes[case_id] = shape
    else:
        for job in jobs:
            case_id, shape = _one(job)
            shapes[case_id] = shape
    index_path = out_dir / "index.json"
    write_json(index_path, {"settings": config.model_dump(mode="json"), "cases": shapes})
    log.info("preprocessed %d cases -> %s", len(shapes), out_dir)
    return PreprocessResult(index_path, len(shapes))
