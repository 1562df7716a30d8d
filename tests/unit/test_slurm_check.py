"""medseg.slurm_check: a profile's requests against the cluster's nodes, with the setting to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.errors import ConfigError
from medseg.slurm_check import gpu_count, load_profile, parse_minutes, partitions, problems, requests

REPO = Path(__file__).resolve().parents[2]
SINFO = "cpu*|2|21000|(null)|infinite\ncpu*|4|16000|(null)|infinite\ngpu|16|128000|gpu:a100:4(S:0-1)|2-00:00:00\n"


def test_parse_minutes_and_gpus() -> None:
    assert parse_minutes("infinite") is None
    assert parse_minutes("30") == 30
    assert parse_minutes("1:30:00") == 90
    assert parse_minutes("2-00:00:00") == 2880
    assert gpu_count("gpu:a100:4(S:0-1),shard:8") == 4
    assert gpu_count("(null)") == 0


def test_partitions_take_the_largest_node() -> None:
    parts = partitions(SINFO)
    assert (parts["cpu"].cpus, parts["cpu"].memory_mb, parts["cpu"].default) == (4, 21000, True)
    assert (parts["gpu"].gpus, parts["gpu"].max_minutes, parts["gpu"].default) == (4, 2880, False)


def test_shipped_profile_on_a_small_node_names_each_setting_to_change() -> None:
    profile_path = REPO / "configs" / "profiles" / "slurm"
    reqs = {r.rule: r for r in requests(load_profile(profile_path))}
    assert (reqs["train"].cpus, reqs["train"].memory_mb, reqs["train"].runtime_min) == (4, 16000, 720)
    assert (reqs["plan"].cpus, reqs["plan"].memory_mb) == (1, 4000)
    small = partitions("debug*|2|12000|(null)|infinite\n")
    found = problems(list(reqs.values()), small, profile_path)
    assert any(line.startswith("rule train: asks 4 CPUs") and "--set-threads train=2" in line for line in found)
    assert any(line.startswith("rule train: asks 16000 MB") and "--set-resources train:mem_mb=12000" in line
               for line in found)
    assert not any(line.startswith("rule plan") for line in found)
    # the overrides that the lines name make it fit
    fixed = requests(load_profile(profile_path),
                     [f"{r}:mem_mb=8000" for r in reqs], [f"{r}=2" for r in reqs])
    assert problems(fixed, small, profile_path) == []


def test_gpu_partition_and_time_limit_are_checked() -> None:
    profile = {"default-resources": {"mem_mb": 1000, "runtime": 60},
               "set-resources": {"train": {"slurm_partition": "cpu", "gpu": 1, "runtime": "3-00:00:00"},
                                 "predict": {"slurm_partition": "gpu", "gpu": 1, "runtime": 4000},
                                 "evaluate": {"slurm_partition": "nope"}}}
    found = problems(requests(profile), partitions(SINFO), Path("p"))
    assert any("rule train: asks 1 GPUs, partition cpu" in line for line in found)
    assert any("rule predict: asks runtime 4000 min, partition gpu allows 2880" in line for line in found)
    assert any("rule evaluate: partition nope not found" in line for line in found)


def test_bad_profile_and_override_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a Snakemake profile"):
        load_profile(tmp_path)
    (tmp_path / "config.yaml").write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_profile(tmp_path)
    with pytest.raises(ConfigError, match="expected RULE:NAME=VALUE"):
        requests({}, ["train mem 4"])
