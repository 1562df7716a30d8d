"""Quality control of one predicted mask: flags a reviewer should look at.

Flags, each with a reason in ``details``:

- ``empty``: no foreground voxel at all;
- ``volume``: a class's volume lies outside the range of the training labels (the plan's
  ``fingerprint.class_volume_ml``) widened by ``volume_tolerance``: below ``low * (1 - t)`` or
  above ``high * (1 + t)``;
- ``uncertain``: the case's uncertainty score is above ``max_uncertainty``;
- ``edge``: a foreground class touches a face of the scan, so the structure may be cut off by
  the field of view.

The uncertainty score of a case is the mean, over the voxels predicted as foreground, of the
entropy of the averaged class probabilities divided by its maximum, log(number of classes):
0 when every augmentation and model agrees with certainty, 1 when all classes are equally
likely. A case with no foreground scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medseg.io import read_json

if TYPE_CHECKING:
    import torch

QC_DIR = "qc"
FAILED_DIR = "failed"  # predict's records of the cases that failed
SLAB = 8  # planes of the last axis taken at a time by the entropy


@dataclass(frozen=True)
class CaseQC:
    case_id: str
    volumes_ml: dict[str, float]
    uncertainty: float
    flags: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of class probabilities (classes first) divided by log(classes): 0 (certain) to 1.
    Computed a slab of the last axis at a time, so the temporaries stay small for a large scan."""
    import torch

    n = probs.shape[0]
    total = torch.zeros(probs.shape[1:], dtype=torch.float32, device=probs.device)
    if n < 2:
        return total
    for start in range(0, probs.shape[-1], SLAB):
        chunk = probs[..., start : start + SLAB].float().clamp(1e-12, 1.0)  # a copy: the input stays as it is
        total[..., start : start + SLAB] = -(chunk * chunk.log()).sum(0) / math.log(n)
    return total


def touches_edge(mask: np.ndarray) -> list[int]:
    """The foreground labels with a voxel on a face of the grid (axes of one voxel do not count)."""
    found: set[int] = set()
    for axis, size in enumerate(mask.shape[:3]):
        if size < 2:
            continue
        for index in (0, size - 1):
            face = np.take(mask, index, axis=axis)
            found |= {int(v) for v in np.unique(face) if v != 0}
    return sorted(found)


def case_qc(
    case_id: str,
    mask: np.ndarray,
    voxel_ml: float,
    labels: Mapping[int, str],
    uncertainty: float,
    *,
    volume_range: Mapping[int, tuple[float, float]] | None,
    volume_tolerance: float,
    max_uncertainty: float,
) -> CaseQC:
    """The volumes and flags of one mask (integer labels on the scan's grid)."""
    import torch

    # torch counts uint8 as it is; numpy's bincount would first copy the mask as int64 (8 bytes a voxel)
    counts = torch.bincount(torch.from_numpy(np.ascontiguousarray(mask)).reshape(-1), minlength=max(labels) + 1).numpy()
    volumes = {labels[k]: float(counts[k]) * voxel_ml for k in sorted(labels) if k != 0}
    flags: list[str] = []
    details: dict[str, str] = {}
    if counts[1:].sum() == 0:
        flags.append("empty")
        details["empty"] = "no foreground voxel"
    outside = []
    for k, (low, high) in sorted((volume_range or {}).items()):
        if k not in labels or k == 0:
            continue
        volume = volumes[labels[k]]
        if volume < low * (1 - volume_tolerance) or volume > high * (1 + volume_tolerance):
            outside.append(f"{labels[k]} {volume:.3g} mL outside the training range {low:.3g}-{high:.3g} mL")
    if outside:
        flags.append("volume")
        details["volume"] = "; ".join(outside)
    if uncertainty > max_uncertainty:
        flags.append("uncertain")
        details["uncertain"] = f"uncertainty {uncertainty:.3f} above {max_uncertainty}"
    edge = touches_edge(mask)
    if edge:
        flags.append("edge")
        details["edge"] = "touching a face of the scan: " + ", ".join(labels.get(k, str(k)) for k in edge)
    return CaseQC(case_id, volumes, float(uncertainty), flags, details)


def read_case_qc(prediction_dir: Path, case_id: str) -> dict | None:
    """The QC record predict wrote for a case, or None."""
    path = Path(prediction_dir) / QC_DIR / f"{case_id}.json"
    return read_json(path) if path.is_file() else None
