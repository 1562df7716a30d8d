"""nnU-Net v2 (PyPI ``nnunetv2``) as the peer of the training benchmarks: its raw dataset made from an
MSD folder, its own planning and preprocessing, and medseg's fold split given to it.

Used by ``bench/loader.py`` and ``bench/accuracy.py``; nothing here runs at import time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)

DATASET_NAME = "Dataset004_Hippocampus"


def environment(work: Path) -> dict[str, str]:
    """nnU-Net's three folders under ``work``, as the environment variables it reads."""
    return {
        "nnUNet_raw": str(work / "raw"),
        "nnUNet_preprocessed": str(work / "preprocessed"),
        "nnUNet_results": str(work / "results"),
    }


def set_environment(work: Path) -> None:
    """Set nnU-Net's variables in this process (before nnunetv2 is imported: it reads them then)."""
    os.environ.update(environment(work))


def raw_dataset(msd: Path, work: Path, dataset: str = DATASET_NAME) -> Path:
    """nnU-Net's raw layout of an MSD single-channel task: ``imagesTr/<case>_0000.nii.gz`` (links to the
    MSD files, which stay untouched), ``labelsTr/<case>.nii.gz`` and a v2 ``dataset.json``.

    nnU-Net's own ``nnUNetv2_convert_MSD_dataset`` needs an ``imagesTs`` folder, which the shared
    copy lacks, and copies every file."""
    meta = json.loads((msd / "dataset.json").read_text())
    if len(meta.get("modality", {"0": ""})) != 1:
        raise SystemExit(f"{msd}/dataset.json: expected one channel, found modality {meta.get('modality')}")
    out = work / "raw" / dataset
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    for item in meta["training"]:
        case = Path(item["image"]).name.removesuffix(".nii.gz")
        for src, dst in ((msd / item["image"], out / "imagesTr" / f"{case}_0000.nii.gz"),
                         (msd / item["label"], out / "labelsTr" / f"{case}.nii.gz")):
            if not dst.exists():
                dst.symlink_to(src.resolve())
    labels = {("background" if int(k) == 0 else name): int(k) for k, name in meta["labels"].items()}
    (out / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": meta["modality"]["0"]}, "labels": labels,
        "numTraining": len(meta["training"]), "file_ending": ".nii.gz", "name": meta.get("name", "Hippocampus"),
    }, indent=1))
    return out


def plan_and_preprocess(msd: Path, work: Path, processes: int, dataset: str = DATASET_NAME,
                        preprocess: bool = True) -> Path:
    """Run ``nnUNetv2_plan_and_preprocess`` for 3d_fullres (once; kept in ``work``); return the
    preprocessed dataset folder. ``dataset``: nnU-Net's name, ``Dataset<id>_<name>``;
    ``preprocess=False``: plan only (``--no_pp``)."""
    raw_dataset(msd, work, dataset)
    pre = work / "preprocessed" / dataset
    done = pre / ("nnUNetPlans_3d_fullres" if preprocess else "nnUNetPlans.json")
    if not done.exists():
        dataset_id = int(dataset.removeprefix("Dataset").split("_")[0])
        cmd = [str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id),
               "-c", "3d_fullres", "-np", str(processes), "--verify_dataset_integrity"]
        cmd += [] if preprocess else ["--no_pp"]
        log.info("nnU-Net: %s", " ".join(cmd))
        subprocess.run(cmd, env={**os.environ, **environment(work)}, check=True, stdout=subprocess.DEVNULL)
    return pre


def use_split(pre: Path, splits_json: Path) -> None:
    """Give nnU-Net medseg's folds: both write a list of {"train": [...], "val": [...]}."""
    shutil.copyfile(splits_json, pre / "splits_final.json")


def trainer(pre: Path, fold: int, trainer_class: type | None = None, **kwargs: object) -> object:
    """An initialized nnU-Net trainer (3d_fullres, CPU) for the preprocessed dataset ``pre``."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net's get_trainer_from_args passes it this way
    dataset_json = json.loads((pre / "dataset.json").read_text())
    cls = trainer_class or nnUNetTrainer
    t = cls(plans=plans, configuration="3d_fullres", fold=fold, dataset_json=dataset_json,
            device=torch.device("cpu"), **kwargs)
    t.initialize()
    return t
