"""Shared-bottom multi-task model: one shared MLP, one tower per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mbtrain.models.embedding import FusedEmbedding
from mbtrain.models.mlp import mlp
from mbtrain.models.split import SplitForward, task_views
from mbtrain.models.towers import Towers


class SharedBottom(nn.Module):
    """Embeddings ⊕ numeric features → shared MLP (``hidden``) → per-task towers → logits [B, T]."""

    def __init__(
        self,
        cardinalities: list[int],
        num_numeric: int,
        num_tasks: int,
        embed_dim: int = 8,
        hidden: Sequence[int] = (64, 32),
        tower: Sequence[int] = (16,),
        dropout: float = 0.0,
        norm: str = "none",
        bags: int = 0,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        hidden, tower = list(hidden), list(tower)
        self.embedding = FusedEmbedding(cardinalities, embed_dim, bags, pooling)
        in_dim = self.embedding.input_dim(num_numeric)
        self.bottom = mlp(in_dim, hidden, dropout, norm)
        self.towers = Towers(hidden[-1] if hidden else in_dim, tower, num_tasks, dropout, norm)

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
