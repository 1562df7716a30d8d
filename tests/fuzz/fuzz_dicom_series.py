"""Fuzz the series builder: ``medseg.dicom.read_series`` (scan, frames, ``build_volume``: geometry checks,
pixel reading, rescaling) over a folder of three CT slices, one of which the fuzzer changes.

The first byte of an input picks how:

- even: the rest is the bytes of the middle slice (seeds: the valid slice, explicit and implicit VR);
- odd: the rest drives a structured edit of valid slices (``FuzzedDataProvider``): positions,
  orientation, spacing, size, rescale values, pixel module and pixel data length of the middle
  slice, positions of the last one, ``resample_tilt`` and ``min_slices``; written by pydicom.

The rule: ``read_series`` returns a ``SeriesVolume`` whose affine is finite and invertible and whose
data has the affine's three axes, or raises a ``MedsegError``. Anything else is a crash.

    python tests/fuzz/fuzz_dicom_series.py [libFuzzer arguments]   (see tests/fuzz/_harness.py)
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import _harness
import atheris
import numpy as np

with atheris.instrument_imports(include=_harness.instrumented("pydicom")):
    from medseg.dicom import read_series
    from medseg.errors import MedsegError

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import ImplicitVRLittleEndian

NAME = "dicom_series"
WORK = _harness.scratch(NAME)
FOLDER = WORK / "series"
ROWS, COLS = 3, 4
STEP = 2.5
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ORIENTATIONS = [
    AXIAL,
    (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),  # sagittal
    (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),  # coronal
    (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # flipped axial
    (0.8660254, 0.5, 0.0, -0.5, 0.8660254, 0.0),  # oblique
]
# Fixed, so that a middle slice from the corpus of an earlier run belongs to this run's series.
SERIES_UID, STUDY_UID, FRAME_UID = (f"1.2.826.0.1.3680043.8.498.7741.{k}" for k in (1, 2, 3))


def _pixels(k: int, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    return (100 * k + 10 * np.arange(rows)[:, None] + np.arange(cols)[None, :]).astype(np.uint16)


def _write(k: int, *, edit: Callable[[Dataset], None] | None = None) -> None:
    """Write slice ``k`` of the valid series (2.5 mm apart, rescaled), ``edit`` applied before it is saved."""
    _harness.conftest_helpers().write_ct_slice(
        FOLDER / f"IM{k}.dcm", _pixels(k), position=(-20.0, 30.0, 10.0 + STEP * k), series_uid=SERIES_UID,
        study_uid=STUDY_UID, frame_uid=FRAME_UID, instance=k + 1, series_number=7, rescale=(2, -100), edit=edit,
    )


def _valid_folder() -> None:
    FOLDER.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        _write(k)


def seeds() -> dict[str, bytes]:
    """The valid middle slice (explicit and implicit VR, mode 0) and structured edits (mode 1)."""
    def implicit(ds: Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    out = {"bytes-explicit": b"\0" + (FOLDER / "IM1.dcm").read_bytes()}
    _write(1, edit=implicit)
    out["bytes-implicit"] = b"\0" + (FOLDER / "IM1.dcm").read_bytes()
    _write(1)
    rng = np.random.default_rng(0)
    for i in range(8):
        out[f"structured-{i}"] = b"\1" + rng.integers(0, 256, size=64, dtype=np.uint8).tobytes()
    out["structured-zero"] = b"\1" + bytes(64)
    return out


def _float(fdp: atheris.FuzzedDataProvider, usual: float) -> float:
    """``usual``, near it, or any double (inf and NaN included)."""
    choice = fdp.ConsumeIntInRange(0, 3)
    if choice == 0:
        return usual
    if choice == 1:
        return usual + fdp.ConsumeIntInRange(-1000, 1000) / 100.0
    if choice == 2:
        return usual * fdp.ConsumeIntInRange(-3, 3)
    return fdp.ConsumeFloat()


def _text(value: float) -> str:
    return f"{value:.10g}"[:16]


def _raw(ds: Dataset, keyword: str, values: list) -> None:
    """Set ``keyword`` to the text of ``values`` as it is (pydicom would refuse to convert some)."""
    tag = BaseTag(pydicom.datadict.tag_for_keyword(keyword))
    text = "\\".join(v if isinstance(v, str) else _text(v) for v in values).encode("ascii", "replace")
    text += b" " * (len(text) % 2)
    ds[tag] = RawDataElement(tag, pydicom.datadict.dictionary_VR(tag), len(text), text, 0, False, True)


def _structured(fdp: atheris.FuzzedDataProvider) -> dict:
    """Write the middle and last slices from fuzzed values; the keyword arguments of ``read_series``."""
    orientation = list(fdp.PickValueInList(ORIENTATIONS))
    if fdp.ConsumeBool():
        orientation[fdp.ConsumeIntInRange(0, 5)] = _float(fdp, 0.0)
    normal = np.cross(orientation[:3], orientation[3:])
    base = np.array([-20.0, 30.0, 10.0])
    position = [_float(fdp, v) for v in base + normal * STEP]
    last = [_float(fdp, v) for v in base + normal * 2 * STEP]
    spacing = [_float(fdp, 0.5), _float(fdp, 0.7)]
    rows, cols = fdp.ConsumeIntInRange(0, 6), fdp.ConsumeIntInRange(0, 6)
    n_pixels = rows * cols if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 40)
    bits = fdp.PickValueInList([16, 16, 8, 32, 1, 12, 0])
    stored = fdp.PickValueInList([bits, 12, 0, 17, 33])
    representation = fdp.PickValueInList([0, 1, 2])
    samples = fdp.PickValueInList([1, 1, 3, 0])
    rescale = fdp.PickValueInList(["plain", "float", "text", "none"])
    slope, intercept = _float(fdp, 2.0), _float(fdp, -100.0)
    frames = fdp.PickValueInList([None, "1", "2", "0", "x"])
    thickness = _float(fdp, STEP)
    raw_pixels = fdp.ConsumeBytes(n_pixels * max(bits, 8) // 8)

    def edit_middle(ds: Dataset) -> None:
        _raw(ds, "ImageOrientationPatient", orientation)
        _raw(ds, "ImagePositionPatient", position)
        _raw(ds, "PixelSpacing", spacing)
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, stored, max(stored - 1, 0)
        ds.PixelRepresentation, ds.SamplesPerPixel = representation, samples
        if samples == 3:
            ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
        _raw(ds, "SliceThickness", [thickness])
        if rescale == "none":
            del ds.RescaleSlope, ds.RescaleIntercept
        elif rescale == "float":
            _raw(ds, "RescaleSlope", [slope])
            _raw(ds, "RescaleIntercept", [intercept])
        elif rescale == "text":
            _raw(ds, "RescaleSlope", ["x1"])
            _raw(ds, "RescaleIntercept", ["-"])
        if frames is not None:
            _raw(ds, "NumberOfFrames", [frames])
        ds.PixelData = raw_pixels + (b"\0" if len(raw_pixels) % 2 else b"")

    def edit_last(ds: Dataset) -> None:
        _raw(ds, "ImageOrientationPatient", orientation)
        _raw(ds, "ImagePositionPatient", last)

    _write(1, edit=edit_middle)
    _write(2, edit=edit_last)
    return {"resample_tilt": fdp.ConsumeBool(), "min_slices": fdp.ConsumeIntInRange(1, 4)}


_LAST_EDITED = False  # whether the last slice holds a structured input's positions


def test_one_input(data: bytes) -> None:
    if not data:
        return
    global _LAST_EDITED
    options: dict = {}
    if data[0] % 2 == 0:
        (FOLDER / "IM1.dcm").write_bytes(data[1:])
        if _LAST_EDITED:  # a structured input changed the last slice: make it valid again
            _write(2)
            _LAST_EDITED = False
    else:
        options = _structured(atheris.FuzzedDataProvider(data[1:]))
        _LAST_EDITED = True
    try:
        volume = read_series(FOLDER, workers=1, **options)
    except MedsegError:
        return
    affine = volume.affine
    if not (np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 0):
        raise AssertionError(f"read_series returned a volume with an unusable affine {affine.tolist()}")
    if volume.data.ndim < 3 or volume.data.shape[2] != len(volume.slice_files):
        raise AssertionError(f"read_series returned data of shape {volume.data.shape} for {len(volume.slice_files)} slices")


def main() -> None:
    _harness.bound_memory()
    _harness.quiet()
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    _valid_folder()
    atheris.Setup(_harness.fuzz_args(sys.argv, NAME, seeds, _harness.dicom_tokens()), test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
