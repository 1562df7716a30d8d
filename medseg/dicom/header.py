"""A fast reader for the headers of classic single-frame DICOM images.

pydicom parses every element of a header into Python objects, about 2 ms for the ~300 elements
of a typical MR or CT slice; a tree of thousands of slices spends most of its conversion time
there. This module walks the element stream of the common case with ``struct`` and keeps only
the elements asked for, as pydicom's own raw (not yet converted) elements, in a ``RawHeader``:
it decodes the few numbers and UIDs that geometry and grouping need itself, and gives the rest
as a pydicom data set whose values pydicom converts on first use, with the file's character
set, exactly as after ``pydicom.dcmread``. The pixel data is left in the file: only where it
lies is kept.

It only vouches for what it fully understands: a Part 10 file whose data set is little endian
(implicit or explicit VR, native or encapsulated pixel data), a classic single-frame image (no
functional groups, not a Siemens mosaic, not a segmentation or structure set) with Rows,
Columns and SeriesInstanceUID. Anything else (big endian, deflated, multi-frame, no preamble,
an element that runs past the end of the file, an unknown VR, sequences nested more than
``MAX_DEPTH`` deep) gives None, and the caller reads the file with pydicom, which also words
the error for a damaged one.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

# Explicit VRs with a 4-byte length (PS3.5 Table 7.1-1); the others have a 2-byte length.
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                       b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
UNDEFINED = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# Elements whose presence means the file is not a classic single-frame image.
FUNCTIONAL_GROUPS = (0x52009229, 0x52009230)  # Shared / Per-frame Functional Groups Sequence
NUMBER_OF_FRAMES, IMAGE_TYPE, SOP_CLASS_UID = 0x00280008, 0x00080008, 0x00080016
REQUIRED = (0x00280010, 0x00280011, 0x0020000E)  # Rows, Columns, SeriesInstanceUID
# SOP classes read by pydicom in full: segmentations and structure sets.
LABEL_CLASSES = (b"1.2.840.10008.5.1.4.1.1.66.4", b"1.2.840.10008.5.1.4.1.1.66.7", b"1.2.840.10008.5.1.4.1.1.481.3")
IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
HEAD_BYTES = 1 << 16  # read this much first: the header of most images, and little of their pixels
MAX_HEAD_BYTES = 1 << 22  # then up to this much; a header that is longer is left to pydicom
MAX_DEPTH = 16  # sequences nested deeper than this (none in real headers) are left to pydicom

_explicit = struct.Struct("<HH2sH").unpack_from
_implicit = struct.Struct("<HHL").unpack_from
_u32 = struct.Struct("<L").unpack_from
_u16 = struct.Struct("<H").unpack_from


class _Unsure(Exception):
    """The file is not one this reader vouches for."""


# How values of the VRs the reader decodes itself become Python values (as pydicom makes them).
_BINARY = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d"}
_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "DS", "IS"})  # ASCII by definition (PS3.5 6.2)


@dataclass(frozen=True)
class RawHeader:
    """The raw elements a fast read kept of one image file, with where its pixel data lies.

    ``get`` decodes the numeric and ASCII values that frames and pixel locations need, as
    pydicom would (one value as itself, several as a list; an empty number as None, an empty
    text as ''), and raises ``ValueError`` for any other VR or a value it cannot read, so that
    the caller falls back to pydicom. ``dataset`` gives a pydicom data set of some of the raw
    elements, which pydicom converts on first use (text with the file's character set)."""

    path: Path
    elements: dict[int, RawDataElement]
    meta: dict[int, RawDataElement]
    implicit: bool
    transfer_syntax: str
    pixel_offset: int
    pixel_length: int

    def __contains__(self, keyword: str) -> bool:
        return _tag(keyword) in self.elements

    def get(self, keyword: str, default: Any = None) -> Any:
        raw = self.elements.get(_tag(keyword))
        if raw is None:
            return default
        vr = raw.VR or pydicom.datadict.dictionary_VR(raw.tag)
        data = raw.value
        if vr in _BINARY:
            code = _BINARY[vr]
            count, extra = divmod(len(data), struct.calcsize(code))
            if extra:
                raise ValueError(f"{keyword}: {len(data)} bytes is no whole number of {vr} values")
            values = list(struct.unpack(f"<{count}{code}", data))
        elif vr in _TEXT:
            text = data.decode("ascii").strip(" \x00")
            if not text:
                return "" if vr not in ("DS", "IS") else None
            parts = [p.strip(" ") for p in text.split("\\")]
            if vr == "DS":
                values = [float(p) for p in parts]
            elif vr == "IS":
                values = [int(p) for p in parts]
            else:
                values = parts
        else:
            raise ValueError(f"{keyword}: the fast reader leaves VR {vr} to pydicom")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def dataset(self, tags: Collection[int]) -> pydicom.Dataset:
        """A pydicom data set of the raw elements of ``tags`` (those present), with a file meta of
        the SOP class and transfer syntax; values are converted on first use."""
        out = pydicom.Dataset({t: self.elements[t] for t in tags if t in self.elements})
        out.set_original_encoding(self.implicit, True)
        out.file_meta = pydicom.dataset.FileMetaDataset({t: self.meta[t] for t in (0x00020002, 0x00020010) if t in self.meta})
        return out


@cache
def _syntaxes() -> frozenset[str]:
    """The transfer syntaxes read here: little endian, native or encapsulated, not deflated."""
    return frozenset(
        str(s) for s in pydicom.uid.AllTransferSyntaxes
        if s in (IMPLICIT_LE, EXPLICIT_LE) or (s.is_encapsulated and not s.is_deflated)
    )


@cache
def _tag(keyword: str) -> int:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword}: not a DICOM keyword")
    return tag


