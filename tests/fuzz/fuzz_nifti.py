"""Fuzz NIfTI reading: ``medseg.io.load_nifti`` and ingest's reading and checking of one NIfTI case
(``medseg.stages.ingest.ingest_case``: the image, optionally the same file as its label too).

The first byte of an input says how the rest becomes a file: bit 0, named ``.nii.gz`` (else
``.nii``); bit 1, for ``.nii.gz``, gzip-packed here, so the mutations hit the NIfTI inside (else
written as it is, which fuzzes the gzip stream); bit 2, the file is also the case's label. Seeds:
small NIfTI-1 and NIfTI-2 images of several data types, shapes, scalings and qform/sform codes,
and one with the header of a real hippocampus case.

The rule: both calls return, or raise a ``MedsegError``; anything else is a crash.

    python tests/fuzz/fuzz_nifti.py [libFuzzer arguments]   (see tests/fuzz/_harness.py)
"""

from __future__ import annotations

import gzip
import os
import shutil
import sys

import _harness
import atheris
import numpy as np

with atheris.instrument_imports(include=_harness.instrumented("nibabel")):
    from medseg.config import IngestConfig
    from medseg.errors import MedsegError
    from medseg.io import load_nifti
    from medseg.sources import CaseSource
    from medseg.stages.ingest import ingest_case

NAME = "nifti"
WORK = _harness.scratch(NAME)
OUT = WORK / "out"
LABELS = {0: "background", 1: "left", 2: "right"}
CONFIG = IngestConfig()


def _nifti_bytes(data: np.ndarray, affine: np.ndarray | None = None, *, two: bool = False,
                 slope: float | None = None, codes: tuple[int, int] = (1, 1)) -> bytes:
    import nibabel as nib

    kind = nib.Nifti2Image if two else nib.Nifti1Image
    img = kind(data, np.eye(4) if affine is None else affine)
    if slope is not None:
        img.header.set_slope_inter(slope, 1.0)
    img.set_qform(img.affine, code=codes[0])
    img.set_sform(img.affine, code=codes[1])
    path = WORK / "seed.nii"
    nib.save(img, str(path))
    raw = path.read_bytes()
    path.unlink()
    return raw


def seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, size=(4, 5, 3)).astype(np.uint8)
    oblique = np.array([[0.0, -1.2, 0.3, 10.0], [0.9, 0.0, 0.0, -5.0], [0.0, 0.2, 2.5, 3.0], [0, 0, 0, 1]])
    images = {
        "uint8-label": (label, {}),
        "int16": (rng.integers(-1000, 1000, size=(4, 5, 3)).astype(np.int16), {"affine": oblique}),
        "float32": (rng.normal(size=(3, 4, 2)).astype(np.float32), {"codes": (0, 2)}),
        "float64-4d": (rng.normal(size=(3, 3, 2, 2)), {}),
        "uint16-scaled": (rng.integers(0, 500, size=(2, 3, 4)).astype(np.uint16), {"slope": 0.5}),
        "2d": (rng.normal(size=(5, 6)).astype(np.float32), {"codes": (0, 0)}),
        "nifti2": (label, {"two": True}),
    }
    out = {}
    for name, (data, kwargs) in images.items():
        raw = _nifti_bytes(data, **kwargs)
        out[f"{name}-nii"] = b"\x00" + raw
        out[f"{name}-gz"] = b"\x03" + raw
        out[f"{name}-label"] = b"\x04" + raw
    out["float32-rawgz"] = b"\x01" + gzip.compress(_nifti_bytes(images["float32"][0]), mtime=0)
    real = _harness.shared_dicom().parent / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"
    if real.is_file():  # a real header (its qform, sform, pixdim and description), the voxels cut
        import nibabel as nib

        img = nib.load(str(real))
        small = np.asanyarray(img.dataobj)[:4, :4, :3].astype(img.get_data_dtype())
        out["real-hippocampus"] = b"\x03" + nib.Nifti1Image(small, img.affine, img.header).to_bytes()
    return out


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0], data[1:]
    packed = mode & 1
    path = WORK / ("case.nii.gz" if packed else "case.nii")
    if packed and mode & 2:
        body = gzip.compress(body, compresslevel=1, mtime=0)
    for old in (WORK / "case.nii.gz", WORK / "case.nii"):
        if old != path and old.exists():
            old.unlink()
    path.write_bytes(body)
    try:
        load_nifti(path)
    except MedsegError:
        pass
    case = CaseSource("case", (path,), path if mode & 4 else None)
    try:
        ingest_case(case, OUT, LABELS, CONFIG)
    except MedsegError:
        pass
    if OUT.exists() and len(os.listdir(OUT)) > 0 and mode & 0x80:
        shutil.rmtree(OUT)  # now and then, so the outputs never pile up


def main() -> None:
    _harness.bound_memory()
    _harness.quiet()
    tokens = [b"n+1\x00", b"ni1\x00", b"n+2\x00\r\n\x1a\n", b"\x5c\x01\x00\x00", b"\x1c\x02\x00\x00",
              b"\x00\x00\xb0\x43", b"\x00\x00\x80\x3f", b"\x00\x00\x80\x7f", b"\x00\x00\xc0\x7f", b"\xff\x7f"]
    atheris.Setup(_harness.fuzz_args(sys.argv, NAME, seeds, tokens), test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
