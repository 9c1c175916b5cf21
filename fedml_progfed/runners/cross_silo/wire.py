"""What the wire cost beyond the payload: the results' ``wire`` entry of a gRPC run."""

from __future__ import annotations

from typing import Any


def wire_summary(rows: list[dict]) -> dict[str, Any] | None:
    """Wire bytes against payload bytes over the rounds that measured them; ``None`` when none did.

    Parameters
    ----------
    rows
        The ledger's metrics rows; only gRPC runs fill ``wire_bytes_down``/``wire_bytes_up``.
    """
    measured = [r for r in rows if r.get("wire_bytes_down") not in (None, "")]
    if not measured:
        return None
    totals = {
        key: int(sum(r[key] for r in measured))
        for key in ("wire_bytes_down", "wire_bytes_up", "bytes_down", "bytes_up")
    }
    ratio = lambda wire, payload: wire / payload if payload else None  # noqa: E731
    return {
        **totals,
        "overhead_ratio_down": ratio(totals["wire_bytes_down"], totals["bytes_down"]),
        "overhead_ratio_up": ratio(totals["wire_bytes_up"], totals["bytes_up"]),
        "overhead_ratio": ratio(totals["wire_bytes_down"] + totals["wire_bytes_up"], totals["bytes_down"] + totals["bytes_up"]),
        "counted": "gRPC messages (protobuf request holding the JSON header and raw tensors + 5-byte gRPC prefix), "
                   "control messages and dropped messages included; HTTP/2 frame headers, TLS records and TCP/IP "
                   "not counted",
        "rejected_messages": int(sum(int(r.get("rejected_messages") or 0) for r in measured)),
    }
