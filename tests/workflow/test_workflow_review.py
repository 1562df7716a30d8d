"""ingest.reviewed in the workflow: a review folder's queue and verdicts are inputs of ingest, so a
new verdict reruns ingest and what follows."""

from __future__ import annotations

import os
import re
from pathlib import Path

from conftest import CASES, hippocampus_subset, snakemake

from medseg.workflow import reviewed_inputs

PAST = 1_700_000_000  # 2023: older than any output the test writes


def _ingest_job(output: str) -> str:
    """The ingest job's block of a dry run ('' when it is not planned)."""
    found = re.search(r"^rule ingest:\n((?:\s{4}.*\n)+)", output, flags=re.MULTILINE)
    return found.group(1) if found else ""


def test_review_inputs_of_ingest_are_each_folders_queue_and_verdicts(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "verdicts.csv").write_text("case_id\n")
    config = {"ingest": {"reviewed": [str(tmp_path / "a"), str(tmp_path / "b")]}}
    assert reviewed_inputs(config) == [str(tmp_path / "a" / "queue.json"), str(tmp_path / "a" / "verdicts.csv"),
                                       str(tmp_path / "b" / "queue.json")]


def test_review_verdict_reruns_ingest(venv_bin: Path, shared_data: Path, tmp_path: Path) -> None:
    dataset = hippocampus_subset(shared_data, tmp_path / "hippo", CASES)
    review = tmp_path / "earlier" / "review"
    review.mkdir(parents=True)
    (review / "queue.json").write_text('{"cases": []}\n')
    extra = tmp_path / "reviewed.yaml"
    extra.write_text(f"ingest:\n  reviewed: [{review}]\n")
    manifest = "data/results/ingest/manifest.json"

    def dry_run() -> str:
        proc = snakemake(venv_bin, tmp_path, "-n", manifest, "--config", f"dataset={dataset}", configs=(extra,))
        return proc.stdout + proc.stderr

    job = _ingest_job(dry_run())
    assert f"{review}/queue.json" in job and "verdicts.csv" not in job  # no verdict yet
    (tmp_path / manifest).parent.mkdir(parents=True)
    (tmp_path / manifest).write_text("{}\n")  # ingest done after the review was built
    for path in (dataset, review / "queue.json"):
        os.utime(path, (PAST, PAST))
    assert "Nothing to be done" in dry_run()
    (review / "verdicts.csv").write_text("case_id,verdict\nhippocampus_002,accept\n")  # a reviewer's verdict
    job = _ingest_job(dry_run())
    assert f"{review}/verdicts.csv" in job
    assert f"reason: Updated input files: {review}/verdicts.csv" in job


def _api(address: tuple[str, int], method: str, path: str, token: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection(*address, timeout=60)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {token}", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def test_review_through_the_server_makes_the_next_runs_training_cases(
        finished: Path, shared_data: Path, venv_bin: Path, tmp_path: Path) -> None:
    """predict new scans with the registered model -> one accepted, one corrected, one rejected through the
    server's API -> the next run's manifest holds exactly the accepted and the corrected case, with their
    provenance, and their labels are those masks voxel for voxel."""
    import gzip
    import json
    import subprocess
    import threading

    import nibabel as nib
    import numpy as np
    from conftest import _env

    from medseg.manifest import load_manifest
    from medseg.review.server import make_server

    new = ["hippocampus_024", "hippocampus_025", "hippocampus_026"]
    scans = tmp_path / "scans"
    scans.mkdir()
    for case in new:
        (scans / f"{case}.nii.gz").symlink_to(shared_data / "hippocampus" / "imagesTr" / f"{case}.nii.gz")
    model = "models:/medseg-smoke/1"  # named: other workflow tests register models after it
    for command in (["predict", "--input", str(scans), "--output", str(tmp_path / "pred"), "--model", model],
                    ["review", "--predictions", str(tmp_path / "pred"), "--output", str(tmp_path / "review")]):
        proc = subprocess.run([str(venv_bin / "medseg"), *command], cwd=finished, capture_output=True, text=True,
                              env=_env(venv_bin), timeout=600)
        assert proc.returncode == 0, proc.stderr
    tokens = {"ann": "ann-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}
    server = make_server(tmp_path / "review", port=0, tokens=tokens)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = server.server_address
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        assert _api(address, "POST", f"/case/{new[0]}/verdict", tokens["ann"], b"verdict=accept", form)[0] == 303
        assert _api(address, "POST", f"/case/{new[2]}/verdict", tokens["ann"], b"verdict=reject", form)[0] == 303
        status, body = _api(address, "GET", f"/volume/{new[1]}/mask.nii.gz", tokens["bob"])
        shown = nib.Nifti1Image.from_bytes(gzip.decompress(body))
        drawn = np.asarray(shown.dataobj).copy()
        drawn[drawn == 2] = 0  # bob removes the posterior part and paints a box of it elsewhere
        drawn[2:6, 2:6, 2:6] = 2
        base = json.loads(_api(address, "GET", f"/case/{new[1]}/history.json", tokens["bob"])[1])["shown_sha256"]
        status, answer = _api(address, "POST", f"/case/{new[1]}/correction", tokens["bob"],
                              gzip.compress(nib.Nifti1Image(drawn, shown.affine).to_bytes()), {"X-Base-SHA256": base})
        assert status == 200, answer
        correction = tmp_path / "review" / json.loads(answer)["correction"]
    finally:
        server.shutdown()
        server.server_close()

    extra = tmp_path / "reviewed.yaml"
    extra.write_text(f"ingest:\n  reviewed: [{tmp_path / 'review'}]\n")
    dataset = hippocampus_subset(shared_data, tmp_path / "hippo", CASES)
    snakemake(venv_bin, tmp_path, "-p", "data/results/ingest/manifest.json", "--config", f"dataset={dataset}",
              configs=(extra,))  # -p ends the list of config files before the target
    path = tmp_path / "data" / "results" / "ingest" / "manifest.json"
    manifest, _ = load_manifest(path)
    reviewed = {c["case_id"]: c for c in manifest.reviewed_cases()}
    assert sorted(reviewed) == new[:2] and len(manifest.cases) == len(CASES) + 2
    assert (reviewed[new[0]]["origin"], reviewed[new[0]]["reviewer"], reviewed[new[0]]["predicted_by"]) == (
        "accepted", "ann", [model])
    assert (reviewed[new[1]]["origin"], reviewed[new[1]]["corrected_by"], reviewed[new[1]]["predicted_by"]) == (
        "corrected", "bob", [model])
    for case, mask in ((new[0], tmp_path / "pred" / f"{new[0]}.nii.gz"), (new[1], correction)):
        record = manifest.case(case)
        label = nib.as_closest_canonical(nib.load(str(path.parent / record.label)))
        expected = nib.as_closest_canonical(nib.load(str(mask)))
        np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(expected.dataobj))
        np.testing.assert_allclose(label.affine, expected.affine, atol=1e-4)
    corrected = np.asarray(nib.load(str(correction)).dataobj)
    np.testing.assert_array_equal(corrected, drawn)  # the saved correction is what bob drew
