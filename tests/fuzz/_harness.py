"""What the atheris harnesses of ``tests/fuzz`` share: memory bounds, the corpus folder and its seeds.

A harness is run as ``python tests/fuzz/fuzz_<target>.py [libFuzzer arguments]``. Without a corpus
folder among the arguments it uses ``$MEDSEG_FUZZ_DIR/<target>/corpus`` (default: the system's
temporary folder, ``medseg-fuzz``), writes its seeds there when it is empty, and writes crash
inputs beside it (``-artifact_prefix``). Given only files, libFuzzer runs them once each (to
reproduce a crash). Memory is bounded twice: libFuzzer's ``-rss_limit_mb`` (default 2048, an
``oom-*`` input) and an address-space limit (``RLIMIT_AS``, ``$MEDSEG_FUZZ_AS_MB``, default 4096),
the malloc limit: under it an allocation of a size a header declares raises ``MemoryError`` at
once, even where the pages would never be touched (atheris' libFuzzer has no malloc hooks, so
its ``-malloc_limit_mb`` does nothing in Python). A ``MemoryError`` is a crash like any exception
that is not a ``MedsegError``.

Environment: ``MEDSEG_FUZZ_DIR`` (corpus and crashes), ``MEDSEG_FUZZ_AS_MB`` (the address-space
bound) and ``MEDSEG_FUZZ_SHALLOW=1`` (coverage of medseg alone, see ``instrumented``).
"""

from __future__ import annotations

import os
import resource
import struct
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
FUZZ_DIR_ENV = "MEDSEG_FUZZ_DIR"
AS_LIMIT_ENV = "MEDSEG_FUZZ_AS_MB"
RSS_LIMIT_MB = 2048
AS_LIMIT_MB = 4096
REAL_DICOM = REPO.parent / "shared" / "data" / "dicom"  # as tests/conftest.py finds it ($MEDSEG_DATA/dicom)
MAX_LEN = 1 << 16  # the longest input libFuzzer makes (-max_len): a header, not a whole image
SHALLOW_ENV = "MEDSEG_FUZZ_SHALLOW"


def instrumented(*parsers: str) -> list[str]:
    """The packages whose code coverage guides the fuzzer: medseg, and the third-party ``parsers`` it
    calls (their branches lead mutations into the inputs they half accept). ``MEDSEG_FUZZ_SHALLOW=1``
    (the short run of the test suite) instruments medseg alone, which starts seconds sooner."""
    return ["medseg"] if os.environ.get(SHALLOW_ENV) == "1" else ["medseg", *parsers]


def shared_dicom() -> Path:
    data = os.environ.get("MEDSEG_DATA")
    return (Path(data) / "dicom") if data else REAL_DICOM


