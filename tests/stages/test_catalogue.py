"""The catalogue of bad inputs (docs/reliability.md), through the ``medseg`` commands.

Each kind is built small and real in ``tmp_path`` and given to the command as a user would
(``medseg.cli.main``, what the console script runs). An exception escaping the command fails the
test: that is the traceback a user must never see. Every kind checks the message itself: one line,
naming the file (or folder) and the problem.

- Whole inputs that cannot be used (``test_input_is_refused_in_one_line``): exit status 2 and one
  line ``medseg <stage>: error: ...`` on stderr; nothing half-written.
- Cases of a DICOM tree that cannot be volumes (``test_dicom_series_is_refused_and_the_others_go_on``):
  one log line each, listed in ``report.json`` and the manifest; the good series is converted.
- Scans that predict cannot use (``test_predict_refuses_the_scan_and_goes_on``): one log line each,
  ``failed/<case>.json`` in the output; the good scan gets its mask.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SHAPE, boxes, huge_header, synthetic_msd, write_ct_slice, write_nifti
from pydicom.uid import generate_uid

from medseg.cli import main


def _argv_ingest(src: Path, tmp: Path, *extra: str) -> list[str]:
    return ["ingest", str(src), "--output", str(tmp / "out"), "--workers", "1", *extra]


# ------------------------------------------------------------------ whole inputs refused


def _empty_folder(tmp: Path) -> tuple[list[str], str, Path]:
    (tmp / "empty").mkdir()
    return _argv_ingest(tmp / "empty", tmp), "expected dataset.json (MSD/nnU-Net), cases.tsv, NIfTI files", tmp / "empty"


def _dataset_json_invalid(tmp: Path) -> tuple[list[str], str, Path]:
    src = synthetic_msd(tmp / "msd", n_cases=2, shape=(8, 8, 8))
    (src / "dataset.json").write_text('{"training": [')
    return _argv_ingest(src, tmp), "is not valid JSON", src / "dataset.json"


def _dataset_json_wrong_structure(tmp: Path) -> tuple[list[str], str, Path]:
    src = synthetic_msd(tmp / "msd", n_cases=2, shape=(8, 8, 8))
    (src / "dataset.json").write_text(json.dumps({"labels": {"0": "background"}, "training": "imagesTr"}))
    return _argv_ingest(src, tmp), "expected 'training' to be a list, found str", src / "dataset.json"


def _dataset_json_entry_without_image(tmp: Path) -> tuple[list[str], str, Path]:
    src = synthetic_msd(tmp / "msd", n_cases=2, shape=(8, 8, 8))
    info = json.loads((src / "dataset.json").read_text())
    info["training"][1] = ["./imagesTr/case_001.nii.gz"]
    (src / "dataset.json").write_text(json.dumps(info))
    return _argv_ingest(src, tmp), "expected training[1] to be an object with an 'image' path", src / "dataset.json"


def _sheet_without_columns(tmp: Path) -> tuple[list[str], str, Path]:
    sheet = tmp / "cases.tsv"
    sheet.write_text("id\tscan\na\ta.nii.gz\n")
    return _argv_ingest(sheet, tmp), "expected columns case_id, image", sheet


def _sheet_with_a_case_twice(tmp: Path) -> tuple[list[str], str, Path]:
    write_nifti(tmp / "a.nii.gz", np.random.default_rng(0).normal(size=(6, 6, 6)).astype(np.float32))
    sheet = tmp / "cases.tsv"
    sheet.write_text("case_id\timage\na\ta.nii.gz\na\ta.nii.gz\n")
    return _argv_ingest(sheet, tmp), "case_id 'a' appears twice", sheet


def _nifti_beside_dicom(tmp: Path) -> tuple[list[str], str, Path]:
    folder = tmp / "scans"
    write_nifti(folder / "a.nii.gz", np.random.default_rng(0).normal(size=(6, 6, 6)).astype(np.float32))
    _series(folder / "series_1")
    return (_argv_ingest(folder, tmp), "expected one kind of scan, found both NIfTI files (1, e.g. a.nii.gz) and "
            "DICOM files (in series_1)", folder)


def _ingest_with_config(yaml_text: str, expected: str) -> Callable[[Path], tuple[list[str], str, Path]]:
    """A kind: ingest of a small good folder with an experiment config of ``yaml_text``."""

    def build(tmp: Path) -> tuple[list[str], str, Path]:
        src = synthetic_msd(tmp / "msd", n_cases=2, shape=(8, 8, 8))
        config = tmp / "exp.yaml"
        config.write_text(yaml_text)
        return _argv_ingest(src, tmp, "--config", str(config)), expected, config

    return build


def _config_patch_of_other_dims(tmp: Path) -> tuple[list[str], str, Path]:
    """A patch of two axes for three-axis images (only the data tells: named by its key)."""
    src = synthetic_msd(tmp / "msd", n_cases=6, shape=(24, 24, 16))
    assert main(_argv_ingest(src, tmp)) == 0
    config = tmp / "exp.yaml"
    config.write_text("plan:\n  patch_size: [16, 16]\n")
    argv = ["plan", "--manifest", str(tmp / "out" / "manifest.json"), "--output", str(tmp / "plan"),
            "--config", str(config)]
    return argv, "plan.patch_size: expected 3 values", tmp / "out" / "manifest.json"


def _manifest_damaged(tmp: Path) -> tuple[list[str], str, Path]:
    manifest = tmp / "manifest.json"
    manifest.write_text(json.dumps({"dataset": "x", "kind": "msd"}))
    return (["plan", "--manifest", str(manifest), "--output", str(tmp / "plan")],
            "is not a medseg manifest: missing key 'labels'", manifest)


def _images_too_small_for_a_network(tmp: Path) -> tuple[list[str], str, Path]:
    src = synthetic_msd(tmp / "msd", n_cases=6, shape=(10, 10, 8))
    assert main(_argv_ingest(src, tmp)) == 0
    return (["plan", "--manifest", str(tmp / "out" / "manifest.json"), "--output", str(tmp / "plan")],
            "expected images large enough for a U-Net of 2 downsampling steps", tmp / "out" / "manifest.json")


def _plan_of_another_dataset(tmp: Path) -> tuple[list[str], str, Path]:
    """A plan made for one-channel images, used on a two-channel manifest."""
    one = synthetic_msd(tmp / "one", n_cases=6, shape=(24, 24, 16))
    assert main(["ingest", str(one), "--output", str(tmp / "one_out"), "--workers", "1"]) == 0
    assert main(["plan", "--manifest", str(tmp / "one_out" / "manifest.json"), "--output", str(tmp / "plan")]) == 0
    two = tmp / "two"
    rng = np.random.default_rng(3)
    for case in ("x_001", "x_002"):
        for c in range(2):
            write_nifti(two / "imagesTr" / f"{case}_{c:04d}.nii.gz", rng.normal(size=(24, 24, 16)).astype(np.float32))
        write_nifti(two / "labelsTr" / f"{case}.nii.gz", (rng.random((24, 24, 16)) > 0.7).astype(np.uint8))
    (two / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"},
                                                  "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}))
    assert main(["ingest", str(two), "--output", str(tmp / "two_out"), "--workers", "1"]) == 0
    return (["preprocess", "--manifest", str(tmp / "two_out" / "manifest.json"), "--plan", str(tmp / "plan" / "plan.json"),
             "--output", str(tmp / "pre")], "expected a manifest of 1 channel", tmp / "plan" / "plan.json")


def _splits_of_another_dataset(tmp: Path) -> tuple[list[str], str, Path]:
    src = synthetic_msd(tmp / "msd", n_cases=6, shape=(24, 24, 16))
    assert main(_argv_ingest(src, tmp)) == 0
    manifest = tmp / "out" / "manifest.json"
    assert main(["plan", "--manifest", str(manifest), "--output", str(tmp / "plan")]) == 0
    assert main(["preprocess", "--manifest", str(manifest), "--plan", str(tmp / "plan" / "plan.json"),
                 "--output", str(tmp / "pre")]) == 0
    splits = tmp / "other_splits.json"
    splits.write_text(json.dumps([{"train": ["hippocampus_001", "hippocampus_002"], "val": ["hippocampus_003"]}]))
    return (["train", "--preprocessed", str(tmp / "pre"), "--plan", str(tmp / "plan" / "plan.json"), "--splits",
             str(splits), "--output", str(tmp / "fold_0"), "--no-tracking"], "hippocampus_001", splits)


def _model_truncated(tmp: Path, model: Path) -> tuple[list[str], str, Path]:
    cut = tmp / "best.pt"
    cut.write_bytes(model.read_bytes()[:4096])
    write_nifti(tmp / "scans" / "a.nii.gz", boxes(np.random.default_rng(1))[0])
    return (["predict", "--input", str(tmp / "scans"), "--output", str(tmp / "masks"), "--model", str(cut)],
            "expected a medseg checkpoint, could not read it (truncated", cut)


def _model_of_random_bytes(tmp: Path, model: Path) -> tuple[list[str], str, Path]:
    bad = tmp / "best.pt"
    bad.write_bytes(np.random.default_rng(2).bytes(3000))
    write_nifti(tmp / "scans" / "a.nii.gz", boxes(np.random.default_rng(1))[0])
    return (["predict", "--input", str(tmp / "scans"), "--output", str(tmp / "masks"), "--model", str(bad)],
            "expected a medseg checkpoint, could not read it (truncated", bad)


WHOLE: dict[str, Callable[[Path], tuple[list[str], str, Path]]] = {
    "empty-folder": _empty_folder,
    "dataset-json-invalid": _dataset_json_invalid,
    "dataset-json-wrong-structure": _dataset_json_wrong_structure,
    "dataset-json-entry-without-image": _dataset_json_entry_without_image,
    "case-sheet-without-columns": _sheet_without_columns,
    "case-sheet-case-twice": _sheet_with_a_case_twice,
    "nifti-beside-dicom": _nifti_beside_dicom,
    "config-unknown-key": _ingest_with_config("plan:\n  n_fold: 3\n", "unknown key 'plan.n_fold'"),
    "config-wrong-type": _ingest_with_config("ingest:\n  min_slices: many\n",
                                             "'ingest.min_slices': Input should be a valid integer"),
    "config-not-yaml": _ingest_with_config("ingest:\n  modality: [CT\n", "is not valid YAML: "),
    # a configuration to compare with this run that changes its folds
    "config-contradictory": _ingest_with_config(
        "select:\n  configurations:\n    small:\n      plan:\n        n_folds: 3\n", "n_folds cannot change"),
    "config-patch-of-other-dims": _config_patch_of_other_dims,
    "manifest-damaged": _manifest_damaged,
    "images-too-small-for-a-network": _images_too_small_for_a_network,
    "plan-of-another-dataset": _plan_of_another_dataset,
    "splits-of-another-dataset": _splits_of_another_dataset,
}
WITH_MODEL: dict[str, Callable[[Path, Path], tuple[list[str], str, Path]]] = {
    "model-truncated": _model_truncated,
    "model-random-bytes": _model_of_random_bytes,
}


def _one_line_error(argv: list[str], expected: str, named: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"medseg {argv[0]}: error: "), err
    assert expected in err, err
    assert str(named) in err or named.name in err, f"{named} not named in {err!r}"
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", sorted(WHOLE))
def test_input_is_refused_in_one_line(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected, named = WHOLE[kind](tmp_path)
    _one_line_error(argv, expected, named, capsys)


@pytest.mark.parametrize("kind", sorted(WITH_MODEL))
def test_model_is_refused_in_one_line(kind: str, box_model: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected, named = WITH_MODEL[kind](tmp_path, box_model)
    _one_line_error(argv, expected, named, capsys)
    assert not list((tmp_path / "masks").glob("*.nii.gz"))


# ------------------------------------------------------------------ DICOM series refused, the others go on

ROWS, COLS, N = 6, 5, 6


def _series(folder: Path, *, n: int = N, step: float = 2.0, positions: list[tuple[float, float, float]] | None = None,
            orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), edit: Callable[[int, object], None] | None = None,
            series_uid: str | None = None, names: str = "IM") -> list[Path]:
    """An axial CT series of ``n`` 6 x 5 slices ``step`` mm apart (or at ``positions``)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, study_uid, frame_uid = series_uid or generate_uid(), generate_uid(), generate_uid()
    positions = positions or [(0.0, 0.0, step * k) for k in range(n)]
    paths = []
    for k, position in enumerate(positions):
        r, c = np.indices((ROWS, COLS))
        path = folder / f"{names}{k:04d}.dcm"
        write_ct_slice(path, (100 * k + 10 * r + c).astype(np.uint16), position=position, orientation=orientation,
                       series_uid=series_uid, study_uid=study_uid, frame_uid=frame_uid, instance=k + 1,
                       series_number=1, edit=(lambda ds, k=k: edit(k, ds)) if edit else None)
        paths.append(path)
    return paths


