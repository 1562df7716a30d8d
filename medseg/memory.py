"""The memory a training step needs, counted on the planned network itself.

The network is built on PyTorch's ``meta`` device (shapes only: no memory, no arithmetic) and
run forward once; every tensor that autograd saves for the backward pass is counted, in bytes,
through ``torch.autograd.graph.saved_tensors_hooks`` (the weights it saves are the weights
themselves, and are not counted twice). That is what a training step holds at
its peak, apart from the weights: they count four times (weights, gradients and the two states
of Adam; SGD with momentum keeps one). Counts are in float32: under mixed precision most saved
tensors take half, so on CUDA with ``amp`` the estimate is on the safe side.

Saved tensors grow with the voxels of each stage, which are the patch's voxels divided by the
stage's stride, so for a patch that is a multiple of the topology's divisor the count is
proportional to the patch's volume. It is measured once per topology on the smallest such
patch and scaled.
"""

from __future__ import annotations

import math
from functools import lru_cache

from medseg.planning import Topology

PARAMETER_COPIES = 4  # weights, gradients, and Adam's two moments


def planned_network(topo: Topology, in_channels: int, out_channels: int):  # noqa: ANN201
    """The network the plan counts: ``dynunet`` (nnU-Net's U-Net) of the topology, with deep supervision."""
    from medseg.networks import dynunet

    return dynunet(topo, in_channels, out_channels, deep_supervision=True)


def count_training_bytes(topo: Topology, patch: tuple[int, ...], in_channels: int, out_channels: int) -> tuple[int, int]:
    """(bytes saved for backward by one sample of ``patch``, bytes of the weights and their
    gradients and optimizer state), counted on the meta device."""
    import torch

    with torch.device("meta"):
        net = planned_network(topo, in_channels, out_channels)
        x = torch.empty((1, in_channels, *patch))
    weights = {id(p) for p in net.parameters()}
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if id(tensor) not in weights:  # a saved weight is the weight itself, counted below
            saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net.train()(x)
    parameters = sum(p.numel() * p.element_size() for p in net.parameters())
    return saved + x.numel() * x.element_size(), parameters * PARAMETER_COPIES


@lru_cache(maxsize=64)
def _per_voxel(topo: Topology, in_channels: int, out_channels: int) -> tuple[float, int]:
    unit = tuple(2 * d for d in topo.divisor)  # the smallest patch with 2 voxels per axis at the bottom
    sample, fixed = count_training_bytes(topo, unit, in_channels, out_channels)
    return sample / math.prod(unit), fixed


def training_bytes(topo: Topology, patch: tuple[int, ...], in_channels: int, out_channels: int) -> tuple[int, int]:
    """``count_training_bytes`` for a patch that is a multiple of the topology's divisor, scaled
    from one count per topology."""
    per_voxel, fixed = _per_voxel(topo, in_channels, out_channels)
    return int(round(per_voxel * math.prod(patch))), fixed
