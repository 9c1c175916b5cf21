"""Peak training memory per stage: measured (profiler on CPU) next to the analytic estimate."""

import torch
import torch.nn.functional as F

from fedml_progfed.core.memory import measure_training_memory
from fedml_progfed.core.staged_model import active_names, initialize, new_names, parameter_names
from fedml_progfed.models import build_model


def test_memory_grows_with_the_stage_and_warmup_drops_gradients():
    model = initialize(build_model("convnet", (1, 28, 28), 10, 4), 0)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    reports = [measure_training_memory(model, s, active_names(model, s), x, y, F.cross_entropy, momentum=0.9) for s in (1, 2, 3, 4)]
    weights = [r.weights_bytes for r in reports]
    assert weights == sorted(weights) and weights[0] < weights[-1]
    assert reports[-1].weights_bytes == 4 * sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("heads.0", "heads.1", "heads.2")))
    for r in reports:
        assert r.measured_bytes > r.weights_bytes and r.method == "torch.profiler profile_memory"
        assert r.optimizer_bytes == r.grads_bytes  # one momentum buffer per trainable parameter
    warm = measure_training_memory(model, 3, [n for n in new_names(model, 3) if n in parameter_names(model)], x, y, F.cross_entropy, momentum=0.9)
    assert warm.grads_bytes < reports[2].grads_bytes
