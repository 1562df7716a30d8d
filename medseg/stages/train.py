"""train: one fold of the cross-validation, with MONAI augmentation, Dice+CE loss and checkpoints.

Outputs in ``out_dir``: ``last.pt`` (every epoch) and ``best.pt`` (best validation Dice),
both written atomically; ``history.json`` (per-epoch metrics); ``model.json`` (where the
trained model is: a registry URI when tracking is on, else ``best.pt``).

``resume=True`` continues from ``last.pt`` with the optimizer, scheduler, scaler, epoch,
best score and random state. Each epoch reseeds from ``seed + epoch``, so an interrupted and
resumed training gives the same weights as an uninterrupted one (on the same device).
``resume="auto"`` (the workflow's rule) resumes when ``last.pt`` exists and was written by the
same plan, network and schedule, and starts afresh otherwise.

A ``stop`` request (``medseg.walltime``: a SLURM job's time limit less a margin, or SIGUSR1) ends
the run after the epoch that makes it due, with ``last.pt`` written and logged, and raises
``TrainingInterrupted`` (the command exits 75, ``model.json`` is not written); the rerun resumes in
the same MLflow run. Metrics are logged after the checkpoint, and a resume logs the epochs that
the run lacks, so no step is logged twice; a fold run, a parent run and a model version are looked
up before they are made, so a retried job makes none twice. An MLflow server that does not answer
is retried for ``tracking.server_wait_s``, then the run fails with a one-line ``TrackingError``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg import caching, transfer
from medseg.config import TrackingConfig, TrainConfig
from medseg.errors import DataError, ModelError, TrainingInterrupted
from medseg.io import atomic_path, write_json
from medseg.modelio import ModelSpec, build_from_spec, log_model, resolve_device
from medseg.networks import network_roi
from medseg.stages.plan import load_plan, load_splits
from medseg.stages.preprocess import load_case, read_index
from medseg.walltime import StopRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tracking:
    """Where and how to track a training in MLflow (``uri=None``: no tracking)."""

    uri: str | None
    config: TrackingConfig = TrackingConfig()
    artifact_root: Path | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # JSON artifacts of the fold's run: path in the run (e.g. data/reviewed_cases.json) -> content
    artifacts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    best_dice: float
    best_epoch: int
    epochs_run: int
    model_uri: str


class SupervisedLoss(nn.Module):
    """A segmentation loss of the network's output or, with deep supervision (an output of shape
    (B, heads, C, ...)), of every head: weighted by MONAI's ``DeepSupervisionLoss`` "exp" weights
    (1, 1/2, 1/4, ..., at least 1/16) normalized to sum 1, as nnU-Net weighs its decoder stages."""

    def __init__(self, loss: nn.Module) -> None:
        from monai.losses import DeepSupervisionLoss

        super().__init__()
        self.loss = loss
        self.deep = DeepSupervisionLoss(loss, weight_mode="exp")

    def forward(self, output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if output.dim() != label.dim() + 1:
            return self.loss(output, label)
        heads = torch.unbind(output, dim=1)
        weights = self.deep.get_weights(len(heads))
        total = sum(weights)
        return sum(w / total * self.loss(h, label) for w, h in zip(weights, heads, strict=True))  # type: ignore[return-value]


def _backfill_metrics(mlflow: Any, run_id: str | None, history: list[dict[str, float]]) -> None:
    """Log the epochs of ``history`` that the run lacks (a kill between checkpoint and logging)."""
    logged = {m.step for m in mlflow.tracking.MlflowClient().get_metric_history(run_id, "train_loss")}
    for record in history:
        if int(record["epoch"]) not in logged:
            mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=int(record["epoch"]))
            log.info("logged epoch %d to MLflow run %s, which lacked it", int(record["epoch"]), run_id)


def _log_json_artifacts(mlflow: Any, artifacts: dict[str, Any]) -> None:
    """Write each content as JSON at its path in the active run's artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in artifacts.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content, indent=2) + "\n")
        mlflow.log_artifacts(tmp)