def _gap(folder: Path) -> str:
    paths = _series(folder, n=8)
    paths[4].unlink()
    return "missing"


def _tilt(folder: Path) -> str:
    # slices stepped along z but moved along y too: a 20 degree gantry tilt
    _series(folder, positions=[(0.0, 2.0 * k * np.tan(np.radians(20)), 2.0 * k) for k in range(N)])
    return "tilt"


def _not_orthogonal(folder: Path) -> str:
    _series(folder, orientation=(1, 0, 0, 0.5, 0.866, 0.0))
    return "orthogonal"


def _too_few_slices(folder: Path) -> str:
    _series(folder, n=1)
    return "slice"


def _truncated_slice(folder: Path) -> str:
    paths = _series(folder)
    raw = paths[2].read_bytes()
    paths[2].write_bytes(raw[: len(raw) - 20])
    return paths[2].name


DICOM_KINDS: dict[str, Callable[[Path], str]] = {
    "dicom-slice-gap": _gap,
    "dicom-gantry-tilt": _tilt,
    "dicom-not-orthogonal": _not_orthogonal,
    "dicom-single-slice": _too_few_slices,
    "dicom-truncated-slice": _truncated_slice,
}


@pytest.mark.parametrize("kind", sorted(DICOM_KINDS))
def test_dicom_series_is_refused_and_the_others_go_on(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tree = tmp_path / "dicom"
    _series(tree / "good")
    bad = tree / "bad"
    expected = DICOM_KINDS[kind](bad)
    assert main(_argv_ingest(tree, tmp_path)) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["converted"]) == 1
    refused = [r for r in report["refused"] if str(bad) in r["file"] or str(bad) in r["error"]]
    assert refused, report["refused"]
    message = refused[0]["error"]
    assert expected.lower() in message.lower() and "\n" not in message, message
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(message in e for e in errors), errors
    image = nib.load(str(tmp_path / "out" / report["converted"][0]["image"]))
    assert image.shape == (COLS, ROWS, N)


