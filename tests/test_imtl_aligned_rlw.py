"""IMTL-G, Aligned-MTL, IMTL-L and RLW against their formulas written out here as the papers and LibMTL write them
(every task's gradient flattened into one vector, at either level), over several steps; degenerate Gram matrices;
RLW's seeded draws; the state round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mbtrain.balance import IMTLL, RLW, Balancer, Setup, build_balancer
from mbtrain.balance.aligned_mtl import aligned_weights
from mbtrain.balance.imtl import imtl_weights
from mbtrain.balance.per_task import PARAMETERS, REPRESENTATION
from mbtrain.models.split import SplitForward
from tests.helpers import (
    Adam,
    TinyThreeTasks,
    assert_resumes_identically,
    assert_same_grads_then_step,
    flat_grads,
    heads_get,
    losses_of,
    seeded_batch,
    step_side_by_side,
    twin_models,
    unflatten,
)

# (cardinalities, batch rows): the split path's table gradients on the batch's rows (a table bigger than the
# batch's entries) or on the whole table
TABLES = {"batch-rows": ([40, 50, 30], 16), "whole-table": ([5, 7, 3], 32)}
TASKS = 3


# the formulas, literally: g is [T, dim], one flattened gradient per task


def imtl_reference(g: torch.Tensor) -> torch.Tensor:
    """IMTL-G (Liu et al. 2021, eq. 5; LibMTL's IMTL.py), with the ridge of imtl.py in the authors' fallback form
    inverse(εI + D·Uᵀ), ε = 1e-8·max‖g_k‖."""
    u = g / g.norm(dim=1, keepdim=True)
    d, unit = g[0] - g[1:], u[0] - u[1:]
    ridge = 1e-8 * g.norm(dim=1).max() * torch.eye(len(g) - 1, dtype=g.dtype)
    alpha = g[0] @ unit.T @ torch.inverse(d @ unit.T + ridge)
    return torch.cat([1 - alpha.sum().unsqueeze(0), alpha])


def aligned_reference(g: torch.Tensor) -> torch.Tensor:
    """Aligned-MTL (Senushkin et al. 2023; LibMTL's Aligned_MTL.py): the rank by slicing the sorted eigenpairs."""
    m = (g @ g.T).numpy()
    lam, v = np.linalg.eigh(m)
    rank = int((lam > lam.max() * m.shape[0] * np.finfo(m.dtype).eps).sum())
    order = np.argsort(lam)[::-1]
    lam, v = lam[order][:rank], v[:, order][:, :rank]
    b = np.sqrt(lam[-1]) * (v @ np.diag(1 / np.sqrt(lam)) @ v.T)
    return torch.from_numpy(b.sum(axis=0))


REFERENCES = {"imtl": imtl_reference, "aligned-mtl": aligned_reference}


def reference_backward(model: nn.Module, losses: list[torch.Tensor], split: SplitForward | None, balance: str
                       ) -> torch.Tensor:
    """The heads get the plain sum's gradient; the shared part Σ_k α_k·g_k, α by the literal formula on the
    flattened gradients of the shared parameters (split None) or of the trunk's outputs (then the trunk
    back-propagated once with the combination). Returns α."""
    heads_get(model, sum(losses))
    if split is None:
        shared = model.shared_parameters()
        g = flat_grads(losses, shared)
        alpha = REFERENCES[balance](g)
        for p, part in zip(shared, unflatten(alpha @ g, shared), strict=True):
            p.grad = part
        return alpha
    # the trunk's outputs: task k's gradient is the sum over the per-task views its loss reads
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, split.per_task, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(b) if grad is None else grad.sum(dim=0)).reshape(-1)
                               for grad, b in zip(grads, split.boundary, strict=True)]))
    g = torch.stack(rows)
    alpha = REFERENCES[balance](g)
    torch.autograd.backward(split.boundary, grad_tensors=unflatten(alpha @ g, split.boundary))
    return alpha


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("model_name", ["mmoe", "esmm"])
@pytest.mark.parametrize(("level", "split"), [(PARAMETERS, True), (PARAMETERS, False), (REPRESENTATION, True)],
                         ids=["parameters-split", "parameters-full", "representation"])
@pytest.mark.parametrize("balance", REFERENCES)
def test_gradient_balancers_match_the_literal_formula_over_steps(balance: str, level: str, split: bool,
                                                                 model_name: str, table: str) -> None:
    cards, rows = TABLES[table]
    ours, theirs = twin_models(model_name, cards)
    balancer = build_balancer(balance, Setup.of(ours, num_tasks=TASKS, level=level))
    for step in range(4):
        alpha = step_side_by_side(ours, theirs, balancer, seeded_batch(step, cards, rows), split, level,
                                  lambda model, losses, forward: reference_backward(model, losses, forward, balance))
        torch.testing.assert_close(balancer.task_weights, alpha, rtol=1e-9, atol=1e-12)
        assert_same_grads_then_step(ours, theirs, 0.5)
    assert alpha.std() > 1e-3  # the tasks were weighed apart