def lr_factor(epoch: int, config: TrainConfig) -> float:
    """The learning rate of ``epoch`` (0-based) as a fraction of ``learning_rate``: a linear
    warm-up over ``warmup_epochs`` (epoch k of it at (k + 1) / warmup_epochs), then the schedule
    over the remaining epochs (poly: (1 - t)^0.9, cosine: (1 + cos(pi t)) / 2, t from 0)."""
    if epoch < config.warmup_epochs:
        return (epoch + 1) / config.warmup_epochs
    span = max(config.epochs - config.warmup_epochs, 1)
    t = min((epoch - config.warmup_epochs) / span, 1.0)
    if config.schedule == "poly":
        return (1 - t) ** 0.9
    if config.schedule == "cosine":
        return (1 + math.cos(math.pi * t)) / 2
    return 1.0


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, config=config))


def out_of_time(elapsed_s: float, epoch_seconds: list[float], budget_s: float | None) -> bool:
    """Whether another epoch could end past the time budget: one more of the longest epoch so far
    (training and validation) would pass it."""
    if budget_s is None:
        return False
    return elapsed_s + max(epoch_seconds, default=0.0) > budget_s


def _memory_format(config: TrainConfig, dims: int) -> torch.memory_format:
    """The memory order of the network's weights and batches: channels-last (``train.channels_last``)
    or torch's default."""
    if not config.channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if dims == 3 else torch.channels_last


def _optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            net.parameters(), lr=config.learning_rate, momentum=0.99, nesterov=True, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _timed(batches: Iterable[Any], waits: list[float]) -> Iterator[Any]:
    """The items of ``batches``, each wait for the next one appended to ``waits`` (seconds)."""
    items = iter(batches)
    while True:
        start = time.monotonic()
        try:
            item = next(items)
        except StopIteration:
            return
        waits.append(time.monotonic() - start)
        yield item


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


def _save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def validate_dice(
    net: nn.Module, cases: Iterable[dict[str, np.ndarray]], roi: tuple[int, ...], n_classes: int, device: torch.device
) -> np.ndarray:
    """Mean Dice per foreground class over ``cases`` (preprocessed space, sliding window); a class
    absent from a case's label does not count for that case (MONAI's ``ignore_empty``).

    MONAI's functional ``compute_dice``, not ``DiceMetric``: the metric object gathers its buffers
    across processes when a process group exists, and only the main process validates."""
    from monai.inferers import sliding_window_inference
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    rows = []
    net.eval()
    with torch.no_grad():
        for case in cases:
            image = torch.as_tensor(case["image"])[None].to(device)
            logits = sliding_window_inference(image, roi, 4, net, overlap=0.25, mode="gaussian")
            pred = logits.argmax(1, keepdim=True).cpu()
            label = torch.as_tensor(case["label"])[None].long()
            dice = compute_dice(one_hot(pred, n_classes), one_hot(label, n_classes), include_background=False,
                                ignore_empty=True)
            rows.append(np.asarray(dice.detach().cpu())[0])
    scores = np.array(rows, dtype=np.float64)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every case: NaN, reported as 0
        mean = np.nanmean(scores, axis=0)
    return np.nan_to_num(mean, nan=0.0)


# Settings that do not change what a training computes: a checkpoint written under other values resumes.
RESUME_IGNORES = frozenset({"folds", "max_minutes", "stop_before_limit_s", "num_workers", "cache", "cache_max_gb"})


def resume_key(config: TrainConfig) -> dict[str, Any]:
    """The part of the train config that a checkpoint must share to be resumed by ``resume="auto"``."""
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in RESUME_IGNORES}


