"""Staged 3D U-Net for BraTS tumour segmentation (ProgFed Sec. 3.1 "Extension to U-nets", Fig. 1(b), Sec. 4.3).

Architecture (five resolution levels, channels ``c_l = base_width * 2**(l-1)``):

* encoder levels 1..4 (``enc.0`` .. ``enc.3``): two blocks
  conv3x3x3 -> InstanceNorm3d(affine) -> LeakyReLU, then 2x max-pooling;
* level 5, the bottleneck (``bottleneck``): the same two blocks, no pooling;
* decoder levels 4..1 (``dec.3`` .. ``dec.0``): a 2x2x2 transposed convolution
  from the level below (``up.l-1`` maps ``c_{l+1} -> c_l``), concatenation
  ``[up-path, skip]`` (``2 c_l`` channels), two conv blocks back to ``c_l``;
* the head (``head``): a 1x1x1 convolution to ``num_classes`` channels at
  full resolution (logits; BraTS uses three sigmoid region channels WT/TC/ET).

The 3x3x3 convolutions carry no bias: each is followed by an instance norm that
subtracts the channel mean, so a bias would be dead weight that is still
communicated every round. Instance norm keeps no running statistics, which
suits federated averaging (nothing but weights travels).

With the default ``base_width = 21`` the full model has 9,727,035 parameters
on 4 input modalities and 3 output channels, +2.9 % from the 9,451,567 of the
3D U-Net of Sheller et al. (2020) that the paper trains (App. B, "BraTS");
width 20 would give 8,823,003 (-6.7 %).

Growth strategies (``S = 4``; ``S = 1`` is the full model for end-to-end runs):

``symmetric`` (Fig. 1(b))
    Grow from the outer levels inwards and keep the original head as every
    ``G_s``. Stage ``s < 4`` is encoder levels ``1..s``, decoder levels
    ``1..s`` (with the up-convolutions between active levels) and ``head``;
    stage 4 adds encoder level 4, the bottleneck, decoder level 4 and the two
    up-convolutions that connect them: the full model.
``asymmetric`` (the paper's baseline strategy)
    Stage 1 is the full encoder, the bottleneck, decoder level 4 and a
    temporary head; stages 2 and 3 add decoder levels 3 and 2 with their own
    temporary heads; stage 4 adds decoder level 1 and the original head.
    A temporary head (``temp_heads.s-1``) is a 1x1x1 convolution to
    ``num_classes`` followed by trilinear up-sampling to the input resolution.

The innermost active decoder level of a symmetric sub-model has nothing below
it. What fills the up-path half of its input is the ``bridge``:

``skip`` (default)
    The encoder skip itself, so the level sees ``[skip, skip]``: the decoder's
    first convolution starts on features of the right scale and statistics.
``zeros``
    Zeros, so the level sees ``[0, skip]``: the up-path weights of that
    convolution get no gradient until the level below enters.

Either way the concatenated input has the same ``2 c_l`` channels as in the
full model, so no weight changes shape when the model grows.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from fedml_progfed.core.staged_model import StagedModel
from fedml_progfed.errors import FieldError
from fedml_progfed.models.registry import register_model

LEVELS = 5
"""Resolution levels: four encoder/decoder levels and the bottleneck."""

POOLINGS = LEVELS - 1
STAGES = 4
DEFAULT_BASE_WIDTH = 21
GROWTHS = ("symmetric", "asymmetric")
BRIDGES = ("skip", "zeros")
LEAKY_SLOPE = 0.01


class ConvBlock3d(nn.Sequential):
    """Two (conv3x3x3 -> InstanceNorm3d(affine) -> LeakyReLU) blocks, ``in_channels -> out_channels``.

    Submodules are named ``conv1, norm1, act1, conv2, norm2, act2``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("conv1", nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)),
                    ("norm1", nn.InstanceNorm3d(out_channels, affine=True)),
                    ("act1", nn.LeakyReLU(LEAKY_SLOPE, inplace=True)),
                    ("conv2", nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)),
                    ("norm2", nn.InstanceNorm3d(out_channels, affine=True)),
                    ("act2", nn.LeakyReLU(LEAKY_SLOPE, inplace=True)),
                ]
            )
        )


def temporary_head(in_channels: int, num_classes: int, scale: int) -> nn.Sequential:
    """Temporary head of the asymmetric strategy: 1x1x1 conv, then trilinear up-sampling by ``scale``.

    The convolution runs before the up-sampling, on ``num_classes`` channels
    instead of ``in_channels``, so the head stays light (ProgFed Sec. 3.1).
    """
    return nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv3d(in_channels, num_classes, 1)),
                ("upsample", nn.Upsample(scale_factor=float(scale), mode="trilinear", align_corners=False)),
            ]
        )
    )


