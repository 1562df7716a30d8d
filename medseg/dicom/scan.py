"""Find the DICOM series under a folder of any structure, reading headers only.

Each file is parsed once, its pixel data (and any other large value) deferred. Classic
single-frame images, most files of most trees, are read by the fast header reader
(``medseg.dicom.header``); every other file, and any that reader does not vouch for, by pydicom.
What the rest of medseg needs from a file is kept in a small ``DicomFile``: the frames with
their geometry, where its plain pixels lie in the file, the UIDs that group it, which series a
label object references, and a slim copy of the header (read again on demand for fast-read
images). Being small, these come back cheaply from worker processes, which parse a large tree
on several cores; the full data sets are dropped.

Image objects are grouped by SeriesInstanceUID and a series is split further where it mixes
slice orientations, image sizes or echoes (each part becomes its own volume). Segmentations
(DICOM-SEG) and structure sets (RTSTRUCT) are kept apart as label objects; other DICOM objects
(reports, presentation states, DICOMDIR) and non-DICOM files are listed as ignored.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError

from medseg.dicom.frames import Frame, frames_of, image_type
from medseg.dicom.header import read_image_header
from medseg.dicom.labels import referenced_series_uid
from medseg.dicom.sidecar import ALLOWED_KEYWORDS
from medseg.dicom.sop import RTSTRUCT_STORAGE, SEG_STORAGE, sop_class_uid
from medseg.dicom.volume import (
    PixelLocation,
    locate_pixels,
    pixel_location,
    read_without_preamble,
)
from medseg.errors import DicomSeriesError

log = logging.getLogger(__name__)

ObjectKind = Literal["image", "seg", "rtstruct", "other"]


@dataclass(frozen=True)
class DicomFile:
    """What the scan keeps of one DICOM file: a slim header (``SLIM_KEYWORDS``), its kind, and for
    an image its frames (or why they cannot be read) and where its plain pixels lie; for a label
    object, the SeriesInstanceUID it references (None if it names none); and the UIDs and series
    number that grouping reads. The slim header of an image read by the fast reader is not kept
    (``slim`` is None): ``header`` reads it again from the file for the few that need it."""

    path: Path
    slim: pydicom.Dataset | None  # the slim header; None where it is read on demand (``header``)
    kind: ObjectKind
    frames: tuple[Frame, ...] = ()
    frame_error: str = ""
    pixels: PixelLocation | None = None
    references: str | None = None
    # What grouping reads of every file, decoded once where the file is read.
    series_uid: str = ""
    series_number: str = ""
    sop_uid: str = ""
    image_type: str = ""  # ImageType's values joined by backslashes, upper case

    @property
    def header(self) -> pydicom.Dataset:
        """The slim header; read again from the file (fast) where the scan did not keep it."""
        if self.slim is None:
            object.__setattr__(self, "slim", _slim_header(self.path))
        return self.slim  # type: ignore[return-value]


def _keys(get: Callable[..., Any]) -> dict[str, str]:
    """The grouping fields of a ``DicomFile`` from a header's ``get``; a series number as a whole
    number where it is one (the same text from either reader); '' for a value that is damaged."""

    def text(keyword: str) -> str:
        try:
            value = get(keyword)
        except Exception:  # a damaged value, which pydicom converts (and raises) on first use
            return ""
        if keyword == "SeriesNumber":
            try:
                return str(int(value))
            except (TypeError, ValueError):
                pass
        if keyword == "ImageType":  # multi-valued: ORIGINAL\PRIMARY\M\ND, however a reader gives it
            return "\\".join(image_type(value))
        return "" if value is None else str(value)

    return {"series_uid": text("SeriesInstanceUID"), "series_number": text("SeriesNumber"),
            "sop_uid": text("SOPInstanceUID"), "image_type": text("ImageType")}


@dataclass
class SeriesGroup:
    """The image frames of one series (or one part of a series split by orientation, size or echo)."""

    series_uid: str
    part: int
    n_parts: int
    split_reason: str
    frames: list[Frame]
    header: pydicom.Dataset  # the header of its first file, for metadata
    folder: Path
    copy: int = 0  # 1, 2, ... when the same series is stored in several folders
    pixels: dict[Path, PixelLocation] = field(default_factory=dict, repr=False)  # files whose plain pixels can be read straight

    def value(self, keyword: str, default: Any = None) -> Any:
        """A value of the first file's header; ``default`` where it is missing or damaged (pydicom
        converts a raw value on first use, and raises its own kinds for one of a wrong length)."""
        try:
            value = self.header.get(keyword)
        except Exception:  # noqa: BLE001 - BytesLengthException, ValueError, OSError, ...
            return default
        return default if value is None else value

    @property
    def case_id(self) -> str:
        """A derived id: modality, series number and a hash of the UID; nothing copied from the patient."""
        modality = str(self.value("Modality") or "img").lower()
        number = self.value("SeriesNumber")
        try:
            number_text = f"{int(number):03d}"
        except (TypeError, ValueError):
            number_text = "000"
        digest = hashlib.sha1(f"{self.series_uid}/{self.part}/{self.copy}".encode()).hexdigest()[:8]
        suffix = (f"_part{self.part}" if self.n_parts > 1 else "") + (f"_copy{self.copy}" if self.copy else "")
        return f"{modality}{number_text}_{digest}{suffix}"

    @property
    def name(self) -> str:
        """How messages name the series: its number, description and folder (no patient data)."""
        description = str(self.value("SeriesDescription") or "").strip()
        text = f"series {self.value('SeriesNumber', '?')}"
        if description:
            text += f" '{description}'"
        if self.n_parts > 1:
            text += f" (part {self.part} of {self.n_parts}, split by {self.split_reason})"
        return f"{text} in {self.folder}"


@dataclass
class ScanResult:
    """What a folder holds: image series, label objects, and what was ignored or refused."""

    root: Path
    series: list[SeriesGroup] = field(default_factory=list)
    labels: list[DicomFile] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (what, why) for unusable image files


def list_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (or ``root`` itself), hidden files and folders excepted.

    Linked folders are followed, each real folder once."""
    root = Path(root)
    if root.is_file():
        return [root]
    out = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / name for name in sorted(filenames) if not name.startswith("."))
    return out


