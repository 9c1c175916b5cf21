"""RunConfig: frozen, validated once, each range rule one FieldError naming its field."""

from __future__ import annotations

import dataclasses

import pytest

from fedml_progfed.config import ProgFedConfig, RunConfig, explain
from fedml_progfed.config.schema import CROSS_SILO_ROUND_TIMEOUT_S, ProFLConfig
from fedml_progfed.errors import FieldError


def test_defaults_are_valid_and_every_section_is_frozen():
    config = RunConfig()
    config.validate()
    for obj, name in ((config, "comm_round"), (config.progfed, "stages"), (config.profl, "em_window")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 3)
    assert hash(config) == hash(RunConfig())  # frozen and hashable: safe to share between layers


def test_replace_is_a_validated_copy_that_merges_section_changes():
    base = RunConfig().replace(comm_round=20, progfed={"stages": 4, "warmup_rounds": 1})
    changed = base.replace(progfed={"stages": 2}, profl={"em_window": 3})
    assert changed.progfed.stages == 2 and changed.progfed.warmup_rounds == 1  # the section's other fields kept
    assert changed.profl.em_window == 3 and changed.comm_round == 20
    assert base.progfed.stages == 4 and base.profl.em_window == 6  # the original is untouched
    explicit = base.replace(progfed=ProgFedConfig(stages=3))  # a whole section object replaces the section
    assert explicit.progfed == ProgFedConfig(stages=3)
    with pytest.raises(FieldError) as caught:
        base.replace(progfed={"stages": 0})
    assert caught.value.field == "progfed.stages"


