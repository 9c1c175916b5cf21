"""The run configuration as frozen dataclasses: every field, its default and its range rule.

Pure data: this module imports nothing from the rest of the package, so every
layer may take these dataclasses as arguments. Range rules that need no model,
data or registry are checked once, in :meth:`RunConfig.validate`; a rule that
needs a registry (a model or codec name) is checked where the name is looked
up, before any training. Errors name the *field* (``"batch_size"``,
``"progfed.stages"``); :mod:`fedml_progfed.config` maps fields to YAML keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from fedml_progfed.config.coerce import coerce_fields
from fedml_progfed.errors import FieldError

#: FedML flattens YAML sections into ``args.<key>``, so keys of our sections carry a prefix.
SECTION_PREFIXES: dict[str, str] = {
    "progfed": "progfed_", "profl": "profl_", "memory": "memory_", "width": "width_", "depthfl": "depthfl_",
}
#: Keys that moved to another section: old field path -> new field path (an error names the new place).
MOVED_FIELDS: dict[str, str] = {
    "profl.memory_budgets": "memory.budgets",
    "profl.memory_estimator": "memory.estimator",
    "progfed.growth": "unet_growth",
    "progfed.unet_bridge": "unet_bridge",
}

#: Warm-up semantics (ProgFed Sec. 4.1): inside each stage's budget, or extra rounds after each growth.
WARMUP_MODES = ("within", "extra")
AGGREGATION_WEIGHTS = ("samples", "uniform")
INVALID_UPDATE_POLICIES = ("drop", "abort")
NORM_POLICIES = ("reject", "clip")
#: Round timeout of cross-silo runs when progfed_round_timeout_s is empty (standalone runs wait forever).
CROSS_SILO_ROUND_TIMEOUT_S = 600.0
#: Server learning rate used when ``progfed_server_lr`` is left empty, per optimizer.
#: FedAdam's 0.01 is inside the range Reddi et al. (2021) tune over; 1.0 would move
#: weights by about 1/sqrt(1-beta2) times the pseudo-gradient's sign in the first step.
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedprox": 1.0, "fedadam": 0.01}


@dataclass(frozen=True)
class ProgFedConfig:
    """Our section, ``progfed_args`` (keys carry the ``progfed_`` prefix in YAML).

    strategy: algorithm name (``progfed``; ``e2e`` is ProgFed with a single stage).
    stages: number of stages S; empty means the model's paper default.
    schedule: explicit rounds per stage; empty means the paper's guideline T/(2S).
    warmup_rounds / warmup_mode: rounds after each growth that train only the entering block
    and head, ``within`` the stage's budget or ``extra`` rounds outside T (the authors' code).
    lr_schedule / lr_min / lr_restart_at_growth: client learning rate per round.
    optimizer: ``fedavg``, ``fedprox`` or ``fedadam``; server_lr (empty: per-optimizer default)
    and the FedProx/FedAdam constants.
    aggregation_weights: ``samples`` (weighted by sample count) or ``uniform`` (Alg. 1 line 27);
    empty: the algorithm's default (``samples`` for ProgFed and e2e, ``uniform`` for ProFL, as its authors).
    send_entering: broadcast the modules that enter at a growth (true), or let clients derive
    them from the shared seed (false, fewer bytes; the ledger's ``seeded_params`` shows it).
    cache_unchanged: leave out of a client's broadcast the tensors it already holds at their
    current value (frozen blocks are sent once); false sends the whole sub-model every round.
    It applies with a lossless broadcast and, in cross-silo, when every client takes part.
    compression_up: the wire codec of client updates (their change since the broadcast).
    compression_down: the codec of a broadcast's change since what each client holds (``float``:
    broadcasts carry the weights); compression_down_weights: the codec of a broadcast that
    carries the weights (a client that holds nothing); broadcast_history: rounds the server keeps
    what a client reconstructed after its last answer (an absent client gets the full model later).
    update: ProgFed Table 6's update strategy: ``progressive`` (the paper's), ``layerwise``,
    ``partial``, ``mixed`` or ``random``.
    diagnostics: compute the norm discrepancy q_t (Eq. 11) on every test round.
    invalid_update: ``drop`` an invalid update (recorded, the round goes on with the rest) or
    ``abort`` the run; min_clients: valid updates a round needs, else it is skipped.
    max_update_norm / norm_policy: optional bound on an update's L2 norm, ``reject`` or ``clip``.
    max_samples: optional cap on the sample count a client claims.
    round_timeout_s: seconds to wait for a round's updates (empty: none standalone, 600 cross-silo).
    round_deadline_s: gRPC cross-silo: seconds after a round's models went out after which the
    server aggregates the updates that arrived (at least ``min_clients``) and names the silent
    silos in ``silent_clients``; below quorum it waits up to ``round_timeout_s``, so the deadline
    must be shorter than the effective round timeout (empty: wait for every silo).
    client_dropout: the probability in [0, 1) that a sampled client stays silent in a round (it
    trains nothing and is named in ``silent_clients``), drawn from (random_seed, round, client)
    alone: the same silos in every runtime, the others' updates unchanged. 0: nobody.
    tls_ca / tls_cert / tls_key: gRPC mutual TLS files (``{rank}`` is replaced by the party's
    rank), written by ``fedml-progfed provision``; all three or none. Users write them under
    ``comm_args``. allow_insecure: plain TCP off loopback (a network the user trusts).
    checkpoint_every / checkpoint_keep: server-state checkpoints in the run folder.
    dp_sampling / dp_client_rate / dp_accountant / dp_on_budget / dp_noise_seed: client-level DP
    (``dp_args``, where users write them): ``fixed``-size or ``poisson`` client sampling and its
    rate q (empty: client_num_per_round / client_num_in_total), ``rdp`` | ``pld``, ``refuse`` a
    run whose schedule exceeds ``dp_args.epsilon`` or ``stop`` training at the round that would,
    and the secret seed of the draws (empty: random per run; set it only to reproduce a run).
    dp_clip_quantile / dp_clip_lr / dp_count_noise: adaptive clipping (Andrew et al. 2021): the
    target quantile of update norms (empty: a fixed ``clipping_norm``), the bound's learning rate
    and the noise of the count (empty: a twentieth of the expected participants).
    """

    strategy: str = "progfed"
    stages: int | None = None
    schedule: tuple[int, ...] | None = None
    warmup_rounds: int = 0
    warmup_mode: str = "within"
    lr_schedule: str = "constant"
    lr_min: float = 0.0
    lr_restart_at_growth: bool = False
    optimizer: str = "fedavg"
    server_lr: float | None = None
    fedprox_mu: float = 0.01
    fedadam_beta1: float = 0.9
    fedadam_beta2: float = 0.99
    fedadam_tau: float = 1.0e-3
    fedadam_reset_on_growth: bool = False
    aggregation_weights: str | None = None
    send_entering: bool = True
    cache_unchanged: bool = True
    compression_up: str = "float"
    compression_down: str = "float"
    compression_down_weights: str = "float"
    broadcast_history: int = 8
    update: str = "progressive"
    diagnostics: bool = False
    invalid_update: str = "drop"
    min_clients: int = 1
    max_update_norm: float | None = None
    norm_policy: str = "reject"
    max_samples: float | None = None
    round_timeout_s: float | None = None
    round_deadline_s: float | None = None
    client_dropout: float = 0.0
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    allow_insecure: bool = False
    checkpoint_every: int = 1
    checkpoint_keep: int = 2
    dp_sampling: str = "fixed"
    dp_client_rate: float | None = None
    dp_accountant: str = "rdp"
    dp_on_budget: str = "refuse"
    dp_noise_seed: int | None = None
    dp_clip_quantile: float | None = None
    dp_clip_lr: float = 0.2
    dp_count_noise: float | None = None

    @property
    def resolved_aggregation_weights(self) -> str:
        """The aggregation weights in use: the configured ones, else the algorithm's default."""
        if self.aggregation_weights is not None:
            return self.aggregation_weights
        return "uniform" if self.strategy == "profl" else "samples"

    @property
    def resolved_server_lr(self) -> float:
        """The server learning rate in use: the configured one, else the optimizer's default."""
        if self.server_lr is not None:
            return self.server_lr
        return DEFAULT_SERVER_LR.get(self.optimizer, 1.0)


