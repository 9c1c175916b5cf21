"""The one dataset registry: lookup, duplicate check, errors naming the key, and every spec on a tiny fixture."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from fedml_progfed.config import RunConfig, explain
from fedml_progfed.core.registry import Registry
from fedml_progfed.data import (
    DATASETS,
    DatasetSpec,
    FederatedData,
    dataset_spec,
    load_federated_data,
    register_dataset,
    check_data,
    static_shape,
    task_for,
    write_brats_demo,
    write_cifar_fixture,
    write_idx_fixture,
    write_tff_fixture,
)
from fedml_progfed.data import registry as registry_module
from fedml_progfed.errors import FieldError
from fedml_progfed.tasks import REQUIRED_SCORES, Task

# --------------------------------------------------------------------------- one tiny fixture per registered data set


def _fashion_mnist(tmp: Path) -> RunConfig:
    folder = write_idx_fixture(tmp / "fmnist", num_train=60, num_test=20, seed=0)
    return RunConfig(dataset="fashion_mnist", data_cache_dir=str(folder), client_num_in_total=3, client_num_per_round=1, batch_size=8)


def _brats(tmp: Path) -> RunConfig:
    write_brats_demo(tmp / "brats", cases=4, shape=(16, 16, 16), seed=0)
    return RunConfig(
        dataset="brats", data_cache_dir=str(tmp / "brats"), client_num_in_total=2, client_num_per_round=1, batch_size=2,
        patch_size=(16, 16, 16), eval_mode="center_crop", eval_size=(16, 16, 16), test_fraction=0.25,
    )


def _cifar(name: str) -> Callable[[Path], RunConfig]:
    def build(tmp: Path) -> RunConfig:
        folder = write_cifar_fixture(tmp / name, name, per_file=100 if name == "cifar100" else 10, seed=0)
        return RunConfig(dataset=name, data_cache_dir=str(folder), client_num_in_total=3, client_num_per_round=1, batch_size=8)

    return build


def _tff(name: str) -> Callable[[Path], RunConfig]:
    def build(tmp: Path) -> RunConfig:
        folder = write_tff_fixture(tmp / name, name, clients=4, per_client=3, seed=0, test_clients=3)
        return RunConfig(dataset=name, data_cache_dir=str(folder), client_num_in_total=3, client_num_per_round=1, batch_size=4)

    return build


#: A new data set must add its fixture here, or test_every_spec_has_a_fixture fails.
FIXTURES: dict[str, Callable[[Path], RunConfig]] = {
    "fashion_mnist": _fashion_mnist,
    "brats": _brats,
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "fed_emnist": _tff("fed_emnist"),
    "fed_cifar100": _tff("fed_cifar100"),
}


def _tiny_model(spatial_dims: int, channels: int, num_classes: int) -> nn.Module:
    if spatial_dims == 2:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
    return nn.Conv3d(channels, num_classes, kernel_size=1)  # one logit per region and voxel


def test_every_spec_has_a_fixture() -> None:
    assert {"brats", "fashion_mnist", "cifar10", "cifar100", "fed_emnist", "fed_cifar100"} <= set(DATASETS.names())
    assert set(DATASETS.names()) == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_spec_loads_with_its_rank_and_task(name: str, tmp_path: Path) -> None:
    spec = DATASETS[name]
    assert spec.name == name and spec.spatial_dims in (2, 3)
    assert spec.description and "\n" not in spec.description
    config = FIXTURES[name](tmp_path)

    data = load_federated_data(config)
    assert isinstance(data, FederatedData) and data.name == name
    assert len(data.input_shape) == spec.spatial_dims + 1
    assert data.num_clients == config.client_num_in_total
    x, y = next(iter(data.train_local[0]))
    assert tuple(x.shape[1:]) == data.input_shape  # the model is built for exactly what the loader yields

    # The spec's static answers agree with what loading gives, and the files are all there.
    assert static_shape(config) == (tuple(data.input_shape), data.num_classes)
    check_data(config)
    assert spec.check is not None and spec.check(config) == [] and spec.source

    task = task_for(config, data)
    assert isinstance(task, Task) and task.name and task.metric_name
    torch.manual_seed(0)
    model = _tiny_model(spec.spatial_dims, data.input_shape[0], data.num_classes)
    loss = task.loss(model(x), y)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    scores = task.evaluate(model, data.test_global, torch.device("cpu"))
    assert set(REQUIRED_SCORES) <= set(scores)
    assert all(math.isfinite(scores[key]) for key in REQUIRED_SCORES)
    assert 0.0 <= scores["test_metric"] <= 1.0


def test_brats_task_window_follows_the_patch_size(tmp_path: Path) -> None:
    config = _brats(tmp_path).replace(patch_size=(16, 16, 8), eval_size=(16, 16, 8))
    data = load_federated_data(config)
    assert data.input_shape == (4, 16, 16, 8)
    assert task_for(config, data).roi_size == (16, 16, 8)


# --------------------------------------------------------------------------- lookup and errors


@pytest.mark.parametrize("spelling", ["fashion_mnist", "Fashion-MNIST", "fashion-mnist", " FASHION_MNIST "])
def test_spellings_find_the_same_spec(spelling: str) -> None:
    assert dataset_spec(spelling) is DATASETS["fashion_mnist"]


def test_unknown_dataset_is_one_field_error_listing_the_sets() -> None:
    with pytest.raises(FieldError) as err:
        dataset_spec("cifar11")
    assert err.value.field == "dataset"
    line = explain(err.value)
    assert line.startswith("data_args.dataset: unknown 'cifar11'; available: ")
    assert "brats" in line and "fashion_mnist" in line and "\n" not in line


def test_unknown_dataset_through_the_loader_and_task() -> None:
    config = RunConfig(dataset="cifar11")
    for call in (lambda: load_federated_data(config), lambda: task_for(config, None)):  # type: ignore[arg-type]
        with pytest.raises(FieldError) as err:
            call()
        assert explain(err.value).startswith("data_args.dataset: unknown 'cifar11'")


def test_duplicate_registration_raises() -> None:
    before = DATASETS.names()
    spec = DATASETS["fashion_mnist"]
    with pytest.raises(ValueError, match="'fashion_mnist' is registered twice"):
        register_dataset(spec)
    with pytest.raises(ValueError, match="registered twice"):  # another spelling of the same name
        register_dataset(DatasetSpec("Fashion-MNIST", spec.load, spec.task, 2, "a second copy"))
    assert DATASETS.names() == before and DATASETS["fashion_mnist"] is spec


def test_spatial_dims_must_be_2_or_3() -> None:
    with pytest.raises(ValueError, match="spatial_dims"):
        register_dataset(DatasetSpec("points", lambda config: None, lambda data: None, 1, "point clouds"))  # type: ignore[arg-type]
    assert "points" not in DATASETS


def test_loader_that_contradicts_its_spec_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FederatedData(fedml_dataset=[0] * 8, input_shape=(1, 8, 8), num_classes=2, name="volumes")
    table: Registry[DatasetSpec] = Registry("dataset")
    table.add("volumes", DatasetSpec("volumes", lambda config: fake, lambda data: None, 3, "says 3D, loads 2D"))  # type: ignore[arg-type]
    monkeypatch.setattr(registry_module, "DATASETS", table)
    with pytest.raises(RuntimeError, match="expected 3 spatial dims"):
        load_federated_data(RunConfig(dataset="volumes"))


@pytest.mark.parametrize(
    "flat,field",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"client_num_in_total": 0, "client_num_per_round": 0}, "client_num_in_total"),
        ({"eval_mode": "sliding"}, "eval_mode"),
        ({"test_fraction": 1.0}, "test_fraction"),
    ],
)
def test_rules_data_does_not_recheck_are_enforced_by_the_config(flat: dict, field: str) -> None:
    # The loaders rely on these; RunConfig rejects them before any data is read.
    with pytest.raises(FieldError) as err:
        RunConfig.from_flat({"dataset": "fashion_mnist", **flat})
    assert err.value.field == field


def test_brats_needs_a_folder() -> None:
    with pytest.raises(FieldError) as err:
        load_federated_data(RunConfig(dataset="brats", data_cache_dir=None))
    line = explain(err.value)
    assert line.startswith("data_args.data_cache_dir: ") and "make-brats-demo" in line and "\n" not in line


# --------------------------------------------------------------------------- static shape and file check, no data


@pytest.mark.parametrize(
    "name,extra,expected",
    [
        ("fashion_mnist", {}, ((1, 28, 28), 10)),
        ("cifar10", {}, ((3, 32, 32), 10)),
        ("cifar100", {}, ((3, 32, 32), 100)),
        ("fed_emnist", {}, ((1, 28, 28), 62)),
        ("fed_cifar100", {}, ((3, 32, 32), 100)),
        ("brats", {}, ((4, 128, 128, 128), 3)),
        ("brats", {"patch_size": (32, 16, 8)}, ((4, 32, 16, 8), 3)),
    ],
)
def test_static_shape_needs_no_data(name: str, extra: dict, expected: tuple) -> None:
    assert static_shape(RunConfig(dataset=name, data_cache_dir="/nonexistent/folder", **extra)) == expected


def test_static_shape_checks_the_patch() -> None:
    with pytest.raises(FieldError) as err:
        static_shape(RunConfig(dataset="brats", patch_size=(16, 16)))
    assert err.value.field == "patch_size"


@pytest.mark.parametrize(
    "name,first",
    [
        ("cifar10", "cifar-10-batches-py/data_batch_1"),
        ("cifar100", "cifar-100-python/train"),
        ("fed_emnist", "fed_emnist_train.h5"),
        ("fed_cifar100", "fed_cifar100_train.h5"),
        ("fashion_mnist", "train-images-idx3-ubyte.gz"),
    ],
)
def test_check_names_the_first_missing_file_and_the_source(name: str, first: str, tmp_path: Path) -> None:
    config = RunConfig(dataset=name, data_cache_dir=str(tmp_path))
    missing = DATASETS[name].check(config)
    assert missing and missing[0] == str(tmp_path / first)
    with pytest.raises(FieldError) as err:
        check_data(config)
    line = explain(err.value)
    assert line.startswith(f"data_args.data_cache_dir: {tmp_path / first} not found") and "\n" not in line
    assert DATASETS[name].source in line


def test_check_of_a_partial_folder_lists_only_what_is_missing(tmp_path: Path) -> None:
    folder = write_cifar_fixture(tmp_path, "cifar10", per_file=10, seed=0) / "cifar-10-batches-py"
    (folder / "data_batch_3").unlink()
    (folder / "test_batch").unlink()
    config = RunConfig(dataset="cifar10", data_cache_dir=str(folder))  # the batches folder itself is accepted
    assert DATASETS["cifar10"].check(config) == [str(folder / "data_batch_3"), str(folder / "test_batch")]
    with pytest.raises(FieldError, match="data_batch_3 not found \\(and 1 more\\)"):
        load_federated_data(config)  # loading fails the same way, before reading anything


@pytest.mark.parametrize("name", ["cifar10", "fed_emnist", "brats"])
def test_data_sets_without_a_default_folder_need_data_cache_dir(name: str) -> None:
    with pytest.raises(FieldError) as err:
        check_data(RunConfig(dataset=name, data_cache_dir=None))
    assert explain(err.value).startswith("data_args.data_cache_dir: empty, and ")


def test_brats_check_lists_missing_case_files(tmp_path: Path) -> None:
    write_brats_demo(tmp_path / "brats", cases=2, shape=(16, 16, 16), seed=0)
    case = sorted((tmp_path / "brats").iterdir())[1]
    (case / f"{case.name}_t1ce.nii.gz").unlink()
    assert DATASETS["brats"].check(RunConfig(dataset="brats", data_cache_dir=str(tmp_path / "brats"))) == [
        str(case / f"{case.name}_t1ce.nii.gz")
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    [only] = DATASETS["brats"].check(RunConfig(dataset="brats", data_cache_dir=str(empty)))
    assert "BraTS case folder" in only and str(empty) in only
