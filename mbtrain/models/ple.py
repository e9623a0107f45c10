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

import torch
from torch import nn

from mbtrain.models.base import Inputs, ModelConfig, MultiTaskNetwork, register
from mbtrain.models.mlp import StackedLinear, StackedMLP
from mbtrain.models.mmoe import mixture
from mbtrain.models.split import SplitForward, task_views
from mbtrain.models.towers import Towers


class ExtractionLevel(nn.Module):
    """One PLE level: its experts (StackedMLPs of `hidden`), the tasks' gates (one StackedLinear [T, in, own +
    shared experts]) and, unless it is the last level, the shared gate over all experts (a Linear).

    A level with a shared gate holds all its experts in one stack, each task's own experts task by task, then the
    shared ones (the shared gate's order): all of them are shared parameters, and on level 0, where every expert
    reads the same input, the first layer is one matmul. The last level keeps its shared experts and its task
    experts (task parameters) in two stacks."""

    def __init__(self, in_dim: int, hidden: list[int], experts: int, task_experts: int, num_tasks: int,
                 last: bool, dropout: float, norm: str) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.own = task_experts
        self.shared_count = experts
        self.task_gates = StackedLinear(num_tasks, in_dim, task_experts + experts)
        if last:
            self.experts = None
            self.shared_gate = None
            self.shared_experts = StackedMLP(experts, in_dim, hidden, dropout, norm)
            self.task_experts = StackedMLP(num_tasks * task_experts, in_dim, hidden, dropout, norm)
        else:
            self.experts = StackedMLP(num_tasks * task_experts + experts, in_dim, hidden, dropout, norm)
            self.shared_gate = nn.Linear(in_dim, num_tasks * task_experts + experts)
            self.shared_experts = None
            self.task_experts = None

    def per_expert(self, task_in: torch.Tensor) -> torch.Tensor:
        """Each task's input [T, B, in] repeated for its own experts: [T·own, B, in] (a view where the input is
        one expanded tensor, or where each task has one expert); level 0's one input [B, in] as it is."""
        if self.own == 1 or task_in.dim() == 2:
            return task_in
        tasks, rows, width = task_in.shape
        return task_in.unsqueeze(1).expand(tasks, self.own, rows, width).reshape(-1, rows, width)

    def stacked_inputs(self, task_in: torch.Tensor, shared_in: torch.Tensor) -> torch.Tensor:
        """The input of each expert of the stack: on level 0 the one input [B, in] of all; above, [T·own + E,
        B, in] from the task inputs [T, B, in] and the shared input [B, in]."""
        if task_in.dim() == 2:
            return task_in
        shared = shared_in.unsqueeze(0).expand(self.shared_count, shared_in.shape[0], shared_in.shape[1])
        return torch.cat([self.per_expert(task_in), shared])

    def task_mix(self, task_in: torch.Tensor, own: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        """[T, B, H] each task's gate over its own experts (own [T, own, B, H]) and the shared ones (shared
        [E, B, H], or split_forward's per-task views [T, E, B, H])."""
        gate = self.task_gates(task_in).softmax(dim=2)  # [T, B, own + E]
        mixed_own = torch.einsum("tbe,tebh->tbh", gate[:, :, : self.own], own)
        return mixed_own + mixture(gate[:, :, self.own :], shared)

    def shared_mix(self, shared_in: torch.Tensor, every: torch.Tensor) -> torch.Tensor:
        """[B, H] the shared gate's mixture of every expert of the stack (every [T·own + E, B, H]): products
        and a sum, which on CPU take a third of the batched matmul's time here (G·B matmuls of one row)."""
        weights = self.shared_gate(shared_in).softmax(dim=1)  # [B, T·own + E]; only levels with one call this
        return (weights.T.unsqueeze(-1) * every).sum(dim=0)

    def forward(self, task_in: torch.Tensor, shared_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the tasks' inputs [T, B, H] to the next level, its shared input [B, H]; the last level passes on
        `shared_in`) from this level's (level 0: the one input [B, in] as both)."""
        if self.experts is not None:
            every = self.experts(self.stacked_inputs(task_in, shared_in))
            split = self.num_tasks * self.own
            return (self.task_mix(task_in, self.own_experts(every[:split]), every[split:]),
                    self.shared_mix(shared_in, every))
        return self.task_mix(task_in, self.own_task_experts(task_in), self.shared_experts(shared_in)), shared_in

    def own_task_experts(self, task_in: torch.Tensor) -> torch.Tensor:
        """[T, own, B, H] the last level's task experts on their task's input."""
        return self.own_experts(self.task_experts(self.per_expert(task_in)))

    def own_experts(self, task_out: torch.Tensor) -> torch.Tensor:
        """[T, own, B, H]: each task's own experts, from their outputs [T·own, B, H] (task by task)."""
        return task_out.view(self.num_tasks, self.own, task_out.shape[1], task_out.shape[2])


@register("ple")
class PLE(MultiTaskNetwork):
    """Embeddings ⊕ numeric → `levels` extraction levels → per-task towers → logits [B, T] (see the module
    docstring for the wiring and which parameters are shared)."""

    def __init__(self, config: ModelConfig, inputs: Inputs) -> None:
        hidden, tower = list(config.hidden), list(config.tower)
        experts, task_experts, levels = config.experts, config.task_experts, config.levels
        if not hidden:
            raise ValueError("PLE experts need at least one hidden layer")
        if experts < 1 or task_experts < 1 or levels < 1:
            raise ValueError(f"PLE needs at least one shared expert, one expert per task and one level, got "
                             f"{experts}, {task_experts} and {levels}")
        super().__init__(config, inputs)
        in_dim = self.in_dim
        self.levels = nn.ModuleList()
        for level in range(levels):
            self.levels.append(ExtractionLevel(in_dim, hidden, experts, task_experts, self.num_tasks,
                                               last=level == levels - 1, dropout=config.dropout, norm=config.norm))
            in_dim = hidden[-1]
        self.towers = Towers(hidden[-1], tower, self.num_tasks, config.dropout, config.norm, inputs.widths)

    @classmethod
    def describe(cls, config: ModelConfig) -> str:
        levels = config.levels
        return (f"{config.model} ({levels} level{'s' * (levels > 1)}, {config.experts} shared + "
                f"{config.task_experts} per task experts)")

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        x, _, _ = self.embedding.inputs(categorical, numeric)
        task_in, shared_in = x, x
        for level in self.levels:
            task_in, shared_in = level(task_in, shared_in)
        return self.towers(task_in)

    def _shared(self) -> list[tuple[nn.Parameter, torch.Tensor | None]]:
        """(parameter, its logical tensors: which one each index of its first dim belongs to, None for one) for
        every shared parameter, in shared_parameters() order."""
        device = self.embedding.offsets.device
        found: list[tuple[nn.Parameter, torch.Tensor | None]] = [(self.embedding.table.weight,
                                                                  self.embedding.row_features())]
        count = len(self.levels)
        for at, level in enumerate(self.levels):
            if at == count - 1:
                groups = [(level.shared_experts, True)]
            else:  # the shared gate passes this level's task experts on to every task
                groups = [(level.experts, True), (level.shared_gate, False)]
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
        input to the last-but-one level, that level's experts' outputs, and the last level's shared experts'
        output (with one level: the inputs and its shared experts' output)."""
        x, rows, index = self.embedding.inputs(categorical, numeric)
        task_in, shared_in = x, x
        tasks, count = self.num_tasks, len(self.levels)
        for level in list(self.levels)[: max(0, count - 2)]:  # whole levels inside the trunk
            task_in, shared_in = level(task_in, shared_in)
        last = self.levels[count - 1]
        if count == 1:
            boundary = [x, last.shared_experts(x)]
            names, per_expert = ["inputs", "level0.shared_experts"], [False, True]
            views = task_views(boundary, tasks)
            last_in, last_shared = views
        else:
            cut = self.levels[count - 2]
            every = cut.experts(cut.stacked_inputs(task_in, shared_in))
            boundary = [task_in, every, last.shared_experts(cut.shared_mix(shared_in, every))]
            names = ["inputs" if count == 2 else f"level{count - 2}.task_inputs", f"level{count - 2}.experts",
                     f"level{count - 1}.shared_experts"]
            per_expert = [False, True, True]
            views = task_views(boundary, tasks)
            # each task's gate reads its own view, and of a [T, ...] tensor only its own task's slice
            cut_in = views[0] if task_in.dim() == 2 else _own_slices(views[0], 1)[:, 0]
            split_at = tasks * cut.own
            last_in = cut.task_mix(cut_in, _own_slices(views[1][:, :split_at], cut.own), views[1][:, split_at:])
            last_shared = views[2]
        logits = self.towers(last.task_mix(last_in, last.own_task_experts(last_in), last_shared))
        return SplitForward(logits, boundary, views, self.embedding.table.weight, rows, index, names=names,
                            per_expert=per_expert, last_shared=last.shared_experts.layers[-1].weight)


def _own_slices(views: torch.Tensor, each: int) -> torch.Tensor:
    """[T, each, ...] task t's slice t (of `each` rows) from its view t, out of per-task views [T, T·each, ...];
    the gradient reaches task t's view in task t's slice only."""
    tasks = views.shape[0]
    rest = views.shape[2:]
    blocks = views.reshape(tasks, tasks, each, *rest)  # a view: the task dim of an expanded tensor has stride 0
    return torch.diagonal(blocks, dim1=0, dim2=1).movedim(-1, 0)
