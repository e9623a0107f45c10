"""MetaBalance (He et al., WWW 2022): rescale each auxiliary task's gradient on the shared parameters
towards the main task's gradient magnitude, using moving averages of per-task gradient norms.

The formula, per logical tensor: docs/architecture.md, "MetaBalance, exactly". Per-task gradients are taken
for the shared parameters only; all arithmetic runs as ``torch._foreach_*`` ops or on the small ``[T, P]`` norm
tensor, with no per-parameter Python arithmetic (finding the batch's distinct table rows on the split path is
its one host sync). The per-task gradients come from balance/per_task.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mbtrain.balance.base import Gather, Reduce
from mbtrain.balance.per_task import LEVELS, REPRESENTATION, PerTaskGradients, RowGradient, Sinks, accumulate
from mbtrain.balance.registry import Setup, register
from mbtrain.checks import in_unit_interval, one_of
from mbtrain.space import Range, tuned

if TYPE_CHECKING:
    from mbtrain.balance.multibalance import MultiBalance

STRATEGIES = ("both", "reduce", "enlarge")


@dataclass(frozen=True)
class MetaBalanceSettings:
    """MetaBalance's settings, the paper's defaults (MultiBalance's too)."""

    # r: how far each auxiliary gradient's norm moves toward the main task's
    relax_factor: float = tuned(0.7, Range(0.3, 0.95))
    beta: float = tuned(0.9, Range(0.5, 0.99))  # the moving averages' factor
    # rescale always (both), only larger auxiliary norms (reduce) or only smaller (enlarge)
    strategy: str = tuned("both", STRATEGIES)

    def __post_init__(self) -> None:
        in_unit_interval("--relax-factor", self.relax_factor)
        in_unit_interval("--beta", self.beta)
        one_of("--strategy", self.strategy, STRATEGIES)


@register("metabalance")
class MetaBalance(PerTaskGradients):
    """Balanced gradients on ``shared_params``; every other parameter gets ``sum(losses)``'s gradient
    (the per-task machinery and its torchrun exactness: balance/per_task.py)."""

    method = ("MetaBalance, He et al. (WWW 2022): each auxiliary task's gradient of each shared tensor rescaled "
              "toward the main task's magnitude")
    settings_class = MetaBalanceSettings
    levels = LEVELS  # at the representation level it is MultiBalance (balance/multibalance.py)

    def __init__(
        self,
        shared_params: Iterable[torch.Tensor],
        relax_factor: float = 0.7,
        beta: float = 0.9,
        strategy: str = "both",
        eps: float = 1e-5,
        task_params: Iterable[torch.Tensor] | None = None,
        reduce: Reduce | None = None,
        gather: Gather | None = None,
        segments: Sequence[torch.Tensor | None] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        MetaBalanceSettings(relax_factor, beta, strategy)
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(shared_params, task_params, reduce, gather)
        # per shared tensor: which logical tensor each index of its first dim belongs to (the model's
        # shared_segments(): a feature's rows of the fused table, an expert's slice), None for one tensor
        self.segments = list(segments) if segments is not None else [None] * len(self.shared)
        if len(self.segments) != len(self.shared):
            raise ValueError(f"{len(self.segments)} segment maps for {len(self.shared)} shared parameters")
        for p, seg in zip(self.shared, self.segments, strict=True):
            if seg is not None and (seg.dim() != 1 or seg.numel() != p.shape[0] or seg.dtype != torch.long):
                raise ValueError(f"a segment map must be int64 [{p.shape[0]}] for a parameter of shape "
                                 f"{tuple(p.shape)}")
        # a table without rows (no categorical column) holds no logical tensor
        self.segment_counts = [1 if seg is None else int(seg.max()) + 1 if seg.numel() else 0
                               for seg in self.segments]
        # per shared tensor: whether each index of its first dim is a logical tensor of its own (stacked experts):
        # its norms are one vector_norm over the other dims and its factors a slice, no segment sum or gather
        self.by_index = [seg is not None and torch.equal(seg.cpu(), torch.arange(seg.numel())) for seg in self.segments]
        self.starts = [sum(self.segment_counts[:i]) for i in range(len(self.segments))]
        names = list(names) if names is not None else [f"shared_{i}" for i in range(len(self.shared))]
        self.ratio_names = [name if count == 1 else f"{name}/{j}"
                            for name, count in zip(names, self.segment_counts, strict=True) for j in range(count)]
        self.relax_factor = relax_factor
        self.beta = beta
        self.strategy = strategy
        self.eps = eps
        self.moving_norms: torch.Tensor | None = None  # [T, L] over the logical tensors, made by the first backward
        self.grad_norm_ratio: torch.Tensor | None = None
        self.norm_ratios: torch.Tensor | None = None

    @classmethod
    def build(cls, setup: Setup, settings: MetaBalanceSettings) -> PerTaskGradients | MultiBalance:
        if setup.level == REPRESENTATION:
            from mbtrain.balance.multibalance import MultiBalance  # it builds on this module

            return MultiBalance.build(setup, settings)
        return cls(setup.shared, settings.relax_factor, settings.beta, settings.strategy, task_params=setup.task,
                   reduce=setup.reduce, gather=setup.gather, segments=setup.segments, names=setup.shared_names)

    def combine(self, sinks: Sinks, task_grads: list[list[torch.Tensor | None]]) -> None:
        """Per logical shared tensor: update each task's moving norm, then add the main task's gradient and
        each auxiliary task's rescaled one (docs/architecture.md)."""
        moving = self._moving_norms(len(task_grads))
        segment_ids = [self._segment_ids(i, sink) for i, sink in enumerate(sinks)]
        raw_norms = torch.stack([self._norms(grads, segment_ids) for grads in task_grads])  # [T, L]
        moving.mul_(self.beta).add_(raw_norms, alpha=1 - self.beta)
        scales = self._scale(moving[:1], moving[1:])  # [T − 1, L], every auxiliary task's at once
        for k, grads in enumerate(task_grads):
            accumulate(sinks, grads, None if k == 0 else self._factors(scales[k - 1], grads, segment_ids))
        self.norm_ratios, self.grad_norm_ratio = norm_ratios(raw_norms, self.eps)

    def _segment_ids(self, i: int, sink: object) -> torch.Tensor | None:
        """The logical tensor of each index of sink i's gradient's first dim (on the split path the embedding
        table's gradient holds only the batch's rows: `sink.rows`)."""
        seg = self.segments[i]
        if seg is None:
            return None
        if seg.device != self.shared[i].device:  # moved once, with the model
            seg = self.segments[i] = seg.to(self.shared[i].device)
        return seg[sink.rows] if isinstance(sink, RowGradient) and sink.rows is not None else seg

    def _factors(self, scale: torch.Tensor, grads: Sequence[torch.Tensor | None],
                 segment_ids: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Each gradient's factor: a scalar for one logical tensor, else one per index of its first dim."""
        factors = []
        for i, (g, seg) in enumerate(zip(grads, segment_ids, strict=True)):
            start = self.starts[i]
            if seg is None or g is None:
                factors.append(scale[start])
            elif self._whole_dim(i, g):
                factors.append(scale[start : start + g.shape[0]].view(-1, *[1] * (g.dim() - 1)))
            else:
                factors.append(scale[start + seg].view(-1, *[1] * (g.dim() - 1)))
        return factors

    def _whole_dim(self, i: int, grad: torch.Tensor) -> bool:
        """Whether `grad` (of shared tensor i) holds each of its logical tensors as one index of its first dim:
        stacked experts, or a table whose every row is a feature's when the batch reached them all."""
        return self.by_index[i] and grad.shape[0] == self.segment_counts[i]

    def state_dict(self) -> dict:
        moving = None if self.moving_norms is None else self.moving_norms.detach().clone()
        return {
            "moving_norms": moving,
            "relax_factor": self.relax_factor,
            "beta": self.beta,
            "strategy": self.strategy,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the moving averages and, as ``torch.optim`` does, the settings they were made with."""
        MetaBalanceSettings(state["relax_factor"], state["beta"], state["strategy"])
        moving = state["moving_norms"]
        if moving is not None:
            logical = sum(self.segment_counts)
            if moving.dim() != 2 or moving.shape[0] < 2 or moving.shape[1] != logical:
                raise ValueError(
                    f"MetaBalance state has moving norms of shape {tuple(moving.shape)}, "
                    f"expected [tasks >= 2, {logical}] for {logical} logical shared tensors"
                )
            p0 = self.shared[0]
            moving = moving.detach().to(device=p0.device, dtype=p0.dtype, copy=True)
        self.relax_factor = state["relax_factor"]
        self.beta = state["beta"]
        self.strategy = state["strategy"]
        self.moving_norms = moving

    def _moving_norms(self, n_tasks: int) -> torch.Tensor:
        p0 = self.shared[0]
        if self.moving_norms is None:
            self.moving_norms = torch.zeros(n_tasks, sum(self.segment_counts), device=p0.device, dtype=p0.dtype)
        elif self.moving_norms.shape[0] != n_tasks:
            raise ValueError(f"MetaBalance state is for {self.moving_norms.shape[0]} losses, got {n_tasks}")
        elif self.moving_norms.device != p0.device:  # the model moved after the state was made
            self.moving_norms = self.moving_norms.to(p0.device)
        return self.moving_norms

    def _norms(self, grads: Sequence[torch.Tensor | None], segment_ids: list[torch.Tensor | None]) -> torch.Tensor:
        """``[L]`` L2 norms of the logical tensors: whole parameters in one _foreach_norm, segmented ones by a
        segment sum of their first dim's squared norms; a task that does not reach one has norm 0."""
        whole = [g for g, seg in zip(grads, segment_ids, strict=True) if g is not None and seg is None]
        found = iter(torch._foreach_norm(whole) if whole else ())
        parts = []
        for i, (g, seg) in enumerate(zip(grads, segment_ids, strict=True)):
            if g is None or not self.segment_counts[i]:
                parts.append(self.shared[0].new_zeros(self.segment_counts[i]))
            elif seg is None:
                parts.append(next(found).reshape(1))
            elif self._whole_dim(i, g):
                parts.append(_row_norms(g))
            else:
                squared = _row_norms(g).square()
                parts.append(g.new_zeros(self.segment_counts[i]).index_add_(0, seg, squared).sqrt())
        return torch.cat(parts)

    def _scale(self, main: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        return balanced_scale(main, aux, self.relax_factor, self.strategy, self.eps)


def _row_norms(grad: torch.Tensor) -> torch.Tensor:
    """[n] the L2 norm of each index of the first dim, read in whatever strides autograd made (no reshape copy)."""
    return torch.linalg.vector_norm(grad, dim=tuple(range(1, grad.dim()))) if grad.dim() > 1 else grad.abs()


def norm_ratios(norms: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, G] each task's gradient norm over the main task's, per group; [T] their mean over the groups), the
    main task's row 1: what the history and TensorBoard show of MetaBalance and MultiBalance."""
    ratios = norms / (norms[0] + eps)
    ratios[0] = 1.0
    return ratios, ratios.mean(dim=1)


def balanced_scale(main: torch.Tensor, aux: torch.Tensor, relax_factor: float, strategy: str, eps: float
                   ) -> torch.Tensor:
    """The factor s with r·g·m_0/(m_k+ε) + (1−r)·g = s·g, elementwise over moving norms `main` (m_0) and `aux`
    (m_k); 1 where the strategy does not apply."""
    scale = relax_factor * main / (aux + eps) + (1 - relax_factor)
    if strategy == "reduce":
        return torch.where(aux > main, scale, 1.0)
    if strategy == "enlarge":
        return torch.where(aux < main, scale, 1.0)
    return scale
