"""Staged-model surgery: extract/merge by name, growth, freezing (ProgFed Alg. 1)."""

import copy

import pytest
import torch

from fedml_progfed.core.staged_model import (
    active_names,
    check_layout,
    copy_state,
    grow,
    initialize,
    load_state,
    set_trainable,
)
from fedml_progfed.errors import InvalidUpdateError
from fedml_progfed.models import build_model


def tiny(seed=0, name="convnet"):
    return initialize(build_model(name, (1, 28, 28), 10, 4), seed)


def test_active_names_are_blocks_up_to_stage_plus_its_head():
    model = tiny()
    for stage in range(1, 5):
        prefixes = {n.split(".")[0] + "." + n.split(".")[1] for n in active_names(model, stage)}
        assert prefixes == {f"blocks.{i}" for i in range(stage)} | {f"heads.{stage - 1}"}


def test_extract_merge_round_trip_by_name():
    source, target = tiny(seed=1), tiny(seed=2)
    for stage in range(1, 5):
        state = copy_state(source, active_names(source, stage))
        assert list(state) == active_names(source, stage)
        load_state(target, state, active_names(target, stage))
        merged = target.state_dict()
        for name, value in state.items():
            assert torch.equal(merged[name], value)
    # extracted tensors are copies: changing them does not touch the model
    state = copy_state(source, active_names(source, 1))
    next(iter(state.values())).add_(1.0)
    assert not torch.equal(next(iter(state.values())), source.state_dict()[next(iter(state))])


def test_growth_keeps_trained_blocks_bit_identical_and_drops_old_head():
    model = tiny()
    with torch.no_grad():  # pretend stage 1 trained
        for p in model.parameters():
            p.add_(0.123)
    before = copy.deepcopy(model.state_dict())
    entered = grow(model, 2, seed=0)
    assert entered == ["blocks.1", "heads.1"]
    after = model.state_dict()
    for name in before:
        if name.startswith("blocks.0"):
            assert torch.equal(after[name], before[name]), name
    assert not any(n.startswith("heads.0") for n in active_names(model, 2))
    # entering modules were re-initialised (the +0.123 is gone) ...
    assert not torch.equal(after["blocks.1.0.weight"], before["blocks.1.0.weight"])
    # ... deterministically: a fresh model grown with the same seed agrees exactly
    twin = tiny()
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.5)
    grow(twin, 2, seed=0)
    for name in ("blocks.1.0.weight", "heads.1.2.weight"):
        assert torch.equal(twin.state_dict()[name], after[name])
    with pytest.raises(InvalidUpdateError, match="shrink"):
        grow(model, 1, seed=0)


def test_growth_init_equals_end_to_end_init():
    """Same seed: the block entering at growth equals the e2e model's block at round 0."""
    e2e, prog = tiny(seed=3), tiny(seed=3)
    with torch.no_grad():
        for p in prog.parameters():
            p.mul_(0.0)
    grow(prog, 3, seed=3)
    for name in ("blocks.1.0.weight", "blocks.2.0.bias", "heads.2.2.weight"):
        assert torch.equal(prog.state_dict()[name], e2e.state_dict()[name])


def test_set_trainable_trains_exactly_the_named_parameters():
    model = tiny()
    grow(model, 3, seed=0)
    wanted = {n for n, _ in model.named_parameters() if n.startswith(("blocks.2", "heads.2"))}
    trainable = set(set_trainable(model, wanted, frozen_modules=("blocks.0", "blocks.1")))
    assert trainable == wanted
    for name, param in model.named_parameters():
        assert param.requires_grad == (name in trainable)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before if n.startswith(("blocks.0", "blocks.1")))
    assert not torch.equal(before["blocks.2.0.weight"], after["blocks.2.0.weight"])


def test_frozen_modules_hold_normalisation_statistics_but_keep_dropout_active():
    model = initialize(build_model("vgg16", (3, 32, 32), 10, 4), 0)
    grow(model, 2, seed=0)
    set_trainable(model, [n for n, _ in model.named_parameters() if n.startswith("blocks.1")], frozen_modules=("blocks.0",))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    model(torch.randn(4, 3, 32, 32))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.0"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.1"))
    emnist = initialize(build_model("convnet_emnist", (1, 28, 28), 62, 3), 0)
    grow(emnist, 3, seed=0)
    set_trainable(emnist, [], frozen_modules=("blocks.0", "blocks.1"))
    dropouts = [m for n, m in emnist.named_modules() if isinstance(m, torch.nn.Dropout) and n.startswith("blocks.1")]
    assert dropouts and all(m.training for m in dropouts)  # as in the ProgFed reference code's warm-up


def test_check_layout_rejects_wrong_keys_and_shapes_and_a_failed_load_changes_nothing():
    model = tiny()
    names = active_names(model, 2)
    good = copy_state(model, names)
    check_layout(model, names, good, "update")
    missing = dict(good)
    missing.pop(next(iter(missing)))
    with pytest.raises(InvalidUpdateError, match="missing"):
        check_layout(model, names, missing, "update")
    extra = dict(good, **{"heads.0.2.weight": torch.zeros(10, 32)})
    with pytest.raises(InvalidUpdateError, match="unexpected"):
        check_layout(model, names, extra, "update")
    shaped = dict(good)
    shaped["blocks.1.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(InvalidUpdateError, match="has shape"):
        check_layout(model, names, shaped, "update")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidUpdateError):
        load_state(model, shaped, names)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
