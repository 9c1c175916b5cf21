"""A resumed cross-silo job with partial participation trains the silos the uninterrupted run trained.

6 data silos, 2 per round: FedML's server draws each round's silos from its own round
counter, which restarts at 0 on resume; ours follows the checkpoint's round. Each runtime's
resumed job must end bit for bit where the uninterrupted one did, and all of them where
standalone does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedml_progfed.report import read_metrics_csv
from test_grpc_cross_silo import ENV, MPIRUN, SCRIPT, grpc_config, load_weights
from test_grpc_security import standalone_weights

pytestmark = pytest.mark.slow

PARTIAL = {"train_args": {"client_num_in_total": 6, "client_num_per_round": 2, "comm_round": 8},
           "progfed_args": {"progfed_checkpoint_keep": 10}}
TIMING = {"wall_s", "server_s", "client_compute_s"}


def _cut_after_round(full: Path, resumed: Path, last_kept: int) -> None:
    """``resumed``: ``full`` as if the job died after checkpointing round ``last_kept``."""
    shutil.copytree(full, resumed)
    for checkpoint in (resumed / "checkpoints").glob("round-*"):
        if int(checkpoint.name.split("-")[1]) > last_kept:
            shutil.rmtree(checkpoint)
    (resumed / "model.safetensors").unlink()


def _rows(folder: Path) -> list[str]:
    return [str({k: v for k, v in r.items() if k not in TIMING and not k.startswith(("wire_", "rejected_"))})
            for r in read_metrics_csv(folder / "metrics.csv")]


def _grpc(config: Path, *flags: str) -> None:
    done = subprocess.run(["bash", str(SCRIPT), str(config), *flags], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _mpi(config: Path, *flags: str) -> None:
    command = [str(MPIRUN), "-np", "3", sys.executable, "-m", "fedml_progfed.main", "--cf", str(config),
               "--set", "comm_args.backend=MPI", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("runtime", ["grpc", "mpi"])
def test_a_resumed_job_with_2_of_6_silos_per_round_is_the_same_run(runtime, small_config, tmp_path):
    config = grpc_config(small_config, tmp_path, **PARTIAL)
    launch = _grpc if runtime == "grpc" else _mpi
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(config, "--out", str(full))
    _cut_after_round(full, resumed, 3)
    launch(config, "--resume", str(resumed))
    assert (resumed / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()
    assert _rows(resumed) == _rows(full)
    reference = standalone_weights(config, tmp_path / "standalone")
    weights = load_weights(full)
    assert weights.keys() == reference.keys()
    assert all(torch.allclose(weights[k], reference[k], atol=1e-5) for k in weights)
