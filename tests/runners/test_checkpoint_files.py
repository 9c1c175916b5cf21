"""The checkpoint files on their own (no training): written whole or not at all, verified on every byte."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from fedml_progfed.errors import CheckpointError, WriteError
from fedml_progfed.runners import checkpoint
from fedml_progfed.runners.checkpoint import latest_checkpoint, read_checkpoint, write_checkpoint, write_error

CONFIG = {"train_args": {"learning_rate": 0.05, "comm_round": 4},
          "progfed_args": {"progfed_checkpoint_keep": 2, "progfed_round_timeout_s": 60}}


def run_dir(tmp_path: Path, config: dict = CONFIG) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def state(value: float) -> tuple[dict[str, torch.Tensor], dict]:
    # NaN in the metadata and int keys: both must read back to the very text that was hashed
    return ({"model/w": torch.full((3, 4), value), "model/step": torch.tensor([7])},
            {"round": int(value), "ledger": [{"test_metric": float("nan")}], "memory": {3: 1.5, 10: 2.5}})


def test_a_checkpoint_reads_back_what_was_written(tmp_path):
    out = run_dir(tmp_path)
    tensors, meta = state(2.0)
    path = write_checkpoint(out, 2, tensors, meta, keep=2)
    assert latest_checkpoint(out) == path
    back, back_meta = read_checkpoint(path)
    assert torch.equal(back["model/w"], tensors["model/w"]) and back_meta["memory"] == {"3": 1.5, "10": 2.5}
    assert set(back_meta) == {"round", "ledger", "memory"}  # our own keys stay ours


def test_every_flipped_byte_of_either_file_is_refused(tmp_path):
    out = run_dir(tmp_path)
    path = write_checkpoint(out, 1, *state(1.0), keep=2)
    for name in (checkpoint.TENSORS, checkpoint.META):
        original = (path / name).read_bytes()
        for at in range(0, len(original), max(1, len(original) // 64)):
            spoiled = bytearray(original)
            spoiled[at] ^= 0x10
            (path / name).write_bytes(bytes(spoiled))
            with pytest.raises(CheckpointError, match="--resume: "):
                latest_checkpoint(out)
        (path / name).write_bytes(original)
    latest_checkpoint(out)


def test_only_the_newest_checkpoints_are_kept_and_temporary_folders_never_count(tmp_path):
    out = run_dir(tmp_path)
    for done in range(1, 5):
        write_checkpoint(out, done, *state(float(done)), keep=2)
    (out / "checkpoints" / ".tmp-round-000005").mkdir()  # a run killed while writing round 5
    (out / "checkpoints" / ".tmp-round-000005" / checkpoint.TENSORS).write_bytes(b"partial")
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["round-000003", "round-000004"]
    assert latest_checkpoint(out).name == "round-000004"


def test_a_key_free_on_resume_may_differ_and_any_other_is_named(tmp_path):
    out = run_dir(tmp_path)
    write_checkpoint(out, 1, *state(1.0), keep=2)
    changed = json.loads(json.dumps(CONFIG))
    changed["progfed_args"]["progfed_round_timeout_s"] = 600  # where parties are and how long they wait
    (out / "config.yaml").write_text(yaml.safe_dump(changed))
    latest_checkpoint(out)
    changed["train_args"]["learning_rate"] = 0.1
    (out / "config.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(CheckpointError, match=r"train_args.learning_rate 0.05 and .*config.yaml says 0.1"):
        latest_checkpoint(out)


def test_fallback_as_an_argument_takes_the_newest_that_verifies(tmp_path, caplog):
    out = run_dir(tmp_path)
    write_checkpoint(out, 1, *state(1.0), keep=3)
    newest = write_checkpoint(out, 2, *state(2.0), keep=3)
    (newest / checkpoint.TENSORS).unlink()
    offer = r"state.safetensors is missing; PROGFED_RESUME_FALLBACK=1 resumes from round-000001"
    with pytest.raises(CheckpointError, match=offer):
        latest_checkpoint(out, fallback=False)
    assert latest_checkpoint(out, fallback=True).name == "round-000001"
    assert "skipping it, resuming from round-000001" in caplog.text


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EIO])
def test_a_failed_write_leaves_no_partial_checkpoint_and_one_line_naming_the_last(tmp_path, monkeypatch, code):
    out = run_dir(tmp_path)
    write_checkpoint(out, 1, *state(1.0), keep=2)
    write = checkpoint._write_durably

    def failing(path: Path, data: bytes) -> None:
        if path.name == checkpoint.META:  # the tensors are written, state.json is not
            raise OSError(code, os.strerror(code))
        write(path, data)

    monkeypatch.setattr(checkpoint, "_write_durably", failing)
    with pytest.raises(OSError) as raised:
        write_checkpoint(out, 2, *state(2.0), keep=2)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["round-000001"]
    message = str(write_error(out, raised.value, total_rounds=4))
    assert message == (
        f"cannot write {out / 'checkpoints' / 'round-000002' / 'state.json'} ({os.strerror(code)}); the last complete "
        f"checkpoint is round-000001 (1 of 4 rounds): free space (or make {out} writable again), then --resume {out} "
        f"continues from it"
    )
    assert isinstance(write_error(tmp_path / "empty", raised.value), WriteError)


def test_a_run_that_dies_in_its_first_round_leaves_a_summary_saying_incomplete(small_config, tmp_path, monkeypatch):
    # a SIGKILL between the first metrics row and the first summary once left no summary.json at all
    from fedml_progfed.cli import main
    from fedml_progfed.engine.client import Client

    def dies(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Client, "train", dies)
    out = tmp_path / "dead"
    assert main(["run", "--cf", str(small_config), "--out", str(out), "--quiet", "--set", "train_args.comm_round=4"]) != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {"complete": False, "rounds_done": 0, "total_rounds": 4}
