"""What a model hands a balancer that needs per-task gradients of the shared parameters.

A model is a shared trunk followed by task heads. `split_forward` runs the heads on per-task
views of the trunk's outputs, cut off from the trunk's graph: one backward of the summed loss then
gives the heads' parameters their plain gradient *and* each task's gradient at the trunk boundary,
so only the trunk is back-propagated once per task, not the heads (under the funnel, where a stage's loss
reads other tasks' heads too, the heads once per task: `coupled`). The embedding table enters as
the rows the batch gathered (`rows`, at `index`), so per-task table gradients stay batch-sized
instead of table-sized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SplitForward:
    logits: torch.Tensor  # [B, T]
    boundary: list[torch.Tensor]  # trunk outputs, still attached to the trunk's graph
    per_task: list[torch.Tensor]  # per boundary tensor a [T, ...] view that the heads read, detached from it
    table: torch.Tensor  # the embedding weight (a shared parameter)
    rows: torch.Tensor  # [B, C, D] rows gathered from `table`, in the trunk's graph
    index: torch.Tensor  # [B, C] row of `table` each gathered row came from
    names: list[str]  # per boundary tensor, what it holds ("bottom", "experts", ...)
    per_expert: list[bool]  # per boundary tensor, whether its first dim indexes experts ([E, B, H])
    last_shared: torch.Tensor | None  # the weight of the trunk's last layer (GradNorm's W); None without one
    coupled: bool = False  # a task's loss reads other tasks' heads too (the funnel): heads_backward goes task by task
    # where the coupling is only a map over the heads' own outputs, row by row (the funnel over uncoupled towers),
    # those outputs [B, T]: heads_backward then back-propagates the heads twice instead of once per task
    outputs: torch.Tensor | None = None


def task_views(boundary: list[torch.Tensor], num_tasks: int) -> list[torch.Tensor]:
    """Per-task [T, ...] views of detached trunk outputs: their gradient splits by task for free."""
    return [b.detach().requires_grad_().expand(num_tasks, *b.shape) for b in boundary]
