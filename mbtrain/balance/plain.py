"""The plain sum of task losses that every other strategy is measured against (`--balance none`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mbtrain.balance.base import Balancer, Gather, Reduce, reduce_grads
from mbtrain.balance.registry import Setup, register
from mbtrain.models.split import SplitForward


@register("none")
class PlainSum(Balancer):
    """No balancing: ``sum(losses).backward()``; with `reduce` and `gather` (distributed training) the gradients
    of `params` are then summed across ranks, so they must start at zero (or None) each step. Loss-level
    balancers (uncertainty, DWA, FAMO, IMTL-L, RLW) are this with another ``total``."""

    method = "the plain sum of the (--task-weights weighted) losses"

    def __init__(self, params: Iterable[torch.Tensor] = (), reduce: Reduce | None = None,
                 gather: Gather | None = None) -> None:
        self.params = list(params)
        self.reduce = reduce
        self.gather = gather  # an embedding table's touched rows from every rank (table.py)

    @classmethod
    def build(cls, setup: Setup, settings: Any) -> PlainSum:
        return cls(setup.every, reduce=setup.reduce, gather=setup.gather)

    def backward(self, losses: Sequence[torch.Tensor], split: SplitForward | None = None) -> None:
        self.check_losses(losses)
        if split is not None:
            raise ValueError("a loss-level balancer needs the model's ordinary forward, not its split forward")
        self.total(losses).backward()
        if self.reduce is not None:
            reduce_grads([*self.params, *self.parameters()], self.reduce, self.gather)

    def total(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """The one loss to back-propagate."""
        return sum(losses)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Stateless: nothing to restore."""
