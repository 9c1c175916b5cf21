"""What both ends of a run agree on besides the algorithm: codecs and the run seed."""

from __future__ import annotations

from dataclasses import dataclass

from fedml_progfed.comm.codecs import Codec, SpecError
from fedml_progfed.config.schema import RunConfig
from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.errors import FieldError


@dataclass(frozen=True)
class WireSettings:
    """Codecs of both directions and the seed their randomness derives from."""

    codec_up: Codec
    #: The codec of a broadcast that carries the weights themselves (a client holding nothing).
    codec_down: Codec
    seed: int
    #: Leave out of a client's broadcast the tensors it holds already (see engine/versions.py).
    cache_unchanged: bool = False
    #: The codec of a broadcast's change since what the client holds (engine/references.py);
    #: ``None``: broadcasts carry the weights.
    codec_changes: Codec | None = None
    #: Rounds the server keeps a client's reconstruction after its last answer.
    history: int = 8

    @classmethod
    def from_config(cls, config: RunConfig) -> "WireSettings":
        p = config.progfed
        codecs = {}
        for field, text in (("progfed.compression_up", p.compression_up), ("progfed.compression_down", p.compression_down),
                            ("progfed.compression_down_weights", p.compression_down_weights)):
            try:
                codecs[field] = Codec(text)
            except SpecError as exc:
                raise FieldError(field, str(exc)) from None
        if codecs["progfed.compression_down_weights"].error_feedback:
            raise FieldError(
                "progfed.compression_down_weights",
                f"{p.compression_down_weights!r}: error feedback is a client's memory of its own updates; "
                f"use '+ef' in {{progfed.compression_up}}",
            )
        if codecs["progfed.compression_down"].error_feedback:
            raise FieldError(
                "progfed.compression_down",
                f"{p.compression_down!r}: a broadcast's change is computed against what the client reconstructed, so "
                f"what one round's codec left out is already in the next round's change; drop '+ef'",
            )
        changes = codecs["progfed.compression_down"]
        weights = codecs["progfed.compression_down_weights"]
        # A lossy broadcast leaves each client its own decoded copy, and under cross-silo with partial
        # participation a data silo moves between processes, so what a silo "holds" is not known there.
        partial_cross_silo = config.training_type == "cross_silo" and config.client_num_per_round < config.client_num_in_total
        if not changes.spec.lossless:
            _check_change_broadcasts(config, partial_cross_silo)
            return cls(codecs["progfed.compression_up"], weights, config.random_seed, False,
                       codec_changes=changes, history=p.broadcast_history)
        cache = p.cache_unchanged and weights.spec.lossless and not partial_cross_silo
        return cls(codecs["progfed.compression_up"], weights, config.random_seed, cache)

    def up_seed(self, round_idx: int, client: int) -> int:
        """Seed of a client's upload codec in a round (the server decodes with the same one)."""
        return derive_seed("up", self.seed, round_idx, client)

    def down_seed(self, round_idx: int) -> int:
        """Seed of the broadcast codec in a round."""
        return derive_seed("down", self.seed, round_idx)

    def change_seed(self, round_idx: int, client: int) -> int:
        """Seed of the change codec of ``client``'s broadcast in a round (the client decodes with it)."""
        return derive_seed("down-change", self.seed, round_idx, client)


#: strategies whose clients all receive the same sub-model (no per-client widths or depths)
CHANGE_BROADCAST_STRATEGIES = ("progfed", "e2e", "e2e-exclusive", "profl")


def _check_change_broadcasts(config: RunConfig, partial_cross_silo: bool) -> None:
    """Where a change broadcast cannot know what a client holds: one error naming why."""
    p = config.progfed
    rules = [
        (p.strategy in CHANGE_BROADCAST_STRATEGIES, "progfed.strategy",
         f"{p.strategy!r} gives clients sub-models of their own; compressed change broadcasts need one of "
         f"{', '.join(CHANGE_BROADCAST_STRATEGIES)}; to compress the weights themselves, set "
         f"{{progfed.compression_down}} to float and {{progfed.compression_down_weights}} to the codec"),
        (not partial_cross_silo, "progfed.compression_down",
         f"{p.compression_down!r} under cross-silo with partial participation: a data silo moves between processes, "
         f"so what it holds is not known; call every silo each round or use float"),
        (p.round_deadline_s is None, "progfed.round_deadline_s",
         "a silo the deadline leaves out may or may not hold the round's model, so its next change has no known "
         "base; leave the deadline empty with a compressed {progfed.compression_down}"),
    ]
    for ok, field, message in rules:
        if not ok:
            raise FieldError(field, message)
