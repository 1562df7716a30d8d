"""Prediction of CT-sized scans: wall time and peak host memory of ``medseg predict``.

    .venv/bin/python bench/predict.py [--slices 300 800] [--work DIR] [--out bench/results/predict.json]

A small model (a 2-level U-Net) is trained for about 10 s on synthetic cases: two adjacent boxes
brighter than a noisy background, on a 1 mm grid. Then, for each ``--slices`` value, one
synthetic 512 x 512 x N int16 scan of 0.8 x 0.8 x 1 mm voxels, stored LPS (so that
reorientation, resampling and their inversion all do work), is predicted in a fresh process.
That process reports its peak resident memory (``ru_maxrss``) and its wall time. The scan's
float copy alone is 1 GiB at 800 slices. The window count, and so the network's share of the
time, is what a 40 x 40 x 32 window gives at 50% overlap on the 1 mm grid.

Still to come (issue 5): the same scans and hippocampus cases with nnU-Net v2's predictor in
the same run, and the ratios between the two.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.predict")

CHILD = """
import json, resource, sys, time
from medseg.config import PredictConfig
from medseg.stages.predict import predict
start = time.perf_counter()
predict(sys.argv[1], sys.argv[2], [sys.argv[3]], PredictConfig(sw_batch_size=8), overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}))
"""


def train_model(work: Path) -> Path:
    """A small model of two boxes (labels 1 and 2), trained in about 10 s."""
    import nibabel as nib

    from medseg.config import NetworkConfig, PlanConfig, TrainConfig
    from medseg.stages.ingest import ingest
    from medseg.stages.plan import plan
    from medseg.stages.preprocess import preprocess
    from medseg.stages.train import train

    rng = np.random.default_rng(0)
    training = []
    for i in range(6):
        image, label = boxes(rng, (40, 40, 32), (12, 20, 20))
        for sub, data in (("imagesTr", image), ("labelsTr", label)):
            path = work / "msd" / sub / f"c{i}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    info = {"name": "boxes", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "left", "2": "right"},
            "training": training, "test": []}
    (work / "msd" / "dataset.json").write_text(json.dumps(info))
    manifest = ingest(work / "msd", work / "ingest").manifest_path
    plan(manifest, work / "plan", PlanConfig(n_folds=3, target_spacing_mm=(1.0, 1.0, 1.0), batch_size=2))
    preprocess(manifest, work / "plan" / "plan.json", work / "pre")
    config = TrainConfig(network=NetworkConfig(channels=(4, 8), num_res_units=0), epochs=60, val_every=20,
                         num_workers=0, seed=3, learning_rate=3e-2)
    train(work / "pre", work / "plan" / "plan.json", work / "plan" / "splits.json", work / "model", config)
    return work / "model" / "best.pt"


def boxes(rng: np.random.Generator, shape: tuple[int, int, int], size: tuple[int, int, int],
          scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Two adjacent boxes (labels 1, 2) of ``size`` voxels each, near the centre, on noise (values x ``scale``)."""
    label = np.zeros(shape, dtype=np.uint8)
    centre = [s // 2 + int(rng.integers(-3, 4)) for s in shape]
    lo = [c - s // 2 for c, s in zip(centre, size)]
    x0 = centre[0] - size[0]
    label[x0 : x0 + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = 1
    label[x0 + size[0] : x0 + 2 * size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = 2
    image = rng.normal(10.0, 1.0, size=shape).astype(np.float32)
    image[label == 1] += 6
    image[label == 2] += 12
    return image * scale, label


def ct_scan(folder: Path, slices: int) -> Path:
    """One 512 x 512 x ``slices`` int16 scan, 0.8 x 0.8 x 1 mm voxels stored LPS, with boxes of 15 x 25 x 25 mm."""
    import nibabel as nib

    path = folder / f"ct{slices}.nii.gz"
    if not path.exists():
        image, _ = boxes(np.random.default_rng(slices), (512, 512, slices), (19, 31, 25), scale=10.0)
        affine = np.diag([-0.8, -0.8, 1.0, 1.0])
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), str(path))
    return path


def measure(scan_dir: Path, out: Path, model: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(scan_dir), str(out), str(model)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"medseg predict failed on {scan_dir}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="+", default=[300, 800])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "predict.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        model = train_model(work / "train")
        rows = []
        for slices in args.slices:
            scan = ct_scan(work / "scans" / str(slices), slices)
            figures = measure(scan.parent, work / "masks" / str(slices), model)
            float_gib = 512 * 512 * slices * 4 / 1024**3
            rows.append({"scan": f"512x512x{slices}", "seconds": round(figures["seconds"], 1),
                         "peak_gib": round(figures["peak_gib"], 2), "scan_float32_gib": round(float_gib, 2)})
    print(f"{'scan':<14} {'seconds':>8} {'peak GiB':>9} {'scan as float32 GiB':>20}")
    for row in rows:
        print(f"{row['scan']:<14} {row['seconds']:>8} {row['peak_gib']:>9} {row['scan_float32_gib']:>20}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"medseg": rows, "peer": "nnU-Net v2: not measured yet"}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
