"""PCGrad (Yu et al., NeurIPS 2020): project away the components of each task's shared gradient that conflict
with another task's, then sum.

For each task i, in turn: g_i' = g_i, then for every task j in a random order (drawn per i from the
balancer's seeded generator, the same on every rank): where g_i'·g_j < 0, g_i' −= (g_i'·g_j)/‖g_j‖²·g_j. The
shared parameters get Σ_i g_i'; every other parameter the plain sum. Dot products span every shared tensor
(the whole shared gradient as one vector), as in the paper. As the authors' code, j runs over all tasks,
i itself included.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mbtrain.balance.base import Gather, Reduce
from mbtrain.balance.per_task import PARAMETERS, WeightedGradients, drawn_on_host
from mbtrain.balance.registry import Setup, register


@register("pcgrad")
class PCGrad(WeightedGradients):
    method = ("PCGrad, Yu et al. (NeurIPS 2020): each task's shared gradient projected off the others' where they "
              "conflict, in a random order seeded by --seed")

    def __init__(self, shared_params: Iterable[torch.Tensor], task_params: Iterable[torch.Tensor] | None = None,
                 seed: int = 0, reduce: Reduce | None = None, gather: Gather | None = None,
                 level: str = PARAMETERS) -> None:
        super().__init__(shared_params, task_params, reduce, gather, level)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU, the same draws on every device

    @classmethod
    def build(cls, setup: Setup, settings: Any) -> PCGrad:
        return cls(setup.shared, setup.task, seed=setup.seed, reduce=setup.reduce, gather=setup.gather,
                   level=setup.level)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        """Every g_i' stays in the span of the task gradients, g_i' = Σ_j c_ij·g_j: the projections run on the
        [T, T] coefficients and the Gram matrix, and the sinks get Σ_j (Σ_i c_ij)·g_j. Each g_i' depends on its
        own row alone, so the T tasks' projections run side by side, T steps of T at once. No host sync."""
        n_tasks = gram.shape[0]
        squared = gram.diagonal().clamp(min=torch.finfo(gram.dtype).tiny)  # 0·g_j where g_j = 0
        coefficients = torch.eye(n_tasks, dtype=gram.dtype, device=gram.device)
        # task i's order of the j: the i-th draw, as if drawn task after task; every task's s-th projection at once
        orders = drawn_on_host(torch.stack([torch.randperm(n_tasks, generator=self.generator)
                                            for _ in range(n_tasks)]), gram)
        tasks = torch.arange(n_tasks, device=gram.device)
        for turn in orders.unbind(1):  # turn[i]: the j of task i's next projection
            dots = (coefficients * gram[:, turn].T).sum(dim=1)  # g_i'·g_j for every i
            coefficients[tasks, turn] -= dots.clamp(max=0) / squared[turn]  # clamp, not an if: no host sync
        return coefficients.sum(dim=0)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
