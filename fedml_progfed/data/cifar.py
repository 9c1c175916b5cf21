"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from their python pickle batches, and their registrations.

The files are the "python version" archives as published, extracted::

    <data_cache_dir>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch
    <data_cache_dir>/cifar-100-python/train, test

``data_cache_dir`` may also name the ``cifar-10-batches-py`` / ``cifar-100-python``
folder itself. Each file is a pickled dict with ``data`` (N x 3072 ``uint8``: 1024 red,
1024 green, 1024 blue values of a 32x32 image, row-major) and ``labels`` (CIFAR-10) or
``fine_labels`` (CIFAR-100). The pickles are read with
:class:`~fedml_progfed.data.safe_pickle.DataUnpickler`, which refuses any global but
numpy's array reconstruction, so a tampered file cannot run code.

Images are normalised per channel with the published statistics and training
batches get the standard crop-and-flip augmentation (ProgFed's CIFAR-10 recipe, the
authors' ``main.py``; we leave out their colour jitter). Clients are split with
the registered partitioners (``partition_method``: ``iid`` as in ProgFed's CIFAR-10
setting, ``dirichlet`` for label skew, ``shards`` for ProFL's two labels per client).
Nothing here downloads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.data.arrays import ArrayDataset
from fedml_progfed.data.checks import check_labels
from fedml_progfed.data.federated import FederatedData, federate_arrays
from fedml_progfed.data.registry import DatasetSpec, register_dataset, require_files
from fedml_progfed.data.safe_pickle import load_data_pickle
from fedml_progfed.errors import DataError, FieldError
from fedml_progfed.tasks.classification import ClassificationTask

PathLike = Union[str, "os.PathLike[str]"]

_SIDE = 32
_PIXELS = 3 * _SIDE * _SIDE


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant's files are and what they hold.

    Attributes
    ----------
    name : str
        Registry name (``cifar10``, ``cifar100``).
    folder : str
        The folder the archive unpacks to.
    train_files, test_files : tuple of str
        Pickle files of each split, in the order their images are concatenated.
    label_key : str
        Key of the labels in each dict.
    num_classes : int
    mean, std : tuple of float
        Published per-channel statistics of the [0, 1]-scaled training images.
    archive : str
        The archive to download, for the error message.
    """

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    archive: str

    @property
    def source(self) -> str:
        return (
            f"download {self.archive} (the python version) from https://www.cs.toronto.edu/~kriz/cifar.html and "
            f"extract it into data_args.data_cache_dir (it unpacks to {self.folder}/)"
        )


#: CIFAR-10's statistics are the ones the ProgFed authors' code normalises with (and most
#: CIFAR code since Kuang Liu's pytorch-cifar); CIFAR-100's are FedML's and the common ones.
CIFAR10 = CifarLayout(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key="labels",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2023, 0.1994, 0.2010),
    archive="cifar-10-python.tar.gz",
)
CIFAR100 = CifarLayout(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    label_key="fine_labels",
    num_classes=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    archive="cifar-100-python.tar.gz",
)


def cifar_folder(data_dir: PathLike, layout: CifarLayout) -> Path:
    """The folder holding the pickles: ``data_dir/<layout.folder>`` or ``data_dir`` itself.

    ``data_dir`` itself counts when it is named like the archive's folder or already
    holds the first training file; otherwise the expected (perhaps missing)
    ``data_dir/<layout.folder>`` is returned.
    """
    root = Path(data_dir).expanduser()
    if (root / layout.folder).is_dir():
        return root / layout.folder
    if root.name == layout.folder or (root / layout.train_files[0]).is_file():
        return root
    return root / layout.folder


def _data_dir(config: RunConfig, layout: CifarLayout) -> str:
    if not config.data_cache_dir:
        raise FieldError("data_cache_dir", f"empty, and {layout.name} has no default folder; {layout.source}")
    return config.data_cache_dir


def missing_cifar_files(data_dir: PathLike, layout: CifarLayout) -> list[str]:
    """The pickles of ``layout`` that are not files under ``data_dir`` (nothing is opened)."""
    folder = cifar_folder(data_dir, layout)
    return [str(folder / name) for name in (*layout.train_files, *layout.test_files) if not (folder / name).is_file()]


def _field(batch: dict, key: str, path: Path, fix: str) -> Any:
    # encoding="bytes" gives b"data" for the published (Python 2) files; a re-pickled
    # Python 3 file has str keys. Both are accepted.
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    found = ", ".join(sorted(repr(k) for k in batch)[:6])
    raise DataError(f"{path}: no {key!r} entry (found {found}); not a CIFAR batch, {fix}")


def _label_array(labels: Any) -> np.ndarray:
    """The pickled labels as an array; a list mixing numbers and other things keeps each element as pickled."""
    if isinstance(labels, np.ndarray):
        return labels
    try:
        y = np.asarray(labels)
    except ValueError:  # a ragged list
        return np.asarray(labels, dtype=object)
    # numbers: one vectorised array; else object, so the check names the first element that is not a number
    return y if y.dtype.kind in "iuf" else np.asarray(labels, dtype=object)


def read_cifar_file(path: PathLike, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 of one pickle batch.

    Raises
    ------
    DataError
        Missing, unreadable, not a pickle, refused (it names a global other than
        numpy's), or not a CIFAR batch of ``layout`` (keys, shapes, dtypes), or labels that
        are not integers in ``[0, num_classes)`` (the first bad index is named).
    """
    path = Path(path)
    fix = layout.source
    batch = load_data_pickle(path, fix)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, not a CIFAR batch dict; {fix}")
    data = _field(batch, "data", path, fix)
    labels = _field(batch, layout.label_key, path, fix)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is {what}, expected uint8 (N, {_PIXELS}); the file is damaged, {fix}")
    y = _label_array(labels)
    if y.ndim != 1 or y.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {y.shape[0] if y.ndim == 1 else y.shape} labels for {data.shape[0]} images; {fix}")
    y = check_labels(y, layout.num_classes, str(path), fix)
    return data.reshape(-1, 3, _SIDE, _SIDE), y


def read_cifar(data_dir: PathLike, layout: CifarLayout) -> ArrayDataset:
    """The whole data set of ``layout`` from the folder at (or under) ``data_dir``.

    Raises
    ------
    FieldError
        ``data_cache_dir``: a file is missing (the message names it and the archive).
    DataError
        A file is unreadable, refused or malformed.
    """
    require_files(missing_cifar_files(data_dir, layout), layout.source)
    folder = cifar_folder(data_dir, layout)
    splits = {}
    for split, names in (("train", layout.train_files), ("test", layout.test_files)):
        parts = [read_cifar_file(folder / name, layout) for name in names]
        splits[split] = (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]))
    return ArrayDataset(
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        num_classes=layout.num_classes,
        mean=layout.mean,
        std=layout.std,
        name=layout.name,
    )


def _register(layout: CifarLayout) -> DatasetSpec:
    def load(config: RunConfig) -> FederatedData:
        return federate_arrays(
            read_cifar(_data_dir(config, layout), layout),
            num_clients=config.client_num_in_total,
            partition_method=config.partition_method,
            partition_alpha=config.partition_alpha,
            batch_size=config.batch_size,
            seed=config.random_seed,
            augment=True,
        )

    return register_dataset(
        DatasetSpec(
            name=layout.name,
            load=load,
            task=lambda data: ClassificationTask(),
            spatial_dims=2,
            description=f"{layout.name.upper().replace('CIFAR', 'CIFAR-')} python pickles ({layout.folder}/) at data_cache_dir, split by partition_method",
            shape=lambda config: ((3, _SIDE, _SIDE), layout.num_classes),
            check=lambda config: missing_cifar_files(_data_dir(config, layout), layout),
            source=layout.source,
        )
    )


CIFAR10_SPEC = _register(CIFAR10)
CIFAR100_SPEC = _register(CIFAR100)
