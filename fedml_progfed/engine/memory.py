"""What a round's sub-model needs in memory, and which clients can afford it.

The server measures ``Mem(plan)`` once per distinct sub-model (ProgFed stage,
ProFL step) on a batch of the configured size, keeps the reports for the run's
summary, and, when memory budgets are set (``memory.budgets``), turns each client's budget
into the eligible set of a round (ProFL spec Sec. 2.6; for ``e2e`` this is
ExclusiveFL: only clients that fit the full model train).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedml_progfed.algorithms.base import Algorithm, Assignment
from fedml_progfed.core.budgets import BudgetSpec, client_budgets, eligible_clients
from fedml_progfed.core.memory import MemoryReport, measure_step
from fedml_progfed.core.staged_model import StagedModel


@dataclass(frozen=True)
class MemorySettings:
    """The batch a step is measured on, and the budgets (if any)."""

    sample: tuple[torch.Tensor, torch.Tensor]
    device: torch.device
    momentum: float
    budgets: BudgetSpec | None = None
    estimator: str = "measured"
    seed: int = 0


class MemoryPlanner:
    """Measures steps once each and answers which clients fit a plan."""

    def __init__(self, algorithm: Algorithm, settings: MemorySettings, num_clients: int) -> None:
        self.algorithm = algorithm
        self.settings = settings
        self.num_clients = num_clients
        self.reports: dict[str, MemoryReport] = {}
        self._budgets: list[int] | None = None

    def _measure(self, model: StagedModel, key: str, probe) -> MemoryReport:
        if key not in self.reports:
            probe = probe()
            x, y = self.settings.sample
            self.reports[key] = measure_step(
                model, probe.prepare, probe.keep_modules, probe.objective, x, y,
                self.settings.momentum, self.settings.device, key=key,
            )
        return self.reports[key]

    def need(self, model: StagedModel, assignment: Assignment) -> MemoryReport:
        """The memory report of one local step of ``assignment`` (measured once per sub-model), on the
        model a client trains for it (a narrower copy for HeteroFL's widths)."""
        trained = self.algorithm.client_model(model, assignment.plan)
        return self._measure(trained, assignment.layout.label, lambda: self.algorithm.memory_probe(trained, assignment))

    def bytes_of(self, report: MemoryReport) -> int:
        return report.measured_bytes if self.settings.estimator == "measured" else report.estimated_bytes

    def budgets(self, model: StagedModel) -> list[int] | None:
        """Every client's budget in bytes (drawn once), or None without budgets."""
        spec = self.settings.budgets
        if spec is None:
            return None
        if self._budgets is None:
            probe = lambda: self.algorithm.full_model_probe(model)  # noqa: E731
            full = self.bytes_of(self._measure(model, "full model", probe)) if spec.relative else 0
            self._budgets = client_budgets(spec, self.num_clients, self.settings.seed, full)
        return self._budgets

    def eligible(self, model: StagedModel, assignment: Assignment) -> list[int]:
        """Clients whose budget fits ``assignment`` (every client without budgets)."""
        budgets = self.budgets(model)
        if budgets is None:
            return list(range(self.num_clients))
        return eligible_clients(budgets, self.bytes_of(self.need(model, assignment)))

    def state_dict(self) -> dict:
        """Measured reports and drawn budgets (JSON), so a resumed run decides eligibility the same way."""
        return {"reports": [r.as_dict() for r in self.reports.values()], "budgets": self._budgets}

    def load_state_dict(self, state: dict) -> None:
        fields = set(MemoryReport.__dataclass_fields__)
        self.reports = {r["key"]: MemoryReport(**{k: v for k, v in r.items() if k in fields}) for r in state["reports"]}
        self._budgets = state["budgets"]

    def summary(self) -> dict:
        """Reports per sub-model and budget statistics, for ``summary.json``."""
        out: dict = {"steps": [r.as_dict() for r in self.reports.values()]}
        if self._budgets is not None:
            out["budgets_bytes"] = {"min": min(self._budgets), "max": max(self._budgets), "all": self._budgets}
        return out
