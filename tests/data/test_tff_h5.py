"""TFF federated h5 (fed_emnist, fed_cifar100): natural clients, lazy loaders, test sets and errors."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedml_progfed.config import RunConfig, explain
from fedml_progfed.data import load_federated_data, write_tff_fixture
from fedml_progfed.data.batches import RandomCropFlip
from fedml_progfed.data.lazy_loaders import LOADER_CACHE
from fedml_progfed.data.tff_h5 import FED_CIFAR100, H5Clients
from fedml_progfed.errors import DataError, FieldError
from fedml_progfed.tasks.classification import ClassificationTask


@pytest.fixture(scope="module")
def emnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 8 writers, the first 6 with test data.
    return write_tff_fixture(tmp_path_factory.mktemp("femnist"), "fed_emnist", clients=8, per_client=4, seed=0, test_clients=6)


def _config(folder: Path, name: str = "fed_emnist", clients: int = 5, **extra) -> RunConfig:
    return RunConfig(dataset=name, data_cache_dir=str(folder), client_num_in_total=clients, client_num_per_round=2,
                     batch_size=3, **extra)


class _CountingReads:
    """Counts H5Clients.read calls per file name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[str, int] = {}
        original = H5Clients.read

        def read(reader: H5Clients, client_id: str):
            self.calls[reader.path.name] = self.calls.get(reader.path.name, 0) + 1
            return original(reader, client_id)

        monkeypatch.setattr(H5Clients, "read", read)


def test_natural_clients_in_sorted_order_with_their_own_data(emnist_dir: Path) -> None:
    data = load_federated_data(_config(emnist_dir, clients=5))
    with h5py.File(emnist_dir / "fed_emnist_train.h5", "r") as f, h5py.File(emnist_dir / "fed_emnist_test.h5", "r") as t:
        ids = sorted(f["examples"].keys())[:5]
        for client, cid in enumerate(ids):
            pixels, labels = f["examples"][cid]["pixels"][()], f["examples"][cid]["label"][()]
            assert data.train_local_num[client] == len(labels)
            loader = data.train_local[client]
            assert loader.client_index == client and loader.shuffle and loader.augment is None
            assert torch.equal(loader.x, torch.from_numpy(pixels)[:, None])  # pixels as stored, channel axis added
            assert torch.equal(loader.y, torch.from_numpy(labels.astype(np.int64)))
            local_test = data.test_local[client]
            assert torch.equal(local_test.y, torch.from_numpy(t["examples"][cid]["label"][()].astype(np.int64)))
        all_test = sum(len(t["examples"][c]["label"]) for c in t["examples"])
    assert data.train_data_num == sum(data.train_local_num.values())
    assert data.test_data_num == all_test == data.test_global.num_samples  # the whole test file
    assert data.input_shape == (1, 28, 28) and data.num_classes == 62 and data.num_clients == 5
    # The global training loader chains the clients' batches.
    assert sum(len(y) for _, y in data.train_global) == data.train_data_num


def test_a_client_without_test_data_has_an_empty_local_test_loader(emnist_dir: Path) -> None:
    data = load_federated_data(_config(emnist_dir, clients=8))
    empty = data.test_local[7]  # writers 6 and 7 have no test group
    assert empty.num_samples == 0 and len(empty) == 0 and list(empty) == []
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 62))
    scores = ClassificationTask().evaluate(model, empty, torch.device("cpu"))
    assert math.isnan(scores["test_metric"])


def test_more_clients_than_writers_is_an_error(emnist_dir: Path) -> None:
    with pytest.raises(FieldError) as err:
        load_federated_data(_config(emnist_dir, clients=9))
    line = explain(err.value)
    assert line.startswith("train_args.client_num_in_total: 9 clients, but ") and "holds 8" in line and "\n" not in line


