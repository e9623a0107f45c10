"""Shared-bottom multi-task model: one shared MLP, one tower per task."""

from __future__ import annotations

import torch
from torch import nn

from mbtrain.models.base import Inputs, ModelConfig, MultiTaskNetwork, register
from mbtrain.models.mlp import mlp
from mbtrain.models.split import SplitForward, task_views
from mbtrain.models.towers import Towers


@register("shared-bottom")
class SharedBottom(MultiTaskNetwork):
    """Embeddings ⊕ numeric features → shared MLP (``hidden``) → per-task towers → logits [B, T]."""

    def __init__(self, config: ModelConfig, inputs: Inputs) -> None:
        super().__init__(config, inputs)
        hidden, tower = list(config.hidden), list(config.tower)
        self.bottom = mlp(self.in_dim, hidden, config.dropout, config.norm)
        self.towers = Towers(hidden[-1] if hidden else self.in_dim, tower, self.num_tasks, config.dropout,
                             config.norm, inputs.widths)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Embedding table and shared MLP: the parameters every task's loss reaches."""
        return [*self.embedding.parameters(), *self.bottom.parameters()]

    def shared_segments(self) -> list[torch.Tensor | None]:
        """Per shared parameter, the logical tensor of each index of its first dim: each column's rows of the
        table; each bottom layer's weight and bias are one tensor each."""
        return [self.embedding.row_features(), *(None for _ in self.bottom.parameters())]

    def task_parameters(self) -> list[nn.Parameter]:
        """The towers."""
        return list(self.towers.parameters())

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        x, _, _ = self.embedding.inputs(categorical, numeric)
        return self.towers(self.bottom(x))

    def split_forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> SplitForward:
        """Trunk = embedding + bottom; heads = towers (see models/split.py)."""
        x, rows, index = self.embedding.inputs(categorical, numeric)
        bottom = self.bottom(x)
        per_task = task_views([bottom], self.towers.num_tasks)
        return SplitForward(self.towers(per_task[0]), [bottom], per_task, self.embedding.table.weight, rows, index,
                            names=["bottom"], per_expert=[False], last_shared=self._last_weight())

    def _last_weight(self) -> torch.Tensor | None:
        linears = [layer for layer in self.bottom if isinstance(layer, nn.Linear)]
        return linears[-1].weight if linears else None
