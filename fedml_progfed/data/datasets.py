"""Data sets read from real on-disk formats: a registry name -> loader.

Nothing here downloads: a loader reads files that are already on the machine
(a Debian data-set package or a folder the user names with
``data_args.data_cache_dir``) and fails with one actionable line otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from fedml_progfed.data.idx import find_idx_file, read_idx_pair
from fedml_progfed.errors import ConfigError

PathLike = Union[str, "os.PathLike[str]"]
#: A loader takes a data directory (``None``: the data set's default) and returns the arrays.
DatasetLoader = Callable[[Optional[PathLike]], "ArrayDataset"]


@dataclass(frozen=True)
class ArrayDataset:
    """A whole data set as numpy arrays, before any scaling or partitioning.

    Attributes
    ----------
    x_train, x_test : numpy.ndarray
        ``uint8`` images of shape (N, C, H, W).
    y_train, y_test : numpy.ndarray
        ``int64`` labels of shape (N,).
    num_classes : int
    mean, std : float
        Per-channel statistics of the [0, 1]-scaled training images, used to
        normalise (the published values, so tiny fixtures normalise alike).
    name : str
        Registry name.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: float
    std: float
    name: str

    def __post_init__(self) -> None:
        # Catch loader bugs here rather than as shape errors deep in training.
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim != 4 or x.dtype != np.uint8:
                raise ValueError(f"{self.name}: x_{split} must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
            if y.ndim != 1 or y.dtype != np.int64 or y.shape[0] != x.shape[0]:
                raise ValueError(f"{self.name}: y_{split} must be int64 ({x.shape[0]},), got {y.dtype} {y.shape}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train images {self.x_train.shape[1:]} differ from test {self.x_test.shape[1:]}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)


_DATASETS: dict[str, DatasetLoader] = {}


def _key(name: str) -> str:
    # "Fashion-MNIST", "fashion_mnist" and "fashion-mnist" all mean the same set.
    return str(name).strip().lower().replace("-", "_")


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator registering a loader under ``name``.

    Raises
    ------
    ValueError
        If the name is already taken (a programming error, caught at import).
    """

    def decorate(fn: DatasetLoader) -> DatasetLoader:
        key = _key(name)
        if key in _DATASETS:
            raise ValueError(f"dataset {key!r} is already registered")
        _DATASETS[key] = fn
        return fn

    return decorate


def available_datasets() -> list[str]:
    """Every accepted value of ``data_args.dataset``."""
    return sorted(_DATASETS)


def load_dataset(name: str, data_dir: PathLike | None = None) -> ArrayDataset:
    """Load a registered data set from ``data_dir`` (``None`` or ``""``: its default folder).

    Raises
    ------
    ConfigError
        Unknown ``name`` (``data_args.dataset``); the message lists the options.
    DataError
        Missing or malformed files.
    """
    key = _key(name)
    if key not in _DATASETS:
        raise ConfigError(f"data_args.dataset: unknown {name!r}; available: {', '.join(available_datasets())}")
    return _DATASETS[key](data_dir if data_dir not in (None, "") else None)


# --------------------------------------------------------------------------- Fashion-MNIST

#: Where Debian's ``dataset-fashion-mnist`` package puts the files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist/"
#: File names (without ``.gz``), as published by Zalando and shipped by Debian.
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_FIX = (
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or set data_args.data_cache_dir to a folder holding "
    + ", ".join(f"{stem}.gz" for stem in FASHION_MNIST_FILES.values())
    + " (gzip or uncompressed)"
)
#: Published statistics of the [0, 1]-scaled training images.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


@register_dataset("fashion_mnist")
def load_fashion_mnist(data_dir: PathLike | None = None) -> ArrayDataset:
    """Fashion-MNIST (Xiao et al., 2017): 60k/10k grey 28x28 images, 10 classes.

    Parameters
    ----------
    data_dir
        Folder holding the four IDX files (gzip or raw); default
        :data:`FASHION_MNIST_DIR`.

    Raises
    ------
    DataError
        A file is missing, truncated, corrupt or inconsistent; the message says
        how to obtain the files.
    """
    folder = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR).expanduser()
    paths = {role: find_idx_file(folder, stem, fix=FASHION_MNIST_FIX) for role, stem in FASHION_MNIST_FILES.items()}
    arrays = {}
    for split in ("train", "test"):
        x, y = read_idx_pair(
            paths[f"{split}_images"], paths[f"{split}_labels"], num_classes=10, image_shape=(28, 28), fix=FASHION_MNIST_FIX
        )
        arrays[split] = (x[:, None, :, :], y)  # add the channel axis: (N, 1, 28, 28)
    return ArrayDataset(
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        num_classes=10,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        name="fashion_mnist",
    )
