"""Unit tests of medseg.transforms: the preprocessing chain, its inversion (as predict uses it) and augmentation.

The chain is applied to small NIfTI files written in tmp_path. Known answers:

- Resampling follows MONAI's ``Spacing`` (``scale_extent=False``): an axis of n voxels at spacing s
  becomes ``round((n - 1) * s / t + 1)`` voxels at spacing t, where ``round`` is numpy's (halves go to
  the even number). So 1 mm -> 2 mm maps 20 -> round(10.5) = 10, 30 -> round(15.5) = 16,
  40 -> round(20.5) = 20, and 21 -> 11, 31 -> 16, 41 -> 21.
- An LPS image (affine diag(-1, -1, 1)) reoriented to RAS is the input flipped on axes 0 and 1; its
  RAS origin is the world position of voxel (X - 1, Y - 1, 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_nifti
from medseg.config import AugmentConfig
from medseg.plans import Fingerprint, Plan
from medseg.transforms import preprocessing, training_augmentation

LABELS = {0: "background", 1: "left", 2: "right"}


def make_plan(target_spacing: tuple[float, float, float], normalization: str = "zscore") -> Plan:
    fingerprint = Fingerprint(
        n_cases=4,
        spacing_median_mm=[1.0, 1.0, 1.0],
        spacing_p10_mm=[1.0, 1.0, 1.0],
        shape_median=[20.0, 30.0, 40.0],
        shape_min=[18, 28, 36],
        shape_max=[22, 32, 44],
        foreground_intensity=[{"p00_5": 1.0, "p50": 1.5, "p99_5": 2.0, "mean": 1.5, "std": 0.3}],
        class_frequency={0: 0.9, 1: 0.05, 2: 0.05},
    )
    return Plan(
        modality="MR", channels=1, labels=LABELS, target_spacing_mm=target_spacing, patch_size=(16, 16, 16),
        batch_size=2, normalization=normalization, dims=3, median_shape_resampled=[20, 30, 40],
        fingerprint=fingerprint,
    )


def zscore(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean()) / x.std()


def lps_affine(spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


def two_boxes(shape: tuple[int, int, int], margin: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero image inside a zero margin; labels 1 and 2 are two boxes side by side along axis 0."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, dtype=np.float32)
    inner = tuple(slice(margin, s - margin) for s in shape)
    image[inner] = rng.uniform(1.0, 2.0, size=tuple(s - 2 * margin for s in shape))
    label = np.zeros(shape, dtype=np.uint8)
    x0, x1 = margin + 3, shape[0] - margin - 3
    xm = (x0 + x1) // 2
    y0, y1 = margin + 2, shape[1] - margin - 2
    z0, z1 = margin + 2, shape[2] - margin - 2
    label[x0:xm, y0:y1, z0:z1] = 1
    label[xm:x1, y0:y1, z0:z1] = 2
    image[label == 1] += 2.0
    image[label == 2] += 4.0
    return image, label


# ---------------------------------------------------------------- preprocessing: geometry


def test_returns_channel_first_metatensors(tmp_path: Path) -> None:
    from monai.data import MetaTensor

    rng = np.random.default_rng(0)
    image = rng.uniform(1.0, 2.0, size=(20, 30, 40)).astype(np.float32)
    label = np.zeros((20, 30, 40), dtype=np.uint8)
    write_nifti(tmp_path / "image.nii.gz", image)
    write_nifti(tmp_path / "label.nii.gz", label)
    chain = preprocessing(make_plan((1.0, 1.0, 1.0)), crop_foreground=False, with_label=True)
    out = chain({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    assert isinstance(out["image"], MetaTensor) and isinstance(out["label"], MetaTensor)
    assert tuple(out["image"].shape) == (1, 20, 30, 40)
    assert tuple(out["label"].shape) == (1, 20, 30, 40)
    assert out["image"].dtype == torch.float32


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((20, 30, 40), (10, 16, 20)),  # round(15.5) = 16 (see the module doc)
        ((21, 31, 41), (11, 16, 21)),  # exact: (n - 1) / 2 + 1
    ],
)
def test_resampling_1mm_to_2mm(tmp_path: Path, shape: tuple[int, int, int], expected: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    image = rng.uniform(1.0, 2.0, size=shape).astype(np.float32)  # all non-zero: cropping keeps everything
    label = np.zeros(shape, dtype=np.uint8)
    label[2:12, 4:20, 6:30] = 1
    label[12:18, 4:20, 6:30] = 2
    write_nifti(tmp_path / "image.nii.gz", image)
    write_nifti(tmp_path / "label.nii.gz", label)
    chain = preprocessing(make_plan((2.0, 2.0, 2.0)), crop_foreground=True, with_label=True)
    out = chain({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    assert tuple(out["image"].shape) == (1, *expected)
    assert tuple(out["label"].shape) == (1, *expected)
    np.testing.assert_allclose(np.diag(out["image"].affine.numpy()), [2.0, 2.0, 2.0, 1.0])
    lab = out["label"].numpy()
    np.testing.assert_array_equal(lab, np.round(lab))  # nearest: no interpolated values
    assert set(np.unique(lab).tolist()) == {0.0, 1.0, 2.0}


def test_lps_image_comes_out_in_ras(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    image = rng.uniform(1.0, 2.0, size=(6, 7, 8)).astype(np.float32)
    write_nifti(tmp_path / "lps.nii.gz", image, lps_affine((1.0, 1.0, 1.0), (10.0, 20.0, -5.0)))
    chain = preprocessing(make_plan((1.0, 1.0, 1.0)), crop_foreground=False, with_label=False)
    out = chain({"image": str(tmp_path / "lps.nii.gz")})["image"]
    assert tuple(out.shape) == (1, 6, 7, 8)
    np.testing.assert_allclose(out[0].numpy(), zscore(image[::-1, ::-1, :]), atol=1e-5)
    affine = out.affine.numpy()
    assert (np.diag(affine)[:3] > 0).all()
    # Voxel (0, 0, 0) of the RAS output is voxel (5, 6, 0) of the input: world (10 - 5, 20 - 6, -5).
    np.testing.assert_allclose(affine, [[1, 0, 0, 5], [0, 1, 0, 14], [0, 0, 1, -5], [0, 0, 0, 1]], atol=1e-6)


def test_lps_label_follows_the_image(tmp_path: Path) -> None:
    image, label = two_boxes((14, 12, 10), margin=0)
    affine = lps_affine((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    write_nifti(tmp_path / "image.nii.gz", image, affine)
    write_nifti(tmp_path / "label.nii.gz", label, affine)
    chain = preprocessing(make_plan((1.0, 1.0, 1.0)), crop_foreground=False, with_label=True)
    out = chain({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    np.testing.assert_array_equal(out["label"][0].numpy(), label[::-1, ::-1, :])


def test_crop_foreground_crops_to_the_box(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    image = np.zeros((20, 30, 40), dtype=np.float32)
    box = rng.uniform(1.0, 2.0, size=(10, 7, 18)).astype(np.float32)
    image[3:13, 5:12, 2:20] = box
    label = np.zeros_like(image, dtype=np.uint8)
    label[5:9, 6:10, 4:8] = 1
    write_nifti(tmp_path / "image.nii.gz", image)
    write_nifti(tmp_path / "label.nii.gz", label)
    chain = preprocessing(make_plan((1.0, 1.0, 1.0)), crop_foreground=True, with_label=True)
    out = chain({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    assert tuple(out["image"].shape) == (1, 10, 7, 18)
    assert tuple(out["label"].shape) == (1, 10, 7, 18)
    np.testing.assert_allclose(out["image"][0].numpy(), zscore(box), atol=1e-5)
    np.testing.assert_array_equal(out["label"][0].numpy(), label[3:13, 5:12, 2:20])
    # The crop moves the origin to the box's first voxel.
    np.testing.assert_allclose(out["image"].affine.numpy()[:3, 3], [3.0, 5.0, 2.0], atol=1e-6)


def test_no_crop_keeps_the_zero_margin(tmp_path: Path) -> None:
    image = np.zeros((20, 30, 40), dtype=np.float32)
    image[3:13, 5:12, 2:20] = 1.5
    write_nifti(tmp_path / "image.nii.gz", image)
    chain = preprocessing(make_plan((1.0, 1.0, 1.0)), crop_foreground=False, with_label=False)
    assert tuple(chain({"image": str(tmp_path / "image.nii.gz")})["image"].shape) == (1, 20, 30, 40)


# ---------------------------------------------------------------- preprocessing: normalization


def test_zscore_per_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    image = np.stack(
        [rng.normal(100.0, 20.0, size=(12, 10, 8)), rng.normal(-3.0, 0.5, size=(12, 10, 8))], axis=-1
    ).astype(np.float32)
    write_nifti(tmp_path / "two_channels.nii.gz", image)
    chain = preprocessing(make_plan((1.0, 1.0, 1.0)), crop_foreground=False, with_label=False)
    out = chain({"image": str(tmp_path / "two_channels.nii.gz")})["image"].numpy().astype(np.float64)
    assert out.shape == (2, 12, 10, 8)
    for c in range(2):
        assert abs(out[c].mean()) < 1e-5
        assert out[c].std() == pytest.approx(1.0, abs=1e-3)
        np.testing.assert_allclose(out[c], zscore(image[..., c]), atol=1e-4)


def _ct_plan(clips: list[tuple[float, float]], means: list[float], stds: list[float]) -> Plan:
    return make_plan((1.0, 1.0, 1.0)).model_copy(
        update={"channels": len(clips), "normalization": "ct", "ct_clip": clips, "ct_mean": means, "ct_std": stds}
    )


def _ct_image(tmp_path: Path, channels: int) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(8)
    image = np.stack(
        [rng.uniform(-1000.0, 1000.0, size=(6, 7, 8)), rng.uniform(0.0, 100.0, size=(6, 7, 8))], axis=-1
    ).astype(np.float32)[..., :channels]
    path = write_nifti(tmp_path / "ct.nii.gz", image[..., 0] if channels == 1 else image)
    return path, image


def test_ct_normalization_one_channel(tmp_path: Path) -> None:
    path, image = _ct_image(tmp_path, 1)
    chain = preprocessing(_ct_plan([(-500.0, 500.0)], [10.0], [100.0]), crop_foreground=False, with_label=False)
    out = chain({"image": str(path)})["image"]
    np.testing.assert_allclose(out[0].numpy(), (np.clip(image[..., 0], -500.0, 500.0) - 10.0) / 100.0, atol=1e-5)


def test_ct_normalization_per_channel(tmp_path: Path) -> None:
    path, image = _ct_image(tmp_path, 2)
    plan = _ct_plan([(-500.0, 500.0), (10.0, 50.0)], [10.0, 30.0], [100.0, 5.0])
    chain = preprocessing(plan, crop_foreground=False, with_label=False)
    out = chain({"image": str(path)})["image"]
    expected = np.stack(
        [(np.clip(image[..., 0], -500.0, 500.0) - 10.0) / 100.0, (np.clip(image[..., 1], 10.0, 50.0) - 30.0) / 5.0]
    )
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


# ---------------------------------------------------------------- inversion (as predict does it)


def _round_trip(tmp_path: Path, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                target: tuple[float, float, float], crop: bool) -> tuple[np.ndarray, tuple[int, ...]]:
    """Preprocess image and label, one-hot the label as a 'prediction', invert it onto the original grid."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    write_nifti(tmp_path / "image.nii.gz", image, affine)
    write_nifti(tmp_path / "label.nii.gz", label, affine)
    chain = preprocessing(make_plan(target), crop_foreground=crop, with_label=True)
    data = chain({"image": str(tmp_path / "image.nii.gz"), "label": str(tmp_path / "label.nii.gz")})
    preprocessed_shape = tuple(data["image"].shape[1:])
    onehot = torch.nn.functional.one_hot(data["label"][0].as_tensor().long(), 3).permute(3, 0, 1, 2).float()
    data["pred"] = MetaTensor(onehot, meta=dict(data["image"].meta))
    inverter = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)
    restored = inverter(data)["pred"]
    return torch.as_tensor(restored).argmax(0).numpy(), preprocessed_shape


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_inversion_restores_the_original_grid(tmp_path: Path) -> None:
    shape = (48, 44, 25)
    image, label = two_boxes(shape, margin=3)
    spacing = (0.8, 0.9, 1.5)
    mask, preprocessed_shape = _round_trip(
        tmp_path, image, label, lps_affine(spacing, (10.0, 20.0, -5.0)), (1.0, 1.0, 1.0), crop=True
    )
    # Cropped to the 42 x 38 x 19 non-zero box, then resampled to 1 mm: round((n - 1) * s + 1)
    # = round(33.8), round(34.3), round(28.0).
    assert preprocessed_shape == (34, 34, 28)
    assert mask.shape == shape
    foreground = label > 0
    assert (mask[foreground] == label[foreground]).mean() > 0.95
    for c in (1, 2):
        assert dice(mask == c, label == c) > 0.9
        # No systematic shift: the centroids agree within one original voxel per axis (a box may lose
        # one boundary slice to the two interpolations: measured -0.5 voxel for label 2 on axis 0).
        np.testing.assert_allclose(np.argwhere(mask == c).mean(0), np.argwhere(label == c).mean(0), atol=1.0)
    assert (mask[image == 0] == 0).all()  # the cropped margin is background again


