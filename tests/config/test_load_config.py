"""The config layer: reading the repo's YAML files, ``--set`` overrides, section checks, error lines.

Only this layer knows YAML ``section.key`` names; these tests hold it to that:
every value of a repo config reaches its field, every misplaced or misspelt key
is caught with the key named, and every field error becomes ``section.key``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from fedml_progfed.config import (
    FEDML_SECTIONS,
    OUR_SECTIONS,
    RunConfig,
    apply_overrides,
    check_sections,
    explain,
    fedml_namespace,
    flatten,
    key_of,
    load_config,
    read_yaml,
)
from fedml_progfed.config.schema import SECTION_PREFIXES
from fedml_progfed.errors import ConfigError, DataError, FieldError

ROOT = Path(__file__).resolve().parents[2]
REPO_CONFIGS = sorted((ROOT / "config").rglob("*.yaml"))
#: Keys about to move to other sections (memory budgets, model options): their placement is not pinned here.
MOVING = {"growth", "unet_bridge", "memory_budgets", "memory_estimator"}


def write(tmp_path: Path, sections: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def quickstart() -> dict:
    return yaml.safe_load((ROOT / "config" / "quickstart.yaml").read_text())


def expected(value):
    return tuple(value) if isinstance(value, list) else value


# --------------------------------------------------------------------------- the repo's configs


def test_the_repo_has_configs():
    assert len(REPO_CONFIGS) >= 5 and ROOT / "config" / "quickstart.yaml" in REPO_CONFIGS


@pytest.mark.parametrize("path", REPO_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "config")))
def test_every_repo_config_loads_and_each_value_reaches_its_field(path, caplog):
    raw = read_yaml(path)
    with caplog.at_level(logging.WARNING, logger="fedml_progfed"):
        sections, config = load_config(path)
    assert not [r for r in caplog.records if "unknown" in r.getMessage()], "a repo config has a misspelt key"
    assert isinstance(config, RunConfig)
    checked = 0
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    for section, values in raw.items():
        for key, value in values.items():
            if section in FEDML_SECTIONS and key in FEDML_SECTIONS[section] and key in fields:
                assert getattr(config, key) == expected(value), f"{section}.{key}"
                checked += 1
            for attribute, ours in OUR_SECTIONS.items():
                name = key[len(SECTION_PREFIXES[attribute]):]
                if section == ours and name not in MOVING:
                    assert getattr(getattr(config, attribute), name) == expected(value), f"{section}.{key}"
                    checked += 1
    assert checked >= 10
    # FedML's flattened args give the same frozen config (the cross-silo entry builds it that way);
    # the resolved sections differ only in the server learning rate written back
    assert RunConfig.from_flat(vars(fedml_namespace(raw))) == config
    resolved = RunConfig.from_flat(vars(fedml_namespace(sections)))
    assert resolved == config.replace(progfed={"server_lr": config.progfed.resolved_server_lr})


def test_load_config_writes_the_resolved_server_lr_back(tmp_path):
    sections = quickstart()
    sections["progfed_args"].pop("progfed_server_lr")
    sections["progfed_args"]["progfed_optimizer"] = "fedadam"
    resolved, config = load_config(write(tmp_path, sections))
    assert config.progfed.server_lr is None and config.progfed.resolved_server_lr == 0.01
    assert resolved["progfed_args"]["progfed_server_lr"] == 0.01  # the run folder's config.yaml says what was used
    assert load_config(write(tmp_path, resolved))[1].progfed.server_lr == 0.01


# --------------------------------------------------------------------------- --set overrides


def test_set_overrides_reach_the_config_and_the_sections():
    path = ROOT / "config" / "quickstart.yaml"
    sections, config = load_config(path, [
        "train_args.comm_round=12",
        "validation_args.frequency_of_the_test=1",
        "progfed_args.progfed_schedule=[1, 2, 3, 6]",
        "train_args.learning_rate=1e-3",  # YAML 1.1 reads this as a string; coercion makes it a float
        "progfed_args.progfed_lr_restart_at_growth=yes",
        "progfed_args.progfed_max_update_norm=null",
    ])
    assert config.comm_round == 12 and config.frequency_of_the_test == 1
    assert config.progfed.schedule == (1, 2, 3, 6)
    assert config.learning_rate == 0.001 and isinstance(config.learning_rate, float)
    assert config.progfed.lr_restart_at_growth is True and config.progfed.max_update_norm is None
    assert sections["train_args"]["comm_round"] == 12 and sections["progfed_args"]["progfed_schedule"] == [1, 2, 3, 6]
    assert load_config(path)[1].comm_round == yaml.safe_load(path.read_text())["train_args"]["comm_round"] != 12  # the file is untouched


def test_apply_overrides_parses_yaml_scalars_and_copies():
    base = {"train_args": {"comm_round": 4, "epochs": 1}}
    out = apply_overrides(base, ["train_args.comm_round=9", "train_args.epochs=", "data_args.data_cache_dir=/d/a=b",
                                 "progfed_args.progfed_schedule=[1,", "train_args.comm_round=10"])
    assert out["train_args"] == {"comm_round": 10, "epochs": None}  # the last --set of a key wins
    assert out["data_args"] == {"data_cache_dir": "/d/a=b"}  # only the first '=' splits; a new section is made
    assert out["progfed_args"] == {"progfed_schedule": "[1,"}  # not YAML: kept as text for the field to refuse
    assert base == {"train_args": {"comm_round": 4, "epochs": 1}}


@pytest.mark.parametrize("item", ["comm_round=3", "train_args.comm_round", ".comm_round=3", "train_args.=3", "=3"])
def test_a_malformed_set_names_the_form(item):
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        apply_overrides({}, [item])


# --------------------------------------------------------------------------- misspelt and misplaced keys


def test_unknown_key_in_our_section_is_an_error_naming_it(tmp_path):
    with pytest.raises(FieldError) as caught:
        load_config(ROOT / "config" / "quickstart.yaml", ["progfed_args.progfed_stagez=3"])
    line = explain(caught.value)
    assert caught.value.field == "progfed.stagez"
    assert line.startswith("progfed_args.progfed_stagez: unknown key") and "progfed_stages" in line
    sections = quickstart()
    sections["profl_args"] = {"profl_em_windw": 3}
    with pytest.raises(FieldError) as caught:
        load_config(write(tmp_path, sections))
    assert explain(caught.value).startswith("profl_args.profl_em_windw: unknown key") and "profl_em_window" in explain(caught.value)


def test_unknown_key_in_a_fedml_section_warns_with_the_closest_key(tmp_path, caplog):
    assert check_sections({"train_args": {"comm_rounds": 3, "epochs": 1}}) == [
        "train_args.comm_rounds: unknown; did you mean comm_round?"
    ]
    assert check_sections({"tracking_args": {"enable_wandbb": True}}) == [
        "tracking_args.enable_wandbb: unknown; did you mean enable_wandb?"
    ]
    assert check_sections({"data_args": {"zzz": 1}}) == ["data_args.zzz: unknown; FedML may ignore it"]
    assert check_sections(quickstart()) == []
    sections = quickstart()
    sections["train_args"]["batch_sise"] = 8
    with caplog.at_level(logging.WARNING, logger="fedml_progfed"):
        _, config = load_config(write(tmp_path, sections))
    assert "train_args.batch_sise: unknown; did you mean batch_size?" in caplog.text
    assert config.batch_size == quickstart()["train_args"]["batch_size"]  # a warning, not a change: FedML may have a use for the key


@pytest.mark.parametrize(
    "section,key,home",
    [
        ("data_args", "comm_round", "train_args"),  # one of the keys this package reads
        ("train_args", "enable_wandb", "tracking_args"),  # one FedML alone reads
        ("common_args", "backend", "comm_args"),
    ],
)
def test_a_known_key_in_the_wrong_section_is_an_error(section, key, home):
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}: {key} belongs in the {home} section; move it to {home}\.{key}$"):
        check_sections({section: {key: 1}})


def test_our_keys_and_fedml_keys_do_not_cross_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"train_args\.progfed_stages: progfed_\* keys belong in the progfed_args section"):
        load_config(ROOT / "config" / "quickstart.yaml", ["train_args.progfed_stages=2"])
    with pytest.raises(ConfigError, match=r"progfed_args\.stages: keys of this section start with 'progfed_'"):
        load_config(ROOT / "config" / "quickstart.yaml", ["progfed_args.stages=2"])
    with pytest.raises(ConfigError, match=r"profl_args\.progfed_stages: progfed_\* keys belong in the progfed_args"):
        flatten({"profl_args": {"progfed_stages": 2}})


def test_an_unknown_section_is_an_error_with_the_closest_section():
    with pytest.raises(ConfigError, match=r"trian_args\.x: unknown section 'trian_args'; did you mean train_args\?"):
        check_sections({"trian_args": {"x": 1}})
    with pytest.raises(ConfigError, match="unknown section 'zzz'; sections: common_args"):
        check_sections({"zzz": {"x": 1}})


# --------------------------------------------------------------------------- reading files


def test_read_yaml_refuses_missing_broken_and_flat_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "none.yaml")
    (tmp_path / "broken.yaml").write_text("train_args: {comm_round: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        read_yaml(tmp_path / "broken.yaml")
    (tmp_path / "flat.yaml").write_text("comm_round: 3\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        read_yaml(tmp_path / "flat.yaml")
    (tmp_path / "list.yaml").write_text("- train_args\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        read_yaml(tmp_path / "list.yaml")


# --------------------------------------------------------------------------- field -> section.key


@pytest.mark.parametrize(
    "field,key",
    [
        ("batch_size", "train_args.batch_size"),
        ("random_seed", "common_args.random_seed"),
        ("data_cache_dir", "data_args.data_cache_dir"),
        ("backend", "comm_args.backend"),
        ("frequency_of_the_test", "validation_args.frequency_of_the_test"),
        ("progfed.stages", "progfed_args.progfed_stages"),
        ("progfed.compression_up", "progfed_args.progfed_compression_up"),
        ("profl.em_window", "profl_args.profl_em_window"),
    ],
)
def test_explain_maps_a_field_to_its_section_key(field, key):
    assert key_of(field) == key
    assert explain(FieldError(field, "7 is not allowed; use 1..4")) == f"{key}: 7 is not allowed; use 1..4"


def test_every_run_config_field_has_a_yaml_home():
    """No field error may end up as ``args.<field>``: every plain field sits in a FedML section."""
    for f in dataclasses.fields(RunConfig):
        if f.name not in SECTION_PREFIXES:
            section, _, key = key_of(f.name).partition(".")
            assert section in FEDML_SECTIONS and key == f.name, f.name
    assert key_of("not_a_field") == "args.not_a_field"


def test_explain_leaves_other_errors_as_they_are():
    assert explain(ConfigError("--cf: config file 'x' does not exist")) == "--cf: config file 'x' does not exist"
    assert explain(DataError("train-images-idx3-ubyte.gz is truncated")) == "train-images-idx3-ubyte.gz is truncated"


@pytest.mark.parametrize(
    "override,line",
    [
        ("train_args.batch_size=0", "train_args.batch_size: 0 is not allowed; use a positive integer"),
        ("train_args.comm_round=abc", "train_args.comm_round: 'abc' is not an integer"),
        ("progfed_args.progfed_stages=0", "progfed_args.progfed_stages: 0 is not allowed; use a positive integer or empty"),
        ("progfed_args.progfed_fedprox_mu=x", "progfed_args.progfed_fedprox_mu: 'x' is not a number"),
        ("profl_args.profl_em_threshold=1.5", "profl_args.profl_em_threshold: 1.5 is not allowed; use a number in (0, 1)"),
    ],
)
def test_a_bad_value_explains_to_one_line_naming_the_key(override, line):
    with pytest.raises(FieldError) as caught:
        load_config(ROOT / "config" / "quickstart.yaml", [override])
    assert explain(caught.value) == line
