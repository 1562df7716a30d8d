"""Masks for cases already found, with models already loaded: the work behind ``medseg predict``
(``medseg.stages.predict``, whose module doc says what is written to the folder and how a rerun
resumes) and behind the registered model's MLflow pyfunc (``medseg.pyfunc``).
"""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from medseg.config import PredictConfig
from medseg.errors import DataError, MedsegError, ModelError
from medseg.inference import (
    PROBABILITY_SCALE,
    probabilities,
    restore,
    restore_ensemble,
    uncertainty_score,
    without_voxels,
)
from medseg.io import (
    atomic_path,
    folder_lock,
    load_nifti,
    read_json,
    save_nifti,
    voxel_volume_ml,
    write_json,
)
from medseg.modelio import ModelSpec
from medseg.plans import Plan
from medseg.postprocess import keep_largest_component
from medseg.qc import FAILED_DIR, QC_DIR, case_qc
from medseg.sources import CaseSource
from medseg.validated import resolve, weights_digest

RECORD = "predict.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictResult:
    out_dir: Path
    written: list[Path]  # the masks of every case done, this run or a resumed one
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # cases a previous run had done


def _as_single_file(case: CaseSource, tmp: Path) -> Path:
    """One NIfTI file per case in its original geometry (DICOM and multi-file cases are converted)."""
    if case.kind == "dicom":
        from medseg.dicom import read_series

        volume = read_series(case.images)
        out = tmp / f"{case.case_id}.nii.gz"
        save_nifti(out, volume.data.astype(np.float32), volume.affine)
        return out
    if len(case.images) == 1:
        return case.images[0]
    channels = [load_nifti(p) for p in case.images]
    for path, img in zip(case.images[1:], channels[1:]):
        if img.shape != channels[0].shape or not np.allclose(img.affine, channels[0].affine, atol=1e-3):
            raise DataError(f"{path}: expected the grid of {case.images[0]}, found another shape or affine")
    out = tmp / f"{case.case_id}.nii.gz"
    stacked = np.stack([np.asarray(c.dataobj, dtype=np.float32) for c in channels], axis=-1)
    save_nifti(out, stacked, channels[0].affine)
    return out


def _write_dicom_seg(mask: np.ndarray, affine: np.ndarray, case: CaseSource, spec: ModelSpec, target: Path) -> None:
    """Write ``mask`` as a DICOM-SEG of the case's source series (same grid, checked)."""
    from medseg.dicom import read_series
    from medseg.dicom.segwrite import write_seg

    series = read_series(case.dicom_files)
    if series.data.shape[:3] != mask.shape or not np.allclose(series.affine, affine, atol=1e-3):
        raise DataError(
            f"{case.case_id}: expected the mask on the grid of its DICOM series {series.name}, "
            f"found shape {mask.shape} against {series.data.shape[:3]} or another affine"
        )
    names = {k: v for k, v in spec.plan.labels.items() if k != 0}
    write_seg(mask, series, target, names=names, description=f"medseg prediction of {case.case_id}")


def _run_record(refs: Sequence[str], loaded: Sequence[tuple[nn.Module, ModelSpec]], config: PredictConfig,
                validated: dict[str, Any] | None) -> dict:
    return {
        "models": [{"model": ref, "weights": weights_digest(net)} for ref, (net, _) in zip(refs, loaded)],
        "config": config.model_dump(mode="json", exclude={"prefetch"}),
        "validated": validated,  # the settings taken from the models' validation (medseg.validated), or null
    }


def _open_output(out_dir: Path, record: dict, overwrite: bool, replace_others: bool = False) -> bool:
    """Write the run record into ``out_dir``; True when it continues an unfinished run of the same record.
    A folder of another record is refused, or with ``overwrite`` or ``replace_others`` started afresh: its
    QC records, which mark cases as done, are removed (its masks are replaced as the cases are predicted)."""
    path = out_dir / RECORD
    with folder_lock(out_dir):  # shards that start together open it one at a time
        same = False
        if path.exists():
            previous = read_json(path)
            same = {k: previous.get(k) for k in record} == record if isinstance(previous, dict) else False
            if not same and not (overwrite or replace_others):
                raise DataError(
                    f"{out_dir}: expected an empty folder or one with predictions of the same models and settings, "
                    f"found others (see {path}); choose another folder or overwrite them (--overwrite)"
                )
        if overwrite or not same:
            for stale in [*(out_dir / QC_DIR).glob("*.json"), *(out_dir / FAILED_DIR).glob("*.json")]:
                stale.unlink()
        write_json(path, record)
    return same and not overwrite


