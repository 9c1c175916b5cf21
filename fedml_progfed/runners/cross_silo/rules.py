"""Configuration rules that only cross-silo runs have (FedML's runtime samples and places clients itself)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config is imported by the entry already; nothing here needs it at import
    from fedml_progfed.config import RunConfig


def check_cross_silo(config: RunConfig) -> None:
    """Rules that only cross-silo runs have, checked before any process starts training.

    Raises
    ------
    FieldError
        ``client_num_per_round`` below ``client_num_in_total`` together with memory
        budgets, or with error feedback on the uplink; a round deadline with cached broadcasts.
    """
    from fedml_progfed.comm.codecs import parse_spec
    from fedml_progfed.errors import FieldError

    partial = config.client_num_per_round < config.client_num_in_total
    if partial and config.memory.budgets:
        raise FieldError(
            "client_num_per_round",
            f"{config.client_num_per_round} of {config.client_num_in_total}: with memory_budgets the server "
            f"chooses among the clients that fit a round, but FedML's cross-silo runtime calls its own sample; set "
            f"client_num_per_round equal to client_num_in_total (clients that do not fit answer with a skip)",
        )
    if partial and parse_spec(config.progfed.compression_up).error_feedback:
        raise FieldError(
            "progfed.compression_up",
            f"{config.progfed.compression_up!r}: '+ef' keeps each silo's residual in the process that trained it, "
            f"and with partial participation FedML's cross-silo runtime moves silos between processes, so the "
            f"residual would not follow its silo; set train_args.client_num_per_round equal to client_num_in_total "
            f"(every silo in its own process every round) or drop '+ef'",
        )
    if config.progfed.round_deadline_s is not None and config.progfed.cache_unchanged:
        raise FieldError(
            "progfed.cache_unchanged",
            "true leaves out of a broadcast what the server believes a silo holds, but with "
            "progfed_round_deadline_s a silo may miss broadcasts (stopped) or lose them (restarted); set "
            "progfed_args.progfed_cache_unchanged: false",
        )
