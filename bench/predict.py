"""Prediction against nnU-Net v2's predictor: wall time, peak host memory and Dice, in one run.

    .venv/bin/python bench/predict.py [--slices 300] [--small 20] [--work DIR]
                                      [--out bench/results/predict.json]

Both tools get a model of the same kind (nnU-Net's U-Net) with the same feature maps per stage,
trained here on the same synthetic cases:
two adjacent boxes (labels 1 and 2) brighter than a noisy background, on a 1 mm grid,
40 x 40 x 32 voxels.
- medseg: `dynunet` (nnU-Net's U-Net) on medseg's planned topology, with 4 to 16 feature maps.
  It is trained for 60 short epochs.
- nnU-Net: its own planning and preprocessing. Its `PlainConvUNet` is cut to 3 stages of 4, 8
  and 16 feature maps, and trained by `nnUNetTrainer` for 4 epochs of 50 iterations.
The parameter counts of both networks are printed (medseg's plan gives it more stages).
nnU-Net took about 10 minutes for one 300-slice scan on a 2-core CPU, so 800 slices is left to
``--slices 300 800`` on a larger machine.

The scans:
- `--small` cases of the training size;
- for each `--slices` value, one 512 x 512 x N int16 scan of 0.8 x 0.8 x 1 mm voxels, stored LPS,
  with larger boxes of the same intensities.

Every scan has a known label. Each tool predicts each set in a fresh process, with 50% window
overlap, Gaussian weighting, no mirroring, one worker for reading and one for writing. A sampler
in this process adds up the resident memory of that process and all its children every 20 ms
and keeps the peak. The bench prints wall time per case, peak memory, mean Dice against the
known labels, and the ratios nnU-Net / medseg, and writes all of it as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
log = logging.getLogger("bench.predict")

NNUNET_DATASET = "Dataset905_Boxes"
FEATURES = (4, 8, 16)

MEDSEG = """
import sys
from medseg.config import PredictConfig
from medseg.stages.predict import predict
predict(sys.argv[1], sys.argv[2], [sys.argv[3]], PredictConfig(overlap=0.5, tta_flips=False), overwrite=True)
"""

NNUNET = """
import sys, torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                            perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
predictor.initialize_from_trained_model_folder(sys.argv[3], use_folds=(0,), checkpoint_name="checkpoint_final.pth")
predictor.predict_from_files(sys.argv[1], sys.argv[2], save_probabilities=False, overwrite=True,
                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
"""


def boxes(rng: np.random.Generator, shape: tuple[int, int, int], size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Two adjacent boxes (labels 1, 2) of ``size`` voxels each near the centre, on N(10, 1) noise (+6, +12)."""
    label = np.zeros(shape, dtype=np.uint8)
    centre = [s // 2 + int(rng.integers(-3, 4)) for s in shape]
    lo = [c - s // 2 for c, s in zip(centre, size)]
    x0 = centre[0] - size[0]
    label[x0 : x0 + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = 1
    label[x0 + size[0] : x0 + 2 * size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = 2
    image = rng.normal(10.0, 1.0, size=shape).astype(np.float32)
    image[label == 1] += 6
    image[label == 2] += 12
    return image, label


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def training_cases(msd: Path) -> Path:
    """An MSD folder of 6 training cases (CT: both tools normalize with the foreground statistics)."""
    rng = np.random.default_rng(0)
    training = []
    for i in range(6):
        image, label = boxes(rng, (40, 40, 32), (12, 20, 20))
        _save(msd / "imagesTr" / f"c{i}.nii.gz", image, np.eye(4))
        _save(msd / "labelsTr" / f"c{i}.nii.gz", label, np.eye(4))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    info = {"name": "Boxes", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "left", "2": "right"},
            "training": training, "test": []}
    (msd / "dataset.json").write_text(json.dumps(info))
    return msd


def train_medseg(msd: Path, work: Path) -> tuple[Path, int]:
    """medseg's data (``work/medseg``) and a dynunet of FEATURES trained on it: its checkpoint and size."""
    import torch
    from common import medseg_data

    from medseg.config import NetworkConfig, PlanConfig, TrainConfig
    from medseg.modelio import load_checkpoint_model
    from medseg.stages.train import train

    pre, plan_path, splits = medseg_data(msd, work, PlanConfig(
        n_folds=3, target_spacing_mm=(1.0, 1.0, 1.0), batch_size=2, base_features=FEATURES[0],
        max_features=FEATURES[-1]))
    config = TrainConfig(network=NetworkConfig(name="dynunet"), epochs=60, val_every=20, num_workers=0, seed=3,
                         learning_rate=3e-2)
    model = work / "medseg" / "model"
    train(pre, plan_path, splits, model, config)
    net, _ = load_checkpoint_model(model / "best.pt", torch.device("cpu"))
    return model / "best.pt", sum(p.numel() for p in net.parameters())


def train_nnunet(msd: Path, work: Path) -> tuple[Path, int]:
    """nnU-Net's planning and preprocessing, its network cut to FEATURES, trained briefly on the CPU."""
    import nnunet

    nnunet.set_environment(work)
    pre = nnunet.plan_and_preprocess(msd, work, 1, NNUNET_DATASET)
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    n = len(FEATURES)
    arch.update(n_stages=n, features_per_stage=list(FEATURES), kernel_sizes=[[3, 3, 3]] * n,
                strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1), n_conv_per_stage=[2] * n,
                n_conv_per_stage_decoder=[2] * (n - 1))
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans, indent=1))
    trainer = nnunet.trainer(pre, 0)
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 4, 50, 5
    trainer.run_training()
    return Path(trainer.output_folder).parent, sum(p.numel() for p in trainer.network.parameters())


def scan_set(folder: Path, slices: int | None, small: int) -> Path:
    """``images/<case>_0000.nii.gz`` (the name both tools read) and ``labels/<case>.nii.gz``."""
    if (folder / "images").is_dir():
        return folder
    if slices is None:
        rng = np.random.default_rng(1)
        for i in range(small):
            image, label = boxes(rng, (40, 40, 32), (12, 20, 20))
            _save(folder / "images" / f"s{i:02d}_0000.nii.gz", image, np.eye(4))
            _save(folder / "labels" / f"s{i:02d}.nii.gz", label, np.eye(4))
        return folder
    image, label = boxes(np.random.default_rng(slices), (512, 512, slices), (19, 31, 25))
    affine = np.diag([-0.8, -0.8, 1.0, 1.0])
    _save(folder / "images" / "ct_0000.nii.gz", np.round(image).astype(np.int16), affine)
    _save(folder / "labels" / "ct.nii.gz", label, affine)
    return folder


def _tree_rss(process: object) -> int:
    import psutil

    total = 0
    for proc in [process, *process.children(recursive=True)]:  # type: ignore[attr-defined]
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def run(tool: str, images: Path, out: Path, model: Path, env: dict[str, str]) -> dict:
    """One tool on one folder of scans, in a fresh process: seconds and peak memory of its process tree."""
    import psutil

    code = MEDSEG if tool == "medseg" else NNUNET
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(images), str(out), str(model)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    process, peak = psutil.Process(child.pid), 0

    def sample() -> None:
        nonlocal peak
        while child.poll() is None:
            try:
                peak = max(peak, _tree_rss(process))
            except psutil.Error:
                break
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = child.communicate()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{tool} failed on {images}:\n{err.decode()[-3000:]}")
    return {"seconds": time.perf_counter() - start, "peak_gib": peak / 1024**3}


def mean_dice(out: Path, labels: Path) -> float:
    import nibabel as nib

    scores = []
    for ref_path in sorted(labels.glob("*.nii.gz")):
        ref = np.asarray(nib.load(str(ref_path)).dataobj)
        mask = np.asarray(nib.load(str(out / ref_path.name)).dataobj)
        for c in (1, 2):
            p, r = mask == c, ref == c
            scores.append(2 * float((p & r).sum()) / max(float(p.sum() + r.sum()), 1.0))
    return float(np.mean(scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="*", default=[300])
    parser.add_argument("--small", type=int, default=20, help="scans of the training size (0: none)")
    parser.add_argument("--work", type=Path, help="working folder, kept (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        msd = training_cases(work / "msd")
        models = {"medseg": train_medseg(msd, work), "nnunet": train_nnunet(msd, work / "nnunet")}
        env = {**os.environ, **__import__("nnunet").environment(work / "nnunet")}
        sets = ([("small", None)] if args.small else []) + [(f"512x512x{n}", n) for n in args.slices]
        rows = []
        for name, slices in sets:
            folder = scan_set(work / "scans" / name, slices, args.small)
            n_cases = len(list((folder / "labels").glob("*.nii.gz")))
            row: dict = {"scans": name, "cases": n_cases}
            for tool, (model, _) in models.items():
                out = work / "out" / tool / name
                figures = run(tool, folder / "images", out, model, env)
                row[tool] = {"seconds_per_case": figures["seconds"] / n_cases, "peak_gib": figures["peak_gib"],
                             "mean_dice": mean_dice(out, folder / "labels")}
            row["time_ratio"] = row["nnunet"]["seconds_per_case"] / row["medseg"]["seconds_per_case"]
            row["memory_ratio"] = row["nnunet"]["peak_gib"] / row["medseg"]["peak_gib"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nparameters: medseg {models['medseg'][1]}, nnU-Net {models['nnunet'][1]}")
    print(f"{'scans':<14} {'cases':>5} {'tool':<7} {'s/case':>8} {'peak GiB':>9} {'Dice':>7}")
    for row in rows:
        for tool in ("medseg", "nnunet"):
            r = row[tool]
            print(f"{row['scans']:<14} {row['cases']:>5} {tool:<7} {r['seconds_per_case']:>8.2f} {r['peak_gib']:>9.2f} "
                  f"{r['mean_dice']:>7.4f}")
        print(f"{'':<14} {'':>5} {'ratio':<7} {row['time_ratio']:>7.2f}x {row['memory_ratio']:>8.2f}x  (nnU-Net / medseg)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"parameters": {k: v[1] for k, v in models.items()}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
