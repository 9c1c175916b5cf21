"""gRPC cross-silo on loopback: equivalence with standalone and mpirun, wire bytes, and jobs that never hang.

Every party is its own process (``python -m fedml_progfed.main --rank R --role ...``),
as on real machines; sockets bind to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedml_progfed.cli import main as cli_main
from fedml_progfed.report import read_metrics_csv
from test_mpi_cross_silo import write_config  # same folder: pytest puts it on the path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = Path(sys.executable).with_name("mpirun")
SCRIPT = ROOT / "run_scripts" / "run_grpc_cross_silo.sh"
# Subprocesses import this checkout, whatever the venv's own install points at.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
PROFL = {
    "progfed_args": {"progfed_strategy": "profl", "progfed_schedule": None},
    "profl_args": {"profl_em_window": 2, "profl_em_threshold": 0.999, "profl_em_patience": 1,
                   "profl_min_rounds_per_step": 2, "profl_max_rounds_per_step": 2},
    "train_args": {"comm_round": 24},
}


def grpc_config(small_config: Path, tmp_path: Path, name: str = "grpc.yaml", **sections_update) -> Path:
    """The small fixture config as a 1 server + 2 clients gRPC job."""
    return write_config(small_config, tmp_path, "GRPC", name, **sections_update)


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), f"{what}: {name}"


#: compressed change broadcasts: each silo's model is rebuilt from changes; a base that differed by one
#: bit between server and silo would be refused (CRC-32), and the three runtimes' bytes would differ
CHANGES = {"progfed_args": {"progfed_compression_down": "lq8+sp25", "progfed_compression_up": "lq8"}}


@pytest.mark.parametrize("algorithm", ["progfed", "profl", "changes"])
def test_standalone_mpirun_and_grpc_end_with_the_same_weights(algorithm, small_config, tmp_path):
    resume = {"progfed_args": {"progfed_checkpoint_keep": 10}}
    sections = {"profl": PROFL, "changes": CHANGES}.get(algorithm, resume)
    config = grpc_config(small_config, tmp_path, **sections)
    grpc_out, mpi_out, sa_out = tmp_path / "grpc", tmp_path / "mpi", tmp_path / "standalone"

    done = subprocess.run(["bash", str(SCRIPT), str(config), "--out", str(grpc_out)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "open.fedml.ai" not in done.stdout + done.stderr  # no cloud contact
    assert MPIRUN.exists(), "mpirun missing from the venv: pip install mpich"
    done = subprocess.run(
        [str(MPIRUN), "-np", "3", sys.executable, "-m", "fedml_progfed.main", "--cf", str(config),
         "--set", "comm_args.backend=MPI", "--out", str(mpi_out)],
        capture_output=True, text=True, timeout=300, env=ENV,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each cross-silo party runs: the same kernels, so the same float rounding
    try:
        assert cli_main(["run", "--cf", str(config), "--out", str(sa_out), "--quiet",
                         "--set", "common_args.training_type=simulation", "comm_args.backend=sp"]) == 0
    finally:
        torch.set_num_threads(threads)

    standalone = load_weights(sa_out)
    assert_same_weights(load_weights(mpi_out), standalone, "mpirun vs standalone")
    assert_same_weights(load_weights(grpc_out), standalone, "gRPC vs standalone")
    rows, sa_rows = read_metrics_csv(grpc_out / "metrics.csv"), read_metrics_csv(sa_out / "metrics.csv")
    keys = ("bytes_down", "bytes_up", "client_flops", "stage", "num_clients")
    assert [tuple(r[k] for k in keys) for r in rows] == [tuple(r[k] for k in keys) for r in sa_rows]
    assert [r["test_metric"] for r in rows] == pytest.approx([r["test_metric"] for r in sa_rows], nan_ok=True)
    if algorithm in ("progfed", "changes"):
        assert [r["stage"] for r in rows] == [1, 2, 3, 4, 4, 4, 4, 4]  # three growths
    if algorithm == "changes":  # the growth round sends the entering block whole, later rounds only changes
        assert rows[-1]["bytes_down"] < rows[3]["bytes_down"] / 3 and rows[-1]["references_mb"] > 0
    elif algorithm == "profl":
        summary = json.loads((grpc_out / "summary.json").read_text())
        assert any(e["reason"].startswith("EM below") for e in summary["algorithm_state"]["log"])  # a freeze

    # What crossed the transport, per round, next to our payload count.
    assert all(r["wire_bytes_down"] > r["bytes_down"] and r["wire_bytes_up"] > r["bytes_up"] for r in rows)
    summary = json.loads((grpc_out / "summary.json").read_text())
    assert summary["backend"] == "GRPC" and summary["devices"] == {"0": "cpu", "1": "cpu", "2": "cpu"}
    assert 1.0 < summary["wire"]["overhead_ratio"] < 1.5
    for name in ("metrics.csv", "summary.json", "config.yaml", "model.safetensors", "metric_vs_rounds.png"):
        assert (grpc_out / name).is_file(), name
    if algorithm == "progfed":
        assert_grpc_resume_ends_with_the_same_model(config, grpc_out, tmp_path / "resumed")


def assert_grpc_resume_ends_with_the_same_model(config: Path, full: Path, resumed: Path) -> None:
    """The server resumes from the checkpoint after round 3; the clients' commands are unchanged."""
    import shutil

    shutil.copytree(full, resumed)
    for checkpoint in (resumed / "checkpoints").glob("round-*"):
        if int(checkpoint.name.split("-")[1]) > 3:  # as if the job died during round 3 (0-based)
            shutil.rmtree(checkpoint)
    (resumed / "model.safetensors").unlink()
    done = subprocess.run(["bash", str(SCRIPT), str(config), "--resume", str(resumed)],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "3 of 8 rounds done" in done.stdout + done.stderr
    before, after = load_weights(full), load_weights(resumed)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    keys = ("round", "stage", "bytes_down", "bytes_up", "test_metric")
    assert [tuple(str(r[k]) for k in keys) for r in read_metrics_csv(resumed / "metrics.csv")] == \
        [tuple(str(r[k]) for k in keys) for r in read_metrics_csv(full / "metrics.csv")]


# --------------------------------------------------------------------------- failures end the job


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Job:
    """A gRPC job of 1 server + 2 clients started party by party (so the test knows every pid)."""

    def __init__(self, config: Path, tmp_path: Path, client_overrides: dict[int, list[str]] | None = None) -> None:
        ipconfig = tmp_path / "ipconfig.csv"
        ports = free_ports(3)
        ipconfig.write_text("eid,rank,grpc_server_ip,grpc_server_port\n"
                            + "".join(f"{r},{r},127.0.0.1,{p}\n" for r, p in enumerate(ports)))
        self.logs = [tmp_path / f"rank{r}.log" for r in range(3)]
        self.procs: list[subprocess.Popen] = []
        for rank in range(3):  # all at once, as the script does: clients wait for their server
            command = [sys.executable, "-m", "fedml_progfed.main", "--cf", str(config), "--out", str(tmp_path / "out"),
                       "--rank", str(rank), "--role", "server" if rank == 0 else "client",
                       "--set", f"comm_args.grpc_ipconfig_path={ipconfig}", *(client_overrides or {}).get(rank, [])]
            with self.logs[rank].open("w") as log:
                self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=ENV))

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait(self, rank: int, timeout: float) -> int:
        return self.procs[rank].wait(timeout=timeout)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