def test_a_random_file_named_dcm_is_ignored_and_listed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tree = tmp_path / "dicom"
    _series(tree / "good")
    (tree / "other" / "noise.dcm").parent.mkdir()
    (tree / "other" / "noise.dcm").write_bytes(np.random.default_rng(9).bytes(2048))
    assert main(_argv_ingest(tree, tmp_path)) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["converted"]) == 1
    listed = {r["file"]: r["reason"] for r in report["ignored"]} | {r["file"]: r["error"] for r in report["refused"]}
    assert str(tree / "other" / "noise.dcm") in listed


# ------------------------------------------------------------------ predict: scans refused, the others go on


def _scan_huge_header(folder: Path) -> str:
    path = write_nifti(folder / "huge.nii.gz", boxes(np.random.default_rng(5))[0])
    path.write_bytes(huge_header(path.read_bytes()))
    return "its header declares 30000 x 30000 x 30000 voxels"


def _scan_far_spacing(folder: Path) -> str:
    image = boxes(np.random.default_rng(6))[0]
    write_nifti(folder / "coarse.nii.gz", image[::8, ::8, ::8], np.diag([8.0, 8.0, 8.0, 1.0]))
    return "expected a voxel spacing within a factor 4 of the model's"


def _scan_random_bytes(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "noise.nii.gz").write_bytes(np.random.default_rng(7).bytes(3000))
    return "cannot read"


