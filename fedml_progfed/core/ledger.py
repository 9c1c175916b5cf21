"""The ledger: one row per round of what was sent, computed and measured.

The server appends a round's whole row once, when the round is finished (bytes
both ways, client FLOPs, training loss, the test, per-client entries). Totals
are derived from the rows, never kept twice, and the ledger is part of the
server state: :meth:`Ledger.state_dict` is JSON, so a resumed run keeps every
row and total. :data:`METRIC_COLUMNS` is the one statement of ``metrics.csv``'s
fixed columns.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class RoundRecord:
    """One row of ``metrics.csv`` (the first twelve fields are its fixed columns, in order)."""

    round: int
    stage: int
    active_params: int
    bytes_down: int
    bytes_up: int
    cum_bytes: int
    client_flops: int
    cum_flops: int
    train_loss: float
    test_loss: float
    test_metric: float
    wall_s: float
    warmup: int
    lr: float
    num_clients: int
    server_s: float = 0.0
    seeded_params: int = 0
    #: Algorithm columns (e.g. ProFL's phase, step, block) and test extras (e.g. Dice per region).
    columns: dict = field(default_factory=dict)
    #: One entry per client that reported: bytes each way, FLOPs, seconds.
    clients: list = field(default_factory=list)


#: The fixed columns of ``metrics.csv``, in file order: the first twelve fields of a record.
#: Users' scripts index them by name: do not rename or reorder.
METRIC_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(RoundRecord))[:12]
#: Optional columns written after the fixed ones: ``warmup`` (0/1, new block in warm-up),
#: ``lr`` (client learning rate), ``num_clients`` (clients that trained in the round).
EXTRA_COLUMNS: tuple[str, ...] = ("warmup", "lr", "num_clients")


class Ledger:
    """Per-round records with running totals."""

    def __init__(self) -> None:
        self.records: list[RoundRecord] = []

    def append(
        self,
        *,
        round_idx: int,
        stage: int,
        active_params: int,
        bytes_down: int,
        bytes_up: int,
        client_flops: int,
        train_loss: float,
        wall_s: float,
        warmup: bool,
        lr: float,
        num_clients: int,
        test_loss: float = math.nan,
        test_metric: float = math.nan,
        clients: list | None = None,
        server_s: float = 0.0,
        seeded_params: int = 0,
        columns: dict | None = None,
    ) -> RoundRecord:
        """Append round ``round_idx``'s row (it must follow the previous one); cumulative columns are derived."""
        previous = self.records[-1] if self.records else None
        if previous is not None and round_idx != previous.round + 1:
            raise ValueError(f"ledger expected round {previous.round + 1}, got {round_idx}")
        record = RoundRecord(
            round=round_idx,
            stage=stage,
            active_params=active_params,
            bytes_down=bytes_down,
            bytes_up=bytes_up,
            cum_bytes=(previous.cum_bytes if previous else 0) + bytes_down + bytes_up,
            client_flops=client_flops,
            cum_flops=(previous.cum_flops if previous else 0) + client_flops,
            train_loss=train_loss,
            test_loss=test_loss,
            test_metric=test_metric,
            wall_s=wall_s,
            warmup=int(warmup),
            lr=lr,
            num_clients=num_clients,
            server_s=server_s,
            seeded_params=seeded_params,
            columns=dict(columns or {}),
            clients=list(clients or []),
        )
        self.records.append(record)
        return record

    @property
    def rows(self) -> list[dict]:
        """One flat dict per round, as written to ``metrics.csv``."""
        rows = []
        for record in self.records:
            row = asdict(record)
            row.update(row.pop("columns"))
            clients = row.pop("clients")
            row["client_compute_s"] = sum(c.get("compute_s", 0.0) for c in clients)
            rows.append(row)
        return rows

    def totals(self) -> dict[str, float]:
        """Run totals, derived from the rows (what summary.json carries as ``ledger``)."""
        return {
            "total_bytes_down": sum(r.bytes_down for r in self.records),
            "total_bytes_up": sum(r.bytes_up for r in self.records),
            "total_bytes": sum(r.bytes_down + r.bytes_up for r in self.records),
            "total_flops": sum(r.client_flops for r in self.records),
            "total_eval_flops": sum(int(r.columns.get("eval_flops", 0)) for r in self.records),
            "wall_s": sum(r.wall_s for r in self.records),
            "server_s": sum(r.server_s for r in self.records),
            "client_compute_s": sum(c.get("compute_s", 0.0) for r in self.records for c in r.clients),
            "client_messages": sum(len(r.clients) for r in self.records),
            "seeded_params": sum(r.seeded_params for r in self.records),
        }

    def per_client(self) -> list[dict]:
        """One entry per round and client: bytes each way, training FLOPs, compute seconds."""
        return [{"round": r.round, **c} for r in self.records for c in r.clients]

    def state_dict(self) -> list[dict[str, Any]]:
        """Every record as a JSON-able dict (what a checkpoint stores)."""
        return [asdict(record) for record in self.records]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Restore what :meth:`state_dict` returned."""
        names = {f.name for f in fields(RoundRecord)}
        self.records = [RoundRecord(**{k: v for k, v in record.items() if k in names}) for record in state]
