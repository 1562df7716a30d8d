"""The Snakemake workflow from a DICOM root (series + DICOM-SEG labels) to DICOM-SEG predictions.

Six real hippocampus cases are written as classic MR series with their labels as DICOM-SEG
(medseg's own writer), in one folder tree of no particular structure. The workflow ingests
the tree (labels attached through the SEG's referenced series), trains the smoke model and
predicts each validation case as NIfTI and as a DICOM-SEG of its source series.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import nifti_to_dicom_series
from test_workflow import CASES, snakemake

from medseg.dicom import read_series
from medseg.dicom.segwrite import read_seg_labels, write_seg
from medseg.manifest import load_manifest

NAMES = {1: "Anterior", 2: "Posterior"}


@pytest.fixture(scope="module")
def dicom_run(shared_data: Path, venv_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("workflow_dicom")
    root = work / "dicom_root"
    for number, case in enumerate(CASES, start=1):
        folder = nifti_to_dicom_series(
            shared_data / "hippocampus/imagesTr" / f"{case}.nii.gz",
            root / f"patient_{number}" / "study" / f"series_{number}", series_number=number,
        )
        series = read_series(folder)
        label = np.asanyarray(nib.load(str(shared_data / "hippocampus/labelsTr" / f"{case}.nii.gz")).dataobj)
        write_seg(label.astype(np.uint8), series, root / f"patient_{number}" / "seg" / "labels.dcm", names=NAMES)
    extra = work / "dicom.yaml"
    extra.write_text(
        f"dataset: {root}\n"
        "ingest:\n  labels: {0: background, 1: Anterior, 2: Posterior}\n  min_slices: 3\n"
    )
    snakemake(venv_bin, work, configs=(extra,))
    return work


def test_ingest_attached_the_seg_labels(dicom_run: Path, shared_data: Path) -> None:
    manifest, root = load_manifest(dicom_run / "data/results/ingest/manifest.json")
    assert manifest.kind == "dicom" and len(manifest.cases) == len(CASES) and not manifest.failed
    for record in manifest.cases:
        number = int(record.case_id[2:5])  # mr001_<hash>: the series number
        reference = nib.load(str(shared_data / "hippocampus/labelsTr" / f"{CASES[number - 1]}.nii.gz"))
        label = nib.load(str(root / record.label))
        np.testing.assert_array_equal(np.asanyarray(label.dataobj), np.asanyarray(reference.dataobj))
        np.testing.assert_allclose(label.affine, reference.affine, atol=1e-4)


def test_predictions_are_dicom_seg_of_their_series(dicom_run: Path) -> None:
    results = dicom_run / "data/results"
    manifest, root = load_manifest(results / "ingest/manifest.json")
    splits = json.loads((results / "plan/splits.json").read_text())
    assert len(splits[0]["val"]) == 3
    for case_id in splits[0]["val"]:
        mask = np.asanyarray(nib.load(str(results / "predictions/fold_0" / f"{case_id}.nii.gz")).dataobj)
        seg_path = results / "predictions/fold_0" / f"{case_id}_seg.dcm"
        seg = pydicom.dcmread(seg_path)
        assert seg.Modality == "SEG"
        record = manifest.case(case_id)
        series = read_series([Path(s.path) for s in record.sources])
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(
            series.slice_files[0], stop_before_pixels=True).SeriesInstanceUID
        np.testing.assert_array_equal(read_seg_labels(seg_path, series), mask)
    summary = json.loads((results / "evaluation/summary.json").read_text())
    assert summary["n_cases"] == 3 and set(summary["classes"]) == set(NAMES.values())
