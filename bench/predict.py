"""Prediction against nnU-Net v2's predictor: wall time, peak host memory and Dice, in one run.

    .venv/bin/python bench/predict.py [--data ../shared/data/hippocampus] [--cases 42] [--slices 300]
                                      [--model best.pt | --train-minutes 6] [--work DIR]
                                      [--tools medseg nnunet] [--tta off|on|both]
                                      [--out bench/results/predict.json]

**One network, two predictors.** medseg trains a `dynunet` (nnU-Net's U-Net in MONAI: 4 stages
of 8 to 64 feature maps, patch 40 x 56 x 40) on fold 0 of MSD Task04 Hippocampus, or takes the
checkpoint given with ``--model``. The same weights, traced to TorchScript, are handed to nnU-Net's
``nnUNetPredictor`` through ``manual_initialization``, so both tools run one network of one size
and any difference in Dice comes from the predictors themselves (reading, resampling,
normalization, stitching, export). nnU-Net's process never imports medseg or MONAI.

nnU-Net plans the dataset itself (``nnUNetv2_plan_and_preprocess --no_pp``). Its 3d_fullres
configuration is then given medseg's patch and spacing, and it reads with
``NibabelIOWithReorient`` and ``transpose_forward`` (2, 1, 0), so that its network sees the RAS
arrays medseg's network was trained on. Everything else is nnU-Net's own: z-score per case,
third-order resampling of images, linear resampling of probabilities, export.

The scans (the same files for both tools):
- ``hippocampus``: the first ``--cases`` validation cases of fold 0 (not seen in training), 1 mm.
- ``512x512xN`` for each ``--slices`` value: a CT-sized scan built from the validation cases.
  Each case is z-scored and cropped or padded to 36 x 50 x 36, the tiles fill a 1 mm grid of
  410 x 410 x N, which is then resampled (linear; labels nearest) to 512 x 512 x N voxels of
  0.8 x 0.8 x 1 mm, stored LPS as int16 (z x 100). Both tools resample it to 1 mm, predict,
  and resample back.

Each tool predicts each set in a fresh process, with 50% window overlap, Gaussian weighting, no
mirroring (``--tta on``: all 8 flips in both; ``both``: each set both ways), one worker for
reading and one for writing. A sampler in this process adds up the resident memory of that
process and all its children every 20 ms and keeps the peak. On a GPU both tools run there
(nnU-Net with everything on the device, as it does by default on a GPU), and each process also
reports the peak of PyTorch's CUDA allocator. The bench prints wall time per case, peak memory,
peak GPU memory, mean Dice over cases and classes against the reference labels, and the ratios
nnU-Net / medseg, and writes all of it as JSON. ``--tools medseg`` runs medseg alone, where
nnU-Net is not installed.

Data: MSD Task04 Hippocampus (Simpson et al. 2019, arXiv:1902.09063; Vanderbilt University
Medical Center; CC-BY-SA 4.0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
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

FEATURES = (8, 64)  # first stage, most: 8, 16, 32, 64 on the hippocampus topology
TILE = (36, 50, 36)  # the median hippocampus shape, about
CT_SPACING = (0.8, 0.8, 1.0)
TOOLS = ("medseg", "nnunet")

# Appended to each tool's script: the peak of PyTorch's CUDA allocator in that process, where it ran on a GPU.
GPU_PEAK = """
import json as _json, os as _os, torch as _torch
if _torch.cuda.is_available() and _os.environ.get("BENCH_GPU_PEAK"):
    with open(_os.environ["BENCH_GPU_PEAK"], "w") as _f:
        _json.dump({"allocated": _torch.cuda.max_memory_allocated(), "reserved": _torch.cuda.max_memory_reserved(),
                    "device": _torch.cuda.get_device_name(0)}, _f)
"""

MEDSEG = """
import sys
from medseg.config import PredictConfig
from medseg.stages.predict import predict
predict(sys.argv[1], sys.argv[2], [sys.argv[3]], PredictConfig(overlap=0.5, tta_flips=sys.argv[4] == "on"),
        overwrite=True)
""" + GPU_PEAK

NNUNET = """
import json, sys, torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
images, out, model, plans_json, dataset_json, tta = sys.argv[1:7]
cuda = torch.cuda.is_available()  # on a GPU as nnU-Net runs there: everything on the device
device = torch.device("cuda", 0) if cuda else torch.device("cpu")
network = torch.jit.load(model, map_location=device).eval()
plans = PlansManager(plans_json)
predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta == "on",
                            perform_everything_on_device=cuda, device=device, allow_tqdm=False)
