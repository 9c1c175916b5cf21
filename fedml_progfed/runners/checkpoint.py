"""Checkpoints of a run folder: the server state in safetensors plus JSON, written atomically and verified.

``DIR/checkpoints/round-000012/`` holds ``state.safetensors`` (weights, optimizer
moments, algorithm tensors, standalone clients' error-feedback residuals) and
``state.json`` (round, stage or step, ledger rows, measured memory, budgets). No
pickle is read or written.

Writing. A checkpoint is written into a hidden temporary folder and renamed into
place, so a run killed at any moment leaves only complete checkpoints (and at worst a
stale temporary folder, ignored and replaced). ``state.json`` is written last: it
records the size and sha256 of every other file, the resolved configuration of the
run (the run folder's ``config.yaml``) and a sha256 of its own content. Old
checkpoints are renamed away before they are removed, so none is ever half deleted.
A write that fails (full disk, no permission, read-only or lost mount) is a
:class:`~fedml_progfed.errors.WriteError` naming the file and the newest complete
checkpoint that ``--resume`` continues from; the temporary folder is removed.

Reading. :func:`latest_checkpoint` verifies the newest checkpoint before anything
loads: every file present, of its recorded size and sha256, and its configuration the
run folder's ``config.yaml`` but for the keys that may change on resume
(:data:`~fedml_progfed.runners.run_dir.FREE_ON_RESUME`). One that fails is a
:class:`~fedml_progfed.errors.CheckpointError` naming the file and the newest older
checkpoint that verifies. With the environment variable ``PROGFED_RESUME_FALLBACK=1``
(:data:`FALLBACK_ENV`) ``--resume`` takes that one instead, with a warning naming
each checkpoint it skipped. Checkpoints written before verification existed (no
digests in ``state.json``) are refused: their integrity cannot be checked, and
resuming silently from an unchecked file is what verification is for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors.torch import load, save

from fedml_progfed.errors import CheckpointError, WriteError
from fedml_progfed.runners.run_dir import FREE_ON_RESUME

log = logging.getLogger("fedml_progfed")

DIRNAME = "checkpoints"
TENSORS, META = "state.safetensors", "state.json"
#: ``state.json``'s keys of our own (the engine's metadata is everything else).
FORMAT_KEY, FILES_KEY, CONFIG_KEY, DIGEST_KEY = "checkpoint_format", "files", "run_config", "state_sha256"
FORMAT = 1
#: ``PROGFED_RESUME_FALLBACK=1``: resume from the newest checkpoint that verifies, skipping newer damaged ones.
FALLBACK_ENV = "PROGFED_RESUME_FALLBACK"


# --------------------------------------------------------------------------- writing


def write_checkpoint(
    run_dir: Path, rounds_done: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], keep: int,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the checkpoint after ``rounds_done`` rounds and keep only the newest ``keep``.

    Parameters
    ----------
    run_dir
        The run folder.
    rounds_done
        Rounds finished; names the folder ``round-NNNNNN``.
    tensors, meta
        What the engine's server (and the standalone clients) checkpoint.
    keep
        How many checkpoints stay (older ones are removed).
    config
        The run's resolved configuration (the sections of ``config.yaml``); ``None``: read
        ``run_dir/config.yaml``.

    Returns
    -------
    Path
        The checkpoint folder.

    Raises
    ------
    OSError
        A file could not be written (its ``filename`` is the checkpoint's file); no partial
        checkpoint is left behind. :func:`write_error` makes it the user's one line.
    """
    root = Path(run_dir) / DIRNAME
    final = root / f"round-{rounds_done:06d}"
    staging = root / f".tmp-{final.name}"
    writing = root  # what the message names: the checkpoint's file, not the temporary folder
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_hidden(root)  # stale temporary folders of a killed run
        staging.mkdir()
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        writing = final / TENSORS
        _write_durably(staging / TENSORS, data)
        body = _body(meta, run_config(run_dir) if config is None else config, {TENSORS: _file_record(data)})
        writing = final / META
        _write_durably(staging / META, _state_json(body).encode())  # last: its presence means complete
        _fsync_dir(staging)
        writing = final
        _remove_dir(final)  # the same round written again after a resume from an earlier one
        os.replace(staging, final)
        _fsync_dir(root)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(writing)) from None
    for old in complete_checkpoints(run_dir)[:-keep]:
        _remove_dir(old)
    return final


