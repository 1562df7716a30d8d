"""The review server's refusals: paths outside the review folder, unknown cases, missing or wrong tokens,
cross-origin changes, and oversized or malformed corrections each get a 4xx with no file content, and
nothing is written. Corrections and tokens from the command line."""

from __future__ import annotations

import gzip
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from medseg.cli import main
from medseg.errors import ConfigError
from medseg.io import sha256
from medseg.review import tokens, verdicts
from medseg.stages.review import review

TOKENS = {"ann": "ann-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}
SHAPE = (12, 10, 8)
AFFINE = np.diag([-0.8, 0.8, 1.5, 1.0])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    scan = write_nifti(tmp_path / "scans" / "c1.nii.gz", rng.normal(size=SHAPE).astype(np.float32), AFFINE)
    mask = np.zeros(SHAPE, np.uint8)
    mask[3:7, 3:6, 2:5] = 1
    write_nifti(tmp_path / "pred" / "c1.nii.gz", mask, AFFINE)
    (tmp_path / "pred" / "qc").mkdir(parents=True)
    (tmp_path / "pred" / "qc" / "c1.json").write_text(json.dumps(
        {"case_id": "c1", "volumes_ml": {"organ": 0.1}, "uncertainty": 0.1, "flags": [], "details": {},
         "scan": [str(scan)], "scan_kind": "nifti", "labels": {"1": "organ"}}))
    review([tmp_path / "pred"], tmp_path / "review")
    return tmp_path / "review"


@pytest.fixture
def server(folder: Path) -> Iterator[tuple[str, int]]:
    from medseg.review.server import make_server

    srv = make_server(folder, port=0, tokens=TOKENS)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address
    srv.shutdown()
    srv.server_close()


def _call(address: tuple[str, int], method: str, path: str, body: bytes | None = None, token: str | None = "ann",
          headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    conn = http.client.HTTPConnection(*address, timeout=30)
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = f"Bearer {TOKENS.get(token, token)}"
    conn.request(method, path, body=body, headers=sent)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, response.headers, data


def _mask(data: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> bytes:
    if data is None:
        data = np.zeros(SHAPE, np.uint8)
        data[3:7, 3:6, 2:5] = 1
        data[0, 0, 0] = 1
    return gzip.compress(nib.Nifti1Image(data, affine).to_bytes())


def _nothing_written(folder: Path) -> None:
    assert verdicts.history(folder) == []
    assert not (folder / verdicts.CORRECTIONS).exists() or not any((folder / verdicts.CORRECTIONS).rglob("*.nii*"))


def test_review_server_refuses_paths_outside_the_folder_and_unknown_cases(server: tuple[str, int], folder: Path) -> None:
    secret = folder.parent / "secret.txt"
    secret.write_text("do not show")
    for path in ["/static/../../../secret.txt", "/static/%2e%2e/%2e%2e/server.py", "/static/..%2f..%2fcli.py",
                 "/static//etc/passwd", f"/static/{secret}", "/volume/..%2F..%2Fsecret/scan.nii.gz",
                 "/volume/c1/..%2F..%2F..%2Fsecret.nii.gz", "/case/%2E%2E%2Fqueue.json", "/case/nobody",
                 "/picture/..%2Fqueue.png", "/volume/nobody/scan.nii.gz", "/volume/c1/passwd.nii.gz",
                 "/slice/c1/axial/..%2F1.png", "/case/c1/history.json/../../queue.json"]:
        status, _, body = _call(server, "GET", path)
        assert 400 <= status < 500, (path, status)
        assert b"do not show" not in body and b"import" not in body and b"root:" not in body, path
        assert b"\x1f\x8b" not in body and b'"cases"' not in body, path
    status, _, body = _call(server, "GET", "/case/nobody")
    assert status == 404 and b"no case &#x27;nobody&#x27; in this review" in body
    assert _call(server, "GET", "/static/review.js")[0] == 200
    assert _call(server, "GET", "/volume/c1/reference.nii.gz")[0] == 404  # the case has none


def test_review_server_needs_a_reviewers_token(server: tuple[str, int], folder: Path) -> None:
    for token in (None, "wrong-token-0123456789", TOKENS["ann"][:-1]):
        for path in ["/", "/case/c1", "/volume/c1/scan.nii.gz", "/slice/c1/axial/1.png", "/static/review.js",
                     "/verdicts.csv"]:
            status, headers, body = _call(server, "GET", path, token=token)
            assert status == 401 and "Bearer" in headers["WWW-Authenticate"], (token, path)
            assert b"\x1f\x8b" not in body and b"\x89PNG" not in body and b"case_id" not in body
        status, _, _ = _call(server, "POST", "/case/c1/verdict", b"verdict=accept", token=token)
        assert status == 401
    _nothing_written(folder)
    status, headers, _ = _call(server, "GET", f"/case/c1?token={TOKENS['bob']}", token=None)
    assert status == 303 and headers["Location"] == "/case/c1" and "HttpOnly" in headers["Set-Cookie"]
    cookie = headers["Set-Cookie"].split(";")[0]
    status, _, body = _call(server, "GET", "/case/c1", token=None, headers={"Cookie": cookie})
    assert status == 200 and b'id="reviewer">bob<' in body
    status, _, _ = _call(server, "POST", "/case/c1/verdict", b"verdict=accept&reviewer=mallory", token=None,
                         headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303 and [v.reviewer for v in verdicts.history(folder)] == ["bob"]  # the token's name


def test_review_server_refuses_changes_from_other_origins(server: tuple[str, int], folder: Path) -> None:
    base = sha256(folder.parent / "pred" / "c1.nii.gz")
    for headers in ({"Origin": "http://elsewhere.example"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Origin": "http://127.0.0.1:1"}):
        status, _, _ = _call(server, "POST", "/case/c1/verdict", b"verdict=accept",
                             headers={**headers, "Content-Type": "application/x-www-form-urlencoded"})
        assert status == 403, headers
        status, _, _ = _call(server, "POST", "/case/c1/correction", _mask(), headers={**headers, "X-Base-SHA256": base})
        assert status == 403, headers
    _nothing_written(folder)


def test_review_server_refuses_bad_corrections_and_writes_nothing(server: tuple[str, int], folder: Path) -> None:
    base = sha256(folder.parent / "pred" / "c1.nii.gz")
    wrong_values = np.zeros(SHAPE, np.uint8)
    wrong_values[1, 1, 1] = 7
    bomb = gzip.compress(b"\0" * (4 * int(np.prod(SHAPE)) + 200_000))
    cases = {
        "random bytes": (np.random.default_rng(0).bytes(500), "expected a NIfTI-1 mask"),
        "damaged gzip": (b"\x1f\x8b" + b"junk" * 50, "damaged gzip data"),
        "too large unpacked": (bomb, "at most"),
        "wrong shape": (_mask(np.zeros((12, 10, 7), np.uint8)), "expected a mask of the scan's shape (12, 10, 8)"),
        "flipped": (_mask(affine=np.diag([0.8, 0.8, 1.5, 1.0])), "expected a mask on the scan's grid"),
        "undeclared label": (_mask(wrong_values), "expected label values 0 to 1, found [7]"),
        "fractions": (_mask(np.full(SHAPE, 0.5, np.float32)), "expected whole label numbers"),
        "empty": (b"", "expected a NIfTI-1 mask"),
    }
    for name, (body, message) in cases.items():
        status, _, answer = _call(server, "POST", "/case/c1/correction", body, headers={"X-Base-SHA256": base})
        assert status == 400 and message in json.loads(answer)["error"], (name, answer)
    status, _, answer = _call(server, "POST", "/case/c1/correction", _mask(), headers={"X-Base-SHA256": "0" * 64})
    assert status == 400 and "expected the SHA-256 of the mask the correction started from" in json.loads(answer)["error"]
    too_big = b"\0" * (4 * int(np.prod(SHAPE)) + 70_000)
    status, _, answer = _call(server, "POST", "/case/c1/correction", too_big, headers={"X-Base-SHA256": base})
    assert status == 413 and b"\0" not in answer
    assert _call(server, "POST", "/case/c1/verdict", b"note=" + b"x" * 70_000)[0] == 413
    assert _call(server, "POST", "/case/nobody/correction", _mask(), headers={"X-Base-SHA256": base})[0] == 404
    _nothing_written(folder)


def test_review_correction_through_the_api_is_saved_on_the_scans_grid(server: tuple[str, int], folder: Path) -> None:
    base = sha256(folder.parent / "pred" / "c1.nii.gz")
    status, _, answer = _call(server, "POST", "/case/c1/correction", _mask(),
                              headers={"X-Base-SHA256": base, "X-Note": "corner%20voxel"})
    assert status == 200
    row = json.loads(answer)
    saved = folder / row["correction"]
    image = nib.load(str(saved))
    assert image.shape == SHAPE and np.allclose(image.affine, AFFINE) and image.get_data_dtype() == np.uint8
    predicted = np.asarray(nib.load(str(folder.parent / "pred" / "c1.nii.gz")).dataobj)
    assert np.argwhere(np.asarray(image.dataobj) != predicted).tolist() == [[0, 0, 0]]
    assert (row["verdict"], row["reviewer"], row["note"], row["base_sha256"], row["correction_sha256"]) == (
        "fix", "ann", "corner voxel", base, sha256(saved))
    # the viewer's mask is now the correction; a second correction may start from it, and both are kept
    status, _, body = _call(server, "GET", "/volume/c1/mask.nii.gz")
    assert status == 200 and np.array_equal(np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(body)).dataobj),
                                            np.asarray(image.dataobj))
    status, _, answer = _call(server, "POST", "/case/c1/correction", _mask(), token="bob",
                              headers={"X-Base-SHA256": row["correction_sha256"]})
    assert status == 200 and json.loads(answer)["correction"] != row["correction"]
    assert (folder.parent / "pred" / "c1.nii.gz").is_file() and sha256(folder.parent / "pred" / "c1.nii.gz") == base
    assert [v.reviewer for v in verdicts.history(folder)] == ["ann", "bob"]
    status, _, body = _call(server, "GET", "/case/c1/history.json")
    assert [h["reviewer"] for h in json.loads(body)["history"]] == ["ann", "bob"]


def test_review_tokens_file_and_serving_beyond_loopback(folder: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from medseg.review.server import make_server

    path = tmp_path / "tokens.txt"
    assert main(["review", "--add-reviewer", "ann", "--tokens", str(path)]) == 0
    token = capsys.readouterr().out.strip().rsplit(" ", 1)[1]
    assert tokens.load(path) == {"ann": token} and len(token) >= 32 and path.stat().st_mode & 0o777 == 0o600
    assert main(["review", "--add-reviewer", "ann", "--tokens", str(path)]) == 2
    assert "reviewer 'ann' has a token already" in capsys.readouterr().err
    path.write_text("ann short\n")
    with pytest.raises(ConfigError, match=r"tokens\.txt:1: expected '<name> <token>'"):
        tokens.load(path)
    with pytest.raises(ConfigError, match=r"serving on 0\.0\.0\.0 needs reviewers' tokens"):
        make_server(folder, host="0.0.0.0", port=0)
    assert main(["review", "--output", str(folder), "--serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "needs reviewers' tokens" in capsys.readouterr().err


def test_review_corrections_saved_at_the_same_time_are_all_kept(server: tuple[str, int], folder: Path) -> None:
    base = sha256(folder.parent / "pred" / "c1.nii.gz")
    answers: list[int] = []

    def save() -> None:
        answers.append(_call(server, "POST", "/case/c1/correction", _mask(), headers={"X-Base-SHA256": base})[0])

    threads = [threading.Thread(target=save) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [200] * 6
    rows = verdicts.history(folder)
    assert len(rows) == 6 and len({r.correction for r in rows}) == 6
    assert all((folder / r.correction).is_file() and sha256(folder / r.correction) == r.correction_sha256 for r in rows)
