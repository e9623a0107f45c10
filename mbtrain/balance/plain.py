"""The balancer interface, and the plain sum of task losses that every other strategy is measured against."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

import torch

from mbtrain.models.split import SplitForward

Reduce = Callable[[list[torch.Tensor]], None]  # sums a list of tensors across ranks in place


def restore(tensor: torch.Tensor, values: torch.Tensor, what: str) -> None:
    """Copy a checkpoint's `values` into a balancer's own learned tensor, refusing another shape."""
    if values.shape != tensor.shape:
        raise ValueError(f"the state holds {what} of shape {tuple(values.shape)}, expected {tuple(tensor.shape)}")
    with torch.no_grad():
        tensor.copy_(values)


def reduce_grads(params: Sequence[torch.Tensor], reduce: Reduce) -> None:
    """Sum the parameters' gradients across ranks (zeros where a rank's batch did not reach one)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    reduce([p.grad for p in params])


class Balancer(ABC):
    """Turns per-task losses into gradients; the fit loop calls ``backward`` then ``optimizer.step``.

    ``grad_norm_ratio`` is ``None`` or, after each ``backward``, a detached tensor ``[T]`` the fit loop
    averages per epoch for the history log (a tensor, so that reading it never forces a sync per step);
    ``norm_ratios`` likewise ``[T, G]`` over groups named by ``ratio_names``, for TensorBoard; ``task_weights``
    likewise ``[T]``, the weight each task's loss got in the last step (loss-level balancers).
    ``wants_split`` says whether the fit loop should run the model's ``split_forward`` and hand the
    result to ``backward`` (models/split.py), which only pays off for balancers needing per-task gradients;
    ``wants_losses_after_step`` whether it should score the batch again after the optimizer's step and hand
    the losses to ``after_step`` (FAMO).
    """

    grad_norm_ratio: torch.Tensor | None = None
    norm_ratios: torch.Tensor | None = None
    ratio_names: list[str] | None = None  # what norm_ratios' columns are, where not the shared parameters
    task_weights: torch.Tensor | None = None
    wants_split: bool = False
    wants_losses_after_step: bool = False

    def parameters(self) -> list[torch.Tensor]:
        """Learnable tensors of the balancer's own that the model's optimizer trains (none by default)."""
        return []

    def epoch_end(self, mean_losses: torch.Tensor) -> None:
        """Called after each epoch with its [T] mean training losses, the same on every rank (DWA)."""
        return None

    def after_step(self, losses: Sequence[torch.Tensor]) -> None:
        """Called after the optimizer's step with the batch's losses under the new parameters, no graph."""
        return None

    @abstractmethod
    def backward(self, losses: Sequence[torch.Tensor], split: SplitForward | None = None) -> None:
        """Accumulate gradients into ``.grad`` like ``Tensor.backward``; ``losses[0]`` is the main task."""

    @abstractmethod
    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this balancer."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""


class PlainSum(Balancer):
    """No balancing: ``sum(losses).backward()``; with `reduce` (distributed training) the gradients of
    `params` are then summed across ranks, so they must start at zero (or None) each step. Loss-level
    balancers (balance/loss_level.py) are this with another ``total``."""

    def __init__(self, params: Iterable[torch.Tensor] = (), reduce: Reduce | None = None) -> None:
        self.params = list(params)
        self.reduce = reduce

    def backward(self, losses: Sequence[torch.Tensor], split: SplitForward | None = None) -> None:
        if not losses:
            raise ValueError("backward needs at least one loss")
        if split is not None:
            raise ValueError("a loss-level balancer needs the model's ordinary forward, not its split forward")
        self.total(losses).backward()
        if self.reduce is not None:
            reduce_grads([*self.params, *self.parameters()], self.reduce)

    def total(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """The one loss to back-propagate."""
        return sum(losses)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Stateless: nothing to restore."""
