"""The MSD download: refusals are clear, checksums are checked (no network needed)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medseg import datasets
from medseg.errors import DownloadError


def _archive(path: Path, task: str) -> str:
    with tarfile.open(path, "w") as tar:
        data = json.dumps({"name": task}).encode()
        info = tarfile.TarInfo(f"{task}/dataset.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on loopback: (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_server_asks_for_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 on loopback refuses at once: the same path as a machine without network.
    monkeypatch.setitem(datasets.MSD_TASKS, "Task04_Hippocampus", ("http://127.0.0.1:9/Task04.tar", "0" * 32))
    with pytest.raises(DownloadError, match="make demo DATA="):
        datasets.fetch_msd("Task04_Hippocampus", tmp_path)


def test_checksum_mismatch_is_refused(
    tmp_path: Path, served: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, url = served
    _archive(folder / "Task04.tar", "Task04_Hippocampus")
    monkeypatch.setitem(datasets.MSD_TASKS, "Task04_Hippocampus", (f"{url}/Task04.tar", "0" * 32))
    with pytest.raises(DownloadError, match="(?i)md5|hash|check"):
        datasets.fetch_msd("Task04_Hippocampus", tmp_path / "raw")
    assert not (tmp_path / "raw" / "Task04_Hippocampus").exists()


def test_verified_archive_is_extracted_once(
    tmp_path: Path, served: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, url = served
    archive = folder / "Task04.tar"
    md5 = _archive(archive, "Task04_Hippocampus")
    monkeypatch.setitem(datasets.MSD_TASKS, "Task04_Hippocampus", (f"{url}/Task04.tar", md5))
    target = datasets.fetch_msd("Task04_Hippocampus", tmp_path / "raw")
    assert target == tmp_path / "raw" / "Task04_Hippocampus"
    assert json.loads((target / "dataset.json").read_text()) == {"name": "Task04_Hippocampus"}
    archive.unlink()  # a second call finds the folder and downloads nothing
    assert datasets.fetch_msd("Task04_Hippocampus", tmp_path / "raw") == target


def test_unknown_task(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="unknown MSD task 'Task99_Nothing'"):
        datasets.fetch_msd("Task99_Nothing", tmp_path)
