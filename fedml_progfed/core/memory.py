"""Peak client training memory per stage: measured, next to an analytic estimate.

ProFL (KDD 2025) and ProgFed Sec. 3 motivate progressive training by the memory a
client needs. We measure one training step (forward, backward, optimizer step) of
the sub-model as it is trained in a round:

* on CUDA with ``torch.cuda.max_memory_allocated`` (the allocator's own peak);
* on CPU with the PyTorch profiler's memory tracking (``profile_memory=True``):
  every allocation and free of the step is an event with a signed size; the peak
  of their running sum is the step's peak of memory allocated *during* the step,
  to which the bytes already resident (weights, optimizer state) are added.

The analytic estimate counts weights, gradients of trainable parameters, optimizer
state (one momentum buffer per trainable parameter when momentum > 0) and
activations (every leaf module's output, kept for backward).
"""

from __future__ import annotations

import copy
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from fedml_progfed.core.staged_model import StagedModel, set_trainable


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of one training step of a stage."""

    stage: int
    measured_bytes: int
    method: str
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int

    @property
    def estimated_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    def as_dict(self) -> dict:
        return {
            "stage": self.stage,
            "measured_bytes": self.measured_bytes,
            "estimated_bytes": self.estimated_bytes,
            "method": self.method,
            "weights_bytes": self.weights_bytes,
            "grads_bytes": self.grads_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "activations_bytes": self.activations_bytes,
        }


def _active_params(model: StagedModel, stage: int, trainable: set[str]) -> tuple[int, int]:
    prefixes = model.stage_modules(stage)
    weights = grads = 0
    for name, p in model.named_parameters():
        if any(name == q or name.startswith(q + ".") for q in prefixes):
            weights += p.numel() * p.element_size()
            if name in trainable:
                grads += p.numel() * p.element_size()
    return weights, grads


def _activation_bytes(model: StagedModel, x: torch.Tensor) -> int:
    total = 0

    def hook(_module: nn.Module, _inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def _step(model, x, y, loss_fn, params, momentum) -> None:
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=momentum)
    loss_fn(model(x), y).backward()
    optimizer.step()


@contextmanager
def _quiet_native_stderr():
    """The profiler's native code prints start/stop lines on fd 2; keep them out of the user's log."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _measured_cpu(model, x, y, loss_fn, params, momentum) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, x, y, loss_fn, params, momentum)
    events = sorted(
        (e for e in prof.events() if getattr(e, "cpu_memory_usage", 0)),
        key=lambda e: e.time_range.start,
    )
    running = peak = 0
    for event in events:
        running += event.cpu_memory_usage
        peak = max(peak, running)
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    return resident + peak


def _measured_cuda(model, x, y, loss_fn, params, momentum) -> int:
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    _step(model, x, y, loss_fn, params, momentum)
    torch.cuda.synchronize(x.device)
    return int(torch.cuda.max_memory_allocated(x.device))


def measure_training_memory(
    model: StagedModel,
    stage: int,
    trainable_names: Iterable[str],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    momentum: float = 0.0,
    device: torch.device | str = "cpu",
) -> MemoryReport:
    """Measured and estimated bytes of one training step of ``M^stage`` on the batch ``(x, y)``.

    Only the active sub-model is placed on ``device`` (inactive blocks never reach a
    client's accelerator in a real deployment), so the measurement is what a client
    training this stage needs.
    """
    device = torch.device(device)
    probe = copy.deepcopy(model).to("cpu")
    probe.stage = stage
    # Drop inactive modules so they occupy no memory on the device.
    active = probe.stage_modules(stage)
    for name, module in list(probe.named_modules()):
        if name and not any(name == p or name.startswith(p + ".") or p.startswith(name + ".") for p in active):
            for param in module.parameters(recurse=False):
                param.data = torch.empty(0)
            for key, buffer in list(module.named_buffers(recurse=False)):
                module._buffers[key] = torch.empty(0)
    probe.stage = stage
    trainable = set(set_trainable(probe, trainable_names))
    weights, grads = _active_params(probe, stage, trainable)
    optimizer_bytes = grads if momentum > 0 else 0
    activations = _activation_bytes(probe, x.cpu())
    probe.to(device)
    params = [p for n, p in probe.named_parameters() if n in trainable]
    xs, ys = x.to(device), y.to(device)
    if device.type == "cuda":
        probe.zero_grad(set_to_none=True)
        measured, method = _measured_cuda(probe, xs, ys, loss_fn, params, momentum), "cuda.max_memory_allocated"
    else:
        measured, method = _measured_cpu(probe, xs, ys, loss_fn, params, momentum), "torch.profiler profile_memory"
    return MemoryReport(stage, measured, method, weights, grads, optimizer_bytes, activations)
