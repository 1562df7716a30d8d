"""The planning rules for patch size, batch size and network topology (after nnU-Net).

nnU-Net (Isensee et al., Nature Methods 2021) configures a U-Net from the dataset alone. These
functions apply its rules, with one change: the memory a training needs is counted for the
planned network (``medseg.memory``), not scaled from nnU-Net's reference constants.

- **Topology** (``topology``): pool an axis while its feature map stays at least ``2 x
  min_edge`` voxels and its spacing is within a factor 2 of the finest (so a coarse axis is
  pooled only once the others have caught up); an axis alone is pooled only while at least
  ``3 x min_edge``. A convolution kernel is 3 on an axis once its spacing is within a factor 2
  of the finest, else 1. The bottleneck's kernel is 3 on every axis. Features start at
  ``base_features`` and double per stage up to ``max_features``. The patch must be a multiple
  of 2 to the number of pools on each axis.
- **Patch** (``fit_patch``): start from a patch of 256^3 voxels (2D: 2048^2) shaped by the
  spacing (more voxels along finer axes), no larger than the median shape. While the training
  (batch of 2) would need more than the memory budget, take away one multiple of the divisor
  from the axis whose patch is largest relative to the median shape.
- **Batch** (``batch_size``): as many samples as the budget holds, but no more than cover 5% of
  the dataset's voxels in one batch, and at least 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_BATCH = 2
PATCH_VOXELS = {3: 256**3, 2: 2048**2}  # the starting patch volume (nnU-Net's)


@dataclass(frozen=True)
class Topology:
    """A U-Net's stages: the stride into each (the first is 1), the kernel of its convolutions,
    and its feature maps. ``divisor`` is what the patch must be a multiple of, per axis."""

    strides: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]
    features: tuple[int, ...]

    @property
    def divisor(self) -> tuple[int, ...]:
        return tuple(int(np.prod([s[axis] for s in self.strides])) for axis in range(len(self.strides[0])))

    @property
    def pools(self) -> tuple[int, ...]:
        return tuple(sum(1 for s in self.strides if s[axis] == 2) for axis in range(len(self.strides[0])))


def topology(
    spacing: Sequence[float], patch: Sequence[int], *, min_edge: int = 4, base_features: int = 32,
    max_features: int = 320,
) -> tuple[Topology, tuple[int, ...]]:
    """The U-Net topology for ``patch`` at ``spacing`` and the patch rounded up to its divisor
    (the rules of the module doc)."""
    dims = len(spacing)
    current_spacing = [float(s) for s in spacing]
    size = [float(p) for p in patch]
    kernel = [1] * dims
    strides: list[tuple[int, ...]] = [(1,) * dims]
    kernels: list[tuple[int, ...]] = []
    while True:
        valid = [a for a in range(dims) if size[a] >= 2 * min_edge]
        if not valid:
            break
        finest = min(current_spacing[a] for a in valid)
        valid = [a for a in valid if current_spacing[a] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * min_edge:
            break
        finest_all = min(current_spacing)
        kernel = [3 if kernel[a] == 3 or current_spacing[a] / finest_all < 2 else 1 for a in range(dims)]
        stride = tuple(2 if a in valid else 1 for a in range(dims))
        for a in valid:
            current_spacing[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        kernels.append(tuple(kernel))
        strides.append(stride)
    kernels.append((3,) * dims)  # the bottleneck
    features = tuple(min(base_features * 2**i, max_features) for i in range(len(strides)))
    topo = Topology(tuple(strides), tuple(kernels), features)
    padded = tuple(int(math.ceil(p / d)) * d for p, d in zip(patch, topo.divisor))
    return topo, padded


def initial_patch(spacing: Sequence[float], median_shape: Sequence[float]) -> tuple[int, ...]:
    """A patch of ``PATCH_VOXELS`` shaped by the spacing, no larger than the median shape."""
    inverse = 1 / np.asarray(spacing, dtype=float)
    volume = PATCH_VOXELS[len(spacing)]
    shaped = inverse * (volume / np.prod(inverse)) ** (1 / len(spacing))
    return tuple(int(v) for v in np.minimum(np.round(shaped), np.round(np.asarray(median_shape, dtype=float))))


# (activation bytes per sample, fixed bytes) that one training step needs for a topology and patch
MemoryEstimate = Callable[[Topology, tuple[int, ...]], tuple[int, int]]


@dataclass(frozen=True)
class PatchChoice:
    patch: tuple[int, ...]
    topology: Topology
    sample_bytes: int  # activations of one sample
    fixed_bytes: int  # weights, gradients and optimizer state
    reductions: int  # how often the patch was shrunk to fit the budget


def fit_patch(
    spacing: Sequence[float], median_shape: Sequence[float], budget_bytes: int, estimate: MemoryEstimate, *,
    min_edge: int = 4, base_features: int = 32, max_features: int = 320,
) -> PatchChoice:
    """The largest patch (from ``initial_patch``, shrunk as the module doc says) whose training
    with a batch of 2 fits ``budget_bytes``, with its topology."""

    def topo(patch: Sequence[int]) -> tuple[Topology, tuple[int, ...]]:
        return topology(spacing, patch, min_edge=min_edge, base_features=base_features, max_features=max_features)

    median = np.asarray(median_shape, dtype=float)
    net, patch = topo(initial_patch(spacing, median_shape))
    sample, fixed = estimate(net, patch)
    reductions = 0
    while MIN_BATCH * sample + fixed > budget_bytes:
        axis = int(np.argmax(np.asarray(patch) / np.maximum(median, 1)))
        smaller = list(patch)
        smaller[axis] -= net.divisor[axis]
        if smaller[axis] < 1:
            break  # the smallest patch: the plan says it exceeds the budget
        next_net, next_patch = topo(smaller)
        if math.prod(next_patch) >= math.prod(patch):
            break
        net, patch = next_net, next_patch
        sample, fixed = estimate(net, patch)
        reductions += 1
    return PatchChoice(patch, net, sample, fixed, reductions)


def batch_size(sample_bytes: int, fixed_bytes: int, budget_bytes: int, patch: Sequence[int],
               dataset_voxels: float, max_fraction: float = 0.05) -> tuple[int, str]:
    """The batch size for a patch, and which rule set it (module doc)."""
    by_memory = max(int((budget_bytes - fixed_bytes) // max(sample_bytes, 1)), 0)
    by_data = int(round(dataset_voxels * max_fraction / math.prod(patch)))
    batch = max(min(by_memory, by_data), MIN_BATCH)
    if batch == MIN_BATCH and min(by_memory, by_data) < MIN_BATCH:
        why = f"the minimum of {MIN_BATCH}"
    elif by_memory <= by_data:
        why = f"the memory budget (it holds {by_memory})"
    else:
        why = f"{max_fraction:.0%} of the dataset's voxels per batch ({by_data}; memory would hold {by_memory})"
    return batch, why
