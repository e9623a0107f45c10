"""MLP building blocks: a plain one, and G independent ones run together as batched matmuls."""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(in_dim: int, hidden: list[int], dropout: float) -> nn.Sequential:
    """Linear → ReLU → Dropout for each hidden size (an identity when ``hidden`` is empty)."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(in_dim, size), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = size
    return nn.Sequential(*layers)


class StackedLinear(nn.Module):
    """G independent ``nn.Linear(in_dim, out_dim)`` held as one weight [G, in, out] and one bias [G, 1, out].

    Input is either one tensor [B, in] shared by all groups, or one per group as [G, B, in]; the output
    is always [G, B, out], from one batched matmul with the bias fused in.
    """

    def __init__(self, groups: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(groups, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(groups, 1, out_dim))
        # nn.Linear's default (kaiming_uniform with a=sqrt(5)) amounts to U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(in_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # one input for every group: a single [B, in] @ [in, G*out] matmul
            groups, in_dim, out_dim = self.weight.shape
            flat = self.weight.transpose(0, 1).reshape(in_dim, groups * out_dim)
            y = torch.addmm(self.bias.reshape(groups * out_dim), x, flat)
            return y.view(x.shape[0], groups, out_dim).transpose(0, 1)
        return torch.baddbmm(self.bias, x, self.weight)


class StackedMLP(nn.Module):
    """G independent MLPs (StackedLinear → ReLU → Dropout per hidden size), input as for StackedLinear.

    Output is [G, B, hidden[-1]]; with ``hidden`` empty the input passes through unchanged.
    """

    def __init__(self, groups: int, in_dim: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        for size in hidden:
            self.layers.append(StackedLinear(groups, in_dim, size))
            in_dim = size
        self.out_dim = in_dim
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.dropout(torch.relu(layer(x)))
        return x
