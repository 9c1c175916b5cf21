"""The paper's settings: every config/paper/*.yaml describes and dry-runs without data, and
two ProgFed rounds run through the CLI on tiny fixtures in each real on-disk format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedml_progfed.cli import main
from fedml_progfed.data import write_cifar_fixture, write_tff_fixture
from fedml_progfed.report import read_metrics_csv

ROOT = Path(__file__).resolve().parents[2]
PAPER = ROOT / "config" / "paper"

#: config -> (dataset, first file a run needs, describe's ratio as in the README's table)
SETTINGS = {
    "emnist_convnet.yaml": ("fed_emnist", "fed_emnist_train.h5", 0.6735),
    "cifar10_convnet.yaml": ("cifar10", "cifar-10-batches-py/data_batch_1", 0.7048),
    "cifar100_resnet18.yaml": ("fed_cifar100", "fed_cifar100_train.h5", 0.6752),
    "brats_unet3d.yaml": ("brats", "a BraTS case folder", 0.2880),
}


def test_every_paper_config_is_covered() -> None:
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(SETTINGS)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_describe_needs_no_data(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "nothing-here"
    assert main(["describe", "--cf", str(PAPER / name), "--json", "--set", f"data_args.data_cache_dir={empty}"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["comm_ratio_vs_e2e"] == pytest.approx(SETTINGS[name][2], abs=5e-5)
    assert not empty.exists()


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_dry_run_names_the_first_missing_file(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["run", "--cf", str(PAPER / name), "--dry-run", "--set", f"data_args.data_cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: data_args.data_cache_dir: ")
    first = SETTINGS[name][1]
    assert (str(tmp_path / first) if "/" in first or first.endswith(".h5") else first) in err
    assert "not found" in err


def test_dry_run_with_data_builds_the_model_and_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_tff_fixture(tmp_path / "data", "fed_cifar100", clients=3, per_client=2, seed=0)
    out = tmp_path / "runs"
    code = main(["run", "--cf", str(PAPER / "cifar100_resnet18.yaml"), "--dry-run", "--out", str(out),
                 "--set", f"data_args.data_cache_dir={data}"])
    assert code == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith(f"dry run of {PAPER / 'cifar100_resnet18.yaml'}: model resnet18 (11,220,132 parameters, 4 stages")
    assert "500 clients, 40 per round, 3075 rounds" in summary and "Nothing was trained." in summary
    assert "files are all present" in summary
    assert not out.exists()


# --------------------------------------------------------------------------- two rounds on each real format

#: Shrink a paper config to two ProgFed rounds of a tiny model on the CPU.
TINY = [
    "device_args.using_gpu=false",
    "train_args.comm_round=2",
    "train_args.epochs=1",
    "train_args.batch_size=8",
    "validation_args.frequency_of_the_test=1",
    "progfed_args.progfed_stages=2",
    "progfed_args.progfed_schedule=[1,1]",
]


def _run(config: Path, out: Path, *overrides: str) -> list[dict]:
    assert main(["run", "--cf", str(config), "--out", str(out), "--quiet", "--set", *TINY, *overrides]) == 0
    return read_metrics_csv(out / "metrics.csv")


def _check(rows: list[dict], out: Path, dataset: str, stages: list[int]) -> None:
    assert [r["stage"] for r in rows] == stages
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["test_metric"]) for r in rows)
    assert rows[1]["active_params"] > rows[0]["active_params"]  # grew
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == dataset and (out / "model.safetensors").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_two_rounds_on_cifar_pickles(name: str, tmp_path: Path) -> None:
    data = write_cifar_fixture(tmp_path / "data", name, per_file=100 if name == "cifar100" else 20, seed=0)
    extra = ["data_args.partition_method=dirichlet", "data_args.partition_alpha=0.5",
             "model_args.model=convnet"] if name == "cifar100" else []
    rows = _run(PAPER / "cifar10_convnet.yaml", tmp_path / "run", f"data_args.dataset={name}",
                f"data_args.data_cache_dir={data}", "train_args.client_num_in_total=4",
                "train_args.client_num_per_round=2", *extra)
    _check(rows, tmp_path / "run", name, [1, 2])


@pytest.mark.slow
def test_two_rounds_on_fed_emnist_with_an_extra_warmup_round(tmp_path: Path) -> None:
    data = write_tff_fixture(tmp_path / "data", "fed_emnist", clients=12, per_client=6, seed=0, test_clients=8)
    rows = _run(PAPER / "emnist_convnet.yaml", tmp_path / "run", f"data_args.data_cache_dir={data}",
                "train_args.client_num_in_total=10", "train_args.client_num_per_round=3",
                "progfed_args.progfed_warmup_rounds=1")
    # The paper's warm-up mode: one extra round after the growth trains only the entering block.
    _check(rows, tmp_path / "run", "fed_emnist", [1, 2, 2])
    assert [bool(r["warmup"]) for r in rows] == [False, True, False]


@pytest.mark.slow
def test_two_rounds_on_fed_cifar100(tmp_path: Path) -> None:
    data = write_tff_fixture(tmp_path / "data", "fed_cifar100", clients=6, per_client=5, seed=0, test_clients=3)
    rows = _run(PAPER / "cifar100_resnet18.yaml", tmp_path / "run", f"data_args.data_cache_dir={data}",
                "model_args.model=convnet", "train_args.client_num_in_total=6", "train_args.client_num_per_round=2",
                "progfed_args.progfed_warmup_rounds=0")
    _check(rows, tmp_path / "run", "fed_cifar100", [1, 2])
