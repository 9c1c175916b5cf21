"""CIFAR-10/100 pickle batches: the restricted unpickler, the reader's checks, normalisation and augmentation."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedml_progfed.config import RunConfig, explain
from fedml_progfed.data import load_federated_data, write_cifar_fixture
from fedml_progfed.data.batches import RandomCropFlip, TensorBatches
from fedml_progfed.data.cifar import CIFAR10, CIFAR100, cifar_folder, read_cifar, read_cifar_file
from fedml_progfed.data.safe_pickle import load_data_pickle
from fedml_progfed.errors import DataError, FieldError


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar_fixture(tmp_path_factory.mktemp("c10"), "cifar10", per_file=10, seed=0)


# --------------------------------------------------------------------------- the restricted unpickler


class _Payload:
    """Pickles as a call of ``os.system`` with a command that creates a marker file."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _EvalPayload:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def _crafted_batch(folder: Path, payload: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data_batch_1"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"hook": payload}
    path.write_bytes(pickle.dumps(batch))
    return path


def test_a_pickle_calling_os_system_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _crafted_batch(tmp_path / "cifar-10-batches-py", _Payload(f"touch {marker}"))
    with pytest.raises(DataError) as err:
        read_cifar_file(path, CIFAR10)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "refused" in message and f"{os.system.__module__}.system" in message  # posix.system on Linux
    assert not marker.exists()


def test_the_crafted_payload_would_run_under_plain_pickle(tmp_path: Path) -> None:
    # The control for the test above: the same bytes do create the marker with pickle.load.
    marker = tmp_path / "ran"
    path = _crafted_batch(tmp_path / "c", _Payload(f"touch {marker}"))
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_builtins_eval_is_refused(tmp_path: Path) -> None:
    path = _crafted_batch(tmp_path / "c", _EvalPayload())
    with pytest.raises(DataError, match="refused to unpickle: it calls builtins.eval"):
        load_data_pickle(path, fix="get a clean copy")


def test_numpy_arrays_and_python2_style_bytes_keys_are_admitted(tmp_path: Path) -> None:
    path = tmp_path / "batch"
    data = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2], b"names": {b"a", b"b"}}
    for protocol in (2, 4):
        path.write_bytes(pickle.dumps({**data, b"labels": np.array([1, 2])}, protocol=protocol))
        loaded = load_data_pickle(path, fix="")
        assert np.array_equal(loaded[b"data"], data[b"data"]) and list(loaded[b"labels"]) == [1, 2]


def test_garbage_and_truncated_files_are_one_data_error(cifar10_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cifar-10-batches-py"
    bad.mkdir()
    good = (cifar10_dir / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    (bad / "data_batch_1").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError) as err:
        read_cifar_file(bad / "data_batch_1", CIFAR10)
    assert "not a readable pickle" in str(err.value) and "cifar-10-python.tar.gz" in str(err.value)


# --------------------------------------------------------------------------- the reader


def test_reader_shapes_labels_and_folder_forms(cifar10_dir: Path) -> None:
    data = read_cifar(cifar10_dir, CIFAR10)
    assert data.x_train.shape == (50, 3, 32, 32) and data.x_test.shape == (10, 3, 32, 32)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    # Row layout: 1024 red, then green, then blue values, each a row-major 32x32 plane.
    raw = pickle.loads((cifar10_dir / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert np.array_equal(data.x_train[0, 1], raw[b"data"][0, 1024:2048].reshape(32, 32))
    assert list(data.y_train[:10]) == raw[b"labels"]
    # The batches folder itself works as data_cache_dir too.
    inner = cifar10_dir / "cifar-10-batches-py"
    assert cifar_folder(inner, CIFAR10) == inner
    assert np.array_equal(read_cifar(inner, CIFAR10).x_test, data.x_test)


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    data = read_cifar(write_cifar_fixture(tmp_path, "cifar100", per_file=200, seed=1), CIFAR100)
    assert data.num_classes == 100 and data.y_train.max() == 99 and data.x_train.shape == (200, 3, 32, 32)


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda b: b.pop(b"labels"), "no 'labels' entry"),
        (lambda b: b.__setitem__(b"data", b[b"data"][:, :100]), "expected uint8 (N, 3072)"),
        (lambda b: b.__setitem__(b"labels", b[b"labels"][:-1]), "labels for 10 images"),
        (lambda b: b.__setitem__(b"labels", [10] * 10), "index 0: label 10 out of range [0, 10)"),
    ],
)
def test_malformed_batches_name_the_file(cifar10_dir: Path, tmp_path: Path, change, needle: str) -> None:
    batch = pickle.loads((cifar10_dir / "cifar-10-batches-py" / "test_batch").read_bytes())
    change(batch)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError) as err:
        read_cifar_file(path, CIFAR10)
    assert needle in str(err.value) and str(path) in str(err.value)


