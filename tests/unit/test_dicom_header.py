"""Tests of medseg.dicom.header, the fast reader of classic image headers.

Every real file under ``../shared/data/dicom`` that the fast reader vouches for must give the same
``DicomFile`` (frames, pixel location, slim header) as pydicom; and every kind of file it must
leave to pydicom gives None. The synthetic files are written with pydicom in ``tmp_path``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import write_ct_slice
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from medseg.dicom.header import read_image_header
from medseg.dicom.scan import (
    DicomFile,
    _fast_file,
    _fast_tags,
    _pydicom_file,
    list_files,
)

SOURCES = ("dicom/dcm_qa_nih/In", "dicom/dcm_qa_ts/In", "dicom/dicom2nifti")
PIXELS = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 300)


def _assert_same(fast: DicomFile, slow: DicomFile) -> None:
    assert fast.kind == slow.kind == "image"
    assert fast.slim is None  # read on demand, not kept
    assert fast.frame_error == slow.frame_error == ""
    assert fast.pixels == slow.pixels
    assert (fast.series_uid, fast.series_number, fast.sop_uid) == (slow.series_uid, slow.series_number, slow.sop_uid)
    assert fast.series_uid and fast.sop_uid
    assert len(fast.frames) == len(slow.frames)
    for a, b in zip(fast.frames, slow.frames, strict=True):
        for name in ("path", "frame_index", "tile", "n_tiles", "spacing", "rows", "columns", "slope", "intercept",
                     "order", "echo", "sop_uid"):
            assert getattr(a, name) == getattr(b, name), name
        np.testing.assert_array_equal(a.position, b.position)
        np.testing.assert_array_equal(a.orientation, b.orientation)
    assert sorted(fast.header.keys()) == sorted(slow.header.keys())
    for tag in slow.header.keys():
        assert fast.header[tag].value == slow.header[tag].value, pydicom.datadict.keyword_for_tag(tag)
    assert fast.header.file_meta.TransferSyntaxUID == slow.header.file_meta.TransferSyntaxUID


def test_real_files_read_fast_equal_pydicom(shared_data: Path) -> None:
    paths = [p for rel in SOURCES for p in list_files(shared_data / rel)]
    fast_count = 0
    for path in paths:
        fast = _fast_file(path)
        if fast is None:
            continue
        slow = _pydicom_file(path)
        assert isinstance(slow, DicomFile), path
        _assert_same(fast, slow)
        fast_count += 1
    # The fast reader serves the classic images (the mosaics, enhanced multi-frame, big endian,
    # deflated files and the non-DICOM files are left to pydicom): 691 of the 771 files.
    assert fast_count >= 650, fast_count



def _slice(path: Path, edit: Callable[[Dataset], None] | None = None, **kwargs: object) -> Path:
    write_ct_slice(path, PIXELS, position=(1.5, -2.0, 7.25), series_uid="1.2.3.4", study_uid="1.2.3",
                   rescale=(2, -100), edit=edit, **kwargs)
    return path


def _check_fast_equals_pydicom(path: Path) -> DicomFile:
    fast = _fast_file(path)
    assert fast is not None
    slow = _pydicom_file(path)
    assert isinstance(slow, DicomFile)
    _assert_same(fast, slow)
    return fast


def test_explicit_vr_slice_gives_its_geometry_and_pixel_location(tmp_path: Path) -> None:
    fast = _check_fast_equals_pydicom(_slice(tmp_path / "a.dcm"))
    frame = fast.frames[0]
    assert frame.position.tolist() == [1.5, -2.0, 7.25]
    assert (frame.slope, frame.intercept) == (2.0, -100.0)
    assert fast.pixels is not None
    np.testing.assert_array_equal(fast.pixels.read(tmp_path / "a.dcm"), PIXELS)


def test_implicit_vr_slice_reads_the_same(tmp_path: Path) -> None:
    def implicit(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    fast = _check_fast_equals_pydicom(_slice(tmp_path / "a.dcm", implicit))
    assert fast.pixels is not None
    np.testing.assert_array_equal(fast.pixels.read(tmp_path / "a.dcm"), PIXELS)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian])
def test_sequences_of_undefined_length_are_skipped(tmp_path: Path, syntax: str) -> None:
    """A sequence of undefined length, its items of undefined length holding a nested one, before
    the wanted elements after it (the geometry): the walk skips it element by element."""

    def nested(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = syntax
        inner = Dataset()
        inner.ReferencedSOPInstanceUID = "1.2.3.4.5"
        inner.is_undefined_length_sequence_item = True
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedImageSequence = [inner]
        item["ReferencedImageSequence"].is_undefined_length = True
        item.is_undefined_length_sequence_item = True
        ds.ReferencedSeriesSequence = [item, Dataset()]
        ds["ReferencedSeriesSequence"].is_undefined_length = True
        ds.SeriesDescription = "after the sequence"

    fast = _check_fast_equals_pydicom(_slice(tmp_path / "a.dcm", nested))
    assert fast.header.SeriesDescription == "after the sequence"
    assert "ReferencedSeriesSequence" not in fast.header


def test_a_header_longer_than_the_first_read_is_read_whole(tmp_path: Path) -> None:
    """A 100 kB private value before the geometry: more than the first read (64 kB) holds."""

    def blob(ds: Dataset) -> None:
        ds.private_block(0x0009, "MEDSEG TEST", create=True).add_new(0x01, "OB", b"\x01" * 100_000)

    path = _slice(tmp_path / "a.dcm", blob)
    assert path.stat().st_size > 100_000
    fast = _check_fast_equals_pydicom(path)
    assert fast.frames[0].position.tolist() == [1.5, -2.0, 7.25]


def _edited(name: str) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        if name == "two frames":
            ds.NumberOfFrames = 2
            ds.PixelData = PIXELS.tobytes() * 2
        elif name == "mosaic":
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]
        elif name == "functional groups":
            ds.SharedFunctionalGroupsSequence = [Dataset()]
        elif name == "segmentation":
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
        elif name == "no series":
            del ds.SeriesInstanceUID
        elif name == "no pixel data":
            del ds.PixelData
        elif name == "compressed, a wanted sequence":
            ds.PerFrameFunctionalGroupsSequence = [Dataset()]
            ds.compress(RLELossless)
    return edit


@pytest.mark.parametrize("name", ["two frames", "mosaic", "functional groups", "segmentation",
                                  "no series", "no pixel data", "compressed, a wanted sequence"])
def test_files_it_does_not_vouch_for_are_left_to_pydicom(tmp_path: Path, name: str) -> None:
    path = _slice(tmp_path / "a.dcm", _edited(name))
    assert read_image_header(path, _fast_tags()) is None


def test_big_endian_is_left_to_pydicom(tmp_path: Path) -> None:
    path = _slice(tmp_path / "a.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
    assert pydicom.dcmread(path).Rows == 3
    assert read_image_header(path, _fast_tags()) is None


def test_compressed_slice_is_read_without_a_pixel_location(tmp_path: Path) -> None:
    def rle(ds: Dataset) -> None:
        ds.compress(RLELossless)

    fast = _check_fast_equals_pydicom(_slice(tmp_path / "a.dcm", rle))
    assert fast.pixels is None  # pydicom decodes it


@pytest.mark.parametrize("keep", [0, 100, 132, 140, 300, -200, -30])
def test_truncated_header_is_left_to_pydicom(tmp_path: Path, keep: int) -> None:
    """Cut in the preamble, the file meta, the data set or the pixel data: never a header from the
    fast reader for a file cut before its pixel data; one cut in the pixel data keeps its
    header (as pydicom's), and reading the pixels says the file ends early."""
    path = _slice(tmp_path / "a.dcm")
    data = path.read_bytes()
    pixel_start = len(data) - PIXELS.nbytes
    cut = keep if keep >= 0 else len(data) + keep
    path.write_bytes(data[:cut])
    raw = read_image_header(path, _fast_tags())
    if cut < pixel_start:
        assert raw is None
    else:
        fast = _fast_file(path)
        assert fast is not None and fast.pixels is not None
        with pytest.raises(ValueError, match="the file ends after"):
            fast.pixels.read(path)


def test_without_preamble_is_left_to_pydicom(tmp_path: Path) -> None:
    path = _slice(tmp_path / "a.dcm")
    path.write_bytes(path.read_bytes()[132:])
    assert read_image_header(path, _fast_tags()) is None


def test_a_value_it_cannot_decode_falls_back(tmp_path: Path) -> None:
    """A PixelSpacing that is no number: the fast path gives up, pydicom's path words the error."""

    path = _slice(tmp_path / "a.dcm")
    data = path.read_bytes()
    assert data.count(b"0.5\\0.7 ") == 1  # PixelSpacing, padded to an even length
    path.write_bytes(data.replace(b"0.5\\0.7 ", b"0.5\\abc "))
    assert read_image_header(path, _fast_tags()) is not None
    assert _fast_file(path) is None
    slow = _pydicom_file(path)
    assert isinstance(slow, DicomFile) and not slow.frames
    assert slow.frame_error.startswith(str(path)) and "expected numbers in the geometry tags" in slow.frame_error
    assert "abc" in slow.frame_error
