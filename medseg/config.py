"""Typed configuration: the single source of truth for every setting.

Each stage takes its own section (``IngestConfig``, ``PlanConfig``, ...). The whole
workflow config (``WorkflowConfig``) adds the dataset and results paths that only the
Snakemake workflow reads. Unknown keys are refused everywhere; ``configs/schema.json``
is generated from these models (``medseg schema``) and a test checks it is current.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medseg.errors import ConfigError

Triple = tuple[float, float, float]


class StrictModel(BaseModel):
    """A model that refuses unknown keys and cannot be changed after it is built."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestConfig(StrictModel):
    """How raw cases are read and checked."""

    labels: dict[int, str] | None = Field(
        default=None,
        description="Label value -> name. Default: the dataset.json 'labels'; required for case sheets and DICOM.",
    )
    modality: str | None = Field(
        default=None, description="'CT', 'MR', ... Default: the dataset.json modality of channel 0, else 'MR'."
    )
    affine_tolerance_mm: float = Field(
        default=1e-3, gt=0, description="Largest difference allowed between image and label affines."
    )
    min_slices: int = Field(
        default=3, ge=1, description="DICOM: series with fewer slices are refused as localizers or not volumes."
    )
    resample_tilt: bool = Field(
        default=False, description="DICOM: resample gantry-tilted series onto an orthogonal grid instead of refusing them."
    )
    slice_tolerance_mm: float = Field(
        default=1e-2, gt=0, description="DICOM: largest deviation of slice positions from an even stack."
    )
    case_ids: Literal["derived", "patient"] = Field(
        default="derived",
        description="DICOM: case ids derived from the series (default), or prefixed with the PatientID when asked.",
    )
    reviewed: list[str] = Field(
        default_factory=list,
        description="Review folders (medseg review) whose accepted and corrected masks become training cases: a "
        "case counts when its current verdict judged the mask shown now, accept (the mask the reviewer saw: the "
        "latest correction, else the predicted mask) or fix with a correction. Their scans and labels are "
        "ingested like the dataset's, and the manifest records each label's provenance.",
    )


class PlanConfig(StrictModel):
    """Settings of the plan. Every value left null is chosen by the planning rules."""

    target_spacing_mm: Triple | None = None
    patch_size: tuple[int, ...] | None = None
    batch_size: int | None = Field(default=None, ge=1)
    normalization: Literal["ct", "zscore"] | None = None
    dims: Literal[2, 3] | None = None
    n_folds: int = Field(default=5, ge=2, description="Folds of the cross-validation split by case.")
    seed: int = Field(default=12345, description="Seed of the fold split.")
    memory_budget_gb: float | None = Field(
        default=None, gt=0,
        description="Memory one training process may use (patch and batch are fitted to it); null = the memory "
        "of CUDA device 0 where there is one, else 8 (nnU-Net's reference GPU).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="The device training runs on, for the rules that depend on it: on a CPU the batch is the "
        "least (2), on a GPU what the memory budget holds (docs/training.md); auto = CUDA where the machine "
        "that plans has it.",
    )
    base_features: int = Field(default=32, ge=1, description="Feature maps of the first stage; they double per stage.")
    max_features: int = Field(default=320, ge=1, description="Most feature maps of a stage.")
    min_feature_edge: int = Field(
        default=4, ge=1, description="An axis is pooled while its feature map stays at least twice this."
    )
    max_batch_fraction: float = Field(
        default=0.05, gt=0, le=1, description="A batch covers at most this fraction of the dataset's voxels."
    )
    anisotropy_threshold: float = Field(
        default=3.0, gt=1, description="Largest/smallest spacing ratio above which the planner goes 2D."
    )
    mirror_axes: Literal["all", "auto"] | tuple[int, ...] = Field(
        default="all",
        description="Axes along which training flips samples and test-time augmentation mirrors: all (as nnU-Net), "
        "auto (every axis along which no two classes keep a fixed order; see the plan stage's rules), or a list "
        "of axes (0 R-L, 1 A-P, 2 S-I, after reorientation to RAS; [] = none).",
    )

    @field_validator("mirror_axes")
    @classmethod
    def _axes(cls, value: str | tuple[int, ...]) -> str | tuple[int, ...]:
        if not isinstance(value, str) and (len(set(value)) != len(value) or not set(value) <= {0, 1, 2}):
            raise ValueError(f"expected distinct axes among 0, 1 and 2, found {list(value)}")
        return value


