"""DB-MTL and GradVac against their algorithms written out here as LibMTL writes them (every task's gradient
flattened into one vector, Python loops), over several steps; their state round trip; their settings' checks."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from mbtrain.balance import DBMTL, GradVac, Setup, build_balancer
from mbtrain.balance.db_mtl import DBMTLSettings
from mbtrain.balance.gradvac import GradVacSettings
from mbtrain.balance.per_task import PARAMETERS, REPRESENTATION
from tests.helpers import (
    assert_same_grads_then_step,
    dense,
    flat_grads,
    heads_get,
    losses_of,
    run_cli,
    seeded_batch,
    twin_models,
    unflatten,
)

# (cardinalities, batch rows): the split path's table gradients on the batch's rows (a table bigger than the
# batch's entries) or on the whole table
TABLES = {"batch-rows": ([40, 50, 30], 16), "whole-table": ([5, 7, 3], 32)}
SEED = 11


class DBMTLReference:
    """LibMTL's DB_MTL.backward: gradients of log(L + 1e-8), the moving average, the max-norm scaling."""

    def __init__(self, beta: float, sigma: float) -> None:
        self.beta, self.sigma = beta, sigma
        self.step = 0
        self.buffer: torch.Tensor | None = None

    def backward(self, model: torch.nn.Module, losses: list[torch.Tensor]) -> None:
        self.step += 1
        shared = model.shared_parameters()
        logs = [torch.log(loss + 1e-8) for loss in losses]
        grads = flat_grads(logs, shared)
        if self.buffer is None:
            self.buffer = torch.zeros_like(grads)
        self.buffer = grads + (self.beta / self.step ** self.sigma) * (self.buffer - grads)
        norms = self.buffer.norm(dim=-1)
        alpha = norms.max() / (norms + 1e-8)
        combined = sum(alpha[k] * self.buffer[k] for k in range(len(losses)))
        for p, g in zip(shared, unflatten(combined, shared), strict=True):
            p.grad = g
        heads_get(model, sum(logs))


class GradVacReference:
    """LibMTL's GradVac.backward (group type 0), the target moved at every visit of a pair (the paper's), the
    orders from the same seeded generator."""

    def __init__(self, beta: float, seed: int) -> None:
        self.beta = beta
        self.generator = torch.Generator().manual_seed(seed)
        self.rho: torch.Tensor | None = None
        self.corrections = 0  # of them, with a positive target: the moving average's own part of the method
        self.toward_positive = 0

    def combine(self, grads: torch.Tensor) -> torch.Tensor:
        n_tasks = len(grads)
        if self.rho is None:
            self.rho = torch.zeros(n_tasks, n_tasks, dtype=grads.dtype)
        pc = grads.clone()
        for i in range(n_tasks):
            others = [j for j in range(n_tasks) if j != i]
            for at in torch.randperm(n_tasks - 1, generator=self.generator).tolist():
                j = others[at]
                rho_ij = torch.dot(pc[i], grads[j]) / (pc[i].norm() * grads[j].norm() + 1e-8)
                rho_t = self.rho[i, j].clone()
                if rho_ij < rho_t:
                    w = (pc[i].norm() * (rho_t * (1 - rho_ij ** 2).sqrt() - rho_ij * (1 - rho_t ** 2).sqrt())
                         / (grads[j].norm() * (1 - rho_t ** 2).sqrt() + 1e-8))
                    pc[i] = pc[i] + grads[j] * w
                    self.corrections += 1
                    self.toward_positive += int(rho_t > 0)
                self.rho[i, j] = (1 - self.beta) * rho_t + self.beta * rho_ij
        return pc.sum(dim=0)

    def backward(self, model: torch.nn.Module, losses: list[torch.Tensor]) -> None:
        shared = model.shared_parameters()
        combined = self.combine(flat_grads(losses, shared))
        for p, g in zip(shared, unflatten(combined, shared), strict=True):
            p.grad = g
        heads_get(model, sum(losses))

    def representation_backward(self, model: torch.nn.Module, categorical: torch.Tensor, numeric: torch.Tensor,
                                labels: torch.Tensor) -> None:
        """Each task's gradient at the trunk's outputs by plain autograd, combined, then one trunk backward."""
        split = model.split_forward(categorical, numeric)
        losses = losses_of(split.logits, labels)
        grads = []
        for loss in losses:
            found = torch.autograd.grad(loss, split.per_task, retain_graph=True, allow_unused=True)
            grads.append(torch.cat([(torch.zeros_like(b) if g is None else g.sum(dim=0)).reshape(-1)
                                    for g, b in zip(found, split.boundary, strict=True)]))
        combined = self.combine(torch.stack(grads))
        heads_get(model, sum(losses))
        torch.autograd.backward(split.boundary, grad_tensors=unflatten(combined, split.boundary))


