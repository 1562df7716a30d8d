"""Unit tests of medseg.io: atomic writes, JSON, hashes and NIfTI reading with clear errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import write_nifti
from medseg.errors import DataError
from medseg.io import (
    atomic_path,
    is_nifti,
    load_nifti,
    read_json,
    save_nifti,
    sha256,
    strip_nifti_suffix,
    write_json,
)


class Boom(RuntimeError):
    pass


# ---------------------------------------------------------------- atomic_path


def test_atomic_path_writes_the_target_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.nii.gz"  # the parent folder is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent
        assert tmp != target
        assert tmp.name.endswith(".nii.gz")  # same suffixes, so writers that look at them still work
        assert not target.exists()  # nothing at the target until the body succeeds
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.nii.gz"]


def test_atomic_path_leaves_nothing_when_the_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise Boom()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_content_when_the_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("new but unfinished")
            raise Boom()
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_gives_the_mode_of_a_plain_open(tmp_path: Path) -> None:
    """Results folders are shared by teams: outputs get 0666 less the umask, not mkstemp's 0600."""
    import os
    import subprocess
    import sys

    code = ("import os, sys; from pathlib import Path; os.umask(0o027); from medseg.io import atomic_path\n"
            "with atomic_path(Path(sys.argv[1])) as tmp: tmp.write_text('x')\n"
            "open(sys.argv[2], 'w').close()")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.json"), str(tmp_path / "b.json")], check=True)
    assert oct(os.stat(tmp_path / "a.json").st_mode & 0o777) == oct(os.stat(tmp_path / "b.json").st_mode & 0o777) == "0o640"


def test_atomic_path_without_suffix(tmp_path: Path) -> None:
    target = tmp_path / "Makefile"
    with atomic_path(target) as tmp:
        assert tmp.name.endswith(".tmp")
        tmp.write_text("all:\n")
    assert target.read_text() == "all:\n"
    assert list(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------- JSON


def test_json_round_trip_with_numpy_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "data.json"
    data = {
        "int": np.int64(7),
        "uint8": np.uint8(255),
        "float": np.float32(0.5),
        "double": np.float64(1.25),
        "array": np.arange(3, dtype=np.int16),
        "path": Path("/a/b.nii.gz"),
        "nested": [{"x": np.int32(-1)}, None, True, "s"],
    }
    write_json(path, data)
    assert read_json(path) == {
        "int": 7, "uint8": 255, "float": 0.5, "double": 1.25, "array": [0, 1, 2], "path": "/a/b.nii.gz",
        "nested": [{"x": -1}, None, True, "s"],
    }
    text = path.read_text()
    assert text.endswith("}\n")
    assert text.startswith('{\n  "int": 7,')  # 2-space indent, key order kept
    assert list(path.parent.iterdir()) == [path]


def test_write_json_refuses_unknown_types_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    with pytest.raises(TypeError, match="cannot write set as JSON"):
        write_json(path, {"x": {1, 2}})
    assert list(tmp_path.iterdir()) == []


def test_read_json_invalid_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"a": 1,')
    with pytest.raises(DataError, match="not valid JSON") as err:
        read_json(path)
    assert str(path) in str(err.value)


def test_read_json_missing_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(DataError, match="file not found") as err:
        read_json(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- NIfTI


def test_load_nifti_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(DataError) as err:
        load_nifti(path)
    assert str(path) in str(err.value)


def test_load_nifti_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.nii.gz"
    rng = np.random.default_rng(0)
    write_nifti(path, rng.normal(size=(16, 16, 16)).astype(np.float32))  # noise: barely compressible
    raw = path.read_bytes()
    assert len(raw) > 10_000
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cannot read") as err:
        load_nifti(path)
    assert str(path) in str(err.value)


def test_load_nifti_truncated_uncompressed_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.nii"
    write_nifti(path, np.ones((16, 16, 16), dtype=np.float32))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as err:
        load_nifti(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("text.nii.gz", b"this is not an image\n"),
        ("text.nii", b"this is not an image\n"),
        ("notes.txt", b"this is not an image\n"),
        ("empty.nii.gz", b""),
    ],
)
def test_load_nifti_non_image(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_nifti(path)
    assert str(path) in str(err.value)


def test_load_nifti_reads_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.nii.gz"
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    affine = np.diag([0.5, 2.0, 3.0, 1.0])
    write_nifti(path, data, affine)
    img = load_nifti(path)
    assert isinstance(img, nib.Nifti1Image)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine)


@pytest.mark.parametrize(
    ("affine", "atol"),
    [
        # Values that float32 holds exactly (the NIfTI sform is float32) come back exactly.
        ([[-0.5, 0.0, 0.0, 12.5], [0.0, 0.0, 1.5, -30.25], [0.0, 0.75, 0.0, 7.0], [0.0, 0.0, 0.0, 1.0]], 0.0),
        # Others come back to float32 precision.
        ([[-0.8, 0.0, 0.0, 12.5], [0.0, 0.0, 1.5, -30.25], [0.0, 0.9, 0.0, 7.0], [0.0, 0.0, 0.0, 1.0]], 1e-6),
    ],
    ids=["float32-exact", "float32-rounded"],
)
def test_save_nifti_uint8_with_the_exact_affine(tmp_path: Path, affine: list, atol: float) -> None:
    path = tmp_path / "masks" / "case.nii.gz"
    data = np.zeros((5, 6, 7), dtype=np.uint8)
    data[1:3, 2:5, 3:6] = 2
    data[0, 0, 0] = 255
    affine = np.array(affine)
    save_nifti(path, data, affine)
    assert list(path.parent.iterdir()) == [path]
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.uint8
    loaded = np.asanyarray(img.dataobj)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, data)
    np.testing.assert_allclose(img.affine, affine, rtol=0, atol=atol)
    np.testing.assert_allclose(img.header.get_sform(), affine, rtol=0, atol=atol)
    np.testing.assert_allclose(img.header.get_qform(), affine, rtol=0, atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


def test_save_nifti_float_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "image.nii.gz"
    save_nifti(path, np.ones((2, 2, 2), dtype=np.uint8), np.eye(4))
    data = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 2, 2)
    save_nifti(path, data, np.eye(4))
    img = load_nifti(path)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)


