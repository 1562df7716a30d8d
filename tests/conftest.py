"""Shared fixtures: the real data folder, and small real NIfTI datasets built in tmp_path."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from pydicom.dataset import Dataset, FileDataset

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = "MEDSEG_DATA"


def _shared_data() -> Path:
    return Path(os.environ.get(DATA_ENV, REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data (../shared/data, or $MEDSEG_DATA). Missing data fails loudly."""
    path = _shared_data()
    if not (path / "hippocampus" / "dataset.json").exists():
        pytest.fail(f"test data not found at {path}: put shared/ beside the checkout or set {DATA_ENV}")
    return path


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """The folder of the running interpreter's scripts (medseg, snakemake)."""
    return Path(sys.executable).parent


# The workflow on real hippocampus cases (tests/workflow): six training cases, two held out.
CASES = [f"hippocampus_{i:03d}" for i in (1, 4, 6, 7, 14, 17)]
HELD_OUT = ["hippocampus_019", "hippocampus_020"]


def _env(venv_bin: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def snakemake(
    venv_bin: Path, workdir: Path, *args: str, check: bool = True, configs: tuple[Path, ...] = ()
) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(venv_bin / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--cores", "2", "--configfile", str(REPO / "configs" / "experiments" / "smoke.yaml"), *map(str, configs), *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(venv_bin), timeout=1200)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def finished(shared_data: Path, venv_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder where the whole workflow has run on 6 real cases (results in data/results)."""
    work = tmp_path_factory.mktemp("workflow")
    dataset = hippocampus_subset(shared_data, work / "hippo", CASES)
    snakemake(venv_bin, work, "--config", f"dataset={dataset}")
    return work


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


def huge_header(nifti_gz: bytes) -> bytes:
    """A .nii.gz whose header declares 30000 x 30000 x 30000 voxels (about 100 TB of float32) over the
    file's few kilobytes of voxels."""
    raw = bytearray(gzip.decompress(nifti_gz))
    struct.pack_into("<4h", raw, 40, 3, 30000, 30000, 30000)  # dim[0..3] of the NIfTI-1 header
    return gzip.compress(bytes(raw))


def hippocampus_subset(shared: Path, dest: Path, case_ids: list[str]) -> Path:
    """An MSD folder at ``dest`` whose dataset.json lists real hippocampus cases (files linked, not copied)."""
    src = shared / "hippocampus"
    info = json.loads((src / "dataset.json").read_text())
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    training = []
    for case in case_ids:
        for sub in ("imagesTr", "labelsTr"):
            (dest / sub / f"{case}.nii.gz").symlink_to(src / sub / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    info.update(training=training, numTraining=len(training))
    (dest / "dataset.json").write_text(json.dumps(info, indent=1))
    return dest


def synthetic_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An image with two bright boxes (labels 1 and 2) on a noisy background."""
    label = np.zeros(shape, dtype=np.uint8)
    cx, cy, cz = (s // 2 for s in shape)
    ox, oy = rng.integers(-2, 3, size=2)
    label[cx - 5 + ox : cx + ox, cy - 4 + oy : cy + 4 + oy, cz - 3 : cz + 3] = 1
    label[cx + ox : cx + 5 + ox, cy - 4 + oy : cy + 4 + oy, cz - 3 : cz + 3] = 2
    image = rng.normal(10.0, 1.0, size=shape).astype(np.float32)
    image[label == 1] += 6
    image[label == 2] += 12
    return image, label


def synthetic_msd(dest: Path, n_cases: int = 6, shape: tuple[int, int, int] = (24, 24, 16), seed: int = 0,
                  affine: np.ndarray | None = None) -> Path:
    """A small MSD folder of synthetic cases with known labels 0, 1, 2."""
    rng = np.random.default_rng(seed)
    training = []
    for i in range(n_cases):
        image, label = synthetic_case(rng, shape)
        write_nifti(dest / "imagesTr" / f"case_{i:03d}.nii.gz", image, affine)
        write_nifti(dest / "labelsTr" / f"case_{i:03d}.nii.gz", label, affine)
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    info = {
        "name": "synthetic", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "left", "2": "right"},
        "training": training, "test": [],
    }
    (dest / "dataset.json").write_text(json.dumps(info))
    return dest


def new_dicom_file(path: Path | str, sop_class: str) -> FileDataset:
    """An empty DICOM file dataset for ``path`` of SOP class ``sop_class``: file meta (explicit VR
    little endian), a 128-byte preamble and SOPClassUID/SOPInstanceUID set, the instance UID new."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def write_ct_slice(
    path: Path | str,
    pixels: np.ndarray,
    *,
    position: Sequence[float],
    series_uid: str,
    study_uid: str,
    frame_uid: str | None = None,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    spacing: Sequence[float] = (0.5, 0.7),
    instance: int = 1,
    series_number: int | None = None,
    slice_thickness: float | None = None,
    rescale: tuple[float | str, float | str] | None = None,
    modality: str = "CT",
    sop_class: str | None = None,
    patient_id: str = "synthetic",
    edit: Callable[[Dataset], None] | None = None,
) -> str:
    """Write one classic single-frame DICOM slice (explicit VR little endian) at ``path``; return its SOPInstanceUID.

    ``pixels`` (rows x columns, uint16) gives Rows, Columns and PixelData (16-bit unsigned
    MONOCHROME2). ``position`` is ImagePositionPatient, ``orientation`` ImageOrientationPatient
    and ``spacing`` PixelSpacing (between rows, between columns), written as given (so ``1`` and
    ``1.0`` stay as written). The SOPInstanceUID is new. Optional tags are written only when set:
    FrameOfReferenceUID (``frame_uid``), SeriesNumber, SliceThickness and RescaleSlope and
    RescaleIntercept (``rescale`` = (slope, intercept)). The SOP class is CT Image Storage unless
    ``sop_class`` names another. ``edit`` is called on the finished dataset just before it is saved.
    """
    from pydicom.uid import CTImageStorage

    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype != np.uint16:
        raise ValueError(f"expected a 2D uint16 slice, found shape {pixels.shape} of {pixels.dtype}")
    ds = new_dicom_file(path, CTImageStorage if sop_class is None else sop_class)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    if frame_uid is not None:
        ds.FrameOfReferenceUID = frame_uid
    if series_number is not None:
        ds.SeriesNumber = series_number
    ds.Modality, ds.PatientID, ds.InstanceNumber = modality, patient_id, instance
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = list(position)
    ds.PixelSpacing = list(spacing)
    if slice_thickness is not None:
        ds.SliceThickness = slice_thickness
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if edit is not None:
        edit(ds)
    ds.save_as(str(path), enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def nifti_to_dicom_series(image_path: Path, folder: Path, *, modality: str = "MR", series_number: int = 1) -> Path:
    """Write a 3D NIfTI as a classic DICOM series (one file per slice, LPS geometry).

    Slice k of the NIfTI becomes the file ``IM{k:04d}.dcm`` whose pixel rows run along the
    NIfTI's second axis, so reading the series back gives the NIfTI's affine. Whole numbers in
    0..65535 are stored as they are; other values (the float hippocampus scans) are stored as
    uint16 with RescaleSlope/RescaleIntercept, so they read back to within one slope step.
    The SOP class is MR Image Storage whatever ``modality`` says.
    """
    import nibabel as nib
    from pydicom.uid import MRImageStorage, generate_uid

    img = nib.load(str(image_path))
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{image_path}: expected a 3D image, found shape {data.shape}")
    slope, intercept = 1.0, 0.0
    if not np.array_equal(data, np.round(data)) or data.min() < 0 or data.max() > 65535:
        intercept = float(data.min())
        slope = max(float(data.max()) - intercept, 1e-6) / 65535.0
    stored = np.round((data.astype(np.float64) - intercept) / slope).astype(np.uint16)
    rescale = None if slope == 1.0 and intercept == 0.0 else (f"{slope:.10g}"[:16], f"{intercept:.10g}"[:16])
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()

    def describe(ds: Dataset) -> None:
        ds.PatientName = "Test^Synthetic"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "O", ""
        ds.Manufacturer, ds.SeriesDescription = "medseg tests", image_path.name

    for k in range(data.shape[2]):
        write_ct_slice(
            folder / f"IM{k:04d}.dcm",
            stored[:, :, k].T,
            position=[float(v) for v in (lps @ [0, 0, k, 1])[:3]],
            orientation=[*map(float, row_dir), *map(float, col_dir)],
            spacing=(float(spacing[1]), float(spacing[0])),
            series_uid=series_uid,
            study_uid=study_uid,
            frame_uid=frame_uid,
            instance=k + 1,
            series_number=series_number,
            slice_thickness=float(spacing[2]),
            rescale=rescale,
            modality=modality,
            sop_class=MRImageStorage,
            patient_id=f"SYN{series_number:04d}",
            edit=describe,
        )
    return folder


# A model for the predict tests: two adjacent boxes (labels 1 and 2, 12 x 20 x 20 mm each) brighter
# than a noisy background.
SHAPE = (40, 40, 32)
BOX_LABELS = {"0": "background", "1": "left", "2": "right"}


def boxes(rng: np.random.Generator, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """Image and label: boxes of label 1 (x 8..19) and 2 (x 20..31), moved by up to 3 voxels."""
    label = np.zeros(shape, dtype=np.uint8)
    ox, oy, oz = rng.integers(-3, 4, size=3)
    label[8 + ox : 20 + ox, 10 + oy : 30 + oy, 6 + oz : 26 + oz] = 1
    label[20 + ox : 32 + ox, 10 + oy : 30 + oy, 6 + oz : 26 + oz] = 2
    image = rng.normal(10.0, 1.0, size=shape).astype(np.float32)
    image[label == 1] += 6
    image[label == 2] += 12
    return image, label


def dice(mask: np.ndarray, ref: np.ndarray, c: int) -> float:
    p, r = mask == c, ref == c
    return float(2 * (p & r).sum() / (p.sum() + r.sum()))


def box_msd(dest: Path, n_cases: int, rng: np.random.Generator, prefix: str = "c") -> Path:
    """An MSD folder of ``n_cases`` box cases (``boxes``) named <prefix>0, <prefix>1, ..."""
    training = []
    for i in range(n_cases):
        image, label = boxes(rng)
        write_nifti(dest / "imagesTr" / f"{prefix}{i}.nii.gz", image)
        write_nifti(dest / "labelsTr" / f"{prefix}{i}.nii.gz", label)
        training.append({"image": f"./imagesTr/{prefix}{i}.nii.gz", "label": f"./labelsTr/{prefix}{i}.nii.gz"})
    info = {"name": "boxes", "modality": {"0": "MRI"}, "labels": BOX_LABELS, "training": training, "test": []}
    (dest / "dataset.json").write_text(json.dumps(info))
    return dest


def train_box_model(root: Path, spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    """A small UNet trained on six box cases at ``spacing_mm`` to a validation Dice above 0.95 (about 10 s);
    its best.pt."""
    from medseg.config import NetworkConfig, PlanConfig, TrainConfig
    from medseg.stages.ingest import ingest
    from medseg.stages.plan import plan
    from medseg.stages.preprocess import preprocess
    from medseg.stages.train import train

    manifest = ingest(box_msd(root / "msd", 6, np.random.default_rng(0)), root / "ingest").manifest_path
    plan(manifest, root / "plan", PlanConfig(n_folds=3, target_spacing_mm=spacing_mm, batch_size=2))
    preprocess(manifest, root / "plan" / "plan.json", root / "pre")
    config = TrainConfig(network=NetworkConfig(channels=(4, 8), num_res_units=0), epochs=60, val_every=5,
                         num_workers=0, seed=3, learning_rate=3e-2)
    result = train(root / "pre", root / "plan" / "plan.json", root / "plan" / "splits.json", root / "fold_0", config)
    assert result.best_dice > 0.95, result.best_dice
    return root / "fold_0" / "best.pt"


@pytest.fixture(scope="session")
def box_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The box model on a 1 mm plan."""
    return train_box_model(tmp_path_factory.mktemp("model"))


# Real services on 127.0.0.1, started once per test run and stopped after it, even when a test fails.
# .ci/run installs their Debian packages; a missing one fails the tests that need it, naming the package.
def _need(program: str, package: str, *folders: str) -> None:
    import shutil

    if shutil.which(program) is None and not any((Path(f) / program).is_file() for f in folders):
        pytest.fail(f"{program} not installed: install the Debian package {package} (.ci/run does: "
                    f"apt-get install {package})")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A one-node SLURM cluster on 127.0.0.1 (medseg.services.slurm)."""
    _need("slurmctld", "slurm-wlm", "/usr/sbin")
    _need("munged", "munge", "/usr/sbin")
    from medseg.services import slurm

    folder = tmp_path_factory.mktemp("slurm")
    try:
        yield slurm.start(folder)
    finally:
        slurm.stop(folder)


@pytest.fixture(scope="session")
def services_root():  # noqa: ANN201
    """A folder for services' data that the ``postgres`` user can reach (pytest's own are root's alone)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="medseg-services-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_server(services_root: Path):  # noqa: ANN201
    """An MLflow server on 127.0.0.1 with a PostgreSQL backend store (medseg.services.tracking_server)."""
    import glob

    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        _need("initdb", "postgresql")
    from medseg.services import tracking_server as ts

    folder = services_root / "tracking"
    try:
        yield ts.start(folder)
    finally:
        ts.stop(folder)


# Headless Chromium for the review page's browser tests: Debian's chromium driven by Playwright for Python
# (its own browser download fails here). WebGL (NiiVue) runs on SwiftShader.
CHROMIUM_ENV = "MEDSEG_CHROMIUM"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]
ARTIFACTS = Path(os.environ.get("MEDSEG_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="session")
def chromium():  # noqa: ANN201
    """A headless Chromium (Playwright's Browser); fails when the browser or Playwright is missing."""
    executable = os.environ.get(CHROMIUM_ENV, "/usr/bin/chromium")
    if not Path(executable).is_file():
        _need(executable, "chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright not installed: pip install -e '.[test]' (make test does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
