"""The one dataset registry: name -> how to load it, what task it is, what rank its inputs have.

A configuration selects a data set by ``dataset``; everything that depends on that
choice (the reader and partition, the loss and metric, whether inputs are images or
volumes, the input shape and class count, the files a run needs) comes from its
:class:`DatasetSpec`, so no other layer keeps a table of data sets. The shape and
the file check work from the config alone, so ``describe`` and ``run --dry-run``
read no data. Specs are registered next to their readers
(:mod:`fedml_progfed.data.fashion_mnist`, :mod:`fedml_progfed.data.brats`), which
``import fedml_progfed.data`` imports. Registering costs nothing: readers import
heavy libraries (nibabel, MONAI) only when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.registry import Registry, UnknownNameError
from fedml_progfed.data.federated import FederatedData
from fedml_progfed.errors import FieldError
from fedml_progfed.tasks.base import Task


@dataclass(frozen=True)
class DatasetSpec:
    """Everything a run needs to know about one data set.

    Attributes
    ----------
    name : str
        Registry key, the value of the ``dataset`` field; ``-`` and ``_`` and case
        are interchangeable when looking it up (``Fashion-MNIST`` = ``fashion_mnist``).
    load : callable
        ``load(config) -> FederatedData``: reads the files and splits them over
        ``config.client_num_in_total`` clients. Raises :class:`~fedml_progfed.errors.FieldError`
        for a config value the data cannot satisfy and :class:`~fedml_progfed.errors.DataError`
        for missing or malformed files. It need not re-check what
        :meth:`RunConfig.validate` already enforces.
    task : callable
        ``task(data) -> Task``: the loss and scores for the loaded data, e.g.
        ``lambda data: SegmentationTask(roi_size=data.input_shape[1:])``.
    spatial_dims : int
        2 for ``(C, H, W)`` images, 3 for ``(C, D, H, W)`` volumes; the loaded
        ``input_shape`` has ``spatial_dims + 1`` entries.
    description : str
        One line saying what the data are and where they are read from.
    shape : callable or None
        ``shape(config) -> (input_shape, num_classes)`` from the config alone, without
        reading data (e.g. BraTS: ``((4, *patch_size), 3)``); what ``load`` will
        return. ``None``: only loading tells (``describe --cf`` then loads the data).
    check : callable or None
        ``check(config) -> list of str``: the files or folders a run needs that are
        missing, in the order the reader wants them, found without reading any
        (existence only). May raise :class:`~fedml_progfed.errors.FieldError` for a
        config that names no location at all. ``None``: not checked up front.
    source : str
        Where the data usually come from and where to put them (ends the error of a
        missing file).
    """

    name: str
    load: Callable[[RunConfig], FederatedData]
    task: Callable[[FederatedData], Task]
    spatial_dims: int
    description: str
    shape: Optional[Callable[[RunConfig], tuple[tuple[int, ...], int]]] = None
    check: Optional[Callable[[RunConfig], list[str]]] = None
    source: str = ""


def _key(name: str) -> str:
    # "Fashion-MNIST", "fashion_mnist" and "fashion-mnist" all mean the same set.
    return str(name).strip().lower().replace("-", "_")


#: Every data set a config can select, by normalised name.
DATASETS: Registry[DatasetSpec] = Registry("dataset", normalize=_key)


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` under ``spec.name``; returns it.

    Raises
    ------
    ValueError
        The name (after normalisation) is taken, or ``spatial_dims`` is not 2 or 3
        (programming errors, caught at import).
    """
    if spec.spatial_dims not in (2, 3):
        raise ValueError(f"dataset {spec.name!r}: spatial_dims must be 2 (images) or 3 (volumes), got {spec.spatial_dims!r}")
    return DATASETS.add(spec.name, spec)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec registered as ``name``.

    Raises
    ------
    FieldError
        ``dataset``: no such data set; the message lists the registered ones.
    """
    try:
        return DATASETS[name]
    except UnknownNameError:
        listing = "; ".join(f"{key} ({DATASETS[key].description})" for key in DATASETS.names())
        raise FieldError("dataset", f"unknown {name!r}; available: {listing}") from None


def load_federated_data(config: RunConfig) -> FederatedData:
    """Load and split the data set named by ``config.dataset``.

    Raises
    ------
    FieldError
        Unknown data set, or a config value the data cannot satisfy.
    DataError
        Missing or malformed files.
    """
    spec = dataset_spec(config.dataset)
    data = spec.load(config)
    # A loader that disagrees with its own spec is a bug in the loader, not in the user's config.
    if data.name != spec.name or len(data.input_shape) != spec.spatial_dims + 1:
        raise RuntimeError(
            f"dataset {spec.name!r}: loader returned {data.name!r} with input_shape {data.input_shape}, "
            f"expected {spec.spatial_dims} spatial dims"
        )
    if spec.shape is not None and spec.shape(config) != (tuple(data.input_shape), data.num_classes):
        raise RuntimeError(
            f"dataset {spec.name!r}: loader returned input_shape {data.input_shape} with {data.num_classes} classes, "
            f"but its spec says {spec.shape(config)}"
        )
    return data


def static_shape(config: RunConfig) -> tuple[tuple[int, ...], int] | None:
    """``(input_shape, num_classes)`` of ``config.dataset`` from the config alone, or None if its spec cannot say.

    Raises
    ------
    FieldError
        Unknown data set, or a shape field (e.g. ``patch_size``) the data set cannot use.
    """
    spec = dataset_spec(config.dataset)
    return None if spec.shape is None else spec.shape(config)


def check_data(config: RunConfig) -> None:
    """Raise if a file the run needs is missing; reads no data.

    Raises
    ------
    FieldError
        ``data_cache_dir``: one line naming the first missing file (and how many more
        are missing) and where the data come from; or no location configured.
    """
    spec = dataset_spec(config.dataset)
    require_files([] if spec.check is None else spec.check(config), spec.source)


def require_files(missing: list[str], source: str) -> None:
    """Raise the one-line ``data_cache_dir`` error for the first of ``missing`` (nothing if it is empty)."""
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FieldError("data_cache_dir", f"{missing[0]} not found{more}; {source}".rstrip("; "))


def task_for(config: RunConfig, data: FederatedData) -> Task:
    """The loss and scores for ``data``, as the spec of ``config.dataset`` builds them."""
    return dataset_spec(config.dataset).task(data)
