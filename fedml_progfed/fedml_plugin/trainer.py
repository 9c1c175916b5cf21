"""``ProgFedClientTrainer``: FedML's ClientTrainer for progressive training.

A thin adapter: each message from the server carries the stage of its
tensors and the round; the client loads them, grows its local model to the
round's stage (deterministically, see :func:`~fedml_progfed.core.staged_model.grow`),
trains the round's trainable set with local SGD (FedProx term when selected)
and uploads the round's keys plus its training loss and measured FLOPs
(ProgFed Alg. 1 lines 13-24).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from fedml.core import ClientTrainer

from fedml_progfed.config import RunConfig
from fedml_progfed.core.schedule import schedule_for
from fedml_progfed.core import wire
from fedml_progfed.core.compression import Codec, ErrorFeedback
from fedml_progfed.core.flops import train_flops
from fedml_progfed.core.seeding import derive_seed
from fedml_progfed.core.staged_model import (
    StagedModel,
    active_names,
    active_state,
    grow,
    load_active_state,
    set_trainable,
    upload_names,
)
from fedml_progfed.tasks import ClassificationTask, Task
from fedml_progfed.errors import InvalidUpdateError


class ProgFedClientTrainer(ClientTrainer):
    """Local training of the active sub-model.

    Parameters
    ----------
    model
        A staged model built (and seeded) like the server's.
    args
        FedML's flattened arguments (kept for FedML's base class).
    config
        The validated run configuration.
    task
        Loss and metric; classification by default.
    """

    def __init__(self, model: StagedModel, args: Any, config: RunConfig, task: Task = ClassificationTask()) -> None:
        super().__init__(model, args)
        self.config = config
        self.schedule = schedule_for(config, model.num_stages)
        self.task = task
        self.round_idx: int | None = None
        self.client: int | None = None
        self.train_loss = math.nan
        self.flops = 0
        self.compute_s = 0.0
        self._flops_per_sample: dict[tuple[int, bool], float] = {}
        self.codec_up = Codec(config.progfed.compression_up, "progfed_args.progfed_compression_up")
        self.codec_down = Codec(config.progfed.compression_down, "progfed_args.progfed_compression_down")
        # Error-feedback residuals live with the client they belong to (one trainer may simulate many).
        self._memories: dict[int, ErrorFeedback] = {}
        self._start: dict[str, torch.Tensor] = {}
        # float uploads carry the trained tensors themselves; other codecs carry their change
        self._sends_values = self.codec_up.spec.lossless and not self.codec_up.error_feedback

    # ------------------------------------------------------------------ messages

    @property
    def warmup(self) -> bool:
        return self.round_idx is not None and self.round_idx < self.schedule.total_rounds and self.schedule.is_warmup(self.round_idx)

    def set_model_params(self, model_parameters) -> None:
        """Load the server's broadcast and grow to the round's stage."""
        tensors, meta = wire.unpack(model_parameters, what="server broadcast")
        stage, round_idx = int(meta["stage"]), int(meta["round"])
        if wire.PAYLOAD in tensors:
            tensors = wire.decode_tensors(
                self.codec_down, tensors, self.model.state_dict(), active_names(self.model, stage),
                derive_seed("down", self.config.random_seed, round_idx), what="server broadcast",
            )
        # After the last round FedML sends the final model once more: load it, do not grow.
        target = self.schedule.stage(round_idx) if round_idx < self.schedule.total_rounds else stage
        if target < stage:
            raise InvalidUpdateError(
                f"server broadcast for round {round_idx} holds stage {stage} but the schedule trains stage {target}; "
                f"server and client must use the same progfed_args"
            )
        self.model.stage = self.model.check_stage(stage)
        # Keys and shapes are checked; the values come from the server, which checked every update.
        load_active_state(self.model, stage, tensors, check_values=False)
        grow(self.model, target, self.config.random_seed)
        self.round_idx = round_idx
        self.train_loss, self.flops, self.compute_s = math.nan, 0, 0.0
        # Compressed uploads are deltas from the model as received (after growth).
        if not self._sends_values:
            self._start = active_state(self.model, target, upload_names(self.model, target, self.warmup))

    def get_model_params(self):
        """The upload: the round's keys (only the entering modules during warm-up) plus loss, FLOPs, time.

        With ``progfed_compression_up: float`` the trained tensors travel as they are;
        otherwise their change since the broadcast is encoded (ProgFed Sec. 4.4).
        """
        stage = self.model.stage
        names = upload_names(self.model, stage, self.warmup)
        current = active_state(self.model, stage, names)
        round_idx = -1 if self.round_idx is None else self.round_idx
        client = -1 if self.client is None else self.client
        meta = dict(stage=stage, round=round_idx, train_loss=self.train_loss, flops=self.flops, compute_s=self.compute_s)
        if self._sends_values:
            return wire.pack(current, **meta)
        delta = {n: current[n] - self._start[n] if current[n].is_floating_point() else current[n] for n in names}
        memory = self._memories.setdefault(client, self.codec_up.new_memory()) if self.codec_up.error_feedback else None
        seed = derive_seed("up", self.config.random_seed, round_idx, client)
        return wire.pack(wire.encode_tensors(self.codec_up, delta, names, seed, memory), client=client, **meta)

    # ------------------------------------------------------------------ training

    def train(self, train_data, device, args) -> None:
        """Local SGD on the round's trainable set, a fresh optimizer every round."""
        if self.round_idx is None:
            raise InvalidUpdateError("train() called before set_model_params(): the client has no global model")
        started = time.perf_counter()
        model, stage, warmup = self.model, self.model.stage, self.warmup
        client = getattr(train_data, "client_index", None)
        client = self.id if client is None else client
        self.client = int(client)
        # Seeding by (run, round, client) makes shuffling and dropout identical in every runtime.
        torch.manual_seed(derive_seed("train", self.config.random_seed, self.round_idx, client))
        model.to(device)
        names = set(set_trainable(model, stage, warmup))
        params = [p for n, p in model.named_parameters() if n in names]
        optimizer = torch.optim.SGD(
            params,
            lr=self.schedule.lr(self.round_idx),
            momentum=self.config.momentum,
            weight_decay=self.config.weight_decay,
        )
        mu = self.config.progfed.fedprox_mu if self.config.progfed.optimizer == "fedprox" else 0.0
        anchors = [p.detach().clone() for p in params] if mu > 0 else []

        loss_sum, samples = 0.0, 0
        for _ in range(self.config.epochs):
            for x, y in train_data:
                x, y = x.to(device), y.to(device)
                loss = self.task.loss(model(x), y)
                objective = loss + 0.5 * mu * sum((p - a).pow(2).sum() for p, a in zip(params, anchors)) if mu > 0 else loss
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(y)
                samples += len(y)
        for p in model.parameters():
            p.requires_grad_(True)
        self.train_loss = loss_sum / samples if samples else math.nan
        self.flops = round(self._train_flops_per_sample(train_data, stage, warmup) * samples)
        self.compute_s = time.perf_counter() - started

    def _train_flops_per_sample(self, train_data, stage: int, warmup: bool) -> float:
        """Measured once per (stage, warm-up) on a one-sample batch, then scaled by samples seen."""
        key = (stage, warmup)
        if key not in self._flops_per_sample:
            x, y = next(iter(train_data))
            self._flops_per_sample[key] = float(train_flops(self.model, stage, warmup, x[:1], y[:1], self.task.loss))
        return self._flops_per_sample[key]

    def test(self, test_data, device, args) -> dict[str, float]:
        """Local evaluation (FedML calls it only when ``test_on_clients`` asks for it)."""
        self.model.to(device)
        return dict(self.task.evaluate(self.model, test_data, device))
