"""FedAvg / FedAdam server steps against hand-computed examples (Reddi et al. 2021, Alg. 2)."""

import pytest
import torch

from fedml_progfed.config import ProgFedConfig, RunConfig, explain
from fedml_progfed.core.server_optim import (
    FedAdamServer,
    FedAvgServer,
    build_server_optimizer,
    weighted_mean,
)
from fedml_progfed.errors import ConfigError

X = {"w": torch.tensor([1.0, 2.0])}
UPDATES = [(1, {"w": torch.tensor([2.0, 2.0])}), (3, {"w": torch.tensor([1.0, 4.0])})]


def weighted_mean_delta(params, updates, names):
    """Σ_c w_c (x_c − x): the clients' deltas as the aggregator forms them, then their weighted mean."""
    return weighted_mean([(n, {k: s[k] - params[k] for k in names}) for n, s in updates], names)


def test_weighted_mean_delta_by_samples():
    delta = weighted_mean_delta(X, UPDATES, ["w"])
    assert torch.allclose(delta["w"], torch.tensor([0.25, 1.5]))


def test_fedavg_with_server_lr():
    delta = weighted_mean_delta(X, UPDATES, ["w"])
    assert torch.allclose(FedAvgServer(1.0).step(X, delta)["w"], torch.tensor([1.25, 3.5]))
    assert torch.allclose(FedAvgServer(0.5).step(X, delta)["w"], torch.tensor([1.125, 2.75]))


def test_fedadam_hand_computed_two_steps():
    opt = FedAdamServer(server_lr=0.5, beta1=0.9, beta2=0.99, tau=0.1)
    delta = weighted_mean_delta(X, UPDATES, ["w"])  # (0.25, 1.5)
    x1 = opt.step(X, delta)
    # m = 0.1*Δ = (0.025, 0.15); v = 0.99*τ² + 0.01*Δ² = (0.010525, 0.0324)
    # x = x + 0.5 * m / (sqrt(v) + 0.1)
    assert torch.allclose(opt.m["w"], torch.tensor([0.025, 0.15]))
    assert torch.allclose(opt.v["w"], torch.tensor([0.010525, 0.0324]))
    assert torch.allclose(x1["w"], torch.tensor([1.0617004, 2.2678571]), atol=1e-6)
    # second step with Δ = (-0.1, 0): m = (0.0125, 0.135), v = (0.01051975, 0.032076)
    x2 = opt.step(x1, {"w": torch.tensor([-0.1, 0.0])})
    assert torch.allclose(opt.m["w"], torch.tensor([0.0125, 0.135]))
    assert torch.allclose(opt.v["w"], torch.tensor([0.01051975, 0.032076]), atol=1e-8)
    expected = x1["w"] + 0.5 * torch.tensor([0.0125, 0.135]) / (torch.tensor([0.01051975, 0.032076]).sqrt() + 0.1)
    assert torch.allclose(x2["w"], expected)


def test_fedadam_state_is_per_name_and_follows_growth():
    opt = FedAdamServer(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    params = {"old": torch.ones(2), "head": torch.ones(2)}
    opt.step(params, {"old": torch.ones(2), "head": torch.ones(2)})
    opt.on_growth(surviving={"old"})
    assert set(opt.m) == {"old"}  # the dropped head's state is gone
    new = opt.step({"old": torch.ones(2), "new": torch.zeros(2)}, {"old": torch.ones(2), "new": torch.ones(2)})
    # the entering parameter starts from fresh moments: m = 0.1, v = 0.99 τ² + 0.01
    assert torch.allclose(opt.m["new"], torch.full((2,), 0.1))
    assert torch.allclose(new["new"], 0.1 * 0.1 / ((0.99e-6 + 0.01) ** 0.5 + 1e-3) * torch.ones(2))
    reset = FedAdamServer(0.1, 0.9, 0.99, 1e-3, reset_on_growth=True)
    reset.step(params, {"old": torch.ones(2)})
    reset.on_growth(surviving={"old"})
    assert reset.m == {} and reset.v == {}


def settings(**progfed):
    """The server-optimizer settings a run with these ``progfed`` fields resolves to."""
    from fedml_progfed.algorithms import training_settings

    return training_settings(RunConfig(progfed=ProgFedConfig(**progfed))).server


def test_registry_and_unknown_optimizer():
    assert isinstance(build_server_optimizer(settings(optimizer="fedadam")), FedAdamServer)
    assert isinstance(build_server_optimizer(settings(optimizer="fedprox")), FedAvgServer)
    with pytest.raises(ConfigError) as err:
        build_server_optimizer(settings(optimizer="fedyogi"))
    assert explain(err.value) == "progfed_args.progfed_optimizer: unknown 'fedyogi'; available: fedadam | fedavg | fedprox"


def test_fedadam_defaults_to_a_small_server_rate_and_fedavg_to_one():
    assert build_server_optimizer(settings(optimizer="fedadam")).server_lr == 0.01
    assert build_server_optimizer(settings(optimizer="fedavg")).server_lr == 1.0
    assert build_server_optimizer(settings(optimizer="fedadam", server_lr=0.3)).server_lr == 0.3
