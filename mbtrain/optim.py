"""The optimizers: fused Adam for every dense parameter, and a table optimizer (--table-optimizer) for the
embedding table, whose gradient is the rows the batch touched (mbtrain/table.py).

- ``adam``: the table in the dense Adam beside the rest, its gradient made dense first: every row's moments
  decay and every row moves each step, as before table optimizers existed. A full-table pass per step.
- ``lazy-adam``: Adam's moments and step on the touched rows only (TensorFlow Addons' LazyAdam); the bias
  correction counts the table's steps. Same state as Adam, a step's cost follows the batch.
- ``rowwise-adagrad``: one accumulator per row, the mean of the row's squared gradient summed over the steps
  (FBGEMM's and TorchRec's row-wise Adagrad): 1/dim of Adam's state, a step's cost follows the batch.

Each is a ``torch.optim.Optimizer`` (state in ``self.state``), so its state is checkpointed and resumed as
the dense optimizer's is; ``TrainOptimizer`` holds the two and sets both rates each step. The rows are read with
``index_select`` and written with ``index_copy_`` / an accumulating ``index_put_``: on the CPU several times
cheaper than advanced indexing and ``index_add_`` (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from mbtrain.table import dense_of, is_table, touched

ADAM, LAZY_ADAM, ROWWISE_ADAGRAD = "adam", "lazy-adam", "rowwise-adagrad"
TABLE_OPTIMIZERS = (ADAM, LAZY_ADAM, ROWWISE_ADAGRAD)
BETAS = (0.9, 0.999)  # torch.optim.Adam's, for the dense parameters and lazy-adam's rows alike
ADAM_EPS = 1e-8
ADAGRAD_EPS = 1e-8


class RowOptimizer(torch.optim.Optimizer):
    """A table optimizer: each step reads each table's touched rows (table.touched), adds weight decay (Adam's L2
    term) to their gradients only, and hands them to ``update``, which moves those rows and their state alone."""

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grad = touched(p.grad)
                if group["weight_decay"]:
                    grad = grad.add(p.index_select(0, rows), alpha=group["weight_decay"])
                self.update(p, rows, grad, group, self.state[p])

    def update(self, table: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict[str, Any],
               state: dict[str, Any]) -> None:
        """Move `rows` of `table` by their summed gradient `grad`, keeping `state` (empty at the first step)."""
        raise NotImplementedError


class LazyAdam(RowOptimizer):
    """Adam on the rows a step touched: their moments and weights move, every other row stays as it was. The state
    ``moments`` [2, rows, ...] holds the first and the second moments, gathered and scattered together."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = BETAS,
                 eps: float = ADAM_EPS, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def update(self, table: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict[str, Any],
               state: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        if not state:  # both moments in one tensor: one gather and one scatter a step
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["moments"] = table.new_zeros(2, *table.shape)
        state["step"] += 1
        step = float(state["step"])
        moments = state["moments"].index_select(1, rows)
        exp_avg, exp_avg_sq = moments.unbind(0)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        state["moments"].index_copy_(1, rows, moments)
        denominator = exp_avg_sq.sqrt_().div_(math.sqrt(1 - beta2**step)).add_(group["eps"])
        step_size = -group["lr"] / (1 - beta1**step)
        table.index_put_((rows,), exp_avg.div_(denominator).mul_(step_size), accumulate=True)


class RowwiseAdagrad(RowOptimizer):
    """Adagrad with one accumulator per row: a touched row's accumulator grows by the mean of its squared
    gradient, and the row moves by lr·g / (√accumulator + eps)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-2, eps: float = ADAGRAD_EPS,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    def update(self, table: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, group: dict[str, Any],
               state: dict[str, Any]) -> None:
        if not state:
            state["sum"] = table.new_zeros(table.shape[0])
        accumulated = state["sum"].index_select(0, rows).add_(grad.square().mean(dim=1))
        state["sum"].index_copy_(0, rows, accumulated)
        factor = accumulated.sqrt_().add_(group["eps"]).reciprocal_().mul_(-group["lr"])
        table.index_put_((rows,), grad * factor.unsqueeze(1), accumulate=True)


TABLE_OPTIMIZER_CLASSES: dict[str, type[RowOptimizer]] = {
    LAZY_ADAM: LazyAdam,
    ROWWISE_ADAGRAD: RowwiseAdagrad,
}


def state_floats_per_row(name: str, dim: int) -> int:
    """The table optimizer's state per row of the table, in floats: Adam's two moments, or one accumulator."""
    return 1 if name == ROWWISE_ADAGRAD else 2 * dim


class TrainOptimizer:
    """Fused Adam over the dense parameters (and, with ``adam``, the table made dense) beside the table
    optimizer over the embedding tables. ``set_lr`` gives both their rate each step: the dense rate, and the
    table's scaled by ``table_scale`` (--table-lr over the peak rate), so the table follows the same schedule."""

    def __init__(self, params: Iterable[torch.Tensor], table_optimizer: str, lr: float, weight_decay: float,
                 table_scale: float = 1.0, balancer_params: Iterable[torch.Tensor] = ()) -> None:
        if table_optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"unknown table optimizer {table_optimizer!r}: choose {', '.join(TABLE_OPTIMIZERS)}")
        params = list(params)
        self.table_optimizer = table_optimizer
        self.table_scale = table_scale
        lazy = table_optimizer != ADAM
        self.tables = [p for p in params if is_table(p)]
        dense = [p for p in params if not (lazy and is_table(p))]
        groups: list[dict[str, Any]] = [{"params": dense}]
        extra = list(balancer_params)
        if extra:  # a balancer's own parameters (log-variances, task weights): decay would pull them to 0
            groups.append({"params": extra, "weight_decay": 0.0})
        self.dense = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=True)
        self.table = (TABLE_OPTIMIZER_CLASSES[table_optimizer](self.tables, lr=lr * table_scale,
                                                               weight_decay=weight_decay)
                      if lazy and self.tables else None)

    def zero_grad(self) -> None:
        self.dense.zero_grad(set_to_none=True)
        if self.table is not None:
            self.table.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.dense.param_groups:
            group["lr"] = lr
        if self.table is not None:
            for group in self.table.param_groups:
                group["lr"] = lr * self.table_scale

    def step(self) -> None:
        if self.table is None:
            dense_of(self.tables)  # dense Adam: the whole table moves
        else:
            self.table.step()
        self.dense.step()

    def state_dict(self) -> dict[str, Any]:
        """With ``adam`` the dense Adam's state as it is (the layout of runs before table optimizers); else
        both."""
        if self.table is None:
            return self.dense.state_dict()
        return {"dense": self.dense.state_dict(), "table": self.table.state_dict(),
                "table_optimizer": self.table_optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.table is None:
            if "table_optimizer" in state:
                raise ValueError(f"the state is of --table-optimizer {state['table_optimizer']}, not adam")
            self.dense.load_state_dict(state)
            return
        if state.get("table_optimizer") != self.table_optimizer:
            raise ValueError(f"the state is of --table-optimizer {state.get('table_optimizer', ADAM)}, not "
                             f"{self.table_optimizer}")
        self.dense.load_state_dict(state["dense"])
        self.table.load_state_dict(state["table"])
