"""Fashion-MNIST (Xiao et al., 2017) from its IDX files, and its dataset registration.

Nothing here downloads: the files are read from Debian's ``dataset-fashion-mnist``
package (:data:`FASHION_MNIST_DIR`) or from the folder named by ``data_cache_dir``,
and a missing or damaged file is one actionable :class:`~fedml_progfed.errors.DataError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.data.arrays import ArrayDataset
from fedml_progfed.data.federated import FederatedData, federate_arrays
from fedml_progfed.data.idx import find_idx_file, read_idx_pair
from fedml_progfed.data.registry import DatasetSpec, register_dataset
from fedml_progfed.tasks.classification import ClassificationTask

PathLike = Union[str, "os.PathLike[str]"]

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


def read_fashion_mnist(data_dir: PathLike | None = None) -> ArrayDataset:
    """Fashion-MNIST (Xiao et al., 2017): 60k/10k grey 28x28 images, 10 classes.

    Parameters
    ----------
    data_dir
        Folder holding the four IDX files (gzip or raw); ``None`` or ``""``:
        :data:`FASHION_MNIST_DIR`.

    Raises
    ------
    DataError
        A file is missing, truncated, corrupt or inconsistent; the message says
        how to obtain the files.
    """
    folder = Path(data_dir if data_dir not in (None, "") else FASHION_MNIST_DIR).expanduser()
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


def missing_fashion_mnist(config: RunConfig) -> list[str]:
    """The IDX files (gzip or raw) missing from ``data_cache_dir`` (or :data:`FASHION_MNIST_DIR`); reads none."""
    folder = Path(config.data_cache_dir or FASHION_MNIST_DIR).expanduser()
    if not folder.is_dir():
        return [str(folder)]
    return [
        str(folder / f"{stem}.gz")
        for stem in FASHION_MNIST_FILES.values()
        if not (folder / f"{stem}.gz").is_file() and not (folder / stem).is_file()
    ]


def load_fashion_mnist_federated(config: RunConfig) -> FederatedData:
    """Read Fashion-MNIST from ``config.data_cache_dir`` and split it as the config says."""
    return federate_arrays(
        read_fashion_mnist(config.data_cache_dir),
        num_clients=config.client_num_in_total,
        partition_method=config.partition_method,
        partition_alpha=config.partition_alpha,
        batch_size=config.batch_size,
        seed=config.random_seed,
    )


FASHION_MNIST = register_dataset(
    DatasetSpec(
        name="fashion_mnist",
        load=load_fashion_mnist_federated,
        task=lambda data: ClassificationTask(),
        spatial_dims=2,
        description=f"Fashion-MNIST IDX files from data_cache_dir or {FASHION_MNIST_DIR}",
        shape=lambda config: ((1, 28, 28), 10),
        check=missing_fashion_mnist,
        source=FASHION_MNIST_FIX,
    )
)
