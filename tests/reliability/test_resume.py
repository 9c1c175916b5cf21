"""A run killed with SIGKILL mid-round and resumed ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedml_progfed.cli import main
from fedml_progfed.report import read_metrics_csv

pytestmark = pytest.mark.slow
TIMING = {"wall_s", "server_s", "client_compute_s"}

CASES = {
    # growth, warm-up and per-client error-feedback residuals (client state the checkpoint keeps)
    "progfed": ["train_args.comm_round=8", "train_args.epochs=1", "train_args.client_num_per_round=3",
                "progfed_args.progfed_schedule=[2,2,2,2]", "progfed_args.progfed_warmup_rounds=1",
                "progfed_args.progfed_compression_up=topk10+ef", "progfed_args.progfed_optimizer=fedadam"],
    # steps, EM trajectories and memory budgets
    "profl": ["train_args.comm_round=14", "train_args.epochs=1", "train_args.client_num_per_round=3",
              "progfed_args.progfed_strategy=profl", "profl_args.profl_em_window=2",
              "profl_args.profl_min_rounds_per_step=1", "profl_args.profl_max_rounds_per_step=1",
              "memory_args.memory_budgets=uniform-mb:20:60"],
    # per-client widths under budgets and the width AllSmall chose (what the run hands over)
    "allsmall": ["train_args.comm_round=6", "train_args.epochs=1", "train_args.client_num_per_round=3",
                 "progfed_args.progfed_strategy=allsmall", "memory_args.memory_budgets=relative-uniform:0.2:1.0"],
    # client-level DP: the secret, the accountant's rounds and each round's denominator
    "dp": ["train_args.comm_round=6", "train_args.epochs=1", "train_args.client_num_per_round=3",
           "progfed_args.progfed_schedule=[1,1,2,2]", "dp_args.enable_dp=true", "dp_args.dp_solution_type=client",
           "dp_args.clipping_norm=0.5", "dp_args.noise_multiplier=0.5", "dp_args.delta=1e-4",
           "dp_args.progfed_dp_noise_seed=5"],
    # per-client depths under budgets, blocks some rounds leave untouched
    "depthfl": ["train_args.comm_round=6", "train_args.epochs=1", "train_args.client_num_per_round=3",
                "progfed_args.progfed_strategy=depthfl", "memory_args.memory_budgets=relative-uniform:0.2:1.0"],
}


def rows_without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics_csv(path)]


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_mid_round_then_resume_is_bit_identical(small_config, tmp_path, case):
    overrides = CASES[case]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["run", "--cf", str(small_config), "--out", str(full), "--quiet", "--set", *overrides]) == 0
    rows = read_metrics_csv(full / "metrics.csv")
    total = len(rows)
    # a round of this tiny run takes a fraction of a second: the kill must land inside the next one
    round_s = sorted(float(r["wall_s"]) for r in rows)[total // 2]
    kill_after = random.Random().randint(1, total - 2)  # a different round on every CI run
    print(f"killing after {kill_after} of {total} rounds")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen(
        [sys.executable, "-m", "fedml_progfed", "run", "--cf", str(small_config), "--out", str(killed), "--quiet",
         "--set", *overrides], env=env,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        metrics = killed / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) - 1 >= kill_after:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the run finished before it could be killed"
    time.sleep(random.Random().uniform(0.0, 0.5) * round_s)  # somewhere inside the next round
    process.send_signal(signal.SIGKILL)
    process.wait()
    summary = (killed / "summary.json").read_text()
    assert '"complete": false' in summary
    assert main(["run", "--cf", str(small_config), "--resume", str(killed), "--quiet", "--set", *overrides]) == 0
    assert (killed / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    resumed, reference = rows_without_timing(killed / "metrics.csv"), rows_without_timing(full / "metrics.csv")
    assert [r["round"] for r in resumed] == list(range(total))  # no duplicated or missing rows
    assert [str(r) for r in resumed] == [str(r) for r in reference]  # str: NaN cells compare equal
    assert '"complete": true' in (killed / "summary.json").read_text()


def test_resume_refuses_another_configuration_and_a_folder_without_checkpoints(small_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--cf", str(small_config), "--out", str(out), "--quiet", "--set", "train_args.comm_round=4"]) == 0
    assert main(["run", "--cf", str(small_config), "--resume", str(out), "--quiet", "--set", "train_args.comm_round=5"]) == 2
    assert "error: --resume: train_args.comm_round was 4" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "x").mkdir(parents=True)
    assert main(["run", "--cf", str(small_config), "--resume", str(empty), "--quiet"]) == 2
    assert "config.yaml" in capsys.readouterr().err