def _scan_constant(folder: Path) -> str:
    write_nifti(folder / "blank.nii.gz", np.full(SHAPE, 7.0, dtype=np.float32))
    return "every voxel is 7"


PREDICT_KINDS: dict[str, Callable[[Path], str]] = {
    "scan-huge-header": _scan_huge_header,
    "scan-spacing-far-from-the-plan": _scan_far_spacing,
    "scan-random-bytes": _scan_random_bytes,
    "scan-constant": _scan_constant,
}


@pytest.mark.parametrize("kind", sorted(PREDICT_KINDS))
def test_predict_refuses_the_scan_and_goes_on(kind: str, box_model: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    scans = tmp_path / "scans"
    write_nifti(scans / "good.nii.gz", boxes(np.random.default_rng(8))[0])
    expected = PREDICT_KINDS[kind](scans)
    (bad,) = [p for p in scans.iterdir() if p.name != "good.nii.gz"]
    assert main(["predict", "--input", str(scans), "--output", str(tmp_path / "masks"), "--model", str(box_model)]) == 0
    assert (tmp_path / "masks" / "good.nii.gz").exists()
    case = bad.name.removesuffix(".nii.gz")
    assert not (tmp_path / "masks" / bad.name).exists()
    failure = json.loads((tmp_path / "masks" / "failed" / f"{case}.json").read_text())
    assert expected in failure["error"] and bad.name in failure["error"], failure
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and expected in errors[0] and bad.name in errors[0], errors


# ------------------------------------------------------------------ evaluate: what the numbers leave out is named


def test_evaluate_names_the_cases_it_leaves_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A mask on another grid and a mask without a reference are left out, one log line each; a
    reference without a mask is named; summary.json lists all three, so its mean is over the one
    case evaluated and says so."""
    _, label = boxes(np.random.default_rng(4))
    for case in ("good", "moved", "unpredicted"):
        write_nifti(tmp_path / "labels" / f"{case}.nii.gz", label)
    masks = tmp_path / "masks"
    write_nifti(masks / "good.nii.gz", label)
    write_nifti(masks / "moved.nii.gz", label, np.diag([1.0, 1.0, 2.0, 1.0]))
    write_nifti(masks / "stray.nii.gz", label)
    assert main(["evaluate", "--predictions", str(masks), "--labels", str(tmp_path / "labels"),
                 "--output", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 1 and summary["mean_dice"] == pytest.approx(1.0)
    assert summary["not_predicted"] == ["unpredicted"]
    assert sorted(summary["left_out"]) == ["moved", "stray"]
    assert f"{masks / 'moved.nii.gz'}: expected the affine of" in summary["left_out"]["moved"]
    assert f"{masks / 'stray.nii.gz'}: no reference label" in summary["left_out"]["stray"]
    lines = [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
    assert sum("left out" in line for line in lines) == 2
    assert any("have no predicted mask" in line and "unpredicted" in line for line in lines), lines


# ------------------------------------------------------------------ memory before refusing, paths, permissions


def _peak_rss_mb(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run ``medseg argv`` in a child process; its peak resident memory (MiB) and result."""
    script = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
              "sys.stderr.write(r.stderr); sys.stdout.write(r.stdout); "
              "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(r.returncode)")
    done = subprocess.run([sys.executable, "-c", script, str(Path(sys.executable).with_name("medseg")), *argv],
                          capture_output=True, text=True, timeout=300)
    peak = float(done.stdout.rsplit("PEAK", 1)[1])
    return peak, done


