"""Mini-batches over in-memory tensors, a light stand-in for ``DataLoader``.

``torch.utils.data.DataLoader`` fetches and collates one sample at a time;
on a 2-core machine that costs more than the forward pass of a small CNN.
The whole (client) data set already sits in two tensors, so a batch is one
index operation. Training loaders may augment each batch
(:class:`RandomCropFlip`, the standard CIFAR augmentation), drawing from the
global torch RNG like the shuffle does.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import TensorDataset


class TensorBatches:
    """Iterate ``(x_batch, y_batch)`` pairs over tensors ``x`` and ``y``.

    Parameters
    ----------
    x, y
        Inputs and targets; their first dimensions must agree.
    batch_size
        Samples per batch, at least 1 (the config's ``batch_size``, validated there);
        the last batch may be smaller (no samples dropped).
    shuffle
        Draw a fresh order for every pass with ``torch.randperm`` from the
        *global* torch RNG. This is deliberate: the trainer seeds torch per
        round and client, so standalone and MPI runs see the same batches.
    augment
        Optional ``augment(x_batch) -> x_batch`` applied to every batch (e.g.
        :class:`RandomCropFlip`); training loaders only. It must draw its
        randomness from the global torch RNG too, after the pass's permutation.

    Attributes
    ----------
    dataset : torch.utils.data.TensorDataset
        ``TensorDataset(x, y)``, for code written against ``DataLoader``
        (e.g. ``len(loader.dataset)``).
    batch_size : int
    shuffle : bool
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        client_index: int | None = None,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"TensorBatches: x has {x.shape[0]} samples but y has {y.shape[0]}")
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.dataset = TensorDataset(x, y)
        # FedML hands a trainer only the loader, so the loader says whose data it is
        # (the trainer seeds shuffling by round and client).
        self.client_index = client_index
        self.augment = augment

    @property
    def num_samples(self) -> int:
        """Number of samples in one pass."""
        return int(self.x.shape[0])

    def __len__(self) -> int:
        """Number of batches in one pass (the last one may be partial)."""
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The permutation is drawn here, when iteration starts, not lazily at the
        # first batch, so RNG consumption is tied to ``iter()`` alone.
        order = torch.randperm(self.num_samples) if self.shuffle else None
        return self._batches(order)

    def _batches(self, order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = self.num_samples, self.batch_size
        for start in range(0, n, b):
            if order is None:
                # Slices are views: no copy for evaluation passes.
                x, y = self.x[start : start + b], self.y[start : start + b]
            else:
                # Gather batch by batch instead of permuting the whole set up front.
                idx = order[start : start + b]
                x, y = self.x[idx], self.y[idx]
            yield (x if self.augment is None else self.augment(x)), y

    def __repr__(self) -> str:
        return (
            f"TensorBatches(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, x={tuple(self.x.shape)} {self.x.dtype}"
            + (f", augment={self.augment!r})" if self.augment is not None else ")")
        )


class RandomCropFlip:
    """Random ``pad``-pixel-padded crop back to the input size, then a random horizontal flip.

    The standard CIFAR training augmentation (He et al., 2016; torchvision's
    ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``), which the ProgFed
    authors' CIFAR-10 code applies (plus a colour jitter we leave out). It works on
    a whole ``(B, C, H, W)`` batch of already-normalised images in one gather, so
    the padding is ``fill`` per channel: the normalised value of a black pixel,
    i.e. ``-mean / std``, which is what padding the raw image with zeros gives.

    Randomness comes from the global torch RNG (``torch.randint``, ``torch.rand``),
    so a run seeded per round and client is reproducible in every runtime.

    Parameters
    ----------
    pad
        Pixels of padding on each side (4 for CIFAR).
    fill
        One value per channel for the padded border.
    """

    def __init__(self, pad: int, fill: Sequence[float]) -> None:
        if pad < 0:
            raise ValueError(f"RandomCropFlip: pad must be >= 0, got {pad}")
        self.pad = int(pad)
        self.fill = tuple(float(v) for v in fill)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != len(self.fill):
            raise ValueError(f"RandomCropFlip: expected (B, {len(self.fill)}, H, W), got {tuple(x.shape)}")
        b, c, h, w = x.shape
        p = self.pad
        padded = x.new_empty(b, c, h + 2 * p, w + 2 * p)
        padded.copy_(torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, c, 1, 1).expand_as(padded))
        padded[:, :, p : p + h, p : p + w] = x
        # Offsets are drawn before flips, in this order, for every batch (fixed RNG consumption).
        top = torch.randint(0, 2 * p + 1, (b,))
        left = torch.randint(0, 2 * p + 1, (b,))
        flip = torch.rand(b) < 0.5
        rows = top[:, None] + torch.arange(h)  # (B, H)
        cols = torch.arange(w).expand(b, w)  # (B, W)
        cols = torch.where(flip[:, None], cols.flip(1), cols) + left[:, None]
        batch = torch.arange(b)[:, None, None, None]
        chans = torch.arange(c)[None, :, None, None]
        dev = x.device
        return padded[batch.to(dev), chans.to(dev), rows[:, None, :, None].to(dev), cols[:, None, None, :].to(dev)]

    def __repr__(self) -> str:
        return f"RandomCropFlip(pad={self.pad}, fill={self.fill})"
