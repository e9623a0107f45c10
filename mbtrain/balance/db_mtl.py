"""DB-MTL (Lin et al., 2023, "Dual-Balancing for Multi-Task Learning"): each task's gradient of its log-loss,
averaged over the steps, every average then scaled to the largest one's norm.

At step t (counted from 1), with L_k task k's loss on the batch (under torchrun summed across ranks: the global
batch's mean) and ∇ the gradient of the shared parameters (summed across ranks), as LibMTL's DB_MTL.py:

    g_k = ∇ log(L_k + 1e-8) = ∇L_k / (L_k + 1e-8)
    m_k ← g_k + (β / t^σ)·(m_k − g_k)          m_k = 0 before the first step
    α_k = max_j ‖m_j‖ / (‖m_k‖ + 1e-8)

and the shared parameters get Σ_k α_k·m_k, each m_k over every shared tensor as one vector. Every other
parameter gets the gradient of Σ_k log(L_k + 1e-8), as LibMTL's backward of the log-losses gives the heads:
each loss is divided by its global value (no graph) before the per-task machinery (balance/per_task.py)
sees it, so the gradients it hands on are already the log-losses'. Defaults: LibMTL's config (--DB_beta 0.9,
--DB_beta_sigma 0: a plain moving average with factor 0.9).

The moving average is of the gradients themselves: a buffer per task shaped like the shared parameters (as an
optimizer's state), so the method works at the parameters level only; the trunk's outputs are other rows
every batch. The embedding table: on the split path (models/split.py) a task's gradient arrives for the
batch's rows only, while every row's average decays. This takes that path and handles the rows itself rather
than asking for the full backward (whole-table gradients per task, all-reduced table-sized per task under
torchrun): the buffers decay whole, the batch's rows are added at their positions, and the combination, which
is non-zero on every row the average has seen, is added to the table's ``.grad`` directly (its RowGradient
sink is left empty). The same sums as the full backward's, with the per-task gradients and their exchange
across ranks kept batch-sized; the decay of every row per task and step is the method's own cost either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mbtrain.balance.base import Gather, Reduce
from mbtrain.balance.per_task import PARAMETERS, PerTaskGradients, RowGradient, Sinks, accumulate
from mbtrain.balance.registry import Setup, register
from mbtrain.checks import in_unit_interval, non_negative
from mbtrain.models.split import SplitForward
from mbtrain.space import Range, tuned

EPS = 1e-8  # LibMTL's, inside the log and under the norms' ratio


@dataclass(frozen=True)
class DBMTLSettings:
    db_mtl_beta: float = tuned(0.9, Range(0.5, 0.99))  # β: the moving averages' factor (LibMTL's --DB_beta)
    # σ: the factor at step t is β / t^σ (LibMTL's --DB_beta_sigma)
    db_mtl_beta_sigma: float = tuned(0.0, Range(0.0, 1.0))

    def __post_init__(self) -> None:
        in_unit_interval("--db-mtl-beta", self.db_mtl_beta)
        non_negative("--db-mtl-beta-sigma", self.db_mtl_beta_sigma)


@register("db-mtl")
class DBMTL(PerTaskGradients):
    method = ("DB-MTL, Lin et al. (2023): each task's gradient of its log-loss, averaged over steps and scaled to "
              "the largest average's norm")
    settings_class = DBMTLSettings
    levels = (PARAMETERS,)
    task_weights_ignored = "which takes the gradient of each task's log-loss (a constant factor on a loss cancels)"

    def __init__(self, shared_params: Iterable[torch.Tensor], task_params: Iterable[torch.Tensor] | None = None,
                 factor: float = 0.9, sigma: float = 0.0, reduce: Reduce | None = None,
                 gather: Gather | None = None, level: str = PARAMETERS) -> None:
        DBMTLSettings(factor, sigma)
        if level != PARAMETERS:
            raise ValueError(f"DB-MTL works at the {PARAMETERS} level only, not {level!r}: its moving averages of "
                             "the tasks' gradients need the same tensors every step, and the trunk's outputs are "
                             "other rows every batch")
        super().__init__(shared_params, task_params, reduce, gather, level)
        self.factor = factor  # β
        self.sigma = sigma
        self.step = 0
        self.buffers: list[list[torch.Tensor]] | None = None  # [T][shared] the moving averages m_k

    @classmethod
    def build(cls, setup: Setup, settings: DBMTLSettings) -> DBMTL:
        return cls(setup.shared, setup.task, settings.db_mtl_beta, settings.db_mtl_beta_sigma, setup.reduce,
                   setup.gather, setup.level)

    def backward(self, losses: Sequence[torch.Tensor], split: SplitForward | None = None) -> None:
        """Each loss over its global value (no graph): every gradient from here on is its log-loss's."""
        self.check_losses(losses)
        values = torch.stack([loss.detach() for loss in losses])
        if self.reduce is not None:
            self.reduce([values])
        super().backward([loss / (value + EPS) for loss, value in zip(losses, values.unbind(), strict=True)],
                         split)

    def combine(self, sinks: Sinks, task_grads: list[list[torch.Tensor | None]]) -> None:
        """Update the moving averages with the log-losses' gradients, then add Σ_k α_k·m_k to the shared
        parameters' ``.grad`` (sinks[i] stands for self.shared[i]; the table's whole, not its rows)."""
        buffers = self._buffers(len(task_grads))
        self.step += 1
        keep = self.factor / self.step ** self.sigma
        for buffer, grads in zip(buffers, task_grads, strict=True):
            torch._foreach_mul_(buffer, keep)
            for average, sink, grad in zip(buffer, sinks, grads, strict=True):
                if grad is None:  # the task does not reach it: a zero gradient, the average only decays
                    continue
                rows = sink.rows if isinstance(sink, RowGradient) else None
                if rows is None:
                    average.add_(grad, alpha=1 - keep)
                else:  # distinct rows: one addition each
                    average.index_add_(0, rows, grad, alpha=1 - keep)
        norms = torch.stack([torch.stack(torch._foreach_norm(buffer)).norm() for buffer in buffers])  # ‖m_k‖
        alpha = norms.max() / (norms + EPS)
        for k, buffer in enumerate(buffers):
            accumulate(self.shared, buffer, [alpha[k]] * len(buffer))
        self.task_weights = alpha.detach()
        self.grad_norm_ratio = norms / norms[0].clamp(min=torch.finfo(norms.dtype).tiny)

    def _buffers(self, n_tasks: int) -> list[list[torch.Tensor]]:
        if self.buffers is None:
            self.buffers = [[torch.zeros_like(p) for p in self.shared] for _ in range(n_tasks)]
        elif len(self.buffers) != n_tasks:
            raise ValueError(f"DB-MTL state is for {len(self.buffers)} losses, got {n_tasks}")
        return self.buffers

    def state_dict(self) -> dict:
        buffers = None if self.buffers is None else [[b.detach().clone() for b in task] for task in self.buffers]
        return {"step": self.step, "buffers": buffers}

    def load_state_dict(self, state: dict) -> None:
        buffers = state["buffers"]
        if buffers is not None:
            shapes = [tuple(p.shape) for p in self.shared]
            if len(buffers) < 2 or any([tuple(b.shape) for b in task] != shapes for task in buffers):
                raise ValueError(f"DB-MTL state holds moving averages of other shapes than the shared parameters' "
                                 f"{shapes}")
            buffers = [[b.detach().to(device=p.device, dtype=p.dtype, copy=True) for b, p in
                        zip(task, self.shared, strict=True)] for task in buffers]
        self.step = int(state["step"])
        self.buffers = buffers
