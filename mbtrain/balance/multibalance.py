"""MultiBalance: MetaBalance moved from the shared parameters to the shared representation (arXiv 2411.11871);
``--balance metabalance --balance-level representation`` builds it too (`--balance multibalance` is its paper's
name for the same).

Each task's gradient at the trunk's outputs (the shared bottom's output; MMoE's inputs to the gates and each
expert's output) is rescaled with MetaBalance's formula, with moving averages of its norm per representation
tensor (per expert for the experts), and the trunk is then back-propagated once with the sum: one backward
through the heads (models/split.py gives every task's gradient at the boundary from it) and one through the
trunk, where MetaBalance takes one trunk backward per task.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from mbtrain.balance.base import Balancer, Gather, Reduce, reduce_grads
from mbtrain.balance.metabalance import MetaBalanceSettings, balanced_scale, norm_ratios
from mbtrain.balance.per_task import REPRESENTATION, accumulate, heads_backward
from mbtrain.balance.registry import Setup, register
from mbtrain.models.split import SplitForward


@register("multibalance")
class MultiBalance(Balancer):
    """Balanced gradients at the trunk's outputs; every parameter then gets the gradient of that one backward
    (the heads' parameters: exactly ``sum(losses)``'s). ``losses[0]`` is the main task. Needs the model's split
    forward. With `reduce` (distributed training) the norms are of the global batch's gradients (squared norms
    summed across ranks) and every gradient is summed across ranks at the end."""

    method = ("MultiBalance (arXiv 2411.11871): MetaBalance on the trunk's outputs, per representation tensor and "
              "expert; one trunk backward. The same as `metabalance` at `--balance-level representation`")
    settings_class = MetaBalanceSettings
    min_tasks = 2
    levels = (REPRESENTATION,)
    wants_split = True

    def __init__(self, params: Iterable[torch.Tensor], task_params: Iterable[torch.Tensor],
                 relax_factor: float = 0.7, beta: float = 0.9, strategy: str = "both", eps: float = 1e-5,
                 reduce: Reduce | None = None, gather: Gather | None = None) -> None:
        MetaBalanceSettings(relax_factor, beta, strategy)
        self.params = list(params)  # every trainable parameter: what `reduce` sums
        self.task_params = [p for p in task_params if p.requires_grad]
        self.relax_factor, self.beta, self.strategy, self.eps = relax_factor, beta, strategy, eps
        self.reduce = reduce
        self.gather = gather  # an embedding table's touched rows from every rank (table.py)
        self.moving_norms: torch.Tensor | None = None  # [T, G] over the representation groups
        self.ratio_names: list[str] | None = None  # the groups, for TensorBoard

    @classmethod
    def build(cls, setup: Setup, settings: MetaBalanceSettings) -> MultiBalance:
        return cls(setup.every, setup.task, settings.relax_factor, settings.beta, settings.strategy,
                   reduce=setup.reduce, gather=setup.gather)

    def backward(self, losses: Sequence[torch.Tensor], split: SplitForward | None = None) -> None:
        if split is None:
            raise ValueError("MultiBalance needs the model's split forward")
        self.check_losses(losses)
        n_tasks = len(losses)
        head_grads, boundary_grads = heads_backward(losses, self.task_params, split, self.batched)
        accumulate(self.task_params, head_grads, None)
        reached = [(b, g, grouped) for b, g, grouped in zip(split.boundary, boundary_grads, split.per_expert,
                                                             strict=True) if g is not None]
        squared = torch.cat([_squared_norms(g, grouped) for _, g, grouped in reached], dim=1)  # [T, G]
        if self.reduce is not None:
            self.reduce([squared])
        norms = squared.sqrt()
        moving = self._moving_norms(norms)
        moving.mul_(self.beta).add_(norms, alpha=1 - self.beta)
        scale = torch.ones_like(moving)
        scale[1:] = balanced_scale(moving[0], moving[1:], self.relax_factor, self.strategy, self.eps)
        combined, start = [], 0
        for _, g, grouped in reached:
            width = g.shape[1] if grouped else 1
            factors = scale[:, start : start + width]
            shape = (n_tasks, width, *[1] * (g.dim() - 2)) if grouped else (n_tasks, *[1] * (g.dim() - 1))
            factors = factors.reshape(shape)
            total = g[0] * factors[0]  # Σ_k s_k·g_k task by task: no [T, ...] scaled copy of g
            for k in range(1, n_tasks):
                total.addcmul_(g[k], factors[k])
            combined.append(total)
            start += width
        torch.autograd.backward([b for b, _, _ in reached], grad_tensors=combined)
        if self.reduce is not None:
            reduce_grads(self.params, self.reduce, self.gather)
        self.norm_ratios, self.grad_norm_ratio = norm_ratios(norms, self.eps)
        if self.ratio_names is None:
            self.ratio_names = [name if not grouped else f"{name}/{e}"
                                for name, g, grouped in zip(split.names, boundary_grads, split.per_expert,
                                                            strict=True) if g is not None
                                for e in range(g.shape[1] if grouped else 1)]

    def _moving_norms(self, norms: torch.Tensor) -> torch.Tensor:
        if self.moving_norms is None:
            self.moving_norms = torch.zeros_like(norms)
        elif self.moving_norms.shape != norms.shape:
            raise ValueError(f"MultiBalance state is for norms of shape {tuple(self.moving_norms.shape)}, got "
                             f"{tuple(norms.shape)}")
        return self.moving_norms

    def state_dict(self) -> dict:
        moving = None if self.moving_norms is None else self.moving_norms.clone()
        return {"moving_norms": moving, "relax_factor": self.relax_factor, "beta": self.beta,
                "strategy": self.strategy}

    def load_state_dict(self, state: dict) -> None:
        MetaBalanceSettings(state["relax_factor"], state["beta"], state["strategy"])
        self.relax_factor, self.beta, self.strategy = state["relax_factor"], state["beta"], state["strategy"]
        moving = state["moving_norms"]
        device = self.params[0].device if self.params else None
        self.moving_norms = None if moving is None else moving.to(device)


def _squared_norms(grad: torch.Tensor, per_expert: bool) -> torch.Tensor:
    """[T, groups] squared L2 norms of each task's gradient [T, ...] (per expert: [T, E, ...] → [T, E])."""
    flat = grad.reshape(grad.shape[0], grad.shape[1], -1) if per_expert else grad.reshape(grad.shape[0], 1, -1)
    return torch.linalg.vector_norm(flat, dim=2).square()