@pytest.mark.parametrize(("margin", "expected_shape"), [(0, (30, 28, 16)), (3, (24, 22, 10))])
def test_inversion_is_exact_without_resampling(tmp_path: Path, margin: int, expected_shape: tuple[int, ...]) -> None:
    """Same spacing: the round trip is exact, with nothing to crop (margin 0) or with a crop alone."""
    shape = (30, 28, 16)
    image, label = two_boxes(shape, margin=margin, seed=5 + margin)
    spacing = (0.8, 0.9, 1.5)
    mask, preprocessed_shape = _round_trip(
        tmp_path, image, label, lps_affine(spacing, (10.0, 20.0, -5.0)), spacing, crop=True
    )
    assert preprocessed_shape == expected_shape
    np.testing.assert_array_equal(mask, label)


# ---------------------------------------------------------------- training augmentation


def _sample(size: tuple[int, int, int] = (20, 20, 20)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    image = rng.normal(size=(1, *size)).astype(np.float32)
    label = np.zeros((1, *size), dtype=np.float32)
    label[0, 2:8, 2:8, 2:8] = 1
    return {"image": image, "label": label}


def _augment(sample: dict[str, np.ndarray], seed: int, augment: AugmentConfig | None = None,
             patch: tuple[int, int, int] = (16, 16, 16), dims: int = 3) -> list[dict]:
    chain = training_augmentation(patch, augment or AugmentConfig(), dims=dims)
    chain.set_random_state(seed=seed)
    return chain({k: v.copy() for k, v in sample.items()})


def test_augmentation_gives_one_patch() -> None:
    out = _augment(_sample(), seed=1)
    assert isinstance(out, list) and len(out) == 1
    assert tuple(out[0]["image"].shape) == (1, 16, 16, 16)
    assert tuple(out[0]["label"].shape) == (1, 16, 16, 16)
    assert set(np.unique(np.asarray(out[0]["label"])).tolist()) <= {0.0, 1.0}  # nearest for the label


def test_augmentation_is_reproducible_with_a_seed() -> None:
    sample = _sample()
    first, second = _augment(sample, seed=1), _augment(sample, seed=1)
    for key in ("image", "label"):
        np.testing.assert_array_equal(np.asarray(first[0][key]), np.asarray(second[0][key]))


def test_augmentation_varies_with_the_seed() -> None:
    sample = _sample()
    images = [np.asarray(_augment(sample, seed=s)[0]["image"]) for s in range(4)]
    assert any(not np.array_equal(images[0], other) for other in images[1:])


def test_augmentation_pads_small_images_to_the_patch() -> None:
    out = _augment(_sample((10, 12, 20)), seed=1)
    assert tuple(out[0]["image"].shape) == (1, 16, 16, 16)
    assert tuple(out[0]["label"].shape) == (1, 16, 16, 16)


def test_augmentation_without_random_steps_is_a_plain_crop() -> None:
    off = AugmentConfig(flip_prob=0, affine_prob=0, intensity_prob=0, noise_prob=0, gamma_prob=0)
    sample = _sample()
    out = _augment(sample, seed=3, augment=off)[0]
    image, label = np.asarray(out["image"]), np.asarray(out["label"])
    # The patch is a 16^3 block of the input, the same block in image and label.
    windows = np.lib.stride_tricks.sliding_window_view(sample["image"][0], (16, 16, 16))
    hits = np.argwhere((windows == image[0]).all(axis=(3, 4, 5)))
    assert len(hits) == 1
    x, y, z = hits[0]
    np.testing.assert_array_equal(label[0], sample["label"][0, x : x + 16, y : y + 16, z : z + 16])


def test_augmentation_2d_patch() -> None:
    out = _augment(_sample(), seed=1, patch=(16, 16, 1), dims=2)
    assert tuple(out[0]["image"].shape) == (1, 16, 16, 1)
    assert tuple(out[0]["label"].shape) == (1, 16, 16, 1)


OFF = {"flip_prob": 0, "affine_prob": 0, "intensity_prob": 0, "noise_prob": 0, "gamma_prob": 0}


def test_augmentation_gives_plain_tensors_and_restores_meta_tracking() -> None:
    from monai.data import MetaTensor, get_track_meta

    out = _augment(_sample(), seed=1)[0]
    assert type(out["image"]) is torch.Tensor and type(out["label"]) is torch.Tensor
    assert not isinstance(out["image"], MetaTensor)
    assert get_track_meta()  # switched off for the call only


def test_untracked_restores_meta_tracking_after_an_error() -> None:
    from monai.data import get_track_meta
    from monai.transforms import Compose

    from medseg.transforms import Untracked

    def fail(_: object) -> None:
        assert not get_track_meta()
        raise ValueError("a failing step")

    with pytest.raises(RuntimeError, match="applying transform") as raised:  # MONAI wraps the step's error
        Untracked(Compose([fail]))({"image": np.zeros((1, 2, 2, 2))})
    assert isinstance(raised.value.__cause__, ValueError)
    assert get_track_meta()


def _crop_and(seed: int, **settings: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(plain crop image, augmented image, augmented label) of the same seed: the crop draws first."""
    sample = _sample()
    plain = _augment(sample, seed=seed, augment=AugmentConfig(**OFF))[0]
    out = _augment(sample, seed=seed, augment=AugmentConfig(**OFF, **settings))[0]
    np.testing.assert_array_equal(np.asarray(out["label"]), np.asarray(plain["label"]))  # intensity only
    return np.asarray(plain["image"]), np.asarray(out["image"]), np.asarray(out["label"])


def test_blur_smooths_the_image_only() -> None:
    plain, blurred, _ = _crop_and(2, blur_prob=1.0)
    # white noise blurred with sigma 0.5-1: neighbours become correlated, the spread shrinks
    assert blurred.std() < 0.8 * plain.std()
    assert abs(blurred.mean() - plain.mean()) < 0.1
    neighbours = np.corrcoef(blurred[0, :-1].ravel(), blurred[0, 1:].ravel())[0, 1]
    assert neighbours > 0.3 > abs(np.corrcoef(plain[0, :-1].ravel(), plain[0, 1:].ravel())[0, 1])


def test_low_resolution_keeps_shape_and_changes_the_image_only() -> None:
    plain, low, _ = _crop_and(4, lowres_prob=1.0)
    assert low.shape == plain.shape
    assert not np.allclose(low, plain)
    neighbours = np.corrcoef(low[0, :-1].ravel(), low[0, 1:].ravel())[0, 1]
    assert neighbours > 0.3  # zoomed down and back up: neighbouring voxels repeat or interpolate


def test_blur_and_low_resolution_keep_a_2d_patch() -> None:
    out = _augment(_sample(), seed=1, patch=(16, 16, 1), dims=2,
                   augment=AugmentConfig(**OFF, blur_prob=1.0, lowres_prob=1.0))[0]
    assert tuple(out["image"].shape) == (1, 16, 16, 1)
    assert tuple(out["label"].shape) == (1, 16, 16, 1)


def test_augment_batch_applies_the_chain_to_each_sample() -> None:
    from monai.transforms import Compose, RandFlipd

    from medseg.transforms import Untracked, augment_batch

    image = torch.arange(2 * 1 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 1, 2, 3, 4)
    label = (image > 20).to(torch.uint8)
    chain = Untracked(Compose([RandFlipd(keys=["image", "label"], prob=1.0, spatial_axis=2)]))
    out_image, out_label = augment_batch(chain, image, label)
    torch.testing.assert_close(out_image, image.flip(-1))
    torch.testing.assert_close(out_label, label.flip(-1))
    assert type(out_image) is torch.Tensor


def test_split_chains_hold_the_steps_of_the_whole_chain() -> None:
    from medseg.transforms import crop_steps, random_steps

    augment = AugmentConfig(blur_prob=0.2, lowres_prob=0.25)
    whole = training_augmentation((16, 16, 16), augment, dims=3).transforms
    split = [*crop_steps((16, 16, 16), augment), *random_steps((16, 16, 16), augment, dims=3)]
    assert [type(t).__name__ for t in whole] == [type(t).__name__ for t in split]
    assert type(split[1]).__name__ == "RandCropByPosNegLabeld"


@pytest.mark.parametrize(("mirror_axes", "flipped"), [(None, [0, 1, 2]), ((0, 2), [0, 2]), ((), [])])
def test_flips_only_along_the_plans_mirror_axes(mirror_axes: tuple[int, ...] | None, flipped: list[int]) -> None:
    from monai.transforms import RandFlipd

    from medseg.transforms import random_steps

    steps = random_steps((16, 16, 16), AugmentConfig(flip_prob=1.0), dims=3, mirror_axes=mirror_axes)
    assert [s.flipper.spatial_axis for s in steps if isinstance(s, RandFlipd)] == flipped
    chain = training_augmentation((4, 4, 4), AugmentConfig(flip_prob=1.0, affine_prob=0, intensity_prob=0,
                                                           noise_prob=0, gamma_prob=0, pos_neg_ratio=1.0),
                                  dims=3, mirror_axes=mirror_axes)
    image = torch.arange(64, dtype=torch.float32).reshape(1, 4, 4, 4)
    label = torch.zeros(1, 4, 4, 4)
    label[0, 1, 1, 1] = 1
    (out,) = chain({"image": image, "label": label})  # the crop (the whole image here) gives a list of one
    expected = torch.flip(image, [1 + a for a in flipped]) if flipped else image
    torch.testing.assert_close(out["image"], expected)
