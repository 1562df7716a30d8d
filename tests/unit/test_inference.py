"""Unit tests of medseg.inference: test-time flips per window, and restoring probabilities class by class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_nifti
from test_transforms import lps_affine, make_plan, two_boxes
from torch import nn

from medseg.config import NetworkConfig, PredictConfig, PreprocessConfig
from medseg.inference import (
    flip_sets,
    restore,
    restore_ensemble,
    uncertainty_score,
    window_predictor,
)
from medseg.modelio import ModelSpec
from medseg.transforms import preprocessing


def test_test_time_flips_follow_the_plans_mirror_axes() -> None:
    assert flip_sets((8, 8, 8), False, None) == [()]
    assert len(flip_sets((8, 8, 8), True, None)) == 8
    assert flip_sets((8, 8, 8), True, (0, 2)) == [(), (2,), (4,), (2, 4)]  # tensor dims of (B, C, x, y, z)
    assert flip_sets((8, 8, 8), True, ()) == [()]
    assert flip_sets((8, 8, 1), True, (1, 2)) == [(), (3,)]  # 2D: the slice axis is never flipped


class Ramp(nn.Module):
    """Logits (class 0: the image, class 1: a ramp along x times ``gain``): not mirror-symmetric."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.arange(x.shape[2], dtype=x.dtype).reshape(1, 1, -1, 1, 1).expand_as(x)
        return torch.cat([x, self.gain * ramp], dim=1)


def _spec(mirror_axes: tuple[int, ...]) -> ModelSpec:
    plan = make_plan((1.0, 1.0, 1.0)).model_copy(update={"mirror_axes": mirror_axes, "labels": {0: "bg", 1: "fg"}})
    return ModelSpec(plan=plan, preprocess=PreprocessConfig(), network=NetworkConfig(), roi_size=(4, 4, 4))


def test_windows_average_models_and_flips_undone() -> None:
    x = torch.randn(2, 1, 4, 4, 4)
    models = [(Ramp(1.0), _spec((0,))), (Ramp(0.5), _spec((0,)))]
    got = window_predictor(models, PredictConfig(tta_flips=True), torch.device("cpu"))(x)
    expected = torch.zeros_like(got)
    for net, _ in models:
        expected += torch.softmax(net(x), 1)
        expected += torch.flip(torch.softmax(net(torch.flip(x, (2,))), 1), (2,))  # mirrored in, mirrored back
    torch.testing.assert_close(got, expected / 4)
    plain = window_predictor(models[:1], PredictConfig(tta_flips=False), torch.device("cpu"))(x)
    torch.testing.assert_close(plain, torch.softmax(models[0][0](x), 1))


def test_restore_class_by_class_is_the_argmax_of_all_classes_restored(tmp_path: Path) -> None:
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    # An LPS scan of 0.7 x 0.9 x 2.5 mm voxels, resampled to 1.3 mm by the chain and cropped to its non-zero part.
    image, _ = two_boxes((30, 26, 12), margin=3)
    write_nifti(tmp_path / "scan.nii.gz", image, lps_affine((0.7, 0.9, 2.5), (5.0, -3.0, 11.0)))
    chain = preprocessing(make_plan((1.3, 1.3, 1.3)), crop_foreground=True, with_label=False)
    data = chain({"image": str(tmp_path / "scan.nii.gz")})
    grid = data["image"].shape[1:]
    probs = torch.softmax(4 * torch.randn(3, *grid), 0)
    inverter = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)

    restored = restore(probs, data, inverter, uncertainty=True, keep_probabilities=True)

    whole = inverter({**data, "pred": MetaTensor(probs.clone(), meta=dict(data["image"].meta))})["pred"]
    whole = torch.as_tensor(whole)
    assert restored.mask.shape == image.shape and restored.mask.dtype == np.uint8
    np.testing.assert_array_equal(restored.mask, whole.argmax(0).numpy())
    np.testing.assert_allclose(restored.probabilities / 255, whole.permute(1, 2, 3, 0).clamp(0, 1).numpy(),
                               atol=0.5 / 255 + 1e-6)
    assert restored.uncertainty is not None and restored.uncertainty.shape == image.shape
    assert 0 <= restored.uncertainty.min() and restored.uncertainty.max() <= 1


