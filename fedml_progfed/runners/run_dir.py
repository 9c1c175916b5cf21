"""The run folder's life cycle: checked before any training, refused when it holds another run.

``--out DIR`` is created and probed for writing before data is loaded. A folder
that already holds files is refused unless ``--overwrite`` (our run files in it
are removed; anything else is left alone) or ``--resume`` (the run continues from
its last complete checkpoint, and must have been made with the same resolved
configuration, which is written first thing into ``config.yaml``).

While a run writes its folder, the folder is locked: :func:`prepare_out` takes an
OS lock (``fcntl.flock``) on ``DIR/.lock`` and this process holds it until it ends
(the CLI lets go when its command ends), so the OS frees it when the process dies
and a killed run leaves no stale lock. A second run on a locked folder, new,
``--overwrite`` or ``--resume``, is one error naming the holder (its pid, host and
command, written into the lock file). The lock file alone does not make a folder
a run.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import yaml

from fedml_progfed.errors import ProgFedError

log = logging.getLogger("fedml_progfed")

#: What a run writes into its folder (``--overwrite`` removes exactly these).
RUN_FILES = (
    "config.yaml", "metrics.csv", "summary.json", "ledger.json", "model.safetensors", "checkpoints",
    "metric_vs_rounds.png", "metric_vs_bytes.png", "metric_vs_flops.png", "em_per_step.png", "memory_per_step.png",
    "comparison.txt", "comparison.json", "compare_metric_vs_rounds.png", "compare_metric_vs_bytes.png",
    "compare_metric_vs_flops.png",
)
#: The run's lock (see the module docstring); in the folder from the run's start, and never removed.
LOCK_FILE = ".lock"
#: What may be in the folder before the run starts: not a run yet (and ``--overwrite`` keeps it).
#: run_grpc_cross_silo.sh writes the first three; the lock is taken before the folder is looked at.
LAUNCHER_FILES = ("logs", "grpc_ipconfig.csv", "certs", LOCK_FILE)

#: Folder (resolved) -> descriptor of its lock file, for the locks this process holds.
_HELD: dict[Path, int] = {}


def prepare_out(out: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Create, lock and probe ``out``; refuse a folder with files unless overwriting or resuming.

    Raises
    ------
    ProgFedError
        ``out`` is a file, is not writable, is locked by another process (the message
        names it), or holds files without ``overwrite``/``resume`` (or none with ``resume``).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ProgFedError(f"--out: {out} is a file; give a folder for the run's results")
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock_out(out)  # before anything is looked at or removed: two runs must not both see it empty
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ProgFedError(f"--out: cannot write into {out} ({exc.strerror or exc}); choose a writable folder") from None
    present = sorted(p.name for p in out.iterdir() if p.name not in LAUNCHER_FILES)
    if resume:
        if not present:
            raise ProgFedError(f"--resume: {out} is empty; there is no run to continue (drop --resume)")
        return
    if present and not overwrite:
        raise ProgFedError(
            f"--out: {out} is not empty ({', '.join(present[:3])}{'...' if len(present) > 3 else ''}); "
            f"pass --overwrite to replace the run in it, --resume to continue it, or choose another folder"
        )
    for name in present:
        path = out / name
        if name in RUN_FILES or (path.is_dir() and (path / "config.yaml").is_file()):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def lock_out(out: Path) -> None:
    """Hold ``out``'s lock for the rest of this process; again for a folder it holds is a no-op.

    Raises
    ------
    ProgFedError
        Another process holds it (one line naming that process).
    OSError
        The lock file cannot be created or written (the folder is not writable).
    """
    out = Path(out)
    key = out.resolve()
    path = out / LOCK_FILE
    if _still_held(key, path):
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd, out):
            holder = _describe_holder(fd, path)
            raise ProgFedError(
                f"--out: {out} is in use by another run ({holder}); wait for it to end, stop it, or choose another folder"
            )
        _write_holder(fd)
    except BaseException:
        os.close(fd)
        raise
    _HELD[key] = fd


def release_run_locks() -> None:
    """Let go of every run folder this process holds (the CLI does when its command ends)."""
    while _HELD:
        _, fd = _HELD.popitem()
        os.close(fd)  # closing the last descriptor of the open file frees its flock


def _still_held(key: Path, path: Path) -> bool:
    """This process holds ``key``'s lock on the very file at ``path`` (not one removed and made again)."""
    fd = _HELD.get(key)
    if fd is None:
        return False
    try:
        now, held = os.stat(path), os.fstat(fd)
        if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            return True
    except OSError:
        pass
    del _HELD[key]
    os.close(fd)
    return False


def _try_lock(fd: int, out: Path) -> bool:
    """Take the exclusive lock without waiting; False if another process holds it."""
    import fcntl  # POSIX only, like FedML's runtimes

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # a file system without locks (some network mounts): run, but say so
        log.warning("--out: cannot lock %s (%s); a second run on it would not be refused", out, exc.strerror or exc)
    return True


def _write_holder(fd: int) -> None:
    """Who holds the folder, for the error another run prints: pid, host, command, start time."""
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    data = (json.dumps(holder) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _describe_holder(fd: int, path: Path) -> str:
    """``pid P on HOST since T: COMMAND`` from the lock file (the holder may not have written it yet)."""
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0).decode() or "null")
        text = f"pid {holder['pid']} on {holder['host']} since {holder['started']}: {holder['command']}"
    except (OSError, ValueError, TypeError, KeyError):
        return f"a process that has not yet written who it is into {path}"
    text = " ".join(text.split())  # one line, whatever the command held
    return text if len(text) <= 300 else text[:297] + "..."


def write_config(out: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """The resolved configuration, first thing, so a resumed run can be checked against it."""
    (Path(out) / "config.yaml").write_text(yaml.safe_dump({k: dict(v) for k, v in sections.items()}, sort_keys=False))


#: Keys that may differ on resume: where the parties are and how long they may stay silent, not what they compute.
FREE_ON_RESUME = {
    ("comm_args", "grpc_ipconfig_path"), ("progfed_args", "progfed_round_timeout_s"),
    ("progfed_args", "progfed_checkpoint_keep"),
    # certificates may be renewed or moved between a job and its resume
    *((section, f"progfed_tls_{part}") for section in ("comm_args", "progfed_args") for part in ("ca", "cert", "key")),
    ("comm_args", "progfed_allow_insecure"), ("progfed_args", "progfed_allow_insecure"),
    ("progfed_args", "progfed_round_deadline_s"),  # transport timing, like the timeout
}


def check_same_config(out: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """A resumed run must use the configuration it was started with (else it would not be the same run)."""
    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise ProgFedError(f"--resume: {out} has no config.yaml; it is not a run folder of fedml-progfed")
    before = yaml.safe_load(path.read_text()) or {}
    now = yaml.safe_load(yaml.safe_dump({k: dict(v) for k, v in sections.items()}, sort_keys=False))
    for section in sorted(set(before) | set(now)):
        old, new = before.get(section, {}), now.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key) and (section, key) not in FREE_ON_RESUME:
                raise ProgFedError(
                    f"--resume: {section}.{key} was {old.get(key)!r} when the run in {out} started and is now "
                    f"{new.get(key)!r}; resume with the same configuration (or start a new run)"
                )