def train_side_by_side(name: str, table: str, balance: str, settings: object, path: str, reference: object,
                       steps: int = 4) -> None:
    """`steps` SGD steps of our balancer (built through the registry) and of the reference on twin models: the
    same gradients at every step. `path`: split (the split forward), full (the per-task full backward) or
    representation."""
    cards, rows = TABLES[table]
    ours, theirs = twin_models(name, cards)
    level = REPRESENTATION if path == "representation" else PARAMETERS
    balancer = build_balancer(balance, Setup.of(ours, num_tasks=3, seed=SEED, level=level), settings)
    assert balancer.wants_split
    for step in range(steps):
        categorical, numeric, labels = seeded_batch(step, cards, rows)
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
        split = ours.split_forward(categorical, numeric) if path != "full" else None
        balancer.backward(losses_of(split.logits if split is not None else ours(categorical, numeric), labels),
                          split)
        if path == "representation":
            reference.representation_backward(theirs, categorical, numeric, labels)
        else:
            reference.backward(theirs, losses_of(theirs(categorical, numeric), labels))
        assert_same_grads_then_step(ours, theirs, 0.5)


@pytest.mark.parametrize(("beta", "sigma"), [(0.9, 0.0), (0.5, 0.5)], ids=["defaults", "decaying"])
@pytest.mark.parametrize("path", ["split", "full"])
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("name", ["mmoe", "esmm"])
def test_db_mtl_matches_the_reference_over_steps(name: str, table: str, path: str, beta: float,
                                                 sigma: float) -> None:
    settings = DBMTLSettings(db_mtl_beta=beta, db_mtl_beta_sigma=sigma)
    train_side_by_side(name, table, "db-mtl", settings, path, DBMTLReference(beta, sigma))


@pytest.mark.parametrize("path", ["split", "full", "representation"])
@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("name", ["mmoe", "esmm"])
def test_gradvac_matches_the_reference_over_steps(name: str, table: str, path: str) -> None:
    reference = GradVacReference(GradVacSettings().gradvac_beta, SEED)
    train_side_by_side(name, table, "gradvac", None, path, reference, steps=5)
    assert reference.corrections > 0 and reference.toward_positive > 0  # both kinds of correction were made


