"""Benchmark: augmented training samples per second, medseg's loader against nnU-Net's, in one run.

    .venv/bin/python bench/loader.py [--data ../shared/data/hippocampus] [--seconds 20] [--repeats 3]

Both tools preprocess the same MSD folder their own way (medseg: ingest, plan, preprocess;
nnU-Net v2: ``nnUNetv2_plan_and_preprocess -c 3d_fullres``), kept in ``--work`` for later runs.
Both then draw augmented batches of the training cases of fold 0 (medseg's split, given to
nnU-Net as ``splits_final.json``) with the patch and batch size both planners choose here,
(40, 56, 40) and 7:

- medseg: ``medseg.transforms.training_augmentation`` on the cases kept in memory, through a MONAI
  ``DataLoader`` (what ``medseg train`` runs), with its default augmentation and with nnU-Net's
  probabilities (rotation 30 degrees, scaling 0.7-1.3 in 36% of samples, blur 0.2, low
  resolution 0.25, gamma 0.3, noise 0.1, brightness and contrast 0.15, mirroring);
- nnU-Net: ``nnUNetDataLoader`` with ``nnUNetTrainer.get_training_transforms`` (what
  ``nnUNetv2_train`` runs, deep-supervision targets included).

Two settings: one process (the loader in the main process, one torch thread: samples per second
per core), and one worker process per core (medseg: DataLoader workers; nnU-Net: its
``NonDetMultiThreadedAugmenter``), reported per core as well. Runs alternate between the tools;
the median of the repeats is reported. Prints a table and writes ``bench/results/loader.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
log = logging.getLogger("bench.loader")

# nnU-Net's augmentation probabilities in medseg's settings (nnUNetTrainer.get_training_transforms).
NNUNET_LIKE = {
    "flip_prob": 0.5, "affine_prob": 0.36, "rotate_deg": 30.0, "scale": 0.3, "intensity_prob": 0.15,
    "noise_prob": 0.1, "gamma_prob": 0.3, "blur_prob": 0.2, "lowres_prob": 0.25,
}


def medseg_loader(pre: Path, plan_path: Path, splits: Path, augment: dict[str, Any], workers: int,
                  seed: int) -> tuple[Iterator[Any], int, tuple[int, ...], Callable[[], None]]:
    from monai.data import DataLoader, Dataset

    from medseg import caching
    from medseg.config import AugmentConfig
    from medseg.stages.plan import load_plan, load_splits
    from medseg.transforms import training_augmentation

    plan = load_plan(plan_path)
    cases = caching.training_items(pre, load_splits(splits, 0)["train"], "memory")
    transform = training_augmentation(plan.patch_size, AugmentConfig(**augment), dims=plan.dims)
    transform.set_random_state(seed=seed)
    loader = DataLoader(Dataset(cases, transform=transform), batch_size=plan.batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)

    def forever() -> Iterator[Any]:
        while True:
            yield from loader

    return forever(), plan.batch_size, tuple(plan.patch_size), lambda: None


def nnunet_loader(pre: Path, workers: int, seed: int) -> tuple[Iterator[Any], int, tuple[int, ...], Callable[[], None]]:
    import nnunet
    import numpy as np
    from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
        NonDetMultiThreadedAugmenter,
    )
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    np.random.seed(seed)
    t: Any = nnunet.trainer(pre, fold=0)
    patch = t.configuration_manager.patch_size
    rotation, dummy_2d, initial_patch, mirror_axes = t.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    transforms = t.get_training_transforms(
        patch, rotation, t._get_deep_supervision_scales(), mirror_axes, dummy_2d,
        use_mask_for_norm=t.configuration_manager.use_mask_for_norm, is_cascaded=False,
        foreground_labels=t.label_manager.foreground_labels, regions=None, ignore_label=None)
    dataset, _ = t.get_tr_and_val_datasets()
    dl = nnUNetDataLoader(dataset, t.batch_size, initial_patch, patch, t.label_manager,
                          oversample_foreground_percent=t.oversample_foreground_percent,
                          sampling_probabilities=None, pad_sides=None, transforms=transforms,
                          probabilistic_oversampling=t.probabilistic_oversampling)
    if workers == 0:
        return dl, t.batch_size, tuple(patch), lambda: None
    gen = NonDetMultiThreadedAugmenter(dl, None, num_processes=workers, num_cached=max(6, workers // 2),
                                       seeds=None, pin_memory=False, wait_time=0.002)
    return gen, t.batch_size, tuple(patch), gen._finish


def measure(make: Callable[[], tuple[Iterator[Any], int, tuple[int, ...], Callable[[], None]]],
            seconds: float, warmup: int = 3) -> dict[str, Any]:
    """Samples per second over at least ``seconds`` after ``warmup`` batches (workers started, caches warm)."""
    batches, batch_size, patch, finish = make()
    try:
        for _ in range(warmup):
            next(batches)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = next(batches)
            n += 1
        elapsed = time.perf_counter() - start
    finally:
        finish()
    image = batch["image"] if "image" in batch else batch["data"]
    if tuple(image.shape[2:]) != patch or image.shape[0] != batch_size:
        raise SystemExit(f"expected batches of {batch_size} patches {patch}, found {tuple(image.shape)}")
    return {"samples_per_second": n * batch_size / elapsed, "batches": n, "seconds": elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data")) / "hippocampus")
    ap.add_argument("--work", type=Path, default=REPO / "data" / "bench", help="preprocessed data of both tools, kept")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured time of each run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "loader.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("medseg", "nnunet"):
        logging.getLogger(name).setLevel(logging.WARNING)

    import nnunet
    from common import medseg_data

    nnunet.set_environment(args.work / "nnunet")  # before nnunetv2 is imported
    import torch

    cores = os.cpu_count() or 1
    log.info("preparing data in %s", args.work)
    pre, plan_path, splits = medseg_data(args.data, args.work)
    nn_pre = nnunet.plan_and_preprocess(args.data, args.work / "nnunet", cores)
    nnunet.use_split(nn_pre, splits)

    runs: dict[str, Callable[[int, int], Any]] = {
        "medseg (default augmentation)": lambda w, s: medseg_loader(pre, plan_path, splits, {}, w, s),
        "medseg (nnU-Net's augmentation)": lambda w, s: medseg_loader(pre, plan_path, splits, NNUNET_LIKE, w, s),
        "nnU-Net": lambda w, s: nnunet_loader(nn_pre, w, s),
    }
    settings = {"1 process": 0, f"{cores} worker processes": cores}
    results: dict[str, dict[str, list[float]]] = {s: {r: [] for r in runs} for s in settings}
    torch.set_num_threads(1)  # one core per process, for both tools
    for repeat in range(args.repeats):
        for setting, workers in settings.items():
            for name, make in runs.items():
                m = measure(lambda: make(workers, repeat), args.seconds)
                results[setting][name].append(m["samples_per_second"])
                log.info("%s, %s, repeat %d: %.1f samples/s", name, setting, repeat + 1, m["samples_per_second"])

    table = []
    for setting, workers in settings.items():
        peer = statistics.median(results[setting]["nnU-Net"])
        for name in runs:
            rate = statistics.median(results[setting][name])
            per_core = rate / max(workers, 1)
            table.append({"setting": setting, "loader": name, "samples_per_second": rate,
                          "per_core": per_core, "ratio_to_nnunet": rate / peer, "runs": results[setting][name]})
    print(f"\n{'setting':<22} {'loader':<34} {'samples/s':>10} {'per core':>9} {'vs nnU-Net':>11}")
    for row in table:
        print(f"{row['setting']:<22} {row['loader']:<34} {row['samples_per_second']:>10.1f} {row['per_core']:>9.1f} "
              f"{row['ratio_to_nnunet']:>10.2f}x")
    from importlib.metadata import version

    import monai
    import nnunetv2  # noqa: F401

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M"), "cores": cores, "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "monai": monai.__version__, "nnunetv2": version("nnunetv2"),
        "seconds": args.seconds, "repeats": args.repeats, "results": table,
    }, indent=1))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
