"""The balancer interface, and the plain sum of task losses that every other strategy is measured against."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch


class Balancer(ABC):
    """Turns per-task losses into gradients; the fit loop calls ``backward`` then ``optimizer.step``.

    ``grad_norm_ratio`` is ``None`` or, after each ``backward``, a detached tensor ``[T]`` the fit loop
    averages per epoch for the history log (kept on device: reading it would force a host sync per step).
    """

    grad_norm_ratio: torch.Tensor | None = None

    @abstractmethod
    def backward(self, losses: Sequence[torch.Tensor]) -> None:
        """Accumulate gradients into ``.grad`` like ``Tensor.backward``; ``losses[0]`` is the main task."""

    @abstractmethod
    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this balancer."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""


class PlainSum(Balancer):
    """No balancing: ``sum(losses).backward()``."""

    def backward(self, losses: Sequence[torch.Tensor]) -> None:
        if not losses:
            raise ValueError("backward needs at least one loss")
        sum(losses).backward()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Stateless: nothing to restore."""
