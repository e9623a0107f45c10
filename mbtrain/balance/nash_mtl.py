"""Nash-MTL (Navon et al., ICML 2022): the tasks bargain over the shared update; the Nash bargaining solution is
Σ_k α_k·g_k with α > 0 solving Gα = 1/α (elementwise), G the tasks' Gram matrix: each task's directional
derivative α_k·g_kᵀ(Σ_j α_j g_j) is 1, so the update has norm √T.

Solver (the authors: cvxpy's ECOS on a sequence of convex approximations, up to 20 of them, on the host). Gα = 1/α
is the stationarity of the convex f(α) = ½αᵀGα − Σ_k log α_k, minimised here by NEWTON_STEPS Newton steps, a fixed
count with no host sync, in float64. f is self-concordant: once the Newton decrement λ is below 1/4 the full step
is taken (quadratic convergence; it moves each α_k by at most λ·α_k, so α stays > 0); before, the step of least f
among the damped one, 1/(1 + λ), which is sure to decrease f, and 1, 2, 4, ... 2^LINE_SEARCH_DOUBLINGS Newton steps
(evaluated side by side: far from the solution α may have to grow by orders of magnitude), capped short of the
boundary α > 0. It runs on the correlation matrix C = D⁻¹GD⁻¹ (D = diag ‖g_k‖), y = Dα, whose solution is the same
(CDα = 1/(Dα)) and whose scale is fixed, from the best multiple of 1; 4 to 8 steps reach rounding on random
problems. On HOST_DEVICES (the CPU), where reading a value costs no sync, the search is skipped where its result
would be discarded and the solve stops after the full step from a λ below STOP_DECREMENT (the next λ, ~its square,
is rounding), the same result within rounding in a fraction of the time. A task whose gradient is zero has no
bargaining solution (α_k → ∞); it gets α_k = 0 (it adds nothing either way) and the others bargain alone. Where no
solution exists (a positive combination of the gradients is 0, e.g. two opposed tasks) f is unbounded below: the
ridge RIDGE_ULPS·T·eps·I on C (eps of the Gram matrix's dtype, which also covers its rounding) keeps it solvable,
the update's norm then at most √T.

The authors' other defaults: update_weights_every = 1 (``--nash-update-weights-every``: solve every so many steps,
in between reuse the last α on the batch's gradients; the per-task gradients are computed every step anyway) and
max_norm = 1.0 (``--nash-max-norm``, 0 for none): the shared gradient is clipped to that norm as
torch.nn.utils.clip_grad_norm_ does (factor max_norm / (norm + 1e-6) where below 1), here as a factor on the
weights, the norm being ‖Σ α_k g_k‖ = sqrt(αᵀGα) where the gradients are combined: the shared parameters, or at
--balance-level representation the trunk's outputs. With the solution's norm √T and max_norm 1, that is the factor
1/√T on every step that solves. optim_niter (20 convex approximations) has no counterpart: Newton converges.

Scale: α as the authors and LibMTL use it (their Σ α_k·L_k), not normalised; the task heads get the plain sum's
gradient as under every gradient balancer here. A constant factor on a task's loss (--task-weights) leaves the
shared update unchanged (α_k scales by its inverse).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mbtrain.balance.base import Gather, Reduce
from mbtrain.balance.per_task import PARAMETERS, WeightedGradients
from mbtrain.balance.registry import Setup, register
from mbtrain.checks import at_least_one, non_negative
from mbtrain.space import Range, tuned

NEWTON_STEPS = 20  # a fixed count; on HOST_DEVICES at most, the solve stopping once converged
LINE_SEARCH_DOUBLINGS = 30  # far from the solution, 1, 2, 4, ..., 2^30 Newton steps are tried too
RIDGE_ULPS = 100  # RIDGE = RIDGE_ULPS·T·eps(the Gram matrix's dtype), on the unit-diagonal C
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s
HOST_DEVICES = ("cpu",)  # where reading a value is no sync: the solve stops once converged
STOP_DECREMENT = 1e-9  # converged: the full step from a decrement below it leaves one of ~its square, rounding


@dataclass(frozen=True)
class NashMtlSettings:
    # solve for α every so many steps (the authors' update_weights_every)
    nash_update_weights_every: int = tuned(1, Range(1, 50, log=True, integer=True))
    # clip the shared gradient's norm to this (the authors' max_norm); 0: no clipping
    nash_max_norm: float = tuned(1.0, Range(0.5, 10.0, log=True))

    def __post_init__(self) -> None:
        at_least_one("--nash-update-weights-every", self.nash_update_weights_every)
        non_negative("--nash-max-norm", self.nash_max_norm, " (0: no clipping)")


@register("nash-mtl")
class NashMTL(WeightedGradients):
    method = ("Nash-MTL, Navon et al. (ICML 2022): the shared gradients weighted by the Nash bargaining solution "
              "Gα = 1/α of their Gram matrix, clipped")
    settings_class = NashMtlSettings

    def __init__(self, shared_params: Iterable[torch.Tensor], task_params: Iterable[torch.Tensor] | None = None,
                 update_weights_every: int = 1, max_norm: float = 1.0, reduce: Reduce | None = None,
                 gather: Gather | None = None, level: str = PARAMETERS) -> None:
        super().__init__(shared_params, task_params, reduce, gather, level)
        self.update_weights_every = update_weights_every
        self.max_norm = max_norm
        self.step = 0
        self.alpha: torch.Tensor | None = None  # [T] float64, the last solution (before clipping)

    @classmethod
    def build(cls, setup: Setup, settings: NashMtlSettings) -> NashMTL:
        return cls(setup.shared, setup.task, update_weights_every=settings.nash_update_weights_every,
                   max_norm=settings.nash_max_norm, reduce=setup.reduce, gather=setup.gather, level=setup.level)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        work = gram.to(torch.float64)
        if self.alpha is None or self.step % self.update_weights_every == 0:
            self.alpha = bargaining_weights(work, ridge(gram))
        self.step += 1
        weights = self.alpha
        if self.max_norm > 0:
            norm = (weights @ work @ weights).clamp(min=0).sqrt()
            weights = weights * (self.max_norm / (norm + CLIP_EPS)).clamp(max=1)
        return weights.to(gram.dtype)

    def state_dict(self) -> dict:
        return {"step": self.step, "alpha": None if self.alpha is None else self.alpha.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        alpha = state["alpha"]
        self.alpha = None if alpha is None else alpha.to(self.shared[0].device, torch.float64)


def ridge(gram: torch.Tensor) -> float:
    return RIDGE_ULPS * gram.shape[0] * torch.finfo(gram.dtype).eps


def bargaining_weights(gram: torch.Tensor, ridge: float, steps: int = NEWTON_STEPS) -> torch.Tensor:
    """[T] α > 0 with gram·α = 1/α (0 for a task whose gradient is zero), by damped Newton on
    ½yᵀ(C + ridge·I)y − Σ log y, C = D⁻¹·gram·D⁻¹, α = y/D (module docstring)."""
    n_tasks = gram.shape[0]
    eye = torch.eye(n_tasks, dtype=gram.dtype, device=gram.device)
    norms = gram.diagonal().clamp(min=0).sqrt()
    reached = norms > 0
    scale = torch.where(reached, norms, torch.ones_like(norms))
    correlation = gram / scale.unsqueeze(1) / scale.unsqueeze(0)
    both = reached.unsqueeze(1) & reached.unsqueeze(0)
    correlation = torch.where(both, correlation, eye)  # a zero gradient's task: alone, with a unit curvature
    curvature = correlation + ridge * eye
    y = (n_tasks / curvature.sum()).sqrt() * torch.ones_like(norms)  # argmin over s of f(s·1)
    stretch = 2.0 ** torch.arange(LINE_SEARCH_DOUBLINGS + 1, dtype=gram.dtype, device=gram.device)
    on_host = gram.device.type in HOST_DEVICES
    for _ in range(steps):
        slope = curvature @ y - y.reciprocal()
        hessian = curvature + torch.diag_embed(y.pow(-2))
        move = torch.linalg.solve_ex(hessian, -slope)[0]
        decrement = (-(slope @ move)).clamp(min=0).sqrt()
        near = decrement < 0.25  # then |move_k| ≤ decrement·y_k: the full step keeps y > 0
        if on_host and near:  # the search below would be discarded
            y = y + move
            if decrement < STOP_DECREMENT:
                break
            continue
        boundary = torch.where(move < 0, -0.99 * y / move, torch.full_like(y, torch.inf)).min()
        sizes = torch.minimum(torch.cat([(1 / (1 + decrement)).reshape(1), stretch]), boundary)
        tried = y + sizes.unsqueeze(1) * move  # [S, T]: the damped step and 1, 2, 4, ... times the Newton step
        values = 0.5 * ((tried @ curvature) * tried).sum(dim=1) - tried.clamp(min=0).log().sum(dim=1)
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, torch.inf))
        searched = tried.index_select(0, values.argmin().reshape(1)).squeeze(0)
        y = torch.where(near, y + move, searched)
    return torch.where(reached, y / scale, torch.zeros_like(y))