def test_a_header_declaring_huge_dimensions_is_refused_before_allocating(tmp_path: Path, box_model: Path) -> None:
    """A .nii.gz of a few kB whose header declares 30000^3 voxels (100 TiB): ingest and predict each
    name it and go on with the other cases, with a peak memory of the process far below the declared
    size (measured; printed)."""
    src = synthetic_msd(tmp_path / "msd", n_cases=3, shape=(12, 12, 8))
    image = src / "imagesTr" / "case_001.nii.gz"
    image.write_bytes(huge_header(image.read_bytes()))
    peak_ingest, done = _peak_rss_mb(_argv_ingest(src, tmp_path))
    assert done.returncode == 0, done.stderr
    assert f"{image}: its header declares 30000 x 30000 x 30000 voxels" in done.stderr
    assert "Traceback" not in done.stderr and "MemoryError" not in done.stderr
    assert "ingested 2 cases (1 left out)" in done.stdout

    scans = tmp_path / "scans"
    write_nifti(scans / "good.nii.gz", boxes(np.random.default_rng(8))[0])
    _scan_huge_header(scans)
    peak_predict, done = _peak_rss_mb(["predict", "--input", str(scans), "--output", str(tmp_path / "masks"),
                                       "--model", str(box_model)])
    assert done.returncode == 0, done.stderr
    assert "huge.nii.gz: its header declares 30000 x 30000 x 30000 voxels" in done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "masks" / "good.nii.gz").exists()
    print(f"peak memory: ingest {peak_ingest:.0f} MiB, predict {peak_predict:.0f} MiB (declared: "
          f"{30000 ** 3 * 4 / 2 ** 40:.0f} TiB)")
    assert peak_ingest < 2048 and peak_predict < 2048


def test_paths_with_spaces_and_non_ascii_letters_go_through_every_stage(tmp_path: Path, box_model: Path) -> None:
    root = tmp_path / "données de l'hôpital" / "IRM T1 (2026)"
    src = synthetic_msd(root / "jeu d'essai", n_cases=6, shape=(24, 24, 16))
    out = root / "résultats é"
    assert main(["ingest", str(src), "--output", str(out / "ingest"), "--workers", "1"]) == 0
    manifest = out / "ingest" / "manifest.json"
    assert main(["plan", "--manifest", str(manifest), "--output", str(out / "plan")]) == 0
    assert main(["preprocess", "--manifest", str(manifest), "--plan", str(out / "plan" / "plan.json"),
                 "--output", str(out / "pré")]) == 0
    scans = root / "scans à segmenter"
    write_nifti(scans / "patient 1 é.nii.gz", boxes(np.random.default_rng(8))[0])
    assert main(["predict", "--input", str(scans), "--output", str(out / "masques"), "--model", str(box_model)]) == 0
    mask = nib.load(str(out / "masques" / "patient 1 é.nii.gz"))
    assert mask.shape == SHAPE
    assert main(["evaluate", "--predictions", str(out / "masques"), "--labels", str(scans), "--output",
                 str(out / "éval")]) in (0, 2)


