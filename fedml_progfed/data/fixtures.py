"""Tiny but faithful Fashion-MNIST files for tests.

The files have the real names, magic numbers, headers and 28x28 ``uint8``
layout, so tests exercise the same reader as real runs. Each class has its
own mean pattern (coarse 7x7 blobs scaled up to 28x28) plus pixel noise, so a
small CNN learns it well above chance in a few rounds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np

from fedml_progfed.data.fashion_mnist import FASHION_MNIST_FILES
from fedml_progfed.data.idx import write_idx

PathLike = Union[str, "os.PathLike[str]"]

_NUM_CLASSES = 10
_SIDE = 28
_CELL = 4  # 7x7 pattern, each cell 4x4 pixels: coarse enough for 3x3 convs + pooling


def _class_patterns(rng: np.random.Generator) -> np.ndarray:
    """One (28, 28) float mean image per class, in [0, 255]."""
    coarse = rng.random((_NUM_CLASSES, _SIDE // _CELL, _SIDE // _CELL))
    # Mostly dark background with bright regions, like clothing on black.
    coarse = np.where(coarse > 0.55, 120.0 + 135.0 * coarse, 20.0 * coarse)
    return np.kron(coarse, np.ones((_CELL, _CELL)))


def _split(rng: np.random.Generator, patterns: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    # Balanced labels in random order: every class present once n >= 10.
    labels = rng.permutation(np.arange(n) % _NUM_CLASSES).astype(np.uint8)
    noise = rng.normal(0.0, 40.0, size=(n, _SIDE, _SIDE))
    images = np.clip(patterns[labels] + noise, 0, 255).round().astype(np.uint8)
    return images, labels


def write_idx_fixture(directory: PathLike, num_train: int, num_test: int, seed: int, gzip: bool = True) -> Path:
    """Write the four Fashion-MNIST IDX files with synthetic content.

    Parameters
    ----------
    directory
        Destination folder (created if needed).
    num_train, num_test
        Number of training / test images.
    seed
        Seed of patterns, labels and noise; train and test share the class patterns.
    gzip
        Write ``*-ubyte.gz`` (as Debian ships them) or uncompressed ``*-ubyte``.

    Returns
    -------
    Path
        ``directory``, ready to pass as ``data_dir`` / ``data_args.data_cache_dir``.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = _class_patterns(rng)
    suffix = ".gz" if gzip else ""
    for split, n in (("train", num_train), ("test", num_test)):
        images, labels = _split(rng, patterns, n)
        write_idx(folder / f"{FASHION_MNIST_FILES[f'{split}_images']}{suffix}", images, compress=gzip)
        write_idx(folder / f"{FASHION_MNIST_FILES[f'{split}_labels']}{suffix}", labels, compress=gzip)
    return folder


# --------------------------------------------------------------------------- CIFAR pickles and TFF h5