class PreprocessConfig(StrictModel):
    """Resampling and cropping."""

    crop_foreground: bool = Field(default=True, description="Crop each case to its non-zero region.")
    workers: int = Field(default=1, ge=1, description="Cases processed at once.")


class AugmentConfig(StrictModel):
    """MONAI augmentation; probabilities are per sample."""

    pos_neg_ratio: float = Field(default=1.0, ge=0, description="Foreground:background ratio of crop centres.")
    flip_prob: float = Field(default=0.5, ge=0, le=1)
    affine_prob: float = Field(default=0.2, ge=0, le=1)
    rotate_deg: float = Field(default=15.0, ge=0)
    scale: float = Field(default=0.15, ge=0, lt=1)
    intensity_prob: float = Field(default=0.15, ge=0, le=1, description="Scale and shift intensities.")
    noise_prob: float = Field(default=0.1, ge=0, le=1)
    gamma_prob: float = Field(default=0.15, ge=0, le=1)
    blur_prob: float = Field(default=0.0, ge=0, le=1, description="Gaussian blur, sigma 0.5-1 voxel (nnU-Net: 0.2).")
    lowres_prob: float = Field(
        default=0.0, ge=0, le=1,
        description="Simulated low resolution: zoomed to 0.5-1 of its size and back (nnU-Net: 0.25).",
    )


# The settings of each network (``medseg.networks``); a setting of another network is refused.
NETWORK_SETTINGS = {
    "channels": ("unet",), "num_res_units": ("unet",), "backbone": ("flexunet",),
    "deep_supervision": ("dynunet", "resenc"), "blocks_per_stage": ("resenc",),
    "init_filters": ("segresnet",), "blocks_down": ("segresnet",), "blocks_up": ("segresnet",),
}


