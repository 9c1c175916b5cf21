"""FedML's cross-silo runtime around our pair: arguments, offline init, the run, the results folder.

``python -m fedml_progfed.main`` calls :func:`run_cross_silo` when
``training_type: cross_silo``: under ``mpirun`` (``backend: MPI``), or started per
party by FedML's agents or by hand (``--rank R --role server|client``). FedML's
runtime calls every hook of the pair; rank 0 writes the same results folder as a
standalone run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("fedml_progfed")

# Command-line keys FedML's own parser knows (fedml/arguments.py: add_args).
FEDML_CLI_DEFAULTS = {"run_id": "0", "rank": 0, "local_rank": 0, "node_rank": 0, "role": "client", "run_device_id": "0"}


def fedml_arguments(sections: dict, ns: argparse.Namespace):
    """FedML's ``Arguments`` object, filled as ``fedml.load_arguments`` would, from our resolved sections."""
    from fedml.arguments import Arguments

    from fedml_progfed.config import flatten

    args = object.__new__(Arguments)
    for key in FEDML_CLI_DEFAULTS:
        setattr(args, key, getattr(ns, key))
    args.yaml_config_file = ns.cf
    for key, value in flatten(sections).items():
        setattr(args, key, value)
    if not hasattr(args, "worker_num"):
        args.worker_num = args.client_num_per_round
    # FedML calls the aggregator's test every round; the server decides which rounds it tests
    # (frequency_of_the_test stays in our config), so resumed runs test the same rounds.
    args.frequency_of_the_test = 1
    if getattr(args, "data_cache_dir", None):
        args.data_cache_dir = os.path.expanduser(args.data_cache_dir)
    return args


def _quiet_fedml_logs(rank: int) -> None:
    """FedML logs every message at INFO; keep warnings, and our own lines on rank 0."""
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[fedml_progfed] %(message)s"))
        log.addHandler(handler)
        log.propagate = False


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def check_cross_silo(config) -> None:
    """Rules that only cross-silo runs have, checked before any process starts training."""
    from fedml_progfed.comm.codecs import parse_spec
    from fedml_progfed.errors import FieldError

    partial = config.client_num_per_round < config.client_num_in_total
    if partial and config.profl.memory_budgets:
        raise FieldError(
            "client_num_per_round",
            f"{config.client_num_per_round} of {config.client_num_in_total}: with profl_memory_budgets the server "
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


def run_cross_silo(sections: dict, config, ns: argparse.Namespace, out: Path, started_at: float) -> int:
    import torch
    from fedml import FedMLRunner

    from fedml_progfed.fedml_plugin.offline import init_fedml_offline
    from fedml_progfed.runners.experiment import write_results
    from fedml_progfed.runners.checkpoint import latest_checkpoint, read_checkpoint
    from fedml_progfed.runners.federation import build_federation
    from fedml_progfed.runners.recorder import RunRecorder
    from fedml_progfed.runners.run_dir import check_same_config, prepare_out, write_config

    check_cross_silo(config)
    args = fedml_arguments(sections, ns)
    if _truthy(ns.using_mlops):
        import fedml

        args.using_mlops = True  # deployed by FedML's agents: the platform is the user's choice
        args = fedml.init(args, check_env=False)
    else:
        args = init_fedml_offline(args)
    _quiet_fedml_logs(int(args.rank))
    # Many ranks share few cores under mpirun: one thread each avoids oversubscription.
    world = getattr(getattr(args, "comm", None), "Get_size", lambda: 1)()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))
    is_server = args.role == "server"
    resume = getattr(ns, "resume", None)
    if is_server:
        prepare_out(out, overwrite=getattr(ns, "overwrite", False), resume=resume is not None)
        if resume is not None:
            check_same_config(out, sections)
    # Every rank of a resumed job runs only the remaining rounds (FedML counts them from 0).
    checkpoint = latest_checkpoint(Path(resume)) if resume is not None else None
    rounds_done = int(read_checkpoint(checkpoint)[1]["round"]) if checkpoint is not None else 0
    fed = build_federation(config, sections, args=args)
    if is_server:
        recorder = RunRecorder(out, config)
        if checkpoint is not None:
            recorder.restore(fed.server, checkpoint)
            log.info("resuming from %s: %d of %d rounds done", checkpoint, rounds_done, fed.total_rounds)
        else:
            write_config(out, sections)
        fed.server.round_hooks.append(recorder)
    # extra warm-up rounds make the run longer than T; a resumed run is shorter
    args.comm_round = fed.total_rounds - rounds_done
    model = fed.server.model if is_server else fed.trainer.model
    FedMLRunner(args, fed.device, fed.data.as_list(), model, fed.trainer, fed.aggregator).run()
    if is_server:
        # start-up: from this process's start to the first broadcast (every rank imported, loaded data, connected)
        first = fed.server.first_broadcast_at
        startup_s = first - started_at if first else None
        summary = write_results(
            out, sections, fed, config.progfed.strategy, runtime="cross_silo",
            extra={"startup_s": startup_s, "world_size": world},
        )
        log.info(
            "done: final %s %.4f, two-way %.2f MB, start-up of %d processes %.1f s -> %s",
            summary["metric_name"], summary["final_metric"] or float("nan"), summary["total_bytes"] / 1e6,
            world, startup_s or float("nan"), out,
        )
    return 0
