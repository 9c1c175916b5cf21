"""Small ConvNets of the federated experiments (ProgFed Sec. 4.1, App. B).

* ``convnet``: the CIFAR-10 CNN of McMahan et al. (2017) with 122,570
  parameters on 3x32x32 inputs and 10 classes (App. B, "CIFAR-10"); units
  conv1, conv2, conv3, fc1, one per stage at the default ``S = 4``.
* ``convnet_emnist``: the EMNIST CNN of the TFF benchmark (Reddi et al., 2021);
  units Conv1, Conv2, FC1 with FC2 as the final head ``G_S`` (App. B,
  "Architectures", ``S = 3``).

Temporary heads after a convolutional unit are global average pooling plus a
linear layer (Sec. 3.1), hence every ``Flatten`` opens a fully-connected unit.

Both take ``width_ratio`` (:data:`~fedml_progfed.models.registry.WIDTH`, HeteroFL):
every convolution's channels and the hidden linear units become ``scaled(w, r)``.
``fc1`` reads the flattened conv output channel-major (``C*H*W``), so its first
``C'*H*W`` inputs are exactly the first ``C'`` channels: leading slices nest.
"""

from __future__ import annotations

import torch
from torch import nn

from fedml_progfed.core.staged_model import SequentialStagedModel, group_units
from fedml_progfed.core.width import scaled
from fedml_progfed.errors import FieldError
from fedml_progfed.models.registry import PROFL, WIDTH, check_width_ratio, register_model

#: Hidden widths at ratio 1: conv1, conv2, conv3, fc1 (McMahan et al., 2017).
CONVNET_WIDTHS = (32, 64, 64, 64)
#: Hidden widths at ratio 1: Conv1, Conv2, FC1 (TFF EMNIST CNN).
EMNIST_WIDTHS = (32, 64, 128)


def flat_size(model_name: str, units: list[nn.Module], input_shape: tuple[int, ...]) -> int:
    """Number of features after ``units`` on one sample of ``input_shape`` (ProgFed App. B).

    Runs a zero probe in eval mode (no dropout RNG is consumed) and leaves the
    units in training mode, as freshly built modules are.

    Raises
    ------
    FieldError
        If the input is too small for the units' convolutions and pooling.
    """
    probe = nn.Sequential(*units).eval()
    try:
        with torch.no_grad():
            out = probe(torch.zeros(1, *input_shape))
    except RuntimeError:
        raise FieldError(
            "model", f"{model_name} cannot take inputs of shape {tuple(input_shape)}: "
            f"the image is too small for its convolutions and pooling"
        ) from None
    finally:
        probe.train()
    return out[0].numel()


@register_model("convnet", default_stages=4, capabilities=(PROFL, WIDTH))
def build_convnet(
    input_shape: tuple[int, ...], num_classes: int, num_stages: int, width_ratio: float = 1.0
) -> SequentialStagedModel:
    """CIFAR-10 ConvNet (McMahan et al., 2017) split into conv1 | conv2 | conv3 | fc1 (ProgFed App. B).

    Parameters
    ----------
    input_shape
        ``(C, H, W)``; at least 18x18 so the three unpadded convolutions fit.
    num_classes
        Logits of every head.
    num_stages
        ``S`` in ``1..4``; the front units merge into ``E_1`` when ``S < 4``.
    width_ratio
        HeteroFL's model rate in ``(0, 1]``: every hidden width ``w`` becomes ``scaled(w, r)``.

    Returns
    -------
    SequentialStagedModel
        The staged ConvNet; 122,570 parameters at the full stage on 3x32x32 / 10 classes.
    """
    ratio = check_width_ratio(width_ratio)
    c1, c2, c3, hidden = (scaled(w, ratio) for w in CONVNET_WIDTHS)
    channels = input_shape[0]
    convs: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(channels, c1, 3), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Sequential(nn.Conv2d(c2, c3, 3), nn.ReLU()),
    ]
    fc1 = nn.Sequential(nn.Flatten(), nn.Linear(flat_size("convnet", convs, input_shape), hidden), nn.ReLU())
    head = nn.Linear(hidden, num_classes)
    return SequentialStagedModel(group_units([*convs, fc1], num_stages, "convnet"), head, input_shape, num_classes)


@register_model("convnet_emnist", default_stages=3, capabilities=(PROFL, WIDTH))
def build_convnet_emnist(
    input_shape: tuple[int, ...], num_classes: int, num_stages: int, width_ratio: float = 1.0
) -> SequentialStagedModel:
    """TFF EMNIST CNN (Reddi et al., 2021) split into Conv1 | Conv2 | FC1, FC2 as ``G_S`` (ProgFed App. B).

    Parameters
    ----------
    input_shape
        ``(C, H, W)``; at least 6x6.
    num_classes
        Logits of every head (62 for EMNIST-62).
    num_stages
        ``S`` in ``1..3``.
    width_ratio
        HeteroFL's model rate in ``(0, 1]``: every hidden width ``w`` becomes ``scaled(w, r)``.

    Returns
    -------
    SequentialStagedModel
        The staged CNN; 1,206,590 parameters at the full stage on 1x28x28 / 62 classes.
    """
    ratio = check_width_ratio(width_ratio)
    c1, c2, hidden = (scaled(w, ratio) for w in EMNIST_WIDTHS)
    channels = input_shape[0]
    convs: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(channels, c1, 3), nn.ReLU()),
        nn.Sequential(nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25)),
    ]
    fc1 = nn.Sequential(
        nn.Flatten(), nn.Linear(flat_size("convnet_emnist", convs, input_shape), hidden), nn.ReLU(), nn.Dropout(0.5)
    )
    head = nn.Linear(hidden, num_classes)
    return SequentialStagedModel(
        group_units([*convs, fc1], num_stages, "convnet_emnist"), head, input_shape, num_classes
    )