def gram_of(rows: list[torch.Tensor]) -> torch.Tensor:
    g = torch.stack(rows)
    return g @ g.T


def _vectors(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randn(4, 30, generator=generator, dtype=torch.float64).unbind())


def test_imtl_equalises_the_projections_onto_the_unit_gradients() -> None:
    a, b, c, d = _vectors(0)
    for rows in ([a, b], [a, 5 * b, 0.1 * c], [a, b, c, d]):
        g = torch.stack(rows)
        alpha = imtl_weights(g @ g.T)
        projections = (g / g.norm(dim=1, keepdim=True)) @ (alpha @ g)
        # equal up to the ridge (1e-8 of the largest gradient's norm against the smallest's 0.1)
        torch.testing.assert_close(projections, projections[:1].expand_as(projections), rtol=1e-5, atol=0)
        assert alpha.sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("case", ["collinear-pair", "collinear-of-three", "zero-task", "zero-main", "all-zero"])
def test_imtl_degenerate_gram_matrices(case: str) -> None:
    """A singular D·Uᵀ (two tasks pointing the same way) is ridged; a zero gradient is left out of the equations
    (weight 0, IMTL-G among the others, the first nonzero task the anchor); all zero: the anchor's (1, 0, ...)."""
    a, b, c, _ = _vectors(1)
    rows = {"collinear-pair": [a, 3 * a], "collinear-of-three": [a, b, 2 * a], "zero-task": [a, 0 * b, c],
            "zero-main": [0 * a, b, c], "all-zero": [0 * a, 0 * b, 0 * c]}[case]
    alpha = imtl_weights(gram_of(rows))
    assert torch.isfinite(alpha).all()
    g = torch.stack(rows)
    if case == "collinear-pair":
        torch.testing.assert_close(alpha, torch.tensor([1.0, 0.0], dtype=alpha.dtype), rtol=0, atol=1e-7)
    elif case == "collinear-of-three":  # equal projections onto the two directions, weights summing to 1
        u = g / g.norm(dim=1, keepdim=True)
        projections = u @ (alpha @ g)
        torch.testing.assert_close(projections, projections[:1].expand(3), rtol=1e-7, atol=0)
        assert alpha.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert alpha.abs().max() < 10
    elif case == "all-zero":
        assert alpha.tolist() == [1.0, 0.0, 0.0]
    else:
        zero = 1 if case == "zero-task" else 0
        others = [k for k in range(3) if k != zero]
        assert alpha[zero].item() == 0.0
        torch.testing.assert_close(alpha[others], imtl_reference(g[others]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", ["collinear", "zero-task", "all-zero", "float32"])
def test_aligned_mtl_degenerate_gram_matrices(case: str) -> None:
    """The rank by masking equals the reference's slicing; nothing kept (every gradient zero): weights 0."""
    a, b, c, _ = _vectors(2)
    rows = {"collinear": [a, b, 2 * a], "zero-task": [a, 0 * b, c], "all-zero": [0 * a, 0 * b, 0 * c],
            "float32": [a.float(), b.float(), c.float()]}[case]
    alpha = aligned_weights(gram_of(rows))
    assert torch.isfinite(alpha).all() and alpha.dtype == rows[0].dtype
    if case == "all-zero":
        assert not alpha.any()
    elif case == "float32":
        torch.testing.assert_close(alpha, aligned_reference(torch.stack(rows)).float(), rtol=1e-4, atol=1e-6)
    else:
        torch.testing.assert_close(alpha, aligned_reference(torch.stack(rows)), rtol=1e-9, atol=1e-12)


def test_aligned_mtl_aligns_the_gradients_to_orthogonal_ones_of_equal_size() -> None:
    """Gᵀ·B's columns (the aligned gradients) are orthogonal with norm √λ_min each."""
    g = torch.stack(_vectors(3)[:3])
    gram = g @ g.T
    lam, v = torch.linalg.eigh(gram)
    b = lam.min().sqrt() * (v @ torch.diag(lam.rsqrt()) @ v.T)
    torch.testing.assert_close(b.sum(dim=0), aligned_weights(gram), rtol=1e-9, atol=1e-12)
    aligned = g.T @ b
    torch.testing.assert_close(aligned.T @ aligned, lam.min() * torch.eye(3, dtype=g.dtype), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("level", [PARAMETERS, REPRESENTATION])
@pytest.mark.parametrize("balance", REFERENCES)
def test_zero_gradients_stay_zero(balance: str, level: str) -> None:
    """Losses that do not move (every task gradient zero): zero gradients, no NaN."""
    model, _ = twin_models("mmoe", [5, 7, 3])
    balancer = build_balancer(balance, Setup.of(model, num_tasks=TASKS, level=level))
    categorical, numeric, _ = seeded_batch(0, [5, 7, 3])
    split = model.split_forward(categorical, numeric)
    balancer.backward([0 * split.logits[:, k].sum() for k in range(TASKS)], split)
    for name, p in model.named_parameters():
        assert p.grad is None or not p.grad.any(), name
    assert torch.isfinite(balancer.task_weights).all()


def test_imtl_l_is_the_learned_scale_sum() -> None:
    """Σ_k e^{s_k}·L_k − s_k, s trained with the model by its optimizer, written out here."""
    ours, theirs = TinyThreeTasks(), TinyThreeTasks()
    balancer = build_balancer("imtl-l", Setup(list(ours.parameters()), [], TASKS))
    assert isinstance(balancer, IMTLL)
    optimizer = Adam([*ours.parameters(), *balancer.parameters()], lr=0.05)
    scales = torch.zeros(TASKS, requires_grad=True)
    reference = Adam([*theirs.parameters(), scales], lr=0.05)
    for step in range(6):
        optimizer.zero_grad()
        balancer.backward(ours.losses(step))
        optimizer.step()
        torch.testing.assert_close(balancer.task_weights, scales.detach().exp())  # the step's weights
        reference.zero_grad()
        sum(torch.exp(scales[k]) * loss - scales[k] for k, loss in enumerate(theirs.losses(step))).backward()
        reference.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(balancer.log_scales.detach(), scales.detach(), rtol=1e-6, atol=1e-7)
    assert scales.abs().sum() > 0.1  # it learned something


def test_imtl_l_splits_its_regulariser_between_ranks() -> None:
    """Two ranks, each with half of every loss and −s/2: their summed gradients are one process's."""
    single = IMTLL(TASKS)
    losses = [torch.tensor(v) for v in (0.5, 0.2, 0.1)]
    single.backward(losses)
    ranks = [IMTLL(TASKS, world_size=2) for _ in range(2)]
    for rank in ranks:
        rank.backward([loss / 2 for loss in losses])
    torch.testing.assert_close(ranks[0].log_scales.grad + ranks[1].log_scales.grad, single.log_scales.grad)


@pytest.mark.parametrize("seed", [0, 7])
def test_rlw_draws_softmax_normal_weights_from_the_seed(seed: int) -> None:
    """w = T·softmax(z), z ~ N(0, I) from a CPU generator seeded by --seed; a reference trained with the same draws
    stays equal."""
    ours, theirs = TinyThreeTasks(), TinyThreeTasks()
    balancer = build_balancer("rlw", Setup(list(ours.parameters()), [], TASKS, seed=seed))
    assert isinstance(balancer, RLW)
    generator = torch.Generator().manual_seed(seed)
    optimizer, reference = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs))
    drawn = []
    for step in range(5):
        optimizer.zero_grad()
        balancer.backward(ours.losses(step))
        optimizer.step()
        weights = TASKS * torch.softmax(torch.randn(TASKS, generator=generator), dim=0)
        reference.zero_grad()
        (weights * torch.stack(theirs.losses(step))).sum().backward()
        reference.step()
        assert torch.equal(balancer.task_weights, weights)
        assert balancer.task_weights.sum().item() == pytest.approx(TASKS)
        drawn.append(weights)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(drawn[0], drawn[1])  # a new draw every step
    other = build_balancer("rlw", Setup([], [], TASKS, seed=seed + 1))
    assert not torch.equal(other.draw(), drawn[0])


@pytest.mark.parametrize("balance", ["imtl", "aligned-mtl", "imtl-l", "rlw"])
def test_state_round_trip_continues_identically(balance: str) -> None:
    """A balancer and optimizer rebuilt from their states mid-run continue as the straight run."""
    cards = [5, 7, 3]

    def made(model: nn.Module):
        return build_balancer(balance, Setup.of(model, num_tasks=TASKS, seed=4))

    def step(model: nn.Module, balancer: Balancer, optimizer: torch.optim.Optimizer, index: int) -> None:
        categorical, numeric, labels = seeded_batch(index, cards)
        optimizer.zero_grad(set_to_none=True)
        split = model.split_forward(categorical, numeric) if balancer.wants_split else None
        balancer.backward(losses_of(split.logits if split is not None else model(categorical, numeric), labels),
                          split)
        optimizer.step()

    assert_resumes_identically(lambda: twin_models("ple", cards)[0], made, step)
