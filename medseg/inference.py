"""The network side of predict: windowed class probabilities, and their way back to the scan's grid.

``probabilities`` runs MONAI's sliding-window inference once per scan. Each window goes through
every model of the ensemble and every flip of test-time augmentation (mirrored in, mirrored
back, as nnU-Net mirrors each patch), and the window's averaged softmax is stitched with
Gaussian weights. So the whole-scan buffers are one set of class probabilities and MONAI's
weight map, whatever the number of models and flips. On CUDA the windows run in fp16 autocast
(``amp``), and the stitched output stays on the GPU only when it takes less than a quarter of
its free memory; else it is stitched in host memory.

``restore`` brings the probabilities back to the scan's own grid (MONAI's ``Invertd`` undoes
resampling, crop and reorientation) one class at a time and keeps a running argmax, so host
memory holds one float channel of the scan's grid plus the uint8 mask, not all classes at once.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from medseg.config import PredictConfig
from medseg.qc import SLAB, normalized_entropy

if TYPE_CHECKING:
    from medseg.modelio import ModelSpec

PROBABILITY_SCALE = 255  # probability maps are stored as uint8 with a NIfTI slope of 1/255


def flip_sets(roi: Sequence[int], enabled: bool, mirror_axes: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """The flips of test-time augmentation (tensor dims of a batch): every combination of the
    plan's mirror axes (None: every spatial axis) that the network convolves."""
    if not enabled:
        return [()]
    axes = [2 + i for i, r in enumerate(roi) if r > 1 and (mirror_axes is None or i in mirror_axes)]
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


# Whether a network runs a batch of one window faster as a batch of two (copies) on the CPU, per network.
_PAIR_SINGLES: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
CALIBRATE_MAX_SECONDS = 0.5  # a network slower than this on one window is not measured (nor padded)


