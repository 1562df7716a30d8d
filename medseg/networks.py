"""Networks chosen by name: an explicit registry of MONAI networks, 2D or 3D.

- ``dynunet``: nnU-Net's U-Net (MONAI ``DynUNet``: two convolutions per stage with instance norm
  and leaky ReLU, transposed-convolution upsampling), its stages, kernels and feature maps taken
  from the plan's topology, with deep supervision;
- ``resenc``: a residual-encoder U-Net, as nnU-Net's ResEnc presets: each encoder stage a stack
  of residual blocks (``blocks_per_stage``, nnU-Net's 1, 3, 4, 6, 6, ... by default), a plain
  decoder, the plan's topology, deep supervision; built from MONAI's U-Net blocks;
- ``segresnet``: MONAI ``SegResNet`` (Myronenko 2018);
- ``unet``: MONAI ``UNet`` with residual units (``channels``);
- ``flexunet``: MONAI ``FlexibleUNet`` with a ResNet or EfficientNet encoder (``backbone``).

All networks take and return 5D tensors (B, C, X, Y, Z). A 2D plan has a patch with 1 on its
slice axis; its 2D network is wrapped so it sees (B, C, a, b) slices. With deep supervision a
network in training mode returns (B, heads, C, X, Y, Z): the full-resolution output first,
then the coarser decoder stages' outputs upsampled to full resolution; in eval mode only the
first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from medseg.config import NetworkConfig
from medseg.errors import ConfigError
from medseg.planning import Topology

NORM = ("instance", {"affine": True})
ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


class SliceWise(nn.Module):
    """Run a 2D network on volumes whose ``axis`` (spatial, 0..2) has size 1."""

    def __init__(self, net: nn.Module, axis: int) -> None:
        super().__init__()
        self.net = net
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = 2 + self.axis
        out = self.net(x.squeeze(dim))
        return out.unsqueeze(dim + (out.dim() - x.dim() + 1))  # past the heads axis of deep supervision


def deep_supervision_heads(stages: int) -> int:
    """The extra outputs of a U-Net of ``stages`` stages: every decoder stage but the lowest."""
    return max(stages - 2, 0)


def dynunet(topo: Topology, in_channels: int, out_channels: int, *, deep_supervision: bool = True,
            res_block: bool = False, dropout: float = 0.0) -> nn.Module:
    """MONAI's DynUNet of a planned topology (nnU-Net's network)."""
    from monai.networks.nets import DynUNet

    heads = deep_supervision_heads(len(topo.strides)) if deep_supervision else 0
    return DynUNet(
        spatial_dims=len(topo.strides[0]), in_channels=in_channels, out_channels=out_channels,
        kernel_size=[list(k) for k in topo.kernels], strides=[list(s) for s in topo.strides],
        upsample_kernel_size=[list(s) for s in topo.strides[1:]], filters=list(topo.features),
        dropout=dropout or None, norm_name=NORM, act_name=ACT, res_block=res_block,
        deep_supervision=heads > 0, deep_supr_num=max(heads, 1),
    )


class ResEncUNet(nn.Module):
    """A U-Net whose encoder stages are stacks of residual blocks (nnU-Net's ResEnc design),
    built from MONAI's ``UnetResBlock``, ``UnetUpBlock`` and ``UnetOutBlock``."""

    def __init__(self, topo: Topology, in_channels: int, out_channels: int, blocks_per_stage: Sequence[int], *,
                 deep_supervision: bool = True, dropout: float = 0.0) -> None:
        from monai.networks.blocks.dynunet_block import (
            UnetOutBlock,
            UnetResBlock,
            UnetUpBlock,
        )

        super().__init__()
        dims = len(topo.strides[0])
        features = topo.features
        stages = len(topo.strides)
        if len(blocks_per_stage) < stages:
            raise ConfigError(f"network.blocks_per_stage: expected at least {stages} values (one per stage of the "
                              f"plan), found {len(blocks_per_stage)}")
        self.encoder = nn.ModuleList()
        previous = in_channels
        for s in range(stages):
            blocks = [UnetResBlock(dims, previous, features[s], topo.kernels[s], topo.strides[s], NORM, ACT,
                                   dropout or None)]
            blocks += [UnetResBlock(dims, features[s], features[s], topo.kernels[s], 1, NORM, ACT, dropout or None)
                       for _ in range(blocks_per_stage[s] - 1)]
            self.encoder.append(nn.Sequential(*blocks))
            previous = features[s]
        self.decoder = nn.ModuleList(
            UnetUpBlock(dims, features[s + 1], features[s], topo.kernels[s], topo.strides[s + 1],
                        topo.strides[s + 1], NORM, ACT, dropout or None)
            for s in reversed(range(stages - 1))
        )
        self.output = UnetOutBlock(dims, features[0], out_channels)
        heads = deep_supervision_heads(stages) if deep_supervision else 0
        # Decoder outputs at stages 1..heads (the ones after the lowest), finest first.
        self.heads = nn.ModuleList(UnetOutBlock(dims, features[s], out_channels) for s in range(1, heads + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        decoded = {}
        for up, s in zip(self.decoder, reversed(range(len(skips) - 1))):
            x = up(x, skips[s])
            decoded[s] = x
        out = self.output(x)
        if not self.training or not self.heads:
            return out
        size = out.shape[2:]
        extra = [nn.functional.interpolate(head(decoded[s + 1]), size=size, mode="trilinear" if out.dim() == 5
                                           else "bilinear", align_corners=False)
                 for s, head in enumerate(self.heads)]
        return torch.stack([out, *extra], dim=1)


RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6)  # nnU-Net's ResEnc encoder blocks per stage


def _dynunet(cfg: NetworkConfig, dims: int, cin: int, cout: int, topo: Topology) -> nn.Module:
    return dynunet(topo, cin, cout, deep_supervision=cfg.deep_supervision, dropout=cfg.dropout)


def _resenc(cfg: NetworkConfig, dims: int, cin: int, cout: int, topo: Topology) -> nn.Module:
    return ResEncUNet(topo, cin, cout, cfg.blocks_per_stage or RESENC_BLOCKS, deep_supervision=cfg.deep_supervision,
                      dropout=cfg.dropout)


def _segresnet(cfg: NetworkConfig, dims: int, cin: int, cout: int, topo: Topology) -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=dims, init_filters=cfg.init_filters, in_channels=cin, out_channels=cout,
                     dropout_prob=cfg.dropout or None, blocks_down=cfg.blocks_down, blocks_up=cfg.blocks_up)


def _unet(cfg: NetworkConfig, dims: int, cin: int, cout: int, topo: Topology) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=dims, in_channels=cin, out_channels=cout, channels=cfg.channels,
        strides=(2,) * (len(cfg.channels) - 1), num_res_units=cfg.num_res_units, dropout=cfg.dropout,
    )


