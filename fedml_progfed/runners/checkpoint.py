"""Checkpoints of a run folder: the server state in safetensors plus JSON, written atomically.

``DIR/checkpoints/round-000012/`` holds ``state.safetensors`` (weights, optimizer
moments, algorithm tensors, standalone clients' error-feedback residuals) and
``state.json`` (round, stage or step, ledger rows, measured memory, budgets).
A checkpoint is written into a hidden temporary folder and renamed into place,
so a run killed at any moment leaves only complete checkpoints (and at worst a
stale temporary folder, ignored and replaced). No pickle is read or written.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedml_progfed.errors import ProgFedError

DIRNAME = "checkpoints"
TENSORS, META = "state.safetensors", "state.json"


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_checkpoint(run_dir: Path, rounds_done: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint after ``rounds_done`` rounds and keep only the newest ``keep``."""
    root = Path(run_dir) / DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{rounds_done:06d}"
    staging = root / f".tmp-{final.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / TENSORS))
    (staging / META).write_text(json.dumps(meta))
    for name in (TENSORS, META):
        _fsync(staging / name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / DIRNAME
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("round-*") if (p / TENSORS).is_file() and (p / META).is_file())


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint; one clear error if there is none."""
    found = complete_checkpoints(run_dir)
    if not found:
        raise ProgFedError(
            f"--resume: {run_dir} holds no complete checkpoint (checkpoints/round-*/); "
            f"start the run again without --resume"
        )
    return found[-1]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a checkpoint folder."""
    try:
        return load_file(str(Path(path) / TENSORS)), json.loads((Path(path) / META).read_text())
    except (OSError, ValueError) as exc:
        raise ProgFedError(f"--resume: checkpoint {path} cannot be read ({exc}); remove it to use the one before") from None
