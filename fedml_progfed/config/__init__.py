"""Run configuration: FedML's YAML sections plus ours, parsed and validated once.

The only place that knows YAML section and key names. FedML flattens every
section into ``args.<key>`` (FEDML_NOTES), so our keys carry a prefix
(``progfed_args.progfed_stages``). :func:`load_config` reads a YAML file,
applies ``--set section.key=value`` overrides and returns the resolved
sections and a frozen :class:`RunConfig`; :meth:`RunConfig.from_flat` builds
the same object from FedML's flattened ``args``. Lower layers raise
:class:`~fedml_progfed.errors.FieldError` naming a field; :func:`explain`
turns it into ``section.key: problem``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import yaml

from fedml_progfed.config.schema import SECTION_PREFIXES, ProgFedConfig, RunConfig
from fedml_progfed.errors import ConfigError, FieldError, ProgFedError

__all__ = [
    "ProgFedConfig",
    "RunConfig",
    "apply_overrides",
    "explain",
    "fedml_namespace",
    "flatten",
    "key_of",
    "load_config",
    "name_fields",
    "read_yaml",
    "redacted",
]

#: Our YAML sections, by the RunConfig attribute they fill.
OUR_SECTIONS: dict[str, str] = {attribute: f"{attribute}_args" for attribute in SECTION_PREFIXES}

#: The FedML keys this package reads, by YAML section.
FEDML_SECTIONS: dict[str, tuple[str, ...]] = {
    "common_args": ("random_seed", "training_type"),
    "data_args": (
        "dataset", "data_cache_dir", "partition_method", "partition_alpha",
        "patch_size", "eval_size", "eval_mode", "test_fraction",
    ),
    "model_args": ("model", "base_width", "unet_growth", "unet_bridge"),
    "train_args": (
        "federated_optimizer", "client_num_in_total", "client_num_per_round", "comm_round", "epochs",
        "batch_size", "client_optimizer", "learning_rate", "momentum", "weight_decay",
    ),
    "validation_args": ("frequency_of_the_test",),
    "device_args": ("using_gpu", "gpu_id", "gpu_mapping_file", "gpu_mapping_key"),
    # the broker and bucket of backend MQTT_S3 (FedML's offline keys; fedml_plugin/mqtt_s3_settings.py)
    "comm_args": ("backend", "grpc_ipconfig_path", "customized_training_mqtt_config", "customized_training_s3_config"),
    # FedML's DP keys where they mean the same thing (README, "Differential privacy")
    "dp_args": ("enable_dp", "dp_solution_type", "clipping_norm", "noise_multiplier", "delta", "epsilon"),
}
_SECTION_OF = {key: section for section, keys in FEDML_SECTIONS.items() for key in keys}

#: Keys FedML 0.9.6 itself reads (its example configs and ``fedml/arguments.py``) that this
#: package leaves to FedML; with FEDML_SECTIONS they are the keys a section may hold.
FEDML_ONLY_KEYS: dict[str, tuple[str, ...]] = {
    "common_args": ("scenario", "using_mlops", "config_version", "mlops_api_key", "mlops_project_name", "mlops_run_name"),
    "data_args": ("synthetic_data_url", "download"),
    "model_args": ("model_file_cache_folder", "global_model_file_path"),
    "train_args": ("client_id_list", "server_optimizer", "server_lr", "server_momentum", "fedprox_mu"),
    "validation_args": (),
    "device_args": ("worker_num", "process_num_per_node", "device_type"),
    "comm_args": ("is_mobile", "grpc_ipconfig_path", "mqtt_config_path", "s3_config_path", "trpc_master_config_path"),
    "dp_args": ("mechanism_type", "sensitivity", "max_grad_norm"),
    "tracking_args": ("enable_tracking", "enable_wandb", "wandb_key", "wandb_entity", "wandb_project", "wandb_name",
                      "log_file_dir", "run_name"),
}
_KNOWN = {section: set(FEDML_SECTIONS.get(section, ())) | set(keys) for section, keys in FEDML_ONLY_KEYS.items()}
_HOME = {key: section for section, keys in _KNOWN.items() for key in keys}


#: Our keys that users may write in a FedML section beside the FedML keys they go with: the
#: transport's (certificates sit with the connection settings, NVFlare's habit too) and DP's.
HOSTED_KEYS: dict[str, frozenset[str]] = {
    "comm_args": frozenset({"progfed_tls_ca", "progfed_tls_cert", "progfed_tls_key", "progfed_allow_insecure"}),
    "dp_args": frozenset({"progfed_dp_sampling", "progfed_dp_client_rate", "progfed_dp_accountant",
                          "progfed_dp_on_budget", "progfed_dp_noise_seed", "progfed_dp_clip_quantile",
                          "progfed_dp_clip_lr", "progfed_dp_count_noise"}),
}
_HOST_OF = {key: section for section, keys in HOSTED_KEYS.items() for key in keys}


def check_sections(sections: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Warnings for unknown keys in FedML's sections (with the closest known key); an error for a
    known key in the wrong section or an unknown section (FedML would apply it silently)."""
    warnings = []
    ours = set(OUR_SECTIONS.values())
    for section, values in sections.items():
        if section in ours:
            continue  # our sections are checked strictly by RunConfig.from_flat
        for key in values:
            if _HOST_OF.get(key) == section:
                continue  # ours, checked by RunConfig.from_flat
            home = _HOME.get(key)
            if home is not None and home != section:
                raise ConfigError(f"{section}.{key}: {key} belongs in the {home} section; move it to {home}.{key}")
            if section not in _KNOWN:
                raise ConfigError(
                    f"{section}.{key}: unknown section {section!r}"
                    + (f"; did you mean {close[0]}?" if (close := difflib.get_close_matches(section, list(_KNOWN) + sorted(ours), 1)) else "")
                    + f"; sections: {', '.join([*_KNOWN, *sorted(ours)])}"
                )
            if key not in _KNOWN[section]:
                close = difflib.get_close_matches(key, sorted(_KNOWN[section]), 1)
                warnings.append(f"{section}.{key}: unknown; " + (f"did you mean {close[0]}?" if close else "FedML may ignore it"))
    return warnings


