"""evaluate: Dice, IoU, HD95, average surface distance and surface Dice per case and class.

Metrics are MONAI's, computed in each reference label's own grid with its voxel spacing (mm).
HD95 is the larger of the two directed 95th percentiles of surface distances; the average
surface distance (ASD) is the mean of the distances of both surfaces' voxels to the other
surface (symmetric); surface Dice counts the surface voxels within the tolerance.
Conventions: a class absent from both mask and reference has Dice, IoU and surface Dice 1,
and no distance (NaN); a class absent from only one of them has Dice, IoU and surface Dice 0
and distances NaN (reported, and left out of the means, which count only finite values).

Outputs in ``out_dir``: ``metrics.csv`` (a row per case and class, with the volumes in mL and
the quality-control flags predict wrote for the case), ``summary.json`` (mean, median,
standard deviation and quartiles per class and metric; ``mean_dice`` over the foreground
classes; the flagged cases), ``metrics.png`` (box plots per class, and Dice against the
reference volume), ``postprocessing.json`` (for each class, the mean Dice before and after
keeping only the largest connected component, and the classes where that helped:
``medseg.postprocess``; ``medseg predict --postprocessing`` applies it).

Given the models that made the predictions (``record_validated``, ``medseg evaluate --model-info``),
each model is given the settings its predictions were made with, this decision and the Dice they
gave, beside its checkpoint and in the registry (``medseg.validated``), so that ``medseg predict``
with the model predicts as it was validated.
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.config import EvaluateConfig
from medseg.errors import DataError, GeometryMismatchError
from medseg.io import (
    atomic_path,
    is_nifti,
    load_nifti,
    strip_nifti_suffix,
    voxel_volume_ml,
    write_json,
)
from medseg.manifest import load_manifest
from medseg.postprocess import FILE as POSTPROCESSING
from medseg.postprocess import case_effect, decide
from medseg.qc import read_case_qc

log = logging.getLogger(__name__)

METRICS = ("dice", "iou", "hd95_mm", "asd_mm", "surface_dice")


@dataclass(frozen=True)
class EvaluateResult:
    out_dir: Path
    summary: dict
    n_cases: int


def case_metrics(
    pred: np.ndarray, ref: np.ndarray, labels: Sequence[int], spacing_mm: Sequence[float], tolerance_mm: float
) -> dict[int, dict[str, float]]:
    """Metrics per foreground label for one case (integer masks of one shape)."""
    import torch
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    if pred.shape != ref.shape:
        raise GeometryMismatchError(f"expected the reference shape {ref.shape}, found {pred.shape}")
    classes = list(labels)
    p = torch.stack([torch.as_tensor(pred == c) for c in classes])[None].float()
    r = torch.stack([torch.as_tensor(ref == c) for c in classes])[None].float()
    spacing = [float(s) for s in spacing_mm]
    dice = compute_dice(p, r, include_background=True, ignore_empty=False)[0]
    iou = compute_iou(p, r, include_background=True, ignore_empty=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks; we report NaN for them
        hd = compute_hausdorff_distance(p, r, include_background=True, percentile=95, spacing=spacing)[0]
        asd = compute_average_surface_distance(p, r, include_background=True, symmetric=True, spacing=spacing)[0]
        sd = compute_surface_dice(
            p, r, class_thresholds=[tolerance_mm] * len(classes), include_background=True, spacing=spacing
        )[0]
    out = {}
    for i, c in enumerate(classes):
        p_any, r_any = bool(p[0, i].any()), bool(r[0, i].any())
        both = p_any and r_any
        hd_value = float(hd[i]) if both else math.nan
        asd_value = float(asd[i]) if both else math.nan
        sd_value = 1.0 if not p_any and not r_any else (float(sd[i]) if both else 0.0)
        out[c] = {
            "dice": float(dice[i]),
            "iou": float(iou[i]) if p_any or r_any else 1.0,
            "hd95_mm": hd_value if math.isfinite(hd_value) else math.nan,
            "asd_mm": asd_value if math.isfinite(asd_value) else math.nan,
            "surface_dice": sd_value,
            "ref_voxels": int(r[0, i].sum()),
            "pred_voxels": int(p[0, i].sum()),
        }
    return out


def references(manifest_path: Path | None, labels_dir: Path | None) -> tuple[dict[str, Path], dict[int, str] | None]:
    """The reference label of each case (from a manifest, or a folder of labels named like the masks),
    and the labels the manifest declares."""
    if manifest_path is not None:
        manifest, root = load_manifest(manifest_path)
        refs = {r.case_id: root / r.label for r in manifest.cases if r.label}
        return refs, manifest.labels
    if labels_dir is not None:
        return {strip_nifti_suffix(p.name): p for p in Path(labels_dir).iterdir() if is_nifti(p)}, None
    raise DataError("evaluate needs references: a manifest or a labels folder")


def _plots(rows: list[dict], names: dict[int, str], path: Path) -> None:
    """Box plots per class of each metric, and Dice against the reference volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(4 * (len(METRICS) + 1), 4))
    for ax, metric in zip(axes, METRICS):
        data, ticks = [], []
        for label, name in names.items():
            values = [r[metric] for r in rows if r["label"] == label and math.isfinite(r[metric])]
            data.append(values or [math.nan])
            ticks.append(name)
        ax.boxplot(data)
        ax.set_xticks(range(1, len(ticks) + 1), ticks)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for label, name in names.items():
        points = [(r["ref_volume_ml"], r["dice"]) for r in rows if r["label"] == label]
        ax.scatter([v for v, _ in points], [d for _, d in points], s=12, label=name, alpha=0.7)
    ax.set_xlabel("reference volume (mL)")
    ax.set_ylabel("dice")
    ax.set_title("dice against volume")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"{len({r['case_id'] for r in rows})} cases")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def summarize(rows: list[dict], names: dict[int, str]) -> dict:
    per_class = {}
    for label, name in names.items():
        stats = {}
        for metric in METRICS:
            values = np.array([r[metric] for r in rows if r["label"] == label], dtype=float)
            finite = values[np.isfinite(values)]
            stats[metric] = {
                "mean": float(finite.mean()) if finite.size else None,
                "median": float(np.median(finite)) if finite.size else None,
                "std": float(finite.std()) if finite.size else None,
                "p25": float(np.percentile(finite, 25)) if finite.size else None,
                "p75": float(np.percentile(finite, 75)) if finite.size else None,
                "n": int(finite.size),
            }
        per_class[name] = stats
    means = [s["dice"]["mean"] for s in per_class.values() if s["dice"]["mean"] is not None]
    flagged: dict[str, list[str]] = {}
    for r in rows:
        if r.get("qc_flags"):
            flagged[r["case_id"]] = r["qc_flags"].split(";")
    return {
        "n_cases": len({r["case_id"] for r in rows}),
        "mean_dice": float(np.mean(means)) if means else None,
        "classes": per_class,
        "flagged_cases": dict(sorted(flagged.items())),
    }


