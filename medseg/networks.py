"""Networks chosen by name: an explicit registry of MONAI networks, 2D or 3D.

All networks take and return 5D tensors (B, C, X, Y, Z). A 2D plan has a patch with 1 on
its slice axis; its 2D network is wrapped so it sees (B, C, a, b) slices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from medseg.config import NetworkConfig
from medseg.errors import ConfigError


class SliceWise(nn.Module):
    """Run a 2D network on volumes whose ``axis`` (spatial, 0..2) has size 1."""

    def __init__(self, net: nn.Module, axis: int) -> None:
        super().__init__()
        self.net = net
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = 2 + self.axis
        return self.net(x.squeeze(dim)).unsqueeze(dim)


def _unet(cfg: NetworkConfig, dims: int, cin: int, cout: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=dims, in_channels=cin, out_channels=cout, channels=cfg.channels,
        strides=(2,) * (len(cfg.channels) - 1), num_res_units=cfg.num_res_units, dropout=cfg.dropout,
    )


def _dynunet(cfg: NetworkConfig, dims: int, cin: int, cout: int) -> nn.Module:
    from monai.networks.nets import DynUNet

    levels = len(cfg.channels)
    return DynUNet(
        spatial_dims=dims, in_channels=cin, out_channels=cout,
        kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1), upsample_kernel_size=[2] * (levels - 1),
        filters=list(cfg.channels), dropout=cfg.dropout or None, res_block=True,
    )


def _flexunet(cfg: NetworkConfig, dims: int, cin: int, cout: int) -> nn.Module:
    from monai.networks.nets import FlexibleUNet

    return FlexibleUNet(
        in_channels=cin, out_channels=cout, backbone=cfg.backbone, pretrained=False, spatial_dims=dims,
        dropout=cfg.dropout,
    )


NETWORKS: dict[str, Callable[[NetworkConfig, int, int, int], nn.Module]] = {
    "unet": _unet,
    "dynunet": _dynunet,
    "flexunet": _flexunet,
}


def divisor(cfg: NetworkConfig) -> int:
    """Every spatial size the network sees must be a multiple of this."""
    if cfg.name == "flexunet":
        return 32  # five stride-2 stages in MONAI's encoders
    return 2 ** (len(cfg.channels) - 1)


def network_roi(patch_size: Sequence[int], cfg: NetworkConfig) -> tuple[int, ...]:
    """The plan's patch rounded up to the network's divisor (axes of size 1 stay 1)."""
    d = divisor(cfg)
    return tuple(1 if p == 1 else int(math.ceil(p / d)) * d for p in patch_size)


def build_network(cfg: NetworkConfig, *, patch_size: Sequence[int], in_channels: int, out_channels: int) -> nn.Module:
    """Build the named network; 2D if the patch has an axis of size 1."""
    if cfg.name not in NETWORKS:
        raise ConfigError(f"unknown network '{cfg.name}': expected one of {sorted(NETWORKS)}")
    flat = [i for i, p in enumerate(patch_size) if p == 1]
    if len(flat) > 1:
        raise ConfigError(f"patch {tuple(patch_size)}: expected at most one axis of size 1")
    dims = 2 if flat else 3
    net = NETWORKS[cfg.name](cfg, dims, in_channels, out_channels)
    return SliceWise(net, flat[0]) if flat else net


def describe(net: nn.Module) -> dict[str, Any]:
    return {"parameters": sum(p.numel() for p in net.parameters())}
