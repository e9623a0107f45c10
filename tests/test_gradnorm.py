"""GradNorm against the paper's procedure written out here with double backward on the full model: the
weights' gradient from Σ|G_k − Ḡ·r_k^α| (target held constant) at the last shared layer, renormalised weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mbtrain.balance import GradNorm
from mbtrain.models import build_model
from tests.helpers import run_cli

CARDS = [5, 7, 3]


def last_shared(model: torch.nn.Module) -> torch.Tensor:
    if hasattr(model, "experts"):
        return model.experts.layers[-1].weight
    return [layer for layer in model.bottom if isinstance(layer, torch.nn.Linear)][-1].weight


@pytest.mark.parametrize("alpha", [1.5, 0.5])
@pytest.mark.parametrize("name", ["mmoe", "shared-bottom"])
def test_matches_the_papers_procedure_over_steps(name: str, alpha: float) -> None:
    torch.manual_seed(0)
    sizes = dict(cardinalities=CARDS, num_numeric=2, num_tasks=3, embed_dim=4, hidden=[8, 6], experts=3,
                 tower=[5], dropout=0.0)
    ours, theirs = build_model(name, **sizes).double(), build_model(name, **sizes).double()
    theirs.load_state_dict(ours.state_dict())
    balancer = GradNorm(3, list(ours.parameters()), ours.task_parameters(), alpha=alpha)
    ours_optimizer = torch.optim.Adam([*ours.parameters(), *balancer.parameters()], lr=0.02)
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.double))
    theirs_optimizer = torch.optim.Adam([*theirs.parameters(), w], lr=0.02)
    initial = None
    for step in range(5):
        data = torch.Generator().manual_seed(step)
        categorical = torch.stack([torch.randint(0, c, (32,), generator=data) for c in CARDS], 1)
        numeric = torch.randn(32, 2, generator=data, dtype=torch.double)
        labels = (torch.rand(32, 3, generator=data) < torch.tensor([0.1, 0.5, 0.8])).double()
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


def test_fits_and_resumes_like_a_straight_run(data_dir: Path, tmp_path: Path) -> None:
    common = ["--tasks", "purchase,click", "--balance", "gradnorm", "--gradnorm-alpha", "1", "--batch-size", "64",
              "--patience", "0", "--threads", "1"]
    train = str(data_dir / "train.parquet")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli("fit", train, *common, "--epochs", "3", "--out", str(straight)).exit_code == 0
    assert run_cli("fit", train, *common, "--epochs", "1", "--out", str(split)).exit_code == 0
    result = run_cli("fit", "--resume", "--out", str(split), "--epochs", "3")
    assert result.exit_code == 0, result.output
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(a["balancer"]["weights"], b["balancer"]["weights"])
    assert a["balancer"]["alpha"] == 1.0
