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
from mbtrain.balance.per_task import PerTaskGradients, Sinks, accumulate
from mbtrain.balance.registry import Setup, register


@register("pcgrad")
class PCGrad(PerTaskGradients):
    method = ("PCGrad, Yu et al. (NeurIPS 2020): each task's shared gradient projected off the others' where they "
              "conflict, in a random order seeded by --seed")

    def __init__(self, shared_params: Iterable[torch.Tensor], task_params: Iterable[torch.Tensor] | None = None,
                 seed: int = 0, reduce: Reduce | None = None, gather: Gather | None = None) -> None:
        super().__init__(shared_params, task_params, reduce, gather)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU, the same draws on every device

    @classmethod
    def build(cls, setup: Setup, settings: Any) -> PCGrad:
        return cls(setup.shared, setup.task, seed=setup.seed, reduce=setup.reduce, gather=setup.gather)

    def combine(self, sinks: Sinks, task_grads: list[list[torch.Tensor | None]]) -> None:
        """Every g_i' stays in the span of the task gradients, g_i' = Σ_j c_ij·g_j: the projections run on the
        [T, T] coefficients and Gram matrix of dot products, and the sinks get Σ_j (Σ_i c_ij)·g_j, one
        weighted pass per task as MetaBalance's. No flattened copy of the gradients, no host sync."""
        n_tasks = len(task_grads)
        like = next(g for grads in task_grads for g in grads if g is not None)
        upper = torch.triu_indices(n_tasks, n_tasks, device=like.device)  # made on the device: no copy to it
        dots = [sum((torch.dot(g_a.reshape(-1), g_b.reshape(-1))
                     for g_a, g_b in zip(task_grads[a], task_grads[b], strict=True)
                     if g_a is not None and g_b is not None), like.new_zeros(()))
                for a in range(n_tasks) for b in range(a, n_tasks)]  # triu_indices' order
        gram = like.new_zeros(n_tasks, n_tasks).index_put_((upper[0], upper[1]), torch.stack(dots))
        gram = gram + gram.triu(1).T
        squared = gram.diagonal().clamp(min=torch.finfo(gram.dtype).tiny)  # 0·g_j where g_j = 0
        coefficients = torch.eye(n_tasks, dtype=gram.dtype, device=gram.device)
        for i in range(n_tasks):
            for j in torch.randperm(n_tasks, generator=self.generator).tolist():
                dot = coefficients[i] @ gram[:, j]  # g_i'·g_j
                coefficients[i, j] -= dot.clamp(max=0) / squared[j]  # clamp, not an if: no host sync
        weights = coefficients.sum(dim=0)
        for k, grads in enumerate(task_grads):
            accumulate(sinks, grads, [weights[k]] * len(sinks))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
