"""Uncertainty weighting: a loss-level balancer, PlainSum with another total.

Under torchrun every weight comes from global quantities (the step's losses summed across ranks, the epoch's
global mean losses) and a term that does not scale with the rows is split between the ranks, so N ranks at batch
B take one process's step at batch N·B.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mbtrain.balance.base import Gather, Reduce, restore
from mbtrain.balance.plain import PlainSum
from mbtrain.balance.registry import Setup, register


@register("uncertainty")
class Uncertainty(PlainSum):
    """Kendall, Gal & Cipolla (CVPR 2018): a learned log-variance s_k per task, trained with the model;
    total = Σ_k ½·exp(−s_k)·L_k + ½·s_k, the form LibMTL and torch-rechub train. s starts at 0 (weights ½)."""

    method = ("uncertainty weighting, Kendall, Gal & Cipolla (CVPR 2018): a learned log-variance per task, "
              "trained with the model")
    positive_weights = True  # a weight of 0 leaves a log-variance nothing to balance: it runs off to -inf

    def __init__(self, num_tasks: int, params: Iterable[torch.Tensor] = (), reduce: Reduce | None = None,
                 world_size: int = 1, gather: Gather | None = None) -> None:
        super().__init__(params, reduce, gather)
        device = self.params[0].device if self.params else None
        self.log_vars = torch.nn.Parameter(torch.zeros(num_tasks, device=device))
        self.world_size = world_size

    @classmethod
    def build(cls, setup: Setup, settings: Any) -> Uncertainty:
        return cls(setup.num_tasks, setup.every, reduce=setup.reduce, gather=setup.gather, world_size=setup.world_size)

    def parameters(self) -> list[torch.Tensor]:
        return [self.log_vars]

    def total(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        precision = torch.exp(-self.log_vars)
        self.task_weights = 0.5 * precision.detach()
        # each rank adds its share of the regulariser: the ranks' gradients then sum to one process's
        return (0.5 * precision * torch.stack(list(losses))).sum() + 0.5 * self.log_vars.sum() / self.world_size

    def state_dict(self) -> dict:
        return {"log_vars": self.log_vars.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        restore(self.log_vars, state["log_vars"], "uncertainty's log-variances")
