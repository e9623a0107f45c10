"""MultiBalance against a literal reference: per-task boundary gradients one task at a time, norms and moving
averages in Python floats per representation tensor (per expert), MetaBalance's formula, one trunk backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mbtrain.balance import MultiBalance, Setup, build_balancer
from mbtrain.balance.metabalance import MetaBalanceSettings
from mbtrain.models import Inputs, ModelConfig, build_model
from tests.helpers import assert_same_grads_then_step, seeded_batch, twin_models

EPS = 1e-5

CARDS = [5, 7, 3]


class Reference:
    def __init__(self, relax: float, beta: float, strategy: str) -> None:
        self.relax, self.beta, self.strategy = relax, beta, strategy
        self.moving: dict[tuple[int, int, int], float] = {}  # (task, boundary, expert) -> m

    def backward(self, model: torch.nn.Module, losses: list[torch.Tensor], split) -> None:
        task_params = model.task_parameters()
        for p, g in zip(task_params, torch.autograd.grad(sum(losses), task_params, retain_graph=True,
                                                         allow_unused=True), strict=True):
            if g is not None:
                p.grad = g.clone()
        per_task = []
        for k, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, split.per_task, retain_graph=True, allow_unused=True)
            per_task.append([None if g is None else g[k] for g in grads])
        combined = []
        for i, grouped in enumerate(split.per_expert):
            experts = split.boundary[i].shape[0] if grouped else 1
            total = torch.zeros_like(split.boundary[i])
            for e in range(experts):
                parts = []
                for k in range(len(losses)):
                    g = per_task[k][i]
                    g = torch.zeros_like(split.boundary[i]) if g is None else g
                    parts.append(g[e] if grouped else g)
                    m = self.moving.get((k, i, e), 0.0)
                    self.moving[k, i, e] = self.beta * m + (1 - self.beta) * parts[k].norm().item()
                m0 = self.moving[0, i, e]
                piece = parts[0].clone()
                for k in range(1, len(losses)):
                    mk = self.moving[k, i, e]
                    applies = (self.strategy == "both" or (self.strategy == "reduce" and mk > m0)
                               or (self.strategy == "enlarge" and mk < m0))
                    scale = self.relax * m0 / (mk + EPS) + (1 - self.relax) if applies else 1.0
                    piece = piece + scale * parts[k]
                if grouped:
                    total[e] = piece
                else:
                    total = piece
            combined.append(total)
        torch.autograd.backward(split.boundary, grad_tensors=combined)


@pytest.mark.parametrize("strategy", ["both", "reduce", "enlarge"])
@pytest.mark.parametrize("name", ["mmoe", "shared-bottom", "ple", "esmm"])
def test_matches_the_literal_reference_over_steps(name: str, strategy: str) -> None:
    ours, theirs = twin_models(name, CARDS)
    balancer = MultiBalance(list(ours.parameters()), ours.task_parameters(), relax_factor=0.6, beta=0.8,
                            strategy=strategy)
    reference = Reference(0.6, 0.8, strategy)
    for step in range(4):
        categorical, numeric, labels = seeded_batch(step, CARDS, rates=(0.1, 0.3, 0.6))
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            split = model.split_forward(categorical, numeric)
            losses = F.binary_cross_entropy_with_logits(split.logits, labels, reduction="none").mean(0)
            losses = losses * torch.tensor([1.0, 5.0, 0.3], dtype=torch.double)  # norms on both sides of main's
            if model is ours:
                balancer.backward(list(losses.unbind()), split)
            else:
                reference.backward(model, list(losses.unbind()), split)
        assert_same_grads_then_step(ours, theirs, 0.5)
    expected = sorted(reference.moving.values())
    assert sorted(balancer.moving_norms.flatten().tolist()) == pytest.approx(expected, rel=1e-9, abs=1e-15)
    experts = [f"level0.experts/{e}" for e in range(6)] + [f"level1.shared_experts/{e}" for e in range(3)]
    assert balancer.ratio_names == {"shared-bottom": ["bottom"], "mmoe": ["inputs", "experts/0", "experts/1",
                                                                          "experts/2"],
                                    "esmm": ["inputs"], "ple": ["inputs", *experts]}[name]


def test_state_round_trip_and_bad_use() -> None:
    torch.manual_seed(1)
    model = build_model(ModelConfig("mmoe", embed_dim=4, hidden=[6], experts=2, tower=[], dropout=0.0),
                        Inputs(CARDS, num_numeric=2, num_tasks=2))
    balancer = build_balancer("multibalance", Setup.of(model, num_tasks=2))
    categorical = torch.zeros(4, 3, dtype=torch.long)
    split = model.split_forward(categorical, torch.zeros(4, 2))
    balancer.backward(list(F.binary_cross_entropy_with_logits(split.logits, torch.ones(4, 2),
                                                              reduction="none").mean(0).unbind()), split)
    again = build_balancer("multibalance", Setup.of(model, num_tasks=2), MetaBalanceSettings(relax_factor=0.1))
    again.load_state_dict(copy.deepcopy(balancer.state_dict()))
    assert torch.equal(again.moving_norms, balancer.moving_norms) and again.relax_factor == 0.7
    with pytest.raises(ValueError, match="needs the model's split forward"):
        balancer.backward([torch.tensor(1.0), torch.tensor(2.0)])
