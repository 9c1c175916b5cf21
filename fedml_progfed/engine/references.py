"""What each client holds, value for value, so a broadcast can be the compressed change since then.

ProgFed Sec. 4.4 compresses both directions. A compressed broadcast of the *weights* loses
what a low-bit code cannot represent every round; a compressed broadcast of the **change
since the model the client holds** loses only a part of a small change, and that part is
not lost: the next change is computed against what the client reconstructed, so it carries
it (error feedback by construction, as in double-compression schemes, DoubleSqueeze, Tang
et al. 2019).

The server keeps, per client, the model that client reconstructed from its last message
(the server decodes its own message exactly as the client does, so both hold the same
bits), for at most ``history`` rounds after the client last confirmed a message (an answer
proves the message arrived). A client never seen, or absent longer, gets the full model.
Only the clients a round calls are encoded for, so memory is at most ``(history + 1) x clients
per round`` copies of the broadcast sub-model (a new reconstruction shares the tensors it did not
change with the previous one); ``metrics.csv``'s ``references_mb`` reports it every round and
``summary.json``'s ``references_peak_mb`` the peak.
"""

from __future__ import annotations

from typing import Mapping

import torch


class ClientReferences:
    """Per-client reconstructions (see the module docstring).

    Parameters
    ----------
    history
        Rounds a client's reconstruction is kept after the round it last confirmed.
    """

    def __init__(self, history: int) -> None:
        self.history = history
        self._held: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}
        self._pending: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}
        self.peak_bytes = 0

    def held(self, client: int, round_idx: int) -> Mapping[str, torch.Tensor] | None:
        """What ``client`` holds before ``round_idx``, or ``None`` (never seen, or absent too long)."""
        entry = self._held.get(client)
        if entry is None or round_idx - entry[0] > self.history:
            return None
        return entry[1]

    def sent(self, client: int, round_idx: int, state: dict[str, torch.Tensor]) -> None:
        """``client`` was sent a message it will reconstruct as ``state`` (confirmed when it answers)."""
        self._pending[client] = (round_idx, state)

    def confirm(self, client: int) -> None:
        """``client`` answered: it holds what it was sent this round."""
        if client in self._pending:
            self._held[client] = self._pending.pop(client)

    def start_round(self, round_idx: int) -> None:
        """Drop messages nobody confirmed and reconstructions older than the history."""
        self._pending.clear()
        for client in [c for c, (held_at, _) in self._held.items() if round_idx - held_at > self.history]:
            del self._held[client]

    @property
    def nbytes(self) -> int:
        """Bytes of the reconstructions kept now (messages waiting for an answer included)."""
        # a new reconstruction shares the tensors it did not change with the one before: count each once
        unique = {id(t): t for entries in (self._held, self._pending) for _, state in entries.values()
                  for t in state.values()}
        total = sum(t.numel() * t.element_size() for t in unique.values())
        self.peak_bytes = max(self.peak_bytes, total)
        return total
