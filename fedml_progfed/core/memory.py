"""Peak client training memory of one local step: measured, next to an analytic estimate.

ProFL (KDD 2025) lets a client train only the steps whose memory fits it, and
ProgFed Sec. 3 motivates progressive training by the memory a client needs. We
measure one training step (forward, backward, optimizer step) of a sub-model as
a round trains it:

* on CUDA with ``torch.cuda.max_memory_allocated`` (the allocator's own peak);
* on CPU with the PyTorch profiler's memory tracking (``profile_memory=True``):
  every allocation and free of the step is an event with a signed size; the peak
  of their running sum is the step's peak of memory allocated *during* the step,
  to which the bytes already resident (weights) are added.

Only the modules the round runs are placed on the device (a client training a
shallow step never holds the rest). The analytic estimate (ProFL spec Sec. 2.6)
counts ``weights + gradients and optimizer state of trainable parameters +
activations kept for backward + the largest activation of the frozen prefix +
the batch``.
"""

from __future__ import annotations

import copy
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
from torch import nn

#: ``objective(model, x, y) -> loss``: the round's forward pass and loss on a prepared copy.
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of one training step."""

    key: str
    measured_bytes: int
    method: str
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    frozen_activation_bytes: int
    io_bytes: int

    @property
    def estimated_bytes(self) -> int:
        return (
            self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes
            + self.frozen_activation_bytes + self.io_bytes
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "estimated_bytes": self.estimated_bytes}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _drop_outside(model: nn.Module, keep: tuple[str, ...]) -> None:
    """Empty every parameter and buffer of modules the step does not run, so they take no memory."""
    for name, module in model.named_modules():
        if name and not (_under(name, keep) or any(p.startswith(name + ".") for p in keep)):
            for param in module.parameters(recurse=False):
                param.data = torch.empty(0)
            for key, _ in list(module.named_buffers(recurse=False)):
                module._buffers[key] = torch.empty(0)


def _analytic_activations(model: nn.Module, objective: Objective, x: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(bytes of leaf outputs kept for backward, largest leaf output computed without grad)."""
    kept, frozen = 0, 0

    def hook(_module: nn.Module, _inputs, output) -> None:
        nonlocal kept, frozen
        if isinstance(output, torch.Tensor):
            size = output.numel() * output.element_size()
            if output.requires_grad:
                kept += size
            else:
                frozen = max(frozen, size)

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        objective(model, x, y)
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return kept, frozen


def _step(model: nn.Module, objective: Objective, x, y, params, momentum: float) -> None:
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=momentum)
    objective(model, x, y).backward()
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


def _measured_cpu(model, objective, x, y, params, momentum) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, objective, x, y, params, momentum)
    resident = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return resident + profiled_peak(prof.events())


def profiled_peak(events) -> int:
    """Peak bytes allocated over profiler events, each allocation and free counted once.

    An event's ``cpu_memory_usage`` includes its children's (a convolution nests five levels
    deep), so summing it counts one allocation several times; its ``self_`` part is counted once.
    """
    timed = sorted((e for e in events if getattr(e, "self_cpu_memory_usage", 0)), key=lambda e: e.time_range.start)
    running = peak = 0
    for event in timed:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def _measured_cuda(model, objective, x, y, params, momentum) -> int:
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    _step(model, objective, x, y, params, momentum)
    torch.cuda.synchronize(x.device)
    return int(torch.cuda.max_memory_allocated(x.device))


def measure_step(
    model: nn.Module,
    prepare: Callable[[nn.Module], None],
    keep_modules: Iterable[str],
    objective: Objective,
    x: torch.Tensor,
    y: torch.Tensor,
    momentum: float = 0.0,
    device: torch.device | str = "cpu",
    key: str = "",
    measure: bool = True,
) -> MemoryReport:
    """Measured and estimated bytes of one training step on the batch ``(x, y)``.

    Parameters
    ----------
    model
        The model; a CPU copy is measured, the original is not touched.
    prepare
        Sets the copy up as the round trains it (stage, trainable parameters, frozen statistics).
    keep_modules
        Module prefixes the step runs; everything else is emptied before the copy moves to ``device``.
    objective
        The step's forward pass and loss on the prepared copy.
    measure
        False: the analytic estimate only (``measured_bytes`` is 0), no training step is run.
    """
    device = torch.device(device)
    probe = copy.deepcopy(model).to("cpu")
    keep = tuple(keep_modules)
    _drop_outside(probe, keep)
    prepare(probe)
    params = [p for p in probe.parameters() if p.requires_grad and p.numel()]
    weights = sum(t.numel() * t.element_size() for t in probe.state_dict().values())
    grads = sum(p.numel() * p.element_size() for p in params)
    kept, frozen = _analytic_activations(probe, objective, x.cpu(), y.cpu())
    probe.to(device)
    xs, ys = x.to(device), y.to(device)
    if not measure:
        measured, method = 0, "not measured"
    elif device.type == "cuda":
        measured, method = _measured_cuda(probe, objective, xs, ys, params, momentum), "cuda.max_memory_allocated"
    else:
        measured, method = _measured_cpu(probe, objective, xs, ys, params, momentum), "torch.profiler profile_memory"
    return MemoryReport(
        key=key,
        measured_bytes=measured,
        method=method,
        weights_bytes=weights,
        grads_bytes=grads,
        optimizer_bytes=grads if momentum > 0 else 0,
        activations_bytes=kept,
        frozen_activation_bytes=frozen,
        io_bytes=x.numel() * x.element_size() + y.numel() * y.element_size(),
    )
