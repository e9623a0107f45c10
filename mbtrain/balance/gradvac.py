"""Gradient Vaccine (Wang et al., ICLR 2021): each task's shared gradient turned toward each other task's until
their cosine reaches a moving average of it, then summed.

For each task i, in turn: g_i' = g_i, then for every other task j in a random order (drawn per i from the
balancer's seeded generator, the same on every rank), with φ = cos(g_i', g_j) and φ̂_ij the pair's target:

    where φ < φ̂_ij:  g_i' += ‖g_i'‖·(φ̂_ij·√(1−φ²) − φ·√(1−φ̂_ij²)) / (‖g_j‖·√(1−φ̂_ij²) + 1e-8) · g_j
    φ̂_ij ← (1−β)·φ̂_ij + β·φ

with φ = g_i'·g_j / (‖g_i'‖·‖g_j‖ + 1e-8) and every φ̂ starting at 0. The shared parameters get Σ_i g_i';
every other parameter the plain sum. The correction is the paper's Eq. 2, the epsilons LibMTL's (GradVac.py).
The target moves at every visit of a pair, as the paper's Eq. 3 and Algorithm 1 (and torchjd's GradVac) have
it; LibMTL moves it only where a correction was made, which lets a target only fall (a visit with φ ≥ φ̂
leaves it), so a target starting at 0 could never turn positive. β = 0.5 is LibMTL's default (--GradVac_beta);
the paper's own runs used 1e-2. The whole shared gradient is one vector (LibMTL's default group type 0, the
"whole model"), not the paper's per-layer groups.

Every g_i' stays in the span of the task gradients, so the corrections run on the [T, T] coefficients and the
Gram matrix (as PCGrad's), at either level: at the representation level the Gram matrix is summed across
ranks first (per_task.py), so the targets move alike on every rank. The rows' corrections are independent of
each other, so weights() takes every row's next pair at once: T−1 batched steps. No host sync: the condition is
a torch.where, the orders reach the device in one copy from pinned memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from mbtrain.balance.base import Gather, Reduce
from mbtrain.balance.per_task import LEVELS, PARAMETERS, WeightedGradients, drawn_on_host
from mbtrain.balance.registry import Setup, register
from mbtrain.checks import in_unit_interval
from mbtrain.space import Range, tuned

EPS = 1e-8  # LibMTL's, under the cosine and the correction's denominator


@dataclass(frozen=True)
class GradVacSettings:
    # β: how fast the targets follow the observed cosines (LibMTL's --GradVac_beta)
    gradvac_beta: float = tuned(0.5, Range(0.001, 0.9, log=True))

    def __post_init__(self) -> None:
        in_unit_interval("--gradvac-beta", self.gradvac_beta)


@register("gradvac")
class GradVac(WeightedGradients):
    method = ("GradVac, Wang et al. (ICLR 2021): each task's shared gradient turned toward each other's where their "
              "cosine falls below its moving average, in a random order seeded by --seed")
    settings_class = GradVacSettings
    levels = LEVELS

    def __init__(self, shared_params: Iterable[torch.Tensor], task_params: Iterable[torch.Tensor] | None = None,
                 rate: float = 0.5, seed: int = 0, reduce: Reduce | None = None, gather: Gather | None = None,
                 level: str = PARAMETERS) -> None:
        GradVacSettings(rate)
        super().__init__(shared_params, task_params, reduce, gather, level)
        self.rate = rate  # β
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU, the same draws on every device
        self.targets: torch.Tensor | None = None  # [T, T] φ̂, made by the first backward

    @classmethod
    def build(cls, setup: Setup, settings: GradVacSettings) -> GradVac:
        return cls(setup.shared, setup.task, settings.gradvac_beta, seed=setup.seed, reduce=setup.reduce,
                   gather=setup.gather, level=setup.level)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        """g_i' = Σ_j c_ij·g_j: g_i'·g_j = c_i·G[:, j], ‖g_i'‖² = c_i·G·c_i, a correction c_ij += w; the sinks
        get Σ_j (Σ_i c_ij)·g_j. Row i's corrections read only c_i, G and its own targets (each visited once, so
        read before and moved after), so the rows go together: at step s each row i takes the s-th task of its
        order, the orders drawn up front as one row at a time would draw them."""
        n_tasks = gram.shape[0]
        targets = self._targets(gram)
        orders = [[j + (j >= i) for j in torch.randperm(n_tasks - 1, generator=self.generator).tolist()]
                  for i in range(n_tasks)]
        # [T-1, T]: at step s, row i's pair (i, j) as its flat index i·T + j
        pairs = drawn_on_host(torch.tensor([[i * n_tasks + order[s] for i, order in enumerate(orders)]
                                            for s in range(n_tasks - 1)]), gram)
        others = pairs % n_tasks  # j
        norms = gram.diagonal().clamp(min=0).sqrt().take(others)  # ‖g_j‖
        target = targets.take(pairs)  # φ̂_ij
        root = (1 - target.square()).clamp(min=0).sqrt()
        below = norms * root + EPS
        coefficients = torch.eye(n_tasks, dtype=gram.dtype, device=gram.device)
        cosines = []
        for at, norm_j, target_j, root_j, below_j in zip(pairs, norms, target, root, below, strict=True):
            product = coefficients @ gram  # row i: c_i·G
            norm = torch.linalg.vecdot(product, coefficients).clamp(min=0).sqrt()  # ‖g_i'‖
            cosine = product.take(at) / (norm * norm_j + EPS)
            step = norm * (target_j * (1 - cosine.square()).clamp(min=0).sqrt() - cosine * root_j) / below_j
            coefficients.view(-1).index_add_(0, at, torch.where(cosine < target_j, step, 0.0))
            cosines.append(cosine)
        targets[pairs // n_tasks, others] = (1 - self.rate) * target + self.rate * torch.stack(cosines)
        return coefficients.sum(dim=0)

    def _targets(self, gram: torch.Tensor) -> torch.Tensor:
        n_tasks = gram.shape[0]
        if self.targets is None:
            self.targets = gram.new_zeros(n_tasks, n_tasks)
        elif self.targets.shape != (n_tasks, n_tasks):
            raise ValueError(f"GradVac state is for {self.targets.shape[0]} losses, got {n_tasks}")
        elif self.targets.device != gram.device or self.targets.dtype != gram.dtype:  # a resumed state
            self.targets = self.targets.to(device=gram.device, dtype=gram.dtype)
        return self.targets

    def state_dict(self) -> dict:
        targets = None if self.targets is None else self.targets.detach().clone()
        return {"generator": self.generator.get_state(), "targets": targets}

    def load_state_dict(self, state: dict) -> None:
        targets = state["targets"]
        if targets is not None and (targets.dim() != 2 or targets.shape[0] != targets.shape[1]
                                    or targets.shape[0] < 2):
            raise ValueError(f"GradVac state holds targets of shape {tuple(targets.shape)}, expected [T, T]")
        self.generator.set_state(state["generator"])
        self.targets = None if targets is None else targets.detach().clone()
