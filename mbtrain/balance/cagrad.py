"""CAGrad (Liu et al., NeurIPS 2021): conflict-averse gradient descent. The update stays within c·‖g_0‖ of the
average gradient g_0 = (1/T)·Σ_k g_k and, within that ball, maximises the worst task's improvement.

With G the tasks' Gram matrix, the dual's weights w solve min over the simplex of
F(w) = g_wᵀg_0 + c·‖g_0‖·‖g_w‖, g_w = Σ_k w_k·g_k (so g_wᵀg_0 = wᵀG1/T, ‖g_w‖² = wᵀGw); the update is
d = g_0 + (c·‖g_0‖ / ‖g_w‖)·g_w, divided by 1 + c² (the authors' rescale=1) and multiplied by T, as the authors'
overwrite_grad does "to match the sum loss" (LibMTL leaves out the T): the combination's weights are
(1 + T·λ·w_k) / (1 + c²), λ = c·‖g_0‖/‖g_w‖ (0 where g_w = 0), so c = 0 is the plain sum. c = 0.4 is the
authors' setting for NYUv2 (run.sh) and Nash-MTL's default (LibMTL's: 0.5); the paper's analysis wants c in
[0, 1).

Solver (the authors use scipy's SLSQP on the host). Up to EXACT_MAX_TASKS tasks it is solved exactly without a
host sync: on the relative interior of a face S of the simplex where g_w ≠ 0, stationarity reads
G_SS·w = ν·1 − κ·u_S (u = G1/T, κ = ‖g_w‖/(c·‖g_0‖)), Σ w = 1, so w = w_a + κ·w_b with w_a, w_b the solutions of
the support's KKT system [G_SS 1; 1ᵀ 0] for the right-hand sides (0, 1) and (−u_S, 0) (MGDA's systems, batched),
and κ is a root of the scalar quadratic (c²‖g_0‖² − w_bᵀGw_b)·κ² − 2·w_aᵀGw_b·κ − w_aᵀGw_a = 0 (from
‖g_w‖ = c‖g_0‖κ). Every support's two roots and its κ = 0 point (g_w = 0: the min-norm point) are candidates; put on
the simplex each is feasible, and the one of least F is the optimum (as in mgda.py, the optimum's smallest support
has a non-singular system). Above EXACT_MAX_TASKS: FRANK_WOLFE_STEPS Frank–Wolfe steps from the uniform weights (the
authors' starting point) with an exact line search (F along a segment is linear plus c·‖g_0‖ times the square root
of a quadratic), within about 1e-3 of the largest ‖g_k‖² of the optimum on random problems. In float64.

At --balance-level representation G is the Gram matrix of the gradients at the trunk's outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mbtrain.balance.base import Gather, Reduce
from mbtrain.balance.mgda import (
    EXACT_MAX_TASKS,
    FRANK_WOLFE_STEPS,
    best_on_simplex,
    face_systems,
    quadratic_form,
    supports,
)
from mbtrain.balance.per_task import PARAMETERS, WeightedGradients
from mbtrain.balance.registry import Setup, register
from mbtrain.checks import in_unit_interval
from mbtrain.space import Range, tuned


@dataclass(frozen=True)
class CagradSettings:
    # the radius c of the ball around the average gradient, in units of its norm
    cagrad_c: float = tuned(0.4, Range(0.1, 0.9))

    def __post_init__(self) -> None:
        in_unit_interval("--cagrad-c", self.cagrad_c)


@register("cagrad")
class CAGrad(WeightedGradients):
    method = ("CAGrad, Liu et al. (NeurIPS 2021): the average shared gradient moved, within c times its norm, towards "
              "the update that most improves the worst task")
    settings_class = CagradSettings

    def __init__(self, shared_params: Iterable[torch.Tensor], task_params: Iterable[torch.Tensor] | None = None,
                 c: float = 0.4, reduce: Reduce | None = None, gather: Gather | None = None,
                 level: str = PARAMETERS) -> None:
        super().__init__(shared_params, task_params, reduce, gather, level)
        self.c = c

    @classmethod
    def build(cls, setup: Setup, settings: CagradSettings) -> CAGrad:
        return cls(setup.shared, setup.task, c=settings.cagrad_c, reduce=setup.reduce, gather=setup.gather,
                   level=setup.level)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        work = gram.to(torch.float64)
        n_tasks = gram.shape[0]
        radius = self.c * work.mean().clamp(min=0).sqrt()  # c·‖g_0‖
        w = conflict_averse_weights(work, radius)
        norm = quadratic_form(w.unsqueeze(0), work).clamp(min=0).sqrt().squeeze(0)  # ‖g_w‖
        lam = torch.where(norm > 0, radius / norm, torch.zeros_like(norm))
        return ((1 + n_tasks * lam * w) / (1 + self.c**2)).to(gram.dtype)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def conflict_averse_weights(gram: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """[T] w on the simplex minimising wᵀ·gram·1/T + radius·sqrt(wᵀ·gram·w): exact up to EXACT_MAX_TASKS tasks,
    Frank–Wolfe above (module docstring)."""
    if gram.shape[0] <= EXACT_MAX_TASKS:
        return conflict_averse_exact(gram, radius)
    return conflict_averse_frank_wolfe(gram, radius)


def objective(points: torch.Tensor, gram: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """[N] F(w) for each row w of `points`."""
    return points @ gram.mean(dim=1) + radius * quadratic_form(points, gram).clamp(min=0).sqrt()


def conflict_averse_exact(gram: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    n_tasks = gram.shape[0]
    masks = supports(n_tasks, gram.device)
    rhs = gram.new_zeros(masks.shape[0], n_tasks + 1, 2)
    rhs[:, n_tasks, 0] = 1
    rhs[:, :n_tasks, 1] = -masks.to(gram.dtype) * gram.mean(dim=1)
    solutions, _ = torch.linalg.solve_ex(face_systems(gram, masks), rhs)
    base, slope = solutions[:, :n_tasks, 0], solutions[:, :n_tasks, 1]  # w = base + κ·slope
    aa, ab, bb = ((base @ gram) * base).sum(1), ((base @ gram) * slope).sum(1), ((slope @ gram) * slope).sum(1)
    lead = radius.square() - bb  # lead·κ² − 2·ab·κ − aa = 0
    root = (ab.square() + aa * lead).clamp(min=0).sqrt()
    q = ab + torch.where(ab >= 0, root, -root)  # the two roots: q / lead and −aa / q (stable)
    kappas = [q / lead, -aa / q]
    candidates = torch.cat([base, *(base + kappa.unsqueeze(1) * slope for kappa in kappas)])
    return best_on_simplex(candidates, lambda w: objective(w, gram, radius))


def conflict_averse_frank_wolfe(gram: torch.Tensor, radius: torch.Tensor, steps: int = FRANK_WOLFE_STEPS
                                ) -> torch.Tensor:
    n_tasks = gram.shape[0]
    linear = gram.mean(dim=1)  # u = G1/T: F(w) = u·w + radius·sqrt(wᵀGw)
    diagonal = gram.diagonal()
    positions = torch.arange(n_tasks, device=gram.device)
    w = torch.full((n_tasks,), 1 / n_tasks, dtype=gram.dtype, device=gram.device)
    for _ in range(steps):
        toward = gram @ w
        now = (w @ toward).clamp(min=0)  # ‖g_w‖²
        norm = now.sqrt()
        slope = linear + torch.where(norm > 0, radius / norm, torch.zeros_like(norm)) * toward  # ∇F
        vertex = (positions == slope.argmin()).to(gram.dtype)
        # along w + γ·(e_t − w): F = const + rise·γ + radius·sqrt(now + 2·cross·γ + spread·γ²)
        rise = linear @ vertex - linear @ w
        cross = toward @ vertex - now
        spread = (diagonal @ vertex - 2 * (toward @ vertex) + now).clamp(min=0)
        # where F' = 0: with z = cross + spread·γ, radius²·spread·z² = rise²·(z² + now·spread − cross²)
        room = radius.square() * spread - rise.square()
        gap = (now * spread - cross.square()).clamp(min=0)
        z = -torch.sign(rise) * rise.abs() * (gap / room).sqrt()
        inner = ((z - cross) / spread).clamp(0, 1)
        gammas = torch.stack([torch.zeros_like(inner), torch.ones_like(inner), inner])
        values = rise * gammas + radius * (now + 2 * cross * gammas + spread * gammas.square()).clamp(min=0).sqrt()
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, torch.inf))
        gamma = gammas.index_select(0, values.argmin().reshape(1)).squeeze(0)
        w = (1 - gamma) * w + gamma * vertex
    return w
