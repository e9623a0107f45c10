"""ESMM's entire-space funnel (Ma et al., SIGIR 2018) over any model's towers.

The tasks form a funnel (click → cart → purchase: each implies the one before it). Each tower's logit is the
conditional probability of its stage given the one before (P(cart | click)); each task's probability over
every impression is the product down the funnel, P(purchase) = P(click) · P(cart | click) · P(purchase | cart),
so the predictions never break the funnel and every task trains on every impression with its own label.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TINY = 1.1754943508222875e-38  # float32's smallest normal number: 1 − p never rounds to a log of 0


class Funnel(nn.Module):
    """Conditional logits [B, T] → the logits of the entire-space probabilities [B, T], columns in the same
    (model output) order; `order` lists the output columns first funnel stage first. Sums of log-sigmoids, so a
    rare last stage loses no precision; the first stage's logit passes through as it is, a later stage's is at
    most 87 (where 1 − p would underflow float32, i.e. every stage up to it has a logit above 87)."""

    def __init__(self, order: list[int]) -> None:
        super().__init__()
        if sorted(order) != list(range(len(order))):
            raise ValueError(f"a funnel order must list every output column once, got {order}")
        self.tiny = TINY
        self.register_buffer("order", torch.tensor(order, dtype=torch.long), persistent=False)
        self.register_buffer("inverse", torch.argsort(torch.tensor(order)), persistent=False)

    def forward(self, conditional: torch.Tensor) -> torch.Tensor:
        staged = conditional.index_select(1, self.order)
        log_p = torch.cumsum(F.logsigmoid(staged), dim=1)
        log_not = torch.log((-torch.expm1(log_p[:, 1:])).clamp(min=self.tiny))  # log(1 − p)
        return torch.cat([staged[:, :1], log_p[:, 1:] - log_not], dim=1).index_select(1, self.inverse)


def conditional_probabilities(probabilities: torch.Tensor, order: list[int]) -> torch.Tensor:
    """[.., T] each stage's probability given the stage before it (the first stage's as it is), from the
    entire-space probabilities: p_k / p_{k−1} down the funnel, 0 where p_{k−1} is 0."""
    conditional = probabilities.clone()
    for before, stage in zip(order, order[1:], strict=False):
        prior = probabilities[..., before]
        conditional[..., stage] = torch.where(prior > 0, probabilities[..., stage] / prior.clamp(min=1e-30), 0.0)
    return conditional