def _check_scan(scan: Path, image: nib.Nifti1Image, plan: Plan, max_ratio: float) -> None:
    """A scan the model can read: 3D, or 4D with the model's number of channels last, whose
    intensities vary, with voxels within ``max_ratio`` of the plan's spacing on every axis."""
    shape, channels = tuple(image.shape), plan.channels
    fits = (len(shape) == 3 and channels == 1) or (len(shape) == 4 and shape[3] == channels)
    if not fits:
        wanted = "a 3D scan" if channels == 1 else f"a 4D scan with {channels} channels last"
        raise DataError(f"{scan}: expected {wanted} for this model, found shape {shape}")
    data = np.asanyarray(image.dataobj)
    low, high = data.min(), data.max()
    if low == high:
        raise DataError(f"{scan}: expected a scan whose intensities vary, found every voxel is {float(low):g}")
    # Compared axis by axis from the finest: the scan may be stored in another axis order than the plan's.
    spacing = sorted(float(s) for s in np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0)))
    target = sorted(float(s) for s in plan.target_spacing_mm)
    ratios = [max(s / t, t / s) if s > 0 else math.inf for s, t in zip(spacing, target)]
    if max(ratios) > max_ratio:
        shown = " x ".join(f"{s:.3g}" for s in spacing)
        wanted = " x ".join(f"{t:.3g}" for t in target)
        raise DataError(
            f"{scan}: expected a voxel spacing within a factor {max_ratio:g} of the model's ({wanted} mm), found "
            f"{shown} mm (a factor {max(ratios):.3g}); the model was not trained for such images (raise "
            "predict.max_spacing_ratio to predict it anyway)"
        )


def scan_record(case: CaseSource) -> dict:
    """Where a case's scan is, for the QC and failure records (absolute paths)."""
    return {"scan": [str(Path(p).resolve()) for p in case.images], "scan_kind": case.kind}


def _done(out_dir: Path, case_id: str) -> bool:
    return (out_dir / QC_DIR / f"{case_id}.json").is_file() and (out_dir / f"{case_id}.nii.gz").is_file()


@dataclass
class _Prepared:
    case: CaseSource
    scan: Path
    affine: np.ndarray
    shape: tuple[int, ...]
    data: list[dict[str, Any]]  # the scan preprocessed for each group of models
    probs: list[torch.Tensor] = field(default_factory=list)  # each group's probabilities, on its grid
    uncertainty: float = 0.0


def _write_table(out_dir: Path, case_ids: Sequence[str]) -> Path:
    """``cases.csv``: the QC record of every case of ``case_ids`` (cases that are done)."""
    rows = []
    for case_id in case_ids:
        qc = read_json(out_dir / QC_DIR / f"{case_id}.json")
        rows.append({
            "case_id": case_id, "mask": f"{case_id}.nii.gz", "uncertainty": round(qc["uncertainty"], 6),
            "flags": ";".join(qc["flags"]),
            **{f"volume_{name}_ml": round(v, 6) for name, v in qc["volumes_ml"].items()},
        })
    target = out_dir / "cases.csv"
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as handle:
        fields = list(dict.fromkeys(k for row in rows for k in row)) or ["case_id"]
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return target