NOT_DICOM = "not a DICOM file"
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")  # names that say a file is DICOM (.ima: Siemens)

# Values this large (pixel data, vendor blobs) are skipped when the header is read.
DEFER_SIZE = 16384


def _read_file(path: Path) -> DicomFile | tuple[Path, str]:
    """The ``DicomFile`` of ``path``, or (path, why) when it is no DICOM file or a damaged one.

    The fast header reader (``medseg.dicom.header``) serves classic single-frame images; pydicom
    reads every other file, and any that reader does not vouch for."""
    return _fast_file(path) or _pydicom_file(path)


def _pydicom_file(path: Path) -> DicomFile | tuple[Path, str]:
    """``_read_file`` through pydicom alone."""
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except InvalidDicomError:
        ds = read_without_preamble(path, defer_size=DEFER_SIZE)
        if ds is None:
            return path, _named_dicom(path, "without a DICOM header (empty or cut short)") or NOT_DICOM
    except Exception as err:  # pydicom raises a wide range on damaged files; keep the scan going
        return path, f"unreadable DICOM header ({type(err).__name__}: {err})"
    try:  # pydicom converts a value on first use, and raises there if it is damaged
        sop_class = sop_class_uid(ds)
        if sop_class in SEG_STORAGE:
            kind: ObjectKind = "seg"
        elif sop_class == RTSTRUCT_STORAGE:
            kind = "rtstruct"
        elif "Rows" in ds and "Columns" in ds and ds.get("SeriesInstanceUID"):
            kind = "image"
            _convert_used(ds)
        else:
            kind = "other"
            damage = _damage(ds)
            if not damage and not sop_class:
                damage = _named_dicom(path, "without a DICOM header (no SOP class: cut short?)")
            if damage:
                return path, damage
    except Exception as err:  # BytesLengthException, ValueError, NotImplementedError (unknown VR), ...
        return path, f"unreadable DICOM header ({type(err).__name__}: {err})"
    return _summary(path, ds, kind)


