"""Multi-gate mixture-of-experts (Ma et al., KDD 2018) with the experts fused into batched matmuls."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mbtrain.models.base import Inputs, ModelConfig, MultiTaskNetwork, register
from mbtrain.models.mlp import StackedLinear, StackedMLP
from mbtrain.models.split import SplitForward, task_views
from mbtrain.models.towers import Towers


@register("mmoe")
class MMoE(MultiTaskNetwork):
    """Embeddings ⊕ numeric → E expert MLPs; per task a softmax gate mixes them → that task's tower.

    All experts live in stacked weights ([E, in, h1], [E, h1, h2], ...) and run as one matmul per
    layer; all T gates are one StackedLinear [T, in, E]. Experts and embedding are shared parameters;
    gates and towers are task parameters.
    """

    def __init__(self, config: ModelConfig, inputs: Inputs) -> None:
        super().__init__(config, inputs)
        hidden, tower, experts = list(config.hidden), list(config.tower), config.experts
        if not hidden:
            raise ValueError("MMoE experts need at least one hidden layer")
        if experts < 1:
            raise ValueError(f"experts must be >= 1, got {experts}")
        self.num_experts = experts
        self.experts = StackedMLP(experts, self.in_dim, hidden, config.dropout, config.norm)
        self.gates = StackedLinear(self.num_tasks, self.in_dim, experts)
        self.towers = Towers(hidden[-1], tower, self.num_tasks, config.dropout, config.norm, inputs.widths)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Embedding table and experts: the parameters every task's loss reaches."""
        return [*self.embedding.parameters(), *self.experts.parameters()]

    def shared_segments(self) -> list[torch.Tensor | None]:
        """Per shared parameter, the logical tensor of each index of its first dim: each column's rows of the
        table, each expert's slice of the stacked expert weights."""
        experts = torch.arange(self.num_experts, device=self.embedding.offsets.device)
        return [self.embedding.row_features(), *(experts for _ in self.experts.parameters())]

    def task_parameters(self) -> list[nn.Parameter]:
        """Gates and towers: each slice of them is reached by one task's loss only."""
        return [*self.gates.parameters(), *self.towers.parameters()]

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        x, _, _ = self.embedding.inputs(categorical, numeric)
        return self.heads(x, self.experts(x))

    def heads(self, x: torch.Tensor, expert_out: torch.Tensor) -> torch.Tensor:
        """Gates, mixture and towers, from shared inputs (x [B, in], experts [E, B, H]) or split_forward's
        per-task views of them, expanded from those ([T, B, in], [T, E, B, H])."""
        return self.towers(mixture(self.gates(x).softmax(dim=2), expert_out))  # [B, T] logits

    def split_forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> SplitForward:
        """Trunk = embedding + experts; heads = gates, mixture, towers (see models/split.py)."""
        x, rows, index = self.embedding.inputs(categorical, numeric)
        boundary = [x, self.experts(x)]
        per_task = task_views(boundary, self.num_tasks)
        return SplitForward(self.heads(*per_task), boundary, per_task, self.embedding.table.weight, rows, index,
                            names=["inputs", "experts"], per_expert=[False, True],
                            last_shared=self.experts.layers[-1].weight)


def mixture(gate: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """[T, B, H] each task's gate-weighted sum of the experts: gate [T, B, E] over experts [E, B, H], or over
    split_forward's per-task views of them, [T, E, B, H] expanded from those."""
    if not torch.jit.is_scripting() and experts.dim() == 4:
        return _ExpandedMixture.apply(gate, experts)
    return torch.einsum("tbe,ebh->tbh", gate, experts)  # one batched matmul


class _ExpandedMixture(torch.autograd.Function):
    """The gates' mixture of experts viewed once per task ([T, E, B, H], expanded from [E, B, H]): the forward
    is the plain path's batched matmul on the shared experts; the backward still gives each task the gradient
    of its own view. Elementwise products on the views cost 3 passes over [T, E, B, H] where this takes one
    (docs/benchmarks.md has the figure)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if experts.stride(0) != 0:
            raise ValueError("expected the experts' output expanded to one view per task")
        shared = experts[0]
        ctx.save_for_backward(gate, shared)
        return torch.einsum("tbe,ebh->tbh", gate, shared)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, shared = ctx.saved_tensors
        # a batched matmul rather than einsum, which has no rule under vmap (--task-backward batched)
        grad_gate = torch.matmul(grad.transpose(0, 1), shared.permute(1, 2, 0)).transpose(0, 1) \
            if ctx.needs_input_grad[0] else None
        grad_experts = gate.transpose(1, 2).unsqueeze(-1) * grad.unsqueeze(1) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_experts
