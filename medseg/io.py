"""File helpers: atomic writes, hashes, and NIfTI reading with clear errors."""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import hashlib
import json
import math
import os
import re
import socket
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


# Errors of a full file system or quota: raised naming the target, which the command line reports in one line.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


@functools.cache
def _host_tag() -> str:
    """8 hex digits of this host's name: a temporary's writer is only judged gone on its own host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _gone(pid: int) -> bool:
    """Whether process ``pid`` of this host has ended (a zombie that is not reaped yet counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].startswith("Z")


def _remove_abandoned(target: Path, suffix: str) -> None:
    """Remove the temporaries of ``target`` whose writer on this host has ended without removing them
    (killed by SIGKILL, the OOM killer, a time limit): their names carry the writer's process id. Their
    side files go too (``-journal``, ``-wal``: SQLite's, of a store built in a temporary)."""
    pattern = re.compile(
        rf"\.{re.escape(target.name)}\.(\d+)-{_host_tag()}\.[a-z0-9_]{{8}}{re.escape(suffix)}(?:-[a-z]+)?")
    try:
        entries = [e.name for e in os.scandir(target.parent) if e.name.startswith(f".{target.name}.")]
    except OSError:
        return
    for name in entries:
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) != os.getpid() and _gone(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                (target.parent / name).unlink()


@contextlib.contextmanager
def atomic_path(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only on success. With
    ``replace=False`` it is linked at ``target`` only where no file is there yet (of writers that
    race, the first wins and the others' files are dropped).

    The temporary, ``.<name>.<pid>-<host>.<random><suffixes>``, is removed when the write fails; one
    that a killed process left is removed by the next write of the same target on the same host.
    A full file system or quota (ENOSPC, EDQUOT) is raised as an OSError naming ``target``: the
    error of a failed write() names no file."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes) or ".tmp"
    _remove_abandoned(target, suffix)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}-{_host_tag()}.", suffix=suffix,
                                        dir=target.parent)
    except OSError as err:
        raise _named(err, target) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode a plain open() would
        if replace:
            os.replace(tmp, target)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, target)  # the temporary's name goes in the clean-up below
    except OSError as err:
        if err.errno in NO_SPACE and err.filename in (None, tmp_name):
            raise _named(err, target) from err
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def _named(err: OSError, target: Path) -> OSError:
    """``err`` naming ``target`` when it is a full file system's (a write() names no file)."""
    if err.errno in NO_SPACE:
        return OSError(err.errno, os.strerror(err.errno), str(target))
    return err


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
    """A NIfTI file by its name; hidden files (a temporary of ``atomic_path``, macOS's ``._`` forks) are not."""
    return path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def voxel_volume_ml(affine: np.ndarray) -> float:
    """The volume of one voxel of a grid with this affine (mm), in mL."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


# Deflate packs at most 1032 bytes into one (a run of one value); a .nii.gz whose header declares
# more voxel bytes than this many times its own size is damaged or forged, and is refused unread.
MAX_GZIP_RATIO = 1100


def check_declared_size(path: Path, header: nib.Nifti1Header) -> None:
    """Refuse a NIfTI whose header declares more voxel bytes than the file can hold, before any
    memory is taken for them: a damaged or hostile header (say 30000^3 voxels) would otherwise end
    the process with a MemoryError instead of naming the file."""
    try:
        shape = tuple(int(n) for n in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
    except (ValueError, TypeError, nib.spatialimages.HeaderDataError) as err:
        raise DataError(f"{path}: its NIfTI header cannot be read: {err}") from None
    if any(n < 0 for n in shape):
        raise DataError(f"{path}: expected non-negative dimensions in the NIfTI header, found {shape}")
    declared = math.prod(shape) * itemsize
    size = path.stat().st_size
    packed = path.name.endswith(".gz")
    room = size * MAX_GZIP_RATIO if packed else size - offset
    if declared > room:
        shown = " x ".join(str(n) for n in shape)
        raise DataError(
            f"{path}: its header declares {shown} voxels ({declared / 2**30:.3g} GiB), more than the "
            f"{'gzip-packed ' if packed else ''}file of {size} bytes can hold (damaged or not this file's header?)"
        )


# Voxel axes longer than this (mm) are taken for a damaged header: 100 m.
MAX_VOXEL_MM = 1e5


def check_affine(path: Path, affine: np.ndarray | None) -> None:
    """Refuse a header whose voxel-to-world affine is not finite, not invertible, or absurd: such a
    grid means nothing, and numpy's decompositions of it (nibabel's qform) can spin without end."""
    if affine is None:
        return
    matrix = np.asarray(affine, dtype=np.float64)
    with np.errstate(all="ignore"):
        if not np.all(np.isfinite(matrix)):
            raise DataError(f"{path}: expected a finite voxel-to-world affine in its header, found NaN or infinity")
        zooms = np.sqrt((matrix[:3, :3] ** 2).sum(axis=0))
        if not np.all(zooms > 0) or abs(np.linalg.det(matrix[:3, :3])) <= 1e-12 * float(np.prod(zooms)):
            raise DataError(f"{path}: expected an invertible voxel-to-world affine in its header, found voxel axes "
                            f"{zooms.round(4).tolist()} mm that do not span space")
        if zooms.max() > MAX_VOXEL_MM or np.abs(matrix[:3, 3]).max() > 1e9:
            raise DataError(f"{path}: expected voxel sizes up to {MAX_VOXEL_MM:g} mm and a plausible origin in its "
                            f"header, found voxels {zooms.max():.3g} mm and an origin {np.abs(matrix[:3, 3]).max():.3g} mm away")


def load_nifti(path: Path) -> nib.Nifti1Image:
    """Load a NIfTI file and read its voxels now, so a damaged file fails here with its name."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"file not found: {path}")
    if not os.access(path, os.R_OK):
        raise DataError(f"cannot read {path}: permission denied (mode {path.stat().st_mode & 0o777:o})")
    # HeaderDataError: an unknown data type code; OverflowError: numpy's memmap of an absurd vox_offset
    readable = (EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError, OverflowError,
                nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError)
    try:
        img = nib.load(str(path))  # the header only: nibabel reads the voxels on access
    except readable as err:
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err} (truncated or not a NIfTI file?)") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"{path}: expected a NIfTI image, found {type(img).__name__}")
    check_declared_size(path, img.header)
    check_affine(path, img.affine)
    dtype = img.header.get_data_dtype()
    if dtype.kind not in "biuf":  # RGB (a structured type) or complex voxels: not intensities medseg reads
        raise DataError(f"{path}: expected scalar voxels (integers or floats), found the NIfTI data type {dtype}")
    try:
        # Force the read: nibabel is lazy, and a truncated .nii.gz only fails on access.
        data = np.asanyarray(img.dataobj)
    except readable as err:
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err} (truncated or not a NIfTI file?)") from None
    # the voxels in memory under the file's own header class (a NIfTI-2 image keeps its 64-bit dims)
    return type(img)(data, img.affine, img.header)


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
