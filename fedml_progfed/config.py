"""Run configuration: FedML's YAML sections plus our ``progfed_args``, parsed and validated once.

FedML flattens every section into ``args.<key>`` (FEDML_NOTES), so our keys carry
the ``progfed_`` prefix. :func:`load_config` reads a YAML file, applies
``--set section.key=value`` overrides and returns the resolved nested mapping
and a frozen :class:`RunConfig`; :meth:`RunConfig.from_flat` builds the same
object from FedML's flattened ``args`` (MPI and Octopus entry points). Every
error names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence, get_args, get_origin, get_type_hints

import yaml

from fedml_progfed.errors import ConfigError

PREFIX = "progfed_"
OUR_SECTION = "progfed_args"


@dataclass(frozen=True)
class ProgFedConfig:
    """Our section, ``progfed_args`` (keys carry the ``progfed_`` prefix in YAML).

    strategy: ``progfed`` (grow stage by stage) or ``e2e`` (the full model every round).
    stages: number of stages S; empty means the model's paper default.
    growth: U-Net growth, ``symmetric`` (outer levels first) or ``asymmetric`` (decoder last); Sec. 3.1.
    unet_bridge: what feeds the innermost active U-Net decoder level, ``skip`` or ``zeros``.
    schedule: explicit rounds per stage; empty means the paper's guideline T/(2S).
    warmup_rounds: rounds after each growth that train only the entering block and head.
    lr_schedule / lr_min / lr_restart_at_growth: client learning rate per round.
    optimizer: ``fedavg``, ``fedprox`` or ``fedadam``; server_lr and the FedProx/FedAdam constants.
    compression_up / compression_down: wire codecs of client updates and of the broadcast
    (``float``, ``lq8``, ``lq4``, ``lq2``, ``sp25``, ``sp10``, ``topk10``, ``lq8+sp25``, ``+rot``, ``+ef``).
    """

    strategy: str = "progfed"
    stages: int | None = None
    growth: str | None = None
    unet_bridge: str | None = None
    schedule: tuple[int, ...] | None = None
    warmup_rounds: int = 0
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    lr_restart_at_growth: bool = False
    optimizer: str = "fedavg"
    server_lr: float = 1.0
    fedprox_mu: float = 0.01
    fedadam_beta1: float = 0.9
    fedadam_beta2: float = 0.99
    fedadam_tau: float = 1.0e-3
    fedadam_reset_on_growth: bool = False
    compression_up: str = "float"
    compression_down: str = "float"


@dataclass(frozen=True)
class RunConfig:
    """The FedML keys this package reads, plus :class:`ProgFedConfig`."""

    random_seed: int = 0
    training_type: str = "simulation"
    backend: str = "sp"
    dataset: str = "fashion_mnist"
    data_cache_dir: str | None = None
    partition_method: str = "iid"
    partition_alpha: float = 0.5
    patch_size: tuple[int, ...] | None = None
    eval_size: tuple[int, ...] | None = None
    eval_mode: str = "full"
    test_fraction: float = 0.2
    model: str = "convnet"
    base_width: int | None = None
    federated_optimizer: str = "FedAvg"
    client_num_in_total: int = 100
    client_num_per_round: int = 10
    comm_round: int = 100
    epochs: int = 1
    batch_size: int = 32
    client_optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    frequency_of_the_test: int = 1
    using_gpu: bool = False
    gpu_id: int = 0
    progfed: ProgFedConfig = field(default_factory=ProgFedConfig)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "RunConfig":
        """Build and validate from FedML-style flat keys (``vars(args)`` or a flattened YAML).

        Unknown ``progfed_*`` keys are errors; other unknown keys belong to FedML and are left alone.
        """
        ours = {k[len(PREFIX):]: v for k, v in flat.items() if k.startswith(PREFIX)}
        known = {f.name for f in dataclasses.fields(ProgFedConfig)}
        unknown = sorted(set(ours) - known)
        if unknown:
            raise ConfigError(
                f"{OUR_SECTION}.{PREFIX}{unknown[0]}: unknown key; known keys: "
                + ", ".join(PREFIX + k for k in sorted(known))
            )
        progfed = ProgFedConfig(**_coerce_fields(ProgFedConfig, ours, lambda k: f"{OUR_SECTION}.{PREFIX}{k}"))
        theirs = {k: v for k, v in flat.items() if k in {f.name for f in dataclasses.fields(cls)} and k != "progfed"}
        config = cls(progfed=progfed, **_coerce_fields(cls, theirs, fedml_key))
        config.validate()
        return config

    def validate(self) -> None:
        """Range checks that do not need the model or the data; raises one ConfigError."""
        p = self.progfed
        checks: list[tuple[bool, str, Any, str]] = [
            (self.comm_round >= 1, fedml_key("comm_round"), self.comm_round, "a positive integer"),
            (self.epochs >= 1, fedml_key("epochs"), self.epochs, "a positive integer"),
            (self.batch_size >= 1, fedml_key("batch_size"), self.batch_size, "a positive integer"),
            (self.learning_rate > 0, fedml_key("learning_rate"), self.learning_rate, "a positive number"),
            (self.momentum >= 0, fedml_key("momentum"), self.momentum, "a number >= 0"),
            (self.weight_decay >= 0, fedml_key("weight_decay"), self.weight_decay, "a number >= 0"),
            (self.client_num_in_total >= 1, fedml_key("client_num_in_total"), self.client_num_in_total, "a positive integer"),
            (
                1 <= self.client_num_per_round <= self.client_num_in_total,
                fedml_key("client_num_per_round"),
                self.client_num_per_round,
                f"between 1 and client_num_in_total ({self.client_num_in_total})",
            ),
            (self.frequency_of_the_test >= 1, fedml_key("frequency_of_the_test"), self.frequency_of_the_test, "a positive integer"),
            (self.client_optimizer in ("sgd",), fedml_key("client_optimizer"), self.client_optimizer, "sgd"),
            (
                self.federated_optimizer == "FedAvg",
                fedml_key("federated_optimizer"),
                self.federated_optimizer,
                "FedAvg (choose FedAvg/FedProx/FedAdam with progfed_args.progfed_optimizer: fedavg|fedprox|fedadam)",
            ),
            (p.strategy in STRATEGIES, _ours("strategy"), p.strategy, " | ".join(STRATEGIES)),
            (p.stages is None or p.stages >= 1, _ours("stages"), p.stages, "a positive integer or empty"),
            (self.eval_mode in ("full", "center_crop"), fedml_key("eval_mode"), self.eval_mode, "full | center_crop"),
            (0 < self.test_fraction < 1, fedml_key("test_fraction"), self.test_fraction, "a fraction in (0, 1)"),
            (p.growth in (None, "symmetric", "asymmetric"), _ours("growth"), p.growth, "symmetric | asymmetric"),
            (p.unet_bridge in (None, "skip", "zeros"), _ours("unet_bridge"), p.unet_bridge, "skip | zeros"),
            (self.base_width is None or self.base_width >= 1, fedml_key("base_width"), self.base_width, "a positive integer"),
            (p.warmup_rounds >= 0, _ours("warmup_rounds"), p.warmup_rounds, "an integer >= 0"),
            (0 <= p.lr_min <= self.learning_rate, _ours("lr_min"), p.lr_min, "between 0 and train_args.learning_rate"),
            (p.server_lr > 0, _ours("server_lr"), p.server_lr, "a positive number"),
            (p.fedprox_mu >= 0, _ours("fedprox_mu"), p.fedprox_mu, "a number >= 0"),
            (0 <= p.fedadam_beta1 < 1, _ours("fedadam_beta1"), p.fedadam_beta1, "in [0, 1)"),
            (0 <= p.fedadam_beta2 < 1, _ours("fedadam_beta2"), p.fedadam_beta2, "in [0, 1)"),
            (p.fedadam_tau > 0, _ours("fedadam_tau"), p.fedadam_tau, "a positive number"),
        ]
        for ok, key, value, allowed in checks:
            if not ok:
                raise ConfigError(f"{key}: {value!r} is not allowed; use {allowed}")
        from fedml_progfed.core.server_optim import SERVER_OPTIMIZERS
        from fedml_progfed.core.schedule import LR_SCHEDULES

        if p.optimizer not in SERVER_OPTIMIZERS:
            raise ConfigError(f"{_ours('optimizer')}: unknown {p.optimizer!r}; use {' | '.join(SERVER_OPTIMIZERS)}")
        if p.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"{_ours('lr_schedule')}: unknown {p.lr_schedule!r}; use {' | '.join(LR_SCHEDULES)}")
        from fedml_progfed.core.compression import parse_spec

        parse_spec(p.compression_up, _ours("compression_up"))
        if parse_spec(p.compression_down, _ours("compression_down")).error_feedback:
            raise ConfigError(
                f"{_ours('compression_down')}: {p.compression_down!r}: error feedback is a client's memory of its own "
                f"updates; use '+ef' in {_ours('compression_up')}"
            )
        if p.strategy == "e2e" and p.schedule:
            raise ConfigError(f"{_ours('schedule')}: {list(p.schedule)} has no meaning for strategy e2e; leave it empty")

    def model_options(self) -> dict[str, Any]:
        """Architecture options set in the config (only those set: other models take none)."""
        options = {"base_width": self.base_width, "growth": self.progfed.growth, "bridge": self.progfed.unet_bridge}
        return {k: v for k, v in options.items() if v is not None}

    def schedule(self, num_stages: int) -> "Schedule":
        """The run's :class:`~fedml_progfed.core.schedule.Schedule` for a model with ``num_stages`` stages."""
        from fedml_progfed.core.schedule import Schedule

        p = self.progfed
        lr = dict(lr=self.learning_rate, lr_schedule=p.lr_schedule, lr_min=p.lr_min, lr_restart_at_growth=p.lr_restart_at_growth)
        if STRATEGIES[p.strategy] == "end_to_end":
            return Schedule.end_to_end(self.comm_round, num_stages, **lr)
        return Schedule.progressive(self.comm_round, num_stages, p.schedule, warmup_rounds=p.warmup_rounds, **lr)

    def with_strategy(self, strategy: str) -> "RunConfig":
        """The same run with another strategy (for like-for-like comparisons)."""
        progfed = dataclasses.replace(self.progfed, strategy=strategy, schedule=None if strategy == "e2e" else self.progfed.schedule)
        return dataclasses.replace(self, progfed=progfed)


