"""The balancer interface, and the plain sum of task losses that every other strategy is measured against."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from mbtrain.models.split import SplitForward


class Balancer(ABC):
    """Turns per-task losses into gradients; the fit loop calls ``backward`` then ``optimizer.step``.

    ``grad_norm_ratio`` is ``None`` or, after each ``backward``, a detached tensor ``[T]`` the fit loop
    averages per epoch for the history log (a tensor, so that reading it never forces a sync per step).
    ``wants_split`` says whether the fit loop should run the model's ``split_forward`` and hand the
    result to ``backward`` (models/split.py), which only pays off for balancers needing per-task gradients.
    """

    grad_norm_ratio: torch.Tensor | None = None
    wants_split: bool = False

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
    """No balancing: ``sum(losses).backward()``."""

    def backward(self, losses: Sequence[torch.Tensor], split: SplitForward | None = None) -> None:
        if not losses:
            raise ValueError("backward needs at least one loss")
        if split is not None:
            raise ValueError("the plain sum needs the model's ordinary forward, not its split forward")
        sum(losses).backward()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Stateless: nothing to restore."""
