"""TFF's federated h5 data sets (``fed_emnist``, ``fed_cifar100``) with their natural clients.

TensorFlow Federated publishes EMNIST split by writer and CIFAR-100 split by Pachinko
allocation as two h5 files each, the benchmark of Reddi et al. (2021) that ProgFed
follows (Sec. 4.1, App. B)::

    fed_emnist_train.h5 / fed_emnist_test.h5      examples/<client>/pixels  float32 (n, 28, 28) in [0, 1]
                                                  examples/<client>/label   int32 (n,)       62 classes
    fed_cifar100_train.h5 / fed_cifar100_test.h5  examples/<client>/image   uint8 (n, 32, 32, 3)
                                                  examples/<client>/label   int64 (n,)       100 fine classes

Clients
    A client is one group of the training file (an EMNIST writer; 3400 in the full
    file, 500 for CIFAR-100). Client ``i`` is the ``i``-th group in sorted id order
    (string order, the h5 file's own), and ``client_num_in_total = N`` takes the first
    ``N``; asking for more than the file has is an error. ``partition_method`` does not
    apply (the split is the data's) and is ignored with one log line.
Test data
    The server's global test set is every example of the test file, the benchmark's
    test set (EMNIST: 77,483 examples, 243 MB as float32; CIFAR-100: the 10,000 CIFAR
    test images), whatever ``client_num_in_total``. A client's local test loader is
    the test file's group with its id (EMNIST writers appear in both files;
    fed_cifar100's 100 test groups share the ids ``0..99`` with training clients, as
    FedML pairs them) as a view into the global test tensors, or an empty loader.
Memory
    Nothing scales with the federation but two small tables (ids, sample counts).
    Loaders are built on demand (:mod:`~fedml_progfed.data.lazy_loaders`): ``train_data_local_dict[i]`` reads client ``i``'s
    arrays from the open training file when asked (``test_data_local_dict[i]`` takes
    its view of the global test set), keeping the last few in a small cache, so
    memory follows the clients of a round, not the 3400 of the federation. The
    global training loader chains the clients' loaders one at a time.
    FedML 0.9.6's cross-silo runtime only indexes these mappings
    (``FedMLTrainer.update_dataset``). Two paths would walk them: the hierarchical
    scenario's ``split_data_for_dist_trainers`` rewrites every entry (it would read
    every client, and needs item assignment, which these mappings refuse), and the
    server's ``get_dummy_input_tensor`` scans ``test_data_local_dict`` only when the
    global test loader is empty (ours never is). Our aggregator's ``test_all`` does
    not evaluate per client.
Preprocessing
    EMNIST pixels are used as stored (TFF, FedML and Reddi et al. do not standardise),
    with a channel axis added: ``(1, 28, 28)``. CIFAR-100 images become ``(3, 32, 32)``,
    scaled to [0, 1] and normalised with CIFAR-100's published per-channel statistics;
    training batches get the standard crop (pad 4) and flip.

h5py is imported when a file is opened. Nothing here downloads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from fedml_progfed.config.schema import RunConfig
from fedml_progfed.data.batches import TensorBatches
from fedml_progfed.data.checks import check_finite, check_labels
from fedml_progfed.data.cifar import CIFAR100
from fedml_progfed.data.federated import FederatedData, crop_flip_for
from fedml_progfed.data.lazy_loaders import ChainedBatches, LazyClientLoaders
from fedml_progfed.data.registry import DatasetSpec, register_dataset, require_files
from fedml_progfed.errors import DataError, FieldError
from fedml_progfed.tasks.classification import ClassificationTask

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger("fedml_progfed")

#: Group of the clients in every TFF h5 file.
EXAMPLES = "examples"


@dataclass(frozen=True)
class TffLayout:
    """One TFF h5 data set: its files, keys, shapes and preprocessing.

    Attributes
    ----------
    name : str
        Registry name.
    train_file, test_file : str
        File names under ``data_cache_dir``.
    x_key : str
        Key of the inputs in a client group (``pixels`` or ``image``).
    image_shape : tuple of int
        Shape of one stored input.
    input_shape : tuple of int
        ``(C, H, W)`` the model sees.
    num_classes : int
    natural_clients : int
        Clients of the published training file (for documentation and messages).
    archive : str
        TFF's archive holding both files.
    mean, std : tuple of float or None
        Per-channel statistics to normalise ``uint8`` images with; None: inputs are
        used as stored (float pixels).
    augment : bool
        Training batches get the crop-and-flip augmentation.
    """

    name: str
    train_file: str
    test_file: str
    x_key: str
    image_shape: tuple[int, ...]
    input_shape: tuple[int, int, int]
    num_classes: int
    natural_clients: int
    archive: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: bool = False

    @property
    def source(self) -> str:
        return (
            f"download TensorFlow Federated's {self.archive} (https://storage.googleapis.com/tff-datasets-public/"
            f"{self.archive}) and extract {self.train_file} and {self.test_file} into data_args.data_cache_dir"
        )

    def to_inputs(self, x: np.ndarray) -> torch.Tensor:
        """Stored inputs ``(n, *image_shape)`` -> float32 model inputs ``(n, *input_shape)``."""
        if self.mean is None:
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, *self.input_shape)
        images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return images.sub_(mean).div_(std)


FED_EMNIST = TffLayout(
    name="fed_emnist",
    train_file="fed_emnist_train.h5",
    test_file="fed_emnist_test.h5",
    x_key="pixels",
    image_shape=(28, 28),
    input_shape=(1, 28, 28),
    num_classes=62,
    natural_clients=3400,
    archive="fed_emnist.tar.bz2",
)
FED_CIFAR100 = TffLayout(
    name="fed_cifar100",
    train_file="fed_cifar100_train.h5",
    test_file="fed_cifar100_test.h5",
    x_key="image",
    image_shape=(32, 32, 3),
    input_shape=(3, 32, 32),
    num_classes=100,
    natural_clients=500,
    archive="fed_cifar100.tar.bz2",
    mean=CIFAR100.mean,
    std=CIFAR100.std,
    augment=True,
)


class H5Clients:
    """The client groups of one TFF h5 file, opened read-only; arrays are read only when asked.

    Parameters
    ----------
    path
        The h5 file.
    layout
        What a client group must hold.

    Attributes
    ----------
    ids : list of str
        Client ids in sorted (string) order.
    reads : int
        Clients whose arrays were read so far (tests count them).

    Raises
    ------
    DataError
        The file cannot be opened as h5 or has no ``examples`` group.
    """

    def __init__(self, path: PathLike, layout: TffLayout) -> None:
        import h5py  # lazy: only runs that use TFF data pay for it

        self.path = Path(path)
        self.layout = layout
        self.reads = 0
        try:
            self._file = h5py.File(self.path, "r")
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{self.path}: not a readable h5 file ({reason}); {layout.source}") from None
        examples = self._file.get(EXAMPLES)
        if examples is None or not isinstance(examples, h5py.Group):
            raise DataError(f"{self.path}: no '{EXAMPLES}' group, so not a TFF federated file; {layout.source}")
        self._examples = examples
        self.ids: list[str] = sorted(examples.keys())

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._examples

    def _datasets(self, client_id: str) -> tuple[Any, Any]:
        """The input and label datasets of a client, shapes and dtypes checked (metadata only)."""
        layout, where = self.layout, f"{self.path}: client {client_id!r}"
        group = self._examples.get(client_id)
        x = group.get(layout.x_key) if group is not None and hasattr(group, "get") else None
        y = group.get("label") if group is not None and hasattr(group, "get") else None
        if x is None or y is None or not hasattr(x, "shape") or not hasattr(y, "shape"):
            raise DataError(f"{where} lacks '{layout.x_key}' or 'label'; the file is damaged, {layout.source}")
        n = x.shape[0] if len(x.shape) else -1
        if tuple(x.shape[1:]) != layout.image_shape or tuple(y.shape) not in ((n,), (n, 1)):
            raise DataError(
                f"{where} has {layout.x_key} {tuple(x.shape)} and label {tuple(y.shape)}, expected "
                f"(n, {', '.join(map(str, layout.image_shape))}) and (n,); not {layout.name} data, {layout.source}"
            )
        return x, y

    def count(self, client_id: str) -> int:
        """Examples of a client, from the metadata (no array is read)."""
        return int(self._datasets(client_id)[0].shape[0])

    def read(self, client_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A client's model inputs and int64 labels, checked by the data rule (:mod:`~fedml_progfed.data.checks`)."""
        layout = self.layout
        x_set, y_set = self._datasets(client_id)
        try:
            x, y = x_set[()], y_set[()]
        except Exception as exc:  # noqa: BLE001 - h5py raises OSError/KeyError/... for damaged chunks
            raise DataError(f"{self.path}: client {client_id!r}: cannot read its arrays ({type(exc).__name__}); "
                            f"the file is damaged, {layout.source}") from None
        self.reads += 1
        if (x.dtype.kind != "f") if layout.mean is None else (x.dtype != np.uint8):
            raise DataError(f"{self.path}: client {client_id!r}: {layout.x_key} is {x.dtype}, "
                            f"expected {'float' if layout.mean is None else 'uint8'}; {layout.source}")
        where = f"{self.path}: client {client_id!r}"
        labels = check_labels(y, layout.num_classes, where, layout.source)
        check_finite(x, where, layout.source)
        return layout.to_inputs(x), torch.from_numpy(labels)


