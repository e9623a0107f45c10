"""PCGrad against the authors' algorithm written out here: every task's gradient of the shared parameters
flattened into one vector, projections in the same seeded orders, over several steps."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mbtrain.balance import PCGrad, build_balancer
from mbtrain.models import build_model
from tests.helpers import run_cli

CARDS = [5, 7, 3]


def reference_backward(model: torch.nn.Module, losses: list[torch.Tensor], generator: torch.Generator) -> int:
    """The reference step; returns how many projections it made."""
    shared = model.shared_parameters()
    grads = []
    for loss in losses:
        per_param = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                for g, p in zip(per_param, shared, strict=True)]))
    projected, projections = [], 0
    for i in range(len(losses)):
        g_i = grads[i].clone()
        for j in torch.randperm(len(losses), generator=generator).tolist():
            dot = torch.dot(g_i, grads[j])
            if dot < 0:
                g_i = g_i - dot * grads[j] / grads[j].norm() ** 2
                projections += 1
        projected.append(g_i)
    total, start = sum(projected), 0
    for p in shared:
        p.grad = total[start : start + p.numel()].view_as(p).clone()
        start += p.numel()
    for p, g in zip(model.task_parameters(), torch.autograd.grad(sum(losses), model.task_parameters(),
                                                                 allow_unused=True), strict=True):
        p.grad = g
    return projections


@pytest.mark.parametrize("split", [True, False], ids=["split-forward", "full-backward"])
@pytest.mark.parametrize("name", ["mmoe", "shared-bottom"])
def test_matches_the_reference_over_steps(name: str, split: bool) -> None:
    torch.manual_seed(0)
    sizes = dict(cardinalities=CARDS, num_numeric=2, num_tasks=3, embed_dim=4, hidden=[8, 6], experts=3,
                 tower=[5], dropout=0.0)
    ours, theirs = build_model(name, **sizes).double(), build_model(name, **sizes).double()
    theirs.load_state_dict(ours.state_dict())
    balancer = PCGrad(ours.shared_parameters(), ours.task_parameters() if split else None, seed=7)
    generator = torch.Generator().manual_seed(7)
    conflicts = 0
    for step in range(4):
        data = torch.Generator().manual_seed(step)
        categorical = torch.stack([torch.randint(0, c, (32,), generator=data) for c in CARDS], 1)
        numeric = torch.randn(32, 2, generator=data, dtype=torch.double)
        labels = (torch.rand(32, 3, generator=data) < torch.tensor([0.1, 0.5, 0.8])).double()
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            forward = model.split_forward(categorical, numeric) if model is ours and split else None
            logits = forward.logits if forward is not None else model(categorical, numeric)
            losses = list(F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0).unbind())
            if model is ours:
                balancer.backward(losses, forward)
            else:
                conflicts += reference_backward(model, losses, generator)
        for (label, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=label)
        with torch.no_grad():
            for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
                a.sub_(0.5 * a.grad)
                b.sub_(0.5 * b.grad)
    assert conflicts > 0  # the projections were exercised


def test_the_task_order_is_state() -> None:
    torch.manual_seed(0)
    model = build_model("shared-bottom", cardinalities=CARDS, num_numeric=2, num_tasks=3, embed_dim=4,
                        hidden=[6], experts=1, tower=[], dropout=0.0)
    balancer = build_balancer("pcgrad", model.shared_parameters(), model.task_parameters(), num_tasks=3, seed=3)
    balancer.generator.manual_seed(99)  # as if some steps were taken
    again = build_balancer("pcgrad", model.shared_parameters(), model.task_parameters(), num_tasks=3, seed=3)
    again.load_state_dict(copy.deepcopy(balancer.state_dict()))
    assert torch.equal(torch.randperm(10, generator=again.generator), torch.randperm(10, generator=balancer.generator))


def test_fits_and_resumes_like_a_straight_run(data_dir: Path, tmp_path: Path) -> None:
    common = ["--tasks", "purchase,click", "--balance", "pcgrad", "--batch-size", "64", "--patience", "0",
              "--threads", "1"]
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
    assert torch.equal(a["balancer"]["generator"], b["balancer"]["generator"])
