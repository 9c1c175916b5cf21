"""Tests of the model registry and the paper's staged architectures (ProgFed Sec. 4.1, App. B)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedml_progfed.core.staged_model import SequentialStagedModel, count_parameters, initialize
from fedml_progfed.config import explain
from fedml_progfed.errors import ConfigError
from fedml_progfed.models import PROFL, available_models, build_model, default_stages, models_with, register_model
from fedml_progfed.models import resnet as resnet_module

CIFAR = (3, 32, 32)
MNIST = (1, 28, 28)

# Small input each model accepts; vgg needs 32x32 (five pools).
SMALL_INPUT = {
    "convnet": MNIST,
    "convnet_emnist": MNIST,
    "vgg16": CIFAR,
    "vgg19": CIFAR,
    "resnet18": (3, 16, 16),
    "resnet34_small": (3, 16, 16),
}


def _stage_counts(model: SequentialStagedModel) -> list[int]:
    return [count_parameters(model, s) for s in range(1, model.num_stages + 1)]


def test_available_models() -> None:
    assert available_models() == [
        "convnet", "convnet_emnist", "resnet152", "resnet18", "resnet34_small", "unet3d", "vgg16", "vgg19",
    ]


def test_default_stages_follow_the_paper() -> None:
    assert default_stages("convnet_emnist") == 3
    for name in ("convnet", "vgg16", "vgg19", "resnet18", "resnet152"):
        assert default_stages(name) == 4


def test_convnet_matches_mcmahan_cifar10_cnn() -> None:
    model = build_model("convnet", CIFAR, 10)
    assert model.num_stages == 4
    assert _stage_counts(model) == [1226, 20042, 56970, 122570]
    assert sum(p.numel() for p in model.blocks.parameters()) + sum(
        p.numel() for p in model.heads[-1].parameters()
    ) == 122570


def test_convnet_flatten_opens_fc_unit_and_runs_on_mnist() -> None:
    model = build_model("convnet", MNIST, 10)
    fc1 = model.blocks[3]
    assert isinstance(fc1[0], nn.Flatten)
    # temporary heads after conv units pool globally
    assert isinstance(model.heads[0][0], nn.AdaptiveAvgPool2d)
    out = model.forward_stage(torch.randn(2, *MNIST), 4)
    assert out.shape == (2, 10)


def test_convnet_emnist_matches_tff_cnn() -> None:
    model = build_model("convnet_emnist", MNIST, 62)
    assert model.num_stages == 3
    assert count_parameters(model, 3) == 1_206_590


@pytest.mark.parametrize("name", sorted(SMALL_INPUT))
def test_every_stage_forwards_and_grows(name: str) -> None:
    shape = SMALL_INPUT[name]
    model = build_model(name, shape, 7)
    assert model.num_stages == default_stages(name)
    model.eval()
    x = torch.randn(2, *shape)
    with torch.no_grad():
        for stage in range(1, model.num_stages + 1):
            assert model.forward_stage(x, stage).shape == (2, 7)
    counts = _stage_counts(model)
    assert all(a < b for a, b in zip(counts, counts[1:])), counts


def test_resnet152_builds_and_forwards() -> None:
    model = build_model("resnet152", CIFAR, 10)
    assert model.num_stages == 4
    model.eval()
    x = torch.randn(2, *CIFAR)
    with torch.no_grad():
        assert model.forward_stage(x, 1).shape == (2, 10)
        assert model.forward_stage(x, 4).shape == (2, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["convnet", "vgg16"])
def test_num_stages_can_be_chosen(name: str) -> None:
    units = 4 if name == "convnet" else 5
    model = build_model(name, CIFAR, 10, num_stages=units)
    assert model.num_stages == units
    one = build_model(name, CIFAR, 10, num_stages=1)
    assert one.num_stages == 1
    assert count_parameters(one, 1) == count_parameters(model, units)


@pytest.mark.parametrize("stages", [0, 5, -1, 2.0, True])
def test_stages_out_of_range(stages: object) -> None:
    with pytest.raises(ConfigError) as info:
        build_model("convnet", CIFAR, 10, num_stages=stages)  # type: ignore[arg-type]
    assert explain(info.value).startswith("progfed_args.progfed_stages: ")


def test_unknown_model_lists_available() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("alexnet", CIFAR, 10)
    message = explain(info.value)
    assert message.startswith("model_args.model: unknown model")
    assert "'alexnet'" in message
    for name in available_models():
        assert name in message
    with pytest.raises(ConfigError, match="unknown model"):
        default_stages("alexnet")


@pytest.mark.parametrize("name", ["vgg16", "vgg19"])
def test_vgg_rejects_small_inputs(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_model(name, MNIST, 10)
    assert explain(info.value).startswith("model_args.model:") and "(1, 28, 28)" in str(info.value)


def test_too_small_input_for_convnet() -> None:
    with pytest.raises(ConfigError) as info:
        build_model("convnet", (3, 8, 8), 10)
    assert explain(info.value).startswith("model_args.model: convnet cannot take inputs")


@pytest.mark.parametrize("shape", [(32, 32), (3, 0, 32), (3, 32.0, 32)])
def test_bad_input_shape(shape: tuple) -> None:
    with pytest.raises(ConfigError, match="input shape"):
        build_model("convnet", shape, 10)


def test_bad_num_classes() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("convnet", CIFAR, 0)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="model 'convnet' is registered twice"):

        @register_model("convnet", default_stages=4)
        def _again(input_shape, num_classes, num_stages):  # pragma: no cover - never built
            raise AssertionError


@pytest.mark.parametrize("name,shape", [("convnet", CIFAR), ("resnet18", (3, 16, 16)), ("vgg16", CIFAR)])
def test_seeded_initialisation_is_reproducible(name: str, shape: tuple[int, ...]) -> None:
    first = initialize(build_model(name, shape, 10), seed=3).state_dict()
    torch.manual_seed(12345)  # the global RNG must not matter
    second = initialize(build_model(name, shape, 10), seed=3).state_dict()
    assert list(first) == list(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    third = initialize(build_model(name, shape, 10), seed=4).state_dict()
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_resnet18_uses_group_norm_only() -> None:
    model = build_model("resnet18", CIFAR, 100)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == resnet_module.GN_GROUPS == 2 for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert count_parameters(model, 4) == 11_220_132  # 11,173,962 with 10 classes; 100 classes here


def test_input_channels_and_classes_are_parameters() -> None:
    model = build_model("resnet18", (1, 16, 16), 3)
    assert model.forward_stage(torch.randn(2, 1, 16, 16), 4).shape == (2, 3)
    model = build_model("vgg16", (1, 64, 48), 5)
    assert model.forward_stage(torch.randn(2, 1, 64, 48), 4).shape == (2, 5)


# --------------------------------------------------------------------------- capabilities


def test_profl_models_are_the_feed_forward_image_models() -> None:
    """The capability on each entry says what ProFL checks on the built model (blocks in a row, (C, H, W) input)."""
    assert models_with(PROFL) == ("convnet", "convnet_emnist", "resnet18", "resnet152", "resnet34_small", "vgg16", "vgg19")
    for name in available_models():
        spatial = 3 if name == "unet3d" else 2
        shape = SMALL_INPUT.get(name, (3, 32, 32) if spatial == 2 else (4, 32, 32, 32))
        model = build_model(name, shape, 3, **({"base_width": 2} if name == "unet3d" else {}))
        feed_forward = isinstance(model, SequentialStagedModel) and len(model.input_shape) == 3
        assert feed_forward == (name in models_with(PROFL)), name


def test_capabilities_are_checked_where_they_are_declared_and_asked_for() -> None:
    with pytest.raises(ValueError, match="unknown capabilities \\['pro_fl'\\]"):
        register_model("convnet_typo", default_stages=4, capabilities=("pro_fl",))
    assert "convnet_typo" not in available_models()
    with pytest.raises(ValueError, match="unknown model capability 'pro_fl'"):
        models_with("pro_fl")