predictor.manual_initialization(network, plans, plans.get_configuration("3d_fullres"), [network.state_dict()],
                                json.loads(open(dataset_json).read()), "nnUNetTrainer",
                                (0, 1, 2) if tta == "on" else None)  # None: nnU-Net mirrors nothing
predictor.predict_from_files(images, out, save_probabilities=False, overwrite=True,
                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
""" + GPU_PEAK


def medseg_model(msd: Path, work: Path, minutes: float, given: Path | None) -> tuple[Path, Path]:
    """medseg's data under ``work/medseg`` and the ``given`` checkpoint, or a dynunet of FEATURES trained
    on fold 0 for ``minutes`` (kept: a second run reuses it). Returns the checkpoint and the splits."""
    from common import medseg_data, timed_train

    from medseg.config import PlanConfig
    from medseg.stages.plan import plan

    pre, _, splits = medseg_data(msd, work)
    if given is not None:
        return given, splits
    plan_path = plan(work / "medseg" / "ingest" / "manifest.json", work / "medseg" / "plan-predict",
                     PlanConfig(batch_size=2, base_features=FEATURES[0], max_features=FEATURES[1])).plan_path
    out = work / "medseg" / f"predict-model-{minutes:g}min"
    if not (out / "best.pt").exists():
        timed_train(pre, plan_path, splits, out, {"network": {"name": "dynunet"}, "epochs": 200, "val_every": 5,
                                                  "max_minutes": minutes})
    return out / "best.pt", splits


def torchscript(checkpoint: Path, out: Path) -> tuple[Path, int, tuple[int, ...], tuple[float, ...]]:
    """The checkpoint's network as TorchScript (checked against it), its parameter count, patch and spacing."""
    import torch

    from medseg.modelio import load_checkpoint_model

    net, spec = load_checkpoint_model(checkpoint, torch.device("cpu"))
    patch, spacing = tuple(spec.plan.patch_size), tuple(spec.plan.target_spacing_mm)
    x = torch.randn(1, spec.plan.channels, *patch)
    with torch.no_grad():
        scripted = torch.jit.trace(net, x)  # MONAI's DynUNet does not script; nnU-Net runs windows of one patch
        x = torch.randn(1, spec.plan.channels, *patch)
        diff = float((scripted(x) - net(x)).abs().max())
    if diff > 1e-4:
        raise SystemExit(f"TorchScript of {checkpoint} differs from the network by {diff}")
    out.parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(out))
    return out, sum(p.numel() for p in net.parameters()), patch, spacing