class UNet3D(StagedModel):
    """A 5-level 3D U-Net split into ``S = 4`` stages (ProgFed Sec. 3.1, Fig. 1(b)).

    See the module docstring for the layout, the two growth strategies and the
    bridge that feeds the innermost decoder level of a symmetric sub-model.

    Parameters
    ----------
    in_channels
        Input channels (4 MRI modalities for BraTS).
    num_classes
        Output channels of every head (3 region channels WT/TC/ET for BraTS).
    num_stages
        4, or 1 for the full model as a single stage (end-to-end training).
    base_width
        Channels of level 1; level ``l`` has ``base_width * 2**(l-1)``.
    growth
        ``"symmetric"`` or ``"asymmetric"``.
    bridge
        ``"skip"`` or ``"zeros"``; only used by symmetric sub-models ``s < 4``.

    Attributes
    ----------
    enc, bottleneck, up, dec, head, temp_heads
        ``enc.i`` / ``dec.i`` are encoder / decoder level ``i+1``; ``up.i``
        up-samples level ``i+2`` to level ``i+1``; ``temp_heads.i`` is the
        temporary head of asymmetric stage ``i+1`` (empty for symmetric).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_stages: int = STAGES,
        base_width: int = DEFAULT_BASE_WIDTH,
        growth: str = "symmetric",
        bridge: str = "skip",
    ) -> None:
        super().__init__(num_stages)
        self.growth = growth
        self.bridge = bridge
        widths = [base_width * 2**level for level in range(LEVELS)]
        self.widths = tuple(widths)
        self.enc = nn.ModuleList(
            ConvBlock3d(in_channels if level == 0 else widths[level - 1], widths[level]) for level in range(POOLINGS)
        )
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = ConvBlock3d(widths[POOLINGS - 1], widths[POOLINGS])
        self.up = nn.ModuleList(
            nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2) for level in range(POOLINGS)
        )
        self.dec = nn.ModuleList(ConvBlock3d(2 * widths[level], widths[level]) for level in range(POOLINGS))
        self.head = nn.Conv3d(widths[0], num_classes, 1)
        temp = []
        if growth == "asymmetric" and num_stages == STAGES:
            # stage s ends at decoder level 5 - s (index 4 - s), 2**(4 - s) below the input resolution
            temp = [temporary_head(widths[POOLINGS - s], num_classes, 2 ** (POOLINGS - s)) for s in range(1, STAGES)]
        self.temp_heads = nn.ModuleList(temp)

    # ------------------------------------------------------------------ stages

    def _full(self, stage: int) -> bool:
        return stage == self.num_stages

    def stage_modules(self, stage: int) -> tuple[str, ...]:
        """Submodules of ``M^stage``; the full model at the last stage (temporary heads excluded)."""
        if self._full(stage):
            return (
                *(f"enc.{i}" for i in range(POOLINGS)),
                "bottleneck",
                *(f"up.{i}" for i in range(POOLINGS)),
                *(f"dec.{i}" for i in range(POOLINGS)),
                "head",
            )
        if self.growth == "symmetric":
            return (
                *(f"enc.{i}" for i in range(stage)),
                *(f"up.{i}" for i in range(stage - 1)),
                *(f"dec.{i}" for i in range(stage)),
                "head",
            )
        first = POOLINGS - stage  # index of the outermost active decoder level
        return (
            *(f"enc.{i}" for i in range(POOLINGS)),
            "bottleneck",
            *(f"up.{i}" for i in range(first, POOLINGS)),
            *(f"dec.{i}" for i in range(first, POOLINGS)),
            f"temp_heads.{stage - 1}",
        )

    def new_modules(self, stage: int) -> tuple[str, ...]:
        """Submodules entering at ``stage``: those of ``M^stage`` that ``M^(stage-1)`` lacks.

        Symmetric: ``enc.0, dec.0, head`` at stage 1, then ``enc.s-1, up.s-2,
        dec.s-1``, and at stage 4 ``enc.3, bottleneck, up.2, up.3, dec.3``.
        Asymmetric: the encoder, ``bottleneck, up.3, dec.3, temp_heads.0`` at
        stage 1, then ``up.i, dec.i`` with the stage's temporary head, and at
        stage 4 ``up.0, dec.0, head``.
        """
        current = self.stage_modules(stage)
        if stage == 1:
            return current
        before = set(self.stage_modules(stage - 1))
        return tuple(name for name in current if name not in before)

    # ----------------------------------------------------------------- forward

    def _check_volume(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or not _fits(tuple(x.shape[2:])):
            raise ValueError(
                f"unet3d takes (batch, channels, depth, height, width) with depth, height and width "
                f"divisible by {2**POOLINGS} and more than one bottleneck voxel, got a tensor of shape "
                f"{tuple(x.shape)}"
            )

    def _decode_level(self, level: int, below: torch.Tensor | None, skip: torch.Tensor) -> torch.Tensor:
        """Decoder level ``level + 1`` on ``[up-path, skip]``; the bridge fills the up-path when nothing is below."""
        if below is not None:
            upward = self.up[level](below)
        elif self.bridge == "skip":
            upward = skip
        else:
            upward = torch.zeros_like(skip)
        return self.dec[level](torch.cat([upward, skip], dim=1))

    def forward_stage(self, x: torch.Tensor, stage: int) -> torch.Tensor:
        """Logits of ``M^stage`` at the input resolution, shape ``(B, num_classes, D, H, W)``."""
        self.check_stage(stage)
        self._check_volume(x)
        full = self._full(stage)
        symmetric_part = self.growth == "symmetric" and not full
        depth = stage if symmetric_part else POOLINGS
        skips: list[torch.Tensor] = []
        h = x
        for level in range(depth):
            h = self.enc[level](h)
            skips.append(h)
            if level < depth - 1 or not symmetric_part:
                h = self.pool(h)
        below: torch.Tensor | None = None if symmetric_part else self.bottleneck(h)
        if symmetric_part:
            for level in reversed(range(depth)):
                below = self._decode_level(level, below, skips[level])
            return self.head(below)
        first = 0 if full else POOLINGS - stage
        for level in reversed(range(first, POOLINGS)):
            below = self._decode_level(level, below, skips[level])
        return self.head(below) if full else self.temp_heads[stage - 1](below)


def _fits(spatial: Sequence[int]) -> bool:
    """Whether a ``(D, H, W)`` volume survives the four poolings with more than one bottleneck voxel.

    Instance norm needs more than one voxel per channel: on a 1x1x1 bottleneck
    it would erase every feature (and PyTorch refuses it).
    """
    if any(size % 2**POOLINGS for size in spatial):
        return False
    voxels = 1
    for size in spatial:
        voxels *= size // 2**POOLINGS
    return voxels > 1


def _check_options(input_shape: Sequence[int], num_stages: int, base_width: int, growth: str, bridge: str) -> None:
    shape = tuple(input_shape)
    if len(shape) != 4:
        raise FieldError(
            "model", f"unet3d expects an input shape (channels, depth, height, width), got {shape!r}"
        )
    if any(size % 2**POOLINGS for size in shape[1:]):
        raise FieldError(
            "model", f"unet3d pools {POOLINGS} times, so depth, height and width must be divisible "
            f"by {2**POOLINGS}; input shape {shape!r} is not (crop or pad the volumes)"
        )
    if not _fits(shape[1:]):
        raise FieldError(
            "model", f"unet3d's bottleneck would be 1x1x1 for input shape {shape!r} and instance "
            f"norm needs more than one voxel; use at least {2 * 2**POOLINGS} along one axis"
        )
    if isinstance(num_stages, bool) or num_stages not in (1, STAGES):
        raise FieldError(
            "progfed.stages", f"unet3d has {STAGES} stages (or 1 for the full model), got {num_stages!r}"
        )
    if isinstance(base_width, bool) or not isinstance(base_width, int) or base_width < 1:
        raise FieldError("base_width", f"unet3d needs a positive int, got {base_width!r}")
    if growth not in GROWTHS:
        raise FieldError("unet_growth", f"unet3d grows {' or '.join(GROWTHS)}, got {growth!r}")
    if bridge not in BRIDGES:
        raise FieldError("unet_bridge", f"use {' or '.join(BRIDGES)}, got {bridge!r}")


def build_unet3d(
    input_shape: Sequence[int],
    num_classes: int,
    num_stages: int,
    base_width: int = DEFAULT_BASE_WIDTH,
    growth: str = "symmetric",
    bridge: str = "skip",
) -> UNet3D:
    """Build the staged 3D U-Net (ProgFed Sec. 3.1, Fig. 1(b); Sheller et al., 2020).

    Parameters
    ----------
    input_shape
        ``(C, D, H, W)`` of one volume; ``D, H, W`` divisible by 16 (four poolings)
        and at least one of them 32 or more (a 1x1x1 bottleneck cannot be
        instance-normalised).
    num_classes
        Output channels (3 for the BraTS regions WT/TC/ET).
    num_stages
        4, or 1 for the full model as a single stage.
    base_width
        Level-1 channels; 21 (default) gives 9,727,035 parameters on 4 -> 3 channels.
    growth
        ``"symmetric"`` (outer levels first, original head throughout) or
        ``"asymmetric"`` (full encoder first, temporary heads).
    bridge
        ``"skip"`` or ``"zeros"``: what replaces the up-path input of the
        innermost active decoder level in symmetric sub-models.

    Returns
    -------
    UNet3D
        The model at its full stage, with PyTorch's default initialisation.

    Raises
    ------
    FieldError
        Bad input shape, ``S`` other than 1 or 4, or an unknown option value.
    """
    _check_options(input_shape, num_stages, base_width, growth, bridge)
    return UNet3D(input_shape[0], num_classes, num_stages, base_width, growth, bridge)


# The registry calls the builder itself; base_width, growth and bridge arrive as options.
register_model("unet3d", default_stages=STAGES, spatial_dims=3)(build_unet3d)
