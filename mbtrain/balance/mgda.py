"""MGDA (Sener & Koltun, NeurIPS 2018): the shared parameters follow the min-norm point of the tasks' gradients'
convex hull, min_w ‖Σ_k w_k·g_k‖² = wᵀGw over the simplex (w ≥ 0, Σ w = 1), G the tasks' Gram matrix.

Solver. Up to EXACT_MAX_TASKS tasks the problem is solved exactly: every support S (a non-empty subset of the
tasks, 2^T − 1 of them) has its equality-constrained problem min wᵀGw, Σ_S w = 1, w = 0 off S, solved at once
through its KKT system [G_SS 1; 1ᵀ 0] (batched torch.linalg.solve_ex); each solution, its negative entries set to 0
and rescaled to sum 1, is a point of the simplex, and the one of least wᵀGw is the optimum (the optimum's smallest
support has a non-singular KKT system, so it is among them; a singular system only adds a harmless feasible
candidate). Above EXACT_MAX_TASKS: the authors' MinNormSolver's Frank–Wolfe (find_min_norm_element_FW): from the
best pair of tasks, FRANK_WOLFE_STEPS steps towards the vertex of least (Gw)_t with an exact line search, a fixed
count where the authors stop at a tolerance (on random problems of 10 to 16 tasks within about 1e-3 of the
largest ‖g_k‖² of the optimum). Either way no host sync, in float64.

Normalisation (``--mgda-normalization``, the authors' gradient_normalizers, "optional and not in the paper"):
the weights are found for g_k / n_k, n_k = 1 (none), ‖g_k‖ (l2), L_k (loss) or L_k·‖g_k‖ (loss+); a normaliser
that is not positive (a zero gradient or loss) counts as 1. As in the authors' training loop the weights then
multiply the tasks' own (unnormalised) gradients. The default is loss+, the authors' sample configuration
(sample.json); the paper, LibMTL and Nash-MTL's copy default to none.

Scale. The authors' weights sum to 1 (as LibMTL's); Nash-MTL's copy multiplies them by T. mbtrain takes T: the
task heads get the plain sum's gradient (weight 1 each), and with T the shared part is on the same footing, MGDA
of equal orthogonal gradients being the plain sum. (Adam-like optimisers make a constant factor on the shared
gradients nearly moot anyway.) The history's task weights are these T·w.

Level. At --balance-level representation the gradients are those at the trunk's outputs Z and this is the paper's
MGDA-UB (its upper bound, the authors' use_approximation): one trunk backward instead of one per task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from mbtrain.balance.base import Gather, Reduce
from mbtrain.balance.per_task import PARAMETERS, WeightedGradients
from mbtrain.balance.registry import Setup, register
from mbtrain.checks import one_of
from mbtrain.space import tuned

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
EXACT_MAX_TASKS = 8  # 2^8 − 1 = 255 systems of 9 unknowns: still cheap; 2^T grows past that
FRANK_WOLFE_STEPS = 250  # the authors' MinNormSolver.MAX_ITER


@dataclass(frozen=True)
class MgdaSettings:
    mgda_normalization: str = tuned("loss+", NORMALIZATIONS)  # the authors' sample.json; the paper: none

    def __post_init__(self) -> None:
        one_of("--mgda-normalization", self.mgda_normalization, NORMALIZATIONS)


@register("mgda")
class MGDA(WeightedGradients):
    method = ("MGDA, Sener & Koltun (NeurIPS 2018): the min-norm point of the tasks' shared gradients' convex hull "
              "(MGDA-UB at the representation level)")
    settings_class = MgdaSettings
    positive_weights = True  # a task weighed 0 has a zero gradient: the min-norm point, and the shared part stops
    reads_losses = True  # the loss normalisations

    def __init__(self, shared_params: Iterable[torch.Tensor], task_params: Iterable[torch.Tensor] | None = None,
                 normalization: str = "loss+", reduce: Reduce | None = None, gather: Gather | None = None,
                 level: str = PARAMETERS) -> None:
        super().__init__(shared_params, task_params, reduce, gather, level)
        one_of("normalization", normalization, NORMALIZATIONS)
        self.normalization = normalization

    @classmethod
    def build(cls, setup: Setup, settings: MgdaSettings) -> MGDA:
        return cls(setup.shared, setup.task, normalization=settings.mgda_normalization, reduce=setup.reduce,
                   gather=setup.gather, level=setup.level)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        work = gram.to(torch.float64)
        scale = self.normalizers(work)
        normalized = work / scale.unsqueeze(1) / scale.unsqueeze(0)
        return (gram.shape[0] * min_norm_weights(normalized)).to(gram.dtype)

    def normalizers(self, gram: torch.Tensor) -> torch.Tensor:
        """[T] n_k (float64): what each task's gradient is divided by before the min-norm problem."""
        ones = torch.ones_like(gram.diagonal())
        if self.normalization == "none":
            return ones
        norms = gram.diagonal().clamp(min=0).sqrt()
        if self.normalization == "l2":
            found = norms
        else:
            if self.loss_values is None:
                raise ValueError(f"MGDA's {self.normalization!r} normalisation needs the batch's losses")
            losses = self.loss_values.to(gram.device, torch.float64)
            found = losses if self.normalization == "loss" else losses * norms
        return torch.where(found > 0, found, ones)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """[T] w on the simplex minimising wᵀ·gram·w: exact up to EXACT_MAX_TASKS tasks, Frank–Wolfe above."""
    if gram.shape[0] <= EXACT_MAX_TASKS:
        return min_norm_exact(gram)
    return min_norm_frank_wolfe(gram)


