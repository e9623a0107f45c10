"""Loss balancers: how per-task losses become gradients, kept apart from the model architectures."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from mbtrain.balance.metabalance import MetaBalance
from mbtrain.balance.plain import Balancer, PlainSum

BALANCERS = ("none", "metabalance")

__all__ = ["BALANCERS", "Balancer", "MetaBalance", "PlainSum", "build_balancer"]


def build_balancer(
    name: str,
    shared_params: Iterable[torch.Tensor],
    task_params: Iterable[torch.Tensor] | None,
    *,
    relax_factor: float = 0.7,
    beta: float = 0.9,
    strategy: str = "both",
    reduce: Callable[[list[torch.Tensor]], None] | None = None,
    gather: Callable[[list[torch.Tensor]], list[list[torch.Tensor]]] | None = None,
) -> Balancer:
    """The balancer called ``name`` (one of ``BALANCERS``) for a model's shared and task parameters; when
    training is distributed, ``reduce`` sums gradients across ranks in place and ``gather`` returns some
    tensors as every rank holds them (MetaBalance's embedding-table rows)."""
    shared_params = list(shared_params)
    task_params = None if task_params is None else list(task_params)
    if name == "none":
        return PlainSum([*shared_params, *(task_params or [])], reduce=reduce)
    if name == "metabalance":
        return MetaBalance(shared_params, relax_factor=relax_factor, beta=beta, strategy=strategy,
                           task_params=task_params, reduce=reduce, gather=gather)
    raise ValueError(f"unknown balance {name!r}: choose none or metabalance")