# strategy name -> whether the model grows; the schedule module turns this into phases.
STRATEGIES: dict[str, str] = {"progfed": "progressive", "e2e": "end_to_end"}

FEDML_SECTIONS: dict[str, tuple[str, ...]] = {
    "common_args": ("random_seed", "training_type"),
    "data_args": (
        "dataset", "data_cache_dir", "partition_method", "partition_alpha",
        "patch_size", "eval_size", "eval_mode", "test_fraction",
    ),
    "model_args": ("model", "base_width"),
    "train_args": (
        "federated_optimizer", "client_num_in_total", "client_num_per_round", "comm_round", "epochs",
        "batch_size", "client_optimizer", "learning_rate", "momentum", "weight_decay",
    ),
    "validation_args": ("frequency_of_the_test",),
    "device_args": ("using_gpu", "gpu_id"),
    "comm_args": ("backend",),
}
_SECTION_OF = {key: section for section, keys in FEDML_SECTIONS.items() for key in keys}


def fedml_key(key: str) -> str:
    """``section.key`` for a FedML key, as users see it in the YAML."""
    return f"{_SECTION_OF.get(key, 'args')}.{key}"


def _ours(key: str) -> str:
    return f"{OUR_SECTION}.{PREFIX}{key}"


def _coerce(label: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML value to the field's type or raise a ConfigError naming the key."""
    origin = get_origin(annotation)
    options = get_args(annotation)
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if type(None) in options or annotation is Any:
            return None
        raise ConfigError(f"{label}: a value is required")
    if type(None) in options:
        inner = [o for o in options if o is not type(None)]
        return _coerce(label, value, inner[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label}: {value!r} is not a list; write e.g. [25, 25, 25, 25]")
        return tuple(_coerce(label, v, options[0]) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.strip().lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{label}: {value!r} is not true/false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{label}: {value!r} is not an integer")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{label}: {value!r} is not an integer") from None
        if not number.is_integer():
            raise ConfigError(f"{label}: {value!r} is not an integer")
        return int(number)
    if annotation is float:
        try:
            number = float(value)  # PyYAML reads 1e-3 as a string; float() accepts it
        except (TypeError, ValueError):
            raise ConfigError(f"{label}: {value!r} is not a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{label}: {value!r} is not a finite number")
        return number
    if annotation is str:
        return str(value)
    return value


def _coerce_fields(cls: type, values: Mapping[str, Any], label) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {k: _coerce(label(k), v, hints[k]) for k, v in values.items()}


# --------------------------------------------------------------------------- YAML files


def read_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a FedML YAML file; a missing file is an error (FedML silently ignores it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--cf: config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"--cf: {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"--cf: {path} must be a mapping of sections (common_args, train_args, ...) to mappings")
    return data


def apply_overrides(sections: Mapping[str, Mapping[str, Any]], overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Apply ``section.key=value`` strings; values are parsed as YAML scalars or lists."""
    resolved = copy.deepcopy({k: dict(v) for k, v in sections.items()})
    for item in overrides:
        target, sep, raw = item.partition("=")
        section, dot, key = target.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise ConfigError(f"--set: {item!r} must look like section.key=value, e.g. train_args.comm_round=20")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        resolved.setdefault(section, {})[key] = value
    return resolved


def flatten(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """FedML's flattening: every key of every section becomes a top-level key."""
    flat: dict[str, Any] = {}
    for section, values in sections.items():
        for key, value in values.items():
            if section != OUR_SECTION and key.startswith(PREFIX):
                raise ConfigError(f"{section}.{key}: progfed keys belong in the {OUR_SECTION} section")
            if section == OUR_SECTION and not key.startswith(PREFIX):
                raise ConfigError(f"{OUR_SECTION}.{key}: keys of this section start with {PREFIX!r}, e.g. {PREFIX}{key}")
            flat[key] = value
    return flat


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict[str, dict[str, Any]], RunConfig]:
    """Read, override, flatten and validate; returns (resolved sections, config)."""
    sections = apply_overrides(read_yaml(path), overrides)
    return sections, RunConfig.from_flat(flatten(sections))


def fedml_namespace(sections: Mapping[str, Mapping[str, Any]]) -> SimpleNamespace:
    """A flat ``args`` object like the one ``fedml.load_arguments`` builds, for ClientTrainer/ServerAggregator."""
    return SimpleNamespace(**flatten(sections))
