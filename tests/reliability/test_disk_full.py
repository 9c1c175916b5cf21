"""A full disk, a read-only or lost mount while a run writes: one error line, and ``--resume`` finishes the run.

The error says what was written last (the newest complete checkpoint) and that
``--resume`` continues from it; no partial checkpoint is left to be adopted, and the
resumed run ends bit-identical to an uninterrupted one. The real disk-full case runs
the CLI on a small tmpfs in a user and mount namespace (skipped where those are not
allowed); the others make the writer fail at its n-th write.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedml_progfed.cli import main
from fedml_progfed.report import read_metrics_csv
from fedml_progfed.report.metrics import MetricsFile
from fedml_progfed.runners import checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ["train_args.comm_round=4", "train_args.epochs=1", "progfed_args.progfed_checkpoint_keep=3"]
TIMING = {"wall_s", "server_s", "client_compute_s"}


@pytest.fixture(scope="module")
def config(tmp_path_factory, fmnist_fixture) -> Path:
    """The conftest's small config (a module-scoped copy, so one reference run serves every test)."""
    sections = yaml.safe_load((ROOT / "config" / "quickstart.yaml").read_text())
    sections["data_args"]["data_cache_dir"] = str(fmnist_fixture)
    sections["train_args"].update(client_num_in_total=10, client_num_per_round=5, comm_round=8, learning_rate=0.05,
                                  epochs=2, batch_size=32)
    sections["validation_args"]["frequency_of_the_test"] = 1
    path = tmp_path_factory.mktemp("config") / "small.yaml"
    path.write_text(yaml.safe_dump(sections))
    return path


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", "--cf", str(config), "--out", str(out), "--quiet", "--set", *OVERRIDES]) == 0
    return out


def rows(run: Path) -> list[str]:
    return [str({k: v for k, v in row.items() if k not in TIMING}) for row in read_metrics_csv(run / "metrics.csv")]


def resume_and_compare(config: Path, run: Path, reference: Path) -> None:
    """``--resume`` finishes the run where the uninterrupted one ended, bit for bit."""
    assert main(["run", "--cf", str(config), "--resume", str(run), "--quiet", "--set", *OVERRIDES]) == 0
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert rows(run) == rows(reference)
    assert '"complete": true' in (run / "summary.json").read_text()


def no_partial_checkpoint(run: Path, last: int) -> None:
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"round-{r:06d}" for r in range(1, last + 1)], names  # no temporary folder, nothing newer


def fail_at_write(monkeypatch, n: int, code: int = errno.ENOSPC) -> None:
    """The checkpoint module's writer fails at its ``n``-th call, as a filling disk would."""
    write, calls = checkpoint._write_durably, [0]

    def failing(path: Path, data: bytes) -> None:
        calls[0] += 1
        if calls[0] == n:
            with open(path, "wb") as handle:  # a partial file, then the error
                handle.write(data[: len(data) // 3])
            raise OSError(code, os.strerror(code))
        write(path, data)

    monkeypatch.setattr(checkpoint, "_write_durably", failing)


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_disk_full_in_a_checkpoint_names_the_last_complete_one_and_resume_finishes(
        reference, config, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    fail_at_write(monkeypatch, 5)  # round 3's tensors (2 writes per checkpoint: tensors, then state.json)
    capsys.readouterr()
    assert main(["run", "--cf", str(config), "--out", str(run), "--quiet", "--set", *OVERRIDES]) == 2
    line = one_error(capsys.readouterr().err)
    assert "No space left on device" in line and "round-000003" in line, line
    assert "the last complete checkpoint is round-000002 (2 of 4 rounds)" in line, line
    assert f"--resume {run}" in line, line
    no_partial_checkpoint(run, 2)
    monkeypatch.undo()
    resume_and_compare(config, run, reference)


def test_disk_full_in_the_final_model_names_the_final_checkpoint_and_resume_writes_the_results(
        reference, config, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    fail_at_write(monkeypatch, 9)  # after 4 checkpoints: model.safetensors
    capsys.readouterr()
    assert main(["run", "--cf", str(config), "--out", str(run), "--quiet", "--set", *OVERRIDES]) == 2
    line = one_error(capsys.readouterr().err)
    assert f"cannot write {run / 'model.safetensors'}" in line, line
    assert "the last complete checkpoint is round-000004 (4 of 4 rounds)" in line, line
    assert not (run / "model.safetensors").exists()  # no partial model beside the results
    assert not (run / "summary.json").exists() or '"complete": true' not in (run / "summary.json").read_text()
    monkeypatch.undo()
    resume_and_compare(config, run, reference)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EIO, errno.EACCES])
def test_a_read_only_or_lost_mount_under_metrics_csv_is_one_error(config, tmp_path, capsys, monkeypatch, code):
    update, calls = MetricsFile.update, [0]

    def failing(self, rows):
        calls[0] += 1
        if calls[0] == 3:  # round 3's row
            raise OSError(code, os.strerror(code), str(self.path))
        update(self, rows)

    monkeypatch.setattr(MetricsFile, "update", failing)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", "--cf", str(config), "--out", str(run), "--quiet", "--set", *OVERRIDES]) == 2
    line = one_error(capsys.readouterr().err)
    assert f"cannot write {run / 'metrics.csv'} ({os.strerror(code)})" in line, line
    assert "round-000002 (2 of 4 rounds)" in line and f"--resume {run}" in line, line


def user_namespaces_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{where}'"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_real_full_tmpfs_mid_run_is_one_error_and_resume_ends_bit_identical(reference, config, tmp_path):
    mount, kept = tmp_path / "mnt", tmp_path / "kept"
    mount.mkdir()
    kept.mkdir()
    if not user_namespaces_mount_tmpfs(mount):
        pytest.skip("unshare -rm cannot mount a tmpfs here (no user namespaces)")
    # room for two checkpoints and the small files, not a third: round 3's checkpoint fills the disk
    one = sum(p.stat().st_size for p in (reference / "checkpoints" / "round-000002").iterdir())
    size_k = int(2.5 * one) // 1024
    script = (
        'mount -t tmpfs -o size="$1"k tmpfs "$2" || exit 99; shift 2; '
        '"$@"; rc=$?; cp -a "$MOUNT"/. "$KEPT"/; exit $rc'  # the tmpfs goes with the namespace: keep its files
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOUNT": str(mount / "run"), "KEPT": str(kept)}
    command = [sys.executable, "-m", "fedml_progfed", "run", "--cf", str(config), "--out", str(mount / "run"),
               "--quiet", "--set", *OVERRIDES]
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(size_k), str(mount), *command],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = one_error(done.stderr)
    assert "No space left on device" in line and "round-000002 (2 of 4 rounds)" in line, line
    no_partial_checkpoint(kept, 2)
    resume_and_compare(config, kept, reference)
