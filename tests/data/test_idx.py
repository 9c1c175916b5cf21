"""IDX reading/writing, the Fashion-MNIST loader and its error messages."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from fedml_progfed.data import fashion_mnist as fashion_mnist_module
from fedml_progfed.data import write_idx_fixture
from fedml_progfed.data.fashion_mnist import read_fashion_mnist
from fedml_progfed.data.idx import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    find_idx_file,
    read_idx,
    read_idx_images,
    read_idx_labels,
    write_idx,
)
from fedml_progfed.errors import DataError

REAL_DIR = Path(fashion_mnist_module.FASHION_MNIST_DIR)
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"


def _assert_one_line_naming(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# --------------------------------------------------------------------------- raw IDX


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_write_read_round_trip(tmp_path: Path, compress: bool, dtype: type) -> None:
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    path = write_idx(tmp_path / ("a.gz" if compress else "a"), array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(back, array)
    back[0, 0, 0] = 1  # writable, owns its memory


def test_headers_are_the_real_ones(tmp_path: Path) -> None:
    write_idx_fixture(tmp_path, 20, 10, seed=0)
    with gzip.open(tmp_path / f"{TRAIN_IMAGES}.gz", "rb") as handle:
        head = handle.read(16)
    assert int.from_bytes(head[:4], "big") == IMAGES_MAGIC == 0x00000803
    assert [int.from_bytes(head[i : i + 4], "big") for i in (4, 8, 12)] == [20, 28, 28]
    raw = gzip.open(tmp_path / f"{TEST_LABELS}.gz", "rb").read()
    assert int.from_bytes(raw[:4], "big") == LABELS_MAGIC == 0x00000801
    assert int.from_bytes(raw[4:8], "big") == 10 and len(raw) == 8 + 10


# --------------------------------------------------------------------------- fixture + loader


@pytest.mark.parametrize("compress", [True, False])
def test_fixture_round_trip(tmp_path: Path, compress: bool) -> None:
    write_idx_fixture(tmp_path, 120, 40, seed=3, gzip=compress)
    suffix = ".gz" if compress else ""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{stem}{suffix}" for stem in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
    )
    data = read_fashion_mnist(tmp_path)
    assert data.name == "fashion_mnist" and data.num_classes == 10
    assert data.x_train.shape == (120, 1, 28, 28) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (40, 1, 28, 28)
    assert data.y_train.dtype == np.int64 and data.y_test.dtype == np.int64
    assert data.input_shape == (1, 28, 28)
    assert (data.mean, data.std) == (0.2860, 0.3530)
    # Balanced labels: every class present in both splits.
    assert np.bincount(data.y_train, minlength=10).tolist() == [12] * 10
    assert set(data.y_test.tolist()) == set(range(10))
    np.testing.assert_array_equal(read_idx_images(tmp_path / f"{TRAIN_IMAGES}{suffix}"), data.x_train[:, 0])
    np.testing.assert_array_equal(read_idx_labels(tmp_path / f"{TRAIN_LABELS}{suffix}"), data.y_train)


def test_fixture_is_deterministic_and_classes_differ(tmp_path: Path) -> None:
    a, b, c = (write_idx_fixture(tmp_path / name, 50, 10, seed=s) for name, s in (("a", 1), ("b", 1), ("c", 2)))
    for stem in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS):
        assert (a / f"{stem}.gz").read_bytes() == (b / f"{stem}.gz").read_bytes()
    assert (a / f"{TRAIN_IMAGES}.gz").read_bytes() != (c / f"{TRAIN_IMAGES}.gz").read_bytes()
    data = read_fashion_mnist(write_idx_fixture(tmp_path / "d", 500, 10, seed=0))
    means = np.stack([data.x_train[data.y_train == k].mean(axis=0).ravel() for k in range(10)])
    gaps = np.abs(means[:, None, :] - means[None, :, :]).mean(axis=2)
    assert gaps[~np.eye(10, dtype=bool)].min() > 10  # each class has its own mean pattern


def test_gz_preferred_when_both_forms_exist(tmp_path: Path) -> None:
    write_idx_fixture(tmp_path, 20, 10, seed=0, gzip=True)
    write_idx_fixture(tmp_path, 30, 10, seed=0, gzip=False)
    assert find_idx_file(tmp_path, TRAIN_IMAGES).name == f"{TRAIN_IMAGES}.gz"
    assert read_fashion_mnist(tmp_path).x_train.shape[0] == 20


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"{REAL_DIR} absent (Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    data = read_fashion_mnist()
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert data.num_classes == 10
    assert np.bincount(data.y_train).tolist() == [6000] * 10
    assert np.bincount(data.y_test).tolist() == [1000] * 10
    # The published normalisation constants match the data.
    scaled = data.x_train.astype(np.float32) / 255.0
    assert abs(float(scaled.mean()) - data.mean) < 1e-3 and abs(float(scaled.std()) - data.std) < 1e-3


# --------------------------------------------------------------------------- errors


@pytest.fixture()
def fixture_dir(tmp_path: Path) -> Path:
    return write_idx_fixture(tmp_path / "fmnist", 40, 20, seed=0)


def test_truncated_gzip(fixture_dir: Path) -> None:
    path = fixture_dir / f"{TRAIN_IMAGES}.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as err:
        read_fashion_mnist(fixture_dir)
    _assert_one_line_naming(err, str(path), "truncated", "apt-get install dataset-fashion-mnist", "data_args.data_cache_dir")


def test_corrupt_gzip(fixture_dir: Path) -> None:
    path = fixture_dir / f"{TEST_LABELS}.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError) as err:
        read_fashion_mnist(fixture_dir)
    _assert_one_line_naming(err, str(path), "corrupt")


def test_gzip_of_truncated_payload(fixture_dir: Path) -> None:
    # Intact gzip stream, but the IDX payload inside is short of what the header says.
    path = fixture_dir / f"{TRAIN_IMAGES}.gz"
    payload = gzip.open(path, "rb").read()
    with gzip.open(path, "wb") as handle:
        handle.write(payload[:-100])
    with pytest.raises(DataError) as err:
        read_fashion_mnist(fixture_dir)
    _assert_one_line_naming(err, str(path), "40 x 28 x 28", "truncated")


def test_trailing_bytes(tmp_path: Path) -> None:
    directory = write_idx_fixture(tmp_path, 40, 20, seed=0, gzip=False)
    path = directory / TEST_IMAGES
    path.write_bytes(path.read_bytes() + b"\x00" * 7)
    with pytest.raises(DataError) as err:
        read_fashion_mnist(directory)
    _assert_one_line_naming(err, str(path), "trailing")


def test_wrong_magic(fixture_dir: Path) -> None:
    path = fixture_dir / f"{TRAIN_IMAGES}.gz"
    write_idx(path, np.zeros(40, dtype=np.uint8))  # a label file where images belong
    with pytest.raises(DataError) as err:
        read_fashion_mnist(fixture_dir)
    _assert_one_line_naming(err, str(path), "magic", "0x00000801", "0x00000803")


def test_not_idx_at_all(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(b"\x12\x34\x56\x78" + b"\x00" * 20)
    with pytest.raises(DataError) as err:
        read_idx(path)
    _assert_one_line_naming(err, str(path), "not an IDX file")


def test_count_mismatch(fixture_dir: Path) -> None:
    write_idx(fixture_dir / f"{TRAIN_LABELS}.gz", np.zeros(39, dtype=np.uint8))
    with pytest.raises(DataError) as err:
        read_fashion_mnist(fixture_dir)
    _assert_one_line_naming(err, str(fixture_dir / f"{TRAIN_IMAGES}.gz"), "40 images", f"{TRAIN_LABELS}.gz", "39 labels")


def test_label_out_of_range(fixture_dir: Path) -> None:
    path = fixture_dir / f"{TEST_LABELS}.gz"
    write_idx(path, np.full(20, 10, dtype=np.uint8))
    with pytest.raises(DataError) as err:
        read_fashion_mnist(fixture_dir)
    _assert_one_line_naming(err, str(path), "label 10 out of range [0, 10)")


def test_wrong_image_size(fixture_dir: Path) -> None:
    path = fixture_dir / f"{TEST_IMAGES}.gz"
    write_idx(path, np.zeros((20, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        read_fashion_mnist(fixture_dir)
    _assert_one_line_naming(err, str(path), "32x32", "28x28")


def test_missing_file(fixture_dir: Path) -> None:
    (fixture_dir / f"{TEST_IMAGES}.gz").unlink()
    with pytest.raises(DataError) as err:
        read_fashion_mnist(fixture_dir)
    _assert_one_line_naming(
        err, str(fixture_dir / f"{TEST_IMAGES}.gz"), "not found", "apt-get install dataset-fashion-mnist",
        f"{TRAIN_IMAGES}.gz", f"{TEST_LABELS}.gz",
    )


def test_missing_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        read_fashion_mnist(missing)
    _assert_one_line_naming(err, str(missing), "does not exist", "dataset-fashion-mnist")
    # The default folder is used when no directory is given.
    monkeypatch.setattr(fashion_mnist_module, "FASHION_MNIST_DIR", str(missing))
    for data_dir in (None, ""):
        with pytest.raises(DataError) as err:
            read_fashion_mnist(data_dir)
        _assert_one_line_naming(err, str(missing), "apt-get install dataset-fashion-mnist")
