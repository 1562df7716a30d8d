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

from medseg import caching, distributed, transfer
from medseg.config import PreprocessConfig, TrackingConfig, TrainConfig
from medseg.errors import DataError, ModelError, TrainingInterrupted
from medseg.io import atomic_path, write_json
from medseg.losses import DiceCELoss
from medseg.modelio import ModelSpec, build_from_spec, resolve_device
from medseg.networks import network_roi
from medseg.plans import Plan, load_plan, load_splits
from medseg.preprocessed import load_case, read_index
from medseg.transforms import Untracked, augment_batch, crop_steps, random_steps, training_augmentation
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
    from medseg.pyfunc import log_pyfunc

    if run_id is not None and (version := trk.registered_version(model_name, run_id)) is not None:
        log.info("run %s registered %s version %s already", run_id, model_name, version)
        return f"models:/{model_name}/{version}"
    with tempfile.TemporaryDirectory() as tmp:
        info = log_pyfunc(net, spec, Path(tmp), model_name)
    version = getattr(info, "registered_model_version", None)
    return f"models:/{model_name}/{version}" if version else info.model_uri


def training_key(spec: ModelSpec, config: TrainConfig, split: dict[str, list[str]]) -> str:
    """One key per training (all folds of one config): parent runs are found by it."""
    blob = json.dumps([spec.plan.model_dump(mode="json"), config.model_dump(mode="json"), sorted(split["train"] + split["val"])])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Fold:
    """What one fold trains on: the plan, the preprocessed cases and their split, the model's spec,
    and the folder its outputs go to."""

    number: int
    preprocessed_dir: Path
    plan: Plan
    pre_config: PreprocessConfig
    cached: dict[str, list[int]]  # case id -> preprocessed shape
    split: dict[str, list[str]]
    roi: tuple[int, int, int]
    spec: ModelSpec
    out_dir: Path

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def foreground_names(self) -> list[str]:
        return [self.plan.labels[k] for k in sorted(self.plan.labels) if k != 0]


@dataclass
class _Model:
    """The network and what trains it: ``forward`` runs it (across processes, compiled), while
    checkpoints save ``net``; ``frozen`` names the transferred weights held during ``freeze_epochs``."""

    net: nn.Module
    forward: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Any
    loss_fn: nn.Module
    memory_format: torch.memory_format
    use_amp: bool
    amp_dtype: torch.dtype
    frozen: frozenset[str] = frozenset()


@dataclass
class _Progress:
    """Where the fold's training stands; ``last.pt`` holds it and a resume restores it."""

    start_epoch: int = 0
    best_dice: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str | None = None


@dataclass(frozen=True)
class _Data:
    """The training samples and how batches are drawn from them; the validation cases when kept in memory."""

    dataset: Any
    transform: Any  # the loader's chain, reseeded every epoch
    device_augment: Untracked | None  # the random steps run on the training device, if they do
    sampler: Any
    batch_size: int
    cache_mode: str
    kept_val: list[dict[str, np.ndarray]] | None


@dataclass(frozen=True)
class _Tracker:
    """The fold's MLflow run as training uses it; ``wait`` retries a call while the server does not answer."""

    mlflow: Any
    wait: Any
    run_ctx: Any
    new_run: bool  # not resumed: the fold's parameters and config are logged
    params: dict[str, str]


def _start_processes(config: TrainConfig, device: str) -> tuple[distributed.Processes, torch.device]:
    """The training processes (several when torchrun started this one) and this process's device."""
    procs = distributed.from_environment()
    dev = distributed.start(procs, resolve_device(device))
    if config.processes != procs.world_size:
        log.warning("train.processes is %d, but %d training process(es) run: torchrun starts several "
                    "(the workflow does so when processes > 1)", config.processes, procs.world_size)
    return procs, dev


