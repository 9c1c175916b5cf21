"""Tests of the staged 3D U-Net (ProgFed Sec. 3.1 "Extension to U-nets", Fig. 1(b), Sec. 4.3).

Tiny widths and 16x16x32 volumes keep the file fast on a shared CPU (16^3
would leave a 1x1x1 bottleneck, which instance norm cannot normalise); the
full-width model is only built and counted, never run.
"""

from __future__ import annotations

import pytest
import torch

from fedml_progfed.core.staged_model import (
    active_names,
    count_parameters,
    grow,
    initialize,
    set_trainable,
)
from fedml_progfed.algorithms import ProgFed, RoundPlan, training_settings
from fedml_progfed.config import RunConfig, explain
from fedml_progfed.errors import ConfigError
from fedml_progfed.models import build_model, default_stages
from fedml_progfed.models.unet3d import DEFAULT_BASE_WIDTH, UNet3D, build_unet3d

SHAPE = (4, 16, 16, 32)
CLASSES = 3
TINY = 4
FULL_WIDTH_PARAMS = 9_727_035  # base width 21, 4 -> 3 channels; paper: 9,451,567 (+2.9 %)


def tiny(growth: str = "symmetric", bridge: str = "skip", num_stages: int = 4) -> UNet3D:
    return build_unet3d(SHAPE, CLASSES, num_stages, base_width=TINY, growth=growth, bridge=bridge)


def _counts(model: UNet3D) -> list[int]:
    return [count_parameters(model, s) for s in range(1, model.num_stages + 1)]


@pytest.fixture(scope="module")
def volume() -> torch.Tensor:
    return torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("growth", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("bridge", ["skip", "zeros"])
def test_every_stage_outputs_full_resolution(growth: str, bridge: str, volume: torch.Tensor) -> None:
    model = initialize(tiny(growth, bridge), seed=0)
    with torch.no_grad():
        for stage in range(1, 5):
            out = model.forward_stage(volume, stage)
            assert out.shape == (2, CLASSES, *SHAPE[1:])
            assert torch.isfinite(out).all()


def test_registered_with_paper_defaults() -> None:
    assert default_stages("unet3d") == 4
    model = build_model("unet3d", SHAPE, CLASSES, base_width=TINY)
    assert isinstance(model, UNet3D)
    assert model.num_stages == 4 and model.growth == "symmetric" and model.bridge == "skip"
    assert model.widths == (4, 8, 16, 32, 64)
    other = build_model("unet3d", SHAPE, CLASSES, base_width=TINY, growth="asymmetric", bridge="zeros")
    assert (other.growth, other.bridge) == ("asymmetric", "zeros")


def test_module_names_are_stable() -> None:
    keys = set(tiny("asymmetric").state_dict())
    for name in (
        "enc.0.conv1.weight",
        "enc.3.norm2.bias",
        "bottleneck.conv2.weight",
        "up.3.weight",
        "dec.3.conv1.weight",
        "dec.0.norm1.weight",
        "head.weight",
        "temp_heads.0.conv.weight",
        "temp_heads.2.conv.bias",
    ):
        assert name in keys
    assert not any(k.startswith("temp_heads") for k in tiny("symmetric").state_dict())


def test_symmetric_stages_grow_from_the_outside() -> None:
    model = tiny("symmetric")
    counts = _counts(model)
    assert all(a < b for a, b in zip(counts, counts[1:])), counts
    assert counts[0] * 50 < counts[3], counts
    assert counts[3] == sum(p.numel() for p in model.parameters())
    assert model.new_modules(1) == ("enc.0", "dec.0", "head")
    assert model.new_modules(2) == ("enc.1", "up.0", "dec.1")
    assert model.new_modules(4) == ("enc.3", "bottleneck", "up.2", "up.3", "dec.3")
    for stage in range(1, 5):
        assert "head.weight" in active_names(model, stage)


def test_asymmetric_starts_from_the_whole_encoder() -> None:
    model = tiny("asymmetric")
    first = set(active_names(model, 1))
    encoder = {k for k in model.state_dict() if k.startswith(("enc.", "bottleneck."))}
    assert encoder <= first
    assert "dec.3.conv1.weight" in first and "dec.2.conv1.weight" not in first
    assert "temp_heads.0.conv.weight" in first
    for stage in range(1, 5):
        names = active_names(model, stage)
        assert ("head.weight" in names) == (stage == 4)
        temps = {k.split(".")[1] for k in names if k.startswith("temp_heads.")}
        assert temps == (set() if stage == 4 else {str(stage - 1)})
    counts = _counts(model)
    assert counts[3] == count_parameters(tiny("symmetric"), 4)
    assert counts[0] > 0.8 * counts[3]
    assert model.new_modules(4) == ("up.0", "dec.0", "head")


def test_every_module_enters_once() -> None:
    for growth in ("symmetric", "asymmetric"):
        model = tiny(growth)
        entering = [name for s in range(1, 5) for name in model.new_modules(s)]
        assert len(entering) == len(set(entering))
        top = {name for name, module in model.named_children() if any(True for _ in module.parameters())}
        covered = {n.split(".")[0] for n in entering}
        assert covered == top
        params = {n for n, _ in model.named_parameters()}
        reached = {n for n in params if any(n.startswith(e + ".") for e in entering)}
        assert reached == params


def test_bridge_changes_only_the_innermost_decoder_input(volume: torch.Tensor) -> None:
    skip = initialize(tiny(bridge="skip"), seed=1)
    zeros = initialize(tiny(bridge="zeros"), seed=1)
    with torch.no_grad():
        assert not torch.allclose(skip.forward_stage(volume, 1), zeros.forward_stage(volume, 1))
        assert torch.equal(skip.forward_stage(volume, 4), zeros.forward_stage(volume, 4))
    # with zeros, the up-path half of the innermost level's first convolution gets no gradient
    zeros.forward_stage(volume, 2).sum().backward()
    grad = zeros.dec[1].conv1.weight.grad
    assert grad is not None
    assert torch.count_nonzero(grad[:, : zeros.widths[1]]) == 0
    assert torch.count_nonzero(grad[:, zeros.widths[1] :]) > 0


def test_inactive_modules_get_no_gradient(volume: torch.Tensor) -> None:
    model = initialize(tiny(), seed=2)
    model.forward_stage(volume, 2).sum().backward()
    active = set(active_names(model, 2))
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in active), name