def _fast_file(path: Path) -> DicomFile | None:
    """The ``DicomFile`` of a classic single-frame image read by the fast header reader, or None
    where that reader does not vouch for the file or a value is not plain: then pydicom reads it
    (and words the error if there is one)."""
    raw = read_image_header(path, _fast_tags())
    if raw is None:
        return None
    try:
        frames = tuple(frames_of(raw, path))
        pixels = locate_pixels(raw.transfer_syntax, raw.pixel_offset, raw.pixel_length, raw.get)
        keys = _keys(raw.get)
    except (DicomSeriesError, ValueError, TypeError, KeyError, UnicodeDecodeError, struct.error):
        return None
    # The slim header is read again for the few files that need it (``DicomFile.header``): sending
    # it back from a worker process would cost more than reading it.
    return DicomFile(path, None, "image", frames, "", pixels, **keys)


def _slim_header(path: Path) -> pydicom.Dataset:
    """The slim header of an image file."""
    raw = read_image_header(path, _fast_tags())
    if raw is not None:
        return raw.dataset(_slim_tags())
    return _slim(pydicom.dcmread(path, defer_size=DEFER_SIZE))


def _named_dicom(path: Path, what: str) -> str:
    """Why a file named as DICOM (``DICOM_SUFFIXES``) but unusable is a damaged DICOM file; '' for
    other names, which are merely not DICOM."""
    if path.suffix.lower() not in DICOM_SUFFIXES:
        return ""
    size = path.stat().st_size if path.is_file() else 0
    return f"expected a DICOM file (its name ends in {path.suffix}), found {size} bytes {what}"


def _summary(path: Path, ds: pydicom.Dataset, kind: ObjectKind) -> DicomFile:
    if kind == "image":
        try:
            frames, error = tuple(frames_of(ds, path)), ""
        except DicomSeriesError as err:
            frames, error = (), str(err)
        except (ValueError, TypeError, NotImplementedError, BytesLengthException) as err:
            # a damaged value in a sequence (multi-frame groups), which pydicom converts on first use
            frames, error = (), f"{path}: unreadable DICOM header ({type(err).__name__}: {err})"
        return DicomFile(path, _slim(ds), kind, frames, error, pixel_location(ds), **_keys(ds.get))
    references = None
    if kind in ("seg", "rtstruct"):
        try:
            references = referenced_series_uid(ds)
        except Exception as err:  # a damaged reference: the object references nothing usable
            log.warning("%s: cannot read the series this %s references (%s)", path, kind.upper(), type(err).__name__)
    return DicomFile(path, _slim(ds), kind, references=references, **_keys(ds.get))


# The header attributes a DicomFile keeps: what grouping, naming, case ids and the sidecar read.
SLIM_KEYWORDS = tuple(dict.fromkeys((
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "PatientID", "Modality", "SeriesNumber", "SeriesDescription", "Rows", "Columns",
    *ALLOWED_KEYWORDS,
)))


