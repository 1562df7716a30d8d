"""The verdicts a person records on masks: ``verdicts.csv`` of a review folder.

A verdict is ``accept`` (use the mask as it is), ``fix`` (the mask needs corrections) or
``reject`` (unusable), with an optional note and the reviewer's name. The file keeps every
verdict ever recorded, oldest first; a case's verdict is its last row. Each row holds the
SHA-256 of the mask it judged, so a verdict on a mask that has since been replaced (a new model,
a new run) is known to be outdated, and the case goes back to the queue.

Rows are added under a lock on the review folder and the file is replaced atomically, so two
reviewers (two browser tabs, two servers) lose nothing.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medseg.errors import ConfigError, DataError
from medseg.io import atomic_path, folder_lock

FILE = "verdicts.csv"
CHOICES = ("accept", "fix", "reject")
MAX_NOTE = 2000


@dataclass(frozen=True)
class Verdict:
    case_id: str
    verdict: str
    note: str
    reviewer: str
    time: str  # ISO 8601, UTC
    mask_sha256: str
    flags: str  # the case's QC flags when it was judged, ';'-separated


FIELDS = tuple(f.name for f in fields(Verdict))


def history(review_dir: Path) -> list[Verdict]:
    """Every verdict in ``review_dir``, oldest first ([] when there is none yet)."""
    path = Path(review_dir) / FILE
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != FIELDS:
            raise DataError(f"{path}: expected the columns {', '.join(FIELDS)}, found {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            if row.get("verdict") not in CHOICES or not row.get("case_id") or None in row.values():
                raise DataError(f"{path}:{line}: expected a case id and a verdict of {', '.join(CHOICES)}, "
                                f"found {dict(row)}")
            rows.append(Verdict(**{k: row[k] for k in FIELDS}))
    return rows


def current(review_dir: Path) -> dict[str, Verdict]:
    """The last verdict of each case."""
    return {v.case_id: v for v in history(review_dir)}


def record(
    review_dir: Path,
    case_id: str,
    verdict: str,
    *,
    note: str = "",
    reviewer: str = "",
    mask_sha256: str = "",
    flags: Sequence[str] = (),
) -> Verdict:
    """Add a verdict on ``case_id`` to ``review_dir/verdicts.csv``."""
    if verdict not in CHOICES:
        raise ConfigError(f"verdict on {case_id}: expected one of {', '.join(CHOICES)}, found {verdict!r}")
    if len(note) > MAX_NOTE:
        raise ConfigError(f"verdict on {case_id}: expected a note of at most {MAX_NOTE} characters, "
                          f"found {len(note)}")
    entry = Verdict(
        case_id, verdict, " ".join(note.split()), " ".join(reviewer.split()),
        dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), mask_sha256, ";".join(flags),
    )
    review_dir = Path(review_dir)
    with folder_lock(review_dir):
        rows = history(review_dir) + [entry]
        with atomic_path(review_dir / FILE) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
    return entry