SHRINK_PREFIXES = ("real", "basic")
FROZEN_NORMS = ("train", "eval")
MEMORY_ESTIMATORS = ("measured", "analytic")
WIDTH_SCALERS = ("auto", "on", "off")


@dataclass(frozen=True)
class ProFLConfig:
    """ProFL's section, ``profl_args`` (keys carry the ``profl_`` prefix in YAML).

    em_window / em_threshold / em_patience / em_sample: effective movement over the last W
    rounds of at most ``em_sample`` sampled scalars; a step ends when EM stays below the
    threshold for ``em_patience`` evaluations (ProFL spec sec. 0 and 2.5).
    min_rounds_per_step / max_rounds_per_step: bounds of every step but the last, which takes
    the remaining rounds; effective movement ends a step, the maximum is a safety net (empty:
    an equal share of comm_round for every step, the last included).
    lr: the clients' constant learning rate of every cross-entropy step (the authors' 0.01; ProFL
    does not follow the run-wide decay).
    distill_lr: client learning rate of the distillation steps (the authors' 1e-5; MSE between
    logits through a chain of bias-free convolutions diverges at ordinary rates).
    frozen_norm: ``train`` (the authors: the whole model in train mode, so the frozen blocks'
    normalisation statistics follow the data and travel with the update) or ``eval`` (held).
    shrink_prefix: ``real`` (the frozen real blocks, the authors' code) or ``basic``
    (trainable basic layers, spec sec. 2.3) in front of the block a shrinking step trains.
    """

    em_window: int = 6
    em_threshold: float = 0.1
    em_patience: int = 2
    em_sample: int = 10000
    min_rounds_per_step: int | None = None
    max_rounds_per_step: int | None = None
    shrink_prefix: str = "real"
    lr: float = 0.01
    distill_lr: float = 1.0e-5
    frozen_norm: str = "train"

    @property
    def min_rounds(self) -> int:
        """The configured minimum, or the window (EM needs W rounds of movement)."""
        return self.min_rounds_per_step if self.min_rounds_per_step is not None else self.em_window