def _slim(ds: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of ``SLIM_KEYWORDS`` and the transfer syntax, values left as read (a damaged one
    raises only where it is used)."""
    out = pydicom.Dataset()
    for tag in _slim_tags():
        if tag in ds:
            out[tag] = ds.get_item(tag, keep_deferred=True)  # the element as it is, converted or not
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        out.file_meta = pydicom.dataset.FileMetaDataset()
        for tag in (0x00020002, 0x00020010):  # MediaStorageSOPClassUID, TransferSyntaxUID
            if tag in meta:
                out.file_meta[tag] = meta.get_item(tag, keep_deferred=True)
    return out


@cache
def _slim_tags() -> tuple[int, ...]:
    return tuple(pydicom.datadict.tag_for_keyword(k) for k in SLIM_KEYWORDS)


# What the fast header reader keeps of a classic image: the slim header, the values the reader
# and the frames use, and the pixel module that says how the pixels are stored.
PIXEL_KEYWORDS = ("SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "BitsAllocated",
                  "BitsStored", "HighBit", "PixelRepresentation")


@cache
def _fast_tags() -> frozenset[int]:
    keywords = (*SLIM_KEYWORDS, *USED_KEYWORDS, *PIXEL_KEYWORDS)
    return frozenset(pydicom.datadict.tag_for_keyword(k) for k in keywords)


# The top-level values the reader uses, converted as the header is read: pydicom converts a value on
# first use and raises there if it is damaged (truncated). All of them would double the scan time.
USED_KEYWORDS = (
    "SOPInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "Rows", "Columns", "NumberOfFrames",
    "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
    "ImageType", "TemporalPositionIdentifier", "AcquisitionNumber", "TriggerTime", "InstanceNumber", "EchoNumbers",
    "SpacingBetweenSlices", "SliceThickness",
)


def _convert_used(ds: pydicom.Dataset) -> None:
    for keyword in USED_KEYWORDS:
        try:
            ds.get(keyword)
        except Exception as err:  # pydicom raises many kinds for a truncated or damaged value
            raise ValueError(f"{keyword}: {type(err).__name__}: {err}") from None


def _damage(ds: pydicom.Dataset) -> str:
    """Why a DICOM file that is not an image looks like a damaged one (truncated?), or '' if it does not.

    An object of an image SOP class without Rows, Columns or SeriesInstanceUID is damaged; so is a
    file with a file meta but no valid SOP class or nothing after the file meta (a Part 10 file has
    both). Random bytes after a DICM magic have no file meta, and are merely not DICOM.
    """
    meta = getattr(ds, "file_meta", None) or pydicom.Dataset()
    uids = [str(u) for u in (ds.get("SOPClassUID"), meta.get("MediaStorageSOPClassUID")) if u and pydicom.uid.UID(str(u)).is_valid]
    image = next((n for n in (pydicom.uid.UID(u).name for u in uids) if "Image Storage" in n), "")
    if image:
        lacks = [k for k in ("Rows", "Columns", "SeriesInstanceUID") if not ds.get(k)]
        return f"an image object ({image}) without {', '.join(lacks)} (damaged or truncated?)"
    if len(meta) and not (uids and len(ds)):
        return "a DICOM file with no valid SOP class or no data set after its file meta (damaged or truncated?)"
    return ""


def read_headers(
    paths: Sequence[Path], *, pool: Pool | None = None
) -> tuple[list[DicomFile], list[tuple[Path, str]]]:
    """Headers of ``paths``: (DICOM files, (path, reason) for the others), in the order of ``paths``.

    Parsing is pure Python and holds the GIL, so threads do not help (four were measured slower
    than one). Worker processes do: given a ``pool`` (``process_pool``), the files are parsed
    there, and each worker sends back only the small ``DicomFile``s."""
    found: list[DicomFile] = []
    skipped: list[tuple[Path, str]] = []
    results: Iterable[DicomFile | tuple[Path, str]] = map(_read_file, paths)
    if pool is not None and len(paths) >= PARALLEL_MIN_FILES:
        size = max(8, min(64, len(paths) // 32))  # chunks: few enough to be cheap, many enough to share out
        chunks = [paths[i:i + size] for i in range(0, len(paths), size)]
        results = (r for chunk in pool.imap(_read_chunk, chunks) for r in chunk)
    for result in _progress(results, len(paths), "reading DICOM headers"):
        if isinstance(result, DicomFile):
            found.append(result)
        else:
            skipped.append(result)
    return found, skipped


PARALLEL_MIN_FILES = 100  # below this, starting processes costs more than they save


@contextmanager
def process_pool(n_files: int, workers: int) -> Iterator[Pool | None]:
    """Up to ``workers`` forked worker processes (no more than the CPUs) for a tree of ``n_files``
    files, or None: where they would not pay (few files, one worker), and where forking is not
    safe (not Linux, or threads already run in this process). Forked workers start at once with
    medseg imported; spawned ones would import it again and re-run a caller's unguarded script."""
    processes = min(workers, os.cpu_count() or 1)
    safe = sys.platform.startswith("linux") and threading.active_count() == 1
    if processes < 2 or n_files < PARALLEL_MIN_FILES or not safe:
        yield None
        return
    with mp.get_context("fork").Pool(processes) as pool:
        yield pool


def _read_chunk(paths: Sequence[Path]) -> list[DicomFile | tuple[Path, str]]:
    return [_read_file(p) for p in paths]


def _progress(items: Iterable, total: int, what: str) -> Iterable:
    if total < 200 or not log.isEnabledFor(logging.INFO):
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=what, unit="file", leave=False, disable=None)


