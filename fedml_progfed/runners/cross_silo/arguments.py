"""FedML's ``Arguments`` object for a cross-silo party, built from our resolved config sections."""

from __future__ import annotations

import argparse
import os
from typing import Any

#: Command-line keys FedML's own parser knows (fedml/arguments.py: add_args).
FEDML_CLI_DEFAULTS = {"run_id": "0", "rank": 0, "local_rank": 0, "node_rank": 0, "role": "client", "run_device_id": "0"}


def fedml_arguments(sections: dict, ns: argparse.Namespace) -> Any:
    """FedML's ``Arguments`` object, filled as ``fedml.load_arguments`` would, from our resolved sections.

    Parameters
    ----------
    sections
        The resolved YAML sections (overrides applied).
    ns
        The entry's parsed command line (``--cf``, ``--rank``, ``--role``, ...).

    Returns
    -------
    fedml.arguments.Arguments
        Flattened sections plus FedML's command-line keys, ready for ``fedml.init``.
    """
    from fedml.arguments import Arguments

    from fedml_progfed.config import flatten

    # FedML's constructor parses its own YAML; ours is already resolved, so fill the object directly.
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