def read_image_header(path: Path, wanted: Collection[int]) -> RawHeader | None:
    """The ``wanted`` elements of the header of a classic single-frame image at ``path``, and
    where its pixel data lies; None when the file is not one this reader vouches for."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(HEAD_BYTES)
            try:
                return _parse(path, head, size, wanted)
            except _Unsure:
                if size <= len(head):
                    raise
                head += fh.read(MAX_HEAD_BYTES - len(head))  # a long header (large private values)
                return _parse(path, head, size, wanted)
    except (_Unsure, OSError, struct.error, UnicodeDecodeError):
        return None


def _parse(path: Path, buf: bytes, size: int, wanted: Collection[int]) -> RawHeader | None:
    if buf[128:132] != b"DICM":
        return None
    meta_elements, pos = _walk(buf, 132, len(buf), False, None, stop_group=2)
    syntax_raw = meta_elements.get(0x00020010)
    if syntax_raw is None or syntax_raw.value is None:
        return None
    syntax = syntax_raw.value.rstrip(b"\x00 ").decode("ascii")
    if syntax not in _syntaxes():
        return None  # big endian, deflated, or unknown: pydicom
    implicit = syntax == IMPLICIT_LE
    limit = min(len(buf), size)
    elements, _ = _walk(buf, pos, limit, implicit, wanted, stop_group=None, file_size=size)
    if any(t in elements for t in FUNCTIONAL_GROUPS) or not all(t in elements for t in REQUIRED):
        return None
    frames = elements.get(NUMBER_OF_FRAMES)
    if frames is not None and frames.value.strip(b"\x00 ") not in (b"", b"1"):
        return None
    image_type = elements.get(IMAGE_TYPE)
    if image_type is not None and b"MOSAIC" in image_type.value.upper():
        return None
    sop_class = elements.get(SOP_CLASS_UID)
    if sop_class is not None and sop_class.value.rstrip(b"\x00 ") in LABEL_CLASSES:
        return None
    pixels = elements.pop(PIXEL_DATA, None)
    if pixels is None:
        return None
    return RawHeader(path, elements, meta_elements, implicit, str(syntax), pixels.value_tell, pixels.length)


def _element(buf: bytes, pos: int, limit: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value start) of the element whose header is at ``pos``."""
    if implicit:
        group, elem, length = _implicit(buf, pos)
        return (group << 16) | elem, None, length, pos + 8
    group, elem, vr, length = _explicit(buf, pos)
    if group == 0xFFFE:  # item and delimitation tags carry no VR, in any transfer syntax
        group, elem, length = _implicit(buf, pos)
        return (group << 16) | elem, None, length, pos + 8
    if vr in LONG_VRS:
        if pos + 12 > limit:
            raise _Unsure
        return (group << 16) | elem, vr, _u32(buf, pos + 8)[0], pos + 12
    if vr in SHORT_VRS:
        return (group << 16) | elem, vr, length, pos + 8
    raise _Unsure  # an unknown VR, or not an element at all


