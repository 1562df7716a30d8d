"""The verdicts and corrections reviewers record on masks: ``review.sqlite`` of a review folder.

A verdict is ``accept`` (use the mask as it is), ``fix`` (the mask needs corrections) or
``reject`` (unusable), with an optional note and the reviewer's name. A ``fix`` may carry a
corrected mask (``correction``: its path in the review folder, under ``corrections/``), with the
SHA-256 of the mask the correction started from (``base_sha256``: the predicted mask or an
earlier correction) and of the corrected mask itself.

The store keeps every verdict ever recorded, oldest first; a case's verdict is its last one.
Each holds the SHA-256 of the predicted mask it judged (``mask_sha256``), so a verdict on a mask
that has since been replaced (a new model, a new run) is known to be outdated, and the case goes
back to the queue.

SQLite, in the review folder: each verdict is one transaction, so two reviewers (two browser
tabs, two servers on the same folder) lose nothing. ``verdicts.csv`` beside it is an export of
the whole history, replaced atomically after each verdict. A folder from before the store (with
only ``verdicts.csv``) has its rows taken into the store when it is first opened.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medseg.errors import ConfigError, DataError
from medseg.io import atomic_path, folder_lock

FILE = "verdicts.csv"
STORE = "review.sqlite"
CORRECTIONS = "corrections"
CHOICES = ("accept", "fix", "reject")
MAX_NOTE = 2000
MAX_NAME = 100


@dataclass(frozen=True)
class Verdict:
    case_id: str
    verdict: str
    note: str
    reviewer: str
    time: str  # ISO 8601, UTC
    mask_sha256: str  # the predicted mask judged
    flags: str  # the case's QC flags when it was judged, ';'-separated
    correction: str = ""  # the corrected mask, relative to the review folder ('' when none)
    base_sha256: str = ""  # the mask the correction started from
    correction_sha256: str = ""


FIELDS = tuple(f.name for f in fields(Verdict))
_LEGACY_FIELDS = FIELDS[:7]  # verdicts.csv before corrections


def _schema() -> str:
    columns = ", ".join(f"{name} TEXT NOT NULL DEFAULT ''" for name in FIELDS)
    return f"CREATE TABLE IF NOT EXISTS verdicts (id INTEGER PRIMARY KEY AUTOINCREMENT, {columns})"


@contextlib.contextmanager
def _connect(review_dir: Path, *, create: bool) -> Iterator[sqlite3.Connection | None]:
    """The store of ``review_dir`` (None when there is none and ``create`` is false)."""
    path = Path(review_dir) / STORE
    if not path.is_file() and not create:
        yield None
        return
    try:
        connection = sqlite3.connect(path, timeout=60, isolation_level=None)
    except sqlite3.Error as err:
        raise DataError(f"{path}: cannot open the review store: {err}") from None
    try:
        connection.execute("PRAGMA busy_timeout = 60000")
        yield connection
    except sqlite3.DatabaseError as err:
        raise DataError(f"{path}: expected medseg's review store, found a damaged or foreign file: {err}") from None
    finally:
        connection.close()


def _legacy_rows(review_dir: Path) -> list[Verdict]:
    """The rows of a ``verdicts.csv`` written before the store."""
    path = Path(review_dir) / FILE
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        names = tuple(reader.fieldnames or ())
        if names not in (FIELDS, _LEGACY_FIELDS):
            raise DataError(f"{path}: expected the columns {', '.join(FIELDS)}, found {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if row.get("verdict") not in CHOICES or not row.get("case_id") or None in row.values():
                raise DataError(f"{path}:{line}: expected a case id and a verdict of {', '.join(CHOICES)}, "
                                f"found {dict(row)}")
            rows.append(Verdict(**{k: row[k] for k in names}))
    return rows


def _open_store(review_dir: Path, connection: sqlite3.Connection) -> None:
    """Create the table; take the rows of a ``verdicts.csv`` from before the store, once."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        exists = connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'verdicts'").fetchone()
        if not exists:
            connection.execute(_schema())
            _insert(connection, _legacy_rows(review_dir))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _insert(connection: sqlite3.Connection, rows: Sequence[Verdict]) -> None:
    placeholders = ", ".join("?" for _ in FIELDS)
    connection.executemany(f"INSERT INTO verdicts ({', '.join(FIELDS)}) VALUES ({placeholders})",
                           [tuple(asdict(r).values()) for r in rows])