def predict_cases(
    cases: Sequence[CaseSource],
    out_dir: Path,
    loaded: Sequence[tuple[nn.Module, ModelSpec]],
    refs: Sequence[str],
    config: PredictConfig | None = None,
    *,
    device: torch.device,
    overwrite: bool = False,
    replace_others: bool = False,
    source: str = "the input",
) -> PredictResult:
    """``predict`` for cases already found and models already loaded on ``device`` (``refs`` name
    them in ``predict.json``); ``source`` names the input in errors. The settings of ``config`` that
    were not set explicitly come from the models' validation where they have one (``medseg.validated``)."""
    from monai.transforms import Invertd

    from medseg.transforms import preprocessing

    torch.backends.cudnn.benchmark = device.type == "cuda"
    if not loaded or len(refs) != len(loaded):
        raise ModelError(f"expected a name for each of the {len(loaded)} models, found {len(refs)}")
    config, validated = resolve(config, [spec.validated for _, spec in loaded], refs)
    models = list(refs)
    if len({c.case_id for c in cases}) != len(cases):
        raise DataError(f"{source}: expected one scan per case id, found a case id twice")
    first = loaded[0][1]
    # models that share a plan, preprocessing and window are averaged per window; groups of other
    # plans (configurations) each run their own chain and are averaged on the scan's grid
    groups: list[list[tuple[nn.Module, ModelSpec]]] = []
    for ref, (net, spec) in zip(models, loaded):
        if spec.plan.labels != first.plan.labels or spec.plan.channels != first.plan.channels:
            raise ModelError(f"model {ref}: expected the labels and channels of {models[0]} for an ensemble, found "
                             f"{spec.plan.labels} and {spec.plan.channels} channel(s)")
        for group in groups:
            same = group[0][1]
            if spec.plan == same.plan and spec.preprocess == same.preprocess and spec.roi_size == same.roi_size:
                group.append((net, spec))
                break
        else:
            groups.append([(net, spec)])
    chains = [preprocessing(g[0][1].plan, crop_foreground=g[0][1].preprocess.crop_foreground, with_label=False)
              for g in groups]
    inverters = [Invertd(keys="pred", transform=c, orig_keys="image", nearest_interp=False) for c in chains]
    out_dir = Path(out_dir)
    resume = _open_output(out_dir, _run_record(models, loaded, config, validated), overwrite, replace_others)
    skipped = [c.case_id for c in cases if resume and _done(out_dir, c.case_id)]
    todo = [c for c in cases if c.case_id not in set(skipped)]
    if skipped:
        log.info("%s: %d of %d cases were done by an earlier run of these models; predicting the other %d",
                 out_dir, len(skipped), len(cases), len(todo))
    log.info("predicting %d scans with %d model(s) on %s", len(todo), len(loaded), device)
    failed: dict[str, str] = {}

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)

        def prepare(case: CaseSource) -> _Prepared:
            scan = _as_single_file(case, tmp)
            original = load_nifti(scan)
            _check_scan(scan, original, first.plan, config.max_spacing_ratio)
            prepared = []
            for step, group in zip(chains, groups):
                try:
                    data = step({"image": str(scan)})
                except (RuntimeError, ValueError) as err:  # MONAI wraps a failing step's error
                    reason = str(err.__cause__ or err)
                    if group[0][1].preprocess.crop_foreground and not np.any(np.asanyarray(original.dataobj)):
                        reason = "every voxel is 0, so there is no non-zero region to crop to"
                    raise DataError(f"{scan}: could not be preprocessed: {reason}") from None
                bad = int((~torch.isfinite(data["image"].as_tensor())).sum())
                if bad:
                    raise DataError(
                        f"{scan}: expected finite voxel values, found NaN or infinite ones ({bad} after preprocessing)"
                    )
                prepared.append(data)
            return _Prepared(case, scan, np.asarray(original.affine), tuple(original.shape[:3]), prepared)

        def finish(item: _Prepared) -> None:
            case = item.case
            assert item.probs
            if len(item.probs) > 1:
                restored, item.uncertainty = restore_ensemble(
                    list(zip(item.probs, item.data, inverters)), uncertainty=config.uncertainty_maps,
                    keep_probabilities=config.probability_maps)
            else:
                restored = restore(item.probs[0], item.data[0], inverters[0], uncertainty=config.uncertainty_maps,
                                   keep_probabilities=config.probability_maps)
            item.probs = []
            if config.largest_component:
                keep_largest_component(restored.mask, config.largest_component)
            if restored.mask.shape != item.shape:
                raise DataError(
                    f"{item.scan}: internal error, restored mask has shape {restored.mask.shape}, expected {item.shape}"
                )
            save_nifti(out_dir / f"{case.case_id}.nii.gz", restored.mask, item.affine)
            if config.dicom_seg and case.dicom_files:
                _write_dicom_seg(restored.mask, item.affine, case, first, out_dir / f"{case.case_id}_seg.dcm")
            if restored.uncertainty is not None:
                save_nifti(out_dir / "uncertainty" / f"{case.case_id}.nii.gz", restored.uncertainty, item.affine)
            if restored.probabilities is not None:
                save_nifti(out_dir / "probabilities" / f"{case.case_id}.nii.gz", restored.probabilities,
                           item.affine, slope=1.0 / PROBABILITY_SCALE)
            qc = case_qc(
                case.case_id, restored.mask, voxel_volume_ml(item.affine), first.plan.labels,
                item.uncertainty, volume_range=first.plan.fingerprint.class_volume_ml,
                volume_tolerance=config.volume_tolerance, max_uncertainty=config.max_uncertainty,
            )
            (out_dir / FAILED_DIR / f"{case.case_id}.json").unlink(missing_ok=True)
            # last: the case is done
            write_json(out_dir / QC_DIR / f"{case.case_id}.json", {
                **qc.as_dict(), **scan_record(case),
                "labels": {str(k): v for k, v in sorted(first.plan.labels.items()) if k != 0},
            })
            if qc.flags:
                log.warning("case %s flagged: %s", case.case_id, "; ".join(qc.details.values()))
            if item.scan.is_relative_to(tmp):
                item.scan.unlink(missing_ok=True)

        def fail(case: CaseSource, message: str) -> None:
            failed[case.case_id] = message
            log.error("case %s failed: %s", case.case_id, message)
            write_json(out_dir / FAILED_DIR / f"{case.case_id}.json",
                       {"case_id": case.case_id, "error": message, **scan_record(case)})

        def collect(case: CaseSource, future: Future) -> Any:
            try:
                return future.result()
            except MedsegError as err:
                fail(case, str(err))
            except RuntimeError as err:  # restoring or writing: out of memory, for one
                fail(case, f"{case.case_id}: could not be restored and written: {err}")
            return None

        with ThreadPoolExecutor(1, thread_name_prefix="medseg-read") as reader, \
                ThreadPoolExecutor(1, thread_name_prefix="medseg-write") as writer:
            upcoming = iter(todo)
            reads: deque[tuple[CaseSource, Future]] = deque()
            writing: tuple[CaseSource, Future] | None = None

            def read_next() -> None:
                case = next(upcoming, None)
                if case is not None:
                    reads.append((case, reader.submit(prepare, case)))

            for _ in range(config.prefetch + 1):
                read_next()
            while reads:
                case, future = reads.popleft()
                item = collect(case, future)
                if item is not None:
                    try:
                        for data, group in zip(item.data, groups):
                            image = data["image"]
                            probs = probabilities(image.as_tensor(), group, config, device)
                            if len(groups) == 1:  # an ensemble of groups gets its score on the scan's grid
                                item.uncertainty = uncertainty_score(probs)
                            data["image"] = without_voxels(image)
                            del image
                            item.probs.append(probs.half())  # halves what waits for the writer
                            del probs
                    except (MedsegError, RuntimeError) as err:  # RuntimeError: out of memory, for one
                        fail(case, f"{item.scan}: the network failed: {err}")
                        item = None
                if writing is not None:
                    collect(*writing)
                    writing = None
                if item is not None:
                    writing = (case, writer.submit(finish, item))
                    if config.prefetch == 0:
                        collect(*writing)
                        writing = None
                read_next()
            if writing is not None:
                collect(*writing)

    done = [c.case_id for c in cases if _done(out_dir, c.case_id)]
    # every case done in the folder: shards of one run share it
    _write_table(out_dir, sorted(p.stem for p in (out_dir / QC_DIR).glob("*.json") if _done(out_dir, p.stem)))
    written = [out_dir / f"{case_id}.nii.gz" for case_id in done]
    log.info("wrote %d masks to %s (%d failed, %d done before)", len(written) - len(skipped), out_dir,
             len(failed), len(skipped))
    if not written:
        raise DataError(f"{source}: no scan could be predicted ({len(failed)} failed)")
    return PredictResult(out_dir, written, failed, skipped)
