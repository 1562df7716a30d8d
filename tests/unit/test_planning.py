"""Unit tests of medseg.planning and medseg.memory: the topology, patch and batch rules on fixed
fingerprints with answers worked out by hand, and the memory count on the meta device."""

from __future__ import annotations

import math

import pytest

from medseg.memory import (
    PARAMETER_COPIES,
    count_training_bytes,
    planned_network,
    training_bytes,
)
from medseg.planning import Topology, batch_size, fit_patch, initial_patch, topology

GB = 2**30


def test_isotropic_topology_pools_every_axis_while_eight_voxels_remain() -> None:
    """Hippocampus-like: 1 mm, median shape (36, 50, 35). 36 -> 18 -> 9 -> 5, 50 -> 25 -> 13 -> 7,
    35 -> 18 -> 9 -> 5: three pools on each axis (a fourth would start below 8 voxels), so the
    divisor is 8 and the patch rounds up to (40, 56, 40)."""
    topo, patch = topology((1.0, 1.0, 1.0), (36, 50, 35))
    assert topo.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert topo.kernels == ((3, 3, 3),) * 4
    assert topo.features == (32, 64, 128, 256)
    assert topo.pools == (3, 3, 3) and topo.divisor == (8, 8, 8)
    assert patch == (40, 56, 40)


def test_anisotropic_topology_waits_for_the_coarse_axis() -> None:
    """Prostate-like: (3.6, 0.62, 0.62) mm, patch (20, 320, 319). The fine axes are pooled alone
    (kernels 1 x 3 x 3) until their spacing, 2.48 mm, is within 2x of 3.6 mm; then all three
    are pooled twice, until axis 0 has 5 voxels; then the fine axes twice more (160 x ... -> 5)."""
    topo, patch = topology((3.6, 0.62, 0.62), (20, 320, 319))
    assert topo.strides == ((1, 1, 1), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))
    assert topo.kernels == ((1, 3, 3), (1, 3, 3)) + ((3, 3, 3),) * 5
    assert topo.features == (32, 64, 128, 256, 320, 320, 320)
    assert topo.divisor == (4, 64, 64)
    assert patch == (20, 320, 320)


def test_a_lone_axis_is_pooled_only_while_it_keeps_twelve_voxels() -> None:
    """(64, 8, 8): one pool of all three leaves (32, 4, 4); axis 0 then goes alone: 32 -> 16 -> 8,
    and at 8 (< 3 x 4) it stops."""
    topo, patch = topology((1.0, 1.0, 1.0), (64, 8, 8))
    assert topo.pools == (3, 1, 1)
    assert topo.divisor == (8, 2, 2)
    assert patch == (64, 8, 8)


def test_2d_topology_and_feature_cap() -> None:
    """(300, 200): both axes are pooled 5 times (300 -> 150 -> 75 -> 38 -> 19 -> 10, 200 -> 100 ->
    50 -> 25 -> 13 -> 7); then axis 0 alone has 10 voxels, fewer than 12, and pooling stops.
    The divisor 32 rounds 200 up to 224."""
    topo, patch = topology((1.0, 1.0), (300, 200), base_features=64, max_features=512)
    assert topo.pools == (5, 5)
    assert topo.features == (64, 128, 256, 512, 512, 512)
    assert patch == (320, 224)


@pytest.mark.parametrize(
    ("spacing", "median", "expected"),
    [
        ((1.0, 1.0, 1.0), (300, 300, 300), (256, 256, 256)),
        ((1.0, 1.0, 1.0), (36, 50, 35), (36, 50, 35)),
        # 256^3 shaped by the spacing: (1/2, 1, 1) * (256^3 / 0.5)^(1/3) = (161.3, 322.5, 322.5).
        ((2.0, 1.0, 1.0), (400, 400, 400), (161, 323, 323)),
        ((1.0, 1.0), (5000, 100), (2048, 100)),
    ],
)
def test_initial_patch(spacing: tuple[float, ...], median: tuple[float, ...], expected: tuple[int, ...]) -> None:
    assert initial_patch(spacing, median) == expected


def _linear(bytes_per_voxel: int, fixed: int):  # noqa: ANN202
    return lambda topo, patch: (bytes_per_voxel * math.prod(patch), fixed)


def test_fit_patch_keeps_a_patch_that_fits() -> None:
    choice = fit_patch((1.0, 1.0, 1.0), (64, 64, 64), 2 * 100 * 64**3, _linear(100, 0))
    assert choice.patch == (64, 64, 64)
    assert choice.reductions == 0
    assert choice.sample_bytes == 100 * 64**3


