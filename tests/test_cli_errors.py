"""Every bad config value ends in one clear error line naming the key, not a traceback."""

import subprocess
import sys

import pytest

from fedml_progfed.cli import main


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["progfed_args.progfed_strategy=progressive"], "progfed_args.progfed_strategy"),
        (["progfed_args.progfed_stages=7"], "progfed_args.progfed_stages"),
        (["progfed_args.progfed_schedule=[2,2,2,9]"], "progfed_args.progfed_schedule"),
        (["train_args.learning_rate=-0.1"], "train_args.learning_rate"),
        (["train_args.comm_round=abc"], "train_args.comm_round"),
        (["progfed_args.progfed_stagez=3"], "progfed_args.progfed_stagez"),
        (["progfed_args.progfed_optimizer=fedyogi"], "progfed_args.progfed_optimizer"),
        (["train_args.federated_optimizer=FedProx"], "train_args.federated_optimizer"),
        (["model_args.model=lenet"], "model_args.model"),
        (["data_args.partition_method=pathological"], "data_args.partition_method"),
        (["train_args.client_num_per_round=50"], "train_args.client_num_per_round"),
        (["train_args.comm_round=3"], "train_args.comm_round"),
        (["progfed_args.progfed_warmup_rounds=9"], "progfed_args.progfed_warmup_rounds"),
        (["progfed_args.progfed_warmup_mode=before"], "progfed_args.progfed_warmup_mode"),
        (["progfed_args.progfed_aggregation_weights=median"], "progfed_args.progfed_aggregation_weights"),
        (["progfed_args.progfed_compression_up=lq9"], "progfed_args.progfed_compression_up: unknown compression part 'lq9'"),
        (["progfed_args.progfed_compression_down=lq8+ef"], "progfed_args.progfed_compression_down"),
        (["progfed_args.progfed_lr_schedule=step"], "progfed_args.progfed_lr_schedule"),
        (["common_args.random_seed=-1"], "common_args.random_seed"),
    ],
)
def test_bad_value_is_one_error_line_naming_the_key(small_config, capsys, overrides, key):
    assert main(["run", "--cf", str(small_config), "--quiet", "--set", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and key in err[0], err


def test_missing_and_corrupt_data_say_how_to_get_it(small_config, tmp_path, capsys):
    assert main(["run", "--cf", str(small_config), "--quiet", "--set", f"data_args.data_cache_dir={tmp_path}/nope"]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (broken / name).write_bytes(b"\x1f\x8b\x08\x00garbage")
    assert main(["run", "--cf", str(small_config), "--quiet", "--set", f"data_args.data_cache_dir={broken}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-images-idx3-ubyte.gz" in err[0] and "dataset-fashion-mnist" in err[0]


def test_missing_config_file_and_bad_set_syntax(tmp_path, capsys):
    assert main(["run", "--cf", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("train_args: {comm_round: 4}\n")
    assert main(["run", "--cf", str(tmp_path / "c.yaml"), "--set", "comm_round=3"]) == 2
    assert "section.key=value" in capsys.readouterr().err


def test_real_entry_point_prints_no_traceback(small_config):
    done = subprocess.run(
        [sys.executable, "-m", "fedml_progfed", "run", "--cf", str(small_config), "--set", "progfed_args.progfed_stages=0"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: progfed_args.progfed_stages")


def test_cross_silo_refuses_error_feedback_with_partial_participation(small_config):
    done = subprocess.run(
        [sys.executable, "-m", "fedml_progfed.main", "--cf", str(small_config), "--dry-run", "--set",
         "common_args.training_type=cross_silo", "progfed_args.progfed_compression_up=topk10+ef"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: progfed_args.progfed_compression_up: 'topk10+ef'")
