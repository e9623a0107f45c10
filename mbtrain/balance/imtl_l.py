"""IMTL-L, the loss balance of Impartial Multi-Task Learning (Liu et al., ICLR 2021): a loss-level balancer,
PlainSum with another total.

Each task's loss L_k becomes e^{s_k}·L_k − s_k (the paper's eq. 6 with its defaults a = e, b = 1; LibMTL's
IMTL.py: loss_scale.exp()·losses − loss_scale), the scales s_k learned with the model by its optimizer (no weight
decay); s starts at 0, so the first step is the plain sum. At the optimum over s_k, e^{s_k}·L_k = 1: every
task's scaled loss is kept at the same level. The paper's full IMTL also balances the shared part's gradients
(IMTL-G, `--balance imtl`); the two are separate balancers here.

Under torchrun each rank's L_k is its share of the global batch's mean, so e^{s_k}·L_k's gradients sum across
ranks to one process's; the −s_k term, which does not scale with the rows, is split between the ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mbtrain.balance.base import Gather, Reduce, restore
from mbtrain.balance.plain import PlainSum
from mbtrain.balance.registry import Setup, register


@register("imtl-l")
class IMTLL(PlainSum):
    method = ("IMTL-L, Liu et al. (ICLR 2021): each loss scaled by a learned e^s, less s, trained with the model "
              "so that every scaled loss stays at one level")
    positive_weights = True  # a weight of 0 leaves e^s·0 − s: its scale runs off to +inf

    def __init__(self, num_tasks: int, params: Iterable[torch.Tensor] = (), reduce: Reduce | None = None,
                 world_size: int = 1, gather: Gather | None = None) -> None:
        super().__init__(params, reduce, gather)
        device = self.params[0].device if self.params else None
        self.log_scales = torch.nn.Parameter(torch.zeros(num_tasks, device=device))
        self.world_size = world_size

    @classmethod
    def build(cls, setup: Setup, settings: Any) -> IMTLL:
        return cls(setup.num_tasks, setup.every, reduce=setup.reduce, gather=setup.gather, world_size=setup.world_size)

    def parameters(self) -> list[torch.Tensor]:
        return [self.log_scales]

    def total(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        scales = torch.exp(self.log_scales)
        self.task_weights = scales.detach()
        # each rank adds its share of −s: the ranks' gradients then sum to one process's
        return (scales * torch.stack(list(losses))).sum() - self.log_scales.sum() / self.world_size

    def state_dict(self) -> dict:
        return {"log_scales": self.log_scales.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        restore(self.log_scales, state["log_scales"], "IMTL-L's loss scales")