def write_file(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary file renamed into place: a reader sees all of it or none.

    Raises
    ------
    OSError
        As the file system reports it, naming ``path``; the temporary file is removed.
    """
    path = Path(path)
    partial = path.with_name(f".tmp-{path.name}")
    try:
        _write_durably(partial, data)
        os.replace(partial, path)
    except OSError as exc:
        _unlink_quietly(partial)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None


def write_error(run_dir: Path, exc: OSError, total_rounds: int | None = None) -> WriteError:
    """One line for a failed write: what failed, the newest complete checkpoint, and how to go on.

    Parameters
    ----------
    run_dir
        The run folder.
    exc
        The error of the write (its ``filename`` names the file, else the folder is named).
    total_rounds
        The run's rounds, for "N of T rounds".
    """
    # a plot library's error may name no file: then the folder
    what = f"cannot write {exc.filename or f'into {run_dir}'} ({exc.strerror or exc})"
    found = complete_checkpoints(run_dir)
    if not found:
        return WriteError(f"{what}; no checkpoint is complete yet: free space (or make {run_dir} writable "
                          f"again), then start the run again with --overwrite")
    last = found[-1]
    rounds = f"{_round_of(last)} of {total_rounds} rounds" if total_rounds else f"{_round_of(last)} rounds done"
    return WriteError(f"{what}; the last complete checkpoint is {last.name} ({rounds}): free space (or make "
                      f"{run_dir} writable again), then --resume {run_dir} continues from it")


def run_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved configuration in ``run_dir/config.yaml``, or ``None`` when it cannot be read."""
    try:
        loaded = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _write_durably(path: Path, data: bytes) -> None:
    """``data`` into ``path``, on the disk when this returns (the one writer of this module)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename is still atomic
    finally:
        os.close(fd)


def _remove_dir(path: Path) -> None:
    """Rename away, then delete: a folder named ``round-*`` is never half removed."""
    if not path.exists():
        return
    trash = path.with_name(f".old-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(path, trash)
    except OSError:
        return  # a read-only folder: nothing can be removed, and nothing was
    shutil.rmtree(trash, ignore_errors=True)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only or lost folder: the caller's error is the one to report


def _remove_hidden(root: Path) -> None:
    for stale in root.glob(".*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _file_record(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _body(meta: Mapping[str, Any], config: Mapping[str, Any] | None, files: dict[str, Any]) -> dict[str, Any]:
    """``state.json`` but its own digest; a JSON round trip first, so reading it back gives the very same text."""
    body = json.loads(json.dumps(dict(meta)))
    body.update({FORMAT_KEY: FORMAT, FILES_KEY: files,
                 CONFIG_KEY: json.loads(json.dumps(config)) if config is not None else None})
    return body


def _state_json(body: Mapping[str, Any]) -> str:
    return json.dumps({**body, DIGEST_KEY: _digest_of(body)})


def _digest_of(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def _round_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


# --------------------------------------------------------------------------- reading


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint folders (``round-*``, renamed into place only once complete), oldest first."""
    root = Path(run_dir) / DIRNAME
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("round-*") if p.is_dir())


def latest_checkpoint(run_dir: Path, fallback: bool | None = None) -> Path:
    """The newest checkpoint, verified; one clear error if there is none or it fails.

    Parameters
    ----------
    run_dir
        The run folder.
    fallback
        Take the newest checkpoint that verifies, with a warning naming those skipped;
        ``None``: the environment variable ``PROGFED_RESUME_FALLBACK`` (``1``/``true``/``yes``).

    Raises
    ------
    CheckpointError
        No checkpoint, or the newest fails verification (and ``fallback`` is off, or none verifies).
    """
    found = complete_checkpoints(run_dir)
    if not found:
        raise CheckpointError(
            f"--resume: {run_dir} holds no complete checkpoint (checkpoints/round-*/); "
            f"start the run again without --resume"
        )
    fallback = _fallback_from_env() if fallback is None else fallback
    expected = run_config(run_dir)
    if expected is None:  # without it no checkpoint can be matched to its run
        raise CheckpointError(f"--resume: {Path(run_dir) / 'config.yaml'} is missing or unreadable; it is not a run "
                              f"folder of fedml-progfed (or start the run again with --overwrite)")
    failed: list[CheckpointError] = []
    for path in reversed(found):
        try:
            verify_checkpoint(path, expected)
        except CheckpointError as exc:
            failed.append(exc)
            continue
        if failed and not fallback:
            raise CheckpointError(f"{failed[0]}; {FALLBACK_ENV}=1 resumes from {path.name}, the newest "
                                  f"checkpoint that verifies (or start the run again with --overwrite)")
        for skipped in failed:
            log.warning("%s: skipping it, resuming from %s", skipped, path.name)
        return path
    older = "no older checkpoint verifies either: " if len(found) > 1 else ""
    raise CheckpointError(f"{failed[0]}; {older}start the run again with --overwrite")