@pytest.mark.parametrize(
    "changes,field,hint",
    [
        (dict(random_seed=-1), "random_seed", "non-negative"),
        (dict(comm_round=0), "comm_round", "positive integer"),
        (dict(epochs=0), "epochs", "positive integer"),
        (dict(batch_size=0), "batch_size", "positive integer"),
        (dict(learning_rate=0.0), "learning_rate", "positive number"),
        (dict(momentum=-0.1), "momentum", ">= 0"),
        (dict(weight_decay=-1e-4), "weight_decay", ">= 0"),
        (dict(client_num_in_total=0, client_num_per_round=0), "client_num_in_total", "positive integer"),
        (dict(client_num_in_total=10, client_num_per_round=11), "client_num_per_round", "between 1 and client_num_in_total (10)"),
        (dict(client_num_per_round=0), "client_num_per_round", "between 1"),
        (dict(frequency_of_the_test=0), "frequency_of_the_test", "positive integer"),
        (dict(client_optimizer="adam"), "client_optimizer", "sgd"),
        (dict(federated_optimizer="FedProx"), "federated_optimizer", "progfed_optimizer"),
        (dict(eval_mode="sliding"), "eval_mode", "full | center_crop"),
        (dict(test_fraction=1.0), "test_fraction", "(0, 1)"),
        (dict(test_fraction=0.0), "test_fraction", "(0, 1)"),
        (dict(base_width=0), "base_width", "positive integer"),
        (dict(progfed={"stages": 0}), "progfed.stages", "positive integer or empty"),
        (dict(progfed={"warmup_rounds": -1}), "progfed.warmup_rounds", ">= 0"),
        (dict(progfed={"warmup_mode": "before"}), "progfed.warmup_mode", "within | extra"),
        (dict(learning_rate=0.1, progfed={"lr_min": 0.2}), "progfed.lr_min", "between 0 and"),
        (dict(progfed={"lr_min": -0.1}), "progfed.lr_min", "between 0 and"),
        (dict(progfed={"server_lr": 0.0}), "progfed.server_lr", "positive number or empty"),
        (dict(progfed={"fedprox_mu": -0.01}), "progfed.fedprox_mu", ">= 0"),
        (dict(progfed={"fedadam_beta1": 1.0}), "progfed.fedadam_beta1", "[0, 1)"),
        (dict(progfed={"fedadam_beta2": -0.1}), "progfed.fedadam_beta2", "[0, 1)"),
        (dict(progfed={"fedadam_tau": 0.0}), "progfed.fedadam_tau", "positive number"),
        (dict(progfed={"invalid_update": "ignore"}), "progfed.invalid_update", "drop | abort"),
        (dict(progfed={"min_clients": 0}), "progfed.min_clients", "positive integer"),
        (dict(progfed={"max_update_norm": 0.0}), "progfed.max_update_norm", "positive number or empty"),
        (dict(progfed={"norm_policy": "scale"}), "progfed.norm_policy", "reject | clip"),
        (dict(progfed={"max_samples": -5.0}), "progfed.max_samples", "positive number or empty"),
        (dict(progfed={"round_timeout_s": 0.0}), "progfed.round_timeout_s", "positive number of seconds"),
        (dict(progfed={"round_deadline_s": 0.0}), "progfed.round_deadline_s", "positive number of seconds"),
        (dict(progfed={"round_deadline_s": -1.0}), "progfed.round_deadline_s", "positive number of seconds"),
        (dict(progfed={"round_timeout_s": 30.0, "round_deadline_s": 30.0}), "progfed.round_deadline_s",
         "fewer seconds than the round timeout progfed_args.progfed_round_timeout_s (30.0 s)"),
        (dict(training_type="cross_silo", progfed={"round_deadline_s": CROSS_SILO_ROUND_TIMEOUT_S + 1}),
         "progfed.round_deadline_s", f"({CROSS_SILO_ROUND_TIMEOUT_S} s)"),  # the effective timeout, not the empty key
        (dict(progfed={"client_dropout": 1.0}), "progfed.client_dropout", "a probability in [0, 1)"),
        (dict(progfed={"client_dropout": -0.1}), "progfed.client_dropout", "a probability in [0, 1)"),
        (dict(progfed={"checkpoint_every": -1}), "progfed.checkpoint_every", "0: no checkpoints"),
        (dict(progfed={"checkpoint_keep": 0}), "progfed.checkpoint_keep", "positive integer"),
        (dict(progfed={"aggregation_weights": "median"}), "progfed.aggregation_weights", "samples | uniform"),
        (dict(progfed={"strategy": "e2e", "schedule": (2, 2)}), "progfed.schedule", "empty for strategy e2e"),
        (dict(profl={"em_window": 0, "min_rounds_per_step": 1}), "profl.em_window", "positive integer"),
        (dict(profl={"em_threshold": 1.0}), "profl.em_threshold", "(0, 1)"),
        (dict(profl={"em_threshold": 0.0}), "profl.em_threshold", "(0, 1)"),
        (dict(profl={"em_patience": 0}), "profl.em_patience", "positive integer"),
        (dict(profl={"em_sample": 0}), "profl.em_sample", "positive integer"),
        (dict(profl={"min_rounds_per_step": 0}), "profl.min_rounds_per_step", "positive integer"),
        (dict(profl={"min_rounds_per_step": 4, "max_rounds_per_step": 3}), "profl.max_rounds_per_step", "profl_min_rounds_per_step (4)"),
        (dict(profl={"max_rounds_per_step": 5}), "profl.max_rounds_per_step", "(6)"),  # the minimum defaults to em_window
        (dict(profl={"distill_lr": 0.0}), "profl.distill_lr", "positive number"),
        (dict(profl={"shrink_prefix": "fake"}), "profl.shrink_prefix", "real | basic"),
    ],
)
def test_each_range_rule_is_one_field_error(changes, field, hint):
    with pytest.raises(FieldError) as caught:
        RunConfig().replace(**changes)
    assert caught.value.field == field, caught.value
    line = explain(caught.value)  # what the user reads; other fields it cites are named by the config layer
    assert hint in line and "is not allowed; use" in line, line
    assert not line.startswith("args.")  # the config layer knows the key


