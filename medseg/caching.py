"""Where training reads its preprocessed cases from: memory, or disk per sample.

``train.cache``: ``memory`` loads every training case once and keeps it (fast: nothing is read
again); ``disk`` keeps only the file names and reads a case each time a sample is drawn from it
(in the DataLoader's worker processes), so memory stays bounded by the batch and the workers'
queue, whatever the dataset's size; ``auto`` chooses memory when the training cases take at most
``train.cache_max_gb`` (their float32 images and uint8 labels), else disk. Validation cases are
read one at a time in either mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.preprocessed import load_case

GB = 2**30


def case_bytes(shape: Sequence[int], channels: int) -> int:
    """Bytes of one preprocessed case in memory: float32 image channels and a uint8 label."""
    return math.prod(shape) * (4 * channels + 1)


def choose(mode: str, total_bytes: int, max_gb: float) -> tuple[str, str]:
    """('memory' or 'disk', why) for the cache setting ``mode``."""
    size = f"the training cases take {total_bytes / GB:.2f} GB"
    if mode != "auto":
        return mode, f"set in the config ({size})"
    if total_bytes <= max_gb * GB:
        return "memory", f"{size}, at most cache_max_gb={max_gb:g}"
    return "disk", f"{size}, more than cache_max_gb={max_gb:g}"


class LoadPreprocessed:
    """A transform that reads a case named by ``{"path": <case>.npz}`` into ``image`` and ``label``."""

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        path = Path(item["path"])
        return load_case(path.parent, path.name.removesuffix(".npz"))


def training_items(preprocessed_dir: Path, case_ids: Sequence[str], mode: str) -> list[dict[str, Any]]:
    """The training dataset's items: the cases themselves (memory) or their files (disk)."""
    if mode == "memory":
        return [load_case(preprocessed_dir, c) for c in case_ids]
    return [{"path": str(Path(preprocessed_dir) / f"{c}.npz")} for c in case_ids]


def validation_cases(preprocessed_dir: Path, case_ids: Sequence[str],
                     kept: list[dict[str, np.ndarray]] | None) -> Iterator[dict[str, np.ndarray]]:
    """The validation cases, kept ones or read one at a time."""
    if kept is not None:
        yield from kept
        return
    for c in case_ids:
        yield load_case(preprocessed_dir, c)