TIMEOUT_S = 10
LONG_RUN = {"train_args": {"comm_round": 200}, "progfed_args": {"progfed_round_timeout_s": TIMEOUT_S}}


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_client_killed_or_stopped_mid_run_ends_the_grpc_job_naming_it(how, small_config, tmp_path):
    job = Job(grpc_config(small_config, tmp_path, **LONG_RUN), tmp_path)
    try:
        wait_for(lambda: "round 2: stage" in job.log(0), 180, "round 2 to be tested")
        victim = job.procs[2]
        victim.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        hit = time.monotonic()
        server = job.wait(0, timeout=TIMEOUT_S + 15)
        took = time.monotonic() - hit
        assert server != 0
        # killed: its port refuses at once; stopped: the round timeout decides
        assert took < (10 if how == "kill" else TIMEOUT_S + 8), took
        [line] = error_lines(job.log(0))
        assert line.startswith("error: rank 0 (server):") and "client rank 2" in line, line
        if how == "stop":
            assert "progfed_round_timeout_s" in line
        # the other client learns why and ends too
        assert job.wait(1, timeout=15) != 0
        [line] = error_lines(job.log(1))
        assert line.startswith("error: rank 1 (client): the server (rank 0") and "ended the job" in line, line
        assert "client rank 2" in line, line
        if how == "stop":  # a stopped client that resumes finds its server gone and ends: nothing is left behind
            victim.send_signal(signal.SIGCONT)
            assert job.wait(2, timeout=30) != 0
            assert "the server (rank 0" in error_lines(job.log(2))[0]
    finally:
        job.kill_all()