@pytest.mark.parametrize(
    "changes",
    [
        dict(client_num_in_total=5, client_num_per_round=5),
        dict(client_num_in_total=1, client_num_per_round=1),
        dict(momentum=0.0, weight_decay=0.0, random_seed=0),
        dict(learning_rate=0.1, progfed={"lr_min": 0.1}),
        dict(progfed={"warmup_rounds": 0, "fedprox_mu": 0.0, "fedadam_beta1": 0.0, "checkpoint_every": 0}),
        dict(progfed={"stages": None, "server_lr": None, "max_update_norm": None, "round_timeout_s": None}),
        dict(progfed={"strategy": "e2e", "schedule": None}),
        dict(profl={"min_rounds_per_step": 3, "max_rounds_per_step": 3}),
        dict(test_fraction=0.999, base_width=1),
        dict(progfed={"client_dropout": 0.0}),
        dict(progfed={"client_dropout": 0.999}),
        dict(progfed={"round_timeout_s": 30.0, "round_deadline_s": 29.5}),
        dict(training_type="cross_silo", progfed={"round_deadline_s": CROSS_SILO_ROUND_TIMEOUT_S - 1}),
        dict(progfed={"round_deadline_s": 1e6}),  # standalone: no timeout to stay below
        dict(progfed={"tls_ca": "ca.crt", "tls_cert": "rank-{rank}.crt", "tls_key": "rank-{rank}.key"}),
        dict(progfed={"allow_insecure": True}),
    ],
)
def test_boundary_values_are_allowed(changes):
    RunConfig().replace(**changes)


def test_validate_checks_a_config_built_directly():
    config = RunConfig(comm_round=0)  # the dataclass alone does not validate; validate() is the one check
    with pytest.raises(FieldError, match="comm_round"):
        config.validate()
    with pytest.raises(FieldError) as caught:
        RunConfig(progfed=ProgFedConfig(min_clients=0), profl=ProFLConfig()).validate()
    assert caught.value.field == "progfed.min_clients"


def test_resolved_server_lr_and_round_timeout():
    assert RunConfig().progfed.resolved_server_lr == 1.0
    assert RunConfig().replace(progfed={"optimizer": "fedadam"}).progfed.resolved_server_lr == 0.01
    assert RunConfig().replace(progfed={"optimizer": "fedadam", "server_lr": 0.5}).progfed.resolved_server_lr == 0.5
    assert RunConfig().round_timeout_s is None  # standalone: wait as long as the round takes
    assert RunConfig(training_type="cross_silo").round_timeout_s == CROSS_SILO_ROUND_TIMEOUT_S
    assert RunConfig(training_type="cross_silo").replace(progfed={"round_timeout_s": 5.0}).round_timeout_s == 5.0


@pytest.mark.parametrize(
    "given,missing",
    [
        ({"tls_ca": "ca.crt", "tls_cert": "c.crt"}, ["tls_key"]),
        ({"tls_ca": "ca.crt", "tls_key": "k.key"}, ["tls_cert"]),
        ({"tls_key": "k.key"}, ["tls_ca", "tls_cert"]),
    ],
)
def test_tls_files_are_all_three_or_none_and_the_error_names_the_missing_ones(given, missing):
    with pytest.raises(FieldError) as caught:
        RunConfig().replace(progfed=given)
    assert caught.value.field == f"progfed.{missing[0]}"
    line = explain(caught.value)
    assert line.startswith(f"comm_args.progfed_{missing[0]}: not set")  # where users write them
    for name in ("tls_ca", "tls_cert", "tls_key"):
        assert (f"nor comm_args.progfed_{name}" in line) == (name in missing[1:]), line
        assert (f"comm_args.progfed_{name}" in line.split("while")[1].split(";")[0]) == (name in given), line
    assert "`fedml-progfed provision --cf CONFIG --out DIR` writes them" in line


def test_new_keys_default_to_off():
    p = RunConfig().progfed
    assert (p.client_dropout, p.round_deadline_s, p.tls_ca, p.tls_cert, p.tls_key, p.allow_insecure) == (
        0.0, None, None, None, None, False)
