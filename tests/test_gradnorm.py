"""GradNorm against the paper's procedure written out here with double backward on the full model: the
weights' gradient from Σ|G_k − Ḡ·r_k^α| (target held constant) at the last shared layer, renormalised weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mbtrain.balance import GradNorm
from tests.helpers import Adam, seeded_batch, twin_models

CARDS = [5, 7, 3]


def last_shared(model: torch.nn.Module) -> torch.Tensor:
    """The paper's W: the last shared layer's weight (ESMM shares its embedding table only)."""
    if hasattr(model, "levels"):
        return model.levels[-1].shared_experts.layers[-1].weight
    if hasattr(model, "experts"):
        return model.experts.layers[-1].weight
    if hasattr(model, "bottom"):
        return [layer for layer in model.bottom if isinstance(layer, torch.nn.Linear)][-1].weight
    return model.embedding.table.weight


@pytest.mark.parametrize("alpha", [1.5, 0.5])
@pytest.mark.parametrize("name", ["mmoe", "shared-bottom", "ple", "esmm"])
def test_matches_the_papers_procedure_over_steps(name: str, alpha: float) -> None:
    ours, theirs = twin_models(name, CARDS)
    theirs.embedding.table.sparse = False  # the reference differentiates ESMM's table's gradient: a dense one
    balancer = GradNorm(3, list(ours.parameters()), ours.task_parameters(), alpha=alpha)
    ours_optimizer = Adam([*ours.parameters(), *balancer.parameters()], lr=0.02)
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.double))
    theirs_optimizer = Adam([*theirs.parameters(), w], lr=0.02)
    initial = None
    for step in range(5):
        categorical, numeric, labels = seeded_batch(step, CARDS)
        scale = torch.tensor([1.0, 4.0, 0.3], dtype=torch.double)

        ours_optimizer.zero_grad()
        split = ours.split_forward(categorical, numeric)
        losses = F.binary_cross_entropy_with_logits(split.logits, labels, reduction="none").mean(0) * scale
        balancer.backward(list(losses.unbind()), split)
        ours_optimizer.step()

        theirs_optimizer.zero_grad()
        with torch.no_grad():
            w.mul_(3 / w.sum())
        losses = F.binary_cross_entropy_with_logits(theirs(categorical, numeric), labels, reduction="none").mean(0)
        losses = losses * scale
        norms = torch.stack([torch.autograd.grad(w[k] * losses[k], last_shared(theirs), retain_graph=True,
                                                 create_graph=True)[0].norm() for k in range(3)])
        initial = losses.detach() if initial is None else initial
        rate = losses.detach() / initial
        target = (norms.mean() * (rate / rate.mean()) ** alpha).detach()
        (weights_grad,) = torch.autograd.grad((norms - target).abs().sum(), w, retain_graph=True)
        (w.detach() * losses).sum().backward()
        w.grad = weights_grad
        theirs_optimizer.step()

        for (label, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=label)
        torch.testing.assert_close(balancer.weights.detach(), w.detach())
    assert not torch.allclose(w.detach(), torch.ones(3, dtype=torch.double))  # the weights moved
