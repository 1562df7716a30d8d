"""The Snakemake workflow for real: lint, dry runs, and a whole run on real hippocampus cases."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import CASES, HELD_OUT, REPO, _env, hippocampus_subset, snakemake

def planned_rules(output: str) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a dry run."""
    table = output.split("Job stats:")[-1]
    counts = {}
    for line in table.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s*$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def test_lint(venv_bin: Path, tmp_path: Path) -> None:
    proc = snakemake(venv_bin, tmp_path, "--lint", "--config", f"dataset={tmp_path}", check=False)
    lints = set(re.findall(r"^\s+\* (.+?):?$", proc.stdout + proc.stderr, flags=re.M))
    # medseg and its tools install into one virtual environment, not one conda env per rule.
    assert lints <= {"Specify a conda environment or container for each rule."}, proc.stdout + proc.stderr


def test_dry_run_shows_every_stage(venv_bin: Path, shared_data: Path, tmp_path: Path) -> None:
    dataset = hippocampus_subset(shared_data, tmp_path / "hippo", CASES)
    proc = snakemake(venv_bin, tmp_path, "-n", "--config", f"dataset={dataset}")
    assert planned_rules(proc.stdout + proc.stderr) == {
        "all": 1, "ingest": 1, "plan": 1, "preprocess": 1, "train": 1, "predict": 1, "evaluate": 1, "review": 1,
    }