class NetworkConfig(StrictModel):
    """The network, chosen by name from ``medseg.networks``. ``dynunet`` and ``resenc`` follow the
    plan's topology (stages, kernels, feature maps); the others take their own settings."""

    name: Literal["dynunet", "resenc", "segresnet", "unet", "flexunet"] = "unet"
    channels: tuple[int, ...] = Field(default=(16, 32, 64, 128), description="unet: feature maps per level.")
    num_res_units: int = Field(default=2, ge=0, description="unet: residual units per level.")
    backbone: str = Field(default="resnet18", description="flexunet: a MONAI FlexibleUNet encoder.")
    deep_supervision: bool = Field(default=True, description="dynunet, resenc: a loss on every decoder stage but the lowest.")
    blocks_per_stage: tuple[int, ...] | None = Field(
        default=None, description="resenc: residual blocks per encoder stage; null = nnU-Net's 1, 3, 4, 6, 6, ..."
    )
    init_filters: int = Field(
        default=32, ge=8, multiple_of=8, description="segresnet: feature maps of the first stage (its group norm has 8 groups)."
    )
    blocks_down: tuple[int, ...] = Field(default=(1, 2, 2, 4), description="segresnet: residual blocks per encoder stage.")
    blocks_up: tuple[int, ...] = Field(default=(1, 1, 1), description="segresnet: blocks per decoder stage.")
    dropout: float = Field(default=0.0, ge=0, lt=1)

    @field_validator("channels")
    @classmethod
    def _two_levels(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) < 2:
            raise ValueError(f"expected at least 2 levels, found {len(value)}")
        return value

    @field_validator("blocks_per_stage", "blocks_down", "blocks_up")
    @classmethod
    def _positive_blocks(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and (not value or min(value) < 1):
            raise ValueError(f"expected one or more positive block counts, found {value}")
        return value

    @model_validator(mode="after")
    def _settings_of_this_network(self) -> NetworkConfig:
        foreign = [
            key for key, names in NETWORK_SETTINGS.items()
            if self.name not in names and getattr(self, key) != type(self).model_fields[key].default
        ]
        if foreign:
            owners = "; ".join(f"{k} is for {', '.join(NETWORK_SETTINGS[k])}" for k in foreign)
            raise ValueError(f"settings of another network for '{self.name}': {owners}")
        if self.name == "segresnet" and len(self.blocks_up) != len(self.blocks_down) - 1:
            raise ValueError(f"segresnet: expected one fewer blocks_up than blocks_down, found {len(self.blocks_up)} "
                             f"and {len(self.blocks_down)}")
        return self


class TrainConfig(StrictModel):
    """Training schedule, loss and checkpoints."""

    network: NetworkConfig = NetworkConfig()
    augment: AugmentConfig = AugmentConfig()
    folds: tuple[int, ...] = Field(default=(0,), description="Folds to train (each a Snakemake job).")
    epochs: int = Field(default=100, ge=1)
    iterations_per_epoch: int | None = Field(
        default=None, ge=1, description="Batches per epoch; null = one pass over the training cases."
    )
    optimizer: Literal["adamw", "sgd"] = "adamw"
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    schedule: Literal["poly", "cosine", "constant"] = Field(
        default="poly", description="poly (nnU-Net's: (1 - epoch / epochs)^0.9), cosine, or constant; after the warm-up."
    )
    warmup_epochs: int = Field(default=0, ge=0, description="Linear warm-up of the learning rate over these epochs.")
    val_every: int = Field(default=5, ge=1, description="Validate every N epochs (and after the last).")
    seed: int = 0
    num_workers: int = Field(default=1, ge=0, description="DataLoader worker processes.")
    augment_device: Literal["auto", "loader", "device"] = Field(
        default="auto", description="Where the augmentation after the crop runs: in the loader (CPU processes), or on "
        "the training device, each batch's samples there; auto = the device when it is a GPU.",
    )
    cache: Literal["auto", "memory", "disk"] = Field(
        default="auto", description="Training cases kept in memory, or read from disk per sample (bounded memory); "
        "auto = memory when they fit cache_max_gb.",
    )
    cache_max_gb: float = Field(default=8.0, gt=0, description="auto cache: the most memory the training cases may take.")
    amp: bool = Field(default=True, description="Mixed precision (CUDA only).")
    amp_dtype: Literal["float16", "bfloat16"] = Field(
        default="float16", description="Half type of mixed precision: float16 (with loss scaling) or bfloat16."
    )
    compile: bool = Field(default=False, description="Compile the network with torch.compile.")
    channels_last: bool = Field(
        default=False, description="Network weights and batches in channels-last memory order (channels_last_3d in "
        "3D). On a 2-core CPU it made training steps 1.42x faster for dynunet with 8-64 feature maps, 1.03x for the "
        "demo's UNet and 0.94x for dynunet with 32-256 (bench/channels.py).",
    )
    init_from: str | None = Field(
        default=None,
        description="Transfer learning: a medseg checkpoint or an MLflow model URI (models:/<name>/<version>) whose "
        "weights start the training (same network).",
    )
    init_part: Literal["all", "encoder"] = Field(
        default="all", description="Weights taken from init_from: all of them (the output layer only where its "
        "shape matches), or the encoder's alone (dynunet, resenc, segresnet, flexunet).",
    )
    freeze_epochs: int = Field(default=0, ge=0, description="Keep the taken weights fixed for the first epochs.")
    processes: int = Field(
        default=1, ge=1,
        description="Training processes (DistributedDataParallel): one per GPU, or gloo processes on CPUs. The "
        "workflow starts more than 1 with torchrun and asks for as many GPUs (the 'gpu' resource).",
    )
    max_minutes: float | None = Field(
        default=None, gt=0,
        description="Time budget: stop with a checkpoint before an epoch that would end past it (judged by the "
        "longest epoch so far), e.g. a cluster job's wall-time limit less a margin.",
    )
    stop_before_limit_s: float | None = Field(
        default=60.0, ge=0,
        description="In a SLURM job: stop, with a checkpoint, before an epoch that would end later than this many "
        "seconds before the job's time limit (read from SLURM), and exit with status 75 so that the workflow's "
        "retry resumes from last.pt in the same MLflow run; null = ignore the job's limit.",
    )


class PredictConfig(StrictModel):
    """Sliding-window inference."""

    overlap: float = Field(default=0.5, ge=0, lt=1)
    sw_batch_size: int = Field(default=4, ge=1)
    tta_flips: bool = Field(
        default=False, description="Average each window over flips along the plan's mirror axes (up to 8 flips)."
    )
    gaussian: bool = Field(default=True, description="Gaussian weighting of window overlaps.")
    dicom_seg: bool = Field(
        default=True, description="For scans read from DICOM, also write the mask as a DICOM-SEG of the source series."
    )
    amp: bool = Field(default=True, description="On CUDA, run the network in fp16 autocast.")
    uncertainty_maps: bool = Field(
        default=False,
        description="Also write uncertainty/<case>.nii.gz: the normalized entropy (0 to 1) of the averaged "
        "probabilities of flips and models, on the scan's grid.",
    )
    probability_maps: bool = Field(
        default=False,
        description="Also write probabilities/<case>.nii.gz: every class's probability on the scan's grid "
        "(4D, uint8 scaled by 1/255; a channel of the scan's grid per class in memory).",
    )
    prefetch: int = Field(
        default=1, ge=0, le=8,
        description="Scans read and preprocessed ahead while the network runs (and one written behind it); "
        "0 does every step in turn. Each holds a scan in memory.",
    )
    max_uncertainty: float = Field(
        default=0.25, gt=0, le=1, description="Quality control: flag a case whose uncertainty score is above this."
    )
    max_spacing_ratio: float = Field(
        default=4.0, gt=1,
        description="Refuse a scan whose voxel spacing differs from the plan's target spacing by more than this "
        "factor on an axis (from the finest axis up): the model never saw images of such resolution.",
    )
    volume_tolerance: float = Field(
        default=0.5, ge=0,
        description="Quality control: flag a class whose volume lies below the smallest training label's "
        "times (1 - this) or above the largest's times (1 + this).",
    )
    largest_component: tuple[int, ...] = Field(
        default=(),
        description="Labels whose masks keep only their largest connected component: the classes where "
        "cross-validation showed it helps, as evaluate writes them in postprocessing.json "
        "(medseg predict --postprocessing reads that file).",
    )

    @field_validator("largest_component")
    @classmethod
    def _foreground(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 1 for c in value) or len(set(value)) != len(value):
            raise ValueError(f"expected distinct foreground labels (1 or more), found {list(value)}")
        return value


class EvaluateConfig(StrictModel):
    """Metrics."""

    surface_tolerance_mm: float = Field(default=1.0, gt=0, description="Tolerance of the surface Dice.")


class ReviewConfig(StrictModel):
    """The review pages (``medseg review``)."""

    alpha: float = Field(default=0.4, ge=0, le=1, description="Opacity of the mask's fill over the scan.")
    window: list[float] | None = Field(
        default=None, min_length=2, max_length=2,
        description="Intensities shown black and white, e.g. [-160, 240] for CT soft tissue; null = the 0.5th "
        "and 99.5th percentiles of each scan.",
    )
    thumbnail_size: int = Field(default=256, ge=32, le=2048, description="Longer side of each view of a case's "
                                "overview picture, in pixels.")
    slice_size: int = Field(default=448, ge=64, le=4096, description="Longer side of a slice on a case's page, "
                            "in pixels.")

    @field_validator("window")
    @classmethod
    def _window_order(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not value[0] < value[1]:
            raise ValueError(f"expected [low, high] with low < high, found {value}")
        return value


# The sections a configuration of select.configurations may change; the rest (data, tracking, folds and
# their split) it shares with the run that trains it.
CONFIGURATION_SECTIONS = ("plan", "preprocess", "train", "predict")
# Keys of those sections that would make its out-of-fold Dice incomparable with this run's.
SHARED_KEYS = {"plan": ("n_folds", "seed"), "train": ("folds",)}
CONFIGURATION_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class ConfigurationChanges(StrictModel):
    """Another configuration to train and compare (``select.configurations``): its changes to this run's
    sections, as in an experiment config."""

    plan: dict[str, Any] = Field(default_factory=dict, description="Changes to the plan section, e.g. {dims: 2}.")
    preprocess: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="e.g. {network: {name: dynunet}}; a network of another name takes none of this run's "
        "network settings.",
    )
    predict: dict[str, Any] = Field(default_factory=dict)

    @property
    def own_preprocessing(self) -> bool:
        """Whether it plans and preprocesses the data itself, or takes this run's plan and cases."""
        return bool(self.plan or self.preprocess)


class NewScansConfig(StrictModel):
    """Scans to predict with this run's models once it is evaluated (the workflow's last step)."""

    input: str | None = Field(
        default=None, description="A folder of new scans (NIfTI, DICOM, an MSD folder's test cases); null = none."
    )
    output: str | None = Field(default=None, description="Where the masks go; null = <results>/new_scans.")
    shards: int = Field(
        default=1, ge=1, le=1000,
        description="Jobs that share the scans (medseg predict --shard k/N), each a Snakemake job: one per GPU, "
        "or per cluster node under the SLURM profile.",
    )
    postprocessing: bool = Field(
        default=True, description="Apply the largest-component decision of this run's cross-validation "
        "(<results>/evaluation/postprocessing.json).",
    )


class SelectConfig(StrictModel):
    """Choosing the best of several configurations by cross-validated Dice (``medseg select``)."""

    name: str = Field(default="this", min_length=1, description="This run's name among the candidates.")
    compare_with: dict[str, str] = Field(
        default_factory=dict,
        description="Other finished runs to compare this one with: name -> results folder. When set, the "
        "workflow also writes <results>/selection.json, the best of them all by cross-validated Dice.",
    )
    configurations: dict[str, ConfigurationChanges] = Field(
        default_factory=dict,
        description="Other configurations that the same workflow trains and compares with this run: name -> its "
        "changes to the plan, preprocess, train and predict sections (e.g. 2d: {plan: {dims: 2}}). Each trains "
        "this run's folds on its split, under <results>/configurations/<name>, and registers its models as "
        "<registered model>-<name>. When set, the workflow also writes <results>/selection.json.",
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> SelectConfig:
        names = [self.name, *self.compare_with, *self.configurations]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{repeated} name more than one of this run, compare_with and configurations; "
                             "expected distinct names")
        bad = [n for n in self.configurations if not re.match(CONFIGURATION_NAME, n)]
        if bad:
            raise ValueError(f"configuration names {bad}: expected letters, digits, '_', '.' or '-' (a folder name)")
        return self


class TrackingConfig(StrictModel):
    """MLflow."""

    experiment: str = "medseg"
    registered_model: str | None = Field(
        default=None, description="Name in the model registry; null = 'medseg-<experiment>'."
    )
    server_wait_s: float = Field(
        default=300.0, ge=0,
        description="How long a job retries an MLflow server that does not answer before it fails with a one-line "
        "message; a training keeps its checkpoint, and its rerun resumes and logs the epochs the server missed.",
    )

    @property
    def model_name(self) -> str:
        return self.registered_model or f"medseg-{self.experiment}"


class WorkflowConfig(StrictModel):
    """The whole config of the Snakemake workflow (``configs/config.yaml``)."""

    dataset: str = Field(
        default="data/raw/Task04_Hippocampus",
        description="Input: an MSD/nnU-Net folder, a cases.tsv, or a folder of DICOM series.",
    )
    results: str = Field(default="data/results", description="Where every output goes; the MLflow store is <results>/mlflow.db.")
    tracking_uri: str | None = Field(
        default=None, description="MLflow store; null = sqlite:///<results>/mlflow.db."
    )
    ingest: IngestConfig = IngestConfig()
    plan: PlanConfig = PlanConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    review: ReviewConfig = ReviewConfig()
    new_scans: NewScansConfig = NewScansConfig()
    select: SelectConfig = SelectConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _configurations_valid(self) -> WorkflowConfig:
        for name in self.select.configurations:
            self.configuration(name)
        return self

    def configuration(self, name: str) -> WorkflowConfig:
        """The whole config of ``select.configurations[name]``: this one with its changes, its models
        registered under their own name, and no selection of its own."""
        changes = self.select.configurations[name]
        where = f"select.configurations.{name}"
        sections: dict[str, Any] = {}
        for section in CONFIGURATION_SECTIONS:
            change = getattr(changes, section)
            shared = [k for k in SHARED_KEYS.get(section, ()) if k in change]
            if shared:
                raise ValueError(f"{where}.{section}: {', '.join(shared)} cannot change; expected a configuration "
                                 "to share this run's folds and split, so their out-of-fold Dice compare")
            field = type(self).model_fields[section].annotation
            base = getattr(self, section).model_dump(mode="json")
            network = change.get("network") if section == "train" else None
            if isinstance(network, dict) and network.get("name", base["network"]["name"]) != base["network"]["name"]:
                base["network"] = {}  # another network: none of this run's network settings apply to it
            try:
                sections[section] = field.model_validate(deep_merge(base, change))
            except ValidationError as err:
                message = _format_validation(err, f"{where}.{section}").removeprefix("invalid config in ")
                raise ValueError(message) from None
        tracking = self.tracking.model_copy(update={"registered_model": f"{self.tracking.model_name}-{name}"})
        return self.model_copy(update={**sections, "tracking": tracking, "select": SelectConfig(name=name)})


M = TypeVar("M", bound=BaseModel)


def _format_validation(err: ValidationError, where: str) -> str:
    return f"invalid config in {where}: " + validation_summary(err)


def validation_summary(err: ValidationError) -> str:
    """A pydantic error in one line: each bad key with what was expected and found."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif e["type"] == "missing":
            parts.append(f"missing key '{loc}'")
        elif e["type"] == "value_error":  # a validator's own message says what it found
            msg = str(e.get("ctx", {}).get("error", e["msg"]))
            parts.append(msg if loc == "<root>" else f"'{loc}': {msg}")
        else:
            found = repr(e.get("input"))
            parts.append(f"'{loc}': {e['msg']} (found {found if len(found) <= 80 else found[:77] + '...'})")
    return "; ".join(parts)


def validate(model: type[M], data: Any, where: str) -> M:
    """Build ``model`` from plain data; raise ``ConfigError`` naming ``where`` and the bad keys."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as err:
        raise ConfigError(_format_validation(err, where)) from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``override`` recursively (neither is modified)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where (``line 3, column 5``)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top, found {type(data).__name__}")
    return data


def load_workflow_config(*paths: Path) -> WorkflowConfig:
    """Merge YAML files in order (later wins) and validate the result."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = deep_merge(merged, read_yaml(path))
    return validate(WorkflowConfig, merged, ", ".join(str(p) for p in paths) or "<defaults>")


def section_from_sources(
    model: type[M], section: str, *, config_files: list[Path], params_json: str | None
) -> M:
    """Build one stage's config for the command line.

    ``config_files`` are workflow-style YAML files whose ``section`` is taken (other
    sections are validated too, so a typo anywhere is reported); ``params_json`` is the
    section itself as JSON, as the Snakemake rules pass it, and wins over the files.
    """
    data: dict[str, Any] = {}
    if config_files:
        data = load_workflow_config(*config_files).model_dump(mode="json")[section]
    if params_json:
        try:
            override = json.loads(params_json)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--params for '{section}' is not valid JSON: {err}") from None
        if not isinstance(override, dict):
            raise ConfigError(f"--params for '{section}': expected a JSON object, found {params_json!r}")
        data = deep_merge(data, override)
    return validate(model, data, f"section '{section}'" + (f" of {', '.join(map(str, config_files))}" if config_files else ""))


def json_schema() -> dict[str, Any]:
    """The JSON schema of ``WorkflowConfig`` that Snakemake validates the config with."""
    schema = WorkflowConfig.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
