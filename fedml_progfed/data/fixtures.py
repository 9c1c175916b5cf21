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