def _select(connection: sqlite3.Connection, case_id: str | None = None) -> list[Verdict]:
    where, args = ("WHERE case_id = ?", (case_id,)) if case_id is not None else ("", ())
    cursor = connection.execute(f"SELECT {', '.join(FIELDS)} FROM verdicts {where} ORDER BY id", args)
    return [Verdict(*row) for row in cursor]


def history(review_dir: Path, case_id: str | None = None) -> list[Verdict]:
    """Every verdict in ``review_dir`` (of ``case_id`` only, when given), oldest first."""
    with _connect(review_dir, create=False) as connection:
        # a store without its table was left by a first record that failed: the rows are the file's
        if connection is not None and connection.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'verdicts'").fetchone():
            return _select(connection, case_id)
    return [r for r in _legacy_rows(review_dir) if case_id is None or r.case_id == case_id]


def current(review_dir: Path) -> dict[str, Verdict]:
    """The last verdict of each case."""
    return {v.case_id: v for v in history(review_dir)}


def _clean(text: str, what: str, case_id: str, limit: int) -> str:
    if len(text) > limit:
        raise ConfigError(f"verdict on {case_id}: expected a {what} of at most {limit} characters, found {len(text)}")
    return " ".join(text.split())


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def record(
    review_dir: Path,
    case_id: str,
    verdict: str,
    *,
    note: str = "",
    reviewer: str = "",
    mask_sha256: str = "",
    flags: Sequence[str] = (),
    correction: str = "",
    base_sha256: str = "",
    correction_sha256: str = "",
    time: str | None = None,
) -> Verdict:
    """Add a verdict on ``case_id`` to the store of ``review_dir``, then export ``verdicts.csv``."""
    if verdict not in CHOICES:
        raise ConfigError(f"verdict on {case_id}: expected one of {', '.join(CHOICES)}, found {verdict!r}")
    if correction and verdict != "fix":
        raise ConfigError(f"verdict on {case_id}: a corrected mask goes with the verdict fix, found {verdict!r}")
    entry = Verdict(
        case_id, verdict, _clean(note, "note", case_id, MAX_NOTE), _clean(reviewer, "reviewer name", case_id, MAX_NAME),
        time or now(), mask_sha256, ";".join(flags), correction, base_sha256, correction_sha256,
    )
    review_dir = Path(review_dir)
    review_dir.mkdir(parents=True, exist_ok=True)
    with _connect(review_dir, create=True) as connection:
        assert connection is not None
        _open_store(review_dir, connection)
        connection.execute("BEGIN IMMEDIATE")
        try:
            _insert(connection, [entry])
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    export(review_dir)
    return entry


def export(review_dir: Path) -> Path:
    """Write the whole history to ``review_dir/verdicts.csv`` (atomically; one writer at a time)."""
    review_dir = Path(review_dir)
    with folder_lock(review_dir):
        rows = history(review_dir)
        with atomic_path(review_dir / FILE) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    return review_dir / FILE


def shown_mask(review_dir: Path, case_id: str, mask_sha256: str) -> tuple[Path | None, Verdict | None]:
    """The latest correction of ``case_id`` made on the predicted mask ``mask_sha256`` (the mask a
    reviewer sees when the case is opened again), and its verdict; (None, None) when there is none."""
    for row in reversed(history(review_dir, case_id)):
        if row.mask_sha256 != mask_sha256:
            break  # made on an earlier predicted mask
        if row.correction:
            path = Path(review_dir) / row.correction
            if not path.is_file():
                raise DataError(f"case {case_id}: the corrected mask {path} of the verdict of {row.reviewer or '-'} "
                                f"at {row.time} is missing")
            return path, row
    return None, None
