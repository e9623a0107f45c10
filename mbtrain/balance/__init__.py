"""Loss balancers: how per-task losses become gradients, kept apart from the model architectures."""

from __future__ import annotations

from collections.abc import Iterable

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
) -> Balancer:
    """The balancer called ``name`` (one of ``BALANCERS``) for a model's shared and task parameters."""
    if name == "none":
        return PlainSum()
    if name == "metabalance":
        return MetaBalance(
            shared_params, relax_factor=relax_factor, beta=beta, strategy=strategy, task_params=task_params
        )
    raise ValueError(f"unknown balance {name!r}: choose none or metabalance")
