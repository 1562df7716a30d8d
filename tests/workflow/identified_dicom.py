"""A DICOM workflow run on synthetic series whose headers identify their patients, killed and resumed.

Shared by ``test_faults.py`` (kill -9 of the Snakemake driver, then the rerun) and ``test_privacy.py``
(no identifier reaches any output but the DICOM-SEGs), so that the workflow runs once per test
session (``killed_and_resumed``). Four synthetic MR series (24 x 24 x 16 voxels of 1 mm, two bright
boxes labelled 1 and 2, each label a DICOM-SEG object beside its series) carry a distinctive value
in every identifying attribute of ``medseg.dicom.sidecar.IDENTIFYING_KEYWORDS`` and more.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import REPO, _env, synthetic_case, write_ct_slice

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

NAMES = {1: "left", 2: "right"}
N_PATIENTS = 4
DATES = {  # one date per attribute, so that a find names its attribute
    "PatientBirthDate": "19380917", "StudyDate": "20170314", "SeriesDate": "20170315",
    "AcquisitionDate": "20170316", "ContentDate": "20170318",
}


def identity(i: int) -> dict[str, str]:
    """Patient ``i``'s identifying attributes, with values that no library or other file holds."""
    return {
        "PatientName": f"Quorvash^Zelbinda{i}", "PatientID": f"QZPID{i}7713", "AccessionNumber": f"QZACC{i}4409",
        "OtherPatientIDs": f"QZOTHER{i}55", "PatientAddress": "17 Vellichor Lane Pumbleton",
        "PatientTelephoneNumbers": "0999 4471 2236", "PatientMotherBirthName": "Brimwater^Odessa",
        "InstitutionName": "Saint Ysolde Infirmary", "InstitutionAddress": "3 Quillfeather Road Dunmarrow",
        "InstitutionalDepartmentName": "Xeroradiology Wing", "ReferringPhysicianName": "Threnody^Caspar",
        "PerformingPhysicianName": "Marrowgate^Elsbet", "OperatorsName": "Fennimore^Tarquin",
        "StationName": "QZSTATION9", "StudyID": f"QZSTUDY{i}", **DATES,
    }


