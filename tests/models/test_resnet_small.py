"""``resnet34_small``: the ProFL authors' [3, 4, 6, 3] CIFAR ResNet at base width 16 (ProFL spec Sec. 0)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedml_progfed.algorithms import build_algorithm
from fedml_progfed.config import RunConfig, explain
from fedml_progfed.core.staged_model import count_parameters, initialize
from fedml_progfed.errors import ConfigError
from fedml_progfed.models import PROFL, build_model, default_stages, model_entry
from fedml_progfed.models.resnet import ResidualBlock
from fedml_progfed.tasks.classification import ClassificationTask

NAME = "resnet34_small"
CIFAR, MNIST = (3, 32, 32), (1, 28, 28)


@pytest.mark.parametrize(
    "shape,features",
    [
        (CIFAR, [(16, 32, 32), (32, 16, 16), (64, 8, 8), (128, 4, 4)]),
        (MNIST, [(16, 28, 28), (32, 14, 14), (64, 7, 7), (128, 4, 4)]),
    ],
)
def test_every_stage_runs_on_28_and_32_pixel_images(shape: tuple[int, ...], features: list[tuple[int, ...]]) -> None:
    model = build_model(NAME, shape, 10)
    assert [tuple(f) for f in model.feature_shapes(shape)] == features
    x = torch.randn(2, *shape)
    assert all(model.forward_stage(x, s).shape == (2, 10) for s in range(1, 5))


def test_four_blocks_as_the_authors_split_theirs() -> None:
    """Stem + layer1, layer2, layer3, layer4 (+ head), with [3, 4, 6, 3] basic blocks."""
    model = build_model(NAME, CIFAR, 10)
    assert model.num_stages == default_stages(NAME) == 4
    stem, layer1 = model.blocks[0]
    assert isinstance(stem[0], nn.Conv2d) and stem[0].stride == (1, 1)  # CIFAR stem, no pooling
    layers = [layer1, *model.blocks[1:]]
    assert [len(layer) for layer in layers] == [3, 4, 6, 3]
    assert all(isinstance(b, ResidualBlock) for layer in layers for b in layer)
    assert count_parameters(model, 4) == 1_334_618


def test_registered_for_profl_and_width_is_an_option() -> None:
    assert PROFL in model_entry(NAME).capabilities
    assert count_parameters(build_model(NAME, CIFAR, 10, base_width=8), 4) < 1_334_618 / 3
    # The same option gives ResNet-18 at a quarter width; 64 stays the paper's default.
    assert count_parameters(build_model("resnet18", CIFAR, 10, base_width=16), 4) == 701_466
    with pytest.raises(ConfigError) as err:
        build_model(NAME, CIFAR, 10, base_width=7)
    assert explain(err.value).startswith("model_args.base_width: resnet34_small needs a multiple of 2")


def test_profl_attaches_one_conv_basic_layer_per_block() -> None:
    """ProFL spec Sec. 0: a basic layer is one bias-free 3x3 conv with the block's stride and channel change."""
    config = RunConfig().replace(model=NAME, comm_round=200, progfed={"strategy": "profl"})
    algorithm = build_algorithm(config, 4, ClassificationTask())
    model = initialize(build_model(NAME, MNIST, 10), 0)
    algorithm.prepare_model(model)
    convs = [layer[0] for layer in model.basic]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (1, 16, (1, 1)), (16, 32, (2, 2)), (32, 64, (2, 2)), (64, 128, (2, 2)),
    ]
    assert all(c.bias is None for c in convs)
    # 7x7 -> 4x4 is reached by the stride-2 conv alone: no pooling added.
    assert all(len(layer) == 1 for layer in model.basic)
