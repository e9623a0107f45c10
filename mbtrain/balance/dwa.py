"""Dynamic Weight Average: a loss-level balancer, PlainSum with another total.

Under torchrun every weight comes from global quantities (the step's losses summed across ranks, the epoch's
global mean losses) and a term that does not scale with the rows is split between the ranks, so N ranks at batch
B take one process's step at batch N·B.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from mbtrain.balance.base import Gather, Reduce
from mbtrain.balance.plain import PlainSum
from mbtrain.balance.registry import Setup, register
from mbtrain.checks import positive
from mbtrain.space import Range, tuned


@dataclass(frozen=True)
class DWASettings:
    # T: the softmax's temperature over the tasks' loss ratios
    temperature: float = tuned(2.0, Range(0.5, 10.0, log=True))

    def __post_init__(self) -> None:
        positive("--temperature", self.temperature)


@register("dwa")
class DWA(PlainSum):
    """Dynamic Weight Average, Liu, Johns & Davison (CVPR 2019): in epoch e, w_k = K·softmax_k(r_k / T) with
    r_k = L_k(e−1) / L_k(e−2), the ratio of the last two epochs' mean training losses; w = 1 in the first two."""

    method = ("Dynamic Weight Average, Liu, Johns & Davison (CVPR 2019): weights from the ratio of the last two "
              "epochs' mean losses")
    settings_class = DWASettings

    def __init__(self, num_tasks: int, params: Iterable[torch.Tensor] = (), reduce: Reduce | None = None,
                 temperature: float = 2.0, gather: Gather | None = None) -> None:
        super().__init__(params, reduce, gather)
        self.num_tasks = num_tasks
        self.temperature = temperature
        self.device = self.params[0].device if self.params else None
        self.history: list[torch.Tensor] = []  # the last two epochs' mean losses [T], oldest first
        self._set_weights()

    @classmethod
    def build(cls, setup: Setup, settings: DWASettings) -> DWA:
        return cls(setup.num_tasks, setup.every, reduce=setup.reduce, gather=setup.gather,
                   temperature=settings.temperature)

    def epoch_end(self, mean_losses: torch.Tensor) -> None:
        self.history = [*self.history, mean_losses.detach().to("cpu", torch.float64)][-2:]
        self._set_weights()

    def _set_weights(self) -> None:
        if len(self.history) < 2:
            weights = torch.ones(self.num_tasks, dtype=torch.float64)
        else:
            ratio = self.history[1] / self.history[0].clamp(min=1e-12)
            weights = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        self.weights = weights.to(self.device)  # once an epoch, not a copy to the device each step

    def total(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(losses))
        self.task_weights = self.weights.to(stacked.dtype)
        return (self.task_weights * stacked).sum()

    def state_dict(self) -> dict:
        return {"history": [losses.clone() for losses in self.history], "temperature": self.temperature}

    def load_state_dict(self, state: dict) -> None:
        history = [torch.as_tensor(losses, dtype=torch.float64) for losses in state["history"]]
        if len(history) > 2 or any(losses.shape != (self.num_tasks,) for losses in history):
            raise ValueError(f"DWA state does not hold up to two epochs of {self.num_tasks} task losses")
        self.history, self.temperature = history, float(state["temperature"])
        self._set_weights()
