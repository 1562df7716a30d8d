"""The preprocess stage's outputs as later steps read them: a case's ``<case>.npz`` and ``index.json``
(``medseg.stages.preprocess`` writes them; its module doc says what they hold).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.config import PreprocessConfig
from medseg.errors import DataError
from medseg.io import read_json


def read_index(path: Path) -> tuple[PreprocessConfig, dict[str, list[int]]]:
    """The settings of ``index.json`` and each case's cached shape (X, Y, Z)."""
    data = read_json(path)
    return PreprocessConfig.model_validate(data["settings"]), data["cases"]


def load_case(out_dir: Path, case_id: str) -> dict[str, np.ndarray]:
    """A preprocessed case: ``image`` float32 (C, X, Y, Z) and ``label`` uint8 (1, X, Y, Z)."""
    path = Path(out_dir) / f"{case_id}.npz"
    if not path.exists():
        raise DataError(f"preprocessed case not found: {path} (run preprocess again?)")
    with np.load(path) as data:
        return {"image": data["image"], "label": data["label"]}