def _timed(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = net(x)
    return out, time.perf_counter() - start


def _forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net(x)``; on the CPU, a batch of one window may run as a pair of copies.

    torch picks its oneDNN convolution for a batch of one only when N x C x D x H passes a
    threshold made for 2D images (the last axis is left out), so the small 3D convolutions of a
    batch of one fall back to its slow im2col kernel: for medseg's dynunet of 8 to 64 feature
    maps on the hippocampus window, one window took 124 ms and two windows 52 ms. Whether the
    pair is faster depends on the network and the torch build, so it is measured once per network
    on its first single window (when one window takes under ``CALIBRATE_MAX_SECONDS``), and pairs
    are used only when they take under 0.8 of the time. The output is the same either way."""
    if x.shape[0] != 1 or x.device.type != "cpu":
        return net(x)
    pair = _PAIR_SINGLES.get(net)
    if pair is None:
        out, single = _timed(net, x)
        if single > CALIBRATE_MAX_SECONDS:
            _PAIR_SINGLES[net] = False
            return out
        doubled = torch.cat([x, x])
        net(doubled)  # the first call of a shape builds oneDNN's kernels: not timed
        out, single = _timed(net, x)
        _, double = _timed(net, doubled)
        _PAIR_SINGLES[net] = pair = double < 0.8 * single
        return out
    return net(torch.cat([x, x]))[:1] if pair else net(x)


def window_predictor(
    models: Sequence[tuple[nn.Module, ModelSpec]], config: PredictConfig, device: torch.device
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of a batch of windows: their softmax averaged over models and flips."""
    plans = [(net, flip_sets(spec.roi_size, config.tta_flips, spec.plan.mirror_axes)) for net, spec in models]
    autocast = config.amp and device.type == "cuda"

    def predict(windows: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        count = 0
        for net, flips in plans:
            for axes in flips:
                x = torch.flip(windows, axes) if axes else windows
                with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=autocast):
                    logits = _forward(net, x)
                probs = torch.softmax(logits.float(), dim=1)
                probs = torch.flip(probs, axes) if axes else probs
                total = probs if total is None else total.add_(probs)
                count += 1
        assert total is not None
        return total.div_(count)

    return predict


def _output_device(image: torch.Tensor, n_classes: int, device: torch.device) -> torch.device:
    """Stitch on the GPU when the output takes under a quarter of its free memory, else on the host."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    need = (n_classes + 1) * image[0].numel() * 4
    return device if need < free / 4 else torch.device("cpu")


def probabilities(
    image: torch.Tensor, models: Sequence[tuple[nn.Module, ModelSpec]], config: PredictConfig, device: torch.device
) -> torch.Tensor:
    """Softmax probabilities (classes, *spatial) of one preprocessed image (channels, *spatial),
    averaged over models and flips, on the host."""
    from monai.inferers import sliding_window_inference

    spec = models[0][1]
    out_device = _output_device(image, spec.plan.n_classes, device)
    with torch.no_grad():
        stitched = sliding_window_inference(
            image[None], spec.roi_size, config.sw_batch_size, window_predictor(models, config, device),
            overlap=config.overlap, mode="gaussian" if config.gaussian else "constant",
            sw_device=device, device=out_device,
        )
    return torch.as_tensor(stitched)[0].cpu()


@dataclass
class Restored:
    """One scan's outputs on its own grid."""

    mask: np.ndarray  # uint8 labels
    uncertainty: np.ndarray | None = None  # float32, 0..1
    probabilities: np.ndarray | None = None  # uint8 (spatial..., classes), probability x 255


def _inverted(channel: torch.Tensor, data: dict[str, Any], inverter: Any) -> torch.Tensor:
    """One class's channel on the preprocessed grid back on the scan's grid (``inverter``: MONAI's
    ``Invertd`` of key ``pred`` on the chain that made ``data``)."""
    from monai.data import MetaTensor

    restored = inverter({**data, "pred": MetaTensor(channel[None], meta=dict(data["image"].meta))})["pred"]
    return torch.as_tensor(restored)[0]


def _quantized(channel: torch.Tensor) -> np.ndarray:
    """Probabilities as uint8 (x ``PROBABILITY_SCALE``)."""
    return (channel.clamp(0, 1) * PROBABILITY_SCALE).round().to(torch.uint8).numpy()


def restore(
    probs: torch.Tensor, data: dict[str, Any], inverter: Any, *, uncertainty: bool, keep_probabilities: bool
) -> Restored:
    """``probs`` (classes, *preprocessed grid) back on the scan's grid, class by class.

    ``data`` is the preprocessing output of the scan (its ``image`` carries the applied
    operations), ``inverter`` a MONAI ``Invertd`` of key ``pred`` built on that chain."""
    def invert(channel: torch.Tensor) -> torch.Tensor:
        return _inverted(channel, data, inverter)

    best = invert(probs[0])
    mask = torch.zeros(best.shape, dtype=torch.uint8)
    kept = [_quantized(best)] if keep_probabilities else []
    for c in range(1, probs.shape[0]):
        channel = invert(probs[c])
        if keep_probabilities:
            kept.append(_quantized(channel))
        mask.masked_fill_(channel > best, c)  # strict: ties keep the lower class, as argmax does
        torch.maximum(best, channel, out=best)
    del best
    out = Restored(mask.numpy())
    if uncertainty:
        out.uncertainty = invert(normalized_entropy(probs)).clamp(0, 1).numpy()
    if keep_probabilities:
        out.probabilities = np.stack(kept, axis=-1)
    return out


def restore_ensemble(
    parts: Sequence[tuple[torch.Tensor, dict[str, Any], Any]], *, uncertainty: bool, keep_probabilities: bool
) -> tuple[Restored, float]:
    """An ensemble of configurations with other plans: each part (``probs``, ``data``, ``inverter`` as
    ``restore`` takes them) back on the scan's grid and averaged with equal weight, class by class, as
    nnU-Net ensembles configurations. The entropy of the mean is added up class by class too, so this
    also gives the uncertainty map and the case's score (mean normalized entropy over the predicted
    foreground, on the scan's grid) without holding every class at once."""
    import math

    def mean_of(c: int) -> torch.Tensor:
        total = _inverted(parts[0][0][c], parts[0][1], parts[0][2]).float()
        for probs, data, inverter in parts[1:]:
            total.add_(_inverted(probs[c], data, inverter))
        return total.div_(len(parts))

    def entropy_of(channel: torch.Tensor) -> torch.Tensor:
        p = channel.clamp(1e-12, 1.0)
        return -(p * p.log())

    n = parts[0][0].shape[0]
    best = mean_of(0)
    mask = torch.zeros(best.shape, dtype=torch.uint8)
    entropy = entropy_of(best)
    kept = [_quantized(best)] if keep_probabilities else []
    for c in range(1, n):
        channel = mean_of(c)
        entropy.add_(entropy_of(channel))
        if keep_probabilities:
            kept.append(_quantized(channel))
        mask.masked_fill_(channel > best, c)
        torch.maximum(best, channel, out=best)
    del best
    entropy = entropy.div_(math.log(n)).clamp_(0, 1) if n > 1 else torch.zeros_like(entropy)
    foreground = mask > 0
    score = float(entropy[foreground].double().mean()) if bool(foreground.any()) else 0.0
    out = Restored(mask.numpy())
    if uncertainty:
        out.uncertainty = entropy.numpy()
    if keep_probabilities:
        out.probabilities = np.stack(kept, axis=-1)
    return out, score


def without_voxels(image: Any) -> Any:
    """A preprocessed MetaTensor's meta data and applied operations (all ``Invertd`` reads of it),
    without its voxels, which need not wait in memory for the inversion."""
    from monai.data import MetaTensor

    light = MetaTensor(torch.zeros(1), meta=dict(image.meta))
    light.applied_operations = list(image.applied_operations)
    return light


def uncertainty_score(probs: torch.Tensor) -> float:
    """The case's uncertainty (``medseg.qc``): mean normalized entropy over the voxels whose argmax
    is foreground, on the model's grid; 0 without foreground. A slab of the last axis at a time."""
    total, count = 0.0, 0
    for start in range(0, probs.shape[-1], SLAB):
        slab = probs[..., start : start + SLAB]
        foreground = slab[1:].amax(0) > slab[0]  # argmax > 0 (a tie goes to the background, as in argmax)
        if bool(foreground.any()):
            total += float(normalized_entropy(slab)[foreground].double().sum())
            count += int(foreground.sum())
    return total / count if count else 0.0
