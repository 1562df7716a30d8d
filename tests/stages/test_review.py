"""review: the queue (problems, then flagged cases first), its pictures and page, the server's pages
and verdicts, and the review of real predictions with their references and evaluation."""

from __future__ import annotations

import csv
import http.client
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import nibabel as nib
import numpy as np
import pytest
from conftest import SHAPE, box_msd, boxes, write_nifti

from medseg.cli import main
from medseg.config import ReviewConfig
from medseg.errors import DataError
from medseg.io import sha256
from medseg.review import render, verdicts
from medseg.stages.review import review

LABELS = {"1": "left", "2": "right"}
# case -> (flags, uncertainty, Dice of left and right)
CASES = {
    "clean": ([], 0.05, (0.9, 0.8)),
    "edge": (["edge"], 0.1, (0.5, 0.7)),
    "two": (["volume", "uncertain"], 0.3, (0.2, 0.4)),
    "unsure": ([], 0.2, (0.85, 0.95)),
}
QUEUE = ["failed", "lost", "two", "edge", "unsure", "clean"]


def _predictions(root: Path) -> tuple[Path, Path]:
    """A prediction folder as predict leaves it (masks, qc/ and failed/ records) and evaluate's metrics.csv
    for its cases: four predicted cases, one whose scan is gone since, and one that failed."""
    rng = np.random.default_rng(0)
    folder = root / "pred"
    rows = []
    for case, (flags, uncertainty, dice) in [*CASES.items(), ("lost", ([], 0.0, None))]:
        image, label = boxes(rng)
        scan = write_nifti(root / "scans" / f"{case}.nii.gz", image)
        write_nifti(folder / f"{case}.nii.gz", label)
        record = {"case_id": case, "volumes_ml": {"left": 4.8, "right": 4.8}, "uncertainty": uncertainty,
                  "flags": flags, "details": {f: f"reason for {f}" for f in flags},
                  "scan": [str(scan)], "scan_kind": "nifti", "labels": LABELS}
        (folder / "qc").mkdir(parents=True, exist_ok=True)
        (folder / "qc" / f"{case}.json").write_text(json.dumps(record))
        if dice is not None:
            rows += [{"case_id": case, "label": k, "label_name": n, "dice": d, "hd95_mm": 1.0, "surface_dice": 0.9}
                     for (k, n), d in zip(LABELS.items(), dice)]
    (root / "scans" / "lost.nii.gz").unlink()
    (folder / "failed").mkdir()
    (folder / "failed" / "failed.json").write_text(json.dumps(
        {"case_id": "failed", "error": "scans/failed.nii.gz: expected finite voxel values", "scan": ["x"]}))
    metrics = root / "metrics.csv"
    with open(metrics, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder, metrics


@pytest.fixture
def built(tmp_path: Path) -> Path:
    folder, metrics = _predictions(tmp_path)
    review([folder], tmp_path / "review", evaluation=metrics)
    return tmp_path / "review"


def test_queue_puts_problems_then_flagged_cases_first(tmp_path: Path) -> None:
    folder, metrics = _predictions(tmp_path)
    result = review([folder], tmp_path / "review", ReviewConfig(thumbnail_size=64), evaluation=metrics)
    assert [e["case_id"] for e in result.entries] == QUEUE
    by_id = {e["case_id"]: e for e in result.entries}
    assert by_id["failed"]["problem"] == "prediction failed: scans/failed.nii.gz: expected finite voxel values"
    assert "expected its scan at" in by_id["lost"]["problem"] and "lost.nii.gz" in by_id["lost"]["problem"]
    assert by_id["edge"]["metrics"]["mean_dice"] == pytest.approx(0.6)
    assert by_id["two"]["mask_sha256"] == sha256(folder / "two.nii.gz")
    summary = json.loads((tmp_path / "review" / "review.json").read_text())
    assert summary["n_cases"] == 6 and summary["n_problems"] == 2 and summary["n_flagged"] == 2
    assert summary["flags"] == {"edge": 1, "uncertain": 1, "volume": 1}
    assert summary["verdicts"] == {"open": 6}
    assert summary["dice"]["flagged"] == {"n": 2, "mean_dice": pytest.approx((0.6 + 0.3) / 2)}
    assert summary["dice"]["not_flagged"] == {"n": 2, "mean_dice": pytest.approx((0.85 + 0.9) / 2)}
    assert summary["dice"]["by_flag"]["volume"] == {"n": 1, "mean_dice": pytest.approx(0.3)}
    # scored cases in queue order: two 0.3, edge 0.6, unsure 0.9, clean 0.85
    assert summary["dice"]["queue_first_quarter"] == {"n": 1, "mean_dice": pytest.approx(0.3)}
    assert summary["dice"]["queue_rest"] == {"n": 3, "mean_dice": pytest.approx((0.6 + 0.9 + 0.85) / 3)}
    # ranks of the uncertainty 4 2 3 1 and of the Dice 1 2 4 3: 1 - 6 * (9 + 0 + 1 + 4) / (4 * 15)
    assert summary["dice"]["uncertainty_spearman"] == pytest.approx(-0.4)
    queue = json.loads((tmp_path / "review" / "queue.json").read_text())["cases"]
    assert [e["case_id"] for e in queue] == QUEUE
    pictures = sorted(p.stem for p in (tmp_path / "review" / "cases").glob("*.png"))
    assert pictures == sorted(CASES)
    # 40 x 40 x 32 voxels of 1 mm: axial 40 x 40, coronal and sagittal 32 x 40, at 64 pixels
    from PIL import Image

    assert Image.open(tmp_path / "review" / "cases" / "edge.png").size == (64 * 3 + 12, 64)
    page = (tmp_path / "review" / "index.html").read_text()
    assert [page.index(f'data-case="{c}"') for c in QUEUE] == sorted(page.index(f'data-case="{c}"') for c in QUEUE)
    assert "reason for uncertain" in page and 'src="cases/edge.png"' in page and "0.600" in page
    assert "First quarter of the queue 0.300, the rest 0.783; rank correlation of uncertainty and Dice -0.40" in page


def test_a_rebuild_keeps_verdicts_and_marks_those_on_changed_masks_outdated(built: Path) -> None:
    folder = built.parent / "pred"
    verdicts.record(built, "two", "fix", mask_sha256=sha256(folder / "two.nii.gz"))
    verdicts.record(built, "clean", "accept", mask_sha256=sha256(folder / "clean.nii.gz"))
    mask = np.asarray(nib.load(str(folder / "two.nii.gz")).dataobj)
    write_nifti(folder / "two.nii.gz", np.where(mask == 2, 0, mask).astype(np.uint8))  # a new mask since
    result = review([folder], built, evaluation=built.parent / "metrics.csv")
    assert result.summary["verdicts"] == {"accept": 1, "open": 4, "outdated": 1}
    assert len(verdicts.history(built)) == 2


def test_scans_not_recorded_are_taken_from_the_predict_input(tmp_path: Path) -> None:
    folder, _ = _predictions(tmp_path)
    record = json.loads((folder / "qc" / "clean.json").read_text())
    del record["scan"], record["scan_kind"], record["labels"]  # a record of an older medseg
    (folder / "qc" / "clean.json").write_text(json.dumps(record))
    result = review([folder], tmp_path / "review")
    clean = next(e for e in result.entries if e["case_id"] == "clean")
    assert "no scan is recorded for it" in clean["problem"] and "(--scans)" in clean["problem"]
    assert clean["labels"] == {"1": "left", "2": "right"}  # from the volumes' order
    (tmp_path / "scans" / "lost.nii.gz").write_bytes((tmp_path / "scans" / "clean.nii.gz").read_bytes())
    result = review([folder], tmp_path / "review", scans=tmp_path / "scans")
    by_id = {e["case_id"]: e for e in result.entries}
    assert by_id["clean"]["problem"] is None and by_id["clean"]["overview"] == "cases/clean.png"
    assert by_id["lost"]["problem"] is None


def test_bad_inputs_are_refused_by_name(tmp_path: Path) -> None:
    folder, _ = _predictions(tmp_path)
    with pytest.raises(DataError, match=r"prediction folder not found: .*nowhere"):
        review([tmp_path / "nowhere"], tmp_path / "review")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: expected the output of medseg predict \(records under qc/\)"):
        review([tmp_path / "empty"], tmp_path / "review")
    copy = tmp_path / "copy"
    (copy / "qc").mkdir(parents=True)
    (copy / "qc" / "edge.json").write_text((folder / "qc" / "edge.json").read_text())
    with pytest.raises(DataError, match=r"case edge: found in both .*pred and .*copy"):
        review([folder, copy], tmp_path / "review")
    bad = tmp_path / "bad.csv"
    bad.write_text("case,score\nedge,1\n")
    with pytest.raises(DataError, match=r"bad\.csv: expected evaluate's metrics.csv .* missing \['case_id', 'dice', "
                                        r"'label_name'\]"):
        review([folder], tmp_path / "review", evaluation=bad)
    (folder / "edge.nii.gz").unlink()
    write_nifti(folder / "clean.nii.gz", np.zeros((4, 4, 4), dtype=np.uint8))
    result = review([folder], tmp_path / "review")
    by_id = {e["case_id"]: e for e in result.entries}
    assert by_id["edge"]["problem"].endswith("edge.nii.gz: the mask of this QC record is missing")
    assert "clean.nii.gz: expected the grid of the scan" in by_id["clean"]["problem"]
    assert by_id["two"]["problem"] is None  # the others go on
    assert not (tmp_path / "review" / "cases" / "clean.png").exists()  # no picture left from an earlier build


@pytest.fixture
def server(built: Path) -> Iterator[tuple[str, int]]:
    from medseg.review.server import make_server

    srv = make_server(built, ReviewConfig(slice_size=80), port=0, reviewer="tester")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv.server_address[:2]
    srv.shutdown()
    srv.server_close()


def _request(address: tuple[str, int], method: str, path: str, form: dict | None = None,
             headers: dict | None = None) -> tuple[int, Any, bytes]:
    conn = http.client.HTTPConnection(*address, timeout=30)
    body = urlencode(form).encode() if form is not None else None
    conn.request(method, path, body=body, headers={"Content-Type": "application/x-www-form-urlencoded",
                                                   **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, response.headers, data


def test_server_pages_and_slices(server: tuple[str, int], built: Path) -> None:
    from PIL import Image

    status, _, body = _request(server, "GET", "/")
    page = body.decode()
    assert status == 200 and 'href="/case/edge"' in page and 'src="/picture/edge.png"' in page
    assert [page.index(f'data-case="{c}"') for c in QUEUE] == sorted(page.index(f'data-case="{c}"') for c in QUEUE)
    status, _, body = _request(server, "GET", "/case/two")
    assert status == 200 and b"reason for volume" in body and b'name="verdict" value="fix"' in body
    assert b'value="tester"' in body and b'href="/case/lost">previous' in body and b'href="/case/edge">next' in body
    status, headers, body = _request(server, "GET", "/slice/edge/coronal/20.png?layers=mask")
    assert status == 200 and headers["Content-Type"] == "image/png"
    entry = json.loads((built / "queue.json").read_text())["cases"][QUEUE.index("edge")]
    from medseg.stages.review import load_entry

    expected = render.render(load_entry(entry, ReviewConfig()), "coronal", 20, layers=["mask"], size=80)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), expected)
    status, _, body = _request(server, "GET", "/picture/edge.png")
    assert status == 200 and body == (built / "cases" / "edge.png").read_bytes()
    assert _request(server, "GET", f"/slice/edge/axial/{SHAPE[2]}.png")[0] == 404
    status, _, body = _request(server, "GET", "/slice/edge/oblique/1.png")
    assert status == 400 and b"expected /slice/" in body
    assert _request(server, "GET", "/slice/edge/axial/1.png?layers=bones")[0] == 400
    assert _request(server, "GET", "/slice/failed/axial/0.png")[0] == 404
    status, _, body = _request(server, "GET", "/case/nobody")
    assert status == 404 and b"no case &#x27;nobody&#x27; in this review" in body
    status, _, body = _request(server, "GET", "/case/lost")
    assert status == 200 and b"expected its scan at" in body and b'name="verdict"' not in body


def test_server_records_verdicts_and_moves_to_the_next_open_case(server: tuple[str, int], built: Path) -> None:
    status, headers, _ = _request(server, "POST", "/case/two/verdict", {"verdict": "fix", "note": "right too small"})
    assert status == 303 and headers["Location"] == "/case/edge"
    (row,) = verdicts.history(built)
    assert (row.case_id, row.verdict, row.note, row.reviewer, row.flags) == (
        "two", "fix", "right too small", "tester", "volume;uncertain")
    assert row.mask_sha256 == sha256(built.parent / "pred" / "two.nii.gz")
    status, _, body = _request(server, "POST", "/case/edge/verdict", {"verdict": "maybe"})
    assert status == 400 and b"expected one of accept, fix, reject, found &#x27;maybe&#x27;" in body
    status, _, body = _request(server, "POST", "/case/edge/verdict", {"verdict": "accept"},
                               {"Origin": "http://elsewhere.example"})
    assert status == 403
    status, _, body = _request(server, "POST", "/case/failed/verdict", {"verdict": "accept"})
    assert status == 400 and b"has no mask to judge" in body
    assert len(verdicts.history(built)) == 1
    for case, following in (("edge", "/case/unsure"), ("clean", "/case/unsure"), ("unsure", "/")):
        status, headers, _ = _request(server, "POST", f"/case/{case}/verdict",
                                      {"verdict": "accept", "reviewer": "ann"})
        assert status == 303 and headers["Location"] == following, case
    assert {c: v.verdict for c, v in verdicts.current(built).items()} == {
        "two": "fix", "edge": "accept", "clean": "accept", "unsure": "accept"}
    status, _, body = _request(server, "GET", "/")
    assert b'data-status="fix"' in body and b"Verdicts: accept 3, fix 1, open 2" in body
    status, _, body = _request(server, "GET", "/verdicts.csv")
    assert status == 200 and body == (built / verdicts.FILE).read_bytes()


def test_command_builds_and_refuses_nothing_to_do(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder, metrics = _predictions(tmp_path)
    out = tmp_path / "review"
    assert main(["review", "--predictions", str(folder), "--output", str(out), "--evaluation", str(metrics),
                 "--params", '{"thumbnail_size": 48}']) == 0
    assert f"review of 6 cases (2 flagged, 2 with problems) -> {out / 'index.html'}" in capsys.readouterr().out
    assert (out / "queue.json").is_file()
    assert main(["review", "--output", str(out)]) == 2
    assert "expected --predictions (build the review folder), --serve (serve a built one), --add-reviewer or " \
           "--log-mlflow" in \
        capsys.readouterr().err
    assert main(["review", "--output", str(tmp_path / "unbuilt"), "--serve", "--port", "0"]) == 2
    assert "expected a review folder built by medseg review (queue.json)" in capsys.readouterr().err
    assert main(["review", "--predictions", str(folder), "--output", str(out), "--params", '{"window": [5, 1]}']) == 2
    assert "low < high" in capsys.readouterr().err


def test_review_of_real_predictions_with_references_and_evaluation(box_model: Path, tmp_path: Path) -> None:
    """predict records each scan, so review needs only the folders; a scan that fails is listed first."""
    from medseg.stages.evaluate import evaluate
    from medseg.stages.ingest import ingest
    from medseg.stages.predict import predict

    rng = np.random.default_rng(7)
    manifest = ingest(box_msd(tmp_path / "msd", 3, rng, prefix="p"), tmp_path / "ingest").manifest_path
    predict(manifest, tmp_path / "pred", [str(box_model)])
    evaluate([tmp_path / "pred"], tmp_path / "eval", manifest_path=manifest)
    write_nifti(tmp_path / "new" / "zero.nii.gz", np.zeros(SHAPE, dtype=np.float32))
    image, _ = boxes(rng)
    write_nifti(tmp_path / "new" / "fine.nii.gz", image)
    predict(tmp_path / "new", tmp_path / "pred_new", [str(box_model)])
    assert json.loads((tmp_path / "pred_new" / "failed" / "zero.json").read_text())["scan"] == [
        str((tmp_path / "new" / "zero.nii.gz").resolve())]

    result = review([tmp_path / "pred", tmp_path / "pred_new"], tmp_path / "review", manifest=manifest,
                    evaluation=tmp_path / "eval" / "metrics.csv")
    assert result.entries[0]["case_id"] == "zero" and "every voxel is 0" in result.entries[0]["problem"]
    by_id = {e["case_id"]: e for e in result.entries}
    assert by_id["fine"]["reference"] is None and by_id["fine"]["metrics"] is None
    for i in range(3):
        entry = by_id[f"p{i}"]
        assert entry["problem"] is None and entry["labels"] == LABELS
        assert Path(entry["reference"]).name == f"p{i}.nii.gz" and entry["metrics"]["mean_dice"] > 0.9
    from medseg.stages.review import load_entry

    images = load_entry(by_id["p0"], ReviewConfig())
    reference = np.asarray(nib.load(by_id["p0"]["reference"]).dataobj)
    np.testing.assert_array_equal(images.reference, reference)  # canonical RAS already: stored as it is
    assert result.summary["dice"]["not_flagged"]["n"] + result.summary["dice"]["flagged"]["n"] == 3


def test_scans_read_from_dicom_are_read_again_for_review(box_model: Path, tmp_path: Path) -> None:
    """A DICOM series predicted from a DICOM folder: review reads the series again and draws the
    mask on the scan's voxels."""
    from conftest import nifti_to_dicom_series

    from medseg.stages.predict import predict
    from medseg.stages.review import load_entry

    image, _ = boxes(np.random.default_rng(11))
    source = write_nifti(tmp_path / "boxes.nii.gz", np.round(image * 100).astype(np.int16), np.diag([-1.0, -1.0, 1.0, 1.0]))
    nifti_to_dicom_series(source, tmp_path / "dicom" / "series1")
    result = predict(tmp_path / "dicom", tmp_path / "pred", [str(box_model)])
    (case_id,) = [p.name.removesuffix(".nii.gz") for p in result.written]
    built = review([tmp_path / "pred"], tmp_path / "review")
    (entry,) = built.entries
    assert entry["scan_kind"] == "dicom" and len(entry["scan"]) == SHAPE[2] and entry["problem"] is None
    assert entry["overview"] == f"cases/{case_id}.png"
    images = load_entry(entry, ReviewConfig())
    expected = nib.as_closest_canonical(nib.load(str(source)))
    np.testing.assert_allclose(images.image, np.asarray(expected.dataobj), atol=1e-3)
    mask = nib.as_closest_canonical(nib.load(str(tmp_path / "pred" / f"{case_id}.nii.gz")))
    np.testing.assert_array_equal(images.mask, np.asarray(mask.dataobj))


def test_verdicts_are_logged_to_the_registered_model_versions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("review", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment)
    client.set_terminated(run.info.run_id)
    client.create_registered_model("boxes")
    version = client.create_model_version("boxes", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("boxes", "champion", version.version)
    folder, metrics = _predictions(tmp_path)
    (folder / "predict.json").write_text(json.dumps({"models": [{"model": "models:/boxes@champion"},
                                                                {"model": "models:/gone/3"},
                                                                {"model": str(tmp_path / "best.pt")}]}))
    out = tmp_path / "review"
    review([folder], out, evaluation=metrics)
    verdicts.record(out, "two", "reject", mask_sha256=sha256(folder / "two.nii.gz"))
    verdicts.record(out, "edge", "fix", mask_sha256=sha256(folder / "edge.nii.gz"))
    verdicts.record(out, "clean", "accept", mask_sha256="0" * 64)  # on an earlier mask
    assert main(["review", "--output", str(out), "--log-mlflow", "--tracking-uri", uri]) == 0
    assert "verdicts logged to 1 registered model version(s): models:/boxes@champion" in capsys.readouterr().out
    tags = client.get_model_version("boxes", version.version).tags
    assert {k: v for k, v in tags.items() if k.startswith("review.") and k != "review.folder"} == {
        "review.accept": "0", "review.fix": "1", "review.reject": "1", "review.open": "1", "review.outdated": "1",
        "review.cases": "4",  # the failed case and the one whose scan is gone have no mask to judge
    }
    assert tags["review.folder"] == str(out.resolve())
    assert [a.path for a in client.list_artifacts(run.info.run_id, "review")] == ["review/verdicts.csv"]


def test_review_saliency_of_a_real_model_on_the_viewed_slice(box_model: Path, tmp_path: Path) -> None:
    """The saliency layer: the box model's gradient map of a class on one slice, on the scan's grid, cached."""
    from medseg.review import saliency
    from medseg.review.server import make_server
    from medseg.stages.predict import predict

    image, _ = boxes(np.random.default_rng(11))
    write_nifti(tmp_path / "new" / "case.nii.gz", image)
    predict(tmp_path / "new", tmp_path / "pred", [str(box_model)])
    review([tmp_path / "pred"], tmp_path / "review")
    srv = make_server(tmp_path / "review", port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        status, _, body = _request(srv.server_address, "GET", "/saliency/case.nii.gz?label=1&view=axial&index=16")
        assert status == 200
        values = np.asarray(nib.Nifti1Image.from_bytes(__import__("gzip").decompress(body)).dataobj)
        assert values.shape == SHAPE and np.isfinite(values).all() and values.max() == 1.0 and values.min() >= 0
        # the window is centred on the slice: the map reaches slices near it, not the far end of the scan
        per_slice = values.sum(axis=(0, 1))
        assert per_slice[16] > 0 and per_slice[14:19].sum() > per_slice[:3].sum()
        (cached,) = (tmp_path / "review" / saliency.FOLDER).glob("*.nii.gz")
        assert cached.read_bytes() == body
        assert _request(srv.server_address, "GET", "/saliency/case.nii.gz?label=1&view=axial&index=16")[2] == body
        status, _, body = _request(srv.server_address, "GET", "/saliency/case.nii.gz?label=9&view=axial&index=1")
        assert status == 400 and b"expected a class from 1 to" in body
        status, _, body = _request(srv.server_address, "GET", "/saliency/case.nii.gz?label=1&view=up&index=1")
        assert status == 400 and b"expected /saliency/" in body
    finally:
        srv.shutdown()
        srv.server_close()
