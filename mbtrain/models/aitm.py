"""AITM (Xi et al., KDD 2021, "Modeling the Sequential Dependence among Audience Multi-step Conversions with
Multi-task Learning in Targeted Display Advertising"): one tower per stage over the shared embedding, and an
adaptive information transfer (AIT) from each stage to the next.

The tasks are a funnel, first stage first (--tasks in order: click → cart → purchase). Stage t's tower makes q_t;
the stage before hands over p_{t−1} = transfer(z_{t−1}), one ReLU layer over its own output z_{t−1}; stage t's
output is the attention over the two, z_t = Σ_u w_u·h3(u) for u in {q_t, p_{t−1}}, w = softmax(⟨h1(u), h2(u)⟩/√d)
(h1, h2, h3 linear maps d → d without bias; z_1 = q_1); the stage's logit is a linear map of z_t. Unlike ESMM's
funnel (models/funnel.py), each logit is directly its stage's probability over every impression, so nothing
forces p_t ≤ p_{t−1}: the calibrator (the paper's label constraint) adds α·max(p_t − p_{t−1}, 0) per row to stage
t's loss (auxiliary_losses; α = --calibrator-weight, 0.6 as in the authors' code).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mbtrain.models.base import Inputs, ModelConfig, MultiTaskNetwork, register
from mbtrain.models.mlp import StackedLinear
from mbtrain.models.split import SplitForward, task_views
from mbtrain.models.towers import Towers


@register("aitm")
class AITM(MultiTaskNetwork):
    """Embeddings ⊕ numeric → per task an MLP of the ``hidden`` then the ``tower`` sizes (q_t, width d) → down the
    funnel, each later stage's AIT over q_t and the stage before's transferred output → a linear map to its logit.

    The embedding table is the one shared parameter, as in ESMM; the towers, transfers and attention maps are task
    parameters, stacked by output column (a stage's transfer and attention sit at its own column; the first stage
    has none, its slot stays unused). A later stage's loss reads the towers before it, so the split forward's heads
    are coupled, as under ESMM's funnel."""

    always_funnel = True  # the network is its funnel: --model aitm always has it
    entire_space = True  # its logits are the stages' entire-space probabilities: no ESMM funnel goes on top

    def __init__(self, config: ModelConfig, inputs: Inputs) -> None:
        super().__init__(config, inputs)
        if self.num_tasks < 2:
            raise ValueError(f"AITM needs at least two tasks, the funnel's stages: got {self.num_tasks}")
        order = list(inputs.funnel) if inputs.funnel is not None else list(range(self.num_tasks))
        if sorted(order) != list(range(self.num_tasks)):
            raise ValueError(f"a funnel order must list every output column once, got {order}")
        self.funnel_order = order  # output columns, first stage first
        self.register_buffer("later", torch.tensor(order[1:]), persistent=False)  # the calibrator's columns
        self.register_buffer("before", torch.tensor(order[:-1]), persistent=False)  # ... and the stage before each
        self.towers = Towers(self.in_dim, [*config.hidden, *config.tower], self.num_tasks, config.dropout,
                             config.norm)
        width = self.towers.hidden.out_dim
        self.transfer = StackedLinear(self.num_tasks, width, width)  # p_{t−1} = ReLU(z_{t−1} W + b), at t's column
        self.attention = nn.Parameter(torch.empty(self.num_tasks, width, 3 * width))  # [h1 | h2 | h3], no bias
        nn.init.uniform_(self.attention, -1.0 / math.sqrt(width), 1.0 / math.sqrt(width))  # nn.Linear's bound
        self.dropout = nn.Dropout(config.dropout)
        self.width = width
        self.calibrator_weight = config.calibrator_weight

    def shared_parameters(self) -> list[nn.Parameter]:
        """The embedding table: every task's tower reads it."""
        return [self.embedding.table.weight]

    def shared_segments(self) -> list[torch.Tensor | None]:
        """Each column's rows of the table are one logical tensor."""
        return [self.embedding.row_features()]

    def task_parameters(self) -> list[nn.Parameter]:
        """The towers, the transfers and the attention maps."""
        return [*self.towers.parameters(), *self.transfer.parameters(), self.attention]

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        x, _, _ = self.embedding.inputs(categorical, numeric)
        return self.heads(x)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, T] in output order from the shared input [B, in], or split_forward's per-task view of it
        [T, B, in]: the towers together, then the AITs stage by stage down the funnel."""
        q = self.towers.hidden(x)  # [T, B, d]
        z = list(q.unbind(0))  # per output column; the first stage's is its tower's
        for stage in range(1, len(self.funnel_order)):
            column, before = self.funnel_order[stage], self.funnel_order[stage - 1]
            # matmul, then the bias: scripted, addmm's broadcast bias rounds otherwise than eager
            transferred = torch.matmul(z[before], self.transfer.weight[column]) + self.transfer.bias[column]
            transferred = self.dropout(torch.relu(transferred))
            z[column] = self.attend(q[column], transferred, self.attention[column])
        return self.towers.out(torch.stack(z)).squeeze(2).transpose(0, 1)

    def attend(self, tower: torch.Tensor, transferred: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """[B, d] the attention over a stage's tower output q_t and the transferred p_{t−1} (each [B, d]): scores
        ⟨h1(u), h2(u)⟩/√d softmaxed over the two, weighting h3(u); `maps` [d, 3d] holds h1, h2, h3 side by side."""
        both = torch.stack([tower, transferred], dim=1)  # [B, 2, d]
        projected = torch.matmul(both, maps)  # [B, 2, 3d]
        queries, keys = projected[:, :, : self.width], projected[:, :, self.width : 2 * self.width]
        weights = torch.softmax((queries * keys).sum(dim=2) / math.sqrt(self.width), dim=1)  # [B, 2]
        return (weights.unsqueeze(2) * projected[:, :, 2 * self.width :]).sum(dim=1)

    def split_forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> SplitForward:
        """Trunk = the embedding; heads = towers, transfers, attention and the output maps (see models/split.py),
        coupled: a later stage's loss reads the towers before it through the transfers (and the calibrator their
        logits). The table is the last shared layer GradNorm measures."""
        x, rows, index = self.embedding.inputs(categorical, numeric)
        per_task = task_views([x], self.num_tasks)
        table = self.embedding.table.weight
        return SplitForward(self.heads(per_task[0]), [x], per_task, table, rows, index, names=["inputs"],
                            per_expert=[False], last_shared=table, coupled=True)

    def auxiliary_losses(self, logits: torch.Tensor) -> torch.Tensor | None:
        """[T] the calibrator: per later stage t, α·Σ_rows max(p_t − p_{t−1}, 0) at t's column (0 at the first
        stage's), summed over the rows as the fit loop wants it (it divides by the global batch's rows, so the
        term is the paper's batch mean, and exact under torchrun). None when α is 0."""
        if self.calibrator_weight == 0:
            return None
        probabilities = torch.sigmoid(logits)
        excess = torch.relu(probabilities.index_select(1, self.later) - probabilities.index_select(1, self.before))
        return self.calibrator_weight * logits.new_zeros(logits.shape[1]).index_add(0, self.later, excess.sum(dim=0))
