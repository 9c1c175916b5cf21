"""VGG-16 / VGG-19 with batch norm, CIFAR style (ProgFed Sec. 4.1, App. B).

The network is cut at its five max-pooling layers into five units; at the
paper's ``S = 4`` the first two form ``E_1`` and the others ``E_2..E_4``
(App. B, "Architectures"). The classifier ``G_S`` is one linear layer on the
flattened features, as in the CIFAR VGGs of DeVries & Taylor (2017).

``width_ratio`` (:data:`~fedml_progfed.models.registry.WIDTH`, HeteroFL) scales every
convolution's channels to ``scaled(w, r)``; the classifier reads the flattened features
channel-major, so its leading inputs are the leading channels and slices nest.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from fedml_progfed.core.staged_model import SequentialStagedModel, group_units
from fedml_progfed.core.width import scaled
from fedml_progfed.errors import FieldError
from fedml_progfed.models.registry import PROFL, WIDTH, check_width_ratio, register_model

#: Convolution widths of each pooling group.
VGG_GROUPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}

#: Each pooling group halves the resolution, so inputs need 2**5 pixels per side.
MIN_SIDE = 2 ** 5


def _group(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """One pooling group: (conv3x3 pad 1, BN, ReLU) per width, then 2x2 max pooling (ProgFed App. B)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def build_vgg(
    name: str, input_shape: tuple[int, ...], num_classes: int, num_stages: int, width_ratio: float = 1.0
) -> SequentialStagedModel:
    """Staged VGG ``name`` (``vgg16`` or ``vgg19``) with one unit per pooling group (ProgFed App. B).

    Parameters
    ----------
    name
        Key of :data:`VGG_GROUPS`.
    input_shape
        ``(C, H, W)`` with ``H, W >= 32``.
    num_classes
        Logits of every head.
    num_stages
        ``S`` in ``1..5``; the front groups merge into ``E_1`` when ``S < 5``.
    width_ratio
        HeteroFL's model rate in ``(0, 1]``: every convolution width ``w`` becomes ``scaled(w, r)``.

    Returns
    -------
    SequentialStagedModel
        The staged VGG.

    Raises
    ------
    FieldError
        If the input is smaller than 32x32, or ``width_ratio`` is not in ``(0, 1]``.
    """
    ratio = check_width_ratio(width_ratio)
    channels, height, width = input_shape
    if height < MIN_SIDE or width < MIN_SIDE:
        raise FieldError(
            "model", f"{name} needs inputs of at least {MIN_SIDE}x{MIN_SIDE} pixels (it pools "
            f"five times), got input shape {tuple(input_shape)}; use convnet or resnet18 for smaller images"
        )
    units: list[nn.Module] = []
    for full_widths in VGG_GROUPS[name]:
        widths = [scaled(w, ratio) for w in full_widths]
        units.append(_group(channels, widths))
        channels = widths[-1]
    features = channels * (height // MIN_SIDE) * (width // MIN_SIDE)
    head = nn.Sequential(nn.Flatten(), nn.Linear(features, num_classes))
    return SequentialStagedModel(group_units(units, num_stages, name), head, input_shape, num_classes)


@register_model("vgg16", default_stages=4, capabilities=(PROFL, WIDTH))
def build_vgg16(
    input_shape: tuple[int, ...], num_classes: int, num_stages: int, width_ratio: float = 1.0
) -> SequentialStagedModel:
    """VGG-16-BN staged by pooling groups (ProgFed Sec. 4.1, App. B); ``width_ratio`` as :func:`build_vgg`."""
    return build_vgg("vgg16", input_shape, num_classes, num_stages, width_ratio)


@register_model("vgg19", default_stages=4, capabilities=(PROFL, WIDTH))
def build_vgg19(
    input_shape: tuple[int, ...], num_classes: int, num_stages: int, width_ratio: float = 1.0
) -> SequentialStagedModel:
    """VGG-19-BN staged by pooling groups (ProgFed Sec. 4.1, App. B); ``width_ratio`` as :func:`build_vgg`."""
    return build_vgg("vgg19", input_shape, num_classes, num_stages, width_ratio)
