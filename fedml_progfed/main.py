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

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedml_progfed.main", description=__doc__.splitlines()[0])
    parser.add_argument("--cf", "--yaml_config_file", dest="cf", required=True, help="FedML YAML config")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", help="results folder written by rank 0 (default runs/<config>-<training_type>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last complete checkpoint")
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


def main(argv: Sequence[str] | None = None) -> int:
    started_at = time.time()
    ns, _unknown = build_parser().parse_known_args(argv)
    try:
        from fedml_progfed.config import load_config

        sections, config = load_config(ns.cf, ns.overrides)
        out = Path(ns.resume or ns.out or Path("runs") / f"{Path(ns.cf).stem}-{config.training_type}")
        if ns.dry_run:
            from fedml_progfed.runners.dry_run import Party, dry_run

            print(dry_run(ns.cf, sections, config, Party(ns.role, ns.rank)))
            return 0
        if config.training_type == "cross_silo":
            from fedml_progfed.runners.cross_silo.run import run_cross_silo

            return run_cross_silo(sections, config, ns, out, started_at)
        if config.training_type == "simulation":
            from fedml_progfed.cli import _setup_logging
            from fedml_progfed.runners.experiment import run_experiment

            _setup_logging(quiet=False)
            run_experiment(ns.cf, ns.overrides, out, overwrite=ns.overwrite, resume=ns.resume is not None)
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
