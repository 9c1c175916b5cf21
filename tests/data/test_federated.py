"""FedML's 8-element list from federate_arrays and the fashion_mnist spec, and TensorBatches."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedml_progfed.config import RunConfig, explain
from fedml_progfed.data import (
    FederatedData,
    TensorBatches,
    federate_arrays,
    load_federated_data,
    read_fashion_mnist,
    write_idx_fixture,
)
from fedml_progfed.data.fashion_mnist import FASHION_MNIST_DIR
from fedml_progfed.errors import FieldError

REAL_DIR = Path(FASHION_MNIST_DIR)


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idx_fixture(tmp_path_factory.mktemp("fmnist"), 600, 100, seed=0)


def _load(
    directory: Path | None, method: str = "iid", clients: int = 5, seed: int = 0, batch: int = 16, alpha: float = 0.5
) -> FederatedData:
    """Through the registry, as a run loads it."""
    config = RunConfig(
        dataset="fashion_mnist", data_cache_dir=None if directory is None else str(directory), client_num_in_total=clients, client_num_per_round=1,
        partition_method=method, partition_alpha=alpha, batch_size=batch, random_seed=seed,
    )
    return load_federated_data(config)


# --------------------------------------------------------------------------- the 8-element list


@pytest.mark.parametrize("method", ["iid", "hetero", "shards"])
def test_fedml_list_types_and_sums(fixture_dir: Path, method: str) -> None:
    fed = _load(fixture_dir, method=method, clients=5)
    items = fed.as_list()
    assert isinstance(items, list) and len(items) == 8
    train_num, test_num, train_global, test_global, local_num, train_local, test_local, class_num = items
    assert (train_num, test_num, class_num) == (600, 100, 10)
    assert all(type(v) is int for v in (train_num, test_num, class_num))
    assert isinstance(train_global, TensorBatches) and train_global.shuffle
    assert isinstance(test_global, TensorBatches) and not test_global.shuffle
    for d in (local_num, train_local, test_local):
        assert isinstance(d, dict) and sorted(d) == list(range(5))
    assert all(type(n) is int for n in local_num.values())
    assert sum(local_num.values()) == train_num == train_global.num_samples == len(train_global.dataset)
    assert all(train_local[c].num_samples == local_num[c] and train_local[c].shuffle for c in range(5))
    assert sum(t.num_samples for t in test_local.values()) == test_num == test_global.num_samples
    assert all(t.num_samples >= 1 and not t.shuffle for t in test_local.values())  # every client can test
    assert (fed.input_shape, fed.num_classes, fed.name, fed.num_clients) == ((1, 28, 28), 10, "fashion_mnist", 5)
    assert fed.as_list() is not fed.fedml_dataset  # callers get their own list

    x, y = next(iter(train_local[0]))
    assert x.dtype == torch.float32 and x.shape == (16, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (16,)


def test_images_are_scaled_and_normalised(fixture_dir: Path) -> None:
    fed = _load(fixture_dir)
    raw = read_fashion_mnist(fixture_dir)
    expected = (torch.from_numpy(raw.x_test).float() / 255.0 - 0.2860) / 0.3530
    xs, ys = zip(*fed.as_list()[3])  # global test: unshuffled, original order
    torch.testing.assert_close(torch.cat(xs), expected)
    assert torch.equal(torch.cat(ys), torch.from_numpy(raw.y_test))
    # Client training data are exactly the training samples, each once (compared by per-image sums).
    all_x = torch.cat([b.x for b in fed.train_local.values()])
    expected_train = (torch.from_numpy(raw.x_train).float() / 255.0 - 0.2860) / 0.3530
    torch.testing.assert_close(all_x.sum(dim=(1, 2, 3)).sort().values, expected_train.sum(dim=(1, 2, 3)).sort().values)
    # Client test sets together are the test set, each sample once.
    local_test_x = torch.cat([b.x for b in fed.test_local.values()])
    torch.testing.assert_close(local_test_x.sum(dim=(1, 2, 3)).sort().values, expected.sum(dim=(1, 2, 3)).sort().values)


def test_load_is_deterministic(fixture_dir: Path) -> None:
    a, b, c = _load(fixture_dir, "hetero", seed=3), _load(fixture_dir, "hetero", seed=3), _load(fixture_dir, "hetero", seed=4)
    for client in range(5):
        assert torch.equal(a.train_local[client].x, b.train_local[client].x)
        assert torch.equal(a.test_local[client].y, b.test_local[client].y)
    assert a.train_local_num != c.train_local_num


def test_hetero_clients_are_label_skewed(fixture_dir: Path) -> None:
    fed = federate_arrays(read_fashion_mnist(fixture_dir), 5, "dirichlet", 0.1, 16, 0)
    shares = [np.bincount(b.y.numpy(), minlength=10).max() / b.num_samples for b in fed.train_local.values()]
    assert np.mean(shares) > 0.3  # IID would give about 0.1-0.15


def test_shards_give_each_client_two_labels(fixture_dir: Path) -> None:
    # 600 balanced samples, 10 clients: 20 single-label shards of 30, two per client.
    fed = _load(fixture_dir, method="shards", clients=10)
    labels = [set(fed.train_local[c].y.tolist()) for c in range(10)]
    assert all(fed.train_local[c].num_samples == 60 for c in range(10))
    assert max(map(len, labels)) == 2 and sum(len(s) == 2 for s in labels) >= 8
    again = _load(fixture_dir, method="shards", clients=10)
    assert all(torch.equal(fed.train_local[c].y, again.train_local[c].y) for c in range(10))


@pytest.mark.parametrize(
    "changes,key,words",
    [
        ({"method": "bogus"}, "data_args.partition_method", ["'bogus'", "dirichlet, hetero, homo, iid"]),
        ({"method": "hetero", "alpha": 0.0}, "data_args.partition_alpha", ["0.0", "> 0"]),
        # 200 clients fit the 600 training samples (iid) but not the 100 test samples.
        ({"clients": 200}, "train_args.client_num_in_total", ["200 clients but the fashion_mnist test set has only 100"]),
        ({"method": "shards", "clients": 301}, "train_args.client_num_in_total", ["301 clients x 2 label shards", "only 600"]),
    ],
)
def test_data_dependent_errors_name_the_key(fixture_dir: Path, changes: dict, key: str, words: list[str]) -> None:
    with pytest.raises(FieldError) as err:
        _load(fixture_dir, **changes)
    line = explain(err.value)
    assert line.startswith(f"{key}: ") and "\n" not in line
    assert all(word in line for word in words), line


def test_fixture_is_learnable(fixture_dir: Path) -> None:
    # The fixture must let a small CNN beat chance (10 %) quickly; other tests rely on it.
    torch.manual_seed(0)
    fed = _load(fixture_dir, clients=1, batch=32)
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine OpenMP threads contend and a step gets ~80x slower.
    torch.set_num_threads(1)
    try:
        correct = _train_and_count_correct(fed)
    finally:
        torch.set_num_threads(threads)
    assert correct / fed.test_data_num > 0.5


def _train_and_count_correct(fed: FederatedData) -> int:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(8 * 7 * 7, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for x, y in fed.train_global:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in fed.test_global)


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"{REAL_DIR} absent (Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist_100_clients() -> None:
    start = time.perf_counter()
    fed = _load(None, "hetero", clients=100, batch=32)  # the default folder
    elapsed = time.perf_counter() - start
    items = fed.as_list()
    assert (items[0], items[1], items[7]) == (60000, 10000, 10)
    assert sum(items[4].values()) == 60000 and len(items[5]) == len(items[6]) == 100
    assert min(items[4].values()) >= 10
    assert sum(t.num_samples for t in items[6].values()) == 10000
    assert elapsed < 10, f"loading took {elapsed:.1f} s"


# --------------------------------------------------------------------------- TensorBatches


def _batches(n: int = 10, batch: int = 4, shuffle: bool = True) -> TensorBatches:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1)
    return TensorBatches(x, torch.arange(n), batch, shuffle)


def test_tensor_batches_shape_and_length() -> None:
    loader = _batches(10, 4, shuffle=False)
    assert len(loader) == 3 and loader.num_samples == 10 and loader.batch_size == 4
    assert isinstance(loader.dataset, TensorDataset) and len(loader.dataset) == 10
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2]  # last batch partial, nothing dropped
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))
    assert all(torch.equal(x[:, 0].long(), y) for x, y in batches)  # x and y stay paired
    assert len(_batches(8, 4)) == 2 and len(_batches(0, 4)) == 0 and list(_batches(0, 4)) == []


def test_tensor_batches_shuffle_follows_global_torch_seed() -> None:
    loader = _batches(50, 8, shuffle=True)

    def order() -> list[int]:
        return torch.cat([y for _, y in loader]).tolist()

    torch.manual_seed(123)
    first = order()
    second = order()  # a new permutation every pass
    torch.manual_seed(123)
    assert order() == first
    torch.manual_seed(124)
    assert order() != first
    assert first != second and sorted(first) == list(range(50))
    # Same as torch.randperm drawn from the global generator.
    torch.manual_seed(7)
    expected = torch.randperm(50).tolist()
    torch.manual_seed(7)
    assert order() == expected
    for x, y in loader:
        assert torch.equal(x[:, 0].long(), y)


def test_tensor_batches_unshuffled_does_not_touch_rng() -> None:
    torch.manual_seed(0)
    state = torch.get_rng_state()
    list(_batches(20, 3, shuffle=False))
    assert torch.equal(torch.get_rng_state(), state)


def test_tensor_batches_rejects_mismatched_tensors() -> None:
    with pytest.raises(ValueError, match="10 samples but y has 9"):
        TensorBatches(torch.zeros(10, 1), torch.zeros(9), 2, False)
