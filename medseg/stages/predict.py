"""predict: masks for new scans, written in each scan's own geometry.

Each scan goes through the training-time preprocessing (from the model's spec), a MONAI
sliding-window inference with Gaussian weighting (each window averaged over flips and over
the models of an ensemble, ``medseg.inference``), and MONAI's ``Invertd``, which undoes the
resampling, crop and reorientation on the class probabilities, one class at a time. The
models are loaded once for all scans. Reading and preprocessing the next scans
(``prefetch``) and restoring and writing the last one run on background threads while the
network works on the current one; the queues are bounded, so memory is too.

Outputs in ``out_dir``, each written atomically:

- ``<case>.nii.gz``: the mask (uint8) with the scan's shape and affine, so it overlays it; for the
  labels of ``largest_component`` only their largest connected component is kept
  (``medseg.postprocess``);
- ``<case>_seg.dcm`` for scans read from DICOM: a DICOM-SEG that references the source series,
  one segment per label, on exactly the voxels of the NIfTI mask;
- ``uncertainty/<case>.nii.gz`` and ``probabilities/<case>.nii.gz`` when asked for;
- ``qc/<case>.json``: volumes, uncertainty score and quality-control flags (``medseg.qc``), and
  the scan it was made from (``scan``, ``scan_kind``) and the labels, written last: a case with it is done;
- ``failed/<case>.json``: for a case that failed, its scan and the error (removed once it is
  predicted), so ``medseg review`` lists it;
- ``cases.csv``: a row per case of the folder predicted so far (by this run or by the other shards
  of it), with its volumes, score and flags;
- ``predict.json``: the models (with a digest of their weights) and settings that made them, and
  which settings came from the models' validation (``validated``).

The settings: those given (``config``'s fields set explicitly; every one of a config read from
files) win. Each other setting that changes the masks (overlap, Gaussian weighting, flips, the
largest-component decision) is the one the models were validated with, where evaluate recorded it
(``medseg.validated``): so a registered model predicts as cross-validation measured it. The rest keep
their defaults.

A run into a folder that a run of the same models and settings left unfinished predicts only
the cases not yet done. A folder made by other models or settings is refused unless
``overwrite`` is given (every case is redone), or ``replace_others`` (for workflows: start such a
folder afresh, resume one of the same models and settings). ``shard`` splits the cases between
processes that write into one folder. A case that fails is logged and reported, and the others
go on.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from pathlib import Path

from medseg.config import PredictConfig
from medseg.errors import ConfigError, DataError, ModelError
from medseg.manifest import load_manifest
from medseg.modelio import load_model, resolve_device
from medseg.prediction import RECORD, PredictResult, predict_cases, scan_record
from medseg.sources import CaseSource, discover

__all__ = ["RECORD", "PredictResult", "cases_from_input", "predict", "predict_cases", "scan_record"]

log = logging.getLogger(__name__)


def cases_from_input(path: Path, case_ids: Collection[str] | None = None) -> list[CaseSource]:
    """The scans to predict: a manifest JSON, or anything ``discover`` reads (test cases first)."""
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        manifest, root = load_manifest(path)
        records = manifest.cases + manifest.test_cases
        cases = [
            CaseSource(r.case_id, (root / r.image,),
                       dicom_files=tuple(Path(s.path) for s in r.sources) if manifest.kind == "dicom" else ())
            for r in records
        ]
    else:
        found = discover(path)
        cases = list(found.test_cases or found.cases)
    if case_ids is not None:
        wanted = set(case_ids)
        unknown = wanted - {c.case_id for c in cases}
        if unknown:
            raise DataError(f"{path}: cases asked for but not found: {sorted(unknown)[:5]}")
        cases = [c for c in cases if c.case_id in wanted]
    if not cases:
        raise DataError(f"{path}: found no scans to predict")
    return cases


def predict(
    input_path: Path,
    out_dir: Path,
    models: Sequence[str],
    config: PredictConfig | None = None,
    *,
    case_ids: Collection[str] | None = None,
    device: str = "auto",
    tracking_uri: str | None = None,
    overwrite: bool = False,
    replace_others: bool = False,
    shard: tuple[int, int] | None = None,
) -> PredictResult:
    """Write one mask per scan found at ``input_path`` into ``out_dir``; see the module doc.
    ``shard=(k, n)``: only every n-th case by case id, from the k-th (0-based), so n processes
    (one per GPU, or cluster jobs) share the cases and the folder."""
    if not models:
        raise ModelError("expected at least one model, found none")
    dev = resolve_device(device)
    loaded = [load_model(ref, dev, tracking_uri) for ref in models]
    cases = cases_from_input(input_path, case_ids)
    if shard is not None:
        k, n = shard
        if not 0 <= k < n:
            raise ConfigError(f"shard: expected K/N with 0 <= K < N, found {k}/{n}")
        cases = sorted(cases, key=lambda c: c.case_id)[k::n]
        if not cases:
            log.info("shard %d/%d of %s: no cases", k, n, input_path)
            return PredictResult(Path(out_dir), [])
    return predict_cases(cases, out_dir, loaded, models, config, device=dev, overwrite=overwrite,
                         replace_others=replace_others, source=str(input_path))