def nnunet_plans(msd: Path, work: Path, patch: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[Path, Path]:
    """nnU-Net's own plans for the dataset, given medseg's patch and spacing and RAS (x, y, z) arrays."""
    import nnunet

    pre = nnunet.plan_and_preprocess(msd, work, 1, preprocess=False)
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans.update(image_reader_writer="NibabelIOWithReorient", transpose_forward=[2, 1, 0],
                 transpose_backward=[2, 1, 0])
    plans["configurations"]["3d_fullres"].update(patch_size=list(patch), spacing=list(spacing))
    out = work / "bench-plans.json"
    out.write_text(json.dumps(plans, indent=1))
    return out, pre / "dataset.json"


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def hippocampus_set(msd: Path, cases: list[str], folder: Path) -> Path:
    """``images/<case>_0000.nii.gz`` (the name both tools read; links to the MSD files) and ``labels/``."""
    for case in cases:
        for src, dst in ((msd / "imagesTr" / f"{case}.nii.gz", folder / "images" / f"{case}_0000.nii.gz"),
                         (msd / "labelsTr" / f"{case}.nii.gz", folder / "labels" / f"{case}.nii.gz")):
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(src.resolve())
    return folder


def ct_set(msd: Path, cases: list[str], folder: Path, slices: int) -> Path:
    """One 512 x 512 x ``slices`` scan of 0.8 x 0.8 x 1 mm tiled from the cases (see the module's text)."""
    import nibabel as nib
    from monai.transforms import ResizeWithPadOrCrop
    from scipy import ndimage

    fit = ResizeWithPadOrCrop(TILE)  # centre-cropped or zero-padded to a tile

    if (folder / "labels" / "ct.nii.gz").exists():
        return folder
    grid = (round(512 * CT_SPACING[0]), round(512 * CT_SPACING[1]), slices)  # mm = voxels at 1 mm
    counts = [-(-g // t) for g, t in zip(grid, TILE)]
    image = np.zeros([c * t for c, t in zip(counts, TILE)], dtype=np.float32)
    label = np.zeros(image.shape, dtype=np.uint8)
    k = 0
    for i in range(counts[0]):
        for j in range(counts[1]):
            for m in range(counts[2]):
                case = cases[k % len(cases)]
                k += 1
                x = np.asarray(nib.load(str(msd / "imagesTr" / f"{case}.nii.gz")).dataobj, dtype=np.float32)
                y = np.asarray(nib.load(str(msd / "labelsTr" / f"{case}.nii.gz")).dataobj, dtype=np.uint8)
                cell = tuple(slice(n * t, (n + 1) * t) for n, t in zip((i, j, m), TILE))
                image[cell] = np.asarray(fit(((x - x.mean()) / max(float(x.std()), 1e-8))[None]))[0]
                label[cell] = np.asarray(fit(y[None]))[0]
    image, label = image[: grid[0], : grid[1], : grid[2]], label[: grid[0], : grid[1], : grid[2]]
    zoom = (512 / grid[0], 512 / grid[1], 1.0)
    image = ndimage.zoom(image, zoom, order=1)
    label = ndimage.zoom(label, zoom, order=0)
    # stored LPS: the arrays are flipped in x and y and the affine says so, so RAS is the tiles' own
    affine = np.diag([-CT_SPACING[0], -CT_SPACING[1], CT_SPACING[2], 1.0])
    affine[:2, 3] = [CT_SPACING[0] * (image.shape[0] - 1), CT_SPACING[1] * (image.shape[1] - 1)]
    _save(folder / "images" / "ct_0000.nii.gz", np.round(image[::-1, ::-1] * 100).astype(np.int16), affine)
    _save(folder / "labels" / "ct.nii.gz", np.ascontiguousarray(label[::-1, ::-1]), affine)
    log.info("%s: %d tiles of %d cases", folder, k, len(cases))
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


def run(args: list[str], env: dict[str, str]) -> dict:
    """One tool's command in a fresh process: seconds and the peak memory of its process tree."""
    import psutil

    fd, name = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    gpu_file = Path(name)
    env = {**env, "BENCH_GPU_PEAK": str(gpu_file)}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
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
    seconds = time.perf_counter() - start
    gpu = json.loads(gpu_file.read_text() or "null")
    gpu_file.unlink()
    if child.returncode != 0:
        raise SystemExit(f"{args[1:3]} failed:\n{err.decode()[-3000:]}")
    figures = {"seconds": seconds, "peak_gib": peak / 1024**3}
    if gpu is not None:
        figures.update(gpu=gpu["device"], gpu_peak_gib=gpu["allocated"] / 1024**3,
                       gpu_reserved_gib=gpu["reserved"] / 1024**3)
    return figures


def dice(out: Path, labels: Path) -> dict[str, float]:
    """Mean Dice over cases per class (1, 2) and over both, the masks read in their files' own grid."""
    import nibabel as nib

    scores: dict[int, list[float]] = {1: [], 2: []}
    for ref_path in sorted(labels.glob("*.nii.gz")):
        ref_img, pred_img = nib.load(str(ref_path)), nib.load(str(out / ref_path.name))
        if not np.allclose(ref_img.affine, pred_img.affine, atol=1e-4) or ref_img.shape != pred_img.shape:
            raise SystemExit(f"{out / ref_path.name}: not on the grid of its scan")
        ref, mask = np.asarray(ref_img.dataobj), np.asarray(pred_img.dataobj)
        for c, values in scores.items():
            p, r = mask == c, ref == c
            values.append(2 * float((p & r).sum()) / max(float(p.sum() + r.sum()), 1.0))
    per = {f"class_{c}": float(np.mean(v)) for c, v in scores.items()}
    return {"mean": float(np.mean([*scores[1], *scores[2]])), **per}


def main() -> None:
    import nnunet
    import torch

    from medseg.stages.plan import load_splits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data"))
                        / "hippocampus", help="the MSD Task04 folder")
    parser.add_argument("--cases", type=int, default=42, help="validation cases of fold 0 to predict (at most 42)")
    parser.add_argument("--slices", type=int, nargs="*", default=[300], help="CT-sized scans: slices of each")
    parser.add_argument("--model", type=Path, help="a medseg dynunet checkpoint trained on fold 0 (default: train one)")
    parser.add_argument("--train-minutes", type=float, default=6.0)
    parser.add_argument("--work", type=Path, help="working folder, kept (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict.json")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS),
                        help="medseg alone where nnU-Net is not installed (a GPU machine without its kit)")
    parser.add_argument("--tta", choices=["off", "on", "both"], default="off",
                        help="mirroring (all 8 flips) in both tools: off, on, or each set both ways")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tools = [t for t in TOOLS if t in args.tools]
    ttas = ["off", "on"] if args.tta == "both" else [args.tta]
    with tempfile.TemporaryDirectory() as tmp:
        work = (args.work or Path(tmp)).resolve()
        nnunet.set_environment(work / "nnunet")
        checkpoint, splits = medseg_model(args.data, work, args.train_minutes, args.model)
        script, n_params, patch, spacing = torchscript(checkpoint, work / "bench-predict" / "network.pt")
        if "nnunet" in tools:
            plans, dataset_json = nnunet_plans(args.data, work / "nnunet", patch, spacing)
        cases = load_splits(splits, 0)["val"][: args.cases]
        env = {**os.environ, **nnunet.environment(work / "nnunet")}
        root = work / "bench-predict" / f"{len(cases)}-cases"
        sets = [("hippocampus", hippocampus_set(args.data, cases, root / "scans" / "hippocampus"))]
        sets += [(f"512x512x{n}", ct_set(args.data, cases, root / "scans" / f"512x512x{n}", n)) for n in args.slices]
        rows = []
        for name, folder in sets:
            n_cases = len(list((folder / "labels").glob("*.nii.gz")))
            for tta in ttas:
                row: dict = {"scans": name, "cases": n_cases, "tta": tta}
                for tool in tools:
                    out = root / "out" / tool / f"{name}-tta-{tta}"
                    argv = ([MEDSEG, str(folder / "images"), str(out), str(checkpoint), tta] if tool == "medseg" else
                            [NNUNET, str(folder / "images"), str(out), str(script), str(plans), str(dataset_json), tta])
                    log.info("%s on %s, mirroring %s", tool, name, tta)
                    figures = run(argv, env)
                    row[tool] = {"seconds_per_case": figures.pop("seconds") / n_cases, **figures,
                                 "dice": dice(out, folder / "labels")}
                if len(tools) == 2:
                    row["time_ratio"] = row["nnunet"]["seconds_per_case"] / row["medseg"]["seconds_per_case"]
                    row["memory_ratio"] = row["nnunet"]["peak_gib"] / row["medseg"]["peak_gib"]
                    if "gpu_peak_gib" in row["medseg"] and "gpu_peak_gib" in row["nnunet"]:
                        row["gpu_memory_ratio"] = row["nnunet"]["gpu_peak_gib"] / row["medseg"]["gpu_peak_gib"]
                    row["dice_difference"] = row["medseg"]["dice"]["mean"] - row["nnunet"]["dice"]["mean"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\none network for both: {n_params} parameters, patch {patch}, checkpoint {checkpoint}")
    print(f"{'scans':<14} {'cases':>5} {'TTA':>4} {'tool':<7} {'s/case':>8} {'peak GiB':>9} {'GPU GiB':>8} {'Dice':>7}")
    for row in rows:
        for tool in tools:
            r = row[tool]
            gpu = f"{r['gpu_peak_gib']:>8.2f}" if "gpu_peak_gib" in r else f"{'-':>8}"
            print(f"{row['scans']:<14} {row['cases']:>5} {row['tta']:>4} {tool:<7} {r['seconds_per_case']:>8.2f} "
                  f"{r['peak_gib']:>9.2f} {gpu} {r['dice']['mean']:>7.4f}")
        if "time_ratio" in row:
            gpu = f"{row['gpu_memory_ratio']:>7.2f}x" if "gpu_memory_ratio" in row else f"{'':>8}"
            print(f"{'':<14} {'':>5} {'':>4} {'ratio':<7} {row['time_ratio']:>7.2f}x {row['memory_ratio']:>8.2f}x "
                  f"{gpu}  (nnU-Net / medseg)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "parameters": n_params, "patch": patch,
        "checkpoint": str(checkpoint), "tools": tools, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