def bound_memory() -> None:
    """Limit the address space, so that a huge allocation raises MemoryError (a crash) in time."""
    limit = int(os.environ.get(AS_LIMIT_ENV, AS_LIMIT_MB)) << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def scratch(name: str) -> Path:
    """A folder for the files each input is written to (in memory where /dev/shm exists)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    return Path(tempfile.mkdtemp(prefix=f"medseg-fuzz-{name}-", dir=base))


def fuzz_args(
    argv: list[str], name: str, seeds: Callable[[], Mapping[str, bytes]], dictionary: Sequence[bytes] = ()
) -> list[str]:
    """``argv`` with the defaults added: a corpus folder (seeded when empty), artifact prefix, limits,
    and a libFuzzer dictionary of ``dictionary`` (tokens the mutations insert)."""
    args = list(argv)
    options = [a for a in args[1:] if a.startswith("-")]
    paths = [a for a in args[1:] if not a.startswith("-")]
    if not any(o.startswith("-rss_limit_mb=") for o in options):
        args.append(f"-rss_limit_mb={RSS_LIMIT_MB}")
    if not any(o.startswith("-max_len=") for o in options):
        args.append(f"-max_len={MAX_LEN}")
    if paths and all(Path(p).is_file() for p in paths):
        return args  # reproduce: run the given inputs once
    root = Path(os.environ.get(FUZZ_DIR_ENV, Path(tempfile.gettempdir()) / "medseg-fuzz")) / name
    corpus_dirs = [Path(p) for p in paths if not Path(p).is_file()]
    if not corpus_dirs:
        corpus_dirs = [root / "corpus"]
        args.append(str(corpus_dirs[0]))
    root.mkdir(parents=True, exist_ok=True)
    if not any(o.startswith("-artifact_prefix=") for o in options):
        args.append(f"-artifact_prefix={root}/")
    if dictionary and not any(o.startswith("-dict=") for o in options):
        (root / "tokens.dict").write_text("".join(f'"{_escape(t)}"\n' for t in dictionary))
        args.append(f"-dict={root / 'tokens.dict'}")
    first = corpus_dirs[0]
    first.mkdir(parents=True, exist_ok=True)
    if not any(first.iterdir()):
        for seed_name, data in seeds().items():
            (first / seed_name).write_bytes(data)
    return args


def _escape(token: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token)


def dicom_tokens() -> list[bytes]:
    """Tokens of the DICOM encoding: VRs, the tags geometry and pixels read, item tags, transfer syntaxes."""
    vrs = [v.encode() for v in ("OB", "OW", "SQ", "UN", "UT", "US", "UL", "SS", "DS", "IS", "CS", "UI", "LO", "FD")]
    tags = [(0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0100), (0x0028, 0x0101), (0x0028, 0x0103),
            (0x0028, 0x0002), (0x0028, 0x0008), (0x0028, 0x0030), (0x0020, 0x0032), (0x0020, 0x0037),
            (0x0020, 0x000E), (0x0008, 0x0008), (0x0008, 0x0016), (0x0028, 0x1052), (0x0028, 0x1053),
            (0x7FE0, 0x0010), (0x5200, 0x9229), (0x5200, 0x9230), (0x0002, 0x0010), (0x0018, 0x0050),
            (0x0020, 0x0013), (0x0018, 0x0086)]
    items = [(0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)]
    out = [b"DICM", b"\xff\xff\xff\xff", b"MOSAIC", b"\\", b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1",
           b"1.2.840.10008.1.2.2", b"1.2.840.10008.1.2.5", b"1.2.840.10008.1.2.4.70", b"1.2.840.10008.1.2.1.99",
           b"1.2.840.10008.5.1.4.1.1.66.4", b"1.2.840.10008.5.1.4.1.1.481.3", b"MONOCHROME2", b"RGB"]
    out += vrs + [struct.pack("<HH", g, e) for g, e in tags + items]
    return out


def shrink_pixels(raw: bytes, keep: int = 64) -> bytes:
    """A real DICOM file with its (top-level) pixel data cut to ``keep`` bytes, the rest of the
    header as it was: a small seed that keeps a vendor's header. Native pixel data gets a new
    length; encapsulated pixel data becomes an empty offset table and one fragment of ``keep`` bytes
    (taken from the start of the original's: not a decodable frame, which a header reader never needs)."""
    for tag, little in ((b"\xe0\x7f\x10\x00", True), (b"\x7f\xe0\x00\x10", False)):
        at = raw.rfind(tag)
        if at < 132:
            continue
        u32 = "<L" if little else ">L"
        explicit = raw[at + 4:at + 6] in (b"OB", b"OW", b"OV", b"UN")
        length_at = at + 8 if explicit else at + 4
        (length,) = struct.unpack_from(u32, raw, length_at)
        head = raw[:length_at]
        if length == 0xFFFFFFFF:
            item = struct.pack("<HHL", 0xFFFE, 0xE000, 0) + struct.pack("<HHL", 0xFFFE, 0xE000, keep)
            tail = item + raw[length_at + 4 + 16:length_at + 4 + 16 + keep].ljust(keep, b"\0")
            return head + struct.pack(u32, length) + tail + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        return head + struct.pack(u32, keep) + bytes(range(keep))
    return raw[:MAX_LEN]


def real_seeds(paths: list[str], keep: int = 64) -> dict[str, bytes]:
    """Seeds from small real files under the shared data (pixel data cut), those that exist."""
    root = shared_dicom()
    out = {}
    for rel in paths:
        path = root / rel
        if path.is_file():
            out["real-" + rel.replace("/", "_")] = shrink_pixels(path.read_bytes(), keep)
    return out


REAL_FILES = [
    "dcm_qa_ts/In/1.dcm",  # Siemens mosaic, explicit VR little endian
    "dcm_qa_ts/In/2.dcm",  # implicit VR
    "dcm_qa_ts/In/3.dcm",  # explicit VR big endian
    "dcm_qa_ts/In/4.dcm",  # RLE
    "dcm_qa_ts/In/5.dcm",  # JPEG lossless
    "dcm_qa_ts/In/7.dcm",  # JPEG-LS
    "dcm_qa_ts/In/9.dcm",  # JPEG 2000
    "dicom2nifti/anatomical/001_implicit/IM-0001-0112-0001.dcm",
    "dicom2nifti/ge/anatomical/001/IM-0001-0112-0001.dcm",
    "dicom2nifti/siemens/anatomical/001/IM-0001-0112-0001.dcm",
    "dicom2nifti/hitachi/anatomical/001/001.dcm",
    "dicom2nifti/philips_enhanced/anatomical/001/IM-0001-0170-0001.dcm",  # enhanced multi-frame
    "dicom2nifti/generic/rgb/001/IM-0001-0001-0001.dcm",
    "dcm_qa_nih/In/20180918GE/mr_0004/axial_epi_fmri_interleaved_i_to_s-00001.dcm",
]


def conftest_helpers() -> ModuleType:
    """The tests' conftest module (``write_ct_slice``, ``write_nifti``), imported from tests/."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import conftest

    return conftest


def quiet() -> None:
    """Silence the warnings and log records that damaged inputs cause by the thousand."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
