"""Regression tests of the crashes the atheris harnesses (``tests/fuzz``) found, each input built here.

A crash is any exception other than a ``MedsegError`` (or an allocation of the size a damaged
header declares); each test asserts the clear medseg error that replaced it, and its message.
"""

from __future__ import annotations

import struct
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_ct_slice
from pydicom.dataset import Dataset
from pydicom.uid import EnhancedCTImageStorage, generate_uid

from medseg.config import IngestConfig
from medseg.dicom import read_series
from medseg.dicom.header import read_image_header
from medseg.dicom.scan import _fast_tags, scan
from medseg.errors import DataError, DicomSeriesError
from medseg.io import load_nifti
from medseg.sources import CaseSource
from medseg.stages.ingest import ingest_case

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*", "ignore::RuntimeWarning")

PIXELS = np.arange(12, dtype=np.uint16).reshape(3, 4)


def _slice(path: Path, z: float | str = 0.0, **kwargs) -> Path:
    kwargs.setdefault("series_uid", "1.2.826.0.1.3680043.8.498.1")
    write_ct_slice(path, kwargs.pop("pixels", PIXELS), position=(0.0, 0.0, z), study_uid="1.2.826.0.1.3680043.8.498.2",
                   **kwargs)
    return path


def _refusal(folder: Path) -> str:
    with pytest.raises(DicomSeriesError) as info:
        read_series(folder)
    return str(info.value)


# ---------------------------------------------------------------- the fast header reader


def test_deeply_nested_sequences_are_left_to_pydicom_and_refused(tmp_path: Path) -> None:
    """Sequences of undefined length nested 3000 deep (a 108 kB header): the fast reader's skipping
    recursed once per level, RecursionError. It now leaves them to pydicom, whose refusal names the file."""
    path = _slice(tmp_path / "deep.dcm")
    raw = path.read_bytes()
    pos = 132
    while struct.unpack_from("<H", raw, pos)[0] == 0x0002:  # past the file meta (explicit VR)
        long = raw[pos + 4:pos + 6] in (b"OB", b"UN", b"SQ", b"UT")
        pos += 12 + struct.unpack_from("<L", raw, pos + 8)[0] if long else 8 + struct.unpack_from("<H", raw, pos + 6)[0]
    depth = 3000
    sequence = struct.pack("<HH2sHL", 0x0008, 0x1111, b"SQ", 0, 0xFFFFFFFF)  # ReferencedPerformedProcedureStepSequence
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ends = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    path.write_bytes(raw[:pos] + (sequence + item) * depth + ends * depth + raw[pos:])
    assert read_image_header(path, _fast_tags()) is None
    message = _refusal(tmp_path)
    assert str(path) in message and "unreadable DICOM header" in message


# ---------------------------------------------------------------- frames of multi-frame objects


