"""Local SGD against steps computed by hand and by an independent reference loop.

The reference writes out PyTorch's documented SGD update (dampening 0, no Nesterov)::

    g   = grad f(w) + weight_decay * w + mu * (w - w_start)
    buf = g                      (first step)
    buf = momentum * buf + g     (later steps)
    w   = w - lr * buf

without ``torch.optim``, so a loop that skipped momentum, weight decay, the
proximal term or an epoch, or reset the optimizer between batches, would differ.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedml_progfed.core.local_sgd import SGDSettings, local_sgd

CPU = torch.device("cpu")


def scalar_model(w0: float) -> nn.Linear:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(w0)
    return model


def mse(model: nn.Module):
    return lambda x, y: F.mse_loss(model(x), y)


#: x = 1, y = 0: the loss is w^2 and its gradient 2w, so every step can be done by hand.
ONE = [(torch.ones(1, 1), torch.zeros(1, 1))]


def test_plain_sgd_steps_by_hand():
    model = scalar_model(1.0)
    loss, samples = local_sgd(list(model.parameters()), ONE * 2, mse(model), SGDSettings(lr=0.1), CPU)
    # w: 1 -> 1 - 0.1 * 2 = 0.8 -> 0.8 - 0.1 * 1.6 = 0.64; losses 1 and 0.64
    assert model.weight.item() == pytest.approx(0.64, abs=1e-7)
    assert loss == pytest.approx((1.0 + 0.64) / 2, abs=1e-7) and samples == 2


@pytest.mark.parametrize(
    "momentum,weight_decay,w2",
    [
        # g1 = 2 + 0.5 = 2.5, w1 = 0.75; g2 = 1.5 + 0.375 = 1.875, buf = 0.9 * 2.5 + 1.875 = 4.125
        (0.9, 0.5, 0.75 - 0.1 * 4.125),
        # g1 = 2, w1 = 0.8; g2 = 1.6, buf = 1.8 + 1.6 = 3.4
        (0.9, 0.0, 0.8 - 0.1 * 3.4),
        # g1 = 2.5, w1 = 0.75; g2 = 1.875, no momentum
        (0.0, 0.5, 0.75 - 0.1 * 1.875),
    ],
)
def test_momentum_and_weight_decay_by_hand(momentum, weight_decay, w2):
    model = scalar_model(1.0)
    settings = SGDSettings(lr=0.1, momentum=momentum, weight_decay=weight_decay)
    local_sgd(list(model.parameters()), ONE * 2, mse(model), settings, CPU)
    assert model.weight.item() == pytest.approx(w2, abs=1e-7)


def test_fedprox_term_by_hand_and_the_reported_loss_leaves_it_out():
    # x = 1, y = 1, w0 = 0.5: grad f = 2 (w - 1); prox = mu (w - 0.5), mu = 1
    # step 1: g = -1 + 0 -> w = 0.6; step 2: g = -0.8 + 0.1 = -0.7 -> w = 0.67
    model = scalar_model(0.5)
    batches = [(torch.ones(1, 1), torch.ones(1, 1))] * 2
    loss, _ = local_sgd(list(model.parameters()), batches, mse(model), SGDSettings(lr=0.1, prox_mu=1.0), CPU)
    assert model.weight.item() == pytest.approx(0.67, abs=1e-6)
    # the objective alone: (0.5 - 1)^2 = 0.25 and (0.6 - 1)^2 = 0.16; the prox value 0.005 is not in it
    assert loss == pytest.approx((0.25 + 0.16) / 2, abs=1e-7)


def test_fedprox_pulls_towards_the_start_not_towards_zero():
    """With a loss that pushes w away from its start, a larger mu keeps it closer to the start."""
    distances = []
    for mu in (0.0, 1.0, 10.0):
        model = scalar_model(3.0)  # the start is far from 0: a pull to zero would look like a bigger step
        batches = [(torch.ones(1, 1), torch.full((1, 1), 5.0))] * 10  # the loss pulls w to 5
        local_sgd(list(model.parameters()), batches, mse(model), SGDSettings(lr=0.05, prox_mu=mu), CPU)
        assert model.weight.item() > 3.0
        distances.append(model.weight.item() - 3.0)
    assert distances[0] > distances[1] > distances[2] > 0
    # the fixed point of 2 (w - 5) + mu (w - 3) = 0 for mu = 10 is w = 3 + 4/12
    assert distances[2] == pytest.approx(4 / 12, abs=0.05)


# --------------------------------------------------------------------------- against a reference loop


def reference(w: torch.Tensor, b: torch.Tensor, batches, settings: SGDSettings):
    """The documented SGD update written out by hand on a linear model ``y = x w^T + b``."""
    params = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    start = [p.detach().clone() for p in params]
    buffers = [None, None]
    losses = []
    for _ in range(settings.epochs):
        for x, y in batches:
            loss = F.mse_loss(x @ params[0].T + params[1], y)
            grads = torch.autograd.grad(loss, params)
            losses.append((float(loss.detach()), len(y)))
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(params, grads)):
                    g = g + settings.weight_decay * p + settings.prox_mu * (p - start[i])
                    buffers[i] = g.clone() if buffers[i] is None else settings.momentum * buffers[i] + g
                    p -= settings.lr * buffers[i]
    mean = sum(v * n for v, n in losses) / sum(n for _, n in losses)
    return params[0].detach(), params[1].detach(), mean, sum(n for _, n in losses)


def linear_problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 3, generator=g))
        model.bias.copy_(torch.randn(2, generator=g))
    # batches of unequal size, so a per-batch (not per-sample) mean of the loss would differ
    batches = [(torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)) for n in (1, 5, 2)]
    return model, batches


@pytest.mark.parametrize(
    "settings",
    [
        SGDSettings(lr=0.05, momentum=0.9, weight_decay=0.01, epochs=2),
        SGDSettings(lr=0.05, momentum=0.5, weight_decay=0.1, epochs=3, prox_mu=0.3),
        SGDSettings(lr=0.2, epochs=1),
    ],
)
def test_matches_the_reference_loop(settings):
    model, batches = linear_problem()
    w, b, mean_loss, samples = reference(model.weight.detach(), model.bias.detach(), batches, settings)
    loss, counted = local_sgd(list(model.parameters()), batches, mse(model), settings, CPU)
    assert torch.allclose(model.weight, w, atol=1e-6) and torch.allclose(model.bias, b, atol=1e-6)
    assert loss == pytest.approx(mean_loss, rel=1e-6)
    assert counted == samples == 8 * settings.epochs  # every sample of every epoch


def test_epochs_are_full_passes_with_one_optimizer():
    """Without momentum, two epochs are two one-epoch calls; with momentum the buffer spans the epochs."""
    plain = SGDSettings(lr=0.05, epochs=2)
    once, batches = linear_problem()
    twice, _ = linear_problem()
    local_sgd(list(once.parameters()), batches, mse(once), plain, CPU)
    for _ in range(2):
        local_sgd(list(twice.parameters()), batches, mse(twice), SGDSettings(lr=0.05, epochs=1), CPU)
    assert torch.allclose(once.weight, twice.weight, atol=1e-6)
    heavy = SGDSettings(lr=0.05, momentum=0.9, epochs=2)
    once, _ = linear_problem()
    twice, _ = linear_problem()
    local_sgd(list(once.parameters()), batches, mse(once), heavy, CPU)
    for _ in range(2):
        local_sgd(list(twice.parameters()), batches, mse(twice), SGDSettings(lr=0.05, momentum=0.9), CPU)
    assert not torch.allclose(once.weight, twice.weight, atol=1e-4)  # a fresh optimizer per call, not per epoch


def test_only_the_given_parameters_move():
    model, batches = linear_problem()
    bias = model.bias.detach().clone()
    weight = model.weight.detach().clone()
    local_sgd([model.weight], batches, mse(model), SGDSettings(lr=0.1, momentum=0.9, weight_decay=0.1), CPU)
    assert torch.equal(model.bias, bias)  # in the objective, with a gradient, but not trained
    assert not torch.allclose(model.weight, weight)


def test_no_batches_is_nan_loss_zero_samples_and_no_change():
    model, _ = linear_problem()
    before = model.weight.detach().clone()
    loss, samples = local_sgd(list(model.parameters()), [], mse(model), SGDSettings(lr=0.1, epochs=3, prox_mu=0.5), CPU)
    assert math.isnan(loss) and samples == 0
    assert torch.equal(model.weight, before)