# --------------------------------------------------------------------------- normalisation and augmentation


def test_federated_cifar_is_normalised_per_channel_and_training_batches_are_augmented(cifar10_dir: Path) -> None:
    config = RunConfig(dataset="cifar10", data_cache_dir=str(cifar10_dir), client_num_in_total=5, client_num_per_round=2,
                       batch_size=4)
    data = load_federated_data(config)
    raw = read_cifar(cifar10_dir, CIFAR10)
    expected = (torch.from_numpy(raw.x_test).float() / 255 - torch.tensor(CIFAR10.mean).view(1, 3, 1, 1)) / torch.tensor(
        CIFAR10.std
    ).view(1, 3, 1, 1)
    assert torch.allclose(data.test_global.x, expected, atol=1e-6)
    assert data.test_global.augment is None and all(data.test_local[c].augment is None for c in range(5))
    assert isinstance(data.train_local[0].augment, RandomCropFlip)
    # Padding is a black pixel after normalisation.
    assert data.train_local[0].augment.fill == pytest.approx([-m / s for m, s in zip(CIFAR10.mean, CIFAR10.std)])


def _reference_crop_flip(x: torch.Tensor, pad: int, fill: list[float]) -> torch.Tensor:
    """Per-sample crop and flip, drawing the same numbers in the same order as RandomCropFlip."""
    b, c, h, w = x.shape
    top = torch.randint(0, 2 * pad + 1, (b,))
    left = torch.randint(0, 2 * pad + 1, (b,))
    flip = torch.rand(b) < 0.5
    out = []
    for i in range(b):
        canvas = torch.tensor(fill).view(c, 1, 1).repeat(1, h + 2 * pad, w + 2 * pad)
        canvas[:, pad : pad + h, pad : pad + w] = x[i]
        crop = canvas[:, top[i] : top[i] + h, left[i] : left[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_crop_flip_matches_a_per_sample_reference_and_is_seeded_by_the_global_rng() -> None:
    x = torch.randn(6, 3, 8, 8)
    augment = RandomCropFlip(pad=2, fill=[-1.0, 0.0, 2.0])
    torch.manual_seed(3)
    fast = augment(x)
    torch.manual_seed(3)
    reference = _reference_crop_flip(x, 2, [-1.0, 0.0, 2.0])
    assert torch.equal(fast, reference)
    assert not torch.equal(fast, x)
    torch.manual_seed(3)
    assert torch.equal(augment(x), fast)  # same seed, same batch


def test_augmenting_loader_is_reproducible_and_evaluation_is_not_augmented() -> None:
    x, y = torch.randn(10, 3, 8, 8), torch.arange(10)
    train = TensorBatches(x, y, 4, shuffle=True, augment=RandomCropFlip(2, [0.0, 0.0, 0.0]))
    torch.manual_seed(0)
    first = [(bx.clone(), by.clone()) for bx, by in train]
    torch.manual_seed(0)
    second = list(train)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    evaluation = TensorBatches(x, y, 4, shuffle=False)
    assert torch.equal(torch.cat([bx for bx, _ in evaluation]), x)


def test_missing_folder_is_a_field_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(FieldError) as err:
        load_federated_data(RunConfig(dataset="cifar100", data_cache_dir=str(tmp_path)))
    line = explain(err.value)
    assert line.startswith(f"data_args.data_cache_dir: {tmp_path / 'cifar-100-python' / 'train'} not found")
    assert "cifar-100-python.tar.gz" in line
