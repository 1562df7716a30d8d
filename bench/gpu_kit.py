"""Build the kit that the GPU check takes to a GPU machine with no network: wheels and data.

    .venv/bin/python bench/gpu_kit.py [--out .gpukit] [--python-version 3.12] [--data ../shared/data/hippocampus]

The GPU machine (docs/benchmarks.md, "GPU") has Python, PyTorch, NumPy, SciPy, scikit-image,
matplotlib, PyYAML and pytest, but no network and none of the packages below. This downloads
them as wheels for that machine's Python (``--python-version``, x86-64 Linux) at the versions
in ``constraints.txt`` (the ones CI tested), without their dependencies, so the kit holds exactly
this list; copies the hippocampus dataset next to them; and prints the kit's size against the
64 MiB that may travel with one command. ``bench/gpu_check.sh`` installs the kit there and runs
every check. ``--python-version`` of this machine's Python builds a kit to try the check here.

Training and prediction with ``--no-tracking`` and a checkpoint need no MLflow and no
Snakemake, so neither is in the kit (MLflow's wheels alone are over 20 MB). The nnU-Net
predictor that ``bench/predict.py`` compares against needs SimpleITK, whose wheel is 52 MB:
it does not fit beside this kit and has to travel in a second command (not built yet).

Data: MSD Task04 Hippocampus (Simpson et al. 2019, arXiv:1902.09063; Vanderbilt University
Medical Center; CC-BY-SA 4.0).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.gpu_kit")

# What medseg's training and prediction import beyond the GPU machine's own packages.
PACKAGES = [
    "monai", "nibabel", "pydicom", "highdicom", "pyjpegls", "pylibjpeg", "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg", "pylibjpeg-rle", "isal", "pydantic", "pydantic-core", "annotated-types",
    "typing-inspection",
]
LIMIT = 64 * 2**20
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64",
             "manylinux_2_5_x86_64"]


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(constraints: Path) -> dict[str, str]:
    """``constraints.txt`` as {normalized name: version}."""
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normal(name)] = version.strip()
    return pins


def download(requirement: str, out: Path, python_version: str) -> None:
    """One wheel for that Python on x86-64 Linux (every package of the list publishes one)."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(out), "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           *[a for p in PLATFORMS for a in ("--platform", p)], requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gpu_kit: expected a wheel of {requirement} for Python {python_version} on x86-64 Linux, "
                         f"found none: {done.stderr.strip().splitlines()[-1:]}")


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def build(out: Path, names: list[str], python_version: str, data: Path | None) -> int:
    pins = pinned(REPO / "constraints.txt")
    wheels = out / "whl"
    shutil.rmtree(out, ignore_errors=True)
    wheels.mkdir(parents=True)
    for name in names:
        version = pins.get(normal(name))
        download(f"{name}=={version}" if version else name, wheels, python_version)
        log.info("%s%s", name, f"=={version}" if version else " (not in constraints.txt: the newest)")
    if data is not None:
        shutil.copytree(data, out / "data" / data.name, ignore=shutil.ignore_patterns("._*", "imagesTs"))
    total = size(out)
    print(f"\n{'part':12} {'files':>6} {'MiB':>7}")
    for part in sorted(p for p in out.iterdir() if p.is_dir()):
        print(f"{part.name:12} {sum(1 for f in part.rglob('*') if f.is_file()):6} {size(part) / 2**20:7.1f}")
    print(f"{'kit':12} {'':6} {total / 2**20:7.1f}   (at most {LIMIT / 2**20:.0f} travel with one command)")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / ".gpukit")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (3.12 there)")
    ap.add_argument("--data", type=Path,
                    default=Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data")) / "hippocampus")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not (args.data / "dataset.json").is_file():
        raise SystemExit(f"gpu_kit: expected an MSD folder with dataset.json, found none at {args.data}")
    total = build(args.out, PACKAGES, args.python_version, args.data)
    if total > LIMIT:
        raise SystemExit(f"gpu_kit: the kit is {total / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB that travel")


if __name__ == "__main__":
    main()
