"""Does a Snakemake SLURM profile fit the cluster? Each rule's CPUs, memory, run time and GPUs
against the largest node of its partition (``sinfo``), with the line to change where it does not.

sbatch refuses a job that no node can hold ("Requested node configuration is not available")
only when Snakemake submits it, after the stages before it ran; ``medseg slurm-check`` says so
before, and names the setting.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medseg.errors import ConfigError, ServiceError

RULES = ("ingest", "plan", "preprocess", "plan_configuration", "preprocess_configuration", "train", "predict", "evaluate", "review", "train_configuration",
         "predict_configuration", "evaluate_configuration", "predict_new_shard", "predict_new", "review_new", "select")


@dataclass(frozen=True)
class Partition:
    name: str
    cpus: int
    memory_mb: int
    gpus: int
    max_minutes: float | None  # None: no limit
    default: bool


@dataclass(frozen=True)
class Request:
    rule: str
    partition: str | None
    cpus: int
    memory_mb: int
    runtime_min: float | None
    gpus: int


def parse_minutes(text: str) -> float | None:
    """A SLURM time (``infinite``, ``30``, ``1:00:00``, ``2-00:00:00``) in minutes; None for no limit."""
    text = text.strip()
    if text in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts[-3:]
    return days * 1440 + h * 60 + m + s / 60


def gpu_count(gres: str) -> int:
    """GPUs in a sinfo GRES field (``gpu:a100:4(S:0-1),shard:8``)."""
    total = 0
    for item in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if m:
            total += int(m.group(1))
    return total


def partitions(sinfo_text: str) -> dict[str, Partition]:
    """The largest node of each partition from ``sinfo -h -N -o '%P|%c|%m|%G|%l'`` lines."""
    found: dict[str, Partition] = {}
    for line in sinfo_text.splitlines():
        if not line.strip():
            continue
        name, cpus, mem, gres, limit = (f.strip() for f in line.split("|"))
        default = name.endswith("*")
        name = name.rstrip("*")
        part = Partition(name, int(cpus.rstrip("+")), int(re.sub(r"\D", "", mem) or 0), gpu_count(gres),
                         parse_minutes(limit), default)
        old = found.get(name)
        if old is None:
            found[name] = part
        else:
            found[name] = Partition(name, max(old.cpus, part.cpus), max(old.memory_mb, part.memory_mb),
                                    max(old.gpus, part.gpus), old.max_minutes, old.default or default)
    return found


def read_sinfo() -> str:
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        raise ServiceError("sinfo not found: run slurm-check on a machine of the SLURM cluster (a login node)")
    proc = subprocess.run([sinfo, "-h", "-N", "-o", "%P|%c|%m|%G|%l"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ServiceError(f"sinfo failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _overrides(items: Sequence[str], what: str) -> dict[str, dict[str, str]]:
    """``rule:key=value`` (--set-resources) or ``rule=value`` (--set-threads) on the command line."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        m = re.fullmatch(r"(\w+)(?::(\w+))?=(.+)", item)
        if not m:
            raise ConfigError(f"{what}: expected RULE:NAME=VALUE or RULE=VALUE, found {item!r}")
        out.setdefault(m.group(1), {})[m.group(2) or "threads"] = m.group(3)
    return out


def requests(profile: Mapping[str, Any], set_resources: Sequence[str] = (), set_threads: Sequence[str] = ()
             ) -> list[Request]:
    """What each rule asks for under the profile and command-line overrides."""
    defaults = dict(profile.get("default-resources") or {})
    resources = {k: dict(v or {}) for k, v in (profile.get("set-resources") or {}).items()}
    threads = {k: int(v) for k, v in (profile.get("set-threads") or {}).items()}
    for rule, values in _overrides(set_resources, "--set-resources").items():
        resources.setdefault(rule, {}).update(values)
    for rule, values in _overrides(set_threads, "--set-threads").items():
        threads[rule] = int(values["threads"])
    out = []
    for rule in RULES:
        res = {**defaults, **resources.get(rule, {})}
        runtime = res.get("runtime")
        gpus = int(res.get("gpu", 0) or 0) or gpu_count(str(res.get("gres", "")))
        mem = res.get("mem_mb", 1000)
        out.append(Request(rule, res.get("slurm_partition") or None, int(threads.get(rule, res.get("cpus_per_task", 1))),
                           int(float(mem)), None if runtime is None else parse_minutes(str(runtime)), gpus))
    return out


def problems(reqs: Sequence[Request], parts: Mapping[str, Partition], profile_path: Path) -> list[str]:
    """One line per request that no node of its partition can hold, naming the setting to change."""
    default = next((p for p in parts.values() if p.default), None)
    lines = []
    where = f"in {profile_path} or on the command line"
    for r in reqs:
        part = parts.get(r.partition) if r.partition else default
        if part is None:
            lines.append(f"rule {r.rule}: partition {r.partition or '(default)'} not found; the cluster has "
                         f"{', '.join(sorted(parts)) or 'none'}: set slurm_partition {where}")
            continue
        if r.cpus > part.cpus:
            lines.append(f"rule {r.rule}: asks {r.cpus} CPUs, the largest node of partition {part.name} has "
                         f"{part.cpus}: set set-threads: {r.rule}: {part.cpus} {where} (--set-threads "
                         f"{r.rule}={part.cpus})")
        if r.memory_mb > part.memory_mb:
            lines.append(f"rule {r.rule}: asks {r.memory_mb} MB, the largest node of partition {part.name} has "
                         f"{part.memory_mb} MB: set set-resources: {r.rule}: mem_mb: {part.memory_mb} {where} "
                         f"(--set-resources {r.rule}:mem_mb={part.memory_mb})")
        if r.gpus > part.gpus:
            lines.append(f"rule {r.rule}: asks {r.gpus} GPUs, partition {part.name} has nodes with {part.gpus}: set "
                         f"its slurm_partition to a GPU partition, or remove gpu {where}")
        if r.runtime_min is not None and part.max_minutes is not None and r.runtime_min > part.max_minutes:
            lines.append(f"rule {r.rule}: asks runtime {r.runtime_min:.0f} min, partition {part.name} allows "
                         f"{part.max_minutes:.0f}: set set-resources: {r.rule}: runtime: {part.max_minutes:.0f} {where}")
    return lines


def load_profile(path: Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "config.yaml" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file}: expected a Snakemake profile (config.yaml), found none")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of profile settings, found {type(data).__name__}")
    return data
