"""ESMM's network (Ma et al., SIGIR 2018): the shared embedding, then one independent MLP tower per task.

The entire-space funnel on top (each task's probability the product of the conditional ones down the funnel)
is models/funnel.py's, which `--funnel` adds to any model and `--model esmm` always has.
"""

from __future__ import annotations

import torch
from torch import nn

from mbtrain.models.base import Inputs, ModelConfig, MultiTaskNetwork, register
from mbtrain.models.split import SplitForward, task_views
from mbtrain.models.towers import Towers


@register("esmm")
class ESMM(MultiTaskNetwork):
    """Embeddings ⊕ numeric → per task an MLP of the ``hidden`` then the ``tower`` sizes → logits [B, T]. The
    embedding table is the one shared parameter; the towers are fused as every model's are (models/towers.py)."""

    always_funnel = True  # the network is the funnel's: --model esmm always has it

    def __init__(self, config: ModelConfig, inputs: Inputs) -> None:
        super().__init__(config, inputs)
        self.towers = Towers(self.in_dim, [*config.hidden, *config.tower], self.num_tasks, config.dropout,
                             config.norm)

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
