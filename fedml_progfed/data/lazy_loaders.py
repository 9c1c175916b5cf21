"""Client loaders built on demand, so memory follows the clients of a round, not the federation.

A federated data set with thousands of natural clients (TFF's EMNIST has 3400 writers)
cannot hold every client's arrays at once. :class:`LazyClientLoaders` is the mapping
FedML and the standalone loop index (``train_data_local_dict[client]``): it builds a
client's loader when asked and keeps the last few; :class:`ChainedBatches` is the
global training loader over it, one client at a time.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from fedml_progfed.data.batches import TensorBatches

#: Client training loaders kept built at once (a client's loader is asked for several
#: times in a row within a round; nothing needs older ones).
LOADER_CACHE = 4


class LazyClientLoaders(Mapping[int, TensorBatches]):
    """``client index -> loader``, each built when asked, the last few kept.

    FedML and the standalone loop only index it (``train_data_local_dict[client]``);
    iterating over the values would build every client's loader, which nothing does.

    Parameters
    ----------
    num_clients
        Clients ``0..num_clients-1``.
    build
        ``build(client) -> TensorBatches`` (e.g. reads the client's arrays from the file).
    batch_size
        The loaders' batch size (for :class:`ChainedBatches`).
    cache_size
        Loaders kept built, least recently used dropped first.
    """

    def __init__(
        self, num_clients: int, build: Callable[[int], TensorBatches], batch_size: int, cache_size: int = LOADER_CACHE
    ) -> None:
        self.num_clients = num_clients
        self.build = build
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.built = 0  # loaders built so far (a rebuilt one counts again)
        self._cache: OrderedDict[int, TensorBatches] = OrderedDict()

    def __len__(self) -> int:
        return self.num_clients

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.num_clients))

    def __contains__(self, client: object) -> bool:
        return isinstance(client, (int, np.integer)) and 0 <= int(client) < self.num_clients

    def __getitem__(self, client: int) -> TensorBatches:
        if client not in self:
            raise KeyError(client)
        client = int(client)
        loader = self._cache.get(client)
        if loader is None:
            loader = self.build(client)
            self.built += 1
            self._cache[client] = loader
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(client)
        return loader

    def __repr__(self) -> str:
        return f"LazyClientLoaders({self.num_clients} clients, {len(self._cache)} built)"


class ChainedBatches:
    """The global training loader: every client's shuffled batches, client after client, read one at a time."""

    def __init__(self, loaders: LazyClientLoaders, counts: Mapping[int, int]) -> None:
        self.loaders = loaders
        self.counts = counts
        self.batch_size = loaders.batch_size
        self.shuffle = True

    @property
    def num_samples(self) -> int:
        return int(sum(self.counts.values()))

    def __len__(self) -> int:
        return sum(-(-n // self.batch_size) for n in self.counts.values())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for client in self.loaders:
            yield from self.loaders[client]
