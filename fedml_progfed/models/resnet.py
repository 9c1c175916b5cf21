"""ResNet-18 / ResNet-152 with group normalisation, CIFAR stem (ProgFed Sec. 4.1, App. B), and a small ResNet for ProFL.

Batch norm is replaced by group norm following Hsieh et al. (2020), as the
paper does for every ResNet. The network has the conventional five
components conv1, conv2_x, ..., conv5_x; at the paper's ``S = 4`` conv1 and
conv2_x form ``E_1`` (App. B, "Architectures"). The stem is the CIFAR one of
DeVries & Taylor (2017): a 3x3 stride-1 convolution and no max pooling.

``resnet34_small`` is the ProFL authors' [3, 4, 6, 3] layout (ProFL spec Sec. 0) at
base width 16, small enough to train on two CPU cores. Every builder takes
``base_width`` (the ``base_width`` model option), the width of the stem and conv2_x,
and ``width_ratio`` (:data:`~fedml_progfed.models.registry.WIDTH`, HeteroFL): every
stage width ``w`` becomes ``scaled(w, r, GN_GROUPS)``, rounded up to a multiple of the
group-norm groups so the narrowest models still build. Channels nest as leading slices
(identity shortcuts add channel ``i`` to channel ``i``), though group norm's groups
then span different channels at different widths.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from fedml_progfed.core.staged_model import SequentialStagedModel, group_units
from fedml_progfed.core.width import scaled
from fedml_progfed.errors import FieldError
from fedml_progfed.models.registry import PROFL, WIDTH, check_width_ratio, register_model

#: Groups of every GroupNorm layer (Hsieh et al., 2020 use 2).
GN_GROUPS = 2

BlockFactory = Callable[[int, int, int], "ResidualBlock"]

#: Output width of conv2_x .. conv5_x (before the bottleneck expansion) at the paper's base width 64.
STAGE_WIDTHS = (64, 128, 256, 512)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm standing in for BatchNorm (ProgFed Sec. 4.1; Hsieh et al., 2020)."""
    return nn.GroupNorm(GN_GROUPS, channels)


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free 'same' convolution, as every ResNet convolution (He et al., 2016)."""
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)


class ResidualBlock(nn.Module):
    """``relu(body(x) + shortcut(x))`` with a projection shortcut when the shape changes (ProgFed App. B).

    Parameters
    ----------
    body
        The residual branch (its last layer is a norm, no activation).
    in_channels, out_channels, stride
        Used to decide whether the shortcut needs a 1x1 projection.
    """

    def __init__(self, body: nn.Sequential, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = body
        self.shortcut: nn.Module = (
            nn.Sequential(_conv(in_channels, out_channels, 1, stride), _norm(out_channels))
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum followed by ReLU."""
        return self.relu(self.body(x) + self.shortcut(x))


def basic_block(in_channels: int, width: int, stride: int) -> ResidualBlock:
    """Two 3x3 convolutions (ResNet-18/34 block; He et al., 2016); output width ``width``."""
    body = nn.Sequential(
        _conv(in_channels, width, 3, stride), _norm(width), nn.ReLU(),
        _conv(width, width, 3), _norm(width),
    )
    return ResidualBlock(body, in_channels, width, stride)


