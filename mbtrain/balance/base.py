"""The balancer interface, and the helpers the balancers share for distributed training and resuming."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from mbtrain.models.split import SplitForward
from mbtrain.table import is_table, sum_across_ranks

if TYPE_CHECKING:
    from mbtrain.balance.registry import Setup

Reduce = Callable[[list[torch.Tensor]], None]  # sums a list of tensors across ranks in place
Gather = Callable[[list[torch.Tensor]], list[list[torch.Tensor]]]  # each tensor as every rank holds it


def restore(tensor: torch.Tensor, values: torch.Tensor, what: str) -> None:
    """Copy a checkpoint's `values` into a balancer's own learned tensor, refusing another shape."""
    if values.shape != tensor.shape:
        raise ValueError(f"the state holds {what} of shape {tuple(values.shape)}, expected {tuple(tensor.shape)}")
    with torch.no_grad():
        tensor.copy_(values)


def reduce_grads(params: Sequence[torch.Tensor], reduce: Reduce, gather: Gather | None = None) -> None:
    """Sum the parameters' gradients across ranks (zeros where a rank's batch did not reach one): the dense ones
    in one all-reduce, an embedding table's as its touched rows (table.py, through `gather`)."""
    tables = [p for p in params if is_table(p)]
    dense = [p for p in params if not is_table(p)]
    for p in dense:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    reduce([p.grad for p in dense])
    if tables:
        if gather is None:
            raise ValueError("summing an embedding table's rows across ranks needs gather")
        sum_across_ranks(tables, gather)


class NoSettings:
    """The settings of a balancer that has none."""


class Balancer(ABC):
    """Turns per-task losses into gradients; the fit loop calls ``backward`` then ``optimizer.step``.

    What the registry (balance/registry.py) reads of a balancer's class: ``method`` (one line for the docs'
    table), ``settings_class`` (a dataclass whose fields are its flags and TOML keys, with the papers' defaults,
    checked in its ``__post_init__``), ``build`` (the balancer from a Setup and those settings), ``min_tasks``,
    ``positive_weights`` (whether a --task-weights of 0 breaks it), ``task_weights_ignored`` and ``levels`` (where
it combines the tasks' gradients: the shared parameters, the trunk's outputs; balance/per_task.py).

    ``grad_norm_ratio`` is ``None`` or, after each ``backward``, a detached tensor ``[T]`` the fit loop
    averages per epoch for the history log (a tensor, so that reading it never forces a sync per step);
    ``norm_ratios`` likewise ``[T, G]`` over groups named by ``ratio_names``, for TensorBoard; ``task_weights``
    likewise ``[T]``, the weight each task's loss got in the last step (loss-level balancers).
    ``wants_split`` says whether the fit loop should run the model's ``split_forward`` and hand the
    result to ``backward`` (models/split.py), which only pays off for balancers needing per-task gradients;
    ``wants_losses_after_step`` whether it should score the batch again after the optimizer's step and hand
    the losses to ``after_step`` (FAMO).
    """

    method: ClassVar[str] = ""
    settings_class: ClassVar[type] = NoSettings
    min_tasks: ClassVar[int] = 1
    positive_weights: ClassVar[bool] = False
    task_weights_ignored: ClassVar[str] = ""  # why --task-weights has no effect on it, where it has none
    levels: ClassVar[tuple[str, ...]] = ()  # the --balance-level values it takes; none: it weighs the losses

    grad_norm_ratio: torch.Tensor | None = None
    norm_ratios: torch.Tensor | None = None
    ratio_names: list[str] | None = None  # what norm_ratios' columns are, where not the shared parameters
    task_weights: torch.Tensor | None = None
    wants_split: bool = False
    wants_losses_after_step: bool = False
    batched: bool = False  # per-task backward passes as one, stacked over the tasks (--task-backward batched)

    @classmethod
    def build(cls, setup: Setup, settings: Any) -> Balancer:
        """This balancer for a model's parameters and tasks (`setup`) with its own `settings`: what a registered
        balancer must define (register() checks)."""
        raise NotImplementedError(f"{cls.__name__} defines no build()")

    def parameters(self) -> list[torch.Tensor]:
        """Learnable tensors of the balancer's own that the model's optimizer trains (none by default)."""
        return []

    def epoch_end(self, mean_losses: torch.Tensor) -> None:
        """Called after each epoch with its [T] mean training losses, the same on every rank (DWA)."""
        return None

    def after_step(self, losses: Sequence[torch.Tensor]) -> None:
        """Called after the optimizer's step with the batch's losses under the new parameters, no graph."""
        return None

    @classmethod
    def check_level(cls, level: str) -> None:
        """Refuse a --balance-level the balancer does not take."""
        if level not in cls.levels:
            raise ValueError(f"{cls.__name__} works at the {' or '.join(cls.levels)} level, not {level!r}")

    def check_losses(self, losses: Sequence[torch.Tensor]) -> None:
        """Refuse fewer losses than ``min_tasks``."""
        needed = max(1, self.min_tasks)
        if len(losses) < needed:
            raise ValueError(f"{type(self).__name__} needs {needed} or more losses (main task first), got "
                             f"{len(losses)}")

    @abstractmethod
    def backward(self, losses: Sequence[torch.Tensor], split: SplitForward | None = None) -> None:
        """Accumulate gradients into ``.grad`` like ``Tensor.backward``; ``losses[0]`` is the main task."""

    @abstractmethod
    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this balancer."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
