"""Every incoming update is checked against its client's assignment before anything is merged.

The trust model (DESIGN.md): FedML's transports unpickle messages before these
checks run, so they protect the global model from buggy, diverging or corrupted
clients, not from a peer that can execute code. A check that fails raises one
:class:`~fedml_progfed.errors.InvalidUpdateError` naming the client and the
reason; the server drops that update (or ends the run, by policy).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from fedml_progfed.algorithms.base import Assignment, ClientUpdate
from fedml_progfed.comm.messages import HEADER_KEY, Header, Message, decode
from fedml_progfed.core.staged_model import StagedModel, parameter_names, state_shapes
from fedml_progfed.core.width import leading_slice
from fedml_progfed.engine.round import Round
from fedml_progfed.engine.settings import WireSettings
from fedml_progfed.core.private_sgd import PrivateSteps
from fedml_progfed.errors import InvalidUpdateError

#: No training step moves a weight by more; a larger change is a forged or broken update, and
#: merging it would leave a finite but poisoned model that makes every honest client diverge.
ABSURD_CHANGE = 1e6


@dataclass(frozen=True)
class UpdatePolicy:
    """What the server does with updates (``progfed.invalid_update``, ``min_clients`` and the defences)."""

    invalid: str = "drop"
    min_clients: int = 1
    max_update_norm: float | None = None
    norm_policy: str = "reject"
    max_samples: float | None = None
    uniform: bool = False

    @classmethod
    def from_config(cls, config) -> "UpdatePolicy":
        p = config.progfed
        return cls(p.invalid_update, p.min_clients, p.max_update_norm, p.norm_policy, p.max_samples,
                   p.resolved_aggregation_weights == "uniform")


def claimed_client(wire: Any) -> int | None:
    """The client id a message claims, if its header can be read at all (for naming a dropped update)."""
    try:
        return Header.from_tensor(wire[HEADER_KEY], "update").client
    except Exception:  # noqa: BLE001 - an unreadable header just names no client
        return None


class UpdateChecker:
    """Checks headers and updates against a round's assignments (see the module docstring).

    Parameters
    ----------
    algorithm
        The name of the algorithm the server runs (a message of another is refused).
    wire
        Codecs and seed the updates were encoded with.
    num_clients
        Valid client ids are ``0..num_clients-1``.
    policy
        What to do with invalid updates, and the optional defences.
    """

    def __init__(self, algorithm: str, wire: WireSettings, num_clients: int, policy: UpdatePolicy) -> None:
        self.algorithm = algorithm
        self.wire = wire
        self.num_clients = num_clients
        self.policy = policy

    def header(self, message: Message, round_: Round, position: int, count: int) -> int:
        """The sender's client id, after checking type, algorithm, participation, round and plan.

        A ``skip`` or ``silent`` answer passes the same round and plan check as an update (one for
        another round is invalid); a silent answer must carry nothing but its header.
        """
        header, plan = message.header, round_.plan
        client = header.client
        if client is None or not 0 <= client < self.num_clients:
            raise InvalidUpdateError(
                f"update {position + 1} of {count} in round {plan.round}: client id {client!r} is not in "
                f"0..{self.num_clients - 1}"
            )
        what = f"client {client}'s update in round {plan.round}"
        if header.type == "broadcast":
            raise InvalidUpdateError(f"{what}: a client sent a broadcast message")
        if header.type == "silent" and (message.tensors or message.payload is not None or header.metrics):
            raise InvalidUpdateError(
                f"{what}: a silent answer carries {len(message.tensors)} tensors"
                f"{', a payload' if message.payload is not None else ''}{' and metrics' if header.metrics else ''}; "
                f"a client that did not train sends its header alone (comm.messages.silent_answer)"
            )
        if header.algorithm != self.algorithm:
            raise InvalidUpdateError(f"{what}: algorithm {header.algorithm!r}, the server runs {self.algorithm!r}")
        assignment = round_.assignment(client)
        if header.type == "update" and (assignment is None or (plan.participants is not None
                                                               and client not in plan.participants)):
            raise InvalidUpdateError(
                f"{what}: the client was not chosen to train this round (its memory budget does not fit the round's "
                f"sub-model)"
            )
        expected = (assignment or round_.default).plan
        if header.round != expected.round or dict(header.plan) != expected.tag():
            raise InvalidUpdateError(
                f"{what}: it claims round {header.round} with plan {dict(header.plan)} but the server's plan is "
                f"round {expected.round} {expected.tag()}; the client must train the model it was sent"
            )
        return client

    def update(
        self, model: StagedModel, message: Message, client: int, samples: Any, assignment: Assignment, size: int
    ) -> ClientUpdate:
        """Decode one update into changes by name: sample count, keys, shapes, dtypes, finite values, norm.

        ``samples`` is the runtime's count of the client's data (FedML's upload tuple): the
        aggregation weight. The header's own count (samples processed, epochs included) is
        reported per client in the ledger.
        """
        plan = assignment.plan
        what = f"client {client}'s update in round {plan.round}"
        samples = self._samples(samples, what)
        if not message.header.metrics:
            raise InvalidUpdateError(f"{what}: it carries no measurements (samples, loss, FLOPs, seconds); "
                                     f"the sender must be a fedml_progfed client of the same version")
        names, narrow = assignment.layout.upload, assignment.layout.narrow
        current = model.state_dict()
        for name, tensor in message.tensors.items():
            if name in current and tensor.dtype != current[name].dtype:
                raise InvalidUpdateError(f"{what}: {name} has dtype {tensor.dtype}, the model has {current[name].dtype}")
        # A narrow assignment's tensors are leading slices of the global ones (HeteroFL widths).
        shapes = {**state_shapes(model), **narrow} if narrow else state_shapes(model)
        tensors, delta_names = decode(
            message, names, parameter_names(model), shapes, self.wire.codec_up,
            self.wire.up_seed(plan.round, client), what,
        )
        deltas = {}
        for name in names:
            value, expected = tensors[name], tuple(shapes[name])
            if tuple(value.shape) != expected:
                holder = "its narrow assignment has" if name in narrow else "the model has"
                raise InvalidUpdateError(f"{what}: {name} has shape {tuple(value.shape)}, {holder} {expected}")
            base = leading_slice(current[name], expected) if name in narrow else current[name]
            # checked after the cast as well: float64 1e300 is finite, its float32 is not
            value = value.to(device=base.device, dtype=base.dtype)
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise InvalidUpdateError(
                    f"{what}: {name} contains NaN or Inf; lower the learning rate or check the client's data"
                )
            delta = value.float() if name in delta_names else value.float() - base.float()
            largest = float(delta.abs().max()) if delta.numel() else 0.0
            if largest > ABSURD_CHANGE:
                raise InvalidUpdateError(
                    f"{what}: {name} changes by {largest:.3g}, beyond the {ABSURD_CHANGE:g} no training step produces; "
                    f"the update is broken or forged"
                )
            deltas[name] = delta
        deltas = self._bounded(deltas, what)
        metrics = message.header.metrics
        return ClientUpdate(
            client=client,
            weight=1.0 if self.policy.uniform else samples,
            deltas=deltas,
            samples=samples,
            train_loss=float(metrics.get("train_loss", math.nan)),
            flops=int(metrics.get("flops", 0)),
            compute_s=float(metrics.get("compute_s", math.nan)),
            nbytes=size,
            train_samples=float(metrics.get("samples", math.nan)),
        )

    def private_steps(self, message: Message, client: int, round_idx: int) -> PrivateSteps:
        """The DP-SGD steps an update reports (records, steps, sample rate), required under record-level DP."""
        what = f"client {client}'s update in round {round_idx}"
        metrics = message.header.metrics
        if "dp_steps" not in metrics:
            raise InvalidUpdateError(f"{what}: it reports no DP-SGD steps; every client of a run with record-level DP "
                                     f"must train with DP-SGD (the same dp_solution_type)")
        records, steps, rate = metrics["dp_records"], metrics["dp_steps"], metrics["dp_sample_rate"]
        if records < 1 or steps < 0 or records != int(records) or steps != int(steps) or not 0 < rate <= 1:
            raise InvalidUpdateError(f"{what}: its DP-SGD report (records {records}, steps {steps}, rate {rate}) is not "
                                     f"whole records >= 1, whole steps >= 0 and a rate in (0, 1]")
        return PrivateSteps(int(records), int(steps), float(rate))

    def _samples(self, samples: Any, what: str) -> float:
        """A finite positive sample count, capped by ``progfed.max_samples``."""
        if isinstance(samples, bool) or not isinstance(samples, numbers.Real) or not math.isfinite(samples) or samples <= 0:
            raise InvalidUpdateError(f"{what}: reports {samples!r} training samples; it must be a finite positive number")
        cap = self.policy.max_samples
        return float(min(samples, cap)) if cap is not None else float(samples)

    def _bounded(self, deltas: Mapping[str, torch.Tensor], what: str) -> Mapping[str, torch.Tensor]:
        """Reject or clip an update whose L2 norm exceeds ``progfed.max_update_norm``."""
        bound = self.policy.max_update_norm
        if bound is None:
            return deltas
        norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in deltas.values()))
        if not math.isfinite(norm) or norm <= bound:
            if math.isfinite(norm):
                return deltas
            raise InvalidUpdateError(f"{what}: its norm is not finite")
        if self.policy.norm_policy == "reject":
            raise InvalidUpdateError(f"{what}: its L2 norm {norm:.4g} exceeds progfed_max_update_norm ({bound:g})")
        return {name: delta * (bound / norm) for name, delta in deltas.items()}
