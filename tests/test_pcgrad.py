"""PCGrad against the authors' algorithm written out here: every task's gradient of the shared parameters
flattened into one vector, projections in the same seeded orders, over several steps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mbtrain.balance import PCGrad, Setup, build_balancer
from mbtrain.models import Inputs, ModelConfig, build_model
from tests.helpers import assert_same_grads_then_step, dense, seeded_batch, twin_models

CARDS = [5, 7, 3]


def reference_backward(model: torch.nn.Module, losses: list[torch.Tensor], generator: torch.Generator) -> int:
    """The reference step; returns how many projections it made."""
    shared = model.shared_parameters()
    grads = []
    for loss in losses:
        per_param = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if g is None else dense(g)).reshape(-1)
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
@pytest.mark.parametrize("name", ["mmoe", "shared-bottom", "ple", "esmm"])
def test_matches_the_reference_over_steps(name: str, split: bool) -> None:
    ours, theirs = twin_models(name, CARDS)
    balancer = PCGrad(ours.shared_parameters(), ours.task_parameters() if split else None, seed=7)
    generator = torch.Generator().manual_seed(7)
    conflicts = 0
    for step in range(4):
        categorical, numeric, labels = seeded_batch(step, CARDS)
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            forward = model.split_forward(categorical, numeric) if model is ours and split else None
            logits = forward.logits if forward is not None else model(categorical, numeric)
            losses = list(F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0).unbind())
            if model is ours:
                balancer.backward(losses, forward)
            else:
                conflicts += reference_backward(model, losses, generator)
        assert_same_grads_then_step(ours, theirs, 0.5)
    assert conflicts > 0  # the projections were exercised


def test_the_task_order_is_state() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig("shared-bottom", embed_dim=4, hidden=[6], experts=1, tower=[], dropout=0.0),
                        Inputs(CARDS, num_numeric=2, num_tasks=3))
    balancer = build_balancer("pcgrad", Setup.of(model, num_tasks=3, seed=3))
    balancer.generator.manual_seed(99)  # as if some steps were taken
    again = build_balancer("pcgrad", Setup.of(model, num_tasks=3, seed=3))
    again.load_state_dict(copy.deepcopy(balancer.state_dict()))
    assert torch.equal(torch.randperm(10, generator=again.generator), torch.randperm(10, generator=balancer.generator))
