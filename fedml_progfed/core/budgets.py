"""Per-client memory budgets and memory-aware client sampling (ProFL, KDD 2025, Sec. 2.6 of our spec).

Each client ``c`` has a budget ``m_c`` drawn once (seeded) or read from a CSV;
a round's sub-model needs ``Mem(step)`` bytes to train; the eligible clients are
``{c : m_c >= Mem(step)}`` and a round samples among them only. The authors'
release draws budgets uniformly from [100, 900] against a full-model need of 840,
i.e. ``relative-uniform:0.12:1.07`` as fractions of the full model's peak.

Budget specs:

``relative-uniform:LOW:HIGH``  uniform fractions of the full model's measured peak
``uniform-mb:LOW:HIGH``        uniform megabytes (1 MB = 10^6 bytes, as every byte figure here)
``<path>.csv``                 a ``client,mb`` table covering every client id
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.errors import FieldError

MB = 1_000_000
FIELD = "memory.budgets"
_RANGE = re.compile(r"(relative-uniform|uniform-mb):([0-9.eE+-]+):([0-9.eE+-]+)")


@dataclass(frozen=True)
class BudgetSpec:
    """A parsed ``memory.budgets`` value."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    path: str = ""

    @property
    def relative(self) -> bool:
        return self.kind == "relative-uniform"


def parse_budgets(text: str) -> BudgetSpec:
    """Parse a budget spec; a bad one is a :class:`FieldError` naming the forms."""
    forms = "relative-uniform:LOW:HIGH (fractions of the full model's peak), uniform-mb:LOW:HIGH, or a .csv path"
    match = _RANGE.fullmatch(text.strip())
    if match:
        try:
            low, high = float(match[2]), float(match[3])
        except ValueError:
            raise FieldError(FIELD, f"{text!r}: LOW and HIGH must be numbers; use {forms}") from None
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise FieldError(FIELD, f"{text!r}: need 0 < LOW <= HIGH; use {forms}")
        return BudgetSpec(match[1], low, high)
    if text.strip().endswith(".csv"):
        return BudgetSpec("csv", path=text.strip())
    raise FieldError(FIELD, f"{text!r} is not a budget spec; use {forms}")


def client_budgets(spec: BudgetSpec, num_clients: int, seed: int, full_model_bytes: int) -> list[int]:
    """Every client's budget in bytes, drawn once from ``seed`` (or read from the CSV)."""
    if spec.kind == "csv":
        return _read_csv(Path(spec.path), num_clients)
    draws = np.random.default_rng(derive_seed("memory-budgets", seed)).uniform(spec.low, spec.high, num_clients)
    unit = full_model_bytes if spec.relative else MB
    return [int(round(d * unit)) for d in draws]


def _read_csv(path: Path, num_clients: int) -> list[int]:
    if not path.is_file():
        raise FieldError(FIELD, f"budget table {str(path)!r} does not exist; write a CSV with columns client,mb")
    budgets: dict[int, int] = {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for line, row in enumerate(rows, start=2):
        try:
            client, mb = int(row["client"]), float(row["mb"])
        except (KeyError, TypeError, ValueError):
            raise FieldError(FIELD, f"{path}:{line}: expected columns client,mb with an integer and a number") from None
        if not (0 <= client < num_clients) or not math.isfinite(mb) or mb <= 0:
            raise FieldError(FIELD, f"{path}:{line}: client {client} must be in 0..{num_clients - 1} with a positive budget")
        budgets[client] = int(round(mb * MB))
    missing = [c for c in range(num_clients) if c not in budgets]
    if missing:
        raise FieldError(FIELD, f"{path} has no budget for clients {missing[:5]}; give one row per client 0..{num_clients - 1}")
    return [budgets[c] for c in range(num_clients)]


def eligible_clients(budgets: Sequence[int], need_bytes: int) -> list[int]:
    """Clients whose budget fits a step that needs ``need_bytes``."""
    return [c for c, budget in enumerate(budgets) if budget >= need_bytes]


def sample_participants(eligible: Sequence[int], per_round: int, seed: int, round_idx: int) -> tuple[int, ...]:
    """``per_round`` of the eligible clients without replacement (seeded by run and round), or all if fewer."""
    if len(eligible) <= per_round:
        return tuple(eligible)
    rng = np.random.default_rng(derive_seed("participants", seed, round_idx))
    return tuple(sorted(int(c) for c in rng.choice(np.asarray(eligible), per_round, replace=False)))
