"""The run folder's life cycle: checked before any training, refused when it holds another run.

``--out DIR`` is created and probed for writing before data is loaded. A folder
that already holds files is refused unless ``--overwrite`` (our run files in it
are removed; anything else is left alone) or ``--resume`` (the run continues from
its last complete checkpoint, and must have been made with the same resolved
configuration, which is written first thing into ``config.yaml``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Mapping

import yaml

from fedml_progfed.errors import ProgFedError

#: What a run writes into its folder (``--overwrite`` removes exactly these).
RUN_FILES = (
    "config.yaml", "metrics.csv", "summary.json", "ledger.json", "model.safetensors", "checkpoints",
    "metric_vs_rounds.png", "metric_vs_bytes.png", "metric_vs_flops.png", "em_per_step.png", "memory_per_step.png",
    "comparison.txt", "comparison.json", "compare_metric_vs_rounds.png", "compare_metric_vs_bytes.png",
    "compare_metric_vs_flops.png",
)
#: What a launcher puts into the folder before the run starts (run_grpc_cross_silo.sh): not a run yet.
LAUNCHER_FILES = ("logs", "grpc_ipconfig.csv", "certs")  # what run_grpc_cross_silo.sh writes first


def prepare_out(out: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Create and probe ``out``; refuse a folder with files unless overwriting or resuming."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ProgFedError(f"--out: {out} is a file; give a folder for the run's results")
    try:
        out.mkdir(parents=True, exist_ok=True)
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
