"""Real ``mpirun`` through FedML's cross-silo runtime, and mode equivalence with the standalone loop."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
import yaml

from fedml_progfed.cli import main as cli_main
from fedml_progfed.report import METRIC_COLUMNS, read_metrics_csv

pytestmark = pytest.mark.slow

MPIRUN = Path(sys.executable).with_name("mpirun")


@pytest.fixture
def mpi_config(small_config, tmp_path) -> Path:
    sections = yaml.safe_load(small_config.read_text())
    sections["common_args"]["training_type"] = "cross_silo"
    sections["comm_args"]["backend"] = "MPI"
    sections["train_args"].update(client_num_in_total=2, client_num_per_round=2, comm_round=8)
    sections["validation_args"]["frequency_of_the_test"] = 2
    path = tmp_path / "mpi.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


def test_mpirun_cross_silo_matches_standalone(mpi_config, tmp_path):
    assert MPIRUN.exists(), "mpirun missing from the venv: pip install mpich"
    out = tmp_path / "mpi"
    done = subprocess.run(
        [str(MPIRUN), "-np", "3", sys.executable, "-m", "fedml_progfed.main", "--cf", str(mpi_config), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "open.fedml.ai" not in done.stdout + done.stderr  # no cloud contact
    rows = read_metrics_csv(out / "metrics.csv")
    assert list(rows[0])[: len(METRIC_COLUMNS)] == list(METRIC_COLUMNS)
    assert [r["stage"] for r in rows] == [1, 2, 3, 4, 4, 4, 4, 4]
    assert all(r["bytes_down"] > 0 and r["bytes_up"] > 0 for r in rows)

    standalone = tmp_path / "standalone"
    assert cli_main(["run", "--cf", str(mpi_config), "--out", str(standalone), "--quiet",
                     "--set", "common_args.training_type=simulation"]) == 0
    mpi_weights = load_file(out / "model.safetensors")
    sa_weights = load_file(standalone / "model.safetensors")
    assert mpi_weights.keys() == sa_weights.keys()
    for name in mpi_weights:
        assert torch.allclose(mpi_weights[name], sa_weights[name], atol=1e-5), name
    sa_rows = read_metrics_csv(standalone / "metrics.csv")
    for a, b in zip(rows, sa_rows):
        assert (a["bytes_down"], a["bytes_up"], a["client_flops"], a["stage"]) == (
            b["bytes_down"], b["bytes_up"], b["client_flops"], b["stage"])
