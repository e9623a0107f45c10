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
    task as [T, B, in] (MMoE's per-task mixtures), and returns logits [B, C]: each task's `widths` logits (one, or a
    multiclass task's one per class) in task order. Towers of several widths share one stacked output layer as wide
    as the widest; a narrower task's unused outputs are never read (and so never trained).
    """

    def __init__(self, in_dim: int, hidden: list[int], num_tasks: int, dropout: float, norm: str = "none",
                 widths: tuple[int, ...] | None = None) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        widths = widths or (1,) * num_tasks
        self.num_tasks = num_tasks
        self.wide = max(widths) > 1
        self.hidden = StackedMLP(num_tasks, in_dim, hidden, dropout, norm)
        self.out = StackedLinear(num_tasks, self.hidden.out_dim, max(widths))
        columns = [task * max(widths) + j for task, width in enumerate(widths) for j in range(width)]
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.out(self.hidden(x))
        if not self.wide:
            return out.squeeze(2).transpose(0, 1)
        return out.transpose(0, 1).reshape(out.shape[1], out.shape[0] * out.shape[2]).index_select(1, self.columns)

    def set_base_logits(self, logits: torch.Tensor) -> None:
        """Start each logit at its task's best constant (a binary task's log-odds of its positive rate), so the first
        steps learn features instead of spending themselves on the prior of a rare label."""
        with torch.no_grad():
            self.out.bias.view(-1)[self.columns] = logits.to(self.out.bias)
