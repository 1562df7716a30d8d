"""Unit tests of medseg.networks: the registry, the patch rounding and 2D networks on 3D tensors.

Networks are kept small (channels (4, 8, 16); flexunet with the resnet10 encoder) and run in eval
mode under torch.no_grad() (MONAI's ResNet encoders end in a 1 x 1 x 1 batch-norm on a 32^3 patch,
which training mode refuses for a batch of one).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.config import NetworkConfig
from medseg.errors import ConfigError
from medseg.networks import NETWORKS, SliceWise, build_network, describe, divisor, network_roi

SMALL = {
    "unet": NetworkConfig(name="unet", channels=(4, 8, 16)),
    "dynunet": NetworkConfig(name="dynunet", channels=(4, 8, 16)),
    "flexunet": NetworkConfig(name="flexunet", channels=(4, 8, 16), backbone="resnet10"),
}


def forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(x)


def test_registry_matches_the_config_choices() -> None:
    assert set(NETWORKS) == {"unet", "dynunet", "flexunet"}


# ---------------------------------------------------------------- divisor and network_roi


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (NetworkConfig(name="unet", channels=(4, 8, 16)), 4),
        (NetworkConfig(name="unet", channels=(4, 8)), 2),
        (NetworkConfig(name="unet"), 8),  # default (16, 32, 64, 128): 3 stride-2 steps
        (NetworkConfig(name="dynunet", channels=(4, 8, 16, 32, 64)), 16),
        (NetworkConfig(name="flexunet", channels=(4, 8)), 32),  # fixed by the encoder, not the channels
    ],
)
def test_divisor(cfg: NetworkConfig, expected: int) -> None:
    assert divisor(cfg) == expected


@pytest.mark.parametrize(
    ("name", "patch", "expected"),
    [
        ("unet", (20, 28, 20), (20, 28, 20)),  # already multiples of 4
        ("unet", (17, 21, 4), (20, 24, 4)),
        ("dynunet", (1, 5, 9), (1, 8, 12)),  # an axis of size 1 stays 1
        ("flexunet", (20, 28, 20), (32, 32, 32)),
        ("flexunet", (33, 64, 1), (64, 64, 1)),
    ],
)
def test_network_roi_rounds_up_to_the_divisor(name: str, patch: tuple[int, ...], expected: tuple[int, ...]) -> None:
    assert network_roi(patch, SMALL[name]) == expected


# ---------------------------------------------------------------- 3D networks


@pytest.mark.parametrize("name", ["unet", "dynunet", "flexunet"])
def test_3d_network_keeps_the_roi_shape(name: str) -> None:
    cfg = SMALL[name]
    roi = network_roi((20, 28, 20), cfg)
    net = build_network(cfg, patch_size=roi, in_channels=2, out_channels=3)
    assert not isinstance(net, SliceWise)
    torch.manual_seed(0)
    out = forward(net, torch.randn(1, 2, *roi))
    assert tuple(out.shape) == (1, 3, *roi)
    assert torch.isfinite(out).all()
    assert describe(net)["parameters"] == sum(p.numel() for p in net.parameters()) > 0


def test_unet_uses_the_configured_channels() -> None:
    small = build_network(NetworkConfig(name="unet", channels=(4, 8, 16)), patch_size=(8, 8, 8), in_channels=1,
                          out_channels=2)
    large = build_network(NetworkConfig(name="unet", channels=(8, 16, 32)), patch_size=(8, 8, 8), in_channels=1,
                          out_channels=2)
    assert describe(small)["parameters"] < describe(large)["parameters"]


# ---------------------------------------------------------------- 2D networks


@pytest.mark.parametrize("name", ["unet", "dynunet", "flexunet"])
def test_2d_patch_builds_a_slicewise_network(name: str) -> None:
    cfg = SMALL[name]
    net = build_network(cfg, patch_size=(32, 1, 32), in_channels=1, out_channels=3)
    assert isinstance(net, SliceWise)
    assert net.axis == 1
    torch.manual_seed(0)
    out = forward(net, torch.randn(1, 1, 32, 1, 32))
    assert tuple(out.shape) == (1, 3, 32, 1, 32)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slicewise_squeezes_the_right_axis(axis: int) -> None:
    patch = [16, 16, 16]
    patch[axis] = 1
    net = build_network(SMALL["unet"], patch_size=patch, in_channels=2, out_channels=3)
    assert isinstance(net, SliceWise) and net.axis == axis
    out = forward(net, torch.randn(2, 2, *patch))
    assert tuple(out.shape) == (2, 3, *patch)


def test_slicewise_equals_the_2d_network_on_the_squeezed_slice() -> None:
    net = build_network(SMALL["unet"], patch_size=(16, 16, 1), in_channels=1, out_channels=2)
    torch.manual_seed(1)
    x = torch.randn(1, 1, 16, 16, 1)
    wrapped = forward(net, x)
    plain = forward(net.net, x[..., 0])
    torch.testing.assert_close(wrapped[..., 0], plain)


def test_two_flat_axes_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"at most one axis of size 1"):
        build_network(SMALL["unet"], patch_size=(32, 1, 1), in_channels=1, out_channels=3)
