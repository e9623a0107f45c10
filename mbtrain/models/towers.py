"""One small MLP per task, all tasks computed together."""

from __future__ import annotations

import torch
from torch import nn

from mbtrain.models.mlp import StackedLinear, StackedMLP


class Towers(nn.Module):
    """Per-task heads: (Linear → norm → ReLU → Dropout) per ``hidden`` size, then Linear to one logit.

    The T towers are fused into stacked weights [T, in, h] so that every layer is one batched matmul
    for all tasks rather than T small ones. Towers share a tensor but not a slice, so a task's loss
    gives exactly zero gradient to the other towers' slices.

    ``forward`` takes either one input [B, in] fed to every tower (shared-bottom) or one input per
    task as [T, B, in] (MMoE's per-task mixtures), and returns logits [B, T].
    """

    def __init__(self, in_dim: int, hidden: list[int], num_tasks: int, dropout: float, norm: str = "none") -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks
        self.hidden = StackedMLP(num_tasks, in_dim, hidden, dropout, norm)
        self.out = StackedLinear(num_tasks, self.hidden.out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x)).squeeze(2).transpose(0, 1)

    def set_base_logits(self, logits: torch.Tensor) -> None:
        """Start each task's logit at its best constant (a binary task's log-odds of its positive rate), so the first
        steps learn features instead of spending themselves on the prior of a rare label."""
        with torch.no_grad():
            self.out.bias.copy_(logits.view_as(self.out.bias))
