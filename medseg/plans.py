"""The plan's data model: what ``medseg plan`` writes to ``plan.json`` and ``splits.json``, and
what preprocess, train, predict and a model's spec read (``medseg.stages.plan`` makes them).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

from medseg.errors import DataError
from medseg.io import read_json

if TYPE_CHECKING:
    from medseg.planning import Topology


class ClassOrder(BaseModel):
    """Along one RAS axis, the pair of foreground classes with the most constant order: class
    ``classes[1]``'s centroid minus class ``classes[0]``'s, over the ``cases`` holding both."""

    model_config = ConfigDict(extra="forbid")
    axis: int
    classes: tuple[int, int]
    cases: int
    mean_offset_mm: float
    same_side: float  # the share of those cases whose offset has the sign of the mean


class Fingerprint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_cases: int
    spacing_median_mm: list[float]
    spacing_p10_mm: list[float]
    shape_median: list[float]
    shape_min: list[int]
    shape_max: list[int]
    foreground_intensity: list[dict[str, float]]
    class_frequency: dict[int, float]
    class_order: list[ClassOrder] = []
    # per foreground class, the smallest and largest volume (mL) of the labelled cases; predict's
    # quality control flags a mask outside it ({} in a plan from before plans had it)
    class_volume_ml: dict[int, tuple[float, float]] = {}


class NetworkTopology(BaseModel):
    """The planned U-Net's stages (``medseg.planning.Topology``), per axis of the plan's dims."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    strides: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]
    features: tuple[int, ...]


class Plan(BaseModel):
    """Settings chosen for a dataset; preprocess, train and predict read it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    modality: str
    channels: int
    labels: dict[int, str]
    target_spacing_mm: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    batch_size: int
    normalization: Literal["ct", "zscore"]
    ct_clip: list[tuple[float, float]] | None = None
    ct_mean: list[float] | None = None
    ct_std: list[float] | None = None
    dims: Literal[2, 3]
    median_shape_resampled: list[int]
    mirror_axes: tuple[int, ...] | None = None  # None: a plan from before plans had it; every axis
    topology: NetworkTopology | None = None
    memory_budget_gb: float | None = None
    estimated_memory_gb: float | None = None  # the planned network's training at this patch and batch
    decisions: dict[str, str] = {}
    fingerprint: Fingerprint

    @property
    def n_classes(self) -> int:
        return max(self.labels) + 1

    def unet_topology(self) -> Topology:
        """The planned U-Net's topology; for a plan written before plans had one, the rules'
        topology of its spacing and patch."""
        from medseg.planning import Topology, topology

        if self.topology is not None:
            return Topology(self.topology.strides, self.topology.kernels, self.topology.features)
        axes = [a for a in range(3) if self.patch_size[a] != 1]
        return topology([self.target_spacing_mm[a] for a in axes], [self.patch_size[a] for a in axes])[0]


def load_plan(path: Path) -> Plan:
    """The plan in ``plan.json``; a ``DataError`` for a file that is not one."""
    try:
        return Plan.model_validate(read_json(path))
    except ValueError as err:
        raise DataError(f"{path} is not a medseg plan: {err}") from None


def load_splits(path: Path, fold: int) -> dict[str, list[str]]:
    """Fold ``fold``'s ``{"train", "val"}`` case ids from ``splits.json``."""
    splits = read_json(path)
    if not 0 <= fold < len(splits):
        raise DataError(f"{path}: expected a fold in 0..{len(splits) - 1}, found {fold}")
    return splits[fold]
