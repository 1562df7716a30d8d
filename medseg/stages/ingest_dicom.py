"""ingest for a DICOM folder of any structure: every series becomes one case.

The folder is scanned once (each file parsed once, in worker processes for a large tree; see
``medseg.dicom.scan``). Each series is stacked into a volume
(refused with a message naming the series and its problem when it cannot be one) and written
as ``images/<case>.nii.gz`` in its own data type, with a de-identified sidecar
``images/<case>.json``. DICOM-SEG and RTSTRUCT objects become ``labels/<case>.nii.gz`` of the
series they reference. ``report.json`` lists converted and refused series and ignored files;
``manifest.json`` is the usual case manifest. Case ids are derived from the series (modality,
series number, a hash of the UID), never copied from the patient unless ``case_ids`` asks.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np

from medseg.config import IngestConfig
from medseg.dicom import scan
from medseg.dicom.scan import DicomFile, SeriesGroup, files_under, process_pool
from medseg.dicom.sidecar import sidecar
from medseg.dicom.volume import SeriesVolume, build_volume
from medseg.errors import DataError
from medseg.io import write_json
from medseg.manifest import CaseRecord, FailedCase, Manifest, save_manifest
from medseg.review.feedback import ReviewedCase
from medseg.stages.ingest_cases import IngestResult, ingest_case, write_case
from medseg.stages.ingest_reviewed import add_reviewed, read_reviewed, review_labels

log = logging.getLogger(__name__)


def _case_id(group: SeriesGroup, config: IngestConfig) -> str:
    if config.case_ids == "patient":
        patient = re.sub(r"[^A-Za-z0-9-]+", "-", str(group.value("PatientID") or "unknown")).strip("-")
        return f"{patient or 'unknown'}_{group.case_id}"
    return group.case_id


def _labels_by_series(objects: list[DicomFile]) -> dict[str, list[DicomFile]]:
    out: dict[str, list[DicomFile]] = {}
    for obj in objects:
        uid = obj.references
        if uid:
            out.setdefault(uid, []).append(obj)
        else:
            log.warning("%s: a %s object that references no series; left out", obj.path, obj.kind.upper())
    return out


def _read_label(obj: DicomFile, volume: SeriesVolume, names: dict[int, str] | None) -> tuple[np.ndarray, dict[int, str]]:
    from medseg.dicom.labels import read_rtstruct, read_seg

    reader = read_seg if obj.kind == "seg" else read_rtstruct
    label = reader(obj.path, volume, names)
    return label.data, label.names


def _convert(
    group: SeriesGroup,
    case_id: str,
    out_dir: Path,
    config: IngestConfig,
    label_objects: list[DicomFile],
    names: dict[int, str] | None,
    workers: int,
) -> tuple[CaseRecord, dict[int, str] | None]:
    volume = build_volume(
        group.frames, group.name, tolerance_mm=config.slice_tolerance_mm, min_slices=config.min_slices,
        resample_tilt=config.resample_tilt, workers=workers, locations=group.pixels,
    )
    data = volume.data
    channels = data.shape[3] if data.ndim == 4 else 1
    label = None
    label_names = None
    label_sources: list[Path] = []
    if label_objects:
        if len(label_objects) > 1:
            log.warning("%s: %d label objects reference it; using %s", group.name, len(label_objects), label_objects[0].path)
        label, label_names = _read_label(label_objects[0], volume, names)
        label_sources.append(label_objects[0].path)
    files = sorted({f.path for f in group.frames}) + label_sources
    as_channels = data.reshape(data.shape[:3] + (channels,))  # its own type: integer percentiles are counted
    record = write_case(out_dir, case_id, data, as_channels, volume.affine, label, files)
    write_json(out_dir / f"images/{case_id}.json", sidecar(group.header, volume, case_id=case_id))
    return record, label_names


def _add_reviewed(records: list[CaseRecord], failed: list[FailedCase], names: dict[int, str] | None,
                  reviewed: tuple[list[ReviewedCase], list[FailedCase]], out_dir: Path, config: IngestConfig,
                  ) -> tuple[list[CaseRecord], dict[int, str] | None]:
    """The series' records with the reviewed cases (``medseg.stages.ingest_reviewed``) added; their
    refusals go to ``failed``. The label names are the series' or else the reviews'."""
    cases, refused = reviewed
    if not cases and not refused:
        return records, names
    names = names if names is not None else review_labels(cases)
    checked = {0: "background", **names} if names is not None and 0 not in names else names
    extra = add_reviewed(cases, records, failed, checked, lambda case: ingest_case(case, out_dir, checked, config))
    failed += refused + extra.failed
    return [r for r in records if r.case_id not in extra.replaced] + extra.records, names


def _damaged_beside(group: SeriesGroup, refused: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The refused (damaged) files in a folder that holds images of ``group``: any of them may be
    one of its slices, whose series UID could not be read."""
    folders = {f.path.parent for f in group.frames}
    return [(path, why) for path, why in refused if Path(path).parent in folders]


