"""FedML-style entry: ``python -m fedml_progfed.main --cf fedml_config.yaml [--set k=v ...] [--out DIR]``.

Builds data, model, our trainer and aggregator from the config and hands them
to ``FedMLRunner``. ``training_type: cross_silo`` (``backend: MPI`` under
``mpirun``, or the Octopus/edge agents, which pass ``--rank`` and ``--role``)
runs through FedML's cross-silo runtime, which calls every hook of the pair;
``training_type: simulation`` runs our standalone loop on the same config.
Rank 0 writes the same results folder as a standalone run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from fedml_progfed.errors import ProgFedError

log = logging.getLogger("fedml_progfed")

# Command-line keys FedML's own parser knows (fedml/arguments.py: add_args).
FEDML_CLI_DEFAULTS = {"run_id": "0", "rank": 0, "local_rank": 0, "node_rank": 0, "role": "client", "run_device_id": "0"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedml_progfed.main", description=__doc__.splitlines()[0])
    parser.add_argument("--cf", "--yaml_config_file", dest="cf", required=True, help="FedML YAML config")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", help="results folder written by rank 0 (default runs/<config>-<training_type>)")
    parser.add_argument("--run_id", default="0")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--local_rank", type=int, default=0)
    parser.add_argument("--node_rank", type=int, default=0)
    parser.add_argument("--role", default="client", choices=("client", "server"))
    parser.add_argument("--run_device_id", default="0")
    parser.add_argument(
        "--using_mlops", default=os.environ.get("FEDML_USING_MLOPS", "false"),
        help="true only under FedML's Octopus agents (then FedML reports to its platform); local runs never contact it",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="parse the config and build data, model and the pair, print a summary, do not train",
    )
    return parser


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


def dry_run(sections: dict, config, ns: argparse.Namespace) -> int:
    """Everything up to training: proves a package parses its config and finds its data and model."""
    from fedml_progfed.core.staged_model import count_parameters
    from fedml_progfed.runners.federation import build_federation

    from fedml_progfed.runners.experiment import describe_plan

    if config.training_type == "cross_silo":
        check_cross_silo(config)
    fed = build_federation(config, sections)
    model = fed.server.model
    print(
        f"config OK: role {ns.role} rank {ns.rank}, {config.training_type}/{config.backend}, model {config.model} "
        f"({model.num_stages} stages, {count_parameters(model, model.num_stages):,} parameters), "
        f"data {fed.data.name} with {fed.data.num_clients} clients, {describe_plan(fed)}"
    )
    return 0


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
    from fedml_progfed.runners.federation import build_federation

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
    fed = build_federation(config, sections, args=args)
    args.comm_round = fed.total_rounds  # extra warm-up rounds make the run longer than T
    model = fed.server.model if args.role == "server" else fed.trainer.model
    FedMLRunner(args, fed.device, fed.data.as_list(), model, fed.trainer, fed.aggregator).run()
    if args.role == "server":
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


def main(argv: Sequence[str] | None = None) -> int:
    started_at = time.time()
    ns, _unknown = build_parser().parse_known_args(argv)
    try:
        from fedml_progfed.config import load_config

        sections, config = load_config(ns.cf, ns.overrides)
        out = Path(ns.out) if ns.out else Path("runs") / f"{Path(ns.cf).stem}-{config.training_type}"
        if ns.dry_run:
            return dry_run(sections, config, ns)
        if config.training_type == "cross_silo":
            return run_cross_silo(sections, config, ns, out, started_at)
        if config.training_type == "simulation":
            from fedml_progfed.cli import _setup_logging
            from fedml_progfed.runners.experiment import run_experiment

            _setup_logging(quiet=False)
            run_experiment(ns.cf, ns.overrides, out)
            return 0
        raise ProgFedError(
            f"common_args.training_type: {config.training_type!r} is not supported; use simulation or cross_silo"
        )
    except ProgFedError as exc:
        from fedml_progfed.config import explain

        print(f"error: {explain(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
