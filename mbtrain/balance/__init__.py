"""Loss balancers: how per-task losses become gradients, kept apart from the model architectures."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from mbtrain.balance.gradnorm import GradNorm
from mbtrain.balance.loss_level import DWA, FAMO, Uncertainty
from mbtrain.balance.metabalance import MetaBalance
from mbtrain.balance.multibalance import MultiBalance
from mbtrain.balance.pcgrad import PCGrad
from mbtrain.balance.plain import Balancer, PlainSum

BALANCERS = ("none", "metabalance", "multibalance", "pcgrad", "gradnorm", "uncertainty", "dwa", "famo")

__all__ = ["BALANCERS", "DWA", "FAMO", "Balancer", "GradNorm", "MetaBalance", "MultiBalance", "PCGrad",
           "PlainSum", "Uncertainty", "build_balancer"]


def build_balancer(
    name: str,
    shared_params: Iterable[torch.Tensor],
    task_params: Iterable[torch.Tensor] | None,
    *,
    num_tasks: int | None = None,
    relax_factor: float = 0.7,
    beta: float = 0.9,
    strategy: str = "both",
    temperature: float = 2.0,
    famo_lr: float = 0.025,
    famo_decay: float = 0.01,
    famo_same_batch: bool = False,
    gradnorm_alpha: float = 1.5,
    reduce: Callable[[list[torch.Tensor]], None] | None = None,
    gather: Callable[[list[torch.Tensor]], list[list[torch.Tensor]]] | None = None,
    world_size: int = 1,
    seed: int = 0,
    segments: list[torch.Tensor | None] | None = None,
    shared_names: list[str] | None = None,
) -> Balancer:
    """The balancer called ``name`` (one of ``BALANCERS``) for a model's shared and task parameters and
    ``num_tasks`` losses; when training is distributed, ``reduce`` sums tensors across ranks in place,
    ``gather`` returns some tensors as every rank holds them (MetaBalance's embedding-table rows) and
    ``world_size`` says how many ranks there are; ``seed`` seeds PCGrad's task orders; ``segments`` (the
    model's shared_segments()) makes MetaBalance's norms per logical tensor, named after ``shared_names``."""
    shared_params = list(shared_params)
    task_params = None if task_params is None else list(task_params)
    everything = [*shared_params, *(task_params or [])]
    if name == "metabalance":
        return MetaBalance(shared_params, relax_factor=relax_factor, beta=beta, strategy=strategy,
                           task_params=task_params, reduce=reduce, gather=gather, segments=segments,
                           names=shared_names)
    if name == "pcgrad":
        return PCGrad(shared_params, task_params, seed=seed, reduce=reduce, gather=gather)
    if name == "multibalance":
        return MultiBalance(everything, task_params or [], relax_factor=relax_factor, beta=beta, strategy=strategy,
                            reduce=reduce)
    if name == "none":
        return PlainSum(everything, reduce=reduce)
    if num_tasks is None:
        raise ValueError(f"the {name} balancer needs num_tasks")
    if name == "gradnorm":
        return GradNorm(num_tasks, everything, task_params or [], alpha=gradnorm_alpha, reduce=reduce)
    if name == "uncertainty":
        return Uncertainty(num_tasks, everything, reduce=reduce, world_size=world_size)
    if name == "dwa":
        return DWA(num_tasks, everything, reduce=reduce, temperature=temperature)
    if name == "famo":
        return FAMO(num_tasks, everything, reduce=reduce, lr=famo_lr, decay=famo_decay, same_batch=famo_same_batch)
    raise ValueError(f"unknown balance {name!r}: choose one of {', '.join(BALANCERS)}")