def identifiers() -> dict[str, str]:
    """Every string that must not leave the DICOM files -> the attribute it comes from: each value as
    written; a person name also with spaces and each part alone; the distinctive words of an address
    or a name; a phone number without spaces; a date also as 1938-09-17, 1938/09/17 and 17.09.1938."""
    found: dict[str, str] = {}
    for i in range(N_PATIENTS):
        for keyword, value in identity(i).items():
            found[value] = keyword
            for part in value.replace("^", " ").split():
                if len(part) >= 6 and not part.isdigit():
                    found[part] = keyword
            if "^" in value:
                found[value.replace("^", " ")] = keyword
            if keyword == "PatientTelephoneNumbers":
                found[value.replace(" ", "")] = keyword
            if keyword.endswith("Date"):
                y, m, d = value[:4], value[4:6], value[6:]
                for form in (f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{d}.{m}.{y}"):
                    found[form] = keyword
    return found


def write_identified_root(root: Path, seed: int = 0) -> Path:
    """``root``/p<i>/series/IM*.dcm (the MR slices) and ``root``/p<i>/seg.dcm (its label, a DICOM-SEG)
    for each patient; the folder names say nothing about the patients."""
    from pydicom.uid import MRImageStorage, generate_uid

    from medseg.dicom import read_series
    from medseg.dicom.segwrite import write_seg

    rng = np.random.default_rng(seed)
    for i in range(N_PATIENTS):
        image, label = synthetic_case(rng, (24, 24, 16))
        stored = np.round(image * 100).clip(0, 65535).astype(np.uint16)
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        values = identity(i)

        def identify(ds: Dataset, values: dict[str, str] = values) -> None:
            for keyword, value in values.items():
                setattr(ds, keyword, value)
            ds.StudyTime, ds.SeriesTime, ds.PatientSex = "101500", "102000", "F"
            ds.Manufacturer, ds.SeriesDescription = "medseg tests", "T1 synthetic"

        folder = root / f"p{i}" / "series"
        folder.mkdir(parents=True)
        for k in range(image.shape[2]):
            write_ct_slice(folder / f"IM{k:04d}.dcm", stored[:, :, k].T, position=(0.0, 0.0, float(k)),
                           spacing=(1.0, 1.0), series_uid=series, study_uid=study, frame_uid=frame, instance=k + 1,
                           series_number=i + 1, slice_thickness=1.0, modality="MR", sop_class=MRImageStorage,
                           patient_id=values["PatientID"], edit=identify)
        write_seg(label, read_series(folder), root / f"p{i}" / "seg.dcm", names=NAMES)
    return root


def source_uids(root: Path) -> dict[str, str]:
    """The UIDs of the series under ``root`` (study, series, instances, frame of reference) -> their
    attribute: they tie a file to the patient's record in an archive."""
    import pydicom

    found = {}
    for path in sorted(root.glob("p*/series/*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            found[str(ds[keyword].value)] = keyword
    return found


@dataclass
class KilledRun:
    """The workflow run: where it is, the kill, what the kill left, and the runs after it."""

    root: Path  # the DICOM input (outside ``work``)
    work: Path  # Snakemake's working folder: everything under it is the workflow's
    results: Path
    command: list[str]
    first_log: Path  # what the killed driver printed
    killed_after_s: float = 0.0
    orphans: list[str] = field(default_factory=list)  # the jobs that still ran once the driver was gone
    at_kill: dict[str, tuple[int, int]] = field(default_factory=dict)  # results file -> (inode, mtime_ns)
    same_command: subprocess.CompletedProcess[str] | None = None
    unlock: subprocess.CompletedProcess[str] | None = None
    rerun: subprocess.CompletedProcess[str] | None = None
    rerun_s: float = 0.0


def _session_pids(session: int) -> list[int]:
    """The processes of session ``session`` but its leader (Linux /proc): the driver's jobs."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != session:
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # state, ppid, pgrp, session, ...
            if int(fields[3]) == session and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
    except OSError:
        return ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file under ``folder`` (relative path) -> (inode, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_killed_and_resumed(base: Path, venv_bin: Path) -> KilledRun:
    """Write the DICOM root; start the workflow (smoke config, 6 epochs of 2 iterations) in a session of
    its own; SIGKILL the driver once the train job has written its first checkpoint, then, as the loss
    of the machine or of the job's allocation would, the jobs it leaves running; run the same command
    again; where Snakemake refuses (its lock), ``--unlock`` and the command with ``--rerun-incomplete``."""
    root = write_identified_root(base / "dicom_root")
    work = base / "work"
    work.mkdir()
    extra = base / "dicom.yaml"
    extra.write_text(f"dataset: {root}\ningest:\n  labels: {{0: background, 1: left, 2: right}}\n  min_slices: 3\n"
                     "train:\n  epochs: 6\n  iterations_per_epoch: 2\n")
    command = [str(venv_bin / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(work),
               "--cores", "2", "--configfile", str(REPO / "configs" / "experiments" / "smoke.yaml"), str(extra)]
    env = _env(venv_bin)
    run = KilledRun(root=root, work=work, results=work / "data" / "results", command=command,
                    first_log=base / "killed_run.log")
    checkpoint = run.results / "train" / "fold_0" / "last.pt"
    started = time.monotonic()
    with open(run.first_log, "w") as out:
        driver = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while driver.poll() is None and not checkpoint.exists() and time.monotonic() - started < 600:
                time.sleep(0.02)
            running = driver.poll() is None
            _kill(driver.pid)
            driver.wait()
        finally:
            if driver.poll() is None:
                _kill(driver.pid)
                driver.wait()
    run.killed_after_s = time.monotonic() - started
    if not running:
        pytest.fail(f"the workflow ended ({driver.returncode}) before its train job wrote {checkpoint}:\n"
                    + run.first_log.read_text()[-3000:])
    orphans = _session_pids(driver.pid)
    run.orphans = [_cmdline(pid) for pid in orphans]
    for pid in orphans:
        _kill(pid)
    deadline = time.monotonic() + 30
    while _session_pids(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    run.at_kill = files_of(run.results)
    t0 = time.monotonic()
    run.same_command = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    run.rerun = run.same_command
    if run.same_command.returncode != 0:
        run.unlock = subprocess.run([*command, "--unlock"], capture_output=True, text=True, env=env, timeout=600,
                                    check=False)
        run.rerun = subprocess.run([*command, "--rerun-incomplete"], capture_output=True, text=True, env=env,
                                   timeout=600, check=False)
    run.rerun_s = time.monotonic() - t0
    return run


_RUNS: dict[str, KilledRun] = {}


def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory, venv_bin: Path) -> KilledRun:
    """The run, made on first use in a test session and shared by the modules that ask for it."""
    if "run" not in _RUNS:
        _RUNS["run"] = run_killed_and_resumed(tmp_path_factory.mktemp("identified_dicom"), venv_bin)
    return _RUNS["run"]