def test_full_recipe_trains_predicts_and_scores_all_five_folds(venv_bin: Path, shared_data: Path, tmp_path: Path) -> None:
    """configs/experiments/hippocampus-full.yaml as the README runs it: a job per fold to train and to
    predict its held-out cases, all of them scored together."""
    dataset = hippocampus_subset(shared_data, tmp_path / "hippo", CASES)
    cmd = [str(venv_bin / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--cores", "2", "--configfile", str(REPO / "configs" / "experiments" / "hippocampus-full.yaml"),
           "-n", "--config", f"dataset={dataset}", "results=results-full"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(venv_bin), timeout=600, check=True)
    assert planned_rules(proc.stdout + proc.stderr) == {
        "all": 1, "ingest": 1, "plan": 1, "preprocess": 1, "train": 5, "predict": 5, "evaluate": 1, "review": 1,
    }
    for fold in range(5):
        assert f"results-full/train/fold_{fold}/model.json" in proc.stdout


def test_unknown_config_key_stops_before_any_job(venv_bin: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    proc = snakemake(venv_bin, tmp_path, "-n", check=False, configs=(bad,))
    assert proc.returncode != 0
    assert "epochz" in proc.stdout + proc.stderr


def test_outputs(finished: Path) -> None:
    results = finished / "data" / "results"
    summary = json.loads((results / "evaluation" / "summary.json").read_text())
    splits = json.loads((results / "plan" / "splits.json").read_text())
    assert summary["n_cases"] == len(splits[0]["val"]) == 3
    assert 0.0 <= summary["mean_dice"] <= 1.0
    assert set(summary["classes"]) == {"Anterior", "Posterior"}
    rows = (results / "evaluation" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2
    assert (results / "evaluation" / "metrics.png").stat().st_size > 1000
    for case in splits[0]["val"]:
        mask = nib.load(str(results / "predictions" / "fold_0" / f"{case}.nii.gz"))
        scan = nib.load(str(finished / "hippo" / "imagesTr" / f"{case}.nii.gz"))
        assert mask.shape == scan.shape
        np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-6)
    for rule in ("ingest", "plan", "preprocess", "train", "predict", "evaluate", "review"):
        assert list((results / "logs" / rule).glob("*.log")), rule
    queue = json.loads((results / "review" / "queue.json").read_text())["cases"]
    assert sorted(e["case_id"] for e in queue) == sorted(splits[0]["val"])
    for entry in queue:  # the scan predict recorded, the ingested label as reference, evaluate's Dice
        assert entry["problem"] is None and entry["scan"][0].startswith(str(results / "ingest"))
        assert entry["reference"] and entry["metrics"]["mean_dice"] is not None
        assert (results / "review" / entry["overview"]).stat().st_size > 1000
    review = json.loads((results / "review" / "review.json").read_text())
    assert review["n_cases"] == 3 and review["verdicts"] == {"open": 3}
    assert "medseg review" in (results / "review" / "index.html").read_text()


def test_mlflow_run_and_registered_model(finished: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{finished / 'data' / 'results' / 'mlflow.db'}")
    (version,) = client.search_model_versions("name = 'medseg-smoke'")
    fold_run = client.get_run(version.run_id)
    assert fold_run.data.params["train.epochs"] == "2"
    assert fold_run.data.params["plan.patch_size"]
    assert fold_run.data.tags["snakemake.rule"] == "train"
    assert fold_run.data.tags["manifest.digest"]
    assert len(client.get_metric_history(version.run_id, "train_loss")) == 2
    parent_id = fold_run.data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    assert "eval_mean_dice" in parent.data.metrics
    assert parent.data.params["train.epochs"] == "2" and parent.data.params["plan.normalization"] == "zscore"
    assert len(parent.data.tags["git.commit"]) == 40
    artifacts = {a.path for a in client.list_artifacts(parent_id, "evaluation")}
    assert artifacts == {"evaluation/metrics.csv", "evaluation/summary.json", "evaluation/metrics.png",
                         "evaluation/postprocessing.json"}
    assert {a.path for a in client.list_artifacts(version.run_id, "config")} == {"config/plan.json", "config/train_config.json"}


def test_predict_command_uses_latest_registered_model(finished: Path, shared_data: Path, venv_bin: Path) -> None:
    scans = finished / "new_scans"
    scans.mkdir()
    for case in HELD_OUT:
        (scans / f"{case}.nii.gz").symlink_to(shared_data / "hippocampus" / "imagesTr" / f"{case}.nii.gz")
    proc = subprocess.run(
        [str(venv_bin / "medseg"), "predict", "--input", str(scans), "--output", "masks"],
        cwd=finished, capture_output=True, text=True, env=_env(venv_bin), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "models:/medseg-smoke/1" in proc.stderr
    for case in HELD_OUT:
        mask = nib.load(str(finished / "masks" / f"{case}.nii.gz"))
        scan = nib.load(str(scans / f"{case}.nii.gz"))
        assert mask.shape == scan.shape
        np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-6)


def test_predict_command_with_alias(finished: Path, shared_data: Path, venv_bin: Path) -> None:
    import mlflow

    uri = f"sqlite:///{finished / 'data' / 'results' / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).set_registered_model_alias("medseg-smoke", "champion", "1")
    scan = shared_data / "hippocampus" / "imagesTr" / f"{HELD_OUT[0]}.nii.gz"
    out = finished / "alias_masks"
    proc = subprocess.run(
        [str(venv_bin / "medseg"), "predict", "--input", str(scan.parent), "--cases", HELD_OUT[0],
         "--model", "models:/medseg-smoke@champion", "--tracking-uri", uri, "--output", str(out)],
        cwd=finished, capture_output=True, text=True, env=_env(venv_bin), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.glob("*.nii.gz")] == [f"{HELD_OUT[0]}.nii.gz"]
    expected = [f"{HELD_OUT[0]}.nii.gz", "cases.csv", "predict.json", "qc"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    bad = subprocess.run(
        [str(venv_bin / "medseg"), "predict", "--input", str(scan.parent), "--cases", HELD_OUT[0],
         "--model", "models:/medseg-smoke/99", "--tracking-uri", uri, "--output", str(out)],
        cwd=finished, capture_output=True, text=True, env=_env(venv_bin), timeout=600,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("medseg predict: error: cannot load model models:/medseg-smoke/99")


def test_registered_model_predicts_through_mlflow_models_predict(finished: Path, shared_data: Path, venv_bin: Path,
                                                                  tmp_path: Path) -> None:
    """The registered model is a pyfunc: MLflow's own command takes scan paths and writes the masks."""
    from medseg.stages.predict import predict

    uri = f"sqlite:///{finished / 'data' / 'results' / 'mlflow.db'}"
    scan = shared_data / "hippocampus" / "imagesTr" / f"{HELD_OUT[1]}.nii.gz"
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"dataframe_records": [{"image": str(scan)}],
                                   "params": {"output_dir": str(tmp_path / "masks")}}))
    env = {**_env(venv_bin), "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run(
        [str(venv_bin / "mlflow"), "models", "predict", "-m", "models:/medseg-smoke/1", "-t", "json",
         "-i", str(request), "-o", str(tmp_path / "answer.json"), "--env-manager", "local"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = json.loads((tmp_path / "answer.json").read_text())["predictions"]
    assert row["case"] == HELD_OUT[1] and row["error"] == ""
    assert row["mask"] == str(tmp_path / "masks" / f"{HELD_OUT[1]}.nii.gz")
    mask = nib.load(row["mask"])
    assert mask.shape == nib.load(str(scan)).shape
    predict(scan.parent, tmp_path / "reference", ["models:/medseg-smoke/1"], case_ids=[HELD_OUT[1]], tracking_uri=uri)
    expected = nib.load(str(tmp_path / "reference" / f"{HELD_OUT[1]}.nii.gz"))
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(expected.dataobj))


def test_predict_command_predicts_as_the_model_was_validated(finished: Path, venv_bin: Path, tmp_path: Path) -> None:
    """The README's command for new scans, with a model and no config, uses the settings the model was
    validated with (the experiment's flips and the cross-validated largest-component decision): its masks
    of fold 0's validation cases are the workflow's validation masks after that decision, voxel for voxel,
    from the registered model and from the checkpoint folder alike; a setting given still wins."""
    import mlflow

    from medseg.postprocess import keep_largest_component, read_decision
    from medseg.stages.evaluate import validated_dice

    results = finished / "data" / "results"
    decision = read_decision(results / "evaluation" / "postprocessing.json")
    record = json.loads((results / "train" / "fold_0" / "validated.json").read_text())
    assert record["settings"] == {"overlap": 0.5, "gaussian": True, "tta_flips": True,
                                  "largest_component": list(decision)}  # smoke.yaml's flips, not the default
    summary = json.loads((results / "evaluation" / "summary.json").read_text())
    post = json.loads((results / "evaluation" / "postprocessing.json").read_text())
    assert record["mean_dice"] == pytest.approx(validated_dice(summary, post), abs=1e-12)
    assert record["n_cases"] == summary["n_cases"] == 3
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    tags = client.get_model_version("medseg-smoke", "1").tags
    assert tags["medseg.validated_dice"] == f"{record['mean_dice']:.4f}"
    assert json.loads(tags["medseg.validated_settings"]) == record["settings"]

    val = json.loads((results / "plan" / "splits.json").read_text())[0]["val"]
    scans = tmp_path / "scans"  # the scans the workflow predicted them from, as a user's folder
    scans.mkdir()
    for case in val:
        (scans / f"{case}.nii.gz").symlink_to(results / "ingest" / "images" / f"{case}.nii.gz")

    def medseg_predict(out: str, *extra: str) -> tuple[dict, str]:
        proc = subprocess.run([str(venv_bin / "medseg"), "predict", "--input", str(scans), "--output", out, *extra],
                              cwd=finished, capture_output=True, text=True, env=_env(venv_bin), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / out / "predict.json").read_text()), proc.stderr

    for out, extra in (("registry", ()), ("checkpoint", ("--model", str(results / "train" / "fold_0" / "best.pt")))):
        made, stderr = medseg_predict(str(tmp_path / out), *extra)
        assert "was validated with (mean Dice" in stderr, stderr[-3000:]
        assert made["validated"]["taken"] == ["gaussian", "largest_component", "overlap", "tta_flips"]
        assert made["validated"]["given"] == [] and made["validated"]["n_cases"] == 3
        assert made["config"]["tta_flips"] is True and made["config"]["largest_component"] == list(decision)
        for case in val:
            workflow = np.asarray(nib.load(str(results / "predictions" / "fold_0" / f"{case}.nii.gz")).dataobj)
            expected = keep_largest_component(workflow.copy(), decision)
            np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / out / f"{case}.nii.gz")).dataobj),
                                          expected, err_msg=f"{out}: {case}")

    made, _ = medseg_predict(str(tmp_path / "given"), "--params", '{"tta_flips": false}')
    assert made["config"]["tta_flips"] is False and made["config"]["largest_component"] == list(decision)
    assert made["validated"]["given"] == ["tta_flips"] and "tta_flips" not in made["validated"]["taken"]
    made, stderr = medseg_predict(str(tmp_path / "configured"), "--config", str(REPO / "configs" / "config.yaml"))
    assert made["validated"] is None and made["config"]["tta_flips"] is False and made["config"]["largest_component"] == []
    assert "not those models:/medseg-smoke/1 was validated with" in stderr


