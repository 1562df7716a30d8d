"""The case manifest that ingest writes and every later stage reads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from medseg.config import validation_summary
from medseg.errors import DataError
from medseg.io import read_json, write_json


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceFile(_Model):
    path: str
    sha256: str


class IntensityStats(_Model):
    """Statistics of one channel: over the whole image, and over the labelled foreground."""

    min: float
    max: float
    mean: float
    std: float
    p00_5: float
    p99_5: float
    foreground_mean: float | None = None
    foreground_std: float | None = None


class LabelProvenance(_Model):
    """Where a reviewed case's label came from (``ingest.reviewed``): a predicted mask a reviewer
    accepted, or a reviewer's correction of one. Cases of the dataset itself have none."""

    origin: Literal["accepted", "corrected"]
    review_dir: str
    reviewer: str  # of the verdict that accepted or fixed the mask
    reviewed_at: str  # ISO 8601, UTC
    corrected_by: str = ""  # who saved the correction ('' for an accepted predicted mask)
    corrected_at: str = ""
    predicted_by: list[str] = []  # the models that predicted the mask
    label_sha256: str  # of the reviewed mask file the label was made from


class CaseRecord(_Model):
    case_id: str
    image: str
    label: str | None
    sources: list[SourceFile]
    shape: list[int]
    channels: int
    spacing_mm: list[float]
    orientation: str
    affine: list[list[float]]
    intensity: list[IntensityStats]
    label_voxels: dict[int, int] | None = None
    provenance: LabelProvenance | None = None  # set for cases from a review folder only


class FailedCase(_Model):
    case_id: str
    file: str
    error: str


class Manifest(_Model):
    """Everything known about the ingested cases. Paths of ingested files are relative to the manifest."""

    dataset: str
    kind: str
    labels: dict[int, str] | None
    modality: str
    channels: int
    cases: list[CaseRecord]
    failed: list[FailedCase]
    test_cases: list[CaseRecord] = []

    def digest(self) -> str:
        """A hash of the inputs (case ids and source hashes): equal inputs give equal digests."""
        items = [(c.case_id, [s.sha256 for s in c.sources]) for c in self.cases]
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]

    @property
    def foreground_labels(self) -> list[int]:
        return sorted(k for k in (self.labels or {}) if k != 0)

    def reviewed_cases(self) -> list[dict[str, Any]]:
        """The training cases whose labels came from a review, each with its provenance."""
        return [{"case_id": c.case_id, **c.provenance.model_dump(mode="json")}
                for c in self.cases if c.provenance is not None]

    def case(self, case_id: str) -> CaseRecord:
        for record in self.cases + self.test_cases:
            if record.case_id == case_id:
                return record
        raise DataError(f"case '{case_id}' is not in the manifest")


def load_manifest(path: Path) -> tuple[Manifest, Path]:
    """Return the manifest and the folder its relative paths start from."""
    path = Path(path)
    try:
        manifest = Manifest.model_validate(read_json(path))
    except ValidationError as err:
        raise DataError(f"{path} is not a medseg manifest: {validation_summary(err)}") from None
    return manifest, path.parent


def save_manifest(manifest: Manifest, path: Path) -> None:
    write_json(path, manifest.model_dump(mode="json"))
