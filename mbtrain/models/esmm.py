"""ESMM's network (Ma et al., SIGIR 2018): the shared embedding, then one independent MLP tower per task.

The entire-space funnel on top (each task's probability the product of the conditional ones down the funnel)
is models/funnel.py's, which `--funnel` adds to any model and `--model esmm` always has.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mbtrain.models.embedding import FusedEmbedding
from mbtrain.models.split import SplitForward, task_views
from mbtrain.models.towers import Towers


class ESMM(nn.Module):
    """Embeddings ⊕ numeric → per task an MLP of the ``hidden`` then the ``tower`` sizes → logits [B, T]. The
    embedding table is the one shared parameter; the towers are fused as every model's are (models/towers.py)."""

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
        self.embedding = FusedEmbedding(cardinalities, embed_dim, bags, pooling)
        in_dim = self.embedding.input_dim(num_numeric)
        self.towers = Towers(in_dim, [*hidden, *tower], num_tasks, dropout, norm)

    def shared_parameters(self) -> list[nn.Parameter]:
        """The embedding table: every task's tower reads it."""
        return [self.embedding.table.weight]

    def shared_segments(self) -> list[torch.Tensor | None]:
        """Each column's rows of the table are one logical tensor."""
        return [self.embedding.row_features()]

    def task_parameters(self) -> list[nn.Parameter]:
        """The towers."""
        return list(self.towers.parameters())

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        x, _, _ = self.embedding.inputs(categorical, numeric)
        return self.towers(x)

    def split_forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> SplitForward:
        """Trunk = the embedding; heads = the towers (see models/split.py). The table is the last shared layer
        GradNorm measures."""
        x, rows, index = self.embedding.inputs(categorical, numeric)
        per_task = task_views([x], self.towers.num_tasks)
        table = self.embedding.table.weight
        return SplitForward(self.towers(per_task[0]), [x], per_task, table, rows, index, names=["inputs"],
                            per_expert=[False], last_shared=table)
