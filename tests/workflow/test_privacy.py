"""No patient identifier from DICOM headers reaches any output of a workflow run, but the DICOM-SEGs.

The run (``identified_dicom``: four synthetic MR series whose headers carry distinctive names, IDs,
accession numbers, institutions, physicians and dates, ingested, planned, preprocessed, trained,
predicted as NIfTI and DICOM-SEG, evaluated and reviewed; the Snakemake driver killed once and the
run resumed) is searched file by file under its working folder: the bytes of every file and what
they hold packed (gzip: NIfTI and its header extensions; zip: .npz arrays, torch checkpoints; PNG
chunks; every cell of every table of MLflow's SQLite store: params, tags, metric names, run names,
registered models and their descriptions; MLflow's artifacts), the logs and Snakemake's own logs and
metadata, what Snakemake printed, and the file names. Each value is looked for as written,
case-insensitively, a person name also with spaces and by its parts, a date also in ISO and other
common forms; and the series' Study, Series, SOP Instance and Frame of Reference UIDs, which tie a
file to the patient's record in an archive.

Excluded by design: a DICOM-SEG written for a scan (``predictions/<fold>/<case>_seg.dcm``) must carry
the Patient and General Study modules of its source series (PS3.3 A.51: a SEG belongs to the
patient and study of the images it segments; ``medseg.dicom.segwrite`` copies them, and
``tests/unit/test_dicom_segwrite.py`` checks it); ``test_the_dicom_segs_carry_their_patient_and_study``
checks that they do, which also shows the search finds what is there.
"""

from __future__ import annotations

import io
import sqlite3
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from identified_dicom import (
    N_PATIENTS,
    KilledRun,
    identifiers,
    identity,
    killed_and_resumed,
    source_uids,
)

SEG_REASON = "a DICOM-SEG carries its source's Patient and General Study modules by the DICOM standard (PS3.3 A.51)"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, venv_bin: Path) -> KilledRun:
    run = killed_and_resumed(tmp_path_factory, venv_bin)
    assert run.rerun is not None and run.rerun.returncode == 0, run.rerun.stderr[-3000:] if run.rerun else ""
    return run


def _is_seg(path: Path) -> bool:
    return path.name.endswith("_seg.dcm") and path.parent.parent.name == "predictions"


def _sqlite_cells(path: Path) -> bytes:
    """Every cell of every table, as text (names and values), one per line."""
    lines = []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type = 'table'")]
        for table in tables:
            cursor = db.execute(f'select * from "{table}"')  # the table names are the store's own
            columns = [c[0] for c in cursor.description]
            lines.append(f"{table}: {' '.join(columns)}")
            for row in cursor:
                lines.extend(f"{table}.{c}={v.decode('latin-1') if isinstance(v, bytes) else v}" for c, v in zip(columns, row))
    return "\n".join(lines).encode()


def _png_chunks(data: bytes) -> Iterator[bytes]:
    """The text chunks of a PNG and its pixel data, unpacked."""
    at, pixels = 8, b""
    while at + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[at : at + 4]), data[at + 4 : at + 8]
        body = data[at + 8 : at + 8 + length]
        if kind == b"IDAT":
            pixels += body
        elif kind in (b"zTXt", b"iTXt") and b"\0" in body:
            key, _, rest = body.partition(b"\0")
            yield key
            try:
                yield zlib.decompress(rest[1:] if kind == b"zTXt" else rest.split(b"\0", 2)[-1])
            except zlib.error:
                yield rest
        at += 12 + length
    if pixels:
        yield zlib.decompress(pixels)


def unpacked(where: str, data: bytes, depth: int = 0) -> Iterator[tuple[str, bytes]]:
    """``data`` and, recursively, what it holds packed: gzip, zip members, PNG chunks."""
    yield where, data
    if depth > 4:
        return
    if data[:2] == b"\x1f\x8b":
        import gzip

        yield from unpacked(f"{where} (gunzipped)", gzip.decompress(data), depth + 1)
    elif data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for name in archive.namelist():
                yield from unpacked(f"{where}:{name}", archive.read(name), depth + 1)
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        for k, chunk in enumerate(_png_chunks(data)):
            yield f"{where} (PNG chunk {k})", chunk


def contents(path: Path) -> Iterator[tuple[str, bytes]]:
    data = path.read_bytes()
    yield from unpacked(str(path), data)
    if data[:16] == b"SQLite format 3\0":
        yield f"{path} (every cell)", _sqlite_cells(path)


def find(values: dict[str, str], blobs: Iterator[tuple[str, bytes]]) -> list[str]:
    """'<where>: <attribute> <value>' for each value found (case-insensitive)."""
    wanted = {v.lower().encode(): (k, v) for v, k in values.items()}
    found = []
    for where, blob in blobs:
        low = blob.lower()
        found += [f"{where}: {k} {v!r}" for needle, (k, v) in wanted.items() if needle in low]
    return found


def test_no_identifier_in_any_output_log_or_store(run: KilledRun) -> None:
    files = [p for p in sorted(run.work.rglob("*")) if p.is_file()]
    excluded = [p for p in files if _is_seg(p)]
    assert len(excluded) == 2, excluded  # fold 0's two validation cases: excluded, see the module doc
    scanned = [p for p in files if not _is_seg(p)]
    names = {p.name for p in scanned}
    for kind in (".nii.gz", ".json", ".csv", ".log", ".npz", ".pt", ".db", ".png", ".html", ".pkl", "MLmodel"):
        assert any(n.endswith(kind) for n in names), kind  # every kind of output is searched
    assert any(".snakemake" in p.parts for p in scanned)
    printed = [(f"what Snakemake printed ({name})", text.encode()) for name, proc in
               (("the refused same command", run.same_command), ("the rerun", run.rerun)) if proc is not None
               for text in (proc.stdout, proc.stderr)]
    printed.append(("what the killed Snakemake driver printed", run.first_log.read_bytes()))
    names_of = [(f"the file name {p.relative_to(run.work)}", str(p.relative_to(run.work)).encode()) for p in files]
    wanted = identifiers() | source_uids(run.root)
    blobs = [*printed, *names_of, *(item for p in scanned for item in contents(p))]
    leaks = find(wanted, iter(blobs))
    print(f"searched {len(scanned)} files ({sum(len(b) for _, b in blobs) / 2**20:.1f} MiB with what they hold "
          f"packed) for {len(wanted)} identifiers; left out {len(excluded)} DICOM-SEGs: {SEG_REASON}")
    assert leaks == [], f"{len(leaks)} identifiers found outside the DICOM-SEGs:\n" + "\n".join(leaks[:40])


def test_the_dicom_segs_carry_their_patient_and_study(run: KilledRun) -> None:
    """The one place identifiers belong: each SEG has its source's patient and study attributes."""
    segs = sorted(run.results.glob("predictions/*/*_seg.dcm"))
    assert segs
    patients = {identity(i)["PatientID"]: identity(i) for i in range(N_PATIENTS)}
    for path in segs:
        seg = pydicom.dcmread(path)
        source = patients[str(seg.PatientID)]
        for keyword in ("PatientName", "PatientBirthDate", "AccessionNumber", "StudyID", "StudyDate",
                        "ReferringPhysicianName"):
            assert str(seg.get(keyword)) == source[keyword], (path, keyword)
        assert find({source["PatientName"]: "PatientName"}, contents(path))  # the search sees it
