"""verdicts.csv: every verdict kept, the last one per case current, bad values and files refused."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from medseg.errors import ConfigError, DataError
from medseg.review import verdicts


def test_every_verdict_is_kept_and_the_last_one_counts(tmp_path: Path) -> None:
    assert verdicts.history(tmp_path) == [] and verdicts.current(tmp_path) == {}
    first = verdicts.record(tmp_path, "a", "fix", note="posterior\n too  long", reviewer="ann", mask_sha256="1" * 64,
                            flags=["volume", "edge"])
    verdicts.record(tmp_path, "b", "accept", reviewer="bob")
    verdicts.record(tmp_path, "a", "accept", reviewer="ann", mask_sha256="2" * 64)
    rows = verdicts.history(tmp_path)
    assert [(r.case_id, r.verdict) for r in rows] == [("a", "fix"), ("b", "accept"), ("a", "accept")]
    assert rows[0] == first and first.note == "posterior too long" and first.flags == "volume;edge"
    current = verdicts.current(tmp_path)
    assert current["a"].verdict == "accept" and current["a"].mask_sha256 == "2" * 64 and current["b"].reviewer == "bob"
    assert (tmp_path / verdicts.FILE).read_text().splitlines()[0] == ",".join(verdicts.FIELDS)


def test_bad_verdicts_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"verdict on c1: expected one of accept, fix, reject, found 'maybe'"):
        verdicts.record(tmp_path, "c1", "maybe")
    with pytest.raises(ConfigError, match=r"expected a note of at most 2000 characters, found 2001"):
        verdicts.record(tmp_path, "c1", "fix", note="x" * 2001)
    assert not (tmp_path / verdicts.FILE).exists()


def test_a_damaged_file_is_refused_by_name_and_line(tmp_path: Path) -> None:
    path = tmp_path / verdicts.FILE
    path.write_text("case,verdict\nc1,accept\n")
    with pytest.raises(DataError, match=r"verdicts\.csv: expected the columns case_id, verdict"):
        verdicts.history(tmp_path)
    path.write_text(",".join(verdicts.FIELDS) + "\nc1,accept,,,t,,\nc2,perhaps,,,t,,\n")
    with pytest.raises(DataError, match=r"verdicts\.csv:3: expected a case id and a verdict"):
        verdicts.current(tmp_path)
    with pytest.raises(DataError, match=r"verdicts\.csv:3"):
        verdicts.record(tmp_path, "c3", "accept")  # a new verdict does not drop the damaged file's rows
    assert "perhaps" in path.read_text()


def test_reviewers_at_the_same_time_lose_nothing(tmp_path: Path) -> None:
    def judge(name: str) -> None:
        for i in range(15):
            verdicts.record(tmp_path, f"{name}{i}", "accept", reviewer=name)

    threads = [threading.Thread(target=judge, args=(n,)) for n in ("x", "y", "z")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(verdicts.history(tmp_path)) == 45
