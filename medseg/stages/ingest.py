"""ingest: raw cases (MSD/nnU-Net folder, case sheet, DICOM tree) to canonical NIfTI and a manifest.

Each case is checked (readable, channels and label on one grid, no NaN or infinite voxels,
label values declared). A bad case is logged with its file and problem, recorded under
``failed`` in the manifest, and left out; the others go on. Raw inputs are only read.

Outputs in ``out_dir``: ``images/<case>.nii.gz`` (float32; 4D with channels last when there
are several), ``labels/<case>.nii.gz`` (uint8), ``manifest.json``.

A DICOM folder of any structure is read by ``medseg.dicom``: every series is one case (its
NIfTI keeps the series' own data type, 4D for time series), with a de-identified JSON
sidecar ``images/<case>.json``; DICOM-SEG and RTSTRUCT objects become the labels of the
series they reference; ``report.json`` lists refused series and ignored files.

With ``ingest.reviewed``, the accepted and corrected masks of review folders join the training
cases, each with its label's provenance in the manifest (``medseg.stages.ingest_reviewed``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from medseg.config import IngestConfig
from medseg.errors import DataError
from medseg.manifest import CaseRecord, FailedCase, Manifest, save_manifest
from medseg.sources import CaseSource, discover, is_dicom_root
from medseg.stages.ingest_cases import IngestResult, ingest_case, intensity_stats, percentiles, write_case
from medseg.stages.ingest_reviewed import add_reviewed, read_reviewed, review_labels

__all__ = ["IngestResult", "ingest", "ingest_case", "intensity_stats", "percentiles", "write_case"]

log = logging.getLogger(__name__)


def _failure(case: CaseSource, err: DataError) -> FailedCase:
    message = str(err)
    files = [str(p) for p in case.images + ((case.label,) if case.label else ())]
    # the file the message is about: the one it starts with, else the first it names
    named = next((f for f in files if message.startswith(f)), next((f for f in files if f in message), files[0]))
    log.error("case %s left out: %s", case.case_id, message)
    return FailedCase(case_id=case.case_id, file=named, error=message)


def ingest(source: Path, out_dir: Path, config: IngestConfig | None = None, *, workers: int = 4) -> IngestResult:
    """Convert every case found at ``source`` into ``out_dir`` and write ``out_dir/manifest.json``."""
    config = config or IngestConfig()
    out_dir = Path(out_dir)
    if is_dicom_root(Path(source)):
        from medseg.stages.ingest_dicom import ingest_dicom

        return ingest_dicom(Path(source), out_dir, config, workers=workers)
    found = discover(Path(source))
    labels = config.labels if config.labels is not None else found.labels
    if labels is None and any(c.label for c in found.cases):
        raise DataError(f"{source}: its cases have labels but no label names are declared; set ingest.labels")
    reviewed, review_failed = read_reviewed(config.reviewed)
    if labels is None:
        labels = review_labels(reviewed)
    if labels is not None and 0 not in labels:
        labels = {0: "background", **labels}
    modality = config.modality or found.modality or "MR"
    records: list[CaseRecord] = []
    failed: list[FailedCase] = []
    tests: list[CaseRecord] = []
    for group, target in ((found.cases, records), (found.test_cases, tests)):
        for case in group:
            try:
                target.append(ingest_case(case, out_dir, labels, config))
            except DataError as err:
                failed.append(_failure(case, err))
    extra = add_reviewed(reviewed, records + tests, failed, labels,
                         lambda case: ingest_case(case, out_dir, labels, config))
    records = [r for r in records if r.case_id not in extra.replaced] + extra.records
    tests = [r for r in tests if r.case_id not in extra.replaced]
    failed += review_failed + extra.failed
    if not records:
        raise DataError(f"{source}: no case could be ingested ({len(failed)} failed; see the log)")
    channels = {r.channels for r in records}
    if len(channels) > 1:
        raise DataError(f"{source}: expected one channel count for all cases, found {sorted(channels)}")
    manifest = Manifest(
        dataset=str(Path(source).resolve()),
        kind=found.kind,
        labels=labels,
        modality=modality,
        channels=channels.pop(),
        cases=records,
        failed=failed,
        test_cases=tests,
    )
    manifest_path = out_dir / "manifest.json"
    save_manifest(manifest, manifest_path)
    log.info("ingested %d cases (%d test cases), %d left out -> %s", len(records), len(tests), len(failed), manifest_path)
    return IngestResult(manifest_path, len(records), len(failed))
