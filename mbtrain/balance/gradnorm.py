"""GradNorm (Chen et al., ICML 2018): learned task weights that equalise the tasks' training rates through the
norms of their gradients at the last shared layer.

The model trains on Σ_k w_k·L_k. With G_k = ‖∇_W w_k·L_k‖ at the trunk's last layer W, Ḡ their mean and
r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0)) each task's relative inverse training rate, the weights get the
gradient of Σ_k |G_k − Ḡ·r_k^α| with the target Ḡ·r_k^α held constant, which is sign(G_k − Ḡ·r_k^α)·‖∇_W L_k‖,
and are renormalised to sum to the number of tasks before each step (floored at 1e-3 first). L_k(0) are the
first step's losses.
The model's optimizer trains the weights. One backward through the heads, one per task through W's layer
only, one through the trunk. At the representation level G_k is the norm at the trunk's outputs instead (as
LibMTL's rep_grad): the heads' backward gives it, and W's layer is not walked per task.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mbtrain.balance.base import Balancer, Gather, Reduce, reduce_grads, restore
from mbtrain.balance.per_task import LEVELS, PARAMETERS, REPRESENTATION, accumulate, heads_backward
from mbtrain.balance.registry import Setup, register
from mbtrain.checks import positive
from mbtrain.models.split import SplitForward
from mbtrain.space import Range, tuned
from mbtrain.table import is_table, no_rows, summed_rows, touched

WEIGHT_FLOOR = 1e-3  # a weight Adam pushed to 0 would never move again (its gradient is w-proportional)


@dataclass(frozen=True)
class GradNormSettings:
    # the asymmetry α: how hard tasks that train slower are pulled up
    gradnorm_alpha: float = tuned(1.5, Range(0.1, 3.0))

    def __post_init__(self) -> None:
        positive("--gradnorm-alpha", self.gradnorm_alpha)


@register("gradnorm")
class GradNorm(Balancer):
    method = ("GradNorm, Chen et al. (ICML 2018): learned task weights that equalise the tasks' gradient norms at "
              "the trunk's last layer, scaled by their training rates")
    settings_class = GradNormSettings
    min_tasks = 2
    wants_split = True
    levels = LEVELS

    def __init__(self, num_tasks: int, params: Iterable[torch.Tensor], task_params: Iterable[torch.Tensor],
                 alpha: float = 1.5, reduce: Reduce | None = None, level: str = PARAMETERS,
                 gather: Gather | None = None) -> None:
        self.check_level(level)
        self.level = level
        self.params = list(params)  # every model parameter: what `reduce` sums
        self.task_params = [p for p in task_params if p.requires_grad]
        like = self.params[0] if self.params else torch.empty(0)
        self.weights = torch.nn.Parameter(like.new_ones(num_tasks))
        self.alpha = alpha
        self.reduce = reduce
        self.gather = gather  # an embedding table's touched rows from every rank (table.py)
        self.initial: torch.Tensor | None = None  # L_k(0), summed across ranks

    @classmethod
    def build(cls, setup: Setup, settings: GradNormSettings) -> GradNorm:
        return cls(setup.num_tasks, setup.every, setup.task, alpha=settings.gradnorm_alpha, reduce=setup.reduce,
                   level=setup.level, gather=setup.gather)

    def parameters(self) -> list[torch.Tensor]:
        return [self.weights]

    def backward(self, losses: Sequence[torch.Tensor], split: SplitForward | None = None) -> None:
        if split is None or split.last_shared is None:
            raise ValueError("GradNorm needs the model's split forward and a shared hidden layer")
        self.check_losses(losses)
        n_tasks = len(losses)
        with torch.no_grad():  # after the optimizer's step: back to Σ w = T, no weight at or below 0
            self.weights.clamp_(min=WEIGHT_FLOOR).mul_(n_tasks / self.weights.sum())
        w = self.weights.detach().clone()
        stacked = torch.stack(list(losses))
        head_grads, boundary_grads = heads_backward(list((w * stacked).unbind()), self.task_params, split,
                                                    self.batched)
        accumulate(self.task_params, head_grads, None)
        reached = [(b, g) for b, g in zip(split.boundary, boundary_grads, strict=True) if g is not None]
        outputs = [b for b, _ in reached]
        norms, values = self._norms(reached, split, n_tasks), stacked.detach().clone()
        if self.reduce is not None:
            self.reduce([values])
        if self.initial is None:
            self.initial = values.clone()
        tiny = torch.finfo(values.dtype).tiny
        rate = values / self.initial.clamp(min=tiny)
        target = norms.mean() * (rate / rate.mean().clamp(min=tiny)).pow(self.alpha)
        unweighted = norms / w  # ‖∇_W L_k‖
        self.weights.grad = torch.sign(norms - target) * unweighted
        torch.autograd.backward(outputs, grad_tensors=[g.sum(dim=0) for _, g in reached])
        if self.reduce is not None:
            reduce_grads(self.params, self.reduce, self.gather)
        self.task_weights = w
        self.grad_norm_ratio = norms / norms[0].clamp(min=torch.finfo(norms.dtype).tiny)

    def _norms(self, reached: list[tuple[torch.Tensor, torch.Tensor]], split: SplitForward, n_tasks: int
               ) -> torch.Tensor:
        """[T] ‖∇ w_k·L_k‖ for the whole batch: at the last shared layer W (back through W's layer only, once per
        task; across ranks the gradients summed) or, at the representation level, at the trunk's outputs (what
        the heads' backward gave; across ranks, each rank holding its own rows, the squared norms summed)."""
        if self.level == REPRESENTATION:
            squared = sum(g.reshape(n_tasks, -1).square().sum(dim=1) for _, g in reached)
            if self.reduce is not None:
                self.reduce([squared])
            return squared.sqrt()
        outputs, layer = [b for b, _ in reached], split.last_shared
        layer_grads = []
        for k in range(n_tasks):
            (grad,) = torch.autograd.grad(outputs, [layer], grad_outputs=[g[k] for _, g in reached],
                                          retain_graph=True, allow_unused=True)
            if grad is None:
                grad = no_rows(layer) if is_table(layer) else torch.zeros_like(layer)
            layer_grads.append(grad)
        if is_table(layer):  # ESMM's trunk is the embedding alone: each task's gradient is the batch's rows
            summed = [g if self.reduce is None else summed_rows(g, self.gather) for g in layer_grads]
            return torch.stack([touched(g)[1].norm() for g in summed])
        stacked = torch.stack(layer_grads)
        if self.reduce is not None:
            self.reduce([stacked])
        return torch.linalg.vector_norm(stacked.reshape(n_tasks, -1), dim=1)

    def state_dict(self) -> dict:
        initial = None if self.initial is None else self.initial.clone()
        return {"weights": self.weights.detach().clone(), "initial": initial, "alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        restore(self.weights, state["weights"], "GradNorm's weights")
        self.initial = None if state["initial"] is None else state["initial"].to(self.weights.device)
        self.alpha = float(state["alpha"])