def _data_dir(config: RunConfig, layout: TffLayout) -> Path:
    if not config.data_cache_dir:
        raise FieldError("data_cache_dir", f"empty, and {layout.name} has no default folder; {layout.source}")
    return Path(config.data_cache_dir).expanduser()


def missing_tff_files(config: RunConfig, layout: TffLayout) -> list[str]:
    """The two h5 files of ``layout`` that are not under ``data_cache_dir`` (nothing is opened)."""
    folder = _data_dir(config, layout)
    return [str(folder / name) for name in (layout.train_file, layout.test_file) if not (folder / name).is_file()]


def _empty(layout: TffLayout) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty((0, *layout.input_shape)), torch.empty(0, dtype=torch.long)


def load_tff_federated(config: RunConfig, layout: TffLayout) -> FederatedData:
    """The first ``client_num_in_total`` natural clients of ``layout``'s files (see the module docstring).

    Raises
    ------
    FieldError
        ``data_cache_dir`` empty or a file missing; ``client_num_in_total`` above the
        clients of the training file.
    DataError
        A file is not h5, lacks the TFF layout, or holds arrays of the wrong shape or
        type, labels that are not integers in range, or non-finite pixels (one line
        naming the file and client). The test file is read here; a training client
        when a round first needs it (its arrays are read lazily).
    """
    require_files(missing_tff_files(config, layout), layout.source)
    folder = _data_dir(config, layout)
    log.info(
        "%s keeps TFF's natural split (one client per %s); data_args.partition_method %r is ignored",
        layout.name, "writer" if layout.name == "fed_emnist" else "TFF client", config.partition_method,
    )
    train = H5Clients(folder / layout.train_file, layout)
    n = config.client_num_in_total
    if n > len(train.ids):
        raise FieldError(
            "client_num_in_total",
            f"{n} clients, but {train.path} holds {len(train.ids)} (the natural split, one per "
            f"{'writer' if layout.name == 'fed_emnist' else 'client'}; the full file has {layout.natural_clients}); "
            f"use at most {len(train.ids)}",
        )
    ids = train.ids[:n]
    counts = {client: train.count(cid) for client, cid in enumerate(ids)}  # metadata only

    # The global test set: every example of the test file, in sorted client order; each
    # client's local test loader is a view of its own rows (or empty).
    test = H5Clients(folder / layout.test_file, layout)
    xs, ys, rows = [], [], {}
    start = 0
    for cid in test.ids:
        x, y = test.read(cid)
        xs.append(x)
        ys.append(y)
        rows[cid] = (start, start + len(y))
        start += len(y)
    x_test = torch.cat(xs) if xs else _empty(layout)[0]
    y_test = torch.cat(ys) if ys else _empty(layout)[1]
    del xs, ys
    b = config.batch_size

    def local_test(client: int) -> TensorBatches:
        lo, hi = rows.get(ids[client], (0, 0))
        return TensorBatches(x_test[lo:hi], y_test[lo:hi], b, shuffle=False, client_index=client)

    augment = crop_flip_for(layout.mean, layout.std, layout.input_shape[0]) if layout.augment else None

    def local_train(client: int) -> TensorBatches:
        x, y = train.read(ids[client])
        return TensorBatches(x, y, b, shuffle=True, client_index=client, augment=augment)

    train_local = LazyClientLoaders(n, local_train, b)
    test_local = LazyClientLoaders(n, local_test, b)
    fedml_dataset: list[Any] = [
        int(sum(counts.values())),
        int(y_test.shape[0]),
        ChainedBatches(train_local, counts),
        TensorBatches(x_test, y_test, b, shuffle=False),
        counts,
        train_local,
        test_local,
        layout.num_classes,
    ]
    return FederatedData(
        fedml_dataset=fedml_dataset, input_shape=layout.input_shape, num_classes=layout.num_classes, name=layout.name
    )


def _register(layout: TffLayout) -> DatasetSpec:
    return register_dataset(
        DatasetSpec(
            name=layout.name,
            load=lambda config: load_tff_federated(config, layout),
            task=lambda data: ClassificationTask(),
            spatial_dims=2,
            description=f"TFF's {layout.train_file}/{layout.test_file} at data_cache_dir, natural clients",
            shape=lambda config: (layout.input_shape, layout.num_classes),
            check=lambda config: missing_tff_files(config, layout),
            source=layout.source,
        )
    )


FED_EMNIST_SPEC = _register(FED_EMNIST)
FED_CIFAR100_SPEC = _register(FED_CIFAR100)