def bottleneck_block(in_channels: int, width: int, stride: int) -> ResidualBlock:
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4 (ResNet-50+ block; He et al., 2016)."""
    out = 4 * width
    body = nn.Sequential(
        _conv(in_channels, width, 1), _norm(width), nn.ReLU(),
        _conv(width, width, 3, stride), _norm(width), nn.ReLU(),
        _conv(width, out, 1), _norm(out),
    )
    return ResidualBlock(body, in_channels, out, stride)


def build_resnet(
    name: str,
    block: BlockFactory,
    expansion: int,
    depths: Sequence[int],
    input_shape: tuple[int, ...],
    num_classes: int,
    num_stages: int,
    base_width: int = STAGE_WIDTHS[0],
    width_ratio: float = 1.0,
) -> SequentialStagedModel:
    """Staged CIFAR ResNet with units conv1, conv2_x..conv5_x (ProgFed App. B).

    Parameters
    ----------
    name
        Model name, for error messages.
    block
        :func:`basic_block` or :func:`bottleneck_block`.
    expansion
        Output width / ``width`` of ``block`` (1 or 4).
    depths
        Number of blocks in conv2_x..conv5_x.
    input_shape
        ``(C, H, W)``.
    num_classes
        Logits of every head.
    num_stages
        ``S`` in ``1..5``; the front units merge into ``E_1`` when ``S < 5``.
    base_width
        Width of the stem and conv2_x; conv3_x..conv5_x double it at each stage, as
        :data:`STAGE_WIDTHS` does from 64 (a width multiplier, Zagoruyko & Komodakis, 2016).
    width_ratio
        HeteroFL's model rate in ``(0, 1]``: each width above (stem included) becomes
        ``scaled(w, r, GN_GROUPS)``; ``base_width`` stays the full model's.

    Returns
    -------
    SequentialStagedModel
        The staged ResNet; ``G_S`` is global average pooling, flatten and a linear layer.

    Raises
    ------
    FieldError
        ``base_width``: not a positive multiple of :data:`GN_GROUPS`; ``width_ratio``: not in ``(0, 1]``.
    """
    if not isinstance(base_width, int) or base_width < GN_GROUPS or base_width % GN_GROUPS:
        # Every width is a multiple of base_width; group norm needs it divisible by its groups.
        raise FieldError("base_width", f"{name} needs a multiple of {GN_GROUPS} (group norm groups), got {base_width!r}")
    ratio = check_width_ratio(width_ratio)
    widths = [scaled(base_width * w // STAGE_WIDTHS[0], ratio, GN_GROUPS) for w in STAGE_WIDTHS]
    stem = widths[0]  # the stem has conv2_x's width, scaled alike
    units: list[nn.Module] = [nn.Sequential(_conv(input_shape[0], stem, 3), _norm(stem), nn.ReLU())]
    channels = stem
    for index, (width, depth) in enumerate(zip(widths, depths)):
        blocks: list[nn.Module] = []
        for position in range(depth):
            stride = 2 if index > 0 and position == 0 else 1
            blocks.append(block(channels, width, stride))
            channels = width * expansion
        units.append(nn.Sequential(*blocks))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
    return SequentialStagedModel(group_units(units, num_stages, name), head, input_shape, num_classes)


@register_model("resnet18", default_stages=4, capabilities=(PROFL, WIDTH))
def build_resnet18(
    input_shape: tuple[int, ...],
    num_classes: int,
    num_stages: int,
    base_width: int = STAGE_WIDTHS[0],
    width_ratio: float = 1.0,
) -> SequentialStagedModel:
    """ResNet-18-GN, [2, 2, 2, 2] basic blocks (ProgFed Sec. 4.1, App. B); ``base_width`` 64 as in the paper."""
    return build_resnet(
        "resnet18", basic_block, 1, (2, 2, 2, 2), input_shape, num_classes, num_stages, base_width, width_ratio
    )


@register_model("resnet152", default_stages=4, capabilities=(PROFL, WIDTH))
def build_resnet152(
    input_shape: tuple[int, ...],
    num_classes: int,
    num_stages: int,
    base_width: int = STAGE_WIDTHS[0],
    width_ratio: float = 1.0,
) -> SequentialStagedModel:
    """ResNet-152-GN, [3, 8, 36, 3] bottleneck blocks (ProgFed Sec. 4.1, App. B); ``base_width`` 64 as in the paper."""
    return build_resnet(
        "resnet152", bottleneck_block, 4, (3, 8, 36, 3), input_shape, num_classes, num_stages, base_width, width_ratio
    )


#: Base width of ``resnet34_small``: a quarter of the paper's 64, so a local epoch runs in seconds on 2 CPU cores.
SMALL_BASE_WIDTH = 16


@register_model("resnet34_small", default_stages=4, capabilities=(PROFL, WIDTH))
def build_resnet34_small(
    input_shape: tuple[int, ...],
    num_classes: int,
    num_stages: int,
    base_width: int = SMALL_BASE_WIDTH,
    width_ratio: float = 1.0,
) -> SequentialStagedModel:
    """The ProFL authors' CIFAR ResNet at a quarter of its width: [3, 4, 6, 3] basic blocks, widths 16..128.

    ProFL's release (spec Sec. 0, "Model note") calls its model ``ResNet18_4`` but builds
    the [3, 4, 6, 3] (ResNet-34) layout, split into the stem + ``layer1``, ``layer2``,
    ``layer3``, ``layer4`` + the head: the four blocks here at ``S = 4``. Its deeper later
    stages hold a larger share of the training memory than ResNet-18's [2, 2, 2, 2]: on
    3x32x32 at batch 64, ProFL's ``grow 1`` (the stem and ``layer1`` at full resolution,
    its costliest step) peaks at 0.48 of the full model's training step, against 0.60 for
    ResNet-18 at the same width (CPU allocations, each counted once). Group norm and the
    CIFAR stem as :func:`build_resnet`; 1,334,618 parameters on 3x32x32 with 10 classes.
    ``width_ratio`` as :func:`build_resnet` (at 1/16 the stage widths are 2, 2, 4, 8).
    """
    return build_resnet(
        "resnet34_small", basic_block, 1, (3, 4, 6, 3), input_shape, num_classes, num_stages, base_width, width_ratio
    )
