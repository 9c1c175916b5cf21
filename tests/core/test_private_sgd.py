"""DP-SGD through Opacus: per-sample clipping, frozen modules untouched, hooks gone after the round."""

from __future__ import annotations

import torch
from torch import nn

from fedml_progfed.core.local_sgd import SGDSettings
from fedml_progfed.core.private_sgd import PrivateSGDSettings, private_local_sgd
from fedml_progfed.data.batches import TensorBatches


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    for p in model[0].parameters():
        p.requires_grad = False  # a frozen prefix, as ProFL's frozen blocks
    x, y = torch.randn(40, 6) * 50, torch.randint(0, 3, (40,))  # large inputs: large per-sample gradients
    return model, TensorBatches(x, y, batch_size=40, shuffle=False)


def train(model, batches, noise: float, seed: int = 3):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = lambda x, y: nn.functional.cross_entropy(model(x), y)
    return private_local_sgd(model, params, batches, loss, SGDSettings(lr=1.0), PrivateSGDSettings(1.0, noise),
                             torch.device("cpu"), seed)


def test_one_noiseless_step_moves_the_trainable_weights_by_at_most_lr_times_the_clip():
    model, batches = model_and_data()
    frozen = [p.detach().clone() for p in model[0].parameters()]
    start = torch.cat([p.detach().flatten().clone() for p in model[2].parameters()])
    loss, samples, steps = train(model, batches, noise=0.0)
    moved = torch.cat([p.detach().flatten() for p in model[2].parameters()]) - start
    # the batch is the whole data set (rate 1): the mean of per-sample gradients clipped to 1
    assert steps.steps == 1 and steps.sample_rate == 1.0 and steps.population == 40 and samples == 40
    assert 0 < float(moved.norm()) <= 1.0 + 1e-5
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters()))
    # Opacus' hooks and per-sample gradients are gone: the next round starts from a plain model
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_the_noise_and_sampling_follow_the_clients_seed():
    runs = []
    for seed in (3, 3, 4):
        model, batches = model_and_data()
        batches.batch_size = 10  # Poisson batches of expected size 10: rate 1/4
        train(model, batches, noise=1.0, seed=seed)
        runs.append(torch.cat([p.detach().flatten() for p in model[2].parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
