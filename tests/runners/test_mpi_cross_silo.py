"""Real ``mpirun`` through FedML's cross-silo runtime, and mode equivalence with the standalone loop."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedml_progfed.cli import main as cli_main
from fedml_progfed.report import METRIC_COLUMNS, read_metrics_csv

pytestmark = pytest.mark.slow

MPIRUN = Path(sys.executable).with_name("mpirun")


def write_config(small_config: Path, tmp_path: Path, backend: str = "MPI", name: str = "mpi.yaml", **sections_update) -> Path:
    """The small fixture config as a 1 server + 2 clients cross-silo job of 8 rounds (tested every 2nd)."""
    sections = yaml.safe_load(small_config.read_text())
    sections["common_args"]["training_type"] = "cross_silo"
    sections["comm_args"]["backend"] = backend
    sections["train_args"].update(client_num_in_total=2, client_num_per_round=2, comm_round=8)
    sections["validation_args"]["frequency_of_the_test"] = 2
    for section, values in sections_update.items():
        sections.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sections))
    return path


def run_both(config: Path, tmp_path: Path):
    """mpirun -np 3 (server + 2 clients) and the standalone loop on the same config; their run folders."""
    assert MPIRUN.exists(), "mpirun missing from the venv: pip install mpich"
    mpi, standalone = tmp_path / "mpi", tmp_path / "standalone"
    done = subprocess.run(
        [str(MPIRUN), "-np", "3", sys.executable, "-m", "fedml_progfed.main", "--cf", str(config), "--out", str(mpi)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "open.fedml.ai" not in done.stdout + done.stderr  # no cloud contact
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each MPI rank runs: the same kernels, so the same float rounding
    try:
        assert cli_main(["run", "--cf", str(config), "--out", str(standalone), "--quiet",
                         "--set", "common_args.training_type=simulation"]) == 0
    finally:
        torch.set_num_threads(threads)
    mpi_weights, sa_weights = load_file(mpi / "model.safetensors"), load_file(standalone / "model.safetensors")
    assert mpi_weights.keys() == sa_weights.keys()
    for name in mpi_weights:
        assert torch.allclose(mpi_weights[name], sa_weights[name], atol=1e-5), name
    rows, sa_rows = read_metrics_csv(mpi / "metrics.csv"), read_metrics_csv(standalone / "metrics.csv")
    assert list(rows[0])[: len(METRIC_COLUMNS)] == list(METRIC_COLUMNS)
    for a, b in zip(rows, sa_rows, strict=True):
        keys = ("bytes_down", "bytes_up", "client_flops", "stage", "num_clients")
        assert tuple(a[k] for k in keys) == tuple(b[k] for k in keys), a["round"]
    return rows


def test_mpirun_cross_silo_matches_standalone(small_config, tmp_path):
    rows = run_both(write_config(small_config, tmp_path), tmp_path)
    assert [r["stage"] for r in rows] == [1, 2, 3, 4, 4, 4, 4, 4]
    assert all(r["bytes_down"] > 0 and r["bytes_up"] > 0 for r in rows)


def test_mpirun_profl_with_a_freeze_and_a_skipped_client_matches_standalone(small_config, tmp_path):
    budgets = tmp_path / "budgets.csv"
    budgets.write_text("client,mb\n0,1000\n1,5.0\n")  # client 1 cannot fit the largest steps (analytic MB)
    config = write_config(
        small_config, tmp_path,
        train_args={"comm_round": 24},
        progfed_args={"progfed_strategy": "profl", "progfed_schedule": None},
        profl_args={"profl_em_window": 2, "profl_em_threshold": 0.999, "profl_em_patience": 1,
                    "profl_min_rounds_per_step": 2, "profl_max_rounds_per_step": 2},
        memory_args={"memory_budgets": str(budgets), "memory_estimator": "analytic"},
    )
    rows = run_both(config, tmp_path)
    assert any(r["num_clients"] == 1 for r in rows)  # client 1 skipped a step it does not fit
    assert {(r["phase"], r["block"]) for r in rows} >= {("shrink", 4), ("grow", 1), ("grow", 4)}
    summary = yaml.safe_load((tmp_path / "mpi" / "summary.json").read_text())
    assert any(e["reason"].startswith("EM below") for e in summary["algorithm_state"]["log"])


def test_mpirun_with_client_level_dp_matches_standalone_weights_and_epsilon(small_config, tmp_path):
    # Poisson sampling among the silos the server calls: non-participants answer with a skip
    dp = {"enable_dp": True, "dp_solution_type": "client", "clipping_norm": 0.5, "noise_multiplier": 0.7,
          "delta": 1e-3, "progfed_dp_sampling": "poisson", "progfed_dp_client_rate": 0.6, "progfed_dp_noise_seed": 3}
    rows = run_both(write_config(small_config, tmp_path, dp_args=dp), tmp_path)
    standalone = read_metrics_csv(tmp_path / "standalone" / "metrics.csv")
    assert [r["epsilon"] for r in rows] == [r["epsilon"] for r in standalone]
    assert rows[-1]["epsilon"] > rows[0]["epsilon"] > 0
    assert {r["num_clients"] for r in rows} > {2}  # some rounds trained fewer than both silos
    summary = yaml.safe_load((tmp_path / "mpi" / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == rows[-1]["epsilon"] and "add/remove" in summary["privacy"]["accountant"]


def test_mpirun_resume_from_a_checkpoint_ends_with_the_same_model(small_config, tmp_path):
    import shutil

    config = write_config(small_config, tmp_path, progfed_args={"progfed_checkpoint_keep": 10})
    command = [str(MPIRUN), "-np", "3", sys.executable, "-m", "fedml_progfed.main", "--cf", str(config)]
    full = tmp_path / "full"
    done = subprocess.run([*command, "--out", str(full)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for checkpoint in (resumed / "checkpoints").glob("round-*"):
        if int(checkpoint.name.split("-")[1]) > 3:  # as if the job died during round 3 (0-based)
            shutil.rmtree(checkpoint)
    (resumed / "model.safetensors").unlink()
    done = subprocess.run([*command, "--resume", str(resumed)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (resumed / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    timing = {"wall_s", "server_s", "client_compute_s"}
    strip = lambda rows: [str({k: v for k, v in r.items() if k not in timing}) for r in rows]  # noqa: E731
    assert strip(read_metrics_csv(resumed / "metrics.csv")) == strip(read_metrics_csv(full / "metrics.csv"))
