"""Peak training memory of one step: measured (profiler on CPU) next to the analytic estimate."""

import torch
import torch.nn.functional as F

from fedml_progfed.core.memory import measure_step
from fedml_progfed.core.staged_model import active_names, initialize, new_names, parameter_names, set_trainable
from fedml_progfed.models import build_model


def at_stage(stage, trainable):
    def prepare(probe):
        probe.stage = stage
        set_trainable(probe, trainable)

    return prepare


def loss(model, x, y):
    return F.cross_entropy(model(x), y)


def test_memory_grows_with_the_stage_and_frozen_blocks_drop_gradients():
    model = initialize(build_model("convnet", (1, 28, 28), 10, 4), 0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    params = parameter_names(model)
    reports = []
    for s in (1, 2, 3, 4):
        trainable = [n for n in active_names(model, s) if n in params]
        reports.append(measure_step(model, at_stage(s, trainable), model.stage_modules(s), loss, x, y, momentum=0.9, key=f"stage {s}"))
    weights = [r.weights_bytes for r in reports]
    assert weights == sorted(weights) and weights[0] < weights[-1]
    assert reports[-1].weights_bytes == 4 * sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("heads.0", "heads.1", "heads.2")))
    for r in reports:
        assert r.measured_bytes > r.weights_bytes and r.method == "torch.profiler profile_memory"
        assert r.optimizer_bytes == r.grads_bytes  # one momentum buffer per trainable parameter
        assert r.io_bytes == x.numel() * 4 + y.numel() * 8
    entering = [n for n in new_names(model, 3) if n in params]
    warm = measure_step(model, at_stage(3, entering), model.stage_modules(3), loss, x, y, momentum=0.9)
    assert warm.grads_bytes < reports[2].grads_bytes
    assert warm.activations_bytes < reports[2].activations_bytes  # frozen blocks keep no activations for backward
    assert model.stage == 1 and all(p.requires_grad for p in model.parameters())  # the original is untouched


def test_the_profiled_peak_counts_each_allocation_once():
    """Four no-grad convolutions with 4 MB outputs peak at two live activations, not at nested sums."""
    from torch.profiler import ProfilerActivity, profile

    from fedml_progfed.core.memory import profiled_peak

    model = torch.nn.Sequential(*[torch.nn.Conv2d(16, 16, 3, padding=1) for _ in range(4)]).requires_grad_(False)
    x = torch.randn(16, 16, 64, 64)  # 4 MiB
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
        model(x)
    one = x.numel() * x.element_size()
    assert one <= profiled_peak(prof.events()) <= 2 * one  # input and output of one layer at a time
