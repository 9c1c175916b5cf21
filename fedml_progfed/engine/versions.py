"""Which copy of each tensor each client holds, so a broadcast sends only what changed since.

A tensor's **version** moves on whenever its value on the server changes (a merge, a
growth, a step change): the server keeps a 16-byte digest per tensor and compares it
when a round starts. A client's **held** table says which version of each tensor it
last received; it is recorded when the client answers the round (an answer proves the
message arrived). Tensors a client holds at the current version are left out of its
message (ProFL's frozen prefix and teacher, ProgFed's frozen blocks in warm-up); the
server keeps only this table, never copies of what it sent.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

import torch

from fedml_progfed.comm.messages import raw_bytes


def digest(tensor: torch.Tensor) -> str:
    """A 16-byte digest of a tensor's bytes (any dtype), as hex."""
    return hashlib.blake2b(raw_bytes(tensor), digest_size=16).hexdigest()


class VersionTable:
    """Versions of the server's tensors and the versions each client holds (see the module docstring)."""

    def __init__(self) -> None:
        self.versions: dict[str, int] = {}
        self.digests: dict[str, str] = {}
        self.held: dict[int, dict[str, int]] = {}

    def refresh(self, state: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, int]:
        """Move on the version of every tensor in ``names`` whose value changed; their versions now."""
        current = {}
        for name in names:
            value = digest(state[name])
            if self.digests.get(name) != value:
                self.digests[name] = value
                self.versions[name] = self.versions.get(name, -1) + 1
            current[name] = self.versions[name]
        return current

    def unchanged(self, client: int, versions: Mapping[str, int]) -> tuple[str, ...]:
        """Names ``client`` already holds at the given versions (what its message can leave out)."""
        held = self.held.get(client, {})
        return tuple(name for name, version in versions.items() if held.get(name) == version)

    def received(self, client: int, versions: Mapping[str, int]) -> None:
        """``client`` answered a round whose message carried (or let it keep) these versions."""
        self.held.setdefault(client, {}).update(versions)

    def state_dict(self) -> dict[str, Any]:
        """JSON: versions, digests and every client's held versions (a standalone checkpoint keeps them)."""
        return {"versions": self.versions, "digests": self.digests,
                "held": {str(c): dict(h) for c, h in self.held.items()}}

    def load_state_dict(self, state: Mapping[str, Any], clients_kept_their_copies: bool) -> None:
        """Restore; if the clients restarted too (cross-silo), they hold nothing and are sent everything once."""
        self.versions = {k: int(v) for k, v in state["versions"].items()}
        self.digests = dict(state["digests"])
        self.held = {int(c): {k: int(v) for k, v in h.items()} for c, h in state["held"].items()} \
            if clients_kept_their_copies else {}
