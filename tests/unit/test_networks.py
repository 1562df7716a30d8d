"""Unit tests of medseg.networks: the registry, settings validation, the patch rounding, deep
supervision, and 2D networks on 3D tensors.

Networks are kept small (feature maps (4, 8, 16); flexunet with the resnet10 encoder) and shapes
are checked in eval mode under torch.no_grad() unless training mode is the point (MONAI's ResNet
encoders end in a 1 x 1 x 1 batch-norm on a 32^3 patch, which training mode refuses for a batch
of one).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.config import NetworkConfig, TrainConfig, validate
from medseg.errors import ConfigError
from medseg.networks import (
    NETWORKS,
    ResEncUNet,
    SliceWise,
    build_network,
    describe,
    divisor,
    network_roi,
)
from medseg.planning import Topology

TOPO_3D = Topology(strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), kernels=((3, 3, 3),) * 3, features=(4, 8, 16))
# An anisotropic topology: axis 2 pooled only once, with a kernel of 1 at first.
TOPO_ANISO = Topology(strides=((1, 1, 1), (2, 2, 1), (2, 2, 2)), kernels=((3, 3, 1), (3, 3, 3), (3, 3, 3)),
                      features=(4, 8, 16))
TOPO_2D = Topology(strides=((1, 1), (2, 2), (2, 2)), kernels=((3, 3),) * 3, features=(4, 8, 16))

SMALL = {
    "dynunet": NetworkConfig(name="dynunet"),
    "resenc": NetworkConfig(name="resenc", blocks_per_stage=(1, 2, 2)),
    "segresnet": NetworkConfig(name="segresnet", init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1)),
    "unet": NetworkConfig(name="unet", channels=(4, 8, 16)),
    "flexunet": NetworkConfig(name="flexunet", backbone="resnet10"),
}


def forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(x)


def test_registry_matches_the_config_choices() -> None:
    assert set(NETWORKS) == {"dynunet", "resenc", "segresnet", "unet", "flexunet"}
    assert set(NETWORKS) == set(NetworkConfig.model_fields["name"].annotation.__args__)


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"name": "dynunet", "channels": [4, 8]}, "channels is for unet"),
        ({"name": "segresnet", "backbone": "resnet10"}, "backbone is for flexunet"),
        ({"name": "unet", "deep_supervision": False}, "deep_supervision is for dynunet, resenc"),
        ({"name": "dynunet", "blocks_per_stage": [1, 2]}, "blocks_per_stage is for resenc"),
        ({"name": "segresnet", "blocks_down": [1, 2], "blocks_up": [1, 1]}, "one fewer blocks_up"),
        ({"name": "resenc", "blocks_per_stage": [1, 0]}, "positive block counts"),
        ({"name": "segresnet", "init_filters": 12}, "multiple of 8"),
        ({"name": "vnet"}, "'network.name'"),
        ({"name": "dynunet", "depth": 3}, "unknown key 'network.depth'"),
    ],
)
def test_settings_of_another_network_are_refused(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig, {"network": section}, "test config")


def test_a_network_config_survives_a_json_round_trip() -> None:
    for cfg in SMALL.values():
        assert NetworkConfig.model_validate(cfg.model_dump(mode="json")) == cfg


# ---------------------------------------------------------------- divisor and network_roi


@pytest.mark.parametrize(
    ("name", "topo", "expected"),
    [
        ("dynunet", TOPO_3D, (4, 4, 4)),
        ("resenc", TOPO_ANISO, (4, 4, 2)),  # from the plan's topology, per axis
        ("segresnet", TOPO_3D, (4, 4, 4)),  # 3 encoder stages: 2 stride-2 steps
        ("unet", TOPO_3D, (4, 4, 4)),  # channels (4, 8, 16): 2 stride-2 steps
        ("flexunet", TOPO_3D, (32, 32, 32)),  # fixed by the encoder
        ("unet", TOPO_2D, (4, 4)),
    ],
)
def test_divisor(name: str, topo: Topology, expected: tuple[int, ...]) -> None:
    assert divisor(SMALL[name], topo) == expected


@pytest.mark.parametrize(
    ("name", "topo", "patch", "expected"),
    [
        ("unet", TOPO_3D, (20, 28, 20), (20, 28, 20)),  # already multiples of 4
        ("unet", TOPO_3D, (17, 21, 4), (20, 24, 4)),
        ("resenc", TOPO_ANISO, (17, 21, 5), (20, 24, 6)),
        ("dynunet", TOPO_2D, (1, 5, 9), (1, 8, 12)),  # an axis of size 1 stays 1
        ("flexunet", TOPO_3D, (20, 28, 20), (32, 32, 32)),
        ("flexunet", TOPO_2D, (33, 64, 1), (64, 64, 1)),
    ],
)
def test_network_roi_rounds_up_to_the_divisor(name: str, topo: Topology, patch: tuple[int, ...],
                                              expected: tuple[int, ...]) -> None:
    assert network_roi(patch, SMALL[name], topo) == expected


# ---------------------------------------------------------------- 3D networks


@pytest.mark.parametrize("name", sorted(SMALL))
def test_3d_network_keeps_the_roi_shape(name: str) -> None:
    cfg = SMALL[name]
    roi = network_roi((20, 28, 20), cfg, TOPO_3D)
    net = build_network(cfg, patch_size=roi, in_channels=2, out_channels=3, topology=TOPO_3D)
    assert not isinstance(net, SliceWise)
    torch.manual_seed(0)
    out = forward(net, torch.randn(1, 2, *roi))
    assert tuple(out.shape) == (1, 3, *roi)
    assert torch.isfinite(out).all()
    assert describe(net)["parameters"] == sum(p.numel() for p in net.parameters()) > 0


def test_dynunet_follows_the_topology() -> None:
    net = build_network(SMALL["dynunet"], patch_size=(8, 8, 4), in_channels=1, out_channels=2, topology=TOPO_ANISO)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    assert convs[0].kernel_size == (3, 3, 1)  # the first stage's kernel from the plan
    assert convs[0].out_channels == 4
    assert max(c.out_channels for c in convs) == 16


@pytest.mark.parametrize("name", ["dynunet", "resenc"])
def test_deep_supervision_in_training_only(name: str) -> None:
    """Three stages: the main output and one head (every decoder stage but the lowest), both at
    full resolution; eval mode gives the main output alone."""
    net = build_network(SMALL[name], patch_size=(16, 16, 16), in_channels=1, out_channels=3, topology=TOPO_3D)
    x = torch.randn(2, 1, 16, 16, 16)
    net.train()
    out = net(x)
    assert tuple(out.shape) == (2, 2, 3, 16, 16, 16)
    assert tuple(forward(net, x).shape) == (2, 3, 16, 16, 16)
    without = NetworkConfig(name=name, deep_supervision=False, **({"blocks_per_stage": (1, 2, 2)} if name == "resenc" else {}))
    plain = build_network(without, patch_size=(16, 16, 16), in_channels=1, out_channels=3, topology=TOPO_3D)
    assert tuple(plain.train()(x).shape) == (2, 3, 16, 16, 16)


def test_resenc_stacks_residual_blocks_per_stage() -> None:
    from monai.networks.blocks.dynunet_block import UnetResBlock

    net = build_network(SMALL["resenc"], patch_size=(16, 16, 16), in_channels=1, out_channels=2, topology=TOPO_3D)
    assert isinstance(net, ResEncUNet)
    assert [sum(isinstance(b, UnetResBlock) for b in stage) for stage in net.encoder] == [1, 2, 2]
    with pytest.raises(ConfigError, match="blocks_per_stage: expected at least 3"):
        build_network(NetworkConfig(name="resenc", blocks_per_stage=(1, 2)), patch_size=(16, 16, 16), in_channels=1,
                      out_channels=2, topology=TOPO_3D)


def test_unet_uses_the_configured_channels() -> None:
    small = build_network(NetworkConfig(name="unet", channels=(4, 8, 16)), patch_size=(8, 8, 8), in_channels=1,
                          out_channels=2, topology=TOPO_3D)
    large = build_network(NetworkConfig(name="unet", channels=(8, 16, 32)), patch_size=(8, 8, 8), in_channels=1,
                          out_channels=2, topology=TOPO_3D)
    assert describe(small)["parameters"] < describe(large)["parameters"]


# ---------------------------------------------------------------- 2D networks


@pytest.mark.parametrize("name", sorted(SMALL))
def test_2d_patch_builds_a_slicewise_network(name: str) -> None:
    cfg = SMALL[name]
    net = build_network(cfg, patch_size=(32, 1, 32), in_channels=1, out_channels=3, topology=TOPO_2D)
    assert isinstance(net, SliceWise)
    assert net.axis == 1
    torch.manual_seed(0)
    out = forward(net, torch.randn(1, 1, 32, 1, 32))
    assert tuple(out.shape) == (1, 3, 32, 1, 32)


def test_slicewise_keeps_the_heads_axis_of_deep_supervision() -> None:
    net = build_network(SMALL["dynunet"], patch_size=(16, 16, 1), in_channels=1, out_channels=3, topology=TOPO_2D)
    out = net.train()(torch.randn(2, 1, 16, 16, 1))
    assert tuple(out.shape) == (2, 2, 3, 16, 16, 1)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slicewise_squeezes_the_right_axis(axis: int) -> None:
    patch = [16, 16, 16]
    patch[axis] = 1
    net = build_network(SMALL["unet"], patch_size=patch, in_channels=2, out_channels=3, topology=TOPO_2D)
    assert isinstance(net, SliceWise) and net.axis == axis
    out = forward(net, torch.randn(2, 2, *patch))
    assert tuple(out.shape) == (2, 3, *patch)


def test_slicewise_equals_the_2d_network_on_the_squeezed_slice() -> None:
    net = build_network(SMALL["unet"], patch_size=(16, 16, 1), in_channels=1, out_channels=2, topology=TOPO_2D)
    torch.manual_seed(1)
    x = torch.randn(1, 1, 16, 16, 1)
    wrapped = forward(net, x)
    plain = forward(net.net, x[..., 0])
    torch.testing.assert_close(wrapped[..., 0], plain)


def test_two_flat_axes_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"at most one axis of size 1"):
        build_network(SMALL["unet"], patch_size=(32, 1, 1), in_channels=1, out_channels=3, topology=TOPO_2D)


def test_a_topology_of_the_wrong_dims_is_refused() -> None:
    with pytest.raises(ConfigError, match="topology has 3 axes"):
        build_network(SMALL["dynunet"], patch_size=(32, 1, 32), in_channels=1, out_channels=3, topology=TOPO_3D)
