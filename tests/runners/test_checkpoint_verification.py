"""``--resume`` trusts only a checkpoint that verifies: its files' digests and the run it belongs to.

One reference run of 4 rounds keeps its last 3 checkpoints; each test copies it, damages
the checkpoint after round 3 (the newest once round 4's is removed, as if the run had died
in round 4) and resumes. Every damage is one ``error:`` line naming the file and offering
round-000002, the newest checkpoint that verifies; ``PROGFED_RESUME_FALLBACK=1`` takes it
and the run ends bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from fedml_progfed.cli import main
from fedml_progfed.report import read_metrics_csv

pytestmark = pytest.mark.slow
OVERRIDES = ["train_args.comm_round=4", "train_args.epochs=1", "progfed_args.progfed_checkpoint_keep=3"]
TIMING = {"wall_s", "server_s", "client_compute_s"}
WEIGHT = "model/blocks.1.0.weight"
FALLBACK_ENV = "PROGFED_RESUME_FALLBACK"  # what a user types, spelled out


@pytest.fixture(scope="module")
def config(tmp_path_factory, fmnist_fixture) -> Path:
    """The conftest's small config (a module-scoped copy, so one reference run serves every test)."""
    root = Path(__file__).resolve().parents[2]
    sections = yaml.safe_load((root / "config" / "quickstart.yaml").read_text())
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
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"round-00000{r}" for r in (2, 3, 4)]
    return out


def interrupted(reference: Path, tmp_path: Path) -> Path:
    """A copy of the reference as if it had died in round 4 (3 rounds checkpointed)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / "round-000004")
    (run / "model.safetensors").unlink()
    return run


def tensor_offset(path: Path, name: str) -> int:
    """The file offset of tensor ``name``'s first byte in a safetensors file."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return 8 + size + json.loads(data[8:8 + size])[name]["data_offsets"][0]


def flip_exponent_bit(path: Path) -> None:
    at = tensor_offset(path, WEIGHT) + 3  # float32 little-endian: byte 3 holds the sign and the high exponent bits
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def write_nan(path: Path) -> None:
    at = tensor_offset(path, WEIGHT)
    data = bytearray(path.read_bytes())
    data[at:at + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))


def flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[20] ^= 0x01  # inside the JSON header
    path.write_bytes(bytes(data))


def truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_ledger(path: Path) -> None:
    meta = json.loads(path.read_text())
    meta["ledger"][0]["test_metric"] = 0.99
    path.write_text(json.dumps(meta))


def strip_digests(path: Path) -> None:
    """What a checkpoint written before verification looked like: the engine's state only."""
    meta = json.loads(path.read_text())
    for key in ("checkpoint_format", "files", "run_config", "state_sha256"):
        meta.pop(key, None)
    path.write_text(json.dumps(meta))


DAMAGE = {
    # (damage, file, what the message says)
    "exponent-bit": (flip_exponent_bit, "state.safetensors", "is corrupted"),
    "nan-weight": (write_nan, "state.safetensors", "is corrupted"),
    "header-byte": (flip_header_byte, "state.safetensors", "is corrupted"),
    "half-truncated": (truncate_half, "state.safetensors", "is truncated"),
    "tensors-missing": (lambda p: p.unlink(), "state.safetensors", "is missing"),
    "json-truncated": (truncate_half, "state.json", "cannot be read"),
    "json-edited": (edit_ledger, "state.json", "was changed after it was written"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_error_naming_the_file_and_the_previous_one(
        reference, config, tmp_path, capsys, damage):
    spoil, name, says = DAMAGE[damage]
    run = interrupted(reference, tmp_path)
    spoil(run / "checkpoints" / "round-000003" / name)
    capsys.readouterr()
    assert main(["run", "--cf", str(config), "--resume", str(run), "--quiet", "--set", *OVERRIDES]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --resume: {run / 'checkpoints' / 'round-000003' / name} {says}"), err
    assert f"{FALLBACK_ENV}=1 resumes from round-000002" in err, err
    assert not (run / "model.safetensors").exists()  # nothing was trained or written


def test_checkpoints_of_another_configuration_are_refused_naming_the_key(reference, config, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["run", "--cf", str(config), "--out", str(other), "--quiet",
                 "--set", *OVERRIDES, "train_args.learning_rate=1000000000.0"]) == 0
    run = interrupted(reference, tmp_path)
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(other / "checkpoints", run / "checkpoints")
    capsys.readouterr()
    assert main(["run", "--cf", str(config), "--resume", str(run), "--quiet", "--set", *OVERRIDES]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "train_args.learning_rate" in err and "1000000000.0" in err and "0.05" in err, err
    assert "round-000004" in err  # the newest: every one of them is of the other run
    assert "no older checkpoint verifies" in err, err


def test_a_checkpoint_written_before_verification_is_refused_with_what_to_do(reference, config, tmp_path, capsys):
    run = interrupted(reference, tmp_path)
    for checkpoint in (run / "checkpoints").glob("round-*"):
        strip_digests(checkpoint / "state.json")
    capsys.readouterr()
    assert main(["run", "--cf", str(config), "--resume", str(run), "--quiet", "--set", *OVERRIDES]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "predates checkpoint verification" in err and "--overwrite" in err, err


def test_fallback_skips_the_damaged_checkpoint_with_a_warning_and_ends_bit_identical(
        reference, config, tmp_path, capsys, monkeypatch):
    run = interrupted(reference, tmp_path)
    flip_exponent_bit(run / "checkpoints" / "round-000003" / "state.safetensors")
    monkeypatch.setenv(FALLBACK_ENV, "1")
    capsys.readouterr()
    assert main(["run", "--cf", str(config), "--resume", str(run), "--quiet", "--set", *OVERRIDES]) == 0
    err = capsys.readouterr().err
    assert "round-000003" in err and "skipping" in err and "round-000002" in err, err
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    assert rows(run) == rows(reference)
    # the damaged checkpoint was replaced by a good one of the same round
    monkeypatch.delenv(FALLBACK_ENV)
    assert main(["run", "--cf", str(config), "--resume", str(run), "--quiet", "--set", *OVERRIDES]) == 0


def rows(run: Path) -> list[str]:
    return [str({k: v for k, v in row.items() if k not in TIMING}) for row in read_metrics_csv(run / "metrics.csv")]
