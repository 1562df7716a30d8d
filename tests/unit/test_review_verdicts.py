"""The review store: every verdict kept, the last one per case current, corrections found again, bad values and
files refused, a verdicts.csv from before the store taken in, reviewers in several processes losing nothing."""

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
    path.write_text(",".join(verdicts.FIELDS[:7]) + "\nc1,accept,,,t,,\nc2,perhaps,,,t,,\n")  # before the store
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


def test_review_store_takes_in_a_verdicts_csv_from_before_it(tmp_path: Path) -> None:
    (tmp_path / verdicts.FILE).write_text(",".join(verdicts.FIELDS[:7]) + "\nc1,accept,,ann,t1,aa,\nc2,fix,x,,t2,bb,edge\n")
    verdicts.record(tmp_path, "c3", "reject", reviewer="bob")
    assert (tmp_path / verdicts.STORE).is_file()
    rows = verdicts.history(tmp_path)
    assert [(r.case_id, r.verdict, r.reviewer, r.mask_sha256) for r in rows] == [
        ("c1", "accept", "ann", "aa"), ("c2", "fix", "", "bb"), ("c3", "reject", "bob", "")]
    (tmp_path / verdicts.FILE).unlink()  # the export is a copy: the store holds the history
    assert len(verdicts.history(tmp_path)) == 3 and verdicts.history(tmp_path, "c2")[0].flags == "edge"


def test_review_corrections_are_found_again_on_their_predicted_mask_only(tmp_path: Path) -> None:
    (tmp_path / "corrections").mkdir()
    (tmp_path / "corrections" / "one.nii.gz").write_bytes(b"x")
    verdicts.record(tmp_path, "a", "fix", reviewer="ann", mask_sha256="1" * 64, correction="corrections/one.nii.gz",
                    base_sha256="1" * 64, correction_sha256="c" * 64)
    verdicts.record(tmp_path, "a", "accept", reviewer="bob", mask_sha256="1" * 64, note="fine now")
    path, row = verdicts.shown_mask(tmp_path, "a", "1" * 64)
    assert path == tmp_path / "corrections" / "one.nii.gz" and row is not None and row.reviewer == "ann"
    assert verdicts.shown_mask(tmp_path, "a", "2" * 64) == (None, None)  # a new prediction since
    assert verdicts.shown_mask(tmp_path, "b", "1" * 64) == (None, None)
    with pytest.raises(ConfigError, match=r"a corrected mask goes with the verdict fix, found 'accept'"):
        verdicts.record(tmp_path, "a", "accept", correction="corrections/one.nii.gz")
    (tmp_path / "corrections" / "one.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case a: the corrected mask .*one\.nii\.gz of the verdict of ann .* is missing"):
        verdicts.shown_mask(tmp_path, "a", "1" * 64)


def test_review_store_damaged_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / verdicts.STORE).write_bytes(b"not a database at all" * 100)
    with pytest.raises(DataError, match=r"review\.sqlite: expected medseg's review store, found a damaged"):
        verdicts.history(tmp_path)


def _judge_in_a_process(folder: str, name: str) -> None:
    for i in range(10):
        verdicts.record(Path(folder), f"{name}{i}", "accept", reviewer=name)


def test_review_servers_in_several_processes_lose_nothing(tmp_path: Path) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_judge_in_a_process, args=(str(tmp_path), n)) for n in ("p", "q", "r")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    rows = verdicts.history(tmp_path)
    assert sorted(r.case_id for r in rows) == sorted(f"{n}{i}" for n in "pqr" for i in range(10))
    exported = (tmp_path / verdicts.FILE).read_text().splitlines()
    assert len(exported) == 31 and exported[0] == ",".join(verdicts.FIELDS)
