"""Loss-level balancers: one weighted sum of the task losses and one backward (uncertainty, DWA, FAMO).

Each is PlainSum with another `total`. Under torchrun every weight comes from global quantities (the step's
losses summed across ranks, the epoch's global mean losses) and a term that does not scale with the rows is
split between the ranks, so N ranks at batch B take one process's step at batch N·B.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from mbtrain.balance.plain import PlainSum, Reduce, restore


class Uncertainty(PlainSum):
    """Kendall, Gal & Cipolla (CVPR 2018): a learned log-variance s_k per task, trained with the model;
    total = Σ_k ½·exp(−s_k)·L_k + ½·s_k, the form LibMTL and torch-rechub train. s starts at 0 (weights ½)."""

    def __init__(self, num_tasks: int, params: Iterable[torch.Tensor] = (), reduce: Reduce | None = None,
                 world_size: int = 1) -> None:
        super().__init__(params, reduce)
        device = self.params[0].device if self.params else None
        self.log_vars = torch.nn.Parameter(torch.zeros(num_tasks, device=device))
        self.world_size = world_size

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


class DWA(PlainSum):
    """Dynamic Weight Average, Liu, Johns & Davison (CVPR 2019): in epoch e, w_k = K·softmax_k(r_k / T) with
    r_k = L_k(e−1) / L_k(e−2), the ratio of the last two epochs' mean training losses; w = 1 in the first two."""

    def __init__(self, num_tasks: int, params: Iterable[torch.Tensor] = (), reduce: Reduce | None = None,
                 temperature: float = 2.0) -> None:
        super().__init__(params, reduce)
        self.num_tasks = num_tasks
        self.temperature = temperature
        self.device = self.params[0].device if self.params else None
        self.history: list[torch.Tensor] = []  # the last two epochs' mean losses [T], oldest first
        self._set_weights()

    def epoch_end(self, mean_losses: torch.Tensor) -> None:
        self.history = [*self.history, mean_losses.detach().to("cpu", torch.float64)][-2:]
        self._set_weights()

    def _set_weights(self) -> None:
        if len(self.history) < 2:
            weights = torch.ones(self.num_tasks, dtype=torch.float64)
        else:
            ratio = self.history[1] / self.history[0].clamp(min=1e-12)
            weights = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        self.weights = weights.to(self.device)  # once an epoch, not a copy to the device each step

    def total(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(losses))
        self.task_weights = self.weights.to(stacked.dtype)
        return (self.task_weights * stacked).sum()

    def state_dict(self) -> dict:
        return {"history": [losses.clone() for losses in self.history], "temperature": self.temperature}

    def load_state_dict(self, state: dict) -> None:
        history = [torch.as_tensor(losses, dtype=torch.float64) for losses in state["history"]]
        if len(history) > 2 or any(losses.shape != (self.num_tasks,) for losses in history):
            raise ValueError(f"DWA state does not hold up to two epochs of {self.num_tasks} task losses")
        self.history, self.temperature = history, float(state["temperature"])
        self._set_weights()


class FAMO(PlainSum):
    """Fast Adaptive Multitask Optimization, Liu et al. (NeurIPS 2023), O(1) per step.

    Task logits ξ give z = softmax(ξ); a step back-propagates Σ_k w_k·ℓ_k with w_k = z_k / (c·ℓ_k) and
    c = Σ_k z_k / ℓ_k (the gradient of Σ_k z_k·log ℓ_k / c: each task's log-loss, so no task's scale
    dominates). The losses ℓ' after the optimizer's step move ξ by Adam (lr `lr`, weight decay `decay`) along
    d = J_softmax(ξ)ᵀ (log ℓ − log ℓ'), which favours the tasks whose loss fell least. The reference code
    scores the same batch again for ℓ' (`same_batch`: one more forward, 1.3× the plain step on MMoE, in training
    mode as there: dropout draws anew and batch norm's statistics move twice); by default ℓ' is the next step's
    losses, on the next batch, which costs nothing but adds that batch's noise to log ℓ − log ℓ'. As the reference code:
    losses offset by 1e-8, their minima taken as 0."""

    EPS = 1e-8

    def __init__(self, num_tasks: int, params: Iterable[torch.Tensor] = (), reduce: Reduce | None = None,
                 lr: float = 0.025, decay: float = 0.01, same_batch: bool = False) -> None:
        super().__init__(params, reduce)
        device = self.params[0].device if self.params else None
        self.logits = torch.zeros(num_tasks, device=device, requires_grad=True)
        self.logit_optimizer = torch.optim.Adam([self.logits], lr=lr, weight_decay=decay)
        self.wants_losses_after_step = same_batch
        self.before: torch.Tensor | None = None  # the last step's global losses, not yet followed by an update

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