def test_initialize_and_grow_are_deterministic() -> None:
    for growth in ("symmetric", "asymmetric"):
        states = []
        for global_seed in (0, 123):
            torch.manual_seed(global_seed)  # the global RNG must not matter
            model = initialize(tiny(growth), seed=5)
            assert model.stage == 1
            before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("enc.0.")}
            assert grow(model, 2, seed=5) == list(model.new_modules(2))
            entered = grow(model, 4, seed=5)
            assert entered == [*model.new_modules(3), *model.new_modules(4)]
            assert model.stage == 4
            assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
            states.append(model.state_dict())
        assert list(states[0]) == list(states[1])
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    other = initialize(tiny(), seed=6).state_dict()
    first = initialize(tiny(), seed=5).state_dict()
    assert not torch.equal(first["enc.0.conv1.weight"], other["enc.0.conv1.weight"])


def test_warmup_trains_exactly_the_entering_modules() -> None:
    for growth in ("symmetric", "asymmetric"):
        model = initialize(tiny(growth), seed=0)
        grow(model, 2, seed=0)
        config = RunConfig().replace(comm_round=8, progfed={"warmup_rounds": 0})
        progfed = ProgFed(config.progfed, training_settings(config), 4, task=None)
        warm = progfed.layout(model, RoundPlan(round=1, stage=2, lr=0.1, warmup=True))
        names = set(set_trainable(model, warm.trainable, warm.frozen_modules))
        entering = model.new_modules(2)
        expected = {n for n, _ in model.named_parameters() if any(n.startswith(e + ".") for e in entering)}
        assert names == expected and names
        assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
        full = progfed.layout(model, RoundPlan(round=1, stage=2, lr=0.1))
        assert set(full.trainable) == {n for n, _ in model.named_parameters() if n in set(active_names(model, 2))}


def test_single_stage_is_the_full_model(volume: torch.Tensor) -> None:
    one = tiny(num_stages=1)
    assert one.num_stages == 1
    assert count_parameters(one, 1) == count_parameters(tiny(), 4)
    assert one.new_modules(1) == one.stage_modules(1)
    with torch.no_grad():
        assert one(volume).shape == (2, CLASSES, *SHAPE[1:])


@pytest.mark.parametrize("stages", [2, 3, 5, 0, True])
def test_other_stage_counts_are_rejected(stages: object) -> None:
    with pytest.raises(ConfigError) as info:
        build_model("unet3d", SHAPE, CLASSES, num_stages=stages, base_width=TINY)  # type: ignore[arg-type]
    assert explain(info.value).startswith("progfed_args.progfed_stages: ")


@pytest.mark.parametrize("shape", [(4, 24, 16, 32), (4, 16, 16, 8), (4, 16, 16, 16)])
def test_sizes_not_divisible_by_16_are_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        build_model("unet3d", shape, CLASSES, base_width=TINY)
    assert explain(info.value).startswith("model_args.model: unet3d") and str(shape) in str(info.value)


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ConfigError, match="input shape"):
        build_model("unet3d", (4, 16, 16), CLASSES)
    with pytest.raises(ConfigError, match="growth"):
        build_model("unet3d", SHAPE, CLASSES, growth="inwards")
    with pytest.raises(ConfigError, match="bridge"):
        build_model("unet3d", SHAPE, CLASSES, bridge="ones")
    with pytest.raises(ConfigError, match="base_width"):
        build_model("unet3d", SHAPE, CLASSES, base_width=0)
    with pytest.raises(ConfigError, match="does not take"):
        build_model("unet3d", SHAPE, CLASSES, depth=6)
    with pytest.raises(ConfigError, match="does not take"):
        build_model("convnet", (3, 32, 32), 10, base_width=8)
    with pytest.raises(ValueError, match="divisible by 16"):
        tiny().forward_stage(torch.zeros(1, 4, 8, 16, 32), 4)


def test_full_width_matches_the_reported_count() -> None:
    assert DEFAULT_BASE_WIDTH == 21
    for growth in ("symmetric", "asymmetric"):
        model = build_model("unet3d", (4, 128, 128, 128), CLASSES, growth=growth)  # built, never run
        assert count_parameters(model, 4) == FULL_WIDTH_PARAMS
    assert abs(FULL_WIDTH_PARAMS - 9_451_567) / 9_451_567 < 0.03
