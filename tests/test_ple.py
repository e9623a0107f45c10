"""PLE: the fused model against a literal per-expert reference, its shared parameters against autograd, and its
split forward against the full per-task backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mbtrain.models import PLE, Inputs, ModelConfig
from tests.helpers import assert_split_metabalance_equals_full, seeded_batch

CARDS = [5, 7, 3]
SHAPES = [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2)]  # (levels, experts per task)


def make(levels: int, each: int, tasks: int = 3, norm: str = "none", hidden: tuple[int, ...] = (6, 5)) -> PLE:
    torch.manual_seed(0)
    config = ModelConfig("ple", embed_dim=4, hidden=list(hidden), experts=3, task_experts=each, levels=levels,
                         tower=[4], norm=norm)
    return PLE(config, Inputs(CARDS, 2, tasks)).double()


def expert(x: torch.Tensor, mlp: torch.nn.Module, e: int) -> torch.Tensor:
    for layer in mlp.layers:
        x = torch.relu(x @ layer.weight[e] + layer.bias[e, 0])
    return x


def literal_forward(model: PLE, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
    """PLE as the paper draws it, expert by expert and task by task, from the fused model's weights."""
    x = torch.cat([model.embedding(categorical), numeric], dim=1)
    tasks = model.num_tasks
    task_in, shared_in = [x] * tasks, x
    for level in model.levels:
        each, count = level.own, level.shared_count
        if level.experts is not None:  # one stack: each task's own experts, task by task, then the shared ones
            shared = [expert(shared_in, level.experts, tasks * each + e) for e in range(count)]
            own = [[expert(task_in[t], level.experts, t * each + j) for j in range(each)] for t in range(tasks)]
        else:
            shared = [expert(shared_in, level.shared_experts, e) for e in range(count)]
            own = [[expert(task_in[t], level.task_experts, t * each + j) for j in range(each)] for t in range(tasks)]
        next_in = []
        for t in range(tasks):
            seen = own[t] + shared  # its own experts first, then the shared ones
            gate = (task_in[t] @ level.task_gates.weight[t] + level.task_gates.bias[t, 0]).softmax(dim=1)
            next_in.append(sum(gate[:, i : i + 1] * out for i, out in enumerate(seen)))
        if level.shared_gate is not None:
            every = [out for outs in own for out in outs] + shared
            gate = level.shared_gate(shared_in).softmax(dim=1)
            shared_in = sum(gate[:, i : i + 1] * out for i, out in enumerate(every))
        task_in = next_in
    return model.towers(torch.stack(task_in))


@pytest.mark.parametrize(("levels", "each"), SHAPES)
def test_fused_ple_equals_the_literal_model(levels: int, each: int) -> None:
    model = make(levels, each)
    categorical, numeric, _ = seeded_batch(0, CARDS, rows=9)
    torch.testing.assert_close(model(categorical, numeric), literal_forward(model, categorical, numeric),
                               rtol=1e-12, atol=1e-12)
    assert len(model.levels) == levels
    assert model.levels[-1].shared_gate is None
    assert all(level.shared_gate is not None for level in list(model.levels)[:-1])


def reached(model: PLE, losses: list[torch.Tensor]) -> dict[tuple[int, int], set[int]]:
    """{(parameter, slice): the tasks whose loss gives it a non-zero gradient}; a slice is an index of the first
    dim of stacked parameters (experts, task gates, towers) and of the embedding table, 0 for the rest."""
    params = list(model.parameters())
    stacked = {id(p) for level in model.levels for module in (level.experts, level.shared_experts, level.task_experts,
                                                              level.task_gates) if module is not None
               for p in module.parameters()}
    stacked |= {id(p) for p in model.towers.parameters()} | {id(model.embedding.table.weight)}
    found: dict[tuple[int, int], set[int]] = {}
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            if g is None:
                continue
            for s, part in enumerate(g.unbind(0) if id(p) in stacked else [g]):
                found.setdefault((i, s), set())
                if torch.count_nonzero(part):
                    found[i, s].add(k)
    return found


@pytest.mark.parametrize(("levels", "each"), SHAPES)
def test_shared_parameters_are_exactly_those_several_tasks_reach(levels: int, each: int) -> None:
    """What autograd says each task's loss reaches, slice by slice: a shared parameter's every slice more than
    one task (of the embedding table, every row the batch holds); a task parameter's every slice one task."""
    model = make(levels, each, norm="layer", hidden=(16, 12))  # layer norm: no expert dead on every row
    categorical, numeric, labels = seeded_batch(1, CARDS, rows=256, rates=(0.3, 0.5, 0.7))
    losses = F.binary_cross_entropy_with_logits(model(categorical, numeric), labels, reduction="none").mean(0)
    found = reached(model, list(losses.unbind()))
    shared = {id(p) for p in model.shared_parameters()}
    params = list(model.parameters())
    absent = set(range(sum(CARDS))) - set((categorical + model.embedding.offsets).flatten().tolist())
    for (i, s), tasks in found.items():
        name = [n for n, p in model.named_parameters() if p is params[i]][0]
        if params[i] is model.embedding.table.weight and s in absent:
            assert not tasks
        elif id(params[i]) in shared:
            assert len(tasks) > 1, f"{name}[{s}] is shared but reached by tasks {tasks}"
        else:
            assert len(tasks) == 1, f"{name}[{s}] is a task parameter but reached by tasks {tasks}"
    assert {id(p) for p in model.shared_parameters()} | {id(p) for p in model.task_parameters()} == \
        {id(p) for p in params}
    assert not shared & {id(p) for p in model.task_parameters()}
    segments = model.shared_segments()
    assert len(segments) == len(model.shared_parameters())


@pytest.mark.parametrize("norm", ["none", "batch"])
@pytest.mark.parametrize(("levels", "each"), SHAPES)
def test_split_forward_metabalance_equals_the_full_backward(levels: int, each: int, norm: str) -> None:
    """MetaBalance through the split forward (heads once, trunk per task) equals its per-task full backward on
    the plain forward, over three steps, for every depth and number of task experts."""
    full, fast = make(levels, each, norm=norm), make(levels, each, norm=norm)
    batches = [seeded_batch(step, CARDS, rows=24, rates=(0.2, 0.5, 0.8)) for step in range(3)]
    assert_split_metabalance_equals_full(full, fast, batches, segments=full.shared_segments())
