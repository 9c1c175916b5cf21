"""Compressed change broadcasts: what each client holds, value for value, and its next message.

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

from typing import Any, Mapping, Sequence

import torch

from fedml_progfed.comm.messages import Header, Message, decode, encode_entries, values_crc
from fedml_progfed.core.staged_model import StagedModel, parameter_names, state_shapes
from fedml_progfed.engine.round import Round
from fedml_progfed.engine.sampling import sample_clients
from fedml_progfed.engine.settings import WireSettings


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


class ChangeBroadcaster:
    """The server's half of compressed change broadcasts: per round, each called client's message.

    Parameters
    ----------
    wire
        Its ``codec_changes`` codes the changes, ``codec_down`` the full broadcast.
    algorithm
        The algorithm's name (every message carries it).
    num_clients, per_round
        ``client_num_in_total`` and ``client_num_per_round``: which clients a round calls.
    """

    def __init__(self, wire: WireSettings, algorithm: str, num_clients: int, per_round: int) -> None:
        self.wire, self.algorithm, self.num_clients, self.per_round = wire, algorithm, num_clients, per_round
        self.references = ClientReferences(wire.history)

    def send(self, round_: Round, model: StagedModel) -> None:
        """Give every called client that holds a recent reconstruction the compressed change since it.

        A client the server holds nothing recent of gets the round's full message; either way
        the server records what the client will reconstruct, confirmed when it answers.
        """
        references, plan = self.references, round_.plan
        references.start_round(plan.round)
        state = {n: t.detach().cpu() for n, t in model.state_dict().items()}
        fresh = self._reconstructed(round_.default_message, round_.layout.sent, model)
        # the silos FedML's sample calls (every runtime draws them with this rule): no message for the others
        called = round_.participants if round_.participants is not None else \
            sample_clients(plan.round, self.num_clients, self.per_round)
        for client in called:
            if round_.assignment(client) is None:
                continue
            base = references.held(client, plan.round)
            if base is None:
                references.sent(client, plan.round, dict(fresh))
                continue
            round_.messages[client], reconstructed = self._encode_change(round_, client, base, state, model)
            references.sent(client, plan.round, reconstructed)
        round_.per_client = round_.per_client or bool(round_.messages)
        round_.columns = {**round_.columns, "references_mb": references.nbytes / 1e6}

    def _reconstructed(self, message: Any, names: Sequence[str], model: StagedModel) -> dict[str, torch.Tensor]:
        """The values a client that holds nothing loads from the round's full ``message`` (decoded as it does)."""
        unpacked = Message.unpack(message, what="the server's own broadcast")
        values, _ = decode(unpacked, list(names), parameter_names(model), state_shapes(model), self.wire.codec_down,
                           self.wire.down_seed(unpacked.header.round), what="the server's own broadcast")
        return {n: v.detach().cpu().clone() for n, v in values.items()}

    def _encode_change(self, round_: Round, client: int, base: Mapping[str, torch.Tensor],
                       state: Mapping[str, torch.Tensor], model: StagedModel) -> tuple[Any, dict[str, torch.Tensor]]:
        """``client``'s message: held tensors left out, held parameters as their compressed change, the rest
        (entering modules, changed buffers) exact; and what the client reconstructs from it."""
        plan, layout = round_.plan, round_.layout
        params = parameter_names(model)
        cached, changes, plain = [], [], []
        for name in layout.sent:
            held, current = base.get(name), state[name]
            if held is not None and held.shape == current.shape and torch.equal(held, current):
                cached.append(name)
            elif held is not None and held.shape == current.shape and name in params and current.is_floating_point():
                changes.append(name)
            else:
                plain.append(name)
        codec, seed = self.wire.codec_changes, self.wire.change_seed(plan.round, client)
        tensors = {n: state[n].clone() for n in plain}  # not views of the live model
        # Random sparsification scales what it keeps by n/k to be unbiased, which makes it expand the
        # error (|C(x) - x|^2 = (n/k - 1)|x|^2): fed back round after round, the reconstruction diverges.
        # Shrinking its input by k/n turns it into plain random-k, a contraction ((1 - k/n)|x|^2) that
        # error feedback keeps bounded; both ends decode the same bits, so nothing changes for the client.
        shrink = codec.spec.keep_percent / 100 if codec.spec.sparsifier == "random" else 1.0
        tensors.update({n: (state[n].float() - base[n].float()) * shrink for n in changes})
        names = [n for n in layout.sent if n not in set(cached)]
        values, payload = encode_entries(tensors, names, set(changes), codec, seed)
        reconstructed = {**base, **{n: state[n].clone() for n in plain}}
        if changes:
            decoded = codec.decode(payload, {n: state[n].shape for n in changes}, changes, seed)
            reconstructed.update({n: base[n] + decoded[n] for n in changes})
        header = Header(type="broadcast", kind="encoded" if changes else "values", algorithm=self.algorithm,
                        round=plan.round, plan=plan.tag(), codec=codec.spec.text, client=client, seeded=layout.seeded,
                        cached=tuple(cached), cached_crc=values_crc(base, cached) if cached else None,
                        changes=tuple(changes), changes_crc=values_crc(base, changes) if changes else None)
        return Message(header, values, payload if changes else None).pack(), reconstructed
