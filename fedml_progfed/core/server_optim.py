"""Server-side optimisers over name-addressed parameters.

The server turns the sample-weighted mean client delta into a pseudo-gradient
``Δ = Σ_c w_c (x_c − x)`` and applies an optimiser step (Reddi et al. 2021,
"Adaptive Federated Optimization", Alg. 2; ProgFed Sec. 4.4 "Advanced
optimization"). State is kept per parameter *name*, so a block that enters at
growth starts with fresh state while surviving blocks keep theirs (or reset
them, by an explicit option).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from fedml_progfed.core.registry import Registry

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ServerOptimizerSettings:
    """Which server step and its constants (Reddi et al. 2021 for FedAdam).

    ``lr`` is the server learning rate in use (the configuration layer resolves an empty
    one to the optimizer's default); ``reset_on_growth`` resets FedAdam's moments of
    surviving parameters when the model grows.
    """

    optimizer: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1.0e-3
    reset_on_growth: bool = False


class ServerOptimizer(ABC):
    """Applies ``x ← x + step(Δ)`` name by name; stateless unless a subclass keeps state."""

    def __init__(self, server_lr: float) -> None:
        self.server_lr = server_lr

    @abstractmethod
    def step(self, params: Tensors, pseudo_grad: Tensors) -> dict[str, torch.Tensor]:
        """Return updated copies of ``params`` (only the names present in ``pseudo_grad``)."""

    def on_growth(self, surviving: Iterable[str]) -> None:
        """Hook called when the model grows; ``surviving`` are names trained before and after."""

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors by key, JSON-able metadata): what a checkpoint stores."""
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class FedAvgServer(ServerOptimizer):
    """FedAvg with a server learning rate: ``x ← x + η_s Δ`` (η_s = 1 is plain averaging)."""

    def step(self, params: Tensors, pseudo_grad: Tensors) -> dict[str, torch.Tensor]:
        return {name: params[name] + self.server_lr * delta for name, delta in pseudo_grad.items()}


class FedAdamServer(ServerOptimizer):
    """FedAdam (Reddi et al. 2021, Alg. 2), moments kept per parameter name.

    ``m ← β1 m + (1−β1) Δ``, ``v ← β2 v + (1−β2) Δ²``, ``x ← x + η m / (√v + τ)``,
    with ``m₋₁ = 0`` and ``v₋₁ = τ²`` for every name seen for the first time.
    """

    def __init__(
        self, server_lr: float, beta1: float, beta2: float, tau: float, reset_on_growth: bool = False
    ) -> None:
        super().__init__(server_lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.reset_on_growth = reset_on_growth
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(self, params: Tensors, pseudo_grad: Tensors) -> dict[str, torch.Tensor]:
        updated = {}
        for name, delta in pseudo_grad.items():
            m = self.m.get(name, torch.zeros_like(delta))
            v = self.v.get(name, torch.full_like(delta, self.tau**2))
            m = self.beta1 * m + (1.0 - self.beta1) * delta
            v = self.beta2 * v + (1.0 - self.beta2) * delta * delta
            self.m[name], self.v[name] = m, v
            updated[name] = params[name] + self.server_lr * m / (v.sqrt() + self.tau)
        return updated

    def on_growth(self, surviving: Iterable[str]) -> None:
        keep = set() if self.reset_on_growth else set(surviving)
        self.m = {k: t for k, t in self.m.items() if k in keep}
        self.v = {k: t for k, t in self.v.items() if k in keep}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"m/{k}": t for k, t in self.m.items()}
        tensors.update({f"v/{k}": t for k, t in self.v.items()})
        return tensors, {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.m = {k[2:]: t.clone() for k, t in tensors.items() if k.startswith("m/")}
        self.v = {k[2:]: t.clone() for k, t in tensors.items() if k.startswith("v/")}


def weighted_mean(updates: list[tuple[float, Tensors]], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """``Σ_c w_c Δ_c / Σ_c w_c`` over client deltas by name (ProgFed Alg. 1 line 27 with weights ``w_c``)."""
    total = float(sum(w for w, _ in updates))
    if total <= 0:
        raise ValueError("client updates carry no aggregation weight")
    mean = {}
    for name in names:
        acc = None
        for weight, delta in updates:
            term = (weight / total) * delta[name].float()
            acc = term if acc is None else acc + term
        mean[name] = acc
    return mean


#: optimizer name -> factory(ServerOptimizerSettings) -> ServerOptimizer
SERVER_OPTIMIZERS: Registry[Callable[..., ServerOptimizer]] = Registry("server optimizer")


@SERVER_OPTIMIZERS.register("fedavg")
def _fedavg(cfg: ServerOptimizerSettings) -> ServerOptimizer:
    return FedAvgServer(cfg.lr)


@SERVER_OPTIMIZERS.register("fedprox")
def _fedprox(cfg: ServerOptimizerSettings) -> ServerOptimizer:
    # FedProx differs from FedAvg on the client only (the proximal term).
    return FedAvgServer(cfg.lr)


@SERVER_OPTIMIZERS.register("fedadam")
def _fedadam(cfg: ServerOptimizerSettings) -> ServerOptimizer:
    return FedAdamServer(cfg.lr, cfg.beta1, cfg.beta2, cfg.tau, cfg.reset_on_growth)


def build_server_optimizer(cfg: ServerOptimizerSettings) -> ServerOptimizer:
    """Build the optimiser named by ``cfg.optimizer``."""
    return SERVER_OPTIMIZERS.lookup(cfg.optimizer, "progfed.optimizer")(cfg)