def _load_fold(preprocessed_dir: Path, plan_path: Path, splits_path: Path, out_dir: Path, fold: int,
               config: TrainConfig) -> _Fold:
    """The plan, the preprocessed cases and the fold's split, checked against each other, and the model's spec."""
    plan = load_plan(plan_path)
    pre_config, cached = read_index(Path(preprocessed_dir) / "index.json")
    split = load_splits(splits_path, fold)
    missing = [c for c in split["train"] + split["val"] if c not in cached]
    if missing:
        raise DataError(f"{splits_path}: fold {fold} names cases not in {preprocessed_dir}: {missing[:5]}")
    roi = network_roi(plan.patch_size, config.network, plan.unet_topology())
    spec = ModelSpec(plan=plan, preprocess=pre_config, network=config.network, roi_size=roi, fold=fold)
    return _Fold(fold, Path(preprocessed_dir), plan, pre_config, cached, split, roi, spec, out_dir)


def _build_model(fold: _Fold, config: TrainConfig, tracking: Tracking, dev: torch.device,
                 procs: distributed.Processes, *, transfer_weights: bool) -> _Model:
    """The seeded network (with ``train.init_from``'s weights when ``transfer_weights``) on the device,
    its optimizer, schedule, mixed precision and loss."""
    from monai.utils import set_determinism

    set_determinism(seed=config.seed)
    net = build_from_spec(fold.spec)
    frozen: frozenset[str] = frozenset()
    if config.init_from is not None and transfer_weights:
        source, source_network = transfer.load_source(config.init_from, tracking.uri)
        taken = transfer.take_weights(net, config.network, source, source_network, config.init_part,
                                      f"train.init_from={config.init_from}")
        frozen = frozenset(taken.taken)
    memory_format = _memory_format(config, fold.plan.dims)
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
    return _Model(net, forward, optimizer, scheduler, scaler, loss_fn, memory_format, use_amp, amp_dtype, frozen)


def _resume(fold: _Fold, state: dict[str, Any] | None, model: _Model, dev: torch.device) -> _Progress:
    """Restore the network, optimizer, schedule, loss scaling and random state of ``last.pt`` (``state``
    when it was read already) into ``model``; returns the progress it holds."""
    if not fold.last_path.exists():
        raise ModelError(f"--resume: expected a checkpoint at {fold.last_path}, found none")
    if state is None:
        state = torch.load(fold.last_path, map_location=dev, weights_only=False)
    if ModelSpec.model_validate(state["spec"]) != fold.spec:
        raise ModelError(f"--resume: {fold.last_path} was trained with another plan or network; start afresh")
    model.net.load_state_dict(state["model"])
    model.optimizer.load_state_dict(state["optimizer"])
    model.scheduler.load_state_dict(state["scheduler"])
    model.scaler.load_state_dict(state["scaler"])
    progress = _Progress(state["epoch"], state["best_dice"], state["best_epoch"], state["history"], state.get("run_id"))
    model.frozen = frozenset(state.get("frozen", ()))
    _set_rng_state(state["rng"])
    log.info("resuming fold %d at epoch %d (best Dice %.4f)", fold.number, progress.start_epoch, progress.best_dice)
    return progress