def _sop_class_name(ds: pydicom.Dataset) -> str:
    uid = ds.get("SOPClassUID")
    try:
        return pydicom.uid.UID(str(uid)).name if uid else "no SOPClassUID"
    except Exception:  # an unknown UID has no name
        return str(uid)


def _split(frames: list[Frame], image_type: dict[Path, str]) -> list[tuple[list[Frame], str]]:
    """Split one series' frames by image type (magnitude and phase, say, as dcm2niix does), then
    orientation, then size, then echo; return parts and the reason."""
    parts: list[tuple[list[Frame], str]] = [(frames, "")]
    keys = (
        ("image type", lambda f: image_type.get(f.path, "")),
        ("orientation", lambda f: tuple(np.round(f.orientation, 3))),
        ("image size", lambda f: (f.rows, f.columns)),
        ("echo", lambda f: f.echo),
    )
    for reason, key in keys:
        new_parts = []
        for part, why in parts:
            groups: dict = {}
            for f in part:
                groups.setdefault(key(f), []).append(f)
            if len(groups) > 1:
                ordered = [groups[k] for k in sorted(groups, key=lambda k: (k is None, str(k)))]
                new_parts.extend((g, ", ".join(filter(None, (why, reason)))) for g in ordered)
            else:
                new_parts.append((part, why))
        parts = new_parts
    return parts


def group_series(files: Sequence[DicomFile]) -> tuple[list[SeriesGroup], list[tuple[str, str]]]:
    """Image files grouped into series (split where needed); (groups, (file, reason) refused)."""
    by_uid: dict[tuple[str, str], list[DicomFile]] = {}
    for f in files:
        if f.kind == "image":
            key = (f.series_uid, f.series_number)
            by_uid.setdefault(key, []).append(f)
    groups: list[SeriesGroup] = []
    refused: list[tuple[str, str]] = []
    for (uid, _), members in by_uid.items():
        copies = _split_copies(members)
        for number, copy in enumerate(copies, start=1 if len(copies) > 1 else 0):
            _add_groups(uid, number, copy, groups, refused)
    groups.sort(key=lambda g: (str(g.folder), _series_number(g), g.series_uid, g.part))
    return groups, refused


def _split_copies(members: list[DicomFile]) -> list[list[DicomFile]]:
    """One list per folder when the same SOPInstanceUID is stored twice (copies of a series), else one."""
    uids = [m.sop_uid for m in members]
    if len(set(uids)) == len(uids):
        return [members]
    by_folder: dict[Path, list[DicomFile]] = {}
    for m in members:
        by_folder.setdefault(m.path.parent, []).append(m)
    return [by_folder[k] for k in sorted(by_folder)]