def test_an_unreadable_file_is_named_and_the_others_go_on(tmp_path: Path) -> None:
    """A case whose image the user may not read (mode 000). As root, permissions do not stop reading,
    so the command runs as the unprivileged user ``nobody`` (``setpriv``)."""
    import os

    src = synthetic_msd(tmp_path / "msd", n_cases=3, shape=(12, 12, 8))
    image = src / "imagesTr" / "case_001.nii.gz"
    image.chmod(0)
    out = tmp_path / "out"
    out.mkdir()
    command = [str(Path(sys.executable).with_name("medseg")), *_argv_ingest(src, tmp_path)]
    if os.geteuid() == 0:
        for folder in [tmp_path, *tmp_path.parents]:
            folder.chmod(folder.stat().st_mode | 0o005)
        out.chmod(0o777)
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"cannot read {image}: permission denied" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["case_id"] for c in manifest["cases"]] == ["case_000", "case_002"]
    assert manifest["failed"][0]["file"] == str(image)


def test_a_series_of_magnitude_and_phase_images_gives_a_volume_per_image_type(tmp_path: Path) -> None:
    """One series, each slice stored twice: as magnitude (ImageType ...\\M\\...) and as phase (...\\P\\...).
    As dcm2niix does, each image type is its own volume (not one 4D volume of two 'time points')."""
    tree = tmp_path / "dicom"
    uid = generate_uid()

    def typed(kind: str) -> Callable[[int, object], None]:
        def edit(k: int, ds: object) -> None:
            ds.ImageType = ["ORIGINAL", "PRIMARY", kind, "ND"]  # type: ignore[attr-defined]
            ds.InstanceNumber = k + 1 + (N if kind == "P" else 0)  # type: ignore[attr-defined]
        return edit

    _series(tree / "swi", edit=typed("M"), series_uid=uid, names="MAG")
    _series(tree / "swi", edit=typed("P"), series_uid=uid, names="PHA")
    assert main(_argv_ingest(tree, tmp_path)) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["shape"] for r in report["converted"]] == [[COLS, ROWS, N], [COLS, ROWS, N]]
    assert all(r["volumes"] == 1 for r in report["converted"]) and not report["refused"]
    sidecars = [json.loads((tmp_path / "out" / r["image"].replace(".nii.gz", ".json")).read_text())
                for r in report["converted"]]
    assert sorted(tuple(s["ImageType"]) for s in sidecars) == [("ORIGINAL", "PRIMARY", "M", "ND"),
                                                               ("ORIGINAL", "PRIMARY", "P", "ND")]


@pytest.mark.parametrize("what", ["shape", "affine"])
def test_channels_of_one_case_on_two_grids_leave_it_out(what: str, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "Dataset001_X"
    rng = np.random.default_rng(2)
    for case in ("x_001", "x_002", "x_003"):
        for c in range(2):
            shape, affine = (6, 6, 6), np.eye(4)
            if case == "x_002" and c == 1:
                shape, affine = ((6, 6, 5), affine) if what == "shape" else (shape, np.diag([1.0, 1.0, 1.5, 1.0]))
            write_nifti(root / "imagesTr" / f"{case}_{c:04d}.nii.gz", rng.normal(size=shape).astype(np.float32), affine)
        write_nifti(root / "labelsTr" / f"{case}.nii.gz", np.ones((6, 6, 6), np.uint8))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"},
                                                   "labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}))
    assert main(_argv_ingest(root, tmp_path)) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [c["case_id"] for c in manifest["cases"]] == ["x_001", "x_003"]
    (failed,) = manifest["failed"]
    bad = root / "imagesTr" / "x_002_0001.nii.gz"
    expected = "expected the shape of the first channel" if what == "shape" else "its affine differs from the first channel"
    assert failed["file"] == str(bad) and expected in failed["error"] and str(bad) in failed["error"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and expected in errors[0]
