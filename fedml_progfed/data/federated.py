"""FedML's 8-element federated data set list, and splitting in-memory arrays over clients.

FedML's runners expect ``[train_data_num, test_data_num, train_data_global,
test_data_global, train_data_local_num_dict, train_data_local_dict,
test_data_local_dict, class_num]`` with clients ``0..N-1`` and loaders that
yield ``(x, y)`` batches (``FEDML_NOTES.md``). :class:`FederatedData` wraps that
list; :func:`federate_arrays` builds it from an :class:`ArrayDataset` and a
registered partitioner without importing FedML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from fedml_progfed.data.arrays import ArrayDataset
from fedml_progfed.data.batches import RandomCropFlip, TensorBatches
from fedml_progfed.data.partition import iid_partition, partition
from fedml_progfed.errors import FieldError

# The test set is split with a seed derived from, but different from, the
# training seed, so the two splits are not the same permutation stream.
_TEST_SPLIT_SEED_OFFSET = 1


@dataclass(frozen=True)
class FederatedData:
    """A federated data set: FedML's 8-element list plus what models need to know.

    Attributes
    ----------
    fedml_dataset : list
        ``[train_data_num, test_data_num, train_data_global, test_data_global,
        train_data_local_num_dict, train_data_local_dict, test_data_local_dict,
        class_num]``; dict keys ``0..N-1``; loaders yield ``(x, y)`` batches
        (:class:`TensorBatches` for arrays, BraTS patch/volume loaders for volumes).
    input_shape : tuple of int
        Shape of one model input: ``(C, H, W)`` for images, ``(C, D, H, W)`` for volumes.
    num_classes : int
    name : str
        Registry name of the data set.
    """

    fedml_dataset: list
    input_shape: tuple[int, ...]
    num_classes: int
    name: str

    def as_list(self) -> list:
        """The 8-element list to hand to ``FedMLRunner`` (a fresh shallow copy)."""
        return list(self.fedml_dataset)

    @property
    def train_data_num(self) -> int:
        """Number of training samples over all clients."""
        return int(self.fedml_dataset[0])

    @property
    def test_data_num(self) -> int:
        """Number of test samples."""
        return int(self.fedml_dataset[1])

    @property
    def train_global(self) -> TensorBatches:
        """Shuffled loader over the whole training set."""
        return self.fedml_dataset[2]

    @property
    def test_global(self) -> TensorBatches:
        """Unshuffled loader over the whole test set."""
        return self.fedml_dataset[3]

    @property
    def train_local_num(self) -> Mapping[int, int]:
        """Client index -> number of training samples."""
        return self.fedml_dataset[4]

    @property
    def train_local(self) -> Mapping[int, TensorBatches]:
        """Client index -> shuffled training loader."""
        return self.fedml_dataset[5]

    @property
    def test_local(self) -> Mapping[int, TensorBatches]:
        """Client index -> unshuffled test loader (an IID share of the test set)."""
        return self.fedml_dataset[6]

    @property
    def num_clients(self) -> int:
        """Number of clients (``client_num_in_total``)."""
        return len(self.fedml_dataset[5])


def _channel_stat(stat: float | tuple[float, ...]) -> float | torch.Tensor:
    # A per-channel tuple broadcasts over (N, C, H, W); a single number stays a scalar.
    return torch.tensor(stat, dtype=torch.float32).view(1, -1, 1, 1) if isinstance(stat, tuple) else stat


def _to_float(x: np.ndarray, mean: float | tuple[float, ...], std: float | tuple[float, ...]) -> torch.Tensor:
    # One pass over the data, in place after the first copy: uint8 -> [0, 1] -> standardised.
    return torch.from_numpy(x).to(torch.float32).div_(255.0).sub_(_channel_stat(mean)).div_(_channel_stat(std))


def crop_flip_for(mean: float | tuple[float, ...], std: float | tuple[float, ...], channels: int) -> RandomCropFlip:
    """The CIFAR augmentation (pad 4, crop, flip) for images normalised with ``mean``/``std``.

    The border is a black pixel after normalisation (``-mean/std`` per channel), as
    padding the raw image with zeros and normalising afterwards would give.
    """
    means = mean if isinstance(mean, tuple) else (mean,) * channels
    stds = std if isinstance(std, tuple) else (std,) * channels
    return RandomCropFlip(pad=4, fill=[-m / s for m, s in zip(means, stds)])


def federate_arrays(
    data: ArrayDataset,
    num_clients: int,
    partition_method: str,
    partition_alpha: float,
    batch_size: int,
    seed: int,
    augment: bool = False,
) -> FederatedData:
    """Split an in-memory data set over clients and wrap it in FedML's list.

    The count rules of :meth:`~fedml_progfed.config.RunConfig.validate` (at least one
    client, a positive batch size) are assumed; only rules that depend on the data
    are checked here.

    Parameters
    ----------
    data
        The whole data set, e.g. from :func:`fedml_progfed.data.fashion_mnist.read_fashion_mnist`.
    num_clients
        ``client_num_in_total``.
    partition_method
        ``partition_method``: ``iid``/``homo``, ``dirichlet``/``hetero`` or ``shards``.
    partition_alpha
        ``partition_alpha`` (Dirichlet concentration).
    batch_size
        ``batch_size`` of every loader.
    seed
        Seed of the partition (training split with ``seed``, test split with ``seed + 1``).
    augment
        Training loaders (each client's and the global one) apply the standard
        CIFAR augmentation (:func:`crop_flip_for`); test loaders never do.

    Returns
    -------
    FederatedData
        Training data split by ``partition_method``; the test set split IID so
        every client has a local test loader. Images are float32, scaled to
        [0, 1] and standardised with the data set's mean and std (per channel
        when they are tuples). Each client's
        data is a contiguous view of one tensor per split.

    Raises
    ------
    FieldError
        Unknown partition method, bad alpha, or more clients (label shards) than samples.
    """
    train_parts = partition(partition_method, data.y_train, num_clients, seed, partition_alpha)
    _check_partition(train_parts, data.y_train.shape[0], partition_method)
    if num_clients > data.y_test.shape[0]:
        raise FieldError(
            "client_num_in_total",
            f"{num_clients} clients but the {data.name} test set has only {data.y_test.shape[0]} samples, "
            "so some client would get no local test data; use fewer clients",
        )
    test_parts = iid_partition(data.y_test, num_clients, seed + _TEST_SPLIT_SEED_OFFSET)

    # Reorder each split client by client with one uint8 gather, so each client's
    # data is a contiguous view of one float tensor: no per-client copies, and no
    # hundreds of small index ops (slow when OpenMP threads contend on few cores).
    train_order = np.concatenate(train_parts)
    x_train = _to_float(data.x_train[train_order], data.mean, data.std)
    y_train = torch.from_numpy(data.y_train[train_order])
    test_order = np.concatenate(test_parts)
    x_test_local = _to_float(data.x_test[test_order], data.mean, data.std)
    y_test_local = torch.from_numpy(data.y_test[test_order])
    # The global test set keeps the file's order (evaluation is order-free; inspection is easier).
    x_test = _to_float(data.x_test, data.mean, data.std)
    y_test = torch.from_numpy(data.y_test)

    crop_flip = crop_flip_for(data.mean, data.std, data.input_shape[0]) if augment else None
    train_local_num: dict[int, int] = {}
    train_local: dict[int, TensorBatches] = {}
    test_local: dict[int, TensorBatches] = {}
    train_start = test_start = 0
    for client, (train_idx, test_idx) in enumerate(zip(train_parts, test_parts)):
        train_stop, test_stop = train_start + len(train_idx), test_start + len(test_idx)
        train_local_num[client] = int(len(train_idx))
        train_local[client] = TensorBatches(
            x_train[train_start:train_stop], y_train[train_start:train_stop], batch_size, shuffle=True, client_index=client,
            augment=crop_flip,
        )
        test_local[client] = TensorBatches(
            x_test_local[test_start:test_stop], y_test_local[test_start:test_stop], batch_size, shuffle=False, client_index=client
        )
        train_start, test_start = train_stop, test_stop

    fedml_dataset: list[Any] = [
        int(x_train.shape[0]),
        int(x_test.shape[0]),
        TensorBatches(x_train, y_train, batch_size, shuffle=True, augment=crop_flip),
        TensorBatches(x_test, y_test, batch_size, shuffle=False),
        train_local_num,
        train_local,
        test_local,
        int(data.num_classes),
    ]
    return FederatedData(
        fedml_dataset=fedml_dataset, input_shape=data.input_shape, num_classes=int(data.num_classes), name=data.name
    )


def _check_partition(parts: list[np.ndarray], n: int, method: str) -> None:
    # A partitioner (possibly user-registered) must hand out every sample exactly once;
    # otherwise train_data_num and the per-client counts would disagree.
    counts = np.bincount(np.concatenate(parts), minlength=n) if parts else np.zeros(n, dtype=np.int64)
    if len(counts) != n or not np.all(counts == 1):
        raise ValueError(f"partitioner {method!r} did not assign each of the {n} samples to exactly one client")