@dataclass(frozen=True)
class MemoryConfig:
    """Client memory budgets, ``memory_args`` (keys carry the ``memory_`` prefix); they apply to every method.

    budgets: per-client memory: ``relative-uniform:LOW:HIGH`` (fractions of the full model's
    peak), ``uniform-mb:LOW:HIGH`` or a CSV path (``client,mb``); empty: no budgets.
    estimator: ``measured`` (peak of one training step) or ``analytic`` decides eligibility.
    """

    budgets: str | None = None
    estimator: str = "measured"


@dataclass(frozen=True)
class WidthConfig:
    """Width-scaled sub-models, ``width_args`` (keys carry the ``width_`` prefix): HeteroFL and AllSmall.

    ratios: the width multipliers a client may train, widest first (HeteroFL's levels a-e:
    1, 1/2, 1/4, 1/8, 1/16 of every hidden layer's channels). HeteroFL gives each client the
    widest its memory fits; AllSmall everyone the widest every client fits.
    scaler: HeteroFL's scaler module (Sec. 3.2): a narrower model's hidden outputs are divided by
    its ratio in training. ``auto`` (default): on for models with normalisation layers, as all of
    the paper's are, off for models without (the ConvNets), where the 1/r of every layer blows up
    the first layer's gradients (about 55x at r = 1/8) and training diverges; ``on`` | ``off``.
    """

    ratios: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125, 0.0625)
    scaler: str = "auto"


