"""Aligned-MTL (Senushkin et al., CVPR 2023): the tasks' gradients made orthogonal and of equal size, then summed,
which leaves the linear system of gradients a condition number of 1.

With M = G·Gᵀ the tasks' [T, T] Gram matrix (G: the gradients as rows) and M = V·Λ·Vᵀ its eigen-decomposition,
the eigenvalues above the rank tolerance tol = λ_max·T·eps are kept (numpy's matrix_rank rule, as the authors'
solver and LibMTL's Aligned_MTL.py take it), λ_min the smallest kept, and

    B = √λ_min · V·Λ^{-1/2}·Vᵀ    (over the kept eigenpairs),    α = B·𝟙,    combination Σ_k α_k·g_k,

the sum of the aligned gradients Gᵀ·B's columns (B is symmetric: LibMTL's B.sum(0) and the authors'
weights.sum(-1) are the same α). The authors' default scale, λ_min ('min'; they also have 'median' and 'rmse'),
without their optional rescaling of the heads' gradients (scale_decoder_grad, off by default) and with every
task's pre-defined weight 1 (the paper's task weights; --task-weights scales the losses before, which is not the
same). At `--balance-level representation` (the gradients at the trunk's outputs, the trunk back-propagated once)
this is the paper's Aligned-MTL-UB, the upper-bound variant (the authors' `amtlub`); at `parameters` their
`amtl`.

The rank is found without slicing: the eigenpairs below the tolerance are masked out of B, so nothing is read on
the host; eps is that of the Gram matrix's dtype (the reference code's torch.finfo() is the default dtype's: the
same in float32 training), the decomposition itself runs in float64. Every gradient zero (an empty batch): no
eigenvalue is kept and the weights are 0, where the reference code would index an empty tensor. On CUDA,
torch.linalg.eigh reads its solver's convergence flag on the host: a sync inside torch that no eigen-decomposition
in torch avoids; this file adds none.
"""

from __future__ import annotations

from typing import Any

import torch

from mbtrain.balance.per_task import LEVELS, WeightedGradients
from mbtrain.balance.registry import Setup, register


@register("aligned-mtl")
class AlignedMTL(WeightedGradients):
    method = ("Aligned-MTL, Senushkin et al. (CVPR 2023): the tasks' gradients aligned to orthogonal components of "
              "equal size (the Gram matrix's eigen-decomposition), then summed; Aligned-MTL-UB at the "
              "representation level")
    levels = LEVELS

    @classmethod
    def build(cls, setup: Setup, settings: Any) -> AlignedMTL:
        return cls(setup.shared, setup.task, reduce=setup.reduce, gather=setup.gather, level=setup.level)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        return aligned_weights(gram)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Stateless: nothing to restore."""


def aligned_weights(gram: torch.Tensor) -> torch.Tensor:
    """[T] Aligned-MTL's α = B·𝟙 from the [T, T] Gram matrix (module docstring), in `gram`'s dtype."""
    n_tasks = gram.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.to(torch.float64))
    largest = eigenvalues.max()
    kept = eigenvalues > largest * n_tasks * torch.finfo(gram.dtype).eps
    smallest = torch.where(kept, eigenvalues, largest).min()  # the smallest kept (nothing kept: unused)
    scale = torch.where(kept, (smallest / torch.where(kept, eigenvalues, 1)).clamp(min=0).sqrt(), 0)
    b = (eigenvectors * scale) @ eigenvectors.T
    return b.sum(dim=0).to(gram.dtype)