def test_an_invalid_update_ends_the_grpc_job_with_one_error_on_the_server(small_config, tmp_path):
    config = grpc_config(small_config, tmp_path, progfed_args={"progfed_invalid_update": "abort",
                                                               "progfed_round_timeout_s": TIMEOUT_S})
    # client 2 encodes its updates with another codec than the server decodes: its update is invalid
    job = Job(config, tmp_path, client_overrides={2: ["progfed_args.progfed_compression_up=lq8"]})
    try:
        assert job.wait(0, timeout=180) == 2
        [line] = error_lines(job.log(0))
        assert line.startswith("error: rank 0 (server):") and "'lq8'" in line, line
        for rank in (1, 2):
            assert job.wait(rank, timeout=15) != 0
            [line] = error_lines(job.log(rank))
            assert line.startswith(f"error: rank {rank} (client): the server (rank 0") and "ended the job" in line, line
    finally:
        job.kill_all()


# --------------------------------------------------------------------------- the same under mpirun


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _mpi_rank_pid(root: int, rank: int) -> int | None:
    """The pid of MPI rank ``rank`` among the descendants of ``root`` (MPICH sets PMI_RANK)."""
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or f"PMI_RANK={rank}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if b"fedml_progfed.main" not in (entry / "cmdline").read_bytes():
                continue
            parent = int(entry.name)
            while parent > 1:  # only our own mpirun's ranks
                parent = _parent(parent)
                if parent == root:
                    return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


def _mpirun(config: Path, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "mpirun.log"
    command = [str(MPIRUN), "-np", "3", sys.executable, "-m", "fedml_progfed.main", "--cf", str(config),
               "--set", "comm_args.backend=MPI", "--out", str(tmp_path / "mpi"), *extra]
    with log.open("w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=ENV), log


def test_a_stopped_rank_ends_the_mpirun_job_naming_it(small_config, tmp_path):
    proc, log = _mpirun(grpc_config(small_config, tmp_path, **LONG_RUN), tmp_path)
    pid = None
    try:
        wait_for(lambda: "round 2: stage" in log.read_text(), 180, "round 2 to be tested")
        pid = _mpi_rank_pid(proc.pid, 2)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        hit = time.monotonic()
        assert proc.wait(timeout=TIMEOUT_S + 20) != 0
        assert time.monotonic() - hit < TIMEOUT_S + 10
        lines = error_lines(log.read_text())
        assert len(lines) == 1 and lines[0].startswith("error: rank 0 (server): client rank 2"), lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    time.sleep(1)
    assert pid is None or not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_an_exception_on_one_rank_ends_the_mpirun_job_with_one_error(small_config, tmp_path):
    config = grpc_config(small_config, tmp_path, progfed_args={"progfed_invalid_update": "abort"})
    # MPMD: ranks 0-1 as configured, rank 2 encodes its updates with another codec, so they are invalid
    command = [str(MPIRUN), "-np", "2", sys.executable, "-m", "fedml_progfed.main", "--cf", str(config),
               "--set", "comm_args.backend=MPI", ":", "-np", "1", sys.executable, "-m", "fedml_progfed.main",
               "--cf", str(config), "--set", "comm_args.backend=MPI", "progfed_args.progfed_compression_up=lq8"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=ENV, cwd=tmp_path)
    assert done.returncode != 0
    lines = error_lines(done.stdout + done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: rank 0 (server):") and "'lq8'" in lines[0], done.stderr[-3000:]
    assert time.monotonic() - started < 120



@pytest.mark.parametrize("policy", ["drop", "abort"])
def test_a_client_diverging_to_nan_under_mpirun_is_dropped_or_ends_the_job(policy, small_config, tmp_path):
    """Rank 2 diverges (its own momentum of 1e6 overflows its weights to inf/NaN within a round).

    ``drop``: each of its updates is dropped and named, the run completes on rank 1's updates
    with ``dropped_clients`` recorded and a finite model; ``abort``: one error, within seconds.
    """
    config = grpc_config(small_config, tmp_path, train_args={"comm_round": 4},
                         progfed_args={"progfed_invalid_update": policy})
    out = tmp_path / "mpi"
    party = [sys.executable, "-m", "fedml_progfed.main", "--cf", str(config), "--out", str(out),
             "--set", "comm_args.backend=MPI"]
    command = [str(MPIRUN), "-np", "2", *party, ":", "-np", "1", *party, "train_args.momentum=1e6"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=ENV, cwd=tmp_path)
    if policy == "abort":
        assert done.returncode != 0
        lines = error_lines(done.stdout + done.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: rank 0 (server):"), done.stderr[-3000:]
        assert "client 1" in lines[0] and "NaN or Inf" in lines[0], lines[0]
        assert time.monotonic() - started < 120
        return
    assert done.returncode == 0, done.stderr[-3000:]
    assert "client 1" in done.stderr and "NaN or Inf" in done.stderr, done.stderr[-3000:]
    rows = read_metrics_csv(out / "metrics.csv")
    assert [int(r["dropped_clients"]) for r in rows] == [1, 1, 1, 1]
    assert json.loads((out / "summary.json").read_text())["complete"] is True
    assert all(torch.isfinite(t).all() for t in load_weights(out).values())