@dataclass(frozen=True)
class DepthFLConfig:
    """DepthFL's section, ``depthfl_args`` (keys carry the ``depthfl_`` prefix).

    self_distill: mutual self-distillation among a client's classifiers (DepthFL Sec. 3.2, the
    KL term); false: each classifier learns from the labels alone (InclusiveFL-like).
    """

    self_distill: bool = True


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
    unet_growth: str | None = None
    unet_bridge: str | None = None
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
    gpu_mapping_file: str | None = None
    gpu_mapping_key: str | None = None
    grpc_ipconfig_path: str | None = None
    # FedML's dp_args; ``epsilon`` is the whole run's target (FedML's CDP frame reads it per round)
    enable_dp: bool = False
    dp_solution_type: str | None = None
    clipping_norm: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    epsilon: float | None = None
    progfed: ProgFedConfig = field(default_factory=ProgFedConfig)
    profl: ProFLConfig = field(default_factory=ProFLConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    width: WidthConfig = field(default_factory=WidthConfig)
    depthfl: DepthFLConfig = field(default_factory=DepthFLConfig)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "RunConfig":
        """Build and validate from FedML-style flat keys (``vars(args)`` or a flattened YAML).

        Unknown ``progfed_*`` keys are errors; other unknown keys belong to FedML and are left alone.
        """
        nested = {}
        for attribute, prefix in SECTION_PREFIXES.items():
            section_cls = _field_type(cls, attribute)
            ours = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = sorted(set(ours) - known)
            moved = [k for k in unknown if f"{attribute}.{k}" in MOVED_FIELDS]
            if moved:
                raise FieldError(f"{attribute}.{moved[0]}", f"this key moved; set {{{MOVED_FIELDS[f'{attribute}.{moved[0]}']}}} instead")
            if unknown:
                raise FieldError(
                    f"{attribute}.{unknown[0]}",
                    "unknown key; known keys: " + ", ".join(prefix + k for k in sorted(known)),
                )
            nested[attribute] = section_cls(**coerce_fields(section_cls, ours, prefix=f"{attribute}."))
        plain = {f.name for f in dataclasses.fields(cls)} - set(SECTION_PREFIXES)
        config = cls(**nested, **coerce_fields(cls, {k: v for k, v in flat.items() if k in plain}))
        config.validate()
        return config

    def validate(self) -> None:
        """Range rules that need no model, data or registry; raises one :class:`FieldError`."""
        p = self.progfed
        rules: list[tuple[bool, str, Any, str]] = [
            (self.random_seed >= 0, "random_seed", self.random_seed, "a non-negative integer"),
            (self.comm_round >= 1, "comm_round", self.comm_round, "a positive integer"),
            (self.epochs >= 1, "epochs", self.epochs, "a positive integer"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "a positive integer"),
            (self.learning_rate > 0, "learning_rate", self.learning_rate, "a positive number"),
            (self.momentum >= 0, "momentum", self.momentum, "a number >= 0"),
            (self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0"),
            (self.client_num_in_total >= 1, "client_num_in_total", self.client_num_in_total, "a positive integer"),
            (
                1 <= self.client_num_per_round <= self.client_num_in_total,
                "client_num_per_round",
                self.client_num_per_round,
                f"between 1 and client_num_in_total ({self.client_num_in_total})",
            ),
            (self.frequency_of_the_test >= 1, "frequency_of_the_test", self.frequency_of_the_test, "a positive integer"),
            (self.client_optimizer == "sgd", "client_optimizer", self.client_optimizer, "sgd"),
            (
                self.federated_optimizer == "FedAvg",
                "federated_optimizer",
                self.federated_optimizer,
                "FedAvg (FedML's cross-silo runtime accepts only that; choose FedAvg/FedProx/FedAdam "
                "with progfed_args.progfed_optimizer: fedavg|fedprox|fedadam)",
            ),
            (self.eval_mode in ("full", "center_crop"), "eval_mode", self.eval_mode, "full | center_crop"),
            (0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "a fraction in (0, 1)"),
            (self.base_width is None or self.base_width >= 1, "base_width", self.base_width, "a positive integer"),
            (p.stages is None or p.stages >= 1, "progfed.stages", p.stages, "a positive integer or empty"),
            (p.warmup_rounds >= 0, "progfed.warmup_rounds", p.warmup_rounds, "an integer >= 0"),
            (p.warmup_mode in WARMUP_MODES, "progfed.warmup_mode", p.warmup_mode, " | ".join(WARMUP_MODES)),
            (0 <= p.lr_min <= self.learning_rate, "progfed.lr_min", p.lr_min, "between 0 and {learning_rate}"),
            (p.server_lr is None or p.server_lr > 0, "progfed.server_lr", p.server_lr, "a positive number or empty"),
            (p.fedprox_mu >= 0, "progfed.fedprox_mu", p.fedprox_mu, "a number >= 0"),
            (0 <= p.fedadam_beta1 < 1, "progfed.fedadam_beta1", p.fedadam_beta1, "in [0, 1)"),
            (0 <= p.fedadam_beta2 < 1, "progfed.fedadam_beta2", p.fedadam_beta2, "in [0, 1)"),
            (p.fedadam_tau > 0, "progfed.fedadam_tau", p.fedadam_tau, "a positive number"),
            (p.invalid_update in INVALID_UPDATE_POLICIES, "progfed.invalid_update", p.invalid_update, " | ".join(INVALID_UPDATE_POLICIES)),
            (p.min_clients >= 1, "progfed.min_clients", p.min_clients, "a positive integer"),
            (p.max_update_norm is None or p.max_update_norm > 0, "progfed.max_update_norm", p.max_update_norm, "a positive number or empty"),
            (p.norm_policy in NORM_POLICIES, "progfed.norm_policy", p.norm_policy, " | ".join(NORM_POLICIES)),
            (p.max_samples is None or p.max_samples > 0, "progfed.max_samples", p.max_samples, "a positive number or empty"),
            (p.round_timeout_s is None or p.round_timeout_s > 0, "progfed.round_timeout_s", p.round_timeout_s, "a positive number of seconds or empty"),
            (p.round_deadline_s is None or p.round_deadline_s > 0, "progfed.round_deadline_s", p.round_deadline_s,
             "a positive number of seconds or empty"),
            (
                p.round_deadline_s is None or self.round_timeout_s is None or p.round_deadline_s < self.round_timeout_s,
                "progfed.round_deadline_s", p.round_deadline_s,
                f"fewer seconds than the round timeout {{progfed.round_timeout_s}} ({self.round_timeout_s} s), which "
                f"ends a round still below quorum; raise the timeout or lower the deadline",
            ),
            (0 <= p.client_dropout < 1, "progfed.client_dropout", p.client_dropout,
             "a probability in [0, 1) (1 would silence every client of every round)"),
            (p.checkpoint_every >= 0, "progfed.checkpoint_every", p.checkpoint_every, "an integer >= 0 (0: no checkpoints)"),
            (p.checkpoint_keep >= 1, "progfed.checkpoint_keep", p.checkpoint_keep, "a positive integer"),
            (p.broadcast_history >= 1, "progfed.broadcast_history", p.broadcast_history, "a positive integer (rounds)"),
            (
                p.aggregation_weights is None or p.aggregation_weights in AGGREGATION_WEIGHTS,
                "progfed.aggregation_weights",
                p.aggregation_weights,
                " | ".join(AGGREGATION_WEIGHTS),
            ),
            (self.profl.em_window >= 1, "profl.em_window", self.profl.em_window, "a positive integer"),
            (0 < self.profl.em_threshold < 1, "profl.em_threshold", self.profl.em_threshold, "a number in (0, 1)"),
            (self.profl.em_patience >= 1, "profl.em_patience", self.profl.em_patience, "a positive integer"),
            (self.profl.em_sample >= 1, "profl.em_sample", self.profl.em_sample, "a positive integer"),
            (self.profl.min_rounds >= 1, "profl.min_rounds_per_step", self.profl.min_rounds_per_step, "a positive integer"),
            (
                self.profl.max_rounds_per_step is None or self.profl.max_rounds_per_step >= self.profl.min_rounds,
                "profl.max_rounds_per_step",
                self.profl.max_rounds_per_step,
                f"at least {{profl.min_rounds_per_step}} ({self.profl.min_rounds})",
            ),
            (self.profl.distill_lr > 0, "profl.distill_lr", self.profl.distill_lr, "a positive number"),
            (self.profl.lr > 0, "profl.lr", self.profl.lr, "a positive number"),
            (self.profl.frozen_norm in FROZEN_NORMS, "profl.frozen_norm", self.profl.frozen_norm, " | ".join(FROZEN_NORMS)),
            (self.profl.shrink_prefix in SHRINK_PREFIXES, "profl.shrink_prefix", self.profl.shrink_prefix, " | ".join(SHRINK_PREFIXES)),
            (
                self.memory.estimator in MEMORY_ESTIMATORS,
                "memory.estimator",
                self.memory.estimator,
                " | ".join(MEMORY_ESTIMATORS),
            ),
            (
                bool(self.width.ratios) and all(0 < r <= 1 for r in self.width.ratios)
                and all(a > b for a, b in zip(self.width.ratios, self.width.ratios[1:])),
                "width.ratios",
                list(self.width.ratios),
                "width multipliers in (0, 1], widest first, each once (e.g. [1, 0.5, 0.25, 0.125, 0.0625])",
            ),
            (self.width.scaler in WIDTH_SCALERS, "width.scaler", self.width.scaler, " | ".join(WIDTH_SCALERS)),
            (
                not (p.strategy == "e2e" and p.schedule),
                "progfed.schedule",
                list(p.schedule or ()),
                "empty for strategy e2e (it trains the full model every round)",
            ),
        ]
        for ok, name, value, allowed in rules:
            if not ok:
                raise FieldError(name, f"{value!r} is not allowed; use {allowed}")
        _check_tls(p)
        _check_dp(self)

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with top-level fields or section fields (given as ``progfed={...}``) changed, validated."""
        for section in SECTION_PREFIXES:
            if isinstance(changes.get(section), Mapping):
                changes[section] = dataclasses.replace(getattr(self, section), **changes[section])
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    @property
    def round_timeout_s(self) -> float | None:
        """Seconds the server waits for a round's updates: the configured value, else none in
        standalone runs and :data:`CROSS_SILO_ROUND_TIMEOUT_S` in cross-silo runs."""
        if self.progfed.round_timeout_s is not None:
            return self.progfed.round_timeout_s
        return CROSS_SILO_ROUND_TIMEOUT_S if self.training_type == "cross_silo" else None

    def model_options(self) -> dict[str, Any]:
        """Architecture options set in the config (only those set: other models take none)."""
        options = {"base_width": self.base_width, "growth": self.unet_growth, "bridge": self.unet_bridge}
        return {k: v for k, v in options.items() if v is not None}



#: The mutual-TLS files of a party, by their ProgFedConfig field: all three or none.
TLS_FIELDS = ("tls_ca", "tls_cert", "tls_key")


def _check_tls(p: ProgFedConfig) -> None:
    """One :class:`FieldError` naming the TLS files missing when only some are set."""
    missing = [name for name in TLS_FIELDS if getattr(p, name) is None]
    if not 0 < len(missing) < len(TLS_FIELDS):
        return
    given = [f"{{progfed.{n}}}" for n in TLS_FIELDS if n not in missing]
    nor = "".join(f", nor {{progfed.{n}}}" for n in missing[1:])
    raise FieldError(
        f"progfed.{missing[0]}",
        f"not set{nor}, while {' and '.join(given)} {'is' if len(given) == 1 else 'are'}; a party needs all three "
        f"TLS files or none (`fedml-progfed provision --cf CONFIG --out DIR` writes them)",
    )


#: dp_solution_type values this package implements, and FedML 0.9.6's that it does not.
DP_SOLUTIONS = ("client", "sample")
FEDML_DP_SOLUTIONS = {
    "ldp": "FedML's local DP adds noise to each client's model with a per-round epsilon and no composition",
    "cdp": "FedML's central DP frame spends an epsilon per round, with no accountant across rounds",
    "nbafl": "FedML's NbAFL frame is not implemented here",
    "dp_clip": "FedML's DP_Clip divides its noise scale by qw on every call, so the noise shrinks each round",
}
DP_SAMPLINGS = ("fixed", "poisson")
DP_ACCOUNTANTS = ("rdp", "pld")
DP_ON_BUDGET = ("refuse", "stop")
#: strategies whose aggregation averages every element over the same clients (one sensitivity)
DP_STRATEGIES = ("progfed", "e2e", "e2e-exclusive", "profl")


def _check_dp(config: "RunConfig") -> None:
    """One :class:`FieldError` for a DP setting that cannot give the guarantee it asks for."""
    p = config.progfed
    rules: list[tuple[bool, str, Any, str]] = [
        (p.dp_sampling in DP_SAMPLINGS, "progfed.dp_sampling", p.dp_sampling, " | ".join(DP_SAMPLINGS)),
        (p.dp_accountant in DP_ACCOUNTANTS, "progfed.dp_accountant", p.dp_accountant, " | ".join(DP_ACCOUNTANTS)),
        (p.dp_on_budget in DP_ON_BUDGET, "progfed.dp_on_budget", p.dp_on_budget, " | ".join(DP_ON_BUDGET)),
        (p.dp_client_rate is None or 0 < p.dp_client_rate <= 1, "progfed.dp_client_rate", p.dp_client_rate,
         "a probability in (0, 1] or empty"),
        (p.dp_noise_seed is None or p.dp_noise_seed >= 0, "progfed.dp_noise_seed", p.dp_noise_seed,
         "a non-negative integer or empty"),
        (p.dp_clip_quantile is None or 0 < p.dp_clip_quantile < 1, "progfed.dp_clip_quantile", p.dp_clip_quantile,
         "a quantile in (0, 1) (Andrew et al. use 0.5) or empty for a fixed clipping_norm"),
        (p.dp_clip_lr > 0, "progfed.dp_clip_lr", p.dp_clip_lr, "a positive number (Andrew et al. use 0.2)"),
        (p.dp_count_noise is None or p.dp_count_noise > 0, "progfed.dp_count_noise", p.dp_count_noise,
         "a positive number or empty"),
    ]
    for ok, name, value, allowed in rules:
        if not ok:
            raise FieldError(name, f"{value!r} is not allowed; use {allowed}")
    if not config.enable_dp:
        return
    solution = (config.dp_solution_type or "").strip()
    if solution.lower() in FEDML_DP_SOLUTIONS:
        raise FieldError("dp_solution_type", f"{solution!r}: {FEDML_DP_SOLUTIONS[solution.lower()]}; use client "
                                             f"(DP-FedAvg with an accountant)")
    if solution not in DP_SOLUTIONS:
        raise FieldError("dp_solution_type", f"{solution!r} is not allowed; use {' | '.join(DP_SOLUTIONS)}")
    bounded = "a client's whole update" if solution == "client" else "one record's gradient"
    rules = [
        (config.clipping_norm is not None and config.clipping_norm > 0, "clipping_norm", config.clipping_norm,
         f"a positive number (C: the L2 bound of {bounded})"),
        (config.noise_multiplier is not None and config.noise_multiplier >= 0, "noise_multiplier",
         config.noise_multiplier, "a number >= 0 (z: the noise's standard deviation is z * clipping_norm)"),
        (config.delta is not None and 0 < config.delta < 1, "delta", config.delta, "a number in (0, 1), e.g. 1e-5"),
        (config.epsilon is None or config.epsilon > 0, "epsilon", config.epsilon,
         "a positive number (the whole run's target) or empty"),
    ]
    if solution == "sample":
        rules += [
            (p.dp_clip_quantile is None, "progfed.dp_clip_quantile", p.dp_clip_quantile,
             "empty with dp_solution_type sample: adaptive clipping is for client-level DP"),
            (config.epsilon is None or p.dp_on_budget == "stop", "progfed.dp_on_budget", p.dp_on_budget,
             "stop with dp_solution_type sample and a target epsilon: refusing before the run would need each silo's "
             "size, which the server learns from the silos' first reports; with stop a silo whose next round would "
             "pass the target is not called again"),
            (p.optimizer != "fedprox", "progfed.optimizer", p.optimizer,
             "fedavg or fedadam with DP-SGD: FedProx's proximal term would reach the weights outside the per-sample clip"),
            (config.memory.budgets is None, "memory.budgets", config.memory.budgets,
             "empty with dp_solution_type sample: the memory probe does not count DP-SGD's per-sample gradients"),
        ]
    else:
        rules += _client_level_rules(config)
    for ok, name, value, allowed in rules:
        if not ok:
            raise FieldError(name, f"{value!r} is not allowed; use {allowed}")


def _client_level_rules(config: "RunConfig") -> list[tuple[bool, str, Any, str]]:
    """What client-level DP-FedAvg's single noise scale and fixed denominator need."""
    p = config.progfed
    return [
        (p.strategy in DP_STRATEGIES, "progfed.strategy", p.strategy,
         f"one of {', '.join(DP_STRATEGIES)} with DP: the others average each element over a different set of "
         f"clients, so one noise scale cannot bound every element's sensitivity"),
        (p.aggregation_weights in (None, "uniform"), "progfed.aggregation_weights", p.aggregation_weights,
         "uniform or empty with DP: client-level DP averages clipped updates with a fixed denominator"),
        (p.dp_accountant != "pld" or p.dp_sampling == "poisson", "progfed.dp_accountant", p.dp_accountant,
         "rdp with fixed-size sampling (PLD supports Poisson sampling only), or set progfed_dp_sampling: poisson"),
        (
            config.training_type != "cross_silo" or config.client_num_per_round == config.client_num_in_total,
            "client_num_per_round", config.client_num_per_round,
            f"client_num_in_total ({config.client_num_in_total}) in a cross-silo run with DP: the server's secret "
            f"draw picks who trains among the silos it calls; for fewer silos per round use "
            f"progfed_dp_sampling: poisson with progfed_dp_client_rate",
        ),
    ]


def _field_type(cls: type, name: str) -> type:
    return next(f.default_factory for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[return-value]