def test_fit_patch_shrinks_the_axis_largest_against_the_median() -> None:
    """(64, 64, 64) has 4 pools per axis (divisor 16). One voxel too many for the budget: axis 0
    (the first of equal ratios) loses 16, and (48, 64, 64) is a multiple of its new divisor
    (8, 16, 16)."""
    budget = 2 * 100 * 48 * 64 * 64
    choice = fit_patch((1.0, 1.0, 1.0), (64, 64, 64), budget, _linear(100, 0))
    assert choice.patch == (48, 64, 64)
    assert choice.reductions == 1
    assert choice.topology.divisor == (8, 16, 16)


def test_fit_patch_counts_fixed_memory_and_shrinks_in_turn() -> None:
    """Median (64, 128, 64), divisor 16, a budget of fixed bytes plus 2 x 10 bytes x 262,144 voxels.
    Each step shrinks the axis whose patch is largest against the median: axis 0 (ratios all
    1, the first) to 48, then axis 1 (1 > 0.75) to 112, then axis 2 to 48: 258,048 voxels fit."""
    fixed = 10_000_000
    budget = fixed + 2 * 10 * 32 * 128 * 64
    choice = fit_patch((1.0, 1.0, 1.0), (64, 128, 64), budget, _linear(10, fixed))
    assert choice.patch == (48, 112, 48)
    assert choice.reductions == 3
    assert 2 * choice.sample_bytes + fixed <= budget


def test_fit_patch_stops_at_the_smallest_patch() -> None:
    choice = fit_patch((1.0, 1.0, 1.0), (16, 16, 16), 1, _linear(100, 0))
    assert math.prod(choice.patch) <= 16**3
    assert all(p >= 1 for p in choice.patch)


@pytest.mark.parametrize(
    ("sample", "fixed", "budget", "patch", "voxels", "expected", "rule"),
    [
        # Memory: (1 GB - 50 MiB) // 100 MiB = 9.74 -> 9; the data would allow 5% of 1e9 / 1e6 = 50.
        (100 * 2**20, 50 * 2**20, GB, (100, 100, 100), 1e9, 9, "memory budget"),
        # Data: 5% of 1.3e7 voxels / 89,600 = 7.3 -> 7 (hippocampus, 208 cases).
        (10 * 2**20, 0, 8 * GB, (40, 56, 40), 208 * 36 * 50 * 35, 7, "5% of the dataset"),
        # Neither allows 2: the minimum.
        (10 * GB, 0, 8 * GB, (40, 56, 40), 1e9, 2, "minimum"),
    ],
)
def test_batch_size(sample: int, fixed: int, budget: int, patch: tuple[int, ...], voxels: float, expected: int,
                    rule: str) -> None:
    batch, why = batch_size(sample, fixed, budget, patch, voxels)
    assert batch == expected
    assert rule in why


def test_memory_scaled_from_one_count_equals_the_direct_count() -> None:
    """Saved activations grow with the patch volume: the count on the smallest patch, scaled,
    equals a count on the real patch to within the per-channel statistics of the norms."""
    topo, patch = topology((1.0, 1.0, 1.0), (36, 50, 35))
    scaled, fixed = training_bytes(topo, patch, 1, 3)
    direct, fixed_direct = count_training_bytes(topo, patch, 1, 3)
    assert fixed == fixed_direct
    assert scaled == pytest.approx(direct, rel=0.01)
    net = planned_network(topo, 1, 3)
    assert fixed == PARAMETER_COPIES * 4 * sum(p.numel() for p in net.parameters())
    # Per voxel of the patch, the network saves about 2.4 kB in float32 (measured; kept as a guard).
    assert 2000 < direct / math.prod(patch) < 3000


def test_memory_of_a_2d_topology() -> None:
    topo = Topology(strides=((1, 1), (2, 2), (2, 2)), kernels=((3, 3),) * 3, features=(32, 64, 128))
    small = training_bytes(topo, (16, 16), 1, 2)[0]
    large = training_bytes(topo, (32, 64), 1, 2)[0]
    assert large == pytest.approx(8 * small, rel=1e-6)


def test_hippocampus_fingerprint_gives_nnunet_patch_and_the_data_bound_batch() -> None:
    """At 8 GB the whole median shape fits (a batch of 2 needs about 0.5 GB): patch (40, 56, 40); the
    batch is bounded by 5% of the voxels: 7 for 208 cases, 9 for the 260 of the full MSD set."""
    choice = fit_patch((1.0, 1.0, 1.0), (36, 50, 35), 8 * GB, lambda t, p: training_bytes(t, p, 1, 3))
    assert choice.patch == (40, 56, 40)
    assert choice.reductions == 0
    batch, _ = batch_size(choice.sample_bytes, choice.fixed_bytes, 8 * GB, choice.patch, 208 * 36 * 50 * 35)
    assert batch == 7
    assert batch_size(choice.sample_bytes, choice.fixed_bytes, 8 * GB, choice.patch, 260 * 36 * 50 * 35)[0] == 9