# ---------------------------------------------------------------- small helpers


@pytest.mark.parametrize("with_isal", [True, False])
def test_save_nifti_gz_is_the_nii_gzipped_and_repeatable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_isal: bool
) -> None:
    """A .nii.gz holds exactly the bytes of the .nii, as a gzip stream without a name or a time
    (the same image gives the same file), whether ISA-L or the standard library compresses it."""
    import builtins
    import gzip

    if not with_isal:
        real_import = builtins.__import__

        def no_isal(name: str, *args: object, **kwargs: object) -> object:
            if name == "isal" or name.startswith("isal."):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_isal)
    data = (np.arange(30 * 20 * 10) % 700 - 200).astype(np.int16).reshape(30, 20, 10)
    affine = np.diag([0.5, 0.7, 2.5, 1.0])
    save_nifti(tmp_path / "a.nii", data, affine)
    save_nifti(tmp_path / "a.nii.gz", data, affine)
    save_nifti(tmp_path / "b.nii.gz", data, affine)
    packed = (tmp_path / "a.nii.gz").read_bytes()
    assert packed[:4] == b"\x1f\x8b\x08\x00"  # gzip, deflate, no flags (no file name)
    assert packed[4:8] == b"\x00\x00\x00\x00"  # modification time 0
    assert gzip.decompress(packed) == (tmp_path / "a.nii").read_bytes()
    assert packed == (tmp_path / "b.nii.gz").read_bytes()
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "a.nii.gz").dataobj), data)


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    content = bytes(range(256)) * 40 + b"tail"
    path.write_bytes(content)
    expected = hashlib.sha256(content).hexdigest()
    assert sha256(path) == expected
    assert sha256(path, chunk=100) == expected  # many blocks and a partial last one


def test_sha256_of_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert sha256(path) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a_0000.nii.gz", "a_0000"),
        ("b.nii", "b"),
        ("c.txt", "c.txt"),
        ("d.nii.gz.bak", "d.nii.gz.bak"),
        ("e.gz", "e.gz"),
    ],
)
def test_strip_nifti_suffix(name: str, expected: str) -> None:
    assert strip_nifti_suffix(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [("a.nii.gz", True), ("a.nii", True), ("._a.nii.gz", False), ("a.txt", False), ("a.gz", False)],
)
def test_is_nifti(name: str, expected: bool) -> None:
    assert is_nifti(Path("/x") / name) is expected


@pytest.mark.parametrize(("srow_x", "expected"), [
    ((np.inf, 0.0, 0.0, 0.0), "expected a finite voxel-to-world affine"),
    ((0.0, 0.0, 0.0, 0.0), "expected an invertible voxel-to-world affine"),
    ((3e38, 0.0, 0.0, 0.0), "expected voxel sizes up to"),
])
def test_load_nifti_refuses_a_header_affine_that_means_nothing(tmp_path: Path, srow_x: tuple, expected: str) -> None:
    """Found by fuzzing (tests/fuzz/fuzz_nifti.py): an sform with an infinite entry made numpy's SVD
    in nibabel's qform spin for minutes; now such headers are refused by name at once."""
    import struct

    path = tmp_path / "bad.nii"
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<4f", raw, 280, *srow_x)  # srow_x of the NIfTI-1 header (sform_code is 1)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=expected) as err:
        load_nifti(path)
    assert str(path) in str(err.value)


def test_load_nifti_keeps_a_nifti2_image_with_dims_beyond_nifti1(tmp_path: Path) -> None:
    """Found by fuzzing (tests/fuzz/fuzz_nifti.py): load_nifti put a NIfTI-2 image back as a NIfTI-1
    image; for a fuzzed header's dims (4718596, 0, 0) nibabel raised HeaderDataError. It keeps the
    file's own class now."""
    path = tmp_path / "long.nii.gz"
    nib.save(nib.Nifti2Image(np.arange(40000, dtype=np.int32).reshape(40000, 1, 1) % 7, np.eye(4)), str(path))
    img = load_nifti(path)
    assert isinstance(img, nib.Nifti2Image) and img.shape == (40000, 1, 1)
    assert int(np.asanyarray(img.dataobj)[39999, 0, 0]) == 39999 % 7


@pytest.mark.parametrize("dtype", [np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]), np.dtype(np.complex64)])
def test_load_nifti_refuses_voxels_that_are_not_intensities(tmp_path: Path, dtype: np.dtype) -> None:
    """Found by fuzzing (tests/fuzz/fuzz_nifti.py): an RGB NIfTI with a scale factor made nibabel's
    scaling raise UFuncTypeError; RGB and complex voxels are refused by name before reading."""
    path = tmp_path / "colour.nii"
    img = nib.Nifti1Image(np.zeros((3, 3, 3), dtype=dtype), np.eye(4))
    img.header.set_slope_inter(2.0, 0.0)
    nib.save(img, str(path))
    with pytest.raises(DataError, match=r"colour\.nii: expected scalar voxels \(integers or floats\), found"):
        load_nifti(path)
