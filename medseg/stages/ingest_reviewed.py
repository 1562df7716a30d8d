"""ingest of reviewed cases: the accepted and corrected masks of review folders (``ingest.reviewed``)
become training cases beside the dataset's.

Which cases of a review folder count is ``medseg.review.feedback``'s rule. Each one's scan (a
NIfTI, or the DICOM files of a series) is converted as ingest converts the dataset's cases, and its
reviewed mask, on the scan's own grid, is checked against the scan like any label and written on
the ingested image's grid, voxel for voxel. Its manifest record carries the label's provenance
(``CaseRecord.provenance``).

A case id in two review folders, or in the dataset and a review folder, is refused (``DataError``
naming both places), with one exception: a case of the dataset without a label (a test case, a
DICOM series without a segmentation) whose scan is the reviewed case's scan, byte for byte, is the
scan the review labelled, and the reviewed case takes its place. A reviewed case that cannot be
ingested (its label changed since it was saved, not on its scan's grid, of undeclared values) is
logged and recorded under ``failed`` in the manifest, and the others go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import DataError
from medseg.io import sha256
from medseg.manifest import CaseRecord, FailedCase, LabelProvenance
from medseg.review.feedback import ReviewedCase, read_feedback
from medseg.sources import CaseSource

log = logging.getLogger(__name__)

Convert = Callable[[CaseSource], CaseRecord]  # ingest's check and conversion of one case


@dataclass(frozen=True)
class ReviewedIngest:
    records: list[CaseRecord]
    failed: list[FailedCase]
    replaced: frozenset[str]  # unlabelled dataset cases whose scans the reviewed cases label


def read_reviewed(folders: Sequence[str | Path]) -> tuple[list[ReviewedCase], list[FailedCase]]:
    """The reviewed cases of every folder, and those refused; ``DataError`` for a folder that is
    missing or not built, or a case id found in two of them."""
    cases: dict[str, ReviewedCase] = {}
    refused: list[FailedCase] = []
    for folder in folders:
        feedback = read_feedback(Path(folder))
        refused += [FailedCase(case_id=r.case_id, file=r.file, error=r.error) for r in feedback.refused]
        for case in feedback.cases:
            other = cases.get(case.case_id)
            if other is not None:
                raise DataError(f"case {case.case_id}: found in the review folders {other.review_dir} and "
                                f"{case.review_dir}; expected each reviewed case in one folder")
            cases[case.case_id] = case
    return list(cases.values()), refused


def review_labels(cases: Sequence[ReviewedCase]) -> dict[int, str] | None:
    """The label names of the models that predicted the reviewed masks, for a dataset that declares none."""
    return next(({0: "background", **c.labels} for c in cases if c.labels), None)


def provenance(case: ReviewedCase) -> LabelProvenance:
    return LabelProvenance(
        origin=case.origin, review_dir=str(case.review_dir), reviewer=case.reviewer, reviewed_at=case.reviewed_at,
        corrected_by=case.corrected_by, corrected_at=case.corrected_at, predicted_by=list(case.predicted_by),
        label_sha256=case.label_sha256,
    )


def _replaced(case: ReviewedCase, dataset: dict[str, CaseRecord], failed: dict[str, FailedCase]) -> bool:
    """Whether ``case`` labels an unlabelled dataset case of its id (True), or is new (False);
    ``DataError`` when the id is a labelled, failed or other dataset case."""
    where = f"in the review folder {case.review_dir}"
    if case.case_id in failed:
        raise DataError(f"case {case.case_id}: found in the dataset ({failed[case.case_id].file}, which failed) and "
                        f"{where}; expected each case once")
    record = dataset.get(case.case_id)
    if record is None:
        return False
    first = record.sources[0].path if record.sources else record.image
    if record.label is not None:
        raise DataError(f"case {case.case_id}: found in the dataset ({first}, labelled) and {where}; "
                        "expected each case once")
    theirs = sorted(s.sha256 for s in record.sources)
    if len(theirs) != len(case.scan) or sorted(sha256(p) for p in case.scan if p.is_file()) != theirs:
        raise DataError(f"case {case.case_id}: found in the dataset ({first}) and {where} with another scan; "
                        "expected each case once")
    return True


def _check_labels(case: ReviewedCase, labels: dict[int, str] | None) -> None:
    declared = {k: v for k, v in (labels or {}).items() if k != 0}
    if declared and case.labels and case.labels != declared:
        raise DataError(f"{case.label}: expected a mask of the dataset's labels {declared}, found one of a model "
                        f"of the labels {case.labels} ({case.review_dir / 'queue.json'})")
    if not case.scan:
        raise DataError(f"{case.review_dir / 'queue.json'}: expected the scan of case {case.case_id}, found none "
                        "recorded (build the review folder again with --scans)")


def add_reviewed(
    cases: Sequence[ReviewedCase],
    dataset: Sequence[CaseRecord],
    dataset_failed: Sequence[FailedCase],
    labels: dict[int, str] | None,
    convert: Convert,
) -> ReviewedIngest:
    """Ingest the reviewed ``cases`` with ``convert`` beside the ``dataset``'s records (see the module doc)."""
    by_id = {r.case_id: r for r in dataset}
    failed_by_id = {f.case_id: f for f in dataset_failed if f.case_id}
    records: list[CaseRecord] = []
    failed: list[FailedCase] = []
    replaced: set[str] = set()
    for case in cases:
        replacing = _replaced(case, by_id, failed_by_id)
        try:
            _check_labels(case, labels)
            record = convert(CaseSource(case.case_id, case.scan, case.label, "dicom" if case.scan_kind == "dicom"
                                        else "nifti"))
        except DataError as err:
            message = str(err)
            files = [str(p) for p in (*case.scan, case.label)]
            named = next((f for f in files if f in message), str(case.label))
            log.error("reviewed case %s left out: %s", case.case_id, message)
            failed.append(FailedCase(case_id=case.case_id, file=named, error=message))
            continue
        records.append(record.model_copy(update={"provenance": provenance(case)}))
        if replacing:
            replaced.add(case.case_id)
    if cases:
        log.info("%d reviewed cases ingested (%d take the place of unlabelled dataset cases), %d left out",
                 len(records), len(replaced), len(failed))
    return ReviewedIngest(records, failed, frozenset(replaced))
