"""Memory budgets have their own section, U-Net options are model options; the old places name the new one."""

from __future__ import annotations

import pytest

from fedml_progfed.config import RunConfig, explain, name_fields
from fedml_progfed.errors import FieldError


#: Old flat key -> the key users now write.
MOVED = {
    "profl_memory_budgets": "memory_args.memory_budgets", "profl_memory_estimator": "memory_args.memory_estimator",
    "progfed_growth": "model_args.unet_growth", "progfed_unet_bridge": "model_args.unet_bridge",
}


@pytest.mark.parametrize("old,new", MOVED.items())
def test_a_moved_key_is_one_error_naming_its_new_place(old, new):
    with pytest.raises(FieldError) as err:
        RunConfig.from_flat({old: "x"})
    message = explain(err.value)
    assert message.endswith(f"this key moved; set {new} instead"), message


def test_the_new_places_reach_their_fields():
    config = RunConfig.from_flat({"memory_budgets": "uniform-mb:20:60", "memory_estimator": "analytic",
                                  "unet_growth": "asymmetric", "unet_bridge": "zeros"})
    assert config.memory.budgets == "uniform-mb:20:60" and config.memory.estimator == "analytic"
    assert config.model_options() == {"growth": "asymmetric", "bridge": "zeros"}
    with pytest.raises(FieldError) as err:
        RunConfig.from_flat({"memory_estimator": "guessed"})
    assert explain(err.value).startswith("memory_args.memory_estimator: 'guessed' is not allowed")


def test_field_references_in_a_lower_layers_text_become_yaml_keys():
    assert name_fields("raise {comm_round} or set {profl.max_rounds_per_step}") == (
        "raise train_args.comm_round or set profl_args.profl_max_rounds_per_step"
    )
    assert name_fields("{memory.budgets} and {unet_growth}") == "memory_args.memory_budgets and model_args.unet_growth"
    # braces that name no field are left alone, so a message quoting a dict survives
    assert name_fields("plan {'round': 3} and {nothing.here}") == "plan {'round': 3} and {nothing.here}"
