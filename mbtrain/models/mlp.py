"""MLP building blocks: a plain one, and G independent ones run together as batched matmuls; each hidden
layer optionally normalised (batch or layer norm) between its linear map and its ReLU."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

NORMS = ("none", "batch", "layer")


def mlp(in_dim: int, hidden: list[int], dropout: float, norm: str = "none") -> nn.Sequential:
    """Linear → norm → ReLU → Dropout for each hidden size (an identity when ``hidden`` is empty)."""
    layers: list[nn.Module] = []
    for size in hidden:
        normed = [hidden_norm(norm, size)] if norm != "none" else []  # none: the layout of checkpoints before norms
        layers += [nn.Linear(in_dim, size), *normed, nn.ReLU(), nn.Dropout(dropout)]
        in_dim = size
    return nn.Sequential(*layers)


def hidden_norm(kind: str, features: int, groups: int | None = None) -> nn.Module:
    """The normalisation of a hidden layer's [B, H] (or G groups' [G, B, H]) pre-activations; with ``groups``
    the affine parameters are per group ([G, 1, H]), so each expert or tower keeps its own."""
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind}: choose one of {', '.join(NORMS)}")
    shape = [features] if groups is None else [groups, 1, features]
    if kind == "batch":
        return RowBatchNorm(shape)
    return FeatureLayerNorm(shape) if kind == "layer" else nn.Identity()


class FeatureLayerNorm(nn.Module):
    """Layer norm over the features of each row, with an affine map of the given shape."""

    def __init__(self, shape: list[int], eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.layer_norm(x, [x.shape[-1]], None, None, self.eps) * self.weight + self.bias


class RowBatchNorm(nn.Module):
    """Batch norm over the rows (dim -2) of each group separately, as G ``BatchNorm1d`` would, same momentum
    and eps. Unlike ``BatchNorm1d`` a batch of one row (an epoch's last) or none (a rank's empty streamed
    batch) trains without error and leaves the running statistics alone."""

    def __init__(self, shape: list[int], momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("running_mean", torch.zeros(shape))
        self.register_buffer("running_var", torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return (x - self.running_mean) * torch.rsqrt(self.running_var + self.eps) * self.weight + self.bias
        if torch.jit.is_scripting():  # exported models run in eval mode; this keeps the scripted code complete
            var, mean = torch.var_mean(x, dim=-2, keepdim=True, correction=0)
            y = (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        else:
            y, mean, var = _BatchNormRows.apply(x, self.weight, self.bias, self.eps)
        rows = x.shape[-2]
        if rows > 1:
            with torch.no_grad():
                self.running_mean.lerp_(mean.view_as(self.running_mean), self.momentum)
                self.running_var.lerp_((var * (rows / (rows - 1))).view_as(self.running_var), self.momentum)
        return y


class _BatchNormRows(torch.autograd.Function):
    """Training-mode batch norm over dim -2 with the closed-form backward: 3 passes each way where autograd
    through var_mean and the affine map makes about twice as many (docs/benchmarks.md has the figure). Also
    returns the batch's mean and variance, for the running stats."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        var, mean = torch.var_mean(x, dim=-2, keepdim=True, correction=0)
        invstd = torch.rsqrt(var + eps)
        normalised = (x - mean).mul_(invstd)
        ctx.save_for_backward(normalised, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return torch.addcmul(bias, normalised, weight), mean, var

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        normalised, invstd, weight = ctx.saved_tensors
        rows = grad.shape[-2]
        grad_bias = grad.sum(dim=-2, keepdim=True)
        grad_weight = (grad * normalised).sum(dim=-2, keepdim=True)
        grad_x = (grad - grad_bias / max(rows, 1) - normalised * (grad_weight / max(rows, 1))).mul_(weight * invstd)
        return grad_x, grad_weight.reshape(weight.shape), grad_bias.reshape(weight.shape), None


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
        if x.dim() == 2:
            return _one_input(x, self.weight, self.bias)
        if not torch.jit.is_scripting() and x.stride(0) == 0:  # one input viewed once per group (split_forward)
            return _ExpandedInput.apply(x, self.weight, self.bias)
        return torch.baddbmm(self.bias, x, self.weight)


def _one_input(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One input [B, in] for every group: a single [B, in] @ [in, G·out] matmul, bias fused → [G, B, out]."""
    groups, in_dim, out_dim = weight.shape
    y = torch.addmm(bias.reshape(groups * out_dim), x, weight.transpose(0, 1).reshape(in_dim, groups * out_dim))
    return y.view(x.shape[0], groups, out_dim).transpose(0, 1)


class _ExpandedInput(torch.autograd.Function):
    """StackedLinear on an input expanded to [G, B, in] from one [B, in]: the forward is the shared input's one
    matmul, where baddbmm would run G thin ones on copies; the backward still gives each group the gradient of
    its own view (MetaBalance's per-task boundary gradients). Its gain: docs/benchmarks.md."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x[0], weight)
        return _one_input(x[0], weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        shared, weight = ctx.saved_tensors
        groups, in_dim, out_dim = weight.shape
        grad_x = torch.bmm(grad, weight.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:  # one [in, B] @ [B, G·out] matmul for every group
            by_row = grad.transpose(0, 1).reshape(shared.shape[0], groups * out_dim)
            grad_weight = (shared.T @ by_row).view(in_dim, groups, out_dim).transpose(0, 1).contiguous()
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=1, keepdim=True)
        return grad_x, grad_weight, grad_bias


class StackedMLP(nn.Module):
    """G independent MLPs (StackedLinear → hidden_norm → ReLU → Dropout per hidden size), input as for
    StackedLinear. Output is [G, B, hidden[-1]]; with ``hidden`` empty the input passes through unchanged.
    """

    def __init__(self, groups: int, in_dim: int, hidden: list[int], dropout: float, norm: str = "none") -> None:
        super().__init__()
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        for size in hidden:
            self.layers.append(StackedLinear(groups, in_dim, size))
            self.norms.append(hidden_norm(norm, size, groups))
            in_dim = size
        self.out_dim = in_dim
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, norm in zip(self.layers, self.norms):  # noqa: B905 (TorchScript's zip takes no strict=)
            x = self.dropout(torch.relu(norm(layer(x))))
        return x
