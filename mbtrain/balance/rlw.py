"""Random Loss Weighting (Lin et al., TMLR 2022, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning"): a loss-level balancer, PlainSum with another total.

Every step draws z ~ N(0, I) (LibMTL's RLW.py and the Aligned-MTL authors' rlw/balancer.py: the normal, the
paper's default of its distributions) and back-propagates Σ_k w_k·L_k with w = T·softmax(z).

Scale: LibMTL's weights are softmax(z), summing to 1; here they sum to T, as the plain sum's unit weights do (and
DWA's T·softmax), so that a run's --lr and --weight-decay (Adam's L2 term, which a smaller loss makes relatively
stronger) mean what they mean with `--balance none`. The factor T is constant; without weight decay Adam all but
ignores it.

The draws come from a generator on the CPU seeded by --seed, the same on every rank under torchrun (the weights
are then global, so N ranks take one process's step), and its state resumes with the run. The weights reach the
losses as Python numbers: no copy to the device, no host sync.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mbtrain.balance.base import Gather, Reduce
from mbtrain.balance.plain import PlainSum
from mbtrain.balance.registry import Setup, register


@register("rlw")
class RLW(PlainSum):
    method = ("random loss weighting, Lin et al. (TMLR 2022): weights T·softmax(z), z ~ N(0, I) drawn every step, "
              "seeded by --seed")

    def __init__(self, num_tasks: int, params: Iterable[torch.Tensor] = (), reduce: Reduce | None = None,
                 seed: int = 0, gather: Gather | None = None) -> None:
        super().__init__(params, reduce, gather)
        self.num_tasks = num_tasks
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU, the same draws on every device

    @classmethod
    def build(cls, setup: Setup, settings: Any) -> RLW:
        return cls(setup.num_tasks, setup.every, reduce=setup.reduce, gather=setup.gather, seed=setup.seed)

    def draw(self) -> torch.Tensor:
        """[T] the next step's weights, on the CPU."""
        return self.num_tasks * torch.softmax(torch.randn(self.num_tasks, generator=self.generator), dim=0)

    def total(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(losses) != self.num_tasks:
            raise ValueError(f"RLW was built for {self.num_tasks} tasks, got {len(losses)} losses")
        self.task_weights = self.draw()
        return sum(w * loss for w, loss in zip(self.task_weights.tolist(), losses, strict=True))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