def _enhanced(n_frames: int):
    def edit(ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            del ds[keyword]
        ds.NumberOfFrames = n_frames
        shared = Dataset()
        shared.PlaneOrientationSequence = [Dataset()]
        shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        shared.PixelMeasuresSequence = [Dataset()]
        shared.PixelMeasuresSequence[0].PixelSpacing = [0.5, 0.5]
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.PerFrameFunctionalGroupsSequence = []
        for k in range(n_frames):
            item = Dataset()
            item.PlanePositionSequence = [Dataset()]
            item.PlanePositionSequence[0].ImagePositionPatient = [0, 0, 2.5 * k]
            ds.PerFrameFunctionalGroupsSequence.append(item)
        ds.PixelData = bytes(n_frames * PIXELS.nbytes)

    return edit


def _with_per_frame_length(path: Path, change) -> int:
    """Rewrite the length of the file's Per-frame Functional Groups Sequence (explicit VR, defined length)."""
    raw = path.read_bytes()
    at = raw.index(struct.pack("<HH", 0x5200, 0x9230) + b"SQ\0\0")
    (length,) = struct.unpack_from("<L", raw, at + 8)
    path.write_bytes(raw[:at + 8] + struct.pack("<L", change(length)) + raw[at + 12:])
    return at + 12


# 400 frames: a sequence over 16 kB, which the scan defers (reads only when the frames are made)
N_FRAMES = 400


def test_a_per_frame_sequence_longer_than_the_file_is_refused_unread(tmp_path: Path) -> None:
    """A deferred Per-frame Functional Groups Sequence whose length says 3.75 GiB: pydicom took the
    memory before reading (MemoryError under the fuzzer's 4 GiB address-space bound)."""
    path = _slice(tmp_path / "mf.dcm", edit=_enhanced(N_FRAMES))
    start = _with_per_frame_length(path, lambda _: 0xF0000000)
    tracemalloc.start()
    try:
        message = _refusal(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in message
    size = path.stat().st_size
    assert (f"expected PerFrameFunctionalGroupsSequence to end within the file ({size} bytes), its length says "
            f"{0xF0000000} bytes from byte {start}") in message
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB taken to refuse it"


@pytest.mark.parametrize("change", [lambda n: n + 2, lambda n: 4], ids=["two-bytes-too-long", "four-bytes"])
def test_a_damaged_per_frame_sequence_is_refused(tmp_path: Path, change) -> None:
    """A deferred sequence whose length ends inside an item: pydicom raised OSError ('No tag to read at
    file position ...') as the frames were made, which the scan let through."""
    path = _slice(tmp_path / "mf.dcm", edit=_enhanced(N_FRAMES))
    _with_per_frame_length(path, change)
    message = _refusal(tmp_path)
    assert str(path) in message
    assert f"expected readable functional groups in a multi-frame image ({N_FRAMES} frames), found a damaged " \
           "sequence (OSError: No tag to read at file position" in message


# ---------------------------------------------------------------- the series builder


def test_slice_positions_too_far_apart_for_a_finite_step_are_refused(tmp_path: Path) -> None:
    """Positions -1e308, 0, 1e308 (each finite): their differences overflow, and the volume came back
    with infinite and NaN entries in its affine."""
    files = [_slice(tmp_path / f"{k}.dcm", z, instance=k + 1) for k, z in enumerate(("-1e308", "0", "1e308"))]
    message = _refusal(tmp_path)
    assert f"in {tmp_path}: expected slice positions a finite step apart, found a step of [0.0, 0.0, inf] mm" in message
    assert str(files[0]) in message and str(files[2]) in message


def test_pixel_data_declared_larger_than_the_file_is_refused_without_taking_the_memory(tmp_path: Path) -> None:
    """Rows and Columns 32768 with a PixelData length of 2 GiB to match, in a file of 1 kB: numpy took
    the 2 GiB before finding the file short (a MemoryError under the fuzzer's address-space bound)."""
    path = _slice(tmp_path / "big.dcm")
    raw = bytearray(path.read_bytes())
    for tag in (struct.pack("<HH", 0x0028, 0x0010), struct.pack("<HH", 0x0028, 0x0011)):  # Rows, Columns (US)
        at = raw.index(tag + b"US")
        struct.pack_into("<H", raw, at + 8, 32768)
    at = raw.index(struct.pack("<HH", 0x7FE0, 0x0010) + b"OW")
    struct.pack_into("<L", raw, at + 8, 2 * 32768 * 32768)
    path.write_bytes(bytes(raw))
    assert [f.rows for g in scan(tmp_path).series for f in g.frames] == [32768]
    tracemalloc.start()
    try:
        message = _refusal(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{path}: cannot decode pixel data" in message
    assert "expected 2147483648 bytes of pixel data, the file ends after 24" in message
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB taken to refuse it"


# ---------------------------------------------------------------- NIfTI (fixes proposed for io.py and ingest_cases.py)


def _nifti(path: Path, *fields: tuple[int, str, tuple]) -> Path:
    """A valid 2 x 3 x 4 uint8 NIfTI-1 (identity sform) with header fields overwritten: (offset, format, values)."""
    img = nib.Nifti1Image(np.arange(1, 25, dtype=np.uint8).reshape(2, 3, 4), np.eye(4))
    img.set_sform(np.eye(4), code=1)
    raw = bytearray(img.to_bytes())
    for offset, fmt, values in fields:
        struct.pack_into(fmt, raw, offset, *values)
    path.write_bytes(bytes(raw))
    return path


DATATYPE, DIM, VOX_OFFSET, SROW_X, SROW_Y = 70, 40, 108, 280, 296


def _ingest(path: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest_case(CaseSource("case", (path,), None), tmp_path / "out", {0: "background", 1: "one"}, IngestConfig())


def test_an_unknown_nifti_data_type_code_is_a_data_error(tmp_path: Path) -> None:
    """datatype 16384: nibabel's HeaderDataError ('data code 16384 not recognized') left load_nifti."""
    path = _nifti(tmp_path / "case.nii", (DATATYPE, "<h", (16384,)))
    with pytest.raises(DataError, match=r"case\.nii.*16384"):
        load_nifti(path)


def test_a_nifti_data_offset_beyond_any_file_is_a_data_error(tmp_path: Path) -> None:
    """vox_offset 1e28: nibabel's header shows the fixed offset (0) that check_declared_size reads, the
    voxel reader uses the stored one, and numpy.memmap raised OverflowError."""
    path = _nifti(tmp_path / "case.nii", (VOX_OFFSET, "<f", (1e28,)))
    with pytest.raises(DataError, match=r"case\.nii"):
        load_nifti(path)


@pytest.mark.parametrize("row", [
    pytest.param((0.0, 0.0, 0.0, 0.0), id="singular"),
    pytest.param((1.0, 0.0, -1.7e38, 0.0), id="sheared-1e38"),
])
def test_a_nifti_without_a_usable_affine_is_refused_by_ingest(tmp_path: Path, row: tuple) -> None:
    """An sform with a zero row (singular) or a shear of 1.7e38: ingest accepted it, then nibabel's
    HeaderDataError ('Could not decompose affine') or aff2axcodes' None (TypeError in ''.join) left it."""
    path = _nifti(tmp_path / "case.nii", (SROW_Y if row[0] == 0 else SROW_X, "<4f", row))
    with pytest.raises(DataError, match=r"case\.nii.*affine"):
        _ingest(path, tmp_path)


def test_a_nifti_with_no_voxels_is_refused_by_ingest(tmp_path: Path) -> None:
    """dim (3, 0, 3, 4): ingest accepted an empty image, then the intensity percentiles raised IndexError."""
    path = _nifti(tmp_path / "case.nii", (DIM, "<8h", (3, 0, 3, 4, 1, 1, 1, 1)))
    with pytest.raises(DataError, match=r"case\.nii.*\(0, 3, 4\)"):
        _ingest(path, tmp_path)


def test_columns_that_hold_a_damaged_sequence_are_refused_by_name(tmp_path: Path) -> None:
    """Found by fuzzing the header reader: a Columns element whose VR was turned into SQ, so that its
    value is a sequence. Printing that value in the refusal made pydicom parse it, and on the fuzz
    input (where the sequence's items run out) raise OSError or struct.error from inside the message.
    The refusal now names the value's type and never parses it. The slice here is made the same way:
    a real slice whose Columns element says SQ."""
    path = tmp_path / "IM0.dcm"
    write_ct_slice(path, np.zeros((256, 4), np.uint16), position=(0.0, 0.0, 0.0), series_uid=generate_uid(),
                   study_uid=generate_uid())
    raw = path.read_bytes()
    columns = b"\x28\x00\x11\x00US\x02\x00"  # (0028,0011) US, 2 bytes, explicit VR little endian
    assert raw.count(columns) == 1
    path.write_bytes(raw.replace(columns, b"\x28\x00\x11\x00SQ\x02\x00"))
    found = scan(tmp_path)
    assert not found.series
    ((refused, reason),) = found.refused
    assert refused == str(path) and f"{path}: expected positive Rows and Columns, found 256 x Sequence" in reason


def test_an_image_type_of_another_vr_is_read_as_one_value(tmp_path: Path) -> None:
    """Found by fuzzing the series builder: ImageType stored with the VR DS (one number) made the
    grouping key's reader iterate a float (TypeError). One such value is an image type like any other."""
    study, series = generate_uid(), generate_uid()
    for k in range(3):
        write_ct_slice(tmp_path / f"IM{k}.dcm", np.full((3, 4), k, np.uint16), position=(0.0, 0.0, 2.0 * k),
                       series_uid=series, study_uid=study, instance=k + 1,
                       edit=lambda ds: ds.add_new(0x00080008, "DS", "1.5"))
    found = scan(tmp_path)
    (group,) = found.series
    assert len(group.frames) == 3 and not found.refused
    assert read_series(tmp_path, workers=1).data.shape == (4, 3, 3)


def test_a_series_number_of_a_wrong_length_names_no_number(tmp_path: Path) -> None:
    """Found by fuzzing the series builder: SeriesNumber '7 ' stored with the VR UL (2 bytes, not 4).
    pydicom raised BytesLengthException where the grouping sorted the series by number; a damaged
    header value now counts as missing (``SeriesGroup.value``)."""
    study, series = generate_uid(), generate_uid()
    needle = struct.pack("<HH", 0x0020, 0x0011) + b"IS"
    for k in range(3):
        path = tmp_path / f"IM{k}.dcm"
        write_ct_slice(path, np.full((3, 4), k, np.uint16), position=(0.0, 0.0, 2.0 * k), series_uid=series,
                       study_uid=study, instance=k + 1, series_number=7)
        raw = path.read_bytes()
        assert raw.count(needle) == 1
        path.write_bytes(raw.replace(needle, needle[:4] + b"UL"))
    (group,) = scan(tmp_path).series
    assert group.case_id.startswith("ct000_") and group.name.startswith("series ? in ")
    assert read_series(tmp_path, workers=1).data.shape == (4, 3, 3)
