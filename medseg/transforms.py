"""MONAI transform chains shared by preprocess, train and predict.

Preprocess and predict build the same chain from the plan, so a scan seen at prediction
time goes through exactly what the training cases went through; predict then inverts the
spatial steps (orientation, crop, resampling) with MONAI's ``Invertd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay inside functions
    from monai.transforms import Compose

    from medseg.config import AugmentConfig
    from medseg.plans import Plan


def nonzero(x: Any) -> Any:
    """Foreground for cropping: any channel non-zero (module level so workers can pickle it)."""
    return x != 0


class ClipChannels:
    """Clip each channel of a (C, ...) tensor to its own (low, high) range."""

    def __init__(self, ranges: Sequence[tuple[float, float]]) -> None:
        self.ranges = [(float(lo), float(hi)) for lo, hi in ranges]

    def __call__(self, x: Any) -> Any:
        import torch

        shape = (-1,) + (1,) * (x.ndim - 1)
        low = torch.as_tensor([r[0] for r in self.ranges], dtype=x.dtype, device=x.device).reshape(shape)
        high = torch.as_tensor([r[1] for r in self.ranges], dtype=x.dtype, device=x.device).reshape(shape)
        return torch.clamp(x, low, high)


class Untracked:
    """A transform chain run with MONAI's meta-data tracking off: its steps take and give plain
    tensors. Training augmentation needs no affine or transform history, and the MetaTensor
    bookkeeping of every step doubles its cost (measured by ``bench/loader.py``: 40 against 78
    samples per second and core with nnU-Net's augmentation). The setting is global to MONAI, so
    it is switched off for the call only (in whatever process runs it) and restored after."""

    def __init__(self, chain: Compose) -> None:
        self.chain = chain

    @property
    def transforms(self) -> tuple[Any, ...]:
        return tuple(self.chain.transforms)

    def set_random_state(self, seed: int | None = None, state: Any = None) -> Untracked:
        self.chain.set_random_state(seed=seed, state=state)
        return self

    def __call__(self, data: Any) -> Any:
        from monai.data import get_track_meta, set_track_meta

        previous = get_track_meta()
        set_track_meta(False)
        try:
            return self.chain(data)
        finally:
            set_track_meta(previous)


def normalize_transform(plan: Plan, key: str = "image") -> Any:
    from monai.transforms import Compose, Lambdad, NormalizeIntensityd

    if plan.normalization == "zscore":
        return NormalizeIntensityd(keys=key, channel_wise=True)
    assert plan.ct_clip is not None and plan.ct_mean is not None and plan.ct_std is not None
    return Compose([
        Lambdad(keys=key, func=ClipChannels(plan.ct_clip)),
        NormalizeIntensityd(keys=key, subtrahend=plan.ct_mean, divisor=plan.ct_std, channel_wise=True),
    ])


def preprocessing(plan: Plan, *, crop_foreground: bool, with_label: bool) -> Compose:
    """Load, reorient to RAS, crop to the non-zero region, resample, normalize. Without a label
    (predict), the image is resampled by ``AxisSpacingd``: MONAI's grid and values in a fraction
    of the memory."""
    from monai.transforms import (
        CastToTyped,
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        Spacingd,
    )

    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    steps: list[Any] = [
        LoadImaged(keys=keys, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(keys=keys),
        CastToTyped(keys="image", dtype="float32"),
        Orientationd(keys=keys, axcodes="RAS"),
    ]
    if crop_foreground:
        steps.append(CropForegroundd(keys=keys, source_key="image", select_fn=nonzero, allow_smaller=True))
    if with_label:
        steps.append(Spacingd(keys=keys, pixdim=plan.target_spacing_mm, mode=modes))
    else:  # predict: the same grid and values, without MONAI's whole-grid coordinates (medseg.resample)
        from medseg.resample import AxisSpacingd

        steps.append(AxisSpacingd(keys="image", pixdim=plan.target_spacing_mm))
    steps.append(normalize_transform(plan))
    return Compose(steps)


def crop_steps(patch_size: Sequence[int], augment: AugmentConfig) -> list[Any]:
    """Pad to the patch, then one crop centred on foreground or background (``pos_neg_ratio``)."""
    from monai.transforms import RandCropByPosNegLabeld, SpatialPadd

    keys = ["image", "label"]
    return [
        SpatialPadd(keys=keys, spatial_size=list(patch_size)),
        RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=list(patch_size), pos=augment.pos_neg_ratio, neg=1.0,
            num_samples=1, allow_smaller=False,
        ),
    ]


def random_steps(patch_size: Sequence[int], augment: AugmentConfig, *, dims: int,
                 mirror_axes: Sequence[int] | None = None) -> list[Any]:
    """The spatial and intensity augmentation of a cropped patch (any device: MONAI's transforms keep
    a tensor where it is). Flips only along ``mirror_axes`` (the plan's; None = every spatial axis)."""
    import math

    from monai.transforms import (
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSimulateLowResolutiond,
    )

    keys = ["image", "label"]
    rot = math.radians(augment.rotate_deg)
    spatial_axes = [i for i, p in enumerate(patch_size) if p > 1]
    rotate_range = [rot if i in spatial_axes else 0.0 for i in range(3)]
    if dims == 2:  # rotate only in the slice plane
        rotate_range = [0.0, 0.0, 0.0]
        slice_axis = [i for i, p in enumerate(patch_size) if p == 1][0]
        rotate_range[slice_axis] = rot
    scale = [augment.scale if i in spatial_axes else 0.0 for i in range(3)]
    steps: list[Any] = []
    if augment.affine_prob > 0:
        steps.append(
            RandAffined(
                keys=keys, prob=augment.affine_prob, rotate_range=rotate_range, scale_range=scale,
                mode=["bilinear", "nearest"], padding_mode="zeros",
            )
        )
    if augment.flip_prob > 0:
        flipped = [a for a in spatial_axes if mirror_axes is None or a in mirror_axes]
        steps += [RandFlipd(keys=keys, prob=augment.flip_prob, spatial_axis=a) for a in flipped]
    if augment.intensity_prob > 0:
        steps.append(RandScaleIntensityd(keys="image", factors=0.1, prob=augment.intensity_prob))
        steps.append(RandShiftIntensityd(keys="image", offsets=0.1, prob=augment.intensity_prob))
    if augment.noise_prob > 0:
        steps.append(RandGaussianNoised(keys="image", prob=augment.noise_prob, std=0.1))
    if augment.blur_prob > 0:
        # no blur across the slices of a 2D patch
        sigmas = {f"sigma_{a}": (0.5, 1.0) if patch_size[i] > 1 else (0.0, 0.0) for i, a in enumerate("xyz")}
        steps.append(RandGaussianSmoothd(keys="image", prob=augment.blur_prob, **sigmas))
    if augment.lowres_prob > 0:
        steps.append(RandSimulateLowResolutiond(keys="image", prob=augment.lowres_prob, zoom_range=(0.5, 1.0)))
    if augment.gamma_prob > 0:
        steps.append(RandAdjustContrastd(keys="image", prob=augment.gamma_prob, gamma=(0.7, 1.5)))
    return steps


def training_augmentation(patch_size: Sequence[int], augment: AugmentConfig, *, dims: int,
                          mirror_axes: Sequence[int] | None = None) -> Untracked:
    """Crops balanced between foreground and background, then spatial and intensity augmentation,
    on plain tensors (``Untracked``)."""
    from monai.transforms import Compose

    steps = random_steps(patch_size, augment, dims=dims, mirror_axes=mirror_axes)
    return Untracked(Compose([*crop_steps(patch_size, augment), *steps]))


def augment_batch(chain: Untracked, image: Any, label: Any) -> tuple[Any, Any]:
    """``chain`` applied to each sample of a batch where it lies (the training device), restacked."""
    import torch

    out = [chain({"image": i, "label": lab}) for i, lab in zip(image, label, strict=True)]
    return torch.stack([o["image"] for o in out]), torch.stack([o["label"] for o in out])