def _cifar_images(rng: np.random.Generator, patterns: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(n, 3072)`` uint8 rows (R plane, G plane, B plane), a class pattern plus noise."""
    noise = rng.normal(0.0, 30.0, size=(len(labels), *patterns.shape[1:]))
    images = np.clip(patterns[labels] + noise, 0, 255).round().astype(np.uint8)
    return images.reshape(len(labels), -1)


def _rgb_patterns(rng: np.random.Generator, num_classes: int, side: int = 32, cell: int = 8) -> np.ndarray:
    coarse = rng.random((num_classes, 3, side // cell, side // cell)) * 255.0
    return np.kron(coarse, np.ones((cell, cell)))  # (K, 3, side, side)


def write_cifar_fixture(directory: PathLike, name: str, per_file: int, seed: int) -> Path:
    """Write CIFAR-10 or CIFAR-100 python batches with synthetic content, in the published layout.

    Each file is ``pickle.dump`` of the published dict: bytes keys (as Python 2's ``str``
    keys read back with ``encoding="bytes"``), ``data`` a ``(per_file, 3072)`` uint8
    array, labels a list of ints (``labels``; CIFAR-100 ``fine_labels`` and
    ``coarse_labels``), ``filenames`` and ``batch_label``.

    Parameters
    ----------
    directory
        Folder to create ``cifar-10-batches-py/`` or ``cifar-100-python/`` in.
    name
        ``cifar10`` or ``cifar100``.
    per_file
        Images in each file (CIFAR-10 has six files, CIFAR-100 two).
    seed
        Seed of patterns, labels and noise.

    Returns
    -------
    Path
        ``directory``, ready to pass as ``data_args.data_cache_dir``.
    """
    import pickle

    from fedml_progfed.data.cifar import CIFAR10, CIFAR100

    layout = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    folder = Path(directory) / layout.folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patterns = _rgb_patterns(rng, layout.num_classes)
    for index, file_name in enumerate((*layout.train_files, *layout.test_files)):
        labels = rng.permutation(np.arange(per_file) % layout.num_classes)
        batch = {
            b"batch_label": f"synthetic batch {index + 1}".encode(),
            b"data": _cifar_images(rng, patterns, labels),
            b"filenames": [f"img_{index}_{i}.png".encode() for i in range(per_file)],
        }
        if name == "cifar10":
            batch[b"labels"] = [int(v) for v in labels]
        else:
            batch[b"fine_labels"] = [int(v) for v in labels]
            batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
        with (folder / file_name).open("wb") as handle:
            pickle.dump(batch, handle)
    return Path(directory)


def write_tff_fixture(
    directory: PathLike,
    name: str,
    clients: int,
    per_client: int,
    seed: int,
    test_clients: int | None = None,
    test_per_client: int = 2,
) -> Path:
    """Write TFF-format ``<name>_train.h5`` / ``<name>_test.h5`` with synthetic clients.

    ``examples/<client id>/pixels`` (``fed_emnist``: float32 ``(n, 28, 28)`` in [0, 1])
    or ``image`` (``fed_cifar100``: uint8 ``(n, 32, 32, 3)``) plus ``label``
    (int32 / int64 ``(n,)``), one group per client as TFF writes them. Client sizes
    vary between ``per_client`` and ``2 * per_client``. EMNIST test groups use the
    training ids (a writer in both files) for the first ``test_clients`` writers, so
    the rest have no test data; CIFAR-100 test groups are ids ``0..test_clients-1``.

    Returns
    -------
    Path
        ``directory``, ready to pass as ``data_args.data_cache_dir``.
    """
    import h5py

    from fedml_progfed.data.tff_h5 import FED_CIFAR100, FED_EMNIST

    layout = {"fed_emnist": FED_EMNIST, "fed_cifar100": FED_CIFAR100}[name]
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    k = layout.num_classes
    emnist = name == "fed_emnist"
    if emnist:
        patterns = np.kron(rng.random((k, 7, 7)) > 0.5, np.ones((4, 4))).astype(np.float32)  # (K, 28, 28)
        train_ids = [f"f{i:04d}_{i % 100:02d}" for i in range(clients)]
    else:
        patterns = _rgb_patterns(rng, k).transpose(0, 2, 3, 1)  # (K, 32, 32, 3)
        train_ids = [str(i) for i in range(clients)]
    n_test = clients if test_clients is None else test_clients
    test_ids = train_ids[:n_test] if emnist else [str(i) for i in range(n_test)]

    def write(path: Path, ids: list[str], sizes: list[int]) -> None:
        with h5py.File(path, "w") as handle:
            examples = handle.create_group("examples")
            for cid, n in zip(ids, sizes):
                # Each writer favours a few classes: a natural, non-IID split.
                favourite = rng.integers(0, k, size=3)
                labels = np.where(rng.random(n) < 0.7, favourite[rng.integers(0, 3, size=n)], rng.integers(0, k, size=n))
                group = examples.create_group(cid)
                if emnist:
                    x = np.clip(patterns[labels] + rng.normal(0, 0.2, size=(n, 28, 28)), 0, 1).astype(np.float32)
                    group.create_dataset("pixels", data=x)
                    group.create_dataset("label", data=labels.astype(np.int32))
                else:
                    x = np.clip(patterns[labels] + rng.normal(0, 30, size=(n, 32, 32, 3)), 0, 255).round()
                    group.create_dataset("image", data=x.astype(np.uint8))
                    group.create_dataset("label", data=labels.astype(np.int64))
                    group.create_dataset("coarse_label", data=(labels // 5).astype(np.int64))

    write(folder / layout.train_file, train_ids, [int(v) for v in rng.integers(per_client, 2 * per_client + 1, size=clients)])
    write(folder / layout.test_file, test_ids, [test_per_client] * n_test)
    return folder