def _training_data(fold: _Fold, config: TrainConfig, dev: torch.device, procs: distributed.Processes) -> _Data:
    """The training dataset (cases in memory or read per sample, ``medseg.caching``), its augmentation
    (in the loader, or a crop there and the rest on the device), the batch and the sampler."""
    from monai.data import Dataset
    from monai.transforms import Compose
    from torch.utils.data.distributed import DistributedSampler

    plan, split = fold.plan, fold.split
    total = sum(caching.case_bytes(fold.cached[c], plan.channels) for c in split["train"])
    cache_mode, cache_why = caching.choose(config.cache, total, config.cache_max_gb)
    log.info("fold %d: training cases in %s: %s", fold.number, cache_mode, cache_why)
    train_cases = caching.training_items(fold.preprocessed_dir, split["train"], cache_mode)
    kept_val = [load_case(fold.preprocessed_dir, c) for c in split["val"]] if cache_mode == "memory" else None
    on_device = config.augment_device == "device" or (config.augment_device == "auto" and dev.type == "cuda")
    device_augment: Untracked | None = None
    if on_device:  # the loader crops; the rest runs on the training device
        augment = Untracked(Compose(crop_steps(fold.roi, config.augment)))
        device_augment = Untracked(Compose(random_steps(fold.roi, config.augment, dims=plan.dims,
                                                        mirror_axes=plan.mirror_axes)))
    else:
        augment = training_augmentation(fold.roi, config.augment, dims=plan.dims, mirror_axes=plan.mirror_axes)
    log.info("fold %d: augmentation %s", fold.number, f"on {dev}, after a crop in the loader" if on_device else "in the loader")
    # Read-then-augment as one flat chain: its random transforms get the same seeds as augment's alone would.
    transform = (augment if cache_mode == "memory"
                 else Untracked(Compose([caching.LoadPreprocessed(), *augment.transforms])))
    dataset = Dataset(train_cases, transform=transform)
    batch_size = distributed.share_of_batch(min(plan.batch_size, len(train_cases)), procs)
    sampler = (DistributedSampler(dataset, num_replicas=procs.world_size, rank=procs.rank, shuffle=True,
                                  seed=config.seed, drop_last=True) if procs.enabled else None)
    return _Data(dataset, transform, device_augment, sampler, batch_size, cache_mode, kept_val)


def _start_tracking(fold: _Fold, config: TrainConfig, tracking: Tracking, run_id: str | None) -> _Tracker:
    """The experiment, the training's parent run and the fold's run (reopened when ``run_id`` or an earlier
    try of this job left one), each looked up before it is made."""
    import mlflow

    from medseg import tracking as trk

    exp_name = tracking.config.experiment
    wait = functools.partial(trk.patient, uri=tracking.uri, wait_s=tracking.config.server_wait_s,
                             hint=f"the checkpoint {fold.last_path} is kept: run the same command again (the workflow's "
                             "retry does) and training resumes and logs the epochs the server missed")
    exp_id = wait(lambda: trk.experiment_id(tracking.uri, exp_name, tracking.artifact_root,
                                            fold.out_dir.parent / ".parent.lock"), what="creating the experiment")
    common_tags = {**tracking.tags}
    if commit := trk.git_commit():
        common_tags["git.commit"] = commit
    params = (
        trk.flatten({"train": config.model_dump(mode="json"), "preprocess": fold.pre_config.model_dump(mode="json")})
        | trk.flatten({k: v for k, v in fold.plan.model_dump(mode="json").items() if k != "fingerprint"}, "plan.")
        | {"roi_size": str(fold.roi)}
    )
    parent = wait(lambda: trk.parent_run(
        exp_id, training_key(fold.spec, config, fold.split), f"{exp_name}-train", fold.out_dir.parent / ".parent.lock",
        common_tags, params,
    ), what="finding or creating the parent run")
    new_run = run_id is None
    if run_id is None:  # an empty run of this fold left by an earlier try of this job, or a new one
        run_id = wait(lambda: trk.fold_run(exp_id, parent, fold.number), what="looking for the fold's run")
    if run_id is None:
        run_ctx = wait(lambda: mlflow.start_run(
            run_name=f"fold_{fold.number}", parent_run_id=parent, experiment_id=exp_id,
            tags={**common_tags, "fold": str(fold.number)},
        ), what="creating the fold's run")
    else:
        run_ctx = wait(lambda: mlflow.start_run(run_id=run_id), what="reopening the fold's run")
    return _Tracker(mlflow, wait, run_ctx, new_run, params)


