"""File helpers: atomic writes, hashes, and NIfTI reading with clear errors."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np

from medseg.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


_UMASK: int | None = None


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (changing it, even for a
    moment, would race with files other threads create)."""
    global _UMASK
    if _UMASK is None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("Umask:"):
                    _UMASK = int(line.split()[1], 8)
                    break
        except OSError:
            pass
        if _UMASK is None:
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
    return _UMASK


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` itself (``flock``; no lock file is left), so processes
    that update files in it take turns. Created if missing. Not POSIX: no lock."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (sorted keys off, 2-space indent)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def read_json(path: Path) -> Any:
    """Read JSON with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def strip_nifti_suffix(name: str) -> str:
    """``case_0000.nii.gz`` -> ``case_0000``."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith("._")


def voxel_volume_ml(affine: np.ndarray) -> float:
    """The volume of one voxel of a grid with this affine (mm), in mL."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def load_nifti(path: Path) -> nib.Nifti1Image:
    """Load a NIfTI file and read its voxels now, so a damaged file fails here with its name."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {path}")
    try:
        img = nib.load(str(path))
        # Force the read: nibabel is lazy, and a truncated .nii.gz only fails on access.
        data = np.asanyarray(img.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err} (truncated or not a NIfTI file?)") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: expected a NIfTI image, found {type(img).__name__}")
    return nib.Nifti1Image(data, img.affine, img.header) if isinstance(img, nib.Nifti1Image) else img


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None,
               *, slope: float | None = None) -> None:
    """Write a NIfTI file atomically; the header's dtype follows ``data``. With ``slope``, readers
    scale the stored values by it (``scl_slope``), e.g. uint8 probabilities by 1/255."""
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64), header=header)
    img.set_data_dtype(np.asarray(data).dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.name.endswith(".gz"):
            with open(tmp, "wb") as raw, _gzip_writer(raw) as fh:
                img.to_file_map({"image": nib.fileholders.FileHolder(fileobj=fh)})
        else:
            nib.save(img, str(tmp))


GZIP_LEVEL = 1  # the fastest level, as nibabel writes by default


def _gzip_writer(raw: BinaryIO) -> gzip.GzipFile:
    """A gzip stream onto ``raw``: ISA-L's (``isal``, the same format written 3 to 5 times faster
    than zlib) where it is installed, else the standard library's. No file name and a zero time
    in the gzip header, so the same image gives the same bytes."""
    try:
        from isal import igzip
    except ImportError:  # a platform without isal wheels
        return gzip.GzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=raw, mtime=0)
    return igzip.IGzipFile(filename="", mode="wb", compresslevel=GZIP_LEVEL, fileobj=raw, mtime=0)
