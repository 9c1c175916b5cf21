"""Keep FedML's own DP frames out of a run whose DP this package does.

FedML 0.9.6's ``ClientTrainer`` and ``ServerAggregator`` call
``FedMLDifferentialPrivacy.get_instance().init(args)`` in their constructors: with
``enable_dp`` it builds FedML's frame for ``dp_solution_type`` (raising on ``client``,
which it does not know) and would add its own noise around aggregation. The engine
clips, noises and accounts (:mod:`fedml_progfed.privacy`), so FedML must see DP off.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def fedml_dp_off(args: Any) -> Iterator[None]:
    """``args.enable_dp`` reads false for the length of the block (a FedML base-class constructor).

    Arguments without the key need nothing: FedML's frames start only when it is there and true.
    """
    before = getattr(args, "enable_dp", None)
    if not before:
        yield
        return
    args.enable_dp = False
    try:
        yield
    finally:
        args.enable_dp = before