def _flexunet(cfg: NetworkConfig, dims: int, cin: int, cout: int, topo: Topology) -> nn.Module:
    from monai.networks.nets import FlexibleUNet

    return FlexibleUNet(
        in_channels=cin, out_channels=cout, backbone=cfg.backbone, pretrained=False, spatial_dims=dims,
        dropout=cfg.dropout,
    )


NETWORKS: dict[str, Callable[[NetworkConfig, int, int, int, Topology], nn.Module]] = {
    "dynunet": _dynunet,
    "resenc": _resenc,
    "segresnet": _segresnet,
    "unet": _unet,
    "flexunet": _flexunet,
}


def divisor(cfg: NetworkConfig, topo: Topology) -> tuple[int, ...]:
    """Every spatial size the network sees must be a multiple of this, per axis it convolves."""
    dims = len(topo.strides[0])
    if cfg.name in ("dynunet", "resenc"):
        return topo.divisor
    if cfg.name == "flexunet":
        return (32,) * dims  # five stride-2 stages in MONAI's encoders
    if cfg.name == "segresnet":
        return (2 ** (len(cfg.blocks_down) - 1),) * dims
    return (2 ** (len(cfg.channels) - 1),) * dims


def convolved_axes(patch_size: Sequence[int]) -> list[int]:
    """The axes a network convolves: all three, or the two of a 2D plan (the third has size 1)."""
    flat = [i for i, p in enumerate(patch_size) if p == 1]
    if len(flat) > 1:
        raise ConfigError(f"patch {tuple(patch_size)}: expected at most one axis of size 1")
    return [i for i in range(len(patch_size)) if i not in flat]


def network_roi(patch_size: Sequence[int], cfg: NetworkConfig, topo: Topology) -> tuple[int, ...]:
    """The plan's patch rounded up to the network's divisor (an axis of size 1 stays 1)."""
    roi = list(patch_size)
    for axis, d in zip(convolved_axes(patch_size), divisor(cfg, topo)):
        roi[axis] = int(math.ceil(patch_size[axis] / d)) * d
    return tuple(roi)


def build_network(cfg: NetworkConfig, *, patch_size: Sequence[int], in_channels: int, out_channels: int,
                  topology: Topology) -> nn.Module:
    """Build the named network; 2D if the patch has an axis of size 1. ``topology`` is the plan's
    (per convolved axis), which ``dynunet`` and ``resenc`` follow."""
    if cfg.name not in NETWORKS:
        raise ConfigError(f"unknown network '{cfg.name}': expected one of {sorted(NETWORKS)}")
    axes = convolved_axes(patch_size)
    if len(topology.strides[0]) != len(axes):
        raise ConfigError(f"the plan's topology has {len(topology.strides[0])} axes, the patch "
                          f"{tuple(patch_size)} convolves {len(axes)}")
    net = NETWORKS[cfg.name](cfg, len(axes), in_channels, out_channels, topology)
    flat = [i for i in range(len(patch_size)) if i not in axes]
    return SliceWise(net, flat[0]) if flat else net


def describe(net: nn.Module) -> dict[str, Any]:
    return {"parameters": sum(p.numel() for p in net.parameters())}