def _matching_checkpoint(path: Path, spec: ModelSpec, config: TrainConfig, dev: torch.device
                         ) -> dict[str, Any] | None:
    """The state in ``path`` if it is a last.pt of this plan, network and schedule, else None
    (``resume="auto"``: training starts afresh)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=dev, weights_only=False)
    except Exception as err:  # noqa: BLE001 - a damaged checkpoint is started afresh
        log.warning("%s cannot be read (%s): training starts afresh", path, err)
        return None
    if ModelSpec.model_validate(state["spec"]) != spec or state.get("config") != resume_key(config):
        log.warning("%s was written with another plan, network or train config: training starts afresh", path)
        return None
    return state


@contextlib.contextmanager
def _run_scope(active: Any, wait: Any) -> Iterator[Any]:
    """The active MLflow run (or None) as a scope: ended FINISHED, KILLED when training stopped to be resumed,
    or FAILED on another error, without letting a server that is gone replace the error that ended the run."""
    if active is None:
        yield None
        return
    import mlflow

    try:
        yield active
    except BaseException as err:
        with contextlib.suppress(Exception):
            mlflow.end_run("KILLED" if isinstance(err, TrainingInterrupted) else "FAILED")
        raise
    wait(lambda: mlflow.end_run("FINISHED"), what="ending the run")


def _register(net: nn.Module, spec: ModelSpec, model_name: str, run_id: str | None) -> str:
    """Log and register the model of the active run, or find the version an earlier try of this job
    registered (a retry registers no second version); returns its ``models:/`` URI."""
    from medseg import tracking as trk

    if run_id is not None and (version := trk.registered_version(model_name, run_id)) is not None:
        log.info("run %s registered %s version %s already", run_id, model_name, version)
        return f"models:/{model_name}/{version}"
    with tempfile.TemporaryDirectory() as tmp:
        info = log_model(net, spec, Path(tmp), model_name)
    version = getattr(info, "registered_model_version", None)
    return f"models:/{model_name}/{version}" if version else info.model_uri


def training_key(spec: ModelSpec, config: TrainConfig, split: dict[str, list[str]]) -> str:
    """One key per training (all folds of one config): parent runs are found by it."""
    blob = json.dumps([spec.plan.model_dump(mode="json"), config.model_dump(mode="json"), sorted(split["train"] + split["val"])])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train(
    preprocessed_dir: Path,
    plan_path: Path,
    splits_path: Path,
    out_dir: Path,
    config: TrainConfig | None = None,
    *,
    fold: int = 0,
    device: str = "auto",
    resume: bool | str = False,
    stop_after_epoch: int | None = None,
    tracking: Tracking | None = None,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Train one fold; see the module doc for outputs.

    ``stop_after_epoch`` ends this run early (after that epoch, with checkpoints written) while
    the schedule still spans ``config.epochs``: a job with a wall-time limit trains a part, and
    a later ``resume=True`` run continues. No model is logged or registered until the end.
    """
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose
    from monai.utils import set_determinism
    from torch.utils.data.distributed import DistributedSampler
    from tqdm.auto import tqdm

    from medseg import distributed
    from medseg.losses import DiceCELoss
    from medseg.transforms import (
        Untracked,
        augment_batch,
        crop_steps,
        random_steps,
        training_augmentation,
    )

    config = config or TrainConfig()
    tracking = tracking or Tracking(uri=None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = distributed.from_environment()  # several processes when torchrun started this one
    dev = distributed.start(procs, resolve_device(device))
    if config.processes != procs.world_size:
        log.warning("train.processes is %d, but %d training process(es) run: torchrun starts several "
                    "(the workflow does so when processes > 1)", config.processes, procs.world_size)
    plan = load_plan(plan_path)
    pre_config, cached = read_index(Path(preprocessed_dir) / "index.json")
    split = load_splits(splits_path, fold)
    missing = [c for c in split["train"] + split["val"] if c not in cached]
    if missing:
        raise DataError(f"{splits_path}: fold {fold} names cases not in {preprocessed_dir}: {missing[:5]}")
    roi = network_roi(plan.patch_size, config.network, plan.unet_topology())
    spec = ModelSpec(plan=plan, preprocess=pre_config, network=config.network, roi_size=roi, fold=fold)
    n_classes = plan.n_classes
    foreground_names = [plan.labels[k] for k in sorted(plan.labels) if k != 0]
    state: dict[str, Any] | None = None  # the checkpoint to resume from
    if resume == "auto":
        state = _matching_checkpoint(out_dir / "last.pt", spec, config, dev)
        resume = state is not None

    set_determinism(seed=config.seed)
    net = build_from_spec(spec)
    frozen: frozenset[str] = frozenset()
    if config.init_from is not None and not resume:
        source, source_network = transfer.load_source(config.init_from, tracking.uri)
        taken = transfer.take_weights(net, config.network, source, source_network, config.init_part,
                                      f"train.init_from={config.init_from}")
        frozen = frozenset(taken.taken)
    memory_format = _memory_format(config, plan.dims)
    net = net.to(dev, memory_format=memory_format)
    optimizer = _optimizer(net, config)
    scheduler = _scheduler(optimizer, config)
    use_amp = config.amp and dev.type == "cuda"
    amp_dtype = getattr(torch, config.amp_dtype)
    scaling = use_amp and amp_dtype == torch.float16  # bfloat16 has float32's range: no loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=scaling) if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler(enabled=scaling)
    forward = distributed.wrap(net, procs, dev)  # DDP across processes, else net itself
    forward = torch.compile(forward) if config.compile else forward  # shares net's weights; checkpoints save net's
    loss_fn = SupervisedLoss(DiceCELoss())  # MONAI's DiceCELoss(batch=True), its Dice over all processes' batch

    start_epoch, best_dice, best_epoch = 0, -1.0, -1
    history: list[dict[str, float]] = []
    run_id: str | None = None
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if resume:
        if not last_path.exists():
            raise ModelError(f"--resume: expected a checkpoint at {last_path}, found none")
        if state is None:
            state = torch.load(last_path, map_location=dev, weights_only=False)
        if ModelSpec.model_validate(state["spec"]) != spec:
            raise ModelError(f"--resume: {last_path} was trained with another plan or network; start afresh")
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best_dice, best_epoch = state["epoch"], state["best_dice"], state["best_epoch"]
        history, run_id = state["history"], state.get("run_id")
        frozen = frozenset(state.get("frozen", ()))
        _set_rng_state(state["rng"])
        log.info("resuming fold %d at epoch %d (best Dice %.4f)", fold, start_epoch, best_dice)

    total = sum(caching.case_bytes(cached[c], plan.channels) for c in split["train"])
    cache_mode, cache_why = caching.choose(config.cache, total, config.cache_max_gb)
    log.info("fold %d: training cases in %s: %s", fold, cache_mode, cache_why)
    train_cases = caching.training_items(preprocessed_dir, split["train"], cache_mode)
    kept_val = [load_case(preprocessed_dir, c) for c in split["val"]] if cache_mode == "memory" else None
    on_device = config.augment_device == "device" or (config.augment_device == "auto" and dev.type == "cuda")
    device_augment: Untracked | None = None
    if on_device:  # the loader crops; the rest runs on the training device
        augment = Untracked(Compose(crop_steps(roi, config.augment)))
        device_augment = Untracked(Compose(random_steps(roi, config.augment, dims=plan.dims,
                                                        mirror_axes=plan.mirror_axes)))
    else:
        augment = training_augmentation(roi, config.augment, dims=plan.dims, mirror_axes=plan.mirror_axes)
    log.info("fold %d: augmentation %s", fold, f"on {dev}, after a crop in the loader" if on_device else "in the loader")
    # Read-then-augment as one flat chain: its random transforms get the same seeds as augment's alone would.
    transform = (augment if cache_mode == "memory"
                 else Untracked(Compose([caching.LoadPreprocessed(), *augment.transforms])))
    dataset = Dataset(train_cases, transform=transform)
    batch_size = distributed.share_of_batch(min(plan.batch_size, len(train_cases)), procs)
    sampler = (DistributedSampler(dataset, num_replicas=procs.world_size, rank=procs.rank, shuffle=True,
                                  seed=config.seed, drop_last=True) if procs.enabled else None)

    mlflow = None
    run_ctx: Any = None
    new_run = False
    if tracking.uri is not None and procs.main:  # one process talks to MLflow
        import mlflow as _mlflow

        from medseg import tracking as trk

        mlflow = _mlflow
        exp_name = tracking.config.experiment
        wait = functools.partial(trk.patient, uri=tracking.uri, wait_s=tracking.config.server_wait_s,
                                 hint=f"the checkpoint {last_path} is kept: run the same command again (the workflow's "
                                 "retry does) and training resumes and logs the epochs the server missed")
        exp_id = wait(lambda: trk.experiment_id(tracking.uri, exp_name, tracking.artifact_root,
                                                out_dir.parent / ".parent.lock"), what="creating the experiment")
        common_tags = {**tracking.tags}
        if commit := trk.git_commit():
            common_tags["git.commit"] = commit
        params = (
            trk.flatten({"train": config.model_dump(mode="json"), "preprocess": pre_config.model_dump(mode="json")})
            | trk.flatten({k: v for k, v in plan.model_dump(mode="json").items() if k != "fingerprint"}, "plan.")
            | {"roi_size": str(roi)}
        )
        parent = wait(lambda: trk.parent_run(
            exp_id, training_key(spec, config, split), f"{exp_name}-train", out_dir.parent / ".parent.lock",
            common_tags, params,
        ), what="finding or creating the parent run")
        new_run = run_id is None  # not resumed: log the fold's parameters and config
        if run_id is None:  # an empty run of this fold left by an earlier try of this job, or a new one
            run_id = wait(lambda: trk.fold_run(exp_id, parent, fold), what="looking for the fold's run")
        if run_id is None:
            run_ctx = wait(lambda: mlflow.start_run(
                run_name=f"fold_{fold}", parent_run_id=parent, experiment_id=exp_id,
                tags={**common_tags, "fold": str(fold)},
            ), what="creating the fold's run")
        else:
            run_ctx = wait(lambda: mlflow.start_run(run_id=run_id), what="reopening the fold's run")

    started = time.monotonic()
    with _run_scope(run_ctx, wait if mlflow is not None else None) as run:
        if mlflow is not None and new_run:
            run_id = run.info.run_id
            fold_params = params | {"fold": str(fold), "n_train": str(len(train_cases)), "n_val": str(len(split["val"])),
                                    "cache": cache_mode}
            wait(lambda: trk.log_params(run_id, fold_params), what="logging the fold's parameters")
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "plan.json").write_text(plan.model_dump_json(indent=2))
                (Path(tmp) / "train_config.json").write_text(config.model_dump_json(indent=2))
                wait(lambda: mlflow.log_artifacts(tmp, artifact_path="config"), what="logging the config")
            if tracking.artifacts:
                wait(lambda: _log_json_artifacts(mlflow, tracking.artifacts), what="logging the data's records")
        if mlflow is not None and resume:
            wait(lambda: _backfill_metrics(mlflow, run_id, history), what="logging the epochs the run lacks")
        progress = tqdm(
            total=config.epochs, initial=start_epoch, desc=f"fold {fold}", unit="epoch", file=sys.stderr,
            mininterval=0 if sys.stderr.isatty() else 30, disable=None if procs.main else True,
        )
        epoch = start_epoch
        for epoch in range(start_epoch, config.epochs):
            seed = config.seed + epoch + 100_003 * procs.rank  # each process augments its own samples
            set_determinism(seed=seed)
            transform.set_random_state(seed=seed)
            if device_augment is not None:
                device_augment.set_random_state(seed=seed + 7_919)
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader = DataLoader(
                dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                num_workers=config.num_workers, drop_last=True, persistent_workers=False,
            )
            net.train()
            losses = []
            t0 = time.monotonic()
            lr = optimizer.param_groups[0]["lr"]
            target_iters = config.iterations_per_epoch or len(loader)
            waits: list[float] = []  # seconds spent waiting for each batch: the loader's stalls
            while len(losses) < target_iters:
                for batch in _timed(loader, waits):
                    # Plain tensors: MONAI's MetaTensor adds work to every operation, and torch.compile refuses it.
                    image, label = _plain(batch["image"]).to(dev), _plain(batch["label"]).to(dev)
                    if device_augment is not None:
                        image, label = augment_batch(device_augment, image, label)
                    image = image.contiguous(memory_format=memory_format)
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device_type=dev.type, dtype=amp_dtype, enabled=use_amp):
                        loss = loss_fn(forward(image), label)
                    scaler.scale(loss).backward()
                    if epoch < config.freeze_epochs:
                        transfer.drop_gradients(net, frozen)
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(net.parameters(), 12.0)
                    scaler.step(optimizer)
                    scaler.update()
                    losses.append(loss.detach())  # no host-device sync per step
                    if len(losses) >= target_iters:
                        break
            scheduler.step()
            train_seconds = time.monotonic() - t0
            record: dict[str, float] = {
                "epoch": epoch + 1, "train_loss": float(torch.stack(losses).float().mean()), "lr": lr,
                "iterations_per_second": len(losses) / train_seconds,
                "data_wait_fraction": sum(waits) / train_seconds,  # of the training time, waiting for batches
            }
            # Stop now (after validating) if one more epoch as long as the longest so far would end past the budget.
            stopping = out_of_time(time.monotonic() - started, [h["epoch_seconds"] for h in history],
                                   config.max_minutes * 60 if config.max_minutes else None)
            stopping = distributed.from_main(stopping, procs)  # every process stops at the same epoch
            last_epoch = epoch + 1 == config.epochs or stopping
            if procs.main and ((epoch + 1) % config.val_every == 0 or last_epoch):
                scores = validate_dice(net, caching.validation_cases(preprocessed_dir, split["val"], kept_val), roi,
                                       n_classes, dev)
                record["val_dice"] = float(scores.mean())
                record.update({f"val_dice_{name}": float(s) for name, s in zip(foreground_names, scores)})
                if record["val_dice"] > best_dice:
                    best_dice, best_epoch = record["val_dice"], epoch + 1
                    _save(best_path, {"model": net.state_dict(), "spec": spec.model_dump(mode="json"), "epoch": epoch + 1, "val_dice": best_dice})
                log.info("fold %d epoch %d: loss %.4f, val Dice %.4f (best %.4f at %d)", fold, epoch + 1, record["train_loss"], record["val_dice"], best_dice, best_epoch)
            record["epoch_seconds"] = time.monotonic() - t0  # training and validation
            history.append(record)
            if procs.main:
                _save(last_path, {
                    "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                    "best_dice": best_dice, "best_epoch": best_epoch, "history": history, "rng": _rng_state(),
                    "spec": spec.model_dump(mode="json"), "run_id": run_id, "frozen": sorted(frozen),
                    "config": resume_key(config),
                })
            # Logged after the checkpoint: a kill in between leaves the epoch to the backfill of a resume, not
            # logged twice by a redone epoch.
            if mlflow is not None:
                metrics, step = {k: v for k, v in record.items() if k != "epoch"}, epoch + 1
                wait(lambda: mlflow.log_metrics(metrics, step=step), what=f"logging epoch {step}")
            progress.set_postfix(loss=f"{record['train_loss']:.3f}", dice=f"{best_dice:.3f}")
            progress.update(1)
            if stop is not None and epoch + 1 < config.epochs:
                longest = max(h["epoch_seconds"] for h in history)
                if distributed.from_main(stop.due(longest), procs):
                    progress.close()
                    distributed.stop(procs)
                    raise TrainingInterrupted(
                        f"fold {fold}: stopped after epoch {epoch + 1} of {config.epochs}: {stop.why()}; "
                        f"{last_path} holds it: run again (the workflow's retry does) and training resumes")
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < config.epochs:
                progress.close()
                log.info("fold %d: stopped after epoch %d as asked; continue with resume", fold, epoch + 1)
                distributed.stop(procs)
                return TrainResult(out_dir, best_dice, best_epoch, epoch + 1, str(last_path.resolve()))
            if stopping and epoch + 1 < config.epochs:
                log.warning("fold %d: stopping after epoch %d of %d: another epoch could end past max_minutes=%s; "
                            "continue with resume", fold, epoch + 1, config.epochs, config.max_minutes)
                break
        progress.close()
        distributed.stop(procs)
        if not procs.main:  # the main process writes the outputs
            return TrainResult(out_dir, best_dice, best_epoch, epoch + 1, "")
        write_json(out_dir / "history.json", history)

        model_uri = str(best_path.resolve())
        if mlflow is not None:
            best_state = torch.load(best_path, map_location="cpu", weights_only=False)
            final = build_from_spec(spec)
            final.load_state_dict(best_state["model"])
            wait(lambda: mlflow.log_metrics({"best_val_dice": best_dice, "best_epoch": best_epoch}),
                 what="logging the best score")
            wait(lambda: mlflow.log_artifact(str(out_dir / "history.json")), what="logging history.json")
            model_uri = wait(lambda: _register(final, spec, tracking.config.model_name, run_id),
                             what="logging and registering the model")
        write_json(out_dir / "model.json", {
            "model_uri": model_uri, "tracking_uri": tracking.uri, "run_id": run_id, "fold": fold,
            "best_val_dice": best_dice, "best_epoch": best_epoch, "checkpoint": str(best_path.resolve()),
        })
    if not math.isfinite(best_dice) or best_epoch < 0:
        raise ModelError(f"fold {fold}: training finished without a validation score")
    log.info("fold %d done: best val Dice %.4f at epoch %d; model %s", fold, best_dice, best_epoch, model_uri)
    return TrainResult(out_dir, best_dice, best_epoch, epoch + 1, model_uri)
