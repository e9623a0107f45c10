"""Progressive Layered Extraction (Tang et al., RecSys 2020), every level's experts fused into batched matmuls.

At each extraction level, `experts` shared experts and `task_experts` experts per task run on that level's
inputs: the shared experts on the shared input, each task's experts on its task's input (level 0: the
embeddings ⊕ numeric features for all). Each task's softmax gate mixes its own and the shared experts into
its next input; every level but the last also has a shared gate over all experts, which makes the next
shared input. The towers read the last level's task outputs.

Which parameters are shared (reached by more than one task's loss) follows from the wiring: the embedding,
every level's shared experts, and every level with a shared gate: its task experts and the gate itself (the
shared gate passes them on to every task); a task's gate is shared too where its output feeds such a level's
task experts, i.e. from three levels up. The rest (the last two levels' task gates, the last level's task
experts, the towers) is each reached by one task's loss only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mbtrain.models.embedding import FusedEmbedding
from mbtrain.models.mlp import StackedLinear, StackedMLP
from mbtrain.models.mmoe import mixture
from mbtrain.models.split import SplitForward, task_views
from mbtrain.models.towers import Towers


class ExtractionLevel(nn.Module):
    """One PLE level: shared and per-task experts (StackedMLPs of `hidden`), the tasks' gates (one StackedLinear
    [T, in, own + shared experts]) and, unless it is the last level, the shared gate over all experts (a Linear)."""

    def __init__(self, in_dim: int, hidden: list[int], experts: int, task_experts: int, num_tasks: int,
                 shared_gate: bool, dropout: float, norm: str) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.task_experts_each = task_experts
        self.shared_experts = StackedMLP(experts, in_dim, hidden, dropout, norm)
        self.task_experts = StackedMLP(num_tasks * task_experts, in_dim, hidden, dropout, norm)  # task by task
        self.task_gates = StackedLinear(num_tasks, in_dim, task_experts + experts)
        self.shared_gate = nn.Linear(in_dim, num_tasks * task_experts + experts) if shared_gate else None

    def run_task_experts(self, task_in: torch.Tensor) -> torch.Tensor:
        """[T·own, B, H] the task experts on their task's input: one input [B, in] for all (level 0), or
        [T, B, in], each task's repeated for its experts (a view where the input is one expanded tensor)."""
        if task_in.dim() == 2 or self.task_experts_each == 1:
            return self.task_experts(task_in)
        tasks, rows, width = task_in.shape
        each = self.task_experts_each
        return self.task_experts(task_in.unsqueeze(1).expand(tasks, each, rows, width).reshape(-1, rows, width))

    def task_mix(self, task_in: torch.Tensor, own: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """[T, B, H] each task's gate over its own experts (own [T, own, B, H]) and the shared ones (shared
        [E, B, H], or split_forward's per-task views [T, E, B, H])."""
        gate = self.task_gates(task_in).softmax(dim=2)  # [T, B, own + E]
        each = self.task_experts_each
        mixed_own = torch.einsum("tbe,tebh->tbh", gate[:, :, :each], own)
        return mixed_own + mixture(gate[:, :, each:], shared)

    def shared_mix(self, shared_in: torch.Tensor, task_out: torch.Tensor, shared_out: torch.Tensor) -> torch.Tensor:
        """[B, H] the shared gate's mixture of every expert of the level (task experts first)."""
        weights = self.shared_gate(shared_in).softmax(dim=1)  # [B, T·own + E]; only levels with one call this
        split = task_out.shape[0]
        return (torch.einsum("be,ebh->bh", weights[:, :split], task_out)
                + torch.einsum("be,ebh->bh", weights[:, split:], shared_out))

    def own_experts(self, task_out: torch.Tensor) -> torch.Tensor:
        """[T, own, B, H]: each task's own experts, from their output [T·own, B, H]."""
        return task_out.view(self.num_tasks, self.task_experts_each, task_out.shape[1], task_out.shape[2])


class PLE(nn.Module):
    """Embeddings ⊕ numeric → `levels` extraction levels → per-task towers → logits [B, T] (see the module
    docstring for the wiring and which parameters are shared)."""

    def __init__(
        self,
        cardinalities: list[int],
        num_numeric: int,
        num_tasks: int,
        embed_dim: int = 8,
        hidden: Sequence[int] = (64, 32),
        experts: int = 8,
        task_experts: int = 1,
        levels: int = 2,
        tower: Sequence[int] = (16,),
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        hidden, tower = list(hidden), list(tower)
        if not hidden:
            raise ValueError("PLE experts need at least one hidden layer")
        if experts < 1 or task_experts < 1 or levels < 1:
            raise ValueError(f"PLE needs at least one shared expert, one expert per task and one level, got "
                             f"{experts}, {task_experts} and {levels}")
        self.embedding = FusedEmbedding(cardinalities, embed_dim)
        in_dim = self.embedding.input_dim(num_numeric)
        self.num_tasks = num_tasks
        self.levels = nn.ModuleList()
        for level in range(levels):
            self.levels.append(ExtractionLevel(in_dim, hidden, experts, task_experts, num_tasks,
                                               shared_gate=level < levels - 1, dropout=dropout, norm=norm))
            in_dim = hidden[-1]
        self.towers = Towers(hidden[-1], tower, num_tasks, dropout, norm)

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        x, _, _ = self.embedding.inputs(categorical, numeric)
        task_in, shared_in = x, x
        for level in self.levels:
            task_out = level.run_task_experts(task_in)
            shared_out = level.shared_experts(shared_in)
            if level.shared_gate is not None:
                shared_in = level.shared_mix(shared_in, task_out, shared_out)
            task_in = level.task_mix(task_in, level.own_experts(task_out), shared_out)
        return self.towers(task_in)

    def _shared(self) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        """(parameter, its logical tensors: which one each index of its first dim belongs to, None for one) for
        every shared parameter, in shared_parameters() order."""
        device = self.embedding.offsets.device
        found: list[tuple[nn.Parameter, torch.Tensor | None]] = [(self.embedding.table.weight,
                                                                  self.embedding.row_features())]
        count = len(self.levels)
        for at, level in enumerate(self.levels):
            groups = [(level.shared_experts, True)]
            if at < count - 1:  # the shared gate passes this level's task experts on to every task
                groups += [(level.task_experts, True), (level.shared_gate, False)]
            if at < count - 2:  # this level's task gates feed the next level's task experts, passed on likewise
                groups.append((level.task_gates, True))
            for module, stacked in groups:
                for p in module.parameters():
                    found.append((p, torch.arange(p.shape[0], device=device) if stacked else None))
        return found

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters more than one task's loss reaches (the module docstring says which)."""
        return [p for p, _ in self._shared()]

    def shared_segments(self) -> list[torch.Tensor | None]:
        """Per shared parameter, the logical tensor of each index of its first dim: each column's rows of the
        table, each expert's slice of stacked expert weights, each task's gate; a shared gate is one tensor."""
        return [segments for _, segments in self._shared()]

    def task_parameters(self) -> list[nn.Parameter]:
        """Every other parameter: each slice of them is reached by one task's loss only."""
        shared = {id(p) for p in self.shared_parameters()}
        return [p for p in self.parameters() if id(p) not in shared]

    def split_forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> SplitForward:
        """Trunk = everything shared, up to the last two levels' task gates; heads = those gates, the last level's
        task experts and the towers (see models/split.py). The boundary is what the heads read: the tasks'
        input to the last-but-one level, that level's task and shared experts' outputs, and the last level's
        shared experts' output (with one level: the inputs and its shared experts' output)."""
        x, rows, index = self.embedding.inputs(categorical, numeric)
        task_in, shared_in = x, x
        count = len(self.levels)
        for level in list(self.levels)[: max(0, count - 2)]:  # whole levels inside the trunk
            task_out = level.run_task_experts(task_in)
            shared_out = level.shared_experts(shared_in)
            shared_in = level.shared_mix(shared_in, task_out, shared_out)
            task_in = level.task_mix(task_in, level.own_experts(task_out), shared_out)
        last = self.levels[count - 1]
        if count == 1:
            boundary = [x, last.shared_experts(x)]
            names, per_expert = ["inputs", "level0.shared_experts"], [False, True]
            views = task_views(boundary, self.num_tasks)
            last_in, last_shared = views
        else:
            cut = self.levels[count - 2]
            task_out = cut.run_task_experts(task_in)
            shared_out = cut.shared_experts(shared_in)
            next_shared = last.shared_experts(cut.shared_mix(shared_in, task_out, shared_out))
            boundary = [task_in, task_out, shared_out, next_shared]
            at, above = count - 2, count - 1
            names = ["inputs" if count == 2 else f"level{at}.task_inputs", f"level{at}.task_experts",
                     f"level{at}.shared_experts", f"level{above}.shared_experts"]
            per_expert = [False, True, True, True]
            views = task_views(boundary, self.num_tasks)
            # each task's gate reads its own view, and of a [T, ...] tensor only its own task's slice
            cut_in = views[0] if task_in.dim() == 2 else _own_slices(views[0], 1)[:, 0]
            own = _own_slices(views[1], cut.task_experts_each)
            last_in = cut.task_mix(cut_in, own, views[2])
            last_shared = views[3]
        task_out = last.run_task_experts(last_in)
        logits = self.towers(last.task_mix(last_in, last.own_experts(task_out), last_shared))
        return SplitForward(logits, boundary, views, self.embedding.table.weight, rows, index, names=names,
                            per_expert=per_expert, last_shared=last.shared_experts.layers[-1].weight)


def _own_slices(views: torch.Tensor, each: int) -> torch.Tensor:
    """[T, each, ...] task t's slice t (of `each` rows) from its view t, out of per-task views [T, T·each, ...];
    the gradient reaches task t's view in task t's slice only."""
    tasks = views.shape[0]
    rest = views.shape[2:]
    blocks = views.reshape(tasks, tasks, each, *rest)  # a view: the task dim of an expanded tensor has stride 0
    return torch.diagonal(blocks, dim1=0, dim2=1).movedim(-1, 0)