def _log_refused_files(refused: list[tuple[str, str]]) -> None:
    """One error line per folder of refused files (a series of 300 bad slices is one line, not 300)."""
    by_folder: dict[str, list[str]] = {}
    for path, reason in refused:
        by_folder.setdefault(str(Path(path).parent), []).append(reason)
    for folder, reasons in by_folder.items():
        more = f" ({len(reasons)} files refused; see report.json)" if len(reasons) > 1 else ""
        log.error("DICOM files left out: %s%s", reasons[0], more)


def ingest_dicom(root: Path, out_dir: Path, config: IngestConfig | None = None, *, workers: int = 4) -> IngestResult:
    """Convert every series under ``root`` into ``out_dir``; write the manifest and ``report.json``."""
    config = config or IngestConfig()
    out_dir = Path(out_dir)
    files = files_under(root)
    with process_pool(len(files), workers) as pool:
        return _ingest(root, files, out_dir, config, workers, pool)


def _ingest(
    root: Path, files: list[Path], out_dir: Path, config: IngestConfig, workers: int, pool: Pool | None
) -> IngestResult:
    reviewed = read_reviewed(config.reviewed)  # a missing review folder fails before the conversion
    found = scan(root, pool=pool, listed=files)
    labels_of = _labels_by_series(found.labels)
    names = config.labels
    records: list[CaseRecord] = []
    failed: list[FailedCase] = []
    seen: dict[str, int] = {}
    jobs: list[tuple[SeriesGroup, str]] = []
    for group in found.series:
        case_id = _case_id(group, config)
        seen[case_id] = seen.get(case_id, 0) + 1
        if seen[case_id] > 1:
            case_id = f"{case_id}_{seen[case_id]}"
        damaged = _damaged_beside(group, found.refused)
        if damaged:
            error = (f"{group.name}: expected every DICOM file beside its images to be readable, found {len(damaged)} "
                     f"damaged (a slice of it could be missing unnoticed); first: {damaged[0][1]}")
            log.error("series left out: %s", error)
            failed.append(FailedCase(case_id=case_id, file=str(group.folder), error=error))
            continue
        jobs.append((group, case_id))
    # Series without labels are converted in the worker processes, as they come; series with
    # labels here, in order, so that the first one's label names serve all (when none are set).
    pending = {
        i: pool.apply_async(_convert, (group, case_id, out_dir, config, [], None, 1))
        for i, (group, case_id) in enumerate(jobs)
        if pool is not None and not labels_of.get(group.series_uid)
    }
    for i, (group, case_id) in enumerate(jobs):
        try:
            if i in pending:
                record, label_names = pending[i].get()
            else:
                record, label_names = _convert(
                    group, case_id, out_dir, config, labels_of.get(group.series_uid, []), names, workers
                )
        except DataError as err:
            log.error("series left out: %s", err)
            failed.append(FailedCase(case_id=case_id, file=str(group.folder), error=str(err)))
            continue
        if label_names and names is None:
            names = label_names
        records.append(record)
        log.info("%s -> %s %s", group.name, record.image, record.shape + ([record.channels] if record.channels > 1 else []))
    records, names = _add_reviewed(records, failed, names, reviewed, out_dir, config)
    for path, reason in found.refused:
        failed.append(FailedCase(case_id="", file=path, error=reason))
    _log_refused_files(found.refused)
    report = {
        "root": str(Path(root).resolve()),
        "converted": [{"case_id": r.case_id, "image": r.image, "label": r.label, "shape": r.shape,
                       "volumes": r.channels} for r in records],
        "refused": [f.model_dump() for f in failed],
        "ignored": [{"file": str(p), "reason": why} for p, why in found.ignored],
    }
    write_json(out_dir / "report.json", report)
    if not records:
        raise DataError(f"{root}: no DICOM series could be converted ({len(failed)} refused; see {out_dir / 'report.json'})")
    channels = Counter(r.channels for r in records).most_common(1)[0][0]
    for r in [r for r in records if r.channels != channels]:
        # Its NIfTI is written; the manifest (one channel count for training) leaves it out.
        failed.append(FailedCase(case_id=r.case_id, file=r.image,
                                 error=f"{r.case_id}: has {r.channels} volumes where most series have {channels}"))
    kept = [r for r in records if r.channels == channels]
    modality = config.modality or Counter(
        str(g.value("Modality") or "MR") for g in found.series
    ).most_common(1)[0][0]
    if names is not None and 0 not in names:
        names = {0: "background", **names}
    manifest = Manifest(
        dataset=str(Path(root).resolve()), kind="dicom", labels=names, modality=modality,
        channels=channels, cases=kept, failed=failed,
    )
    manifest_path = out_dir / "manifest.json"
    save_manifest(manifest, manifest_path)
    log.info("converted %d series, %d refused, %d files ignored -> %s",
             len(records), len(failed), len(found.ignored), out_dir)
    return IngestResult(manifest_path, len(records), len(failed))