def test_partition_method_is_ignored_with_one_log_line(emnist_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedml_progfed")
    a = load_federated_data(_config(emnist_dir, partition_method="iid"))
    b = load_federated_data(_config(emnist_dir, partition_method="dirichlet", partition_alpha=0.1))
    assert dict(a.train_local_num) == dict(b.train_local_num)
    lines = [r.getMessage() for r in caplog.records if "partition_method" in r.getMessage()]
    assert len(lines) == 2 and "natural split" in lines[0] and "'iid' is ignored" in lines[0]


def test_scale_builds_without_reading_client_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_tff_fixture(tmp_path, "fed_emnist", clients=300, per_client=1, seed=0, test_clients=20, test_per_client=1)
    reads = _CountingReads(monkeypatch)
    data = load_federated_data(_config(folder, clients=300))
    # Counts come from metadata: no training array is read to build the federation; the
    # test file is read once, for the server's global test set.
    assert reads.calls.get("fed_emnist_train.h5", 0) == 0 and data.train_local.built == 0
    assert reads.calls["fed_emnist_test.h5"] == 20
    assert data.train_data_num == sum(data.train_local_num.values()) >= 300
    # A round touches only its clients; asking again within the round hits the cache.
    for client in (3, 150, 299):
        for _ in range(4):  # the standalone loop asks for a client's loader four times
            data.train_local[client]
    assert reads.calls["fed_emnist_train.h5"] == 3 and data.train_local.built == 3
    data.test_local[150]
    assert reads.calls["fed_emnist_test.h5"] == 20  # local test loaders are views of the global set
    for client in range(10):
        data.train_local[client]
    assert len(data.train_local._cache) <= LOADER_CACHE  # memory follows the round, not the federation
    assert len(data.train_local) == 300 and 299 in data.train_local and 300 not in data.train_local
    with pytest.raises(KeyError):
        data.train_local[300]


def test_fed_cifar100_images_are_normalised_and_augmented(tmp_path: Path) -> None:
    folder = write_tff_fixture(tmp_path, "fed_cifar100", clients=6, per_client=3, seed=1, test_clients=2)
    data = load_federated_data(_config(folder, "fed_cifar100", clients=6))
    with h5py.File(folder / "fed_cifar100_train.h5", "r") as f:
        cid = sorted(f["examples"].keys())[0]
        image = f["examples"][cid]["image"][()]
    expected = (torch.from_numpy(image.transpose(0, 3, 1, 2)).float() / 255 - torch.tensor(FED_CIFAR100.mean).view(1, 3, 1, 1)) / (
        torch.tensor(FED_CIFAR100.std).view(1, 3, 1, 1)
    )
    loader = data.train_local[0]
    assert torch.allclose(loader.x, expected, atol=1e-6)
    assert isinstance(loader.augment, RandomCropFlip) and data.test_global.augment is None
    assert data.test_data_num == 2 * 2  # test ids 0 and 1, two images each
    assert data.test_local[0].num_samples == 2 and data.test_local[5].num_samples == 0


def test_not_an_h5_file_is_one_data_error(tmp_path: Path) -> None:
    (tmp_path / "fed_emnist_train.h5").write_bytes(b"not hdf5 at all")
    (tmp_path / "fed_emnist_test.h5").write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_federated_data(_config(tmp_path, clients=1))
    assert str(tmp_path / "fed_emnist_train.h5") in str(err.value) and "not a readable h5 file" in str(err.value)
    assert "fed_emnist.tar.bz2" in str(err.value) and "\n" not in str(err.value)


def test_a_file_without_examples_or_with_wrong_shapes_names_the_file_and_client(tmp_path: Path) -> None:
    write_tff_fixture(tmp_path, "fed_emnist", clients=2, per_client=2, seed=0)
    with h5py.File(tmp_path / "fed_emnist_test.h5", "w") as f:
        f.create_group("snippets")
    with pytest.raises(DataError, match="no 'examples' group"):
        load_federated_data(_config(tmp_path, clients=2))
    with h5py.File(tmp_path / "fed_emnist_train.h5", "a") as f:
        cid = sorted(f["examples"].keys())[1]
        del f["examples"][cid]["pixels"]
        f["examples"][cid].create_dataset("pixels", data=np.zeros((2, 32, 32), np.float32))
    with pytest.raises(DataError) as err:
        load_federated_data(_config(tmp_path, clients=2))
    assert f"client {cid!r}" in str(err.value) and "expected (n, 28, 28)" in str(err.value)
