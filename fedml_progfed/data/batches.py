"""Mini-batches over in-memory tensors, a light stand-in for ``DataLoader``.

``torch.utils.data.DataLoader`` fetches and collates one sample at a time;
on a 2-core machine that costs more than the forward pass of a small CNN.
The whole (client) data set already sits in two tensors, so a batch is one
index operation.
"""

from __future__ import annotations

from typing import Iterator

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

    Attributes
    ----------
    dataset : torch.utils.data.TensorDataset
        ``TensorDataset(x, y)``, for code written against ``DataLoader``
        (e.g. ``len(loader.dataset)``).
    batch_size : int
    shuffle : bool
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, client_index: int | None = None
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
                yield self.x[start : start + b], self.y[start : start + b]
            else:
                # Gather batch by batch instead of permuting the whole set up front.
                idx = order[start : start + b]
                yield self.x[idx], self.y[idx]

    def __repr__(self) -> str:
        return (
            f"TensorBatches(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, x={tuple(self.x.shape)} {self.x.dtype})"
        )
