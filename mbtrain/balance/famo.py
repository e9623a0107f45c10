"""FAMO: a loss-level balancer, PlainSum with another total.

Under torchrun every weight comes from global quantities (the step's losses summed across ranks, the epoch's
global mean losses) and a term that does not scale with the rows is split between the ranks, so N ranks at batch
B take one process's step at batch N·B.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mbtrain.balance.base import Gather, Reduce, restore
from mbtrain.balance.plain import PlainSum
from mbtrain.balance.registry import Setup, register
from mbtrain.checks import non_negative, positive
from mbtrain.space import Range, tuned


@dataclass(frozen=True)
class FAMOSettings:
    famo_lr: float = tuned(0.025, Range(0.001, 0.1, log=True))  # the learning rate of its task logits
    famo_decay: float = tuned(0.01, Range(0.0001, 0.1, log=True))  # the weight decay (gamma) on its task logits
    famo_same_batch: bool = False  # update from the same batch scored again (the reference code), not the next

    def __post_init__(self) -> None:
        positive("--famo-lr", self.famo_lr)
        non_negative("--famo-decay", self.famo_decay)


@register("famo")
class FAMO(PlainSum):
    """Fast Adaptive Multitask Optimization, Liu et al. (NeurIPS 2023), O(1) per step.

    Task logits ξ give z = softmax(ξ); a step back-propagates Σ_k w_k·ℓ_k with w_k = z_k / (c·ℓ_k) and
    c = Σ_k z_k / ℓ_k (the gradient of Σ_k z_k·log ℓ_k / c: each task's log-loss, so no task's scale
    dominates). The losses ℓ' after the optimizer's step move ξ by Adam (lr `lr`, weight decay `decay`) along
    d = J_softmax(ξ)ᵀ (log ℓ − log ℓ'), which favours the tasks whose loss fell least. The reference code
    scores the same batch again for ℓ' (`same_batch`: one more forward, its cost in docs/benchmarks.md; in training
    mode as there: dropout draws anew and batch norm's statistics move twice); by default ℓ' is the next step's
    losses, on the next batch, which costs nothing but adds that batch's noise to log ℓ − log ℓ'. As the reference code:
    losses offset by 1e-8, their minima taken as 0."""

    method = ("FAMO, Liu et al. (NeurIPS 2023): task weights on the log-losses, moved toward the tasks whose loss "
              "fell least; O(1) per step")
    settings_class = FAMOSettings
    positive_weights = True  # it weighs log-losses: log(0)
    task_weights_ignored = "which weighs each task's log-loss (a constant factor on a loss cancels)"
    EPS = 1e-8

    def __init__(self, num_tasks: int, params: Iterable[torch.Tensor] = (), reduce: Reduce | None = None,
                 lr: float = 0.025, decay: float = 0.01, same_batch: bool = False,
                 gather: Gather | None = None) -> None:
        super().__init__(params, reduce, gather)
        device = self.params[0].device if self.params else None
        self.logits = torch.zeros(num_tasks, device=device, requires_grad=True)
        self.logit_optimizer = torch.optim.Adam([self.logits], lr=lr, weight_decay=decay)
        self.wants_losses_after_step = same_batch
        self.before: torch.Tensor | None = None  # the last step's global losses, not yet followed by an update

    @classmethod
    def build(cls, setup: Setup, settings: FAMOSettings) -> FAMO:
        return cls(setup.num_tasks, setup.every, reduce=setup.reduce, gather=setup.gather, lr=settings.famo_lr,
                   decay=settings.famo_decay, same_batch=settings.famo_same_batch)

    def _global(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """The losses summed across ranks (each rank's is its share of the global batch's mean), plus EPS."""
        values = torch.stack([loss.detach() for loss in losses])
        if self.reduce is not None:
            self.reduce([values])
        return values + self.EPS

    def total(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        current = self._global(losses)
        if self.before is not None:  # the next-batch update: these are the losses after the last step
            self._update(current)
        self.before = current
        z = torch.softmax(self.logits.detach(), dim=0)
        weights = z / ((z / current).sum() * current)
        self.task_weights = weights
        return (weights * torch.stack(list(losses))).sum()

    def after_step(self, losses: Sequence[torch.Tensor]) -> None:
        if self.before is None:
            raise ValueError("FAMO's after_step needs the step's backward first")
        self._update(self._global(losses))

    def _update(self, after: torch.Tensor) -> None:
        delta = self.before.log() - after.log()
        self.before = None
        z = torch.softmax(self.logits.detach(), dim=0)
        self.logits.grad = z * (delta - (z * delta).sum())  # J_softmax(ξ)ᵀ δ, without autograd
        self.logit_optimizer.step()

    def state_dict(self) -> dict:
        before = None if self.before is None else self.before.clone()
        return {"logits": self.logits.detach().clone(), "optimizer": self.logit_optimizer.state_dict(),
                "before": before}

    def load_state_dict(self, state: dict) -> None:
        restore(self.logits, state["logits"], "FAMO's task logits")
        self.logit_optimizer.load_state_dict(state["optimizer"])
        self.before = None if state["before"] is None else state["before"].to(self.logits.device)