def test_ensemble_of_two_plans_averages_on_the_scans_grid(tmp_path: Path) -> None:
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    image, _ = two_boxes((30, 26, 12), margin=3)
    write_nifti(tmp_path / "scan.nii.gz", image, lps_affine((0.7, 0.9, 2.5), (5.0, -3.0, 11.0)))
    parts, whole = [], []
    for spacing, seed in (((1.3, 1.3, 1.3), 0), ((2.0, 1.0, 2.5), 1)):  # two plans: two grids
        chain = preprocessing(make_plan(spacing), crop_foreground=True, with_label=False)
        data = chain({"image": str(tmp_path / "scan.nii.gz")})
        probs = torch.softmax(4 * torch.randn(3, *data["image"].shape[1:], generator=torch.Generator().manual_seed(seed)), 0)
        inverter = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)
        parts.append((probs, data, inverter))
        back = inverter({**data, "pred": MetaTensor(probs.clone(), meta=dict(data["image"].meta))})["pred"]
        whole.append(torch.as_tensor(back).float())

    restored, score = restore_ensemble(parts, uncertainty=True, keep_probabilities=True)

    mean = (whole[0] + whole[1]) / 2
    assert restored.mask.shape == image.shape
    np.testing.assert_array_equal(restored.mask, mean.argmax(0).numpy())
    np.testing.assert_allclose(restored.probabilities / 255, mean.permute(1, 2, 3, 0).clamp(0, 1).numpy(),
                               atol=0.5 / 255 + 1e-6)
    p = mean.clamp(1e-12, 1)
    entropy = (-(p * p.log()).sum(0) / np.log(3)).clamp(0, 1)
    np.testing.assert_allclose(restored.uncertainty, entropy.numpy(), atol=1e-5)
    foreground = mean.argmax(0) > 0
    assert score == pytest.approx(float(entropy[foreground].double().mean()), abs=1e-6)


def test_uncertainty_score_is_the_mean_entropy_over_the_foreground() -> None:
    probs = torch.tensor([[1.0, 0.2, 0.5, 0.9], [0.0, 0.8, 0.5, 0.1]])  # 4 voxels; foreground: voxel 1
    entropy_of_08 = -(0.8 * np.log(0.8) + 0.2 * np.log(0.2)) / np.log(2)
    assert uncertainty_score(probs) == pytest.approx(entropy_of_08, abs=1e-6)  # voxel 2's tie goes to class 0
    assert uncertainty_score(torch.tensor([[0.9, 0.8], [0.1, 0.2]])) == 0.0  # no foreground


class _Counting(nn.Module):
    """A small 3D network that counts the batch sizes it was called with."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.LeakyReLU(), nn.Conv3d(8, 3, 3, padding=1))
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        return self.body(x)


@pytest.mark.parametrize("pair", [True, False])
def test_a_single_window_may_run_as_a_pair_with_the_same_output(pair: bool) -> None:
    from medseg import inference

    net = _Counting().eval()
    x = torch.randn(1, 1, 12, 16, 8)
    with torch.no_grad():
        expected = net.body(x)
        inference._PAIR_SINGLES[net] = pair
        out = inference._forward(net, x)
    assert net.batches == [2 if pair else 1]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_the_choice_is_measured_once_per_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from medseg import inference

    net, x = _Counting().eval(), torch.randn(1, 1, 12, 16, 8)
    with torch.no_grad():
        first = inference._forward(net, x)  # one timed single, an untimed pair, a timed single and pair
        assert net.batches == [1, 2, 1, 2]
        assert isinstance(inference._PAIR_SINGLES[net], bool)
        torch.testing.assert_close(first, net.body(x), atol=1e-5, rtol=1e-5)
        net.batches.clear()
        inference._forward(net, x)
        inference._forward(net, torch.randn(3, 1, 12, 16, 8))  # a batch of several runs as it is
        assert net.batches == [2 if inference._PAIR_SINGLES[net] else 1, 3]
        slow = _Counting().eval()
        monkeypatch.setattr(inference, "CALIBRATE_MAX_SECONDS", 0.0)
        inference._forward(slow, x)  # slower than the limit: not measured, never paired
        assert slow.batches == [1] and inference._PAIR_SINGLES[slow] is False