def _open_run(tracker: _Tracker, active: Any, fold: _Fold, config: TrainConfig, tracking: Tracking, data: _Data,
              progress: _Progress, resumed: bool) -> None:
    """A new fold run gets its parameters, plan, config and data records; a resumed one the epochs it lacks."""
    from medseg import tracking as trk

    mlflow, wait = tracker.mlflow, tracker.wait
    if tracker.new_run:
        run_id = progress.run_id = active.info.run_id
        fold_params = tracker.params | {"fold": str(fold.number), "n_train": str(len(data.dataset)),
                                        "n_val": str(len(fold.split["val"])), "cache": data.cache_mode}
        wait(lambda: trk.log_params(run_id, fold_params), what="logging the fold's parameters")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "plan.json").write_text(fold.plan.model_dump_json(indent=2))
            (Path(tmp) / "train_config.json").write_text(config.model_dump_json(indent=2))
            wait(lambda: mlflow.log_artifacts(tmp, artifact_path="config"), what="logging the config")
        if tracking.artifacts:
            wait(lambda: _log_json_artifacts(mlflow, tracking.artifacts), what="logging the data's records")
    if resumed:
        wait(lambda: _backfill_metrics(mlflow, progress.run_id, progress.history),
             what="logging the epochs the run lacks")


def _epoch_loader(epoch: int, data: _Data, config: TrainConfig, procs: distributed.Processes) -> Any:
    """The epoch's DataLoader, after reseeding everything random from ``seed + epoch`` (and the rank)."""
    from monai.data import DataLoader
    from monai.utils import set_determinism

    seed = config.seed + epoch + 100_003 * procs.rank  # each process augments its own samples
    set_determinism(seed=seed)
    data.transform.set_random_state(seed=seed)
    if data.device_augment is not None:
        data.device_augment.set_random_state(seed=seed + 7_919)
    if data.sampler is not None:
        data.sampler.set_epoch(epoch)
    return DataLoader(
        data.dataset, batch_size=data.batch_size, shuffle=data.sampler is None, sampler=data.sampler,
        num_workers=config.num_workers, drop_last=True, persistent_workers=False,
    )


def _train_epoch(loader: Any, epoch: int, model: _Model, data: _Data, config: TrainConfig,
                 dev: torch.device) -> dict[str, float]:
    """One epoch's optimizer steps (``iterations_per_epoch``, else one pass of the loader); returns its
    record: the mean loss, the learning rate, the steps per second and the share spent waiting for data."""
    net, optimizer, scaler = model.net, model.optimizer, model.scaler
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
            if data.device_augment is not None:
                image, label = augment_batch(data.device_augment, image, label)
            image = image.contiguous(memory_format=model.memory_format)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=dev.type, dtype=model.amp_dtype, enabled=model.use_amp):
                loss = model.loss_fn(model.forward(image), label)
            scaler.scale(loss).backward()
            if epoch < config.freeze_epochs:
                transfer.drop_gradients(net, model.frozen)
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.detach())  # no host-device sync per step
            if len(losses) >= target_iters:
                break
    model.scheduler.step()
    train_seconds = time.monotonic() - t0
    return {
        "epoch": epoch + 1, "train_loss": float(torch.stack(losses).float().mean()), "lr": lr,
        "iterations_per_second": len(losses) / train_seconds,
        "data_wait_fraction": sum(waits) / train_seconds,  # of the training time, waiting for batches
    }


def _validate(record: dict[str, float], epoch: int, net: nn.Module, fold: _Fold, data: _Data,
              progress: _Progress, dev: torch.device) -> None:
    """Add the validation Dice (mean and per class) to the epoch's record; a new best is saved as ``best.pt``."""
    cases = caching.validation_cases(fold.preprocessed_dir, fold.split["val"], data.kept_val)
    scores = validate_dice(net, cases, fold.roi, fold.plan.n_classes, dev)
    record["val_dice"] = float(scores.mean())
    record.update({f"val_dice_{name}": float(s) for name, s in zip(fold.foreground_names, scores)})
    if record["val_dice"] > progress.best_dice:
        progress.best_dice, progress.best_epoch = record["val_dice"], epoch + 1
        _save(fold.best_path, {"model": net.state_dict(), "spec": fold.spec.model_dump(mode="json"), "epoch": epoch + 1,
                              "val_dice": progress.best_dice})
    log.info("fold %d epoch %d: loss %.4f, val Dice %.4f (best %.4f at %d)", fold.number, epoch + 1,
             record["train_loss"], record["val_dice"], progress.best_dice, progress.best_epoch)