def verify_checkpoint(path: Path, expected_config: Mapping[str, Any] | None) -> tuple[bytes, dict[str, Any]]:
    """Check a checkpoint folder before anything of it loads; returns its tensor file and metadata.

    Parameters
    ----------
    path
        The checkpoint folder.
    expected_config
        The run folder's configuration the checkpoint must belong to; ``None``: not compared
        (:func:`read_checkpoint`, after :func:`latest_checkpoint` compared it).

    Raises
    ------
    CheckpointError
        A file is missing, unreadable, truncated or changed, the checkpoint predates
        verification, or it belongs to another configuration.
    """
    body = _verified_body(Path(path))
    if expected_config is not None:
        _check_config(Path(path), body.get(CONFIG_KEY), expected_config)
    files = {name: _verified_file(Path(path) / name, record) for name, record in body[FILES_KEY].items()}
    if TENSORS not in files:
        raise CheckpointError(f"--resume: {Path(path) / META} records no {TENSORS}; the checkpoint is not one "
                              f"of fedml-progfed's")
    return files[TENSORS], {k: v for k, v in body.items() if k not in (FORMAT_KEY, FILES_KEY, CONFIG_KEY)}


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a checkpoint folder, verified (its configuration is checked by
    :func:`latest_checkpoint`).

    Raises
    ------
    CheckpointError
        As :func:`verify_checkpoint`, or the verified tensor file does not decode.
    """
    data, meta = verify_checkpoint(path, None)
    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors' own error type; the file is as it was written
        raise CheckpointError(f"--resume: {Path(path) / TENSORS} cannot be decoded ({exc}); it was written so: "
                              f"report it, and remove {path} to resume from the checkpoint before") from None
    _warn_non_finite(Path(path), tensors)
    return tensors, meta


def _verified_body(path: Path) -> dict[str, Any]:
    """``state.json`` read, of this format and unchanged since it was written."""
    meta = path / META
    try:
        body = json.loads(meta.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"--resume: {meta} is missing") from None
    except (OSError, ValueError) as exc:  # ValueError: JSON, and bytes that are no text
        raise CheckpointError(f"--resume: {meta} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(body, dict) or DIGEST_KEY not in body:
        raise CheckpointError(
            f"--resume: {meta} predates checkpoint verification (it records no sha256 digests), so its integrity "
            f"cannot be checked (the fedml-progfed version that wrote it can still finish the run)"
        )
    digest = body.pop(DIGEST_KEY)
    if digest != _digest_of(body) or not isinstance(body.get(FILES_KEY), dict):
        raise CheckpointError(f"--resume: {meta} was changed after it was written (its content no longer matches "
                              f"its recorded sha256)")
    return body


def _verified_file(path: Path, record: Mapping[str, Any]) -> bytes:
    """A file of the checkpoint, of its recorded size and sha256."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"--resume: {path} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"--resume: {path} cannot be read ({exc.strerror or exc})") from None
    if len(data) != record.get("bytes"):
        short = "truncated" if len(data) < record.get("bytes", 0) else "longer than written"
        raise CheckpointError(f"--resume: {path} is {short} ({len(data)} of {record.get('bytes')} bytes)")
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise CheckpointError(f"--resume: {path} is corrupted (its sha256 differs from the one {META} recorded "
                              f"when it was written)")
    return data


def _check_config(path: Path, recorded: Any, expected: Mapping[str, Any]) -> None:
    """The checkpoint belongs to the run folder's configuration, but for the keys free on resume."""
    if not isinstance(recorded, dict):
        raise CheckpointError(f"--resume: {path / META} records no configuration; the checkpoint is not one of "
                              f"fedml-progfed's")
    difference = first_difference(recorded, json.loads(json.dumps(dict(expected))))
    if difference is not None:
        key, was, now = difference
        raise CheckpointError(
            f"--resume: {path} belongs to another run: it was written with {key} {was!r} and "
            f"{path.parents[1] / 'config.yaml'} says {now!r} (resume the run it came from instead)"
        )


def first_difference(before: Mapping[str, Any], now: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """The first ``section.key`` (sorted) whose value differs, outside ``FREE_ON_RESUME``, or ``None``."""
    for section in sorted(set(before) | set(now)):
        old, new = before.get(section) or {}, now.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key) and (section, key) not in FREE_ON_RESUME:
                return f"{section}.{key}", old.get(key), new.get(key)
    return None


def _warn_non_finite(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """A verified checkpoint with NaN or Inf weights is as the run wrote it: the run had diverged."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            log.warning("--resume: %s holds non-finite values in %s: the run had diverged when it was written",
                        path, name)
            return


def _fallback_from_env() -> bool:
    return os.environ.get(FALLBACK_ENV, "").strip().lower() in ("1", "true", "yes")

