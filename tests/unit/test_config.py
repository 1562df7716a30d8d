"""Unit tests of medseg.config: the committed config files, strict validation, merging and the JSON schema."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from medseg.config import (
    TrainConfig,
    WorkflowConfig,
    deep_merge,
    json_schema,
    load_workflow_config,
    section_from_sources,
    validate,
)
from medseg.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
DEFAULTS = CONFIGS / "config.yaml"
SCHEMA = CONFIGS / "schema.json"
EXPERIMENTS = sorted((CONFIGS / "experiments").glob("*.yaml"))


def _missing_keys(expected: dict, found: dict, prefix: str = "") -> list[str]:
    """Key paths of ``expected`` (recursively) that ``found`` lacks."""
    missing = []
    for key, value in expected.items():
        path = f"{prefix}{key}"
        if key not in found:
            missing.append(path)
        elif isinstance(value, dict) and isinstance(found[key], dict):
            missing += _missing_keys(value, found[key], prefix=f"{path}.")
    return missing


# ---------------------------------------------------------------- committed files


def test_schema_file_is_current() -> None:
    expected = json.dumps(json_schema(), indent=2) + "\n"
    assert SCHEMA.read_text() == expected, (
        "configs/schema.json is stale: run `medseg schema --output configs/schema.json`"
    )


def test_default_config_equals_model_defaults() -> None:
    raw = yaml.safe_load(DEFAULTS.read_text())
    defaults = WorkflowConfig().model_dump(mode="json")
    assert validate(WorkflowConfig, raw, str(DEFAULTS)).model_dump(mode="json") == defaults
    assert _missing_keys(defaults, raw) == [], "configs/config.yaml lacks these defaults"


def test_default_config_lists_every_key_of_a_nested_section() -> None:
    # The recursive check itself: a dropped nested key is reported with its path.
    defaults = WorkflowConfig().model_dump(mode="json")
    raw = copy.deepcopy(defaults)
    del raw["train"]["network"]["backbone"]
    del raw["tracking"]
    assert _missing_keys(defaults, raw) == ["train.network.backbone", "tracking"]


def test_there_are_experiment_configs() -> None:
    assert {p.name for p in EXPERIMENTS} >= {"hippocampus.yaml", "smoke.yaml"}


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_config_validates(experiment: Path) -> None:
    config = load_workflow_config(DEFAULTS, experiment)
    assert isinstance(config, WorkflowConfig)


def test_smoke_experiment_overrides_only_its_keys() -> None:
    config = load_workflow_config(DEFAULTS, CONFIGS / "experiments" / "smoke.yaml")
    assert config.train.network.channels == (4, 8)
    assert config.train.network.num_res_units == 0
    assert config.train.epochs == 2
    assert config.plan.n_folds == 2
    assert config.tracking.experiment == "smoke"
    # Untouched keys keep the defaults, also beside overridden ones in the same section.
    assert config.train.network.name == "unet"
    assert config.train.learning_rate == 1e-3
    assert config.plan.seed == 12345


# ---------------------------------------------------------------- strict validation


def test_unknown_top_level_key_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        validate(WorkflowConfig, {"datset": "x"}, "my.yaml")
    assert "unknown key 'datset'" in str(err.value)
    assert "my.yaml" in str(err.value)


def test_unknown_nested_key_is_refused_with_its_path() -> None:
    with pytest.raises(ConfigError) as err:
        validate(WorkflowConfig, {"train": {"network": {"chanels": [1]}}}, "experiments/typo.yaml")
    message = str(err.value)
    assert "unknown key 'train.network.chanels'" in message
    assert "experiments/typo.yaml" in message


def test_unknown_nested_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  network:\n    chanels: [1]\n")
    with pytest.raises(ConfigError) as err:
        load_workflow_config(DEFAULTS, path)
    assert "unknown key 'train.network.chanels'" in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"train": {"epochs": "many"}}, "'train.epochs'"),
        ({"train": {"learning_rate": -1}}, "'train.learning_rate'"),
        ({"train": {"network": {"channels": [8]}}}, "'train.network.channels'"),
        ({"predict": {"overlap": 1.0}}, "'predict.overlap'"),
        ({"plan": {"normalization": "minmax"}}, "'plan.normalization'"),
    ],
)
def test_wrong_value_names_the_key_path(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(WorkflowConfig, data, "where.yaml")
    assert key in str(err.value)
    assert "where.yaml" in str(err.value)


def test_wrong_value_reports_what_was_found() -> None:
    with pytest.raises(ConfigError, match=r"found 'many'"):
        validate(WorkflowConfig, {"train": {"epochs": "many"}}, "w")


def test_none_validates_to_defaults() -> None:
    assert validate(TrainConfig, None, "w") == TrainConfig()


# ---------------------------------------------------------------- section_from_sources


def test_section_params_win_over_file_and_file_over_defaults(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 7\n  learning_rate: 0.01\n  network:\n    channels: [2, 4]\n")
    config = section_from_sources(TrainConfig, "train", config_files=[path], params_json='{"epochs": 3}')
    assert config.epochs == 3  # params over file
    assert config.learning_rate == 0.01  # file over defaults
    assert config.network.channels == (2, 4)
    assert config.val_every == 5  # defaults
    assert config.network.name == "unet"


def test_section_params_merge_into_nested_sections(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  network:\n    channels: [2, 4]\n    num_res_units: 1\n")
    config = section_from_sources(
        TrainConfig, "train", config_files=[path], params_json='{"network": {"num_res_units": 0}}'
    )
    assert config.network.channels == (2, 4)
    assert config.network.num_res_units == 0


def test_section_without_files_or_params_is_the_defaults() -> None:
    assert section_from_sources(TrainConfig, "train", config_files=[], params_json=None) == TrainConfig()


def test_section_later_file_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("train:\n  epochs: 7\n  seed: 4\n")
    second.write_text("train:\n  epochs: 9\n")
    config = section_from_sources(TrainConfig, "train", config_files=[first, second], params_json=None)
    assert (config.epochs, config.seed) == (9, 4)


def test_section_invalid_params_json() -> None:
    with pytest.raises(ConfigError, match=r"--params for 'train' is not valid JSON"):
        section_from_sources(TrainConfig, "train", config_files=[], params_json="{epochs: 3")


def test_section_params_not_an_object() -> None:
    with pytest.raises(ConfigError, match=r"expected a JSON object"):
        section_from_sources(TrainConfig, "train", config_files=[], params_json="[1, 2]")


def test_section_unknown_param_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'epoch'"):
        section_from_sources(TrainConfig, "train", config_files=[], params_json='{"epoch": 3}')


def test_section_typo_in_another_section_of_the_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("predict:\n  overlapp: 0.2\n")
    with pytest.raises(ConfigError, match=r"unknown key 'predict.overlapp'"):
        section_from_sources(TrainConfig, "train", config_files=[path], params_json=None)


def test_yaml_list_at_top_level_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- epochs: 3\n- seed: 1\n")
    with pytest.raises(ConfigError) as err:
        section_from_sources(TrainConfig, "train", config_files=[path], params_json=None)
    assert str(path) in str(err.value)
    assert "expected a mapping" in str(err.value)


def test_missing_and_malformed_yaml_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as err:
        load_workflow_config(missing)
    assert str(missing) in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_workflow_config(bad)
    assert str(bad) in str(err.value)


def test_empty_yaml_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_workflow_config(path) == WorkflowConfig()


# ---------------------------------------------------------------- JSON schema


def test_json_schema_accepts_the_defaults_and_refuses_unknown_keys() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(yaml.safe_load(DEFAULTS.read_text()), schema)
    jsonschema.validate(WorkflowConfig().model_dump(mode="json"), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"datset": "x"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"train": {"network": {"chanels": [1]}}}, schema)


def test_json_schema_refuses_wrong_types() -> None:
    schema = json.loads(SCHEMA.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"train": {"epochs": "many"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"train": {"learning_rate": -1}}, schema)


# ---------------------------------------------------------------- deep_merge


def test_deep_merge_values() -> None:
    base = {"a": 1, "b": {"c": 2, "d": {"e": 3}}, "f": [1, 2]}
    override = {"b": {"d": {"e": 4, "g": 5}}, "f": [3], "h": None}
    assert deep_merge(base, override) == {"a": 1, "b": {"c": 2, "d": {"e": 4, "g": 5}}, "f": [3], "h": None}


def test_deep_merge_replaces_non_dicts_with_dicts_and_back() -> None:
    assert deep_merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}
    assert deep_merge({"a": {"b": 2}}, {"a": 1}) == {"a": 1}


def test_deep_merge_does_not_modify_its_inputs() -> None:
    base = {"a": 1, "b": {"c": 2, "d": {"e": 3}}, "f": [1, 2]}
    override = {"b": {"d": {"e": 4, "g": 5}, "x": {"y": 1}}, "f": [3]}
    base_copy, override_copy = copy.deepcopy(base), copy.deepcopy(override)
    merged = deep_merge(base, override)
    assert base == base_copy
    assert override == override_copy
    # Changing the result afterwards does not reach back into the inputs' nested dicts.
    merged["b"]["d"]["e"] = 99
    merged["b"]["c"] = 99
    assert base == base_copy


def test_select_refuses_this_run_among_the_others() -> None:
    with pytest.raises(ConfigError, match=r"\['3d'\] name more than one of this run, compare_with and configurations"):
        validate(WorkflowConfig, {"select": {"name": "3d", "compare_with": {"3d": "elsewhere"}}}, "test")
    with pytest.raises(ConfigError, match=r"\['2d'\] name more than one"):
        validate(WorkflowConfig, {"select": {"compare_with": {"2d": "x"}, "configurations": {"2d": {}}}}, "test")
    chosen = validate(WorkflowConfig, {"select": {"name": "3d", "compare_with": {"2d": "data/results-2d"}}}, "test")
    assert chosen.select.compare_with == {"2d": "data/results-2d"}


def test_configurations_merge_their_changes_into_this_run() -> None:
    from medseg.workflow import configuration_configs, own_preprocessing, train_gpus, train_launcher

    data = {
        "plan": {"batch_size": 2},
        "train": {"epochs": 7, "network": {"channels": [8, 16]}},
        "tracking": {"experiment": "hippo"},
        "select": {"name": "3d", "configurations": {
            "2d": {"plan": {"dims": 2}},
            "deep": {"train": {"network": {"name": "dynunet"}, "processes": 2}},
        }},
    }
    config = validate(WorkflowConfig, data, "test")
    two_d, deep = config.configuration("2d"), config.configuration("deep")
    assert (two_d.plan.dims, two_d.plan.batch_size, two_d.train.epochs) == (2, 2, 7)  # the rest is this run's
    assert deep.train.network.name == "dynunet" and deep.train.epochs == 7 and deep.plan == config.plan
    assert deep.train.network.channels == (16, 32, 64, 128)  # another network: this run's unet settings dropped
    assert config.configuration("2d").train.network.channels == (8, 16)
    assert two_d.tracking.model_name == "medseg-hippo-2d" and two_d.tracking.experiment == "hippo"
    assert two_d.select.name == "2d" and not two_d.select.configurations
    full = configuration_configs(config.model_dump(mode="json"))
    assert set(full) == {"2d", "deep"} and full["2d"]["plan"]["dims"] == 2
    assert own_preprocessing(data, "2d") and not own_preprocessing(data, "deep")
    assert train_launcher(full["2d"]) == "medseg" and train_gpus(full["2d"]) == 0
    assert train_launcher(full["deep"]).startswith("torchrun --standalone --nproc_per_node=2 ")
    assert train_gpus(full["deep"]) == 2


@pytest.mark.parametrize(
    ("configurations", "message"),
    [
        ({"wide": {"train": {"network": {"nme": "x"}}}}, r"select.configurations.wide.train: unknown key 'network.nme'"),
        ({"wide": {"train": {"epochs": 0}}}, r"select.configurations.wide.train: 'epochs': Input should be greater"),
        ({"s": {"plan": {"n_folds": 3}}}, r"select.configurations.s.plan: n_folds cannot change; expected a "
                                          r"configuration to share this run's folds and split"),
        ({"s": {"train": {"folds": [0, 1]}}}, r"select.configurations.s.train: folds cannot change"),
        ({"s": {"tracking": {"experiment": "x"}}}, r"unknown key 'select.configurations.s.tracking'"),
        ({"a/b": {}}, r"configuration names \['a/b'\]: expected letters, digits, '_', '.' or '-'"),
    ],
)
def test_bad_configurations_are_refused_by_name(configurations: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(WorkflowConfig, {"select": {"configurations": configurations}}, "test.yaml")