def min_norm_exact(gram: torch.Tensor) -> torch.Tensor:
    """Every support's KKT solution, the best feasible one (module docstring)."""
    n_tasks = gram.shape[0]
    masks = supports(n_tasks, gram.device)
    rhs = gram.new_zeros(masks.shape[0], n_tasks + 1, 1)
    rhs[:, n_tasks] = 1
    solutions, _ = torch.linalg.solve_ex(face_systems(gram, masks), rhs)
    return best_on_simplex(solutions[:, :n_tasks, 0], lambda w: quadratic_form(w, gram))


def min_norm_frank_wolfe(gram: torch.Tensor, steps: int = FRANK_WOLFE_STEPS) -> torch.Tensor:
    """The authors' find_min_norm_element_FW with a fixed number of steps (no host sync)."""
    n_tasks = gram.shape[0]
    diagonal = gram.diagonal()
    positions = torch.arange(n_tasks, device=gram.device)
    # the best pair: γ·e_i + (1 − γ)·e_j of least norm, i = j included
    spread = diagonal.unsqueeze(1) + diagonal.unsqueeze(0) - 2 * gram  # ‖g_i − g_j‖²
    share = ((diagonal.unsqueeze(0) - gram) / spread).clamp(0, 1)
    share = torch.where(spread > 0, share, torch.ones_like(share))
    value = (share.square() * diagonal.unsqueeze(1) + 2 * share * (1 - share) * gram
             + (1 - share).square() * diagonal.unsqueeze(0))
    best = value.reshape(-1).argmin()
    first, second = best // n_tasks, best % n_tasks
    gamma = share.reshape(-1).index_select(0, best.reshape(1))
    w = gamma * (positions == first).to(gram.dtype) + (1 - gamma) * (positions == second).to(gram.dtype)
    for _ in range(steps):
        toward = gram @ w
        vertex = (positions == toward.argmin()).to(gram.dtype)
        now, cross, there = w @ toward, toward @ vertex, diagonal @ vertex  # ‖g_w‖², g_w·g_t, ‖g_t‖²
        spread = now + there - 2 * cross
        gamma = torch.where(spread > 0, ((now - cross) / spread).clamp(0, 1), torch.zeros_like(spread))
        w = (1 - gamma) * w + gamma * vertex
    return w


def supports(n_tasks: int, device: torch.device) -> torch.Tensor:
    """[2^T − 1, T] bool: every non-empty subset of the tasks, made on `device` (no copy from the host)."""
    codes = torch.arange(1, 2**n_tasks, device=device)
    return (codes.unsqueeze(1) >> torch.arange(n_tasks, device=device)) & 1 == 1


def face_systems(gram: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[K, T+1, T+1] each support's KKT matrix [G_SS 1_S; 1_Sᵀ 0], with w_j = 0 (an identity row) off S."""
    n_tasks = gram.shape[0]
    inside = masks.to(gram.dtype)
    systems = gram.new_zeros(masks.shape[0], n_tasks + 1, n_tasks + 1)
    systems[:, :n_tasks, :n_tasks] = inside.unsqueeze(2) * gram * inside.unsqueeze(1) + torch.diag_embed(1 - inside)
    systems[:, :n_tasks, n_tasks] = inside
    systems[:, n_tasks, :n_tasks] = inside
    return systems


def best_on_simplex(candidates: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[T] the candidate [N, T] of least objective once put on the simplex (negative entries to 0, rescaled to sum
    1): each one is then feasible, so none can beat the true optimum, which is among them. Non-finite or all-zero
    candidates are left out (a singleton support's never is)."""
    points = candidates.clamp(min=0)
    total = points.sum(dim=1, keepdim=True)
    points = points / total
    values = objective(points)
    usable = (total.squeeze(1) > 0) & torch.isfinite(points).all(dim=1) & torch.isfinite(values)
    best = torch.where(usable, values, torch.full_like(values, torch.inf)).argmin()
    return points.index_select(0, best.reshape(1)).squeeze(0)


def quadratic_form(points: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """[N] wᵀ·gram·w for each row w of `points`."""
    return ((points @ gram) * points).sum(dim=1)