def test_train_change_reruns_only_train_and_after(finished: Path, venv_bin: Path) -> None:
    proc = snakemake(venv_bin, finished, "-n", "--config", f"dataset={finished / 'hippo'}")
    assert "Nothing to be done" in proc.stdout + proc.stderr
    change = finished / "longer.yaml"
    change.write_text("train:\n  epochs: 3\n")
    proc = snakemake(venv_bin, finished, "-n", "--config", f"dataset={finished / 'hippo'}", configs=(change,))
    assert planned_rules(proc.stdout + proc.stderr) == {"all": 1, "train": 1, "predict": 1, "evaluate": 1,
                                                        "review": 1}


def test_select_compares_with_another_finished_run(finished: Path, venv_bin: Path) -> None:
    """select.compare_with adds one job: this run against another run's out-of-fold evaluation."""
    import csv

    results = finished / "data" / "results"
    other = finished / "worse"  # another run: the same cases, every Dice 0.1 lower
    (other / "evaluation").mkdir(parents=True)
    (other / "train" / "fold_0").mkdir(parents=True)
    shutil.copyfile(results / "train" / "fold_0" / "model.json", other / "train" / "fold_0" / "model.json")
    with (results / "evaluation" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["dice"] = str(float(row["dice"]) - 0.1)
    with (other / "evaluation" / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    change = finished / "select.yaml"
    change.write_text(f"select:\n  name: smoke\n  compare_with:\n    worse: {other}\n")
    args = ("--config", f"dataset={finished / 'hippo'}")
    proc = snakemake(venv_bin, finished, "-n", *args, configs=(change,))
    assert planned_rules(proc.stdout + proc.stderr) == {"all": 1, "select": 1}
    snakemake(venv_bin, finished, *args, configs=(change,))
    selection = json.loads((results / "selection.json").read_text())
    assert selection["chosen"] == "smoke"
    assert selection["margin"] == pytest.approx(0.1, abs=1e-9)
    mean = json.loads((results / "evaluation" / "summary.json").read_text())["mean_dice"]
    assert selection["candidates"]["smoke"]["mean_dice"] == pytest.approx(mean, abs=1e-9)


def test_configurations_train_in_the_same_workflow_and_the_best_is_selected(finished: Path, venv_bin: Path) -> None:
    """select.configurations: the workflow trains, predicts and evaluates two more configurations on this
    run's fold and split (planning and preprocessing again only for the one that changes the plan), and
    select picks the best of the three by its out-of-fold Dice."""
    import mlflow
    import torch

    results = finished / "data" / "results"
    change = finished / "configurations.yaml"
    change.write_text("select:\n  name: smoke\n  configurations:\n"
                      "    wider:\n      train: {network: {channels: [8, 16]}}\n"
                      "    twod:\n      plan: {dims: 2}\n")
    args = ("--config", f"dataset={finished / 'hippo'}")
    proc = snakemake(venv_bin, finished, "-n", *args, configs=(change,))
    assert planned_rules(proc.stdout + proc.stderr) == {
        "all": 1, "plan_configuration": 1, "preprocess_configuration": 1, "train_configuration": 2,
        "predict_configuration": 2, "evaluate_configuration": 2, "select": 1,
    }
    snakemake(venv_bin, finished, *args, configs=(change,))
    configurations = results / "configurations"
    assert json.loads((configurations / "twod" / "plan" / "plan.json").read_text())["dims"] == 2
    assert not (configurations / "wider" / "plan").exists()  # it took this run's plan and cases
    wider = torch.load(configurations / "wider" / "train" / "fold_0" / "last.pt", weights_only=False)
    assert wider["spec"]["network"]["channels"] == [8, 16]
    assert (json.loads((configurations / "twod" / "plan" / "splits.json").read_text())
            == json.loads((results / "plan" / "splits.json").read_text()))
    means = {name: json.loads((folder / "evaluation" / "summary.json").read_text())["mean_dice"]
             for name, folder in {"smoke": results, "wider": configurations / "wider",
                                  "twod": configurations / "twod"}.items()}
    selection = json.loads((results / "selection.json").read_text())
    assert set(selection["candidates"]) == set(means)
    for name, mean in means.items():
        assert selection["candidates"][name]["mean_dice"] == pytest.approx(mean, abs=1e-9)
    assert selection["chosen"] == max(means, key=lambda n: (means[n], -list(means).index(n)))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    for name in ("wider", "twod"):
        (version,) = client.search_model_versions(f"name = 'medseg-smoke-{name}'")
        assert client.get_run(version.run_id).data.tags["snakemake.rule"] == "train_configuration"
    assert len(client.search_model_versions("name = 'medseg-smoke'")) == 1  # the main model: not re-registered
    for name in ("wider", "twod"):  # each configuration's model carries its own validation
        record = json.loads((configurations / name / "train" / "fold_0" / "validated.json").read_text())
        assert record["mean_dice"] is not None
        assert Path(record["evaluation"]) == (configurations / name / "evaluation").resolve()


def test_predict_rule_resumes_a_folder_left_unfinished(finished: Path, venv_bin: Path) -> None:
    """The predict rule's output is cases.csv, not the folder: after a kill (simulated: the table, the
    last case and the evaluation that never ran gone), Snakemake reruns the rule, and predict keeps the
    finished cases."""
    results = finished / "data" / "results"
    folder = results / "predictions" / "fold_0"
    cases = sorted(p.stem for p in (folder / "qc").glob("*.json"))
    assert len(cases) == 3
    (folder / "cases.csv").unlink()
    (folder / "qc" / f"{cases[-1]}.json").unlink()
    (folder / f"{cases[-1]}.nii.gz").unlink()
    (results / "evaluation" / "summary.json").unlink()
    kept = {c: (folder / f"{c}.nii.gz").stat().st_mtime_ns for c in cases[:-1]}
    from medseg.io import sha256
    from medseg.review import verdicts

    verdicts.record(results / "review", cases[0], "accept", mask_sha256=sha256(folder / f"{cases[0]}.nii.gz"))
    args = ("--config", f"dataset={finished / 'hippo'}")
    proc = snakemake(venv_bin, finished, "-n", *args)
    assert planned_rules(proc.stdout + proc.stderr) == {"all": 1, "predict": 1, "evaluate": 1, "review": 1}, \
        proc.stdout + proc.stderr
    snakemake(venv_bin, finished, *args)
    # the review was rebuilt and kept the verdict on the mask that was not predicted again
    assert json.loads((results / "review" / "review.json").read_text())["verdicts"] == {"accept": 1, "open": 2}
    log = (results / "logs" / "predict" / "fold_0.log").read_text()
    assert "2 of 3 cases were done by an earlier run of these models; predicting the other 1" in log
    assert {c: (folder / f"{c}.nii.gz").stat().st_mtime_ns for c in cases[:-1]} == kept
    assert (folder / f"{cases[-1]}.nii.gz").is_file()
    rows = (folder / "cases.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == cases


def test_new_scans_are_predicted_in_shards_with_the_cross_validated_postprocessing(
        finished: Path, shared_data: Path, venv_bin: Path) -> None:
    from medseg.postprocess import read_decision

    results = finished / "data" / "results"
    scans = finished / "incoming"
    scans.mkdir()
    for case in HELD_OUT:
        (scans / f"{case}.nii.gz").symlink_to(shared_data / "hippocampus" / "imagesTr" / f"{case}.nii.gz")
    change = finished / "new.yaml"
    change.write_text(f"new_scans:\n  input: {scans}\n  shards: 2\n")
    args = ("--config", f"dataset={finished / 'hippo'}")
    proc = snakemake(venv_bin, finished, "-n", *args, configs=(change,))
    assert planned_rules(proc.stdout + proc.stderr) == {"all": 1, "predict_new_shard": 2, "predict_new": 1,
                                                        "review_new": 1}
    snakemake(venv_bin, finished, *args, configs=(change,))

    out = results / "new_scans"
    rows = (out / "cases.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == HELD_OUT
    logs = results / "logs" / "predict_new"
    for shard in (0, 1):
        assert "predicting 1 scans with 1 model(s)" in (logs / f"shard_{shard}.log").read_text()
    assert "2 of 2 cases were done by an earlier run" in (logs / "all.log").read_text()
    decision = read_decision(results / "evaluation" / "postprocessing.json")
    record = json.loads((out / "predict.json").read_text())
    assert record["config"]["largest_component"] == list(decision)
    assert record["config"]["tta_flips"] is True and "largest_component" in record["validated"]["taken"]
    assert [m["model"] for m in record["models"]] == ["models:/medseg-smoke/1"]
    for case in HELD_OUT:
        assert nib.load(str(out / f"{case}.nii.gz")).shape == nib.load(str(scans / f"{case}.nii.gz")).shape
    queue = json.loads((out / "review" / "queue.json").read_text())["cases"]
    assert sorted(e["case_id"] for e in queue) == sorted(HELD_OUT)
    assert all(e["problem"] is None and e["metrics"] is None and e["overview"] for e in queue)