def _save_last(fold: _Fold, epoch: int, model: _Model, progress: _Progress, config: TrainConfig) -> None:
    """``last.pt``: everything a resume needs to go on after ``epoch`` as if never stopped."""
    _save(fold.last_path, {
        "model": model.net.state_dict(), "optimizer": model.optimizer.state_dict(),
        "scheduler": model.scheduler.state_dict(), "scaler": model.scaler.state_dict(), "epoch": epoch + 1,
        "best_dice": progress.best_dice, "best_epoch": progress.best_epoch, "history": progress.history,
        "rng": _rng_state(), "spec": fold.spec.model_dump(mode="json"), "run_id": progress.run_id,
        "frozen": sorted(model.frozen), "config": resume_key(config),
    })


def _epoch_loop(fold: _Fold, model: _Model, data: _Data, progress: _Progress, tracker: _Tracker | None,
                config: TrainConfig, procs: distributed.Processes, dev: torch.device, *, started: float,
                stop: StopRequest | None, stop_after_epoch: int | None) -> tuple[int, bool]:
    """Train, validate, checkpoint and log each epoch from ``progress.start_epoch``, until the schedule
    ends, ``max_minutes`` would pass or a stop is asked for; returns the epochs run and whether
    ``stop_after_epoch`` ended it. A ``stop`` request raises ``TrainingInterrupted``."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=config.epochs, initial=progress.start_epoch, desc=f"fold {fold.number}", unit="epoch", file=sys.stderr,
        mininterval=0 if sys.stderr.isatty() else 30, disable=None if procs.main else True,
    )
    history = progress.history
    epoch = progress.start_epoch
    for epoch in range(progress.start_epoch, config.epochs):
        loader = _epoch_loader(epoch, data, config, procs)
        t0 = time.monotonic()
        record = _train_epoch(loader, epoch, model, data, config, dev)
        # Stop now (after validating) if one more epoch as long as the longest so far would end past the budget.
        stopping = out_of_time(time.monotonic() - started, [h["epoch_seconds"] for h in history],
                               config.max_minutes * 60 if config.max_minutes else None)
        stopping = distributed.from_main(stopping, procs)  # every process stops at the same epoch
        last_epoch = epoch + 1 == config.epochs or stopping
        if procs.main and ((epoch + 1) % config.val_every == 0 or last_epoch):
            _validate(record, epoch, model.net, fold, data, progress, dev)
        record["epoch_seconds"] = time.monotonic() - t0  # training and validation
        history.append(record)
        if procs.main:
            _save_last(fold, epoch, model, progress, config)
        # Logged after the checkpoint: a kill in between leaves the epoch to the backfill of a resume, not
        # logged twice by a redone epoch.
        if tracker is not None:
            metrics, step = {k: v for k, v in record.items() if k != "epoch"}, epoch + 1
            tracker.wait(lambda: tracker.mlflow.log_metrics(metrics, step=step), what=f"logging epoch {step}")
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", dice=f"{progress.best_dice:.3f}")
        bar.update(1)
        if stop is not None and epoch + 1 < config.epochs:
            longest = max(h["epoch_seconds"] for h in history)
            if distributed.from_main(stop.due(longest), procs):
                bar.close()
                distributed.stop(procs)
                raise TrainingInterrupted(
                    f"fold {fold.number}: stopped after epoch {epoch + 1} of {config.epochs}: {stop.why()}; "
                    f"{fold.last_path} holds it: run again (the workflow's retry does) and training resumes")
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < config.epochs:
            bar.close()
            log.info("fold %d: stopped after epoch %d as asked; continue with resume", fold.number, epoch + 1)
            distributed.stop(procs)
            return epoch + 1, True
        if stopping and epoch + 1 < config.epochs:
            log.warning("fold %d: stopping after epoch %d of %d: another epoch could end past max_minutes=%s; "
                        "continue with resume", fold.number, epoch + 1, config.epochs, config.max_minutes)
            break
    bar.close()
    distributed.stop(procs)
    return epoch + 1, False


def _write_outputs(fold: _Fold, progress: _Progress, tracker: _Tracker | None, tracking: Tracking) -> str:
    """``history.json``; with tracking, the best score, the history and the best model logged and registered;
    then ``model.json``. Returns the trained model's URI (the registry's, else ``best.pt``)."""
    write_json(fold.out_dir / "history.json", progress.history)
    model_uri = str(fold.best_path.resolve())
    if tracker is not None:
        mlflow, wait = tracker.mlflow, tracker.wait
        best_state = torch.load(fold.best_path, map_location="cpu", weights_only=False)
        final = build_from_spec(fold.spec)
        final.load_state_dict(best_state["model"])
        # only what the run lacks: a try killed after this line (while registering) logged it already
        best = {"best_val_dice": progress.best_dice, "best_epoch": float(progress.best_epoch)}
        logged = wait(lambda: mlflow.tracking.MlflowClient().get_run(progress.run_id).data.metrics,
                      what="reading the run's metrics")
        missing = {k: v for k, v in best.items() if logged.get(k) != v}
        if missing:
            wait(lambda: mlflow.log_metrics(missing), what="logging the best score")
        wait(lambda: mlflow.log_artifact(str(fold.out_dir / "history.json")), what="logging history.json")
        model_uri = wait(lambda: _register(final, fold.spec, tracking.config.model_name, progress.run_id),
                         what="logging and registering the model")
    write_json(fold.out_dir / "model.json", {
        "model_uri": model_uri, "tracking_uri": tracking.uri, "run_id": progress.run_id, "fold": fold.number,
        "best_val_dice": progress.best_dice, "best_epoch": progress.best_epoch,
        "checkpoint": str(fold.best_path.resolve()),
    })
    return model_uri


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
    config = config or TrainConfig()
    tracking = tracking or Tracking(uri=None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    procs, dev = _start_processes(config, device)
    inputs = _load_fold(preprocessed_dir, plan_path, splits_path, out_dir, fold, config)
    state: dict[str, Any] | None = None  # the checkpoint to resume from
    if resume == "auto":
        state = _matching_checkpoint(inputs.last_path, inputs.spec, config, dev)
        resume = state is not None
    model = _build_model(inputs, config, tracking, dev, procs, transfer_weights=not resume)
    progress = _resume(inputs, state, model, dev) if resume else _Progress()
    data = _training_data(inputs, config, dev, procs)
    tracked = tracking.uri is not None and procs.main  # one process talks to MLflow
    tracker = _start_tracking(inputs, config, tracking, progress.run_id) if tracked else None

    started = time.monotonic()
    with _run_scope(tracker.run_ctx if tracker else None, tracker.wait if tracker else None) as active:
        if tracker is not None:
            _open_run(tracker, active, inputs, config, tracking, data, progress, resumed=bool(resume))
        epochs_run, paused = _epoch_loop(inputs, model, data, progress, tracker, config, procs, dev, started=started,
                                         stop=stop, stop_after_epoch=stop_after_epoch)
        if paused:
            return TrainResult(out_dir, progress.best_dice, progress.best_epoch, epochs_run,
                               str(inputs.last_path.resolve()))
        if not procs.main:  # the main process writes the outputs
            return TrainResult(out_dir, progress.best_dice, progress.best_epoch, epochs_run, "")
        model_uri = _write_outputs(inputs, progress, tracker, tracking)
    if not math.isfinite(progress.best_dice) or progress.best_epoch < 0:
        raise ModelError(f"fold {fold}: training finished without a validation score")
    log.info("fold %d done: best val Dice %.4f at epoch %d; model %s", fold, progress.best_dice, progress.best_epoch,
             model_uri)
    return TrainResult(out_dir, progress.best_dice, progress.best_epoch, epochs_run, model_uri)