def key_of(field: str) -> str:
    """``section.key`` as users write it in the YAML, for a field path (``batch_size``, ``progfed.stages``)."""
    attribute, dot, name = field.partition(".")
    if dot and attribute in SECTION_PREFIXES:
        key = SECTION_PREFIXES[attribute] + name
        # hosted keys are documented in their FedML section, so errors send users there
        return f"{_HOST_OF.get(key, OUR_SECTIONS[attribute])}.{key}"
    return f"{_SECTION_OF.get(field, 'args')}.{field}"


_FIELD_REFERENCE = re.compile(r"\{([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)?)\}")


def name_fields(text: str) -> str:
    """Replace the ``{field}`` references lower layers write (``{comm_round}``, ``{progfed.min_clients}``)
    with the ``section.key`` users write in the YAML; other braces are left alone."""

    def key(match: re.Match) -> str:
        field = match.group(1)
        attribute, dot, name = field.partition(".")
        known = (attribute in SECTION_PREFIXES and name in _section_fields(attribute)) if dot else field in _SECTION_OF
        return key_of(field) if known else match.group(0)

    return _FIELD_REFERENCE.sub(key, text)


def _section_fields(attribute: str) -> set[str]:
    section = next(f.default_factory for f in dataclasses.fields(RunConfig) if f.name == attribute)
    return {f.name for f in dataclasses.fields(section)}


def explain(exc: ProgFedError) -> str:
    """The one line a user sees for an error: fields become ``section.key``, in the key and in the text."""
    if isinstance(exc, FieldError):
        return name_fields(f"{key_of(exc.field)}: {exc.problem}")
    return name_fields(str(exc))


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
    ours = {section: SECTION_PREFIXES[attribute] for attribute, section in OUR_SECTIONS.items()}
    flat: dict[str, Any] = {}
    for section, values in sections.items():
        for key, value in values.items():
            for our_section, prefix in ours.items():
                if section != our_section and key.startswith(prefix) and _HOST_OF.get(key) != section:
                    raise ConfigError(f"{section}.{key}: {prefix}* keys belong in the {our_section} section")
            if section in ours and not key.startswith(ours[section]):
                raise ConfigError(f"{section}.{key}: keys of this section start with {ours[section]!r}, e.g. {ours[section]}{key}")
            flat[key] = value
    return flat


#: Credential fields inside FedML's MQTT/S3 dicts: never written to a run folder or a log line.
#: So is DP's noise seed: whoever knows it can remove the noise (checkpoints keep the server's own).
SECRET_FIELDS = frozenset({"MQTT_PWD", "CN_S3_SAK", "CN_S3_AKI", "progfed_dp_noise_seed"})
REDACTED = "<redacted>"


def redacted(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A copy of the sections with every credential (:data:`SECRET_FIELDS`, at any depth) replaced by ``<redacted>``.

    The run folder's ``config.yaml`` is written from this copy (and a resumed run compares
    against it); FedML's ``args`` keep the real values, which only the transport reads.
    """

    def clean(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: (REDACTED if k in SECRET_FIELDS and v not in (None, "") else clean(v)) for k, v in value.items()}
        return value

    return {section: clean(dict(values)) for section, values in sections.items()}


def _resolve_defaults(sections: dict[str, dict[str, Any]], config: RunConfig) -> dict[str, dict[str, Any]]:
    """Write values derived from defaults back, so the run folder's config.yaml says what was used."""
    section = sections.setdefault(OUR_SECTIONS["progfed"], {})
    section["progfed_server_lr"] = config.progfed.resolved_server_lr
    return sections


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict[str, dict[str, Any]], RunConfig]:
    """Read, override, flatten and validate; returns (resolved sections, config)."""
    sections = apply_overrides(read_yaml(path), overrides)
    for warning in check_sections(sections):
        logging.getLogger("fedml_progfed").warning(warning)
    config = RunConfig.from_flat(flatten(sections))
    return _resolve_defaults(sections, config), config


def fedml_namespace(sections: Mapping[str, Mapping[str, Any]]) -> SimpleNamespace:
    """A flat ``args`` object like the one ``fedml.load_arguments`` builds, for ClientTrainer/ServerAggregator."""
    return SimpleNamespace(**flatten(sections))