def evaluate(
    prediction_dirs: Sequence[Path],
    out_dir: Path,
    config: EvaluateConfig | None = None,
    *,
    manifest_path: Path | None = None,
    labels_dir: Path | None = None,
    labels: dict[int, str] | None = None,
) -> EvaluateResult:
    """Compare every mask in ``prediction_dirs`` with its reference; see the module doc."""
    config = config or EvaluateConfig()
    refs, declared = references(manifest_path, labels_dir)
    names = {k: v for k, v in sorted((labels or declared or {}).items()) if k != 0}
    for d in prediction_dirs:
        if not Path(d).is_dir():
            raise DataError(f"expected a folder of predicted masks, found {'a file' if Path(d).exists() else 'nothing'} "
                            f"at {d}")
    preds = {strip_nifti_suffix(p.name): p for d in prediction_dirs for p in sorted(Path(d).iterdir()) if is_nifti(p)}
    if not preds:
        raise DataError(f"no predicted masks found in {', '.join(map(str, prediction_dirs))}")
    if not names:  # nothing declared: every value found in any reference or mask
        found: set[int] = set()
        for case_id, pred_path in preds.items():
            for path in (pred_path, refs.get(case_id)):
                if path is not None and path.exists():
                    try:
                        found |= {int(v) for v in np.unique(np.asarray(load_nifti(path).dataobj).round())}
                    except DataError:
                        continue
        names = {v: str(v) for v in sorted(found - {0})}
    rows: list[dict] = []
    effects: list[dict[int, tuple[float, float]]] = []
    left_out: dict[str, str] = {}
    for case_id, pred_path in sorted(preds.items()):
        qc = read_case_qc(pred_path.parent, case_id) or {}
        if case_id not in refs:
            left_out[case_id] = f"{pred_path}: no reference label for this case"
            log.error("case %s left out: %s", case_id, left_out[case_id])
            continue
        try:
            pred_img, ref_img = load_nifti(pred_path), load_nifti(refs[case_id])
            if not np.allclose(pred_img.affine, ref_img.affine, atol=1e-3):
                raise GeometryMismatchError(f"{pred_path}: expected the affine of {refs[case_id]}, found another")
            ref = np.asarray(ref_img.dataobj).round().astype(np.int64)
            pred = np.asarray(pred_img.dataobj).round().astype(np.int64)
            spacing = np.sqrt((ref_img.affine[:3, :3] ** 2).sum(axis=0))
            voxel_ml = voxel_volume_ml(ref_img.affine)
            try:
                metrics = case_metrics(pred, ref, list(names), spacing, config.surface_tolerance_mm)
            except GeometryMismatchError as err:
                raise GeometryMismatchError(f"{pred_path}: {err}") from None
        except DataError as err:
            left_out[case_id] = str(err)
            log.error("case %s left out: %s", case_id, err)
            continue
        effects.append(case_effect(pred, ref, list(names)))
        for label, values in metrics.items():
            rows.append({
                "case_id": case_id, "label": label, "label_name": names[label], **values,
                "ref_volume_ml": values["ref_voxels"] * voxel_ml, "pred_volume_ml": values["pred_voxels"] * voxel_ml,
                "qc_flags": ";".join(qc.get("flags", [])), "uncertainty": qc.get("uncertainty", math.nan),
            })
    if not rows:
        raise DataError("no case could be evaluated (see the log)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "metrics.csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    # Every case the numbers leave out is named, so a mean over fewer cases is never taken for all of them.
    # A labels folder's references all await a mask; a manifest's are every case, of which the workflow
    # predicts the held-out ones of the folds it trains (a failed prediction is in its folder's failed/).
    not_predicted = sorted(set(refs) - set(preds)) if labels_dir is not None else []
    if not_predicted:
        log.warning("%d reference case(s) have no predicted mask and are not in the numbers: %s%s", len(not_predicted),
                    ", ".join(not_predicted[:5]), ", ..." if len(not_predicted) > 5 else "")
    summary = {**summarize(rows, names), "left_out": left_out, "not_predicted": not_predicted}
    write_json(out_dir / "summary.json", summary)
    decision = decide(effects, names)
    write_json(out_dir / POSTPROCESSING, decision)
    log.info("largest connected component: kept for labels %s (mean Dice before -> after: %s)",
             decision["largest_component"],
             ", ".join(f"{n} {c['dice_before']:.4f} -> {c['dice_after']:.4f}" for n, c in decision["classes"].items()))
    _plots(rows, names, out_dir / "metrics.png")
    log.info("evaluated %d cases: mean Dice %.4f", summary["n_cases"], summary["mean_dice"] or math.nan)
    return EvaluateResult(out_dir, summary, summary["n_cases"])


def log_to_mlflow(result: EvaluateResult, tracking_uri: str, model_infos: Sequence[Path]) -> list[str]:
    """Log the summary metrics and files to the parent run of the trainings that made the models."""
    import mlflow

    from medseg.io import read_json

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient()
    targets: list[str] = []
    for info_path in model_infos:
        run_id = read_json(info_path).get("run_id")
        if not run_id:
            continue
        parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId", run_id)
        if parent not in targets:
            targets.append(parent)
    for run_id in targets:
        client.log_metric(run_id, "eval_mean_dice", result.summary["mean_dice"] or math.nan)
        for name, stats in result.summary["classes"].items():
            for metric in METRICS:
                if stats[metric]["mean"] is not None:
                    client.log_metric(run_id, f"eval_{metric}_{name}", stats[metric]["mean"])
        for fname in ("metrics.csv", "summary.json", "metrics.png", POSTPROCESSING):
            client.log_artifact(run_id, str(result.out_dir / fname), artifact_path="evaluation")
    return targets


def validated_dice(summary: dict, decision: dict) -> float | None:
    """The mean Dice over the labels after the post-processing ``decision`` (before it where it keeps
    nothing), as ``decide`` measured it on the scored cases."""
    classes = decision.get("classes") or {}
    if not classes:
        return summary.get("mean_dice")
    return float(np.mean([c["dice_after"] if c["keep_largest"] else c["dice_before"] for c in classes.values()]))


def record_validated(result: EvaluateResult, prediction_dirs: Sequence[Path], model_infos: Sequence[Path],
                     tracking_uri: str | None) -> list[Path]:
    """For each model of ``model_infos`` (train's ``model.json``) whose predictions were scored: the
    settings they were made with (their folder's ``predict.json``), the largest-component decision and
    the Dice, into ``validated.json`` beside its checkpoint and into the registry (``medseg.validated``)."""
    from medseg.io import read_json
    from medseg.prediction import RECORD
    from medseg.validated import SETTINGS, Validated, publish

    decision = read_json(result.out_dir / POSTPROCESSING)
    made: dict[str, tuple[dict, str]] = {}  # model reference -> (the settings of its predictions, its weights)
    for folder in prediction_dirs:
        record_path = Path(folder) / RECORD
        if not record_path.exists():
            continue
        record = read_json(record_path)
        for model in record.get("models", []):
            made[model["model"]] = (record["config"], model["weights"])
    written: list[Path] = []
    for info_path in model_infos:
        info = read_json(info_path)
        uri = info.get("model_uri")
        if uri not in made:
            log.warning("%s: no prediction folder scored was made with its model %s: no validated settings "
                        "recorded for it", info_path, uri)
            continue
        config, weights = made[uri]
        settings = {k: config[k] for k in SETTINGS if k != "largest_component"}
        settings["largest_component"] = list(decision["largest_component"])
        record = Validated(weights=weights, settings=settings, mean_dice=validated_dice(result.summary, decision),
                           n_cases=result.n_cases, evaluation=str(Path(result.out_dir).resolve()))
        written.append(publish(record, Path(info_path).parent, uri, tracking_uri or info.get("tracking_uri")))
    return written
