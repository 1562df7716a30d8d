"""Post-processing of masks: keep only the largest connected component of a class, where
cross-validation showed that it helps.

nnU-Net decides this after its cross-validation, and so does medseg: evaluate compares, on the
out-of-fold predictions, each class's mean Dice before and after removing all but its largest
component (26-connected in 3D), and keeps the step for the classes where the mean went up
(``decide``). The decision is written as ``postprocessing.json`` beside the evaluation;
``medseg predict --postprocessing`` (or ``predict.largest_component``) applies it
(``keep_largest_component``). The components are found with MONAI's
``KeepLargestConnectedComponent`` inside the class's bounding box, so a large scan needs no
label map of its whole grid.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from medseg.errors import ConfigError
from medseg.io import read_json

log = logging.getLogger(__name__)

FILE = "postprocessing.json"


def keep_largest_component(mask: np.ndarray, classes: Iterable[int]) -> np.ndarray:
    """``mask`` with, for each of ``classes``, every voxel outside that class's largest connected
    component set to 0 (background). Changes ``mask`` in place and returns it."""
    import torch
    from monai.transforms import KeepLargestConnectedComponent
    from monai.transforms.utils import generate_spatial_bounding_box

    keep = KeepLargestConnectedComponent(is_onehot=False, independent=True)
    for c in classes:
        present = mask == c
        start, end = generate_spatial_bounding_box(present[None])
        if end[0] <= start[0]:  # the class is absent
            continue
        box = tuple(slice(int(s), int(e)) for s, e in zip(start, end))
        crop = torch.as_tensor(present[box].astype(np.uint8))[None]
        largest = keep(crop)[0].numpy().astype(bool)
        region = mask[box]
        region[present[box] & ~largest] = 0
    return mask


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = int(pred.sum()) + int(ref.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total


def case_effect(pred: np.ndarray, ref: np.ndarray, classes: Iterable[int]) -> dict[int, tuple[float, float]]:
    """Per class: Dice of ``pred`` against ``ref`` before and after keeping its largest component."""
    out = {}
    for c in classes:
        before = pred == c
        after = keep_largest_component(before.astype(np.uint8), [1]) == 1
        out[c] = (_dice(before, ref == c), _dice(after, ref == c))
    return out


def decide(effects: Iterable[Mapping[int, tuple[float, float]]], names: Mapping[int, str]) -> dict:
    """The decision from every case's ``case_effect``: the classes whose mean Dice rose, with the figures."""
    per_class: dict[int, list[tuple[float, float]]] = {c: [] for c in names}
    for effect in effects:
        for c, pair in effect.items():
            per_class[c].append(pair)
    classes, kept = {}, []
    for c, pairs in per_class.items():
        if not pairs:
            continue
        before, after = (float(np.mean([p[i] for p in pairs])) for i in (0, 1))
        keep = after > before
        kept += [c] if keep else []
        classes[names[c]] = {"label": c, "dice_before": before, "dice_after": after, "keep_largest": keep,
                             "cases_changed": sum(p[0] != p[1] for p in pairs)}
    return {"largest_component": kept, "n_cases": max((len(p) for p in per_class.values()), default=0),
            "classes": classes}


def read_decision(path: Path) -> tuple[int, ...]:
    """The classes a ``postprocessing.json`` keeps the largest component of."""
    path = Path(path)
    data = read_json(path) if path.is_file() else None
    if not isinstance(data, dict) or not isinstance(data.get("largest_component"), list):
        raise ConfigError(f"{path}: expected evaluate's {FILE} with a list 'largest_component', found "
                          f"{'no such file' if data is None else 'another content'}")
    return tuple(int(c) for c in data["largest_component"])
