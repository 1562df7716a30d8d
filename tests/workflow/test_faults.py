"""Faults: the Snakemake driver killed mid-run, a full disk, and a training killed again and again.

- The DICOM workflow of ``identified_dicom`` is killed with SIGKILL once its train job has written a
  checkpoint. Its jobs outlive the driver (Snakemake does not take them down), so they are killed
  too, as the loss of the machine or of the job's allocation would. The same command then stops at
  Snakemake's lock; ``--unlock`` and the command with ``--rerun-incomplete`` (what Snakemake asks
  for) finish the run: only the jobs that had not finished run again, and every file reads back.
- ``medseg ingest`` writes into a 1 MiB tmpfs that a filler file leaves 224 KiB of: one line names
  the file and the full disk, nothing half-written is left, and once the filler is gone the same
  command writes every case.
- ``medseg train`` is killed with SIGKILL at three moments drawn from a seeded RNG and resumed with
  ``--resume`` each time: the result is the uninterrupted training's, in one MLflow run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import _env, synthetic_msd
from identified_dicom import KilledRun, files_of, killed_and_resumed
from test_workflow import planned_rules

# A temporary of medseg.io.atomic_path: .<name>.<pid>-<host>.<random><suffixes>
TEMPORARY = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.[a-z0-9_]{8}")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, venv_bin: Path, campaign: Future[Campaign]) -> KilledRun:
    """The killed and resumed workflow (the training's kill campaign goes on beside it)."""
    return killed_and_resumed(tmp_path_factory, venv_bin)


def test_killed_workflow_reruns_only_what_was_not_finished(run: KilledRun) -> None:
    print(f"driver killed {run.killed_after_s:.1f} s after its start; jobs it left running: {run.orphans}")
    assert any("medseg train" in c for c in run.orphans), run.orphans  # the job outlives its driver
    at_kill = run.at_kill
    assert "train/fold_0/last.pt" in at_kill and "train/fold_0/model.json" not in at_kill  # killed mid-train
    assert run.same_command is not None and run.same_command.returncode != 0
    assert "--unlock" in run.same_command.stderr  # Snakemake's lock, left by the killed driver
    assert run.rerun is not None and run.rerun.returncode == 0, run.rerun.stderr[-4000:]
    output = run.rerun.stdout + run.rerun.stderr
    assert planned_rules(output) == {"train": 1, "predict": 1, "evaluate": 1, "review": 1, "all": 1}, output[-3000:]
    print(f"rerun ({run.rerun_s:.1f} s, with the refused same command and --unlock): {planned_rules(output)}")
    now = files_of(run.results)
    finished = {f: v for f, v in at_kill.items() if f.split("/")[0] in ("ingest", "plan", "preprocessed")}
    assert len(finished) == 4 * 3 + 2 + 2 + 4 + 1  # images, sidecars, labels, manifest, report; plan, splits; cases, index
    assert {f: now.get(f) for f in finished} == finished  # the same files (inode), not written again (mtime)
    history = json.loads((run.results / "train/fold_0/history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert "resuming fold 0 at epoch" in (run.results / "logs/train/fold_0.log").read_text()


def read_back(path: Path) -> None:
    """Read ``path`` whole by its kind (a damaged file raises)."""
    name = path.name
    if name.endswith((".nii.gz", ".nii")):
        np.asanyarray(nib.load(str(path)).dataobj)  # every voxel: gzip checks its CRC at the end
    elif name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".csv"):
        rows = list(csv.reader(path.open(newline="")))
        assert rows and all(len(r) == len(rows[0]) for r in rows), path
    elif name.endswith(".pt"):
        torch.load(path, weights_only=False)
    elif name.endswith(".npz"):
        with np.load(path) as data:
            [data[k] for k in data.files]
    elif name.endswith(".db"):
        import sqlite3

        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            assert db.execute("pragma integrity_check").fetchone() == ("ok",), path
    elif name.endswith(".dcm"):
        import pydicom

        pydicom.dcmread(path).pixel_array  # noqa: B018
    elif name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as image:
            image.load()
    elif name.endswith((".log", ".html", ".txt", ".yaml", ".py", "MLmodel", ".lock")) or path.parent.name == "metadata":
        path.read_text()
    else:
        assert path.stat().st_size > 0, path


def test_killed_workflow_leaves_every_file_whole_and_no_temporary(run: KilledRun) -> None:
    files = [p for p in sorted(run.work.rglob("*")) if p.is_file()]
    kinds: dict[str, int] = {}
    for path in files:
        read_back(path)
        kind = (".nii.gz" if path.name.endswith(".nii.gz") else "snakemake metadata" if path.parent.name == "metadata"
                else path.suffix or path.name)
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"{len(files)} files read back: {kinds}")
    assert {".nii.gz", ".json", ".csv", ".pt", ".npz", ".db", ".dcm", ".png", ".log"} <= set(kinds)
    temporaries = [str(p) for p in files if TEMPORARY.match(p.name)]
    hidden = [str(p.relative_to(run.results)) for p in run.results.rglob(".*")]
    assert temporaries == [] and hidden == ["train/.parent.lock"], (temporaries, hidden)


def test_killed_workflow_trains_in_one_mlflow_run(run: KilledRun) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run.results / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.fold = '0'")
    assert len(runs) == 1
    for key in ("train_loss", "lr", "val_dice"):
        assert [m.step for m in client.get_metric_history(runs[0].info.run_id, key)] == [1, 2, 3, 4, 5, 6], key
    assert len(client.search_model_versions("name = 'medseg-smoke'")) == 1


def test_a_temporary_left_by_a_killed_writer_goes_with_the_next_write(tmp_path: Path) -> None:
    """SIGKILL leaves atomic_path's temporary; the next write of the same target removes it once its
    writer is gone (a live writer's is kept), and no reader takes it for an output."""
    from medseg.io import is_nifti, save_nifti

    target = tmp_path / "case.nii.gz"
    code = (f"import time; from medseg.io import atomic_path\nwith atomic_path({str(target)!r}) as tmp:\n"
            " tmp.write_bytes(b'half a file'); print(tmp, flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        temporary = Path(child.stdout.readline().strip())
        assert temporary.parent == tmp_path and TEMPORARY.match(temporary.name), temporary
        assert not is_nifti(temporary)  # evaluate, which takes a folder's NIfTI files for masks, skips it
        save_nifti(target, np.zeros((2, 2, 2), np.uint8), np.eye(4))
        assert temporary.exists()  # its writer still runs
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert temporary.exists()  # SIGKILL runs no clean-up
        save_nifti(target, np.ones((2, 2, 2), np.uint8), np.eye(4))
        assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]
        assert np.asarray(nib.load(str(target)).dataobj).sum() == 8
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_store_killed_while_it_is_created_is_not_left_half_made(tmp_path: Path) -> None:
    """SIGKILL while MLflow builds a new SQLite store (the first training of a results folder): no store
    is left at its path (a half-made one would refuse every later run), only a temporary that the next
    creation drops (test_a_temporary_left_by_a_killed_writer_goes_with_the_next_write)."""
    db = tmp_path / "mlflow.db"
    code = f"from medseg.tracking import create_store_whole; create_store_whole('sqlite:///{db}')"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        while child.poll() is None and not list(tmp_path.iterdir()):
            time.sleep(0.005)
        time.sleep(0.3)  # among MLflow's table creations and migrations
        assert child.poll() is None, "the store was made before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not db.exists(), "a half-made store"
    assert len(list(tmp_path.glob(".mlflow.db.*.db"))) == 1  # (and maybe its -journal)


# The disk-full test: a tmpfs mounted in a mount namespace of the command's own (unshare -rm: root or not,
# where user namespaces are allowed), else, as root, in this one.
MOUNT_FAILED = 97
DISK_FULL_SCRIPT = f"""
set -u
mount -t tmpfs -o size=1m tmpfs "$OUT" || exit {MOUNT_FAILED}
trap 'umount "$OUT" 2>/dev/null' EXIT
head -c 800k /dev/zero > "$OUT/filler"
df -k "$OUT" | tail -1 > "$REC/df_full"
medseg ingest "$SRC" --out "$OUT/ingest" > "$REC/first.out" 2> "$REC/first.err"; echo $? > "$REC/first.rc"
cp -a "$OUT/ingest" "$REC/after_first"
rm "$OUT/filler"
medseg ingest "$SRC" --out "$OUT/ingest" > "$REC/second.out" 2> "$REC/second.err"; echo $? > "$REC/second.rc"
du -sk "$OUT/ingest" | cut -f1 > "$REC/du_second"
cp -a "$OUT/ingest" "$REC/after_second"
"""


def _in_small_tmpfs(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    tries = []
    commands = [["unshare", "-rm", "sh", "-c", DISK_FULL_SCRIPT]] if shutil.which("unshare") else []
    if os.geteuid() == 0:
        commands.append(["sh", "-c", DISK_FULL_SCRIPT])
    for command in commands:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
        if proc.returncode == 0:
            return proc
        tries.append(f"{' '.join(command[:2])}: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    pytest.fail("cannot mount a tmpfs for the disk-full test (needs root, or unshare -rm with user namespaces): "
                + ("; ".join(tries) or "no unshare and not root"))


def test_disk_full_is_one_line_leaves_nothing_half_written_and_the_rerun_completes(tmp_path: Path,
                                                                                   venv_bin: Path) -> None:
    src = synthetic_msd(tmp_path / "msd", n_cases=4, shape=(32, 32, 24))  # images of about 82 KiB packed
    out, rec = tmp_path / "tmpfs", tmp_path / "records"
    out.mkdir()
    rec.mkdir()
    proc = _in_small_tmpfs({**_env(venv_bin), "SRC": str(src), "OUT": str(out), "REC": str(rec)})
    first_rc, first_err = int((rec / "first.rc").read_text()), (rec / "first.err").read_text()
    print(f"tmpfs (KiB: size, used, free) with the filler: {(rec / 'df_full').read_text().split()[1:4]}; "
          f"first run exit {first_rc}: {first_err.strip().splitlines()[-1:]}; the full run's outputs: "
          f"{(rec / 'du_second').read_text().strip()} KiB", proc.stderr[-500:])
    assert first_rc == 2 and "Traceback" not in first_err
    errors = [line for line in first_err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors == first_err.strip().splitlines()[-1:], first_err[-3000:]
    match = re.fullmatch(rf"medseg ingest: error: cannot write ({re.escape(str(out))}/ingest/\S+\.nii\.gz): "
                         r"No space left on device: free some space and run the command again", errors[0])
    assert match, errors[0]
    left = [p for p in sorted((rec / "after_first").rglob("*")) if p.is_file()]
    named = Path(match.group(1)).relative_to(out / "ingest")
    assert left and not (rec / "after_first" / named).exists()  # the file it could not write is not there
    assert not (rec / "after_first" / "manifest.json").exists()
    assert not [p.name for p in left if p.name.startswith(".")]  # no temporary
    for path in left:  # what it did write is whole
        np.asanyarray(nib.load(str(path)).dataobj)

    assert int((rec / "second.rc").read_text()) == 0, (rec / "second.err").read_text()[-3000:]
    from medseg.manifest import load_manifest

    manifest, root = load_manifest(rec / "after_second" / "manifest.json")
    assert [c.case_id for c in manifest.cases] == [f"case_{i:03d}" for i in range(4)]
    for record in manifest.cases:
        for got, want in ((record.image, f"imagesTr/{record.case_id}.nii.gz"),
                          (record.label, f"labelsTr/{record.case_id}.nii.gz")):
            np.testing.assert_array_equal(np.asanyarray(nib.load(str(root / got)).dataobj),
                                          np.asanyarray(nib.load(str(src / want)).dataobj))
    assert not [p for p in (rec / "after_second").rglob(".*")]


# The training killed again and again: 12 epochs of 6 iterations, each validated and logged (which marks it).
EPOCHS = 12
TRAIN = {"network": {"channels": [4, 8], "num_res_units": 0}, "epochs": EPOCHS, "iterations_per_epoch": 6,
         "val_every": 1, "num_workers": 0, "seed": 3}
KILL_SEED = 20261207
# The first kill comes 0 to 1 s after the training's set-up begins (MLflow's store, experiment and runs: the
# imports take the seconds before); the others a random part of an epoch after the try's 2nd or 3rd epoch,
# so that each lands in the training and leaves progress to resume from, whatever the machine's speed.
SET_UP_WINDOW_S, EPOCHS_BEFORE_KILL = (0.0, 1.0), (2, 3)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's threads set to ``n`` for a block (thread count changes float rounding, see test_determinism)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def mlflow_uri_restored() -> Iterator[None]:
    """Training in this process sets MLflow's tracking URI (and MLFLOW_TRACKING_URI); put both back."""
    import mlflow

    env, uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    try:
        yield
    finally:
        mlflow.set_tracking_uri(uri)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medseg.config import PlanConfig
    from medseg.stages.ingest import ingest
    from medseg.stages.plan import plan
    from medseg.stages.preprocess import preprocess

    root = tmp_path_factory.mktemp("killed_training")
    manifest = ingest(synthetic_msd(root / "msd", n_cases=4), root / "ingest").manifest_path
    plan(manifest, root / "plan", PlanConfig(n_folds=2, target_spacing_mm=(1.0, 1.0, 1.0), batch_size=2))
    with torch_threads(torch.get_num_threads()):  # preprocess sets one thread for the process
        preprocess(manifest, root / "plan" / "plan.json", root / "pre")
    return root


def _train_in_process(prepared: Path, out: Path, db: Path, **kwargs: object) -> None:
    from medseg.config import TrainConfig
    from medseg.stages.train import Tracking, train

    with torch_threads(1), mlflow_uri_restored():
        train(prepared / "pre", prepared / "plan" / "plan.json", prepared / "plan" / "splits.json", out,
              TrainConfig.model_validate(kwargs.pop("config", TRAIN)), device="cpu",
              tracking=Tracking(uri=f"sqlite:///{db}", artifact_root=db.parent / "artifacts"), **kwargs)


def _metrics(db: Path) -> tuple[str, dict[str, list[tuple[int, float]]], int]:
    """The fold run of ``db``: its id, each metric's (step, value) in logged order, registered versions."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    (fold_run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.fold = '0'")
    history = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(fold_run.info.run_id, key),
                                                        key=lambda m: (m.timestamp, m.step))]
               for key in fold_run.data.metrics}
    return fold_run.info.run_id, history, len(client.search_model_versions())


def _until_killed(command: list[str], env: dict[str, str], marker: str, count: int, delay: Callable[[list[float]], float],
                  meanwhile: Callable[[], None] = lambda: None) -> tuple[bool, float]:
    """Run ``command`` (and ``meanwhile()`` in this process as it starts); once it has logged ``count`` lines
    with ``marker`` (at times ``marks``), SIGKILL it ``delay(marks)`` seconds after the last, unless it has
    ended. Returns (killed, seconds from the last mark to the kill)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    marks: list[float] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            if marker in line:
                marks.append(time.monotonic())
                if len(marks) == count:
                    ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        meanwhile()
        ready.wait(300)
        seen = marks[:count]
        if len(seen) == count:
            time.sleep(max(0.0, seen[-1] + delay(seen) - time.monotonic()))
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    return killed, (time.monotonic() - seen[-1]) if len(seen) == count else float("nan")


@dataclass
class Campaign:
    root: Path
    plan: list[tuple[str, int, float]]  # per kill: after the count-th line with marker, seconds or epochs
    tries: list[str]
    final: subprocess.CompletedProcess[str]


def kill_campaign(prepared: Path, root: Path, venv_bin: Path) -> Campaign:
    """``medseg train`` SIGKILLed 3 times at seeded random moments (in its set-up, then twice within an epoch),
    each time started again with ``--resume`` (afresh while there is no checkpoint), then left to finish;
    the uninterrupted training (in this process, while the first try starts) in ``root``/straight."""
    out, db, last = root / "killed", root / "killed.db", root / "killed" / "last.pt"

    def command(resume: bool) -> list[str]:
        return [str(venv_bin / "medseg"), "train", "--preprocessed", str(prepared / "pre"),
                "--plan", str(prepared / "plan" / "plan.json"), "--splits", str(prepared / "plan" / "splits.json"),
                "--output", str(out), "--params", json.dumps(TRAIN), "--tracking-uri", f"sqlite:///{db}",
                "--artifact-root", str(root / "artifacts"), "--device", "cpu", *(["--resume"] if resume else [])]

    def epoch() -> int:
        return torch.load(last, weights_only=False)["epoch"] if last.exists() else 0

    env = {**_env(venv_bin), "OMP_NUM_THREADS": "1"}  # as the uninterrupted training: one thread
    rng = random.Random(KILL_SEED)
    plan = [("augmentation", 1, round(rng.uniform(*SET_UP_WINDOW_S), 2))]  # (marker, count, seconds or epochs)
    plan += [(": loss", rng.choice(EPOCHS_BEFORE_KILL), round(rng.random(), 2)) for _ in range(2)]
    tries = []
    for k, (marker, count, after) in enumerate(plan):
        resume, before = last.exists(), epoch()
        if k == 0:  # seconds after the set-up began; meanwhile the uninterrupted training, in this process
            killed, late = _until_killed(command(resume), env, marker, 1, lambda marks, after=after: after, lambda: _train_in_process(
                prepared, root / "straight", root / "straight.db"))
            when = f"{late:.2f} s after its set-up began"
        else:  # a part of an epoch (the last one's length) after its count-th epoch
            killed, late = _until_killed(command(resume), env, marker, count,
                                         lambda marks, after=after: after * (marks[-1] - marks[-2]))
            when = f"{late:.2f} s ({after} of an epoch) after its epoch {count} of this try"
        tries.append(f"{'--resume from epoch ' + str(before) if resume else 'afresh'}: killed {when}, checkpoint "
                     f"at epoch {epoch()}" if killed else f"ended before its kill ({marker!r} x{count} + {after})")
    final = subprocess.run(command(last.exists()), capture_output=True, text=True, env=env, timeout=600, check=False)
    return Campaign(root, plan, tries, final)


@pytest.fixture(scope="module")
def campaign(prepared: Path, tmp_path_factory: pytest.TempPathFactory, venv_bin: Path) -> Iterator[Future[Campaign]]:
    """The kill campaign, run in a thread from the first test that asks (the workflow's ``run`` does): it
    waits on processes of its own, beside the workflow's."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(kill_campaign, prepared, tmp_path_factory.mktemp("campaign"), venv_bin)


def test_training_killed_three_times_ends_as_the_uninterrupted_one_in_one_mlflow_run(
        campaign: Future[Campaign]) -> None:
    result = campaign.result(timeout=900)
    root, tries = result.root, result.tries
    print(f"kill moments (seed {KILL_SEED}): {result.plan}\n" + "\n".join(tries))
    assert result.final.returncode == 0, result.final.stderr[-3000:]
    assert all(t.startswith(("--resume", "afresh")) for t in tries), tries  # each kill hit a running training
    assert any(t.startswith("--resume") for t in tries), tries  # and one resumed a checkpoint before its kill

    a = torch.load(root / "straight" / "last.pt", weights_only=False)
    b = torch.load(root / "killed" / "last.pt", weights_only=False)
    assert [h["epoch"] for h in b["history"]] == list(range(1, EPOCHS + 1))
    assert [h["lr"] for h in b["history"]] == [h["lr"] for h in a["history"]]
    assert [h["train_loss"] for h in b["history"]] == [h["train_loss"] for h in a["history"]]
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=0)

    _, straight, _ = _metrics(root / "straight.db")
    run_id, killed, versions = _metrics(root / "killed.db")  # one fold run (the unpacking) ...
    assert run_id == b["run_id"] and versions == 1  # ... that last.pt names, and one model version
    assert set(killed) == set(straight)
    per_epoch = {k for k, v in straight.items() if len(v) > 1}
    for key in per_epoch:  # every epoch's metrics once, at its epoch, as in the uninterrupted run
        assert [s for s, _ in killed[key]] == [s for s, _ in straight[key]], key
    assert [s for s, _ in killed["train_loss"]] == [s for s, _ in killed["val_dice"]] == list(range(1, EPOCHS + 1))
    assert killed["lr"] == straight["lr"]
    for key in set(straight) - per_epoch:  # best_val_dice, best_epoch: at step 0 (once: the test below)
        assert {s for s, _ in killed[key]} == {0} and killed[key][-1][1] == straight[key][0][1], key
    assert [p.name for p in (root / "killed").iterdir() if p.name.startswith(".")] == []


def test_a_training_resumed_after_its_registration_logs_the_best_score_once(campaign: Future[Campaign],
                                                                           prepared: Path, tmp_path: Path) -> None:
    """The campaign's finished training killed after its registration, before model.json was written
    (simulated: a copy without model.json), then resumed: the run has every metric, and gets none twice."""
    root = campaign.result(timeout=900).root
    shutil.copytree(root / "killed", tmp_path / "fold_0")
    shutil.copyfile(root / "killed.db", tmp_path / "mlflow.db")
    (tmp_path / "fold_0" / "model.json").unlink()
    _train_in_process(prepared, tmp_path / "fold_0", tmp_path / "mlflow.db", resume=True)
    _, metrics, versions = _metrics(tmp_path / "mlflow.db")
    assert versions == 1 and [s for s, _ in metrics["train_loss"]] == list(range(1, EPOCHS + 1))
    assert len(metrics["best_val_dice"]) == 1 and len(metrics["best_epoch"]) == 1