def gradvac_weights_pair_by_pair(gram: torch.Tensor, targets: torch.Tensor, beta: float,
                                 generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """GradVac.weights on the Gram matrix written as one pair at a time, row after row, in the same orders
    (moving `targets` in place): the weights and how many corrections were made."""
    n_tasks = len(gram)
    coefficients = torch.eye(n_tasks, dtype=gram.dtype)
    norms = gram.diagonal().clamp(min=0).sqrt()
    corrections = 0
    for i in range(n_tasks):
        others = [j for j in range(n_tasks) if j != i]
        row = coefficients[i]
        for at in torch.randperm(n_tasks - 1, generator=generator).tolist():
            j = others[at]
            norm = (row @ gram @ row).clamp(min=0).sqrt()
            cosine = row @ gram[:, j] / (norm * norms[j] + 1e-8)
            target = targets[i, j].clone()
            root = (1 - target**2).clamp(min=0).sqrt()
            if cosine < target:
                sine = (1 - cosine**2).clamp(min=0).sqrt()
                row[j] += norm * (target * sine - cosine * root) / (norms[j] * root + 1e-8)
                corrections += 1
            targets[i, j] = (1 - beta) * target + beta * cosine
    return coefficients.sum(dim=0), corrections


@pytest.mark.parametrize("n_tasks", [2, 3, 5])
def test_gradvac_weights_equal_its_pairs_taken_one_at_a_time(n_tasks: int) -> None:
    """All rows at once (GradVac.weights) against one pair at a time, over steps from random targets."""
    data = torch.Generator().manual_seed(n_tasks)
    balancer = GradVac([torch.nn.Parameter(torch.zeros(1))], rate=0.3, seed=SEED)
    balancer.targets = torch.rand(n_tasks, n_tasks, generator=data, dtype=torch.float64) * 2 - 1
    targets, generator = balancer.targets.clone(), torch.Generator().manual_seed(SEED)
    corrections, visits = 0, 0
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # no op in weights that lacks a deterministic version
    try:
        for _ in range(4):
            grads = torch.randn(n_tasks, 6, generator=data, dtype=torch.float64)
            gram = grads @ grads.T
            expected, made = gradvac_weights_pair_by_pair(gram, targets, 0.3, generator)
            torch.testing.assert_close(balancer.weights(gram), expected, rtol=0, atol=1e-12)
            torch.testing.assert_close(balancer.targets, targets, rtol=0, atol=1e-12)
            corrections, visits = corrections + made, visits + n_tasks * (n_tasks - 1)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert 0 < corrections < visits  # some pairs corrected, some left
    assert torch.equal(balancer.generator.get_state(), generator.get_state())


@pytest.mark.parametrize(("balance", "level"), [("db-mtl", PARAMETERS), ("gradvac", PARAMETERS),
                                                ("gradvac", REPRESENTATION)])
def test_a_balancer_rebuilt_from_its_state_continues_identically(balance: str, level: str) -> None:
    cards, rows = TABLES["batch-rows"]
    model, _ = twin_models("mmoe", cards)

    def step(balancer: DBMTL | GradVac, at: int) -> list[torch.Tensor]:
        categorical, numeric, labels = seeded_batch(at, cards, rows)
        model.zero_grad(set_to_none=True)
        split = model.split_forward(categorical, numeric)
        balancer.backward(losses_of(split.logits, labels), split)
        grads = [dense(p.grad).clone() for p in model.parameters()]
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.5 * dense(p.grad))
        return grads

    balancer = build_balancer(balance, Setup.of(model, num_tasks=3, seed=SEED, level=level))
    for at in range(2):
        step(balancer, at)
    saved = io.BytesIO()
    torch.save(balancer.state_dict(), saved)  # as a checkpoint holds it
    weights = copy.deepcopy(model.state_dict())
    straight = [step(balancer, at) for at in range(2, 4)]
    model.load_state_dict(weights)
    resumed = build_balancer(balance, Setup.of(model, num_tasks=3, seed=SEED + 1, level=level))
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for ours, theirs in zip([step(resumed, at) for at in range(2, 4)], straight, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_db_mtl_refuses_the_representation_level(tmp_path) -> None:
    model, _ = twin_models("mmoe", [5, 7, 3])
    with pytest.raises(ValueError, match="DB-MTL works at the parameters level only"):
        build_balancer("db-mtl", Setup.of(model, num_tasks=3, level=REPRESENTATION))
    result = run_cli("fit", "data.parquet", "--tasks", "click,purchase", "--balance", "db-mtl", "--balance-level",
                     "representation", "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert ("--balance-level representation: --balance db-mtl works at the parameters level only"
            in result.stderr and "Traceback" not in result.stderr)


@pytest.mark.parametrize(("args", "message"), [
    (["--db-mtl-beta", "1"], "--db-mtl-beta must be in [0, 1): got 1.0"),
    (["--db-mtl-beta", "-0.1"], "--db-mtl-beta must be in [0, 1): got -0.1"),
    (["--db-mtl-beta-sigma", "-1"], "--db-mtl-beta-sigma must be non-negative: got -1.0"),
    (["--db-mtl-beta-sigma", "inf"], "--db-mtl-beta-sigma must be non-negative: got inf"),
    (["--gradvac-beta", "1.5"], "--gradvac-beta must be in [0, 1): got 1.5"),
])
def test_bad_settings_are_one_error_line_naming_the_flag(args: list[str], message: str, tmp_path) -> None:
    result = run_cli("fit", "data.parquet", "--tasks", "click,purchase", *args, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
