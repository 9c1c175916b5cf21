"""One data rule for every reader: labels are whole numbers in [0, num_classes), inputs are finite.

Each case writes a small corrupt file of the real format into tmp_path and expects one
DataError line naming the file (and, where the file has clients, the client) and the
first bad index.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedml_progfed.cli import main
from fedml_progfed.config import RunConfig
from fedml_progfed.data import load_federated_data, write_cifar_fixture, write_idx_fixture, write_tff_fixture
from fedml_progfed.data.checks import check_finite, check_labels
from fedml_progfed.data.cifar import CIFAR10, read_cifar_file
from fedml_progfed.data.fashion_mnist import read_fashion_mnist
from fedml_progfed.data.idx import write_idx
from fedml_progfed.errors import DataError

PAPER = Path(__file__).resolve().parents[2] / "config" / "paper"


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------- the rule itself


@pytest.mark.parametrize(
    "labels,needle",
    [
        (np.array([b"cat", b"dog"]), "index 0: label b'cat' is not an integer"),
        (np.array(["0", "1"]), "index 0: label '0' is not an integer"),
        (np.array([0, b"cat"], dtype=object), "index 1: label b'cat' is not an integer"),
        (np.array([0.0, 1.0, 2.5]), "index 2: label 2.5 is not a whole number"),
        (np.array([0.0, np.nan]), "index 1: label nan is not a whole number"),
        (np.array([3, 0, -1]), "index 2: label -1 out of range [0, 4)"),
        (np.array([3, 4, 0]), "index 1: label 4 out of range [0, 4)"),
        (np.array([True, False]), "index 0: label True is not an integer"),
    ],
)
def test_bad_labels_name_the_first_bad_index(labels: np.ndarray, needle: str) -> None:
    with pytest.raises(DataError) as err:
        check_labels(labels, 4, "f.h5: client 'w1'", "get a good copy")
    message = _one_line(err, "f.h5: client 'w1': ", needle, "get a good copy")
    assert "[0, 4)" in message


@pytest.mark.parametrize("labels", [np.array([0, 3, 1], np.uint8), np.array([0.0, 3.0]), [1, 2, 3], np.array([[2], [0]])])
def test_good_labels_come_back_as_int64(labels) -> None:
    out = check_labels(labels, 4, "x", "fix")
    assert out.dtype == np.int64 and out.ndim == 1
    np.testing.assert_array_equal(out, np.asarray(labels).reshape(-1))


def test_non_finite_inputs_are_one_error_and_integers_are_not_scanned() -> None:
    x = np.zeros((3, 2, 2), np.float32)
    x[1, 0, 1] = np.inf
    x[2, 1, 1] = np.nan
    with pytest.raises(DataError) as err:
        check_finite(x, "f.h5: client 'w1'", "get a good copy")
    _one_line(err, "f.h5: client 'w1': ", "2 NaN or infinite pixels", "first at index (1, 0, 1)", "get a good copy")
    check_finite(np.zeros((2, 2), np.float32), "x", "fix")
    check_finite(np.full((2, 2), 255, np.uint8), "x", "fix")  # integers are always finite


# --------------------------------------------------------------------------- TFF h5


def _emnist(tmp_path: Path) -> Path:
    return write_tff_fixture(tmp_path, "fed_emnist", clients=3, per_client=4, seed=0, test_clients=2)


def _config(folder: Path, name: str = "fed_emnist", clients: int = 3) -> RunConfig:
    return RunConfig(dataset=name, data_cache_dir=str(folder), client_num_in_total=clients, client_num_per_round=2,
                     batch_size=3)


def _replace(path: Path, client: int, key: str, values: np.ndarray) -> str:
    """Rewrite one dataset of the ``client``-th group (sorted ids); returns the client id."""
    with h5py.File(path, "a") as f:
        cid = sorted(f["examples"].keys())[client]
        del f["examples"][cid][key]
        f["examples"][cid].create_dataset(key, data=values)
    return cid


def _labels_of(path: Path, client: int) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["examples"][sorted(f["examples"].keys())[client]]["label"][()]


def test_string_labels_in_h5_are_one_error_naming_file_client_and_index(tmp_path: Path) -> None:
    folder = _emnist(tmp_path)
    test_file = folder / "fed_emnist_test.h5"
    n = len(_labels_of(test_file, 1))
    cid = _replace(test_file, 1, "label", np.array([b"cat"] * n))
    with pytest.raises(DataError) as err:
        load_federated_data(_config(folder))  # the test file is read at load
    _one_line(err, str(test_file), f"client {cid!r}", "index 0: label b'cat' is not an integer", "fed_emnist.tar.bz2")


def test_float_labels_are_not_truncated(tmp_path: Path) -> None:
    folder = _emnist(tmp_path)
    test_file = folder / "fed_emnist_test.h5"
    labels = _labels_of(test_file, 0).astype(np.float32)
    whole = _replace(test_file, 0, "label", labels)  # whole numbers stored as floats are fine
    assert load_federated_data(_config(folder)).test_data_num > 0
    labels[1] = 2.5
    _replace(test_file, 0, "label", labels)
    with pytest.raises(DataError) as err:
        load_federated_data(_config(folder))
    _one_line(err, str(test_file), f"client {whole!r}", "index 1: label 2.5 is not a whole number")


def test_out_of_range_h5_labels_name_the_first_bad_index(tmp_path: Path) -> None:
    folder = _emnist(tmp_path)
    test_file = folder / "fed_emnist_test.h5"
    labels = _labels_of(test_file, 0).copy()
    labels[-1] = 62
    cid = _replace(test_file, 0, "label", labels)
    with pytest.raises(DataError) as err:
        load_federated_data(_config(folder))
    _one_line(err, str(test_file), f"client {cid!r}", f"index {len(labels) - 1}: label 62 out of range [0, 62)")


def test_nan_pixels_of_a_training_client_are_a_data_error_when_it_is_read(tmp_path: Path) -> None:
    folder = _emnist(tmp_path)
    train_file = folder / "fed_emnist_train.h5"
    with h5py.File(train_file, "r") as f:
        cid = sorted(f["examples"].keys())[2]
        pixels = f["examples"][cid]["pixels"][()]
    pixels[1, 5, 5] = np.nan
    _replace(train_file, 2, "pixels", pixels)
    data = load_federated_data(_config(folder))  # training clients are read when a round needs them
    data.train_local[0]
    with pytest.raises(DataError) as err:
        data.train_local[2]
    _one_line(err, str(train_file), f"client {cid!r}", "1 NaN or infinite pixels", "first at index (1, 5, 5)")


def test_nan_pixels_end_the_run_with_one_error_line_not_a_run_at_zero(tmp_path: Path, capsys) -> None:
    folder = _emnist(tmp_path / "data")
    train_file = folder / "fed_emnist_train.h5"
    with h5py.File(train_file, "a") as f:  # every writer's pixels: each update would be NaN
        for cid in f["examples"]:
            f["examples"][cid]["pixels"][0, 0, 0] = np.nan
    code = main(["run", "--cf", str(PAPER / "emnist_convnet.yaml"), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", f"data_args.data_cache_dir={folder}", "train_args.client_num_in_total=3",
                 "train_args.client_num_per_round=2", "train_args.comm_round=2", "device_args.using_gpu=false",
                 "progfed_args.progfed_stages=2", "progfed_args.progfed_schedule=[1,1]",
                 "progfed_args.progfed_warmup_rounds=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and str(train_file) in err[0] and "client '" in err[0]
    assert "1 NaN or infinite pixels" in err[0] and "first at index (0, 0, 0)" in err[0]


# --------------------------------------------------------------------------- CIFAR pickles and IDX


@pytest.mark.parametrize(
    "labels,needle",
    [
        ([0, 1, 2.5] + [0] * 7, "index 2: label 2.5 is not a whole number"),
        ([0, b"cat"] + [0] * 8, "index 1: label b'cat' is not an integer"),
        ([0] * 9 + [10], "index 9: label 10 out of range [0, 10)"),
    ],
)
def test_cifar_labels_follow_the_same_rule(tmp_path: Path, labels: list, needle: str) -> None:
    write_cifar_fixture(tmp_path, "cifar10", per_file=10, seed=0)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes())
    batch[b"labels"] = labels
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError) as err:
        read_cifar_file(path, CIFAR10)
    _one_line(err, str(path), needle, "cifar-10-python.tar.gz")


def test_cifar_whole_float_labels_are_read_as_integers(tmp_path: Path) -> None:
    write_cifar_fixture(tmp_path, "cifar10", per_file=10, seed=0)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = pickle.loads(path.read_bytes())
    batch[b"labels"] = [float(v) for v in batch[b"labels"]]
    path.write_bytes(pickle.dumps(batch))
    _, y = read_cifar_file(path, CIFAR10)
    assert y.dtype == np.int64 and list(y) == [int(v) for v in batch[b"labels"]]


def test_idx_labels_out_of_range_name_the_file_and_index(tmp_path: Path) -> None:
    write_idx_fixture(tmp_path, 20, 10, seed=0)
    labels = np.zeros(10, np.uint8)
    labels[7] = 11
    path = write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(DataError) as err:
        read_fashion_mnist(tmp_path)
    _one_line(err, str(path), "index 7: label 11 out of range [0, 10)", "dataset-fashion-mnist")


def test_a_nan_voxel_in_a_brats_volume_is_the_same_error(tmp_path: Path) -> None:
    import nibabel as nib

    from fedml_progfed.data import write_brats_demo
    from fedml_progfed.data.brats import load_brats_case

    case = Path(write_brats_demo(tmp_path, 1, shape=(16, 16, 16), seed=0)[0])
    t2 = next(case.glob("*_t2.nii*"))
    image = nib.load(str(t2))
    data = np.asarray(image.get_fdata(), dtype=np.float32)
    data[1, 2, 3] = np.inf
    nib.save(nib.Nifti1Image(data, image.affine), str(t2))
    with pytest.raises(DataError) as err:
        load_brats_case(case)
    _one_line(err, f"case {case.name}", t2.name, "1 NaN or infinite voxels", "first at index (1, 2, 3)")
