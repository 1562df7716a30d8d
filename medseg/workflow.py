"""Helpers for the Snakemake rule files (kept here so the rule files hold rules only)."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from typing import Any

from medseg.config import WorkflowConfig


def full_config(config: dict[str, Any]) -> dict[str, Any]:
    """The workflow config with every default filled in (raises if a key is unknown)."""
    from medseg.config import validate

    return validate(WorkflowConfig, config, "the Snakemake config").model_dump(mode="json")


def section_arg(config: dict[str, Any], name: str) -> str:
    """A config section as a shell-quoted JSON argument (also what Snakemake compares for reruns)."""
    return shlex.quote(json.dumps(config[name], sort_keys=True))


def new_scans_predict_arg(config: dict[str, Any]) -> str:
    """The ``predict`` section for the new scans, as ``section_arg`` gives it, without the settings that
    change masks: those come from what the fold models were validated with (``medseg.validated``),
    the largest-component decision included unless ``new_scans.postprocessing`` is false."""
    from medseg.validated import SETTINGS

    section = {k: v for k, v in config["predict"].items() if k not in SETTINGS}
    if not config["new_scans"]["postprocessing"]:
        section["largest_component"] = []
    return section_arg({"predict": section}, "predict")


def reviewed_inputs(config: dict[str, Any]) -> list[str]:
    """The files of each review folder in ``ingest.reviewed`` whose change reruns ingest (and what
    follows): ``queue.json`` (the folder rebuilt on new masks) and ``verdicts.csv`` (rewritten after
    every verdict; absent until the first)."""
    files = []
    for folder in config["ingest"]["reviewed"]:
        files.append(os.path.join(folder, "queue.json"))
        if os.path.exists(os.path.join(folder, "verdicts.csv")):
            files.append(os.path.join(folder, "verdicts.csv"))
    return files


def configuration_configs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> the whole config (defaults filled in) of each of ``select.configurations``."""
    full = WorkflowConfig.model_validate(config)
    return {name: full.configuration(name).model_dump(mode="json") for name in full.select.configurations}


def own_preprocessing(config: dict[str, Any], name: str) -> bool:
    """Whether configuration ``name`` plans and preprocesses for itself (it changes those sections)."""
    return WorkflowConfig.model_validate(config).select.configurations[name].own_preprocessing


def train_launcher(config: dict[str, Any]) -> str:
    """The command that trains: ``medseg``, or ``torchrun`` with one process per GPU (DistributedDataParallel)."""
    processes = config["train"]["processes"]
    return f"torchrun --standalone --nproc_per_node={processes} -m medseg.cli" if processes > 1 else "medseg"


def train_gpus(config: dict[str, Any]) -> int:
    """GPUs a training job asks for (Snakemake's ``gpu`` resource): one per process when there are several."""
    processes = config["train"]["processes"]
    return processes if processes > 1 else 0


def configuration_section(configurations: dict[str, dict[str, Any]], section: str) -> Callable[[Any], str]:
    """A params function: the section of the configuration a job is for (its ``configuration``
    wildcard), as the rules pass sections."""
    return lambda wildcards: section_arg(configurations[wildcards.configuration], section)


def configuration_input(own_preprocessing: dict[str, bool], own: str, shared: str) -> Callable[[Any], str]:
    """An input function: the configuration's own planned or preprocessed file (``own``, with a
    ``{configuration}`` field), or this run's (``shared``) where it changes neither section."""
    def path(wildcards: Any) -> str:
        name = wildcards.configuration
        return own.format(configuration=name) if own_preprocessing[name] else shared

    return path