def _add_groups(
    uid: str, copy: int, members: list[DicomFile], groups: list[SeriesGroup], refused: list[tuple[str, str]]
) -> None:
    frames: list[Frame] = []
    for member in members:
        if member.frame_error:
            refused.append((str(member.path), member.frame_error))
        frames.extend(member.frames)
    if not frames:
        return
    folder = Path(os.path.commonpath([str(m.path.parent) for m in members]))
    parts = _split(frames, {m.path: m.image_type for m in members})
    by_path = {m.path: m for m in members}
    for index, (part_frames, reason) in enumerate(parts, start=1):
        located = {f.path: by_path[f.path].pixels for f in part_frames if by_path[f.path].pixels is not None}
        groups.append(
            SeriesGroup(uid, index, len(parts), reason, part_frames, by_path[part_frames[0].path].header, folder,
                        copy, pixels=located)
        )


def _drop_copies(files: list[DicomFile]) -> tuple[list[DicomFile], list[tuple[Path, str]]]:
    """One file per image in a folder: a second file with the same SOPInstanceUID (a copied file) is
    ignored, as dcm2niix does. The same image in other folders is a copy of the series (``_split_copies``)."""
    kept: list[DicomFile] = []
    first: dict[tuple[Path, str], Path] = {}
    copies: list[tuple[Path, str]] = []
    for f in files:
        uid = f.sop_uid
        key = (f.path.parent, uid)
        if uid and f.kind == "image" and key in first:
            log.warning("%s: ignored, the same image (SOPInstanceUID) as %s", f.path, first[key].name)
            copies.append((f.path, f"a second copy of the image in {first[key]} (same SOPInstanceUID)"))
            continue
        first.setdefault(key, f.path)
        kept.append(f)
    return kept, copies


def _series_number(group: SeriesGroup) -> int:
    try:
        return int(group.value("SeriesNumber"))
    except (TypeError, ValueError):
        return 0


def files_under(root: Path) -> list[Path]:
    """``list_files`` of a folder that must exist."""
    if not Path(root).exists():
        raise DicomSeriesError(f"{root}: expected a folder of DICOM files, found nothing there")
    return list_files(Path(root))


def scan(
    root: Path | Sequence[Path], *, pool: Pool | None = None, listed: Sequence[Path] | None = None
) -> ScanResult:
    """Read every header under ``root`` (a folder, or a list of files) and sort the files into
    series, labels and ignored files. ``pool``: worker processes to parse in (``process_pool``);
    ``listed``: the ``files_under`` a folder ``root``, where the caller has listed them already."""
    if isinstance(root, str | Path):
        root = Path(root)
        paths = list(listed) if listed is not None else files_under(root)
    else:
        paths = [Path(p) for p in root]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DicomSeriesError(f"{missing[0]}: expected a DICOM file, found nothing there")
        root = Path(os.path.commonpath([str(p.parent) for p in paths])) if paths else Path(".")
    found, skipped = read_headers(paths, pool=pool)
    files, copies = _drop_copies(found)
    result = ScanResult(root)
    result.ignored.extend(copies)
    # A damaged DICOM file (unreadable, truncated) is refused, not ignored: it may be a slice of a series.
    result.ignored.extend(s for s in skipped if s[1] == NOT_DICOM)
    damaged = [(str(p), f"{p}: {why}") for p, why in skipped if why != NOT_DICOM]
    for f in files:
        if f.kind in ("seg", "rtstruct"):
            result.labels.append(f)
        elif f.kind == "other":
            result.ignored.append((f.path, f"not an image ({_sop_class_name(f.header)})"))
    result.series, result.refused = group_series(files)
    result.refused[:0] = damaged
    log.info(
        "%s: %d series, %d label objects, %d files ignored, %d refused",
        root, len(result.series), len(result.labels), len(result.ignored), len(result.refused),
    )
    return result