def _walk(
    buf: bytes, pos: int, limit: int, implicit: bool, wanted: Collection[int] | None, *,
    stop_group: int | None, file_size: int | None = None,
) -> tuple[dict, int]:
    """Raw elements of the top level from ``pos``: all of group ``stop_group`` (file meta, explicit
    VR) or the ``wanted`` ones up to PixelData. Raises ``_Unsure`` on anything unexpected."""
    out: dict = {}
    while pos + 8 <= limit:
        if stop_group is not None and _u16(buf, pos)[0] != stop_group:
            return out, pos  # the data set after the file meta, which may be implicit VR
        tag, vr, length, start = _element(buf, pos, limit, implicit)
        if length == UNDEFINED and tag != PIXEL_DATA:
            if wanted is not None and tag in wanted:
                raise _Unsure  # a wanted sequence: pydicom reads it
            pos = _skip_undefined(buf, start, limit, implicit)
            continue
        end = start + length
        if tag == PIXEL_DATA or wanted is None or tag in wanted or tag in FUNCTIONAL_GROUPS:
            key = BaseTag(tag)
            text_vr = None if vr is None else vr.decode("ascii")
            if tag == PIXEL_DATA:  # left in the file: only where it lies
                if file_size is None:
                    raise _Unsure
                out[key] = RawDataElement(key, text_vr, length, None, start, implicit, True, True, False)
                return out, start
            if end > limit:
                raise _Unsure  # runs past what was read, or past the end of the file
            out[key] = RawDataElement(key, text_vr, length, buf[start:end], start, implicit, True, True, False)
        elif end > limit:
            raise _Unsure
        pos = end
    if stop_group is not None:
        return out, pos
    raise _Unsure  # no PixelData: a header longer than what was read, or a truncated file


def _skip_undefined(buf: bytes, pos: int, limit: int, implicit: bool, depth: int = 0) -> int:
    """The position after a sequence (or other value) of undefined length starting at ``pos``;
    nested deeper than ``MAX_DEPTH`` (no real header is), it is left to pydicom."""
    if depth >= MAX_DEPTH:
        raise _Unsure
    while pos + 8 <= limit:
        group, elem, length = _implicit(buf, pos)  # item tags have no VR in any syntax
        tag = (group << 16) | elem
        pos += 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise _Unsure
        if length == UNDEFINED:
            pos = _skip_item(buf, pos, limit, implicit, depth)
        else:
            pos += length
    raise _Unsure


def _skip_item(buf: bytes, pos: int, limit: int, implicit: bool, depth: int) -> int:
    """The position after an item of undefined length whose first element is at ``pos``."""
    while pos + 8 <= limit:
        tag, _, length, start = _element(buf, pos, limit, implicit)
        if tag == ITEM_END:
            return start
        pos = _skip_undefined(buf, start, limit, implicit, depth + 1) if length == UNDEFINED else start + length
    raise _Unsure
