"""plan: measure the dataset (a fingerprint) and choose the settings that later stages use.

Rules (each can be overridden by setting the value in the ``plan`` config section); ``plan.json``
records every choice and why, under ``decisions``:

- **Frame**: spacings and shapes are measured after reorientation to RAS, as preprocess does.
- **Target spacing**: the median spacing per axis. If the largest median spacing is more than
  ``anisotropy_threshold`` times the smallest, the coarse axis takes the 10th percentile of its
  spacings instead (as nnU-Net does), so thin-slice cases are not thrown away.
- **Dims**: 2D (slices across the coarse axis) if the data are anisotropic by that threshold,
  else 3D. A 2D plan asked for on isotropic data slices across the last (superior) axis.
- **Patch size, topology and batch size**: nnU-Net's rules (``medseg.planning``) against a
  memory budget (``memory_budget_gb``: the memory of CUDA device 0 where there is one, else
  8 GB). The patch starts at the median shape after resampling (or 256^3 voxels shaped by the
  spacing, if smaller), is rounded up to what the U-Net's pooling divides, and is shrunk until
  a batch of 2 fits the budget; the memory is counted on the planned network
  (``medseg.memory``). The batch is what the budget holds, at most 5% of the dataset's voxels,
  at least 2. In 2D the same rules run on the two in-plane axes and the coarse axis gets 1.
- **Device** (``device``: the device training runs on; ``auto`` = CUDA where the machine that
  plans has it). On a CPU the batch is the least, 2, whatever the budget holds: a CPU's samples
  per second barely grow with the batch (unlike a GPU's), so the least batch gives the most
  optimizer steps in the same time, and the best Dice in a short one (``docs/benchmarks.md``,
  "The batch on a CPU"). The decision says what the batch would be on a GPU.
- **Mirror axes** (the flips of training augmentation and of test-time augmentation): every axis,
  as nnU-Net, by default. With ``mirror_axes: auto``, every axis but those along which two
  foreground classes keep a fixed order. For each pair of classes, the fingerprint measures, per
  RAS axis, the offset between their centroids in every case that holds both. An axis is not
  mirrored when some pair lies on the same side of each other in at least
  ``MIRROR_CONSISTENCY`` of those cases and at least one target voxel apart on average
  (hippocampus: the posterior part behind, above and beside the anterior part). Mirroring along
  it would show the network layouts the data never show. With fewer than two foreground classes
  every axis is mirrored. With the default, the decision says what ``auto`` would leave out.
- **Normalization**: CT clips each channel to the 0.5 and 99.5 percentiles of the foreground
  intensities of all cases, then subtracts their mean and divides by their standard deviation;
  any other modality is z-scored per case and channel.
- **Folds**: cases sorted by id, shuffled with ``seed``, dealt into ``n_folds`` folds.

Outputs: ``plan.json`` (a ``Plan``, ``medseg.plans``) and ``splits.json`` (one ``{"train", "val"}`` per fold).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medseg.config import PlanConfig
from medseg.errors import DataError
from medseg.io import load_nifti, write_json
from medseg.manifest import CaseRecord, load_manifest
from medseg.plans import ClassOrder, Fingerprint, NetworkTopology, Plan, load_plan, load_splits

__all__ = [
    "ClassOrder", "Fingerprint", "NetworkTopology", "Plan", "PlanResult", "decide", "load_plan", "load_splits",
    "make_splits", "memory_budget", "plan", "ras_spacing_and_shape",
]

log = logging.getLogger(__name__)

FOREGROUND_SAMPLES_PER_CASE = 10_000


MIRROR_CONSISTENCY = 0.9


@dataclass(frozen=True)
class PlanResult:
    plan_path: Path
    splits_path: Path
    plan: Plan


def ras_spacing_and_shape(record: CaseRecord) -> tuple[np.ndarray, np.ndarray]:
    """Spacing and shape of a case in the RAS-reoriented voxel order."""
    ornt = nib.io_orientation(np.asarray(record.affine))
    spacing = np.zeros(3)
    shape = np.zeros(3, dtype=int)
    for voxel_axis, (world_axis, _) in enumerate(ornt):
        spacing[int(world_axis)] = record.spacing_mm[voxel_axis]
        shape[int(world_axis)] = record.shape[voxel_axis]
    return spacing, shape


def make_splits(case_ids: list[str], n_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """Deterministic k-fold split by case."""
    if len(case_ids) < n_folds:
        raise DataError(f"expected at least n_folds={n_folds} cases for the split, found {len(case_ids)}")
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = [sorted(ids[i] for i in order[k::n_folds]) for k in range(n_folds)]
    return [
        {"train": sorted(c for j, f in enumerate(folds) if j != k for c in f), "val": folds[k]}
        for k in range(n_folds)
    ]


def _fingerprint(records: list[CaseRecord], root: Path, n_classes: int, seed: int) -> tuple[Fingerprint, np.ndarray, np.ndarray, list[np.ndarray]]:
    spacings, shapes = zip(*(ras_spacing_and_shape(r) for r in records))
    spacings_arr, shapes_arr = np.array(spacings), np.array(shapes)
    rng = np.random.default_rng(seed)
    channels = records[0].channels
    samples: list[list[np.ndarray]] = [[] for _ in range(channels)]
    class_voxels = np.zeros(n_classes, dtype=np.int64)
    order = _OrderCounts(n_classes)
    volumes: list[np.ndarray] = []  # per labelled case, the mL of each class
    for record in records:
        for value, count in (record.label_voxels or {}).items():
            if value < n_classes:
                class_voxels[value] += count
        if record.label_voxels is not None:
            case_volume = np.zeros(n_classes)
            for value, count in record.label_voxels.items():
                if value < n_classes:
                    case_volume[value] = count * float(np.prod(record.spacing_mm[:3])) / 1000.0
            volumes.append(case_volume)
        if record.label is None:
            continue
        label = np.asanyarray(load_nifti(root / record.label).dataobj)
        fg = label > 0
        if not fg.any():
            continue
        order.add(label, fg, np.asarray(record.affine, dtype=float))
        image = np.asanyarray(load_nifti(root / record.image).dataobj)
        image = image[..., None] if image.ndim == 3 else image
        for c in range(channels):
            values = image[..., c][fg]
            take = min(len(values), FOREGROUND_SAMPLES_PER_CASE)
            samples[c].append(rng.choice(values, take, replace=False))
    foreground = []
    pooled = []
    for c in range(channels):
        values = np.concatenate(samples[c]) if samples[c] else np.zeros(1)
        pooled.append(values)
        lo, med, hi = np.percentile(values, [0.5, 50, 99.5])
        foreground.append(
            {"p00_5": float(lo), "p50": float(med), "p99_5": float(hi), "mean": float(values.mean()), "std": float(values.std())}
        )
    total = max(int(class_voxels.sum()), 1)
    fingerprint = Fingerprint(
        n_cases=len(records),
        spacing_median_mm=np.median(spacings_arr, axis=0).tolist(),
        spacing_p10_mm=np.percentile(spacings_arr, 10, axis=0).tolist(),
        shape_median=np.median(shapes_arr, axis=0).tolist(),
        shape_min=shapes_arr.min(axis=0).tolist(),
        shape_max=shapes_arr.max(axis=0).tolist(),
        foreground_intensity=foreground,
        class_frequency={k: float(class_voxels[k]) / total for k in range(n_classes)},
        class_order=order.most_constant(),
        class_volume_ml={
            k: (float(min(v[k] for v in volumes)), float(max(v[k] for v in volumes)))
            for k in range(1, n_classes)
        } if volumes else {},
    )
    return fingerprint, spacings_arr, shapes_arr, pooled


class _OrderCounts:
    """Per pair of foreground classes and RAS axis: the cases holding both, the sum of their
    centroid offsets, and how many offsets were positive and negative."""

    def __init__(self, n_classes: int) -> None:
        k = max(n_classes - 1, 0)
        self.cases = np.zeros((k, k), dtype=np.int64)
        self.offsets = np.zeros((k, k, 3))
        self.positive = np.zeros((k, k, 3), dtype=np.int64)
        self.negative = np.zeros((k, k, 3), dtype=np.int64)

    def add(self, label: np.ndarray, fg: np.ndarray, affine: np.ndarray) -> None:
        from scipy import ndimage

        k = self.cases.shape[0]
        present = [c for c in np.unique(label[fg]).astype(int).tolist() if 1 <= c <= k]
        if len(present) < 2:
            return
        voxel = np.array(ndimage.center_of_mass(fg, label, present), dtype=float).reshape(len(present), -1)[:, :3]
        world = voxel @ affine[:3, :3].T + affine[:3, 3]  # NIfTI world coordinates: RAS, in mm
        idx = np.array(present) - 1
        offset = world[None, :, :] - world[:, None, :]  # [i, j]: class j's centroid minus class i's
        rows, cols = np.meshgrid(idx, idx, indexing="ij")
        self.cases[rows, cols] += 1
        self.offsets[rows, cols] += offset
        self.positive[rows, cols] += offset > 0
        self.negative[rows, cols] += offset < 0

    def most_constant(self) -> list[ClassOrder]:
        """Per axis, one pair (first class lower): of the pairs whose order holds in at least
        ``MIRROR_CONSISTENCY`` of their cases the one farthest apart, else the most constant."""
        out = []
        pairs = [(i, j) for i, j in zip(*np.triu_indices(self.cases.shape[0], k=1)) if self.cases[i, j]]
        for axis in range(3):
            scored = []
            for i, j in pairs:
                n = int(self.cases[i, j])
                mean = float(self.offsets[i, j, axis] / n)
                same = float((self.positive if mean > 0 else self.negative)[i, j, axis] / n)
                rank = (1, abs(mean)) if same >= MIRROR_CONSISTENCY else (0, same)
                scored.append((rank, i, j, n, mean, same))
            if scored:
                _, i, j, n, mean, same = max(scored, key=lambda s: s[0])
                out.append(ClassOrder(axis=axis, classes=(int(i) + 1, int(j) + 1), cases=n,
                                      mean_offset_mm=round(mean, 3), same_side=round(same, 4)))
        return out


GB = 2**30
CPU_BUDGET_GB = 8.0  # nnU-Net's reference GPU


def training_device(config: PlanConfig) -> tuple[str, str]:
    """The device training runs on (``cpu`` or ``cuda``), and why."""
    if config.device != "auto":
        return config.device, "set in the config (plan.device)"
    import torch

    if torch.cuda.is_available():
        return "cuda", f"auto: CUDA device 0 ({torch.cuda.get_device_name(0)}) is here"
    return "cpu", "auto: no CUDA device here"


def memory_budget(config: PlanConfig, device: str) -> tuple[float, str]:
    """The memory budget in GB, and where it comes from."""
    if config.memory_budget_gb is not None:
        return config.memory_budget_gb, "set in the config (plan.memory_budget_gb)"
    import torch

    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory / GB, f"the memory of CUDA device 0 ({props.name})"
    where = "training on a CPU" if device == "cpu" else "no CUDA device here"
    return CPU_BUDGET_GB, f"{where}: {CPU_BUDGET_GB:g} GB, nnU-Net's reference GPU"


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


AXIS_NAMES = ("R-L", "A-P", "S-I")


def _mirror_axes(fingerprint: Fingerprint, target: np.ndarray, axes: Sequence[int], labels: dict[int, str],
                 config: PlanConfig) -> tuple[tuple[int, ...], str]:
    """The axes to mirror (of those the network convolves) and why; see the module doc."""
    fixed = {
        o.axis: o for o in fingerprint.class_order
        if o.axis in axes and o.same_side >= MIRROR_CONSISTENCY and abs(o.mean_offset_mm) >= target[o.axis]
    }
    reasons = []
    for axis, o in sorted(fixed.items()):
        first, second = (labels.get(c, str(c)) for c in o.classes)
        reasons.append(
            f"not {AXIS_NAMES[axis]} (axis {axis}): {second} lies on the same side of {first} in "
            f"{100 * o.same_side:.0f}% of the {o.cases} cases holding both, {abs(o.mean_offset_mm):.1f} mm apart on "
            f"average, so mirroring would show layouts the data never show"
        )
    if config.mirror_axes == "all":
        why = "every axis, as nnU-Net (plan.mirror_axes: all)"
        if reasons:
            why += "; plan.mirror_axes: auto would mirror " + _axis_list(a for a in axes if a not in fixed) + ": "
            why += "; ".join(reasons)
        return tuple(axes), why
    if config.mirror_axes != "auto":
        return tuple(a for a in sorted(config.mirror_axes) if a in axes), "set in the config"
    why = "mirrored along " + _axis_list(a for a in axes if a not in fixed)
    if reasons:
        why += "; " + "; ".join(reasons)
    elif len([c for c in labels if c != 0]) < 2:
        why += ": fewer than two foreground classes, so no order of classes to keep"
    else:
        why += f": no two classes keep their order along an axis in {100 * MIRROR_CONSISTENCY:.0f}% of the cases"
    return tuple(a for a in axes if a not in fixed), why


def _axis_list(axes: Iterable[int]) -> str:
    return ", ".join(f"{AXIS_NAMES[a]} (axis {a})" for a in axes) or "no axis"


def decide(fingerprint: Fingerprint, spacings: np.ndarray, shapes: np.ndarray, pooled: list[np.ndarray],
           modality: str, labels: dict[int, str], config: PlanConfig) -> Plan:
    """Apply the planning rules of the module doc to a fingerprint."""
    from medseg.memory import training_bytes
    from medseg.planning import MIN_BATCH, batch_size, fit_patch, topology

    decisions: dict[str, str] = {}
    median_spacing = np.median(spacings, axis=0)
    ratio = float(median_spacing.max() / median_spacing.min())
    anisotropic = ratio > config.anisotropy_threshold
    coarse_axis = int(np.argmax(median_spacing)) if anisotropic else None
    target = median_spacing.copy()
    decisions["target_spacing_mm"] = f"the median spacing {_fmt(median_spacing)}"
    if coarse_axis is not None:
        target[coarse_axis] = np.percentile(spacings[:, coarse_axis], 10)
        decisions["target_spacing_mm"] += (
            f", axis {coarse_axis} at the 10th percentile of its spacings ({target[coarse_axis]:g}): the data are "
            f"anisotropic ({ratio:.2f} > anisotropy_threshold {config.anisotropy_threshold:g})"
        )
    if config.target_spacing_mm is not None:
        target = np.asarray(config.target_spacing_mm, dtype=float)
        decisions["target_spacing_mm"] = "set in the config"
    dims = config.dims or (2 if anisotropic else 3)
    decisions["dims"] = "set in the config" if config.dims else (
        f"2D: the median spacing is anisotropic ({ratio:.2f} > {config.anisotropy_threshold:g})" if anisotropic
        else f"3D: the median spacing is within anisotropy_threshold {config.anisotropy_threshold:g} ({ratio:.2f})"
    )
    if dims == 2 and coarse_axis is None:  # the coarsest axis; the last of equals (axial slices in RAS)
        coarse_axis = 2 - int(np.argmax(target[::-1]))
    resampled = np.median(shapes * spacings / target, axis=0)
    axes = [a for a in range(3) if dims == 3 or a != coarse_axis]  # the axes the network convolves
    n_classes = max(labels) + 1
    channels = len(pooled)
    device, device_why = training_device(config)
    decisions["device"] = f"{device}: {device_why}"
    budget_gb, budget_why = memory_budget(config, device)
    budget = int(budget_gb * GB)
    decisions["memory_budget_gb"] = budget_why

    def estimate(topo: Any, patch: tuple[int, ...]) -> tuple[int, int]:
        if len(topo.strides) < 3:  # MONAI's U-Nets need two downsampling steps at least
            edge = 4 * config.min_feature_edge
            raise DataError(
                f"expected images large enough for a U-Net of 2 downsampling steps (at least {edge} voxels on two "
                f"axes at the target spacing), found a patch of {' x '.join(map(str, patch))} voxels, which allows "
                f"{len(topo.strides) - 1}; lower plan.min_feature_edge or plan.target_spacing_mm"
            )
        return training_bytes(topo, patch, channels, n_classes)

    def full(patch_axes: Sequence[int]) -> tuple[int, int, int]:
        out = [1, 1, 1]
        for a, p in zip(axes, patch_axes):
            out[a] = int(p)
        return (out[0], out[1], out[2])

    topo_kwargs = {"min_edge": config.min_feature_edge, "base_features": config.base_features,
                   "max_features": config.max_features}
    if config.patch_size is not None:
        if len(config.patch_size) != 3:
            raise DataError(f"plan.patch_size: expected 3 values (1 on the slice axis for 2D), found {config.patch_size}")
        patch = tuple(int(p) for p in config.patch_size)
        topo, padded = topology(target[axes], [patch[a] for a in axes], **topo_kwargs)
        sample, fixed = estimate(topo, padded)  # counted at the patch the network will see
        decisions["patch_size"] = "set in the config"
    else:
        choice = fit_patch(target[axes], resampled[axes], budget, estimate, **topo_kwargs)
        topo, sample, fixed = choice.topology, choice.sample_bytes, choice.fixed_bytes
        patch = full(choice.patch)
        fits = "fits" if 2 * sample + fixed <= budget else "still exceeds"
        decisions["patch_size"] = (
            f"the median shape at the target spacing {_fmt(resampled[axes])} (or 256^{len(axes)} voxels shaped by the "
            f"spacing, if smaller), rounded up to what {len(topo.strides) - 1} stages of pooling divide "
            f"{_fmt(topo.divisor)}"
            + (f", shrunk {choice.reductions} times" if choice.reductions else "")
            + f"; a batch of 2 needs {(2 * sample + fixed) / GB:.2f} GB and {fits} the {budget_gb:.1f} GB budget"
        )
    if config.batch_size is not None:
        batch = config.batch_size
        decisions["batch_size"] = "set in the config"
    else:
        dataset_voxels = float(np.prod(resampled)) * len(shapes)
        batch, why = batch_size(sample, fixed, budget, [patch[a] for a in axes], dataset_voxels,
                                config.max_batch_fraction)
        decisions["batch_size"] = f"set by {why}"
        if device == "cpu" and batch > MIN_BATCH:
            decisions["batch_size"] = (
                f"the least ({MIN_BATCH}) for training on a CPU: a CPU's samples per second barely grow with the "
                f"batch, so the least batch gives the most optimizer steps in the same time and the best Dice in "
                f"a short one (docs/benchmarks.md, 'The batch on a CPU'); on a GPU it would be {batch}, set by {why}"
            )
            batch = MIN_BATCH
    decisions["topology"] = (
        f"pools per axis {_fmt(topo.pools)}: an axis is pooled while its feature map keeps at least "
        f"{2 * config.min_feature_edge} voxels and its spacing is within 2x of the finest; kernels of 3 on axes "
        f"within 2x of the finest spacing, else 1; {config.base_features} feature maps doubling up to "
        f"{config.max_features}"
    )
    mirror_axes, decisions["mirror_axes"] = _mirror_axes(fingerprint, target, axes, labels, config)
    normalization = config.normalization or ("ct" if modality.upper() == "CT" else "zscore")
    decisions["normalization"] = "set in the config" if config.normalization else (
        "CT: clip to the foreground's 0.5 and 99.5 percentiles, then its mean and deviation" if normalization == "ct"
        else f"{modality}: z-score per case and channel"
    )
    ct = {}
    if normalization == "ct":
        clips = [(float(np.percentile(v, 0.5)), float(np.percentile(v, 99.5))) for v in pooled]
        clipped = [np.clip(v, lo, hi) for v, (lo, hi) in zip(pooled, clips)]
        ct = {
            "ct_clip": clips,
            "ct_mean": [float(v.mean()) for v in clipped],
            "ct_std": [float(max(v.std(), 1e-8)) for v in clipped],
        }
    return Plan(
        modality=modality,
        channels=channels,
        labels=labels,
        target_spacing_mm=(float(target[0]), float(target[1]), float(target[2])),
        patch_size=(patch[0], patch[1], patch[2]),
        batch_size=batch,
        normalization=normalization,
        dims=dims,
        median_shape_resampled=[int(round(s)) for s in resampled],
        mirror_axes=mirror_axes,
        topology=NetworkTopology(strides=topo.strides, kernels=topo.kernels, features=topo.features),
        memory_budget_gb=round(budget_gb, 3),
        estimated_memory_gb=round((batch * sample + fixed) / GB, 3),
        decisions=decisions,
        fingerprint=fingerprint,
        **ct,
    )


def plan(manifest_path: Path, out_dir: Path, config: PlanConfig | None = None) -> PlanResult:
    """Write ``out_dir/plan.json`` and ``out_dir/splits.json`` for the cases of a manifest."""
    config = config or PlanConfig()
    manifest, root = load_manifest(manifest_path)
    if not manifest.labels:
        raise DataError(f"{manifest_path}: planning needs labelled cases, the manifest declares no labels")
    labelled = [r for r in manifest.cases if r.label is not None]
    if not labelled:
        raise DataError(f"{manifest_path}: expected labelled cases, found none")
    n_classes = max(manifest.labels) + 1
    fingerprint, spacings, shapes, pooled = _fingerprint(labelled, root, n_classes, config.seed)
    try:
        chosen = decide(fingerprint, spacings, shapes, pooled, manifest.modality, manifest.labels, config)
    except DataError as err:
        raise DataError(f"{manifest_path}: {err}") from None
    splits = make_splits([r.case_id for r in labelled], config.n_folds, config.seed)
    out_dir = Path(out_dir)
    plan_path, splits_path = out_dir / "plan.json", out_dir / "splits.json"
    write_json(plan_path, chosen.model_dump(mode="json"))
    write_json(splits_path, splits)
    log.info(
        "plan: %dD, spacing %s mm, patch %s, batch %d, normalization %s, %d stages (about %.2f of %.1f GB)",
        chosen.dims, chosen.target_spacing_mm, chosen.patch_size, chosen.batch_size, chosen.normalization,
        len(chosen.topology.strides) if chosen.topology else 0, chosen.estimated_memory_gb or 0,
        chosen.memory_budget_gb or 0,
    )
    return PlanResult(plan_path, splits_path, chosen)
