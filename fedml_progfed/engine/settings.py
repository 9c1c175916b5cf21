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
    codec_down: Codec
    seed: int
    #: Leave out of a client's broadcast the tensors it holds already (see engine/versions.py).
    cache_unchanged: bool = False

    @classmethod
    def from_config(cls, config: RunConfig) -> "WireSettings":
        p = config.progfed
        codecs = {}
        for field, text in (("progfed.compression_up", p.compression_up), ("progfed.compression_down", p.compression_down)):
            try:
                codecs[field] = Codec(text)
            except SpecError as exc:
                raise FieldError(field, str(exc)) from None
        if codecs["progfed.compression_down"].error_feedback:
            raise FieldError(
                "progfed.compression_down",
                f"{p.compression_down!r}: error feedback is a client's memory of its own updates; "
                f"use '+ef' in {{progfed.compression_up}}",
            )
        down = codecs["progfed.compression_down"]
        # A lossy broadcast leaves each client its own decoded copy, and under cross-silo with partial
        # participation a data silo moves between processes, so what a silo "holds" is not known there.
        partial_cross_silo = config.training_type == "cross_silo" and config.client_num_per_round < config.client_num_in_total
        cache = p.cache_unchanged and down.spec.lossless and not partial_cross_silo
        return cls(codecs["progfed.compression_up"], down, config.random_seed, cache)

    def up_seed(self, round_idx: int, client: int) -> int:
        """Seed of a client's upload codec in a round (the server decodes with the same one)."""
        return derive_seed("up", self.seed, round_idx, client)

    def down_seed(self, round_idx: int) -> int:
        """Seed of the broadcast codec in a round."""
        return derive_seed("down", self.seed, round_idx)
