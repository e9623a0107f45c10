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

import torch

from mbtrain.balance.per_task import Gather, PerTaskGradients, Reduce, Sinks, accumulate


class PCGrad(PerTaskGradients):
    name = "PCGrad"

    def __init__(self, shared_params: Iterable[torch.Tensor], task_params: Iterable[torch.Tensor] | None = None,
                 seed: int = 0, reduce: Reduce | None = None, gather: Gather | None = None) -> None:
        super().__init__(shared_params, task_params, reduce, gather)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU, the same draws on every device

    def combine(self, sinks: Sinks, task_grads: list[list[torch.Tensor | None]]) -> None:
        n_tasks = len(task_grads)
        reached = [i for i in range(len(sinks)) if any(grads[i] is not None for grads in task_grads)]
        shapes = [next(grads[i] for grads in task_grads if grads[i] is not None) for i in reached]
        flat = torch.stack([torch.cat([like.new_zeros(like.numel()) if grads[i] is None else grads[i].reshape(-1)
                                       for i, like in zip(reached, shapes, strict=True)])
                            for grads in task_grads])
        squared = (flat * flat).sum(dim=1).clamp(min=torch.finfo(flat.dtype).tiny)  # [T]; 0·g_j where g_j = 0
        projected = flat.clone()
        for i in range(n_tasks):
            g = projected[i]
            for j in torch.randperm(n_tasks, generator=self.generator).tolist():
                g -= (g @ flat[j]).clamp(max=0) / squared[j] * flat[j]  # no host sync: clamp, not an if
        total = projected.sum(dim=0)
        pieces, start = [], 0
        for like in shapes:
            pieces.append(total[start : start + like.numel()].view_as(like))
            start += like.numel()
        accumulate([sinks[i] for i in reached], pieces, None)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
