"""Fuzz the fast DICOM header reader (``medseg.dicom.header.read_image_header``) and the scan's reading
of one file (``medseg.dicom.scan._read_file``: the fast reader, then pydicom, then the frames).

Each input is the bytes of one file. The rule: ``read_image_header`` returns a ``RawHeader`` or None
and raises nothing; a ``RawHeader``'s ``get`` gives a value or the ``ValueError`` its contract names
(the caller then reads the file with pydicom); ``_read_file`` returns a ``DicomFile`` or (path, why)
and raises at most a ``MedsegError``. Any other exception is a crash.

    python tests/fuzz/fuzz_dicom_header.py [libFuzzer arguments]   (see tests/fuzz/_harness.py)
"""

from __future__ import annotations

import sys

import _harness
import atheris
import numpy as np

with atheris.instrument_imports(include=_harness.instrumented("pydicom")):
    from medseg.dicom.header import read_image_header
    from medseg.dicom.scan import (
        PIXEL_KEYWORDS,
        USED_KEYWORDS,
        _fast_tags,
        _read_file,
        _slim_tags,
    )
    from medseg.errors import MedsegError

NAME = "dicom_header"
WORK = _harness.scratch(NAME)
PATH = WORK / "slice.dcm"
KEYWORDS = tuple(dict.fromkeys((*USED_KEYWORDS, *PIXEL_KEYWORDS, "SeriesInstanceUID", "SOPClassUID")))


def seeds() -> dict[str, bytes]:
    """Synthetic classic slices (explicit and implicit VR, rescaled, a sequence before the pixels),
    and small real files of many vendors and transfer syntaxes (pixel data cut)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ImplicitVRLittleEndian, generate_uid

    conftest = _harness.conftest_helpers()
    out = {}
    pixels = (np.arange(12, dtype=np.uint16) * 7).reshape(3, 4)

    def implicit(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    def with_sequence(ds: Dataset) -> None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator = "T-A0100", "SRT"
        ds.AnatomicRegionSequence = Sequence([item])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness, ds.SpacingBetweenSlices = 2.5, 2.5
        ds.add_new(0x00291010, "OB", b"\x01\x02" * 40)  # a private value

    edits = {"explicit": None, "implicit": implicit, "sequence": with_sequence}
    for name, edit in edits.items():
        path = WORK / f"seed-{name}.dcm"
        conftest.write_ct_slice(path, pixels, position=(-20.0, 30.0, 10.0), series_uid=generate_uid(),
                                study_uid=generate_uid(), frame_uid=generate_uid(), series_number=3,
                                rescale=(2, -100), edit=edit)
        out[f"synthetic-{name}"] = path.read_bytes()
        path.unlink()
    out.update(_harness.real_seeds(_harness.REAL_FILES))
    return out


def test_one_input(data: bytes) -> None:
    PATH.write_bytes(data)
    raw = read_image_header(PATH, _fast_tags())
    if raw is not None:
        for keyword in KEYWORDS:
            try:
                raw.get(keyword)
            except ValueError:  # its contract: not a value it decodes; the scan reads the file with pydicom
                pass
        raw.dataset(_slim_tags())
    try:
        _read_file(PATH)
    except MedsegError:
        pass


def main() -> None:
    _harness.bound_memory()
    _harness.quiet()
    atheris.Setup(_harness.fuzz_args(sys.argv, NAME, seeds, _harness.dicom_tokens()), test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
