"""IMTL-G, the gradient balance of Impartial Multi-Task Learning (Liu et al., ICLR 2021): the shared part gets
the combination Σ_k α_k·g_k whose projections onto every task's unit gradient u_k = g_k/‖g_k‖ are equal, with
Σ_k α_k = 1. In closed form, with D = [g_1 − g_k]_{k≥2} and U = [u_1 − u_k]_{k≥2} (rows):

    α_{2..T} = g_1·Uᵀ·(D·Uᵀ)⁻¹,    α_1 = 1 − Σ_{k≥2} α_k

(the paper's eq. 5; LibMTL's IMTL.py and the Aligned-MTL authors' imtl/balancer.py compute the same). Every
quantity is a function of the tasks' Gram matrix: g_j·u_k = G_jk/√G_kk. The paper's Algorithm 1 takes the
gradients at the shared feature z, which is `--balance-level representation`; at `parameters` they are the
shared parameters' (LibMTL's default). The loss half of the paper's method is `--balance imtl-l` (imtl_l.py).

Degenerate cases, guarded without a host sync (the reference code inverts D·Uᵀ as it comes):

- a singular D·Uᵀ (two tasks' gradients pointing the same way: u_1 − u_k = 0) is solved with a ridge,
  (D·Uᵀ + δ·I)⁻¹ with δ = 1e-8·max_k ‖g_k‖: the Aligned-MTL authors' fallback of 1e-8·I, made relative to the
  gradients' size so that it means the same at any loss scale. It is always added (a branch on singularity would
  read the matrix on the host); next to D·Uᵀ's own size (~max ‖g_k‖) it moves the weights by ~1e-8 relative.
  Exactly collinear tasks then get the anchor task's (1, 0) for a pair, the limit a ridge picks; the projections
  are equal for any weights there.
- a task whose gradient is exactly zero has no direction to be impartial to: it is left out of the equations
  (its α is 0) and the others' α are IMTL-G among themselves. The anchor (the paper's task 1) is the first task
  with a nonzero gradient, normally the main task. With every gradient zero the weights are (1, 0, ..., 0).
- the weights are solved in float64 (a [T−1, T−1] system, nothing to speak of) by `torch.linalg.solve_ex`,
  which unlike `solve` does not check for singularity on the host; a non-finite solution (the ridged matrix
  still singular, which the ridge makes all but impossible) falls back to the anchor's weight alone.
"""

from __future__ import annotations

from typing import Any

import torch

from mbtrain.balance.per_task import LEVELS, WeightedGradients
from mbtrain.balance.registry import Setup, register

RIDGE = 1e-8  # δ relative to the largest task gradient's norm


@register("imtl")
class IMTLG(WeightedGradients):
    method = ("IMTL-G, Liu et al. (ICLR 2021): the combination of the tasks' gradients with equal projections onto "
              "each task's unit gradient, in closed form")
    levels = LEVELS

    @classmethod
    def build(cls, setup: Setup, settings: Any) -> IMTLG:
        return cls(setup.shared, setup.task, reduce=setup.reduce, gather=setup.gather, level=setup.level)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return imtl_weights(gram)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Stateless: nothing to restore."""


def imtl_weights(gram: torch.Tensor) -> torch.Tensor:
    """[T] IMTL-G's α from the [T, T] Gram matrix (module docstring), in `gram`'s dtype; no host sync."""
    n_tasks = gram.shape[0]
    g = gram.to(torch.float64)
    norms = g.diagonal().clamp(min=0).sqrt()
    active = norms > 0
    # projections P[j, k] = g_j·u_k (0 for a task without a direction)
    projections = torch.where(active, g / norms.clamp(min=torch.finfo(g.dtype).tiny), 0)
    # the anchor first: the first task with a gradient (argmax takes the first of equal maxima)
    index = torch.arange(n_tasks, device=g.device)
    anchor = active.to(torch.int32).argmax()
    order = torch.argsort(torch.where(index == anchor, -1, index))
    p = projections[order][:, order]
    # (D·Uᵀ)[j, k] = (g_1 − g_j)·(u_1 − u_k) and g_1·Uᵀ, for j, k ≥ 2 (positions in `order`)
    du = p[0, 0] - p[0, 1:].unsqueeze(0) - p[1:, 0].unsqueeze(1) + p[1:, 1:]
    target = p[0, 0] - p[0, 1:]
    eye = torch.eye(n_tasks - 1, dtype=g.dtype, device=g.device)
    ridged = du + RIDGE * norms.max() * eye
    # α_rest·(D·Uᵀ + δI) = g_1·Uᵀ  ⇔  (D·Uᵀ + δI)ᵀ·α_rest = g_1·Uᵀ; a zero task's equation becomes α_k = 0
    others = active[order][1:]
    system = torch.where(others.unsqueeze(1), ridged.T, eye)
    rhs = torch.where(others, target, 0)
    rest = torch.linalg.solve_ex(system, rhs)[0]
    rest = torch.where(torch.isfinite(rest).all() & others, rest, 0)  # a zero task's exactly 0
    ordered = torch.cat([(1 - rest.sum()).unsqueeze(0), rest])
    alpha = torch.empty_like(ordered).scatter_(0, order, ordered)
    return alpha.to(gram.dtype)
