"""The run folder is locked while a run writes it: a second run on it is one error naming the first.

The lock is ``fcntl.flock`` on ``DIR/.lock``, held by the process: another process
(``HOLD`` below, a run's set-up without its training) holds it exactly as a run does,
and killing that process frees the folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedml_progfed.cli import main
from fedml_progfed.errors import ProgFedError
from fedml_progfed.runners.run_dir import LAUNCHER_FILES, LOCK_FILE, RUN_FILES, prepare_out, release_run_locks

ROOT = Path(__file__).resolve().parents[2]
#: A process that prepares a folder as a run does, says so, and keeps running until its stdin closes.
HOLD = (
    "import sys; from fedml_progfed.runners.run_dir import prepare_out; "
    "prepare_out(sys.argv[1], overwrite=sys.argv[2] == 'overwrite', resume=sys.argv[2] == 'resume'); "
    "print('ready', flush=True); sys.stdin.read()"
)


class Holder:
    """Another process holding ``out`` (as a run between its set-up and its end)."""

    def __init__(self, out: Path, mode: str = "new") -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, "-c", HOLD, str(out), mode], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        line = self.process.stdout.readline()
        assert line.strip() == "ready", self.process.stderr.read()

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)  # no clean-up of any kind runs
        self.process.wait(timeout=30)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


@pytest.fixture
def holder_of(tmp_path: Path):
    started: list[Holder] = []

    def start(out: Path, mode: str = "new") -> Holder:
        started.append(Holder(out, mode))
        return started[-1]

    yield start
    for holder in started:
        holder.close()
    release_run_locks()


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def test_a_second_run_on_a_locked_folder_is_one_error_naming_the_first(small_config, tmp_path, holder_of, capsys):
    out = tmp_path / "run"
    first = holder_of(out)  # seed 0 is writing here
    code = main(["run", "--cf", str(small_config), "--out", str(out), "--quiet",
                 "--set", "common_args.random_seed=1", "train_args.comm_round=4"])
    errors = _error_lines(capsys)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: --out: {out} is in use by another run (pid {first.pid} on "
                                f"{socket.gethostname()} since "), errors[0]
    assert "prepare_out" in errors[0]  # its command line
    assert errors[0].endswith("wait for it to end, stop it, or choose another folder")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # seed 1 wrote nothing


def test_resume_and_overwrite_take_the_lock_too(tmp_path, holder_of):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("train_args: {comm_round: 4}\n")
    (out / "metrics.csv").write_text("round\n0\n")
    holder = holder_of(out, "resume")
    for kwargs in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(ProgFedError) as err:
            prepare_out(out, **kwargs)
        assert f"is in use by another run (pid {holder.pid} " in str(err.value) and "\n" not in str(err.value)
    assert (out / "metrics.csv").read_text() == "round\n0\n"  # --overwrite removed nothing


def test_a_killed_run_leaves_no_stale_lock(tmp_path, holder_of):
    out = tmp_path / "run"
    holder_of(out).kill()
    assert (out / LOCK_FILE).is_file()
    prepare_out(out)  # the OS released the dead process's lock; the lock file alone is no run
    holder = json.loads((out / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["command"]


def test_the_lock_file_is_not_a_run_and_overwrite_keeps_it(tmp_path):
    assert LOCK_FILE == ".lock" and LOCK_FILE in LAUNCHER_FILES and LOCK_FILE not in RUN_FILES
    out = tmp_path / "run"
    prepare_out(out)
    prepare_out(out)  # the same process again (a comparison's runs, a resumed run in one process)
    with pytest.raises(ProgFedError, match="is empty; there is no run to continue"):
        prepare_out(out, resume=True)
    inode = (out / LOCK_FILE).stat().st_ino
    (out / "config.yaml").write_text("x: 1\n")
    prepare_out(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE] and (out / LOCK_FILE).stat().st_ino == inode
    release_run_locks()


def test_a_released_folder_can_be_taken_by_another_process(tmp_path, holder_of):
    out = tmp_path / "run"
    prepare_out(out)
    release_run_locks()  # the CLI does this when its command ends
    holder_of(out).close()


def test_a_folder_recreated_under_the_same_name_is_locked_afresh(tmp_path, holder_of):
    out = tmp_path / "run"
    prepare_out(out)
    (out / LOCK_FILE).unlink()  # e.g. the folder was removed and made again
    prepare_out(out)
    with pytest.raises(AssertionError):  # the new lock file is held, so another process cannot take it
        holder_of(out)
    release_run_locks()


@pytest.mark.slow
def test_two_runs_started_together_one_trains_and_the_other_is_refused(small_config, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [
        subprocess.Popen([sys.executable, "-m", "fedml_progfed", "run", "--cf", str(small_config), "--out", str(out),
                          "--quiet", "--set", f"common_args.random_seed={seed}", "train_args.comm_round=4"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for seed in (0, 1)
    ]
    done = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in done)
    assert codes == [0, 2], done
    winner = [seed for seed, (code, _) in enumerate(done) if code == 0][0]
    refused = [err for code, err in done if code == 2][0].strip().splitlines()[-1]
    # refused while the winner held the folder, or (had it finished first) because its run is there
    assert refused.startswith(f"error: --out: {out} is ") and ("in use by another run" in refused or "not empty" in refused)
    assert json.loads((out / "summary.json").read_text())["seed"] == winner
