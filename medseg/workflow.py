"""Helpers for the Snakemake rule files (kept here so the rule files hold rules only)."""

from __future__ import annotations

import json
import shlex
from typing import Any

from medseg.config import WorkflowConfig


def full_config(config: dict[str, Any]) -> dict[str, Any]:
    """The workflow config with every default filled in (raises if a key is unknown)."""
    from medseg.config import validate

    return validate(WorkflowConfig, config, "the Snakemake config").model_dump(mode="json")


def section_arg(config: dict[str, Any], name: str) -> str:
    """A config section as a shell-quoted JSON argument (also what Snakemake compares for reruns)."""
    return shlex.quote(json.dumps(config[name], sort_keys=True))
