"""MetaBalance against a literal, loop-over-parameters reference of docs/architecture.md "MetaBalance, exactly"."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbtrain.balance import BALANCERS, MetaBalance, PlainSum, Setup, build_balancer
from mbtrain.balance.metabalance import MetaBalanceSettings
from mbtrain.tasks import TaskSet
from tests.helpers import (
    assert_same_grads_then_step,
    assert_split_metabalance_equals_full,
    dense,
    seeded_batch,
    twin_models,
)

EPS = 1e-5


class TinyMultiTask(nn.Module):
    """A shared trunk, one head per task, and shared vectors that only some tasks reach.

    ``aux_only`` is never reached by the main task; ``not_last`` is never reached by the last task
    (when there are 3 tasks); ``unused`` is reached by nobody.
    """

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        self.n_tasks = n_tasks
        self.trunk = nn.Linear(4, 6)
        self.aux_only = nn.Parameter(torch.randn(6) * 0.3)
        self.not_last = nn.Parameter(torch.randn(6) * 0.3)
        self.unused = nn.Parameter(torch.zeros(3))
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(n_tasks))

    def shared(self) -> list[nn.Parameter]:
        return [self.trunk.weight, self.trunk.bias, self.aux_only, self.not_last, self.unused]

    def task(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        last = self.n_tasks - 1
        out = []
        for k, head in enumerate(self.heads):
            z = h if k == last else h * (1 + self.not_last)
            if k > 0:
                z = z + self.aux_only
            # different loss scales so that aux norms fall on both sides of the main task's
            weight = (1.0, 4.0, 0.2)[k]
            out.append(weight * nn.functional.binary_cross_entropy_with_logits(head(z).squeeze(1), y[:, k]))
        return out


def batch(seed: int, n_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=gen), torch.randint(0, 2, (16, n_tasks), generator=gen).float()


class Reference:
    """The formula followed literally: per parameter, per task, plain Python floats."""

    def __init__(self, n_tasks: int, n_shared: int, relax: float, beta: float, strategy: str) -> None:
        self.m = [[0.0] * n_shared for _ in range(n_tasks)]
        self.relax, self.beta, self.strategy = relax, beta, strategy
        self.ratio: list[float] = []

    def shared_grads(self, losses: list[torch.Tensor], shared: list[nn.Parameter]) -> list[torch.Tensor]:
        per_task = []
        for loss in losses:
            grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            per_task.append(
                [torch.zeros_like(p) if g is None else g for g, p in zip(grads, shared, strict=True)]
            )
        raw = [[g.norm().item() for g in grads] for grads in per_task]
        self.ratio = [1.0] + [
            sum(raw[k][i] / (raw[0][i] + EPS) for i in range(len(shared))) / len(shared)
            for k in range(1, len(losses))
        ]
        result = []
        for i in range(len(shared)):
            for k in range(len(losses)):
                self.m[k][i] = self.beta * self.m[k][i] + (1 - self.beta) * raw[k][i]
            m0 = self.m[0][i]
            total = per_task[0][i].clone()
            for k in range(1, len(losses)):
                g, mk = per_task[k][i], self.m[k][i]
                applies = (
                    self.strategy == "both"
                    or (self.strategy == "reduce" and mk > m0)
                    or (self.strategy == "enlarge" and mk < m0)
                )
                if applies:
                    g = self.relax * g * m0 / (mk + EPS) + (1 - self.relax) * g
                total = total + g
            result.append(total)
        return result


def close(actual: torch.Tensor | None, expected: torch.Tensor) -> None:
    assert actual is not None
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["both", "reduce", "enlarge"])
@pytest.mark.parametrize("n_tasks", [2, 3])
@pytest.mark.parametrize("pass_task_params", [True, False])
def test_matches_reference_over_steps(strategy: str, n_tasks: int, pass_task_params: bool) -> None:
    torch.manual_seed(0)
    model = TinyMultiTask(n_tasks)
    plain = copy.deepcopy(model)
    task_params = model.task() if pass_task_params else None
    mb = MetaBalance(model.shared(), relax_factor=0.7, beta=0.9, strategy=strategy, task_params=task_params)
    ref = Reference(n_tasks, len(model.shared()), 0.7, 0.9, strategy)
    applied_somewhere = False
    for step in range(4):
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        x, y = batch(step, n_tasks)
        mb.backward(model.losses(x, y))
        plain_losses = plain.losses(x, y)
        expected = ref.shared_grads(plain_losses, plain.shared())
        sum(plain_losses).backward()
        for p, q in zip(model.task(), plain.task(), strict=True):
            assert torch.equal(p.grad, q.grad)
        for p, e in zip(model.shared()[:-1], expected[:-1], strict=True):
            close(p.grad, e)
        assert model.unused.grad is None and plain.unused.grad is None
        close(mb.moving_norms, torch.tensor(ref.m))
        close(mb.grad_norm_ratio, torch.tensor(ref.ratio))
        assert mb.grad_norm_ratio[0].item() == 1.0
        m = mb.moving_norms
        applied_somewhere |= bool((m[1:] > m[0]).any() and (m[1:] < m[0]).any())
    assert applied_somewhere  # both sides of the reduce / enlarge condition were exercised


def test_grad_accumulates_across_calls() -> None:
    torch.manual_seed(1)
    model = TinyMultiTask(3)
    plain = copy.deepcopy(model)
    mb = MetaBalance(model.shared(), task_params=model.task())
    ref = Reference(3, len(model.shared()), 0.7, 0.9, "both")
    expected = [torch.zeros_like(p) for p in model.shared()]
    for step in range(2):  # no zero_grad in between
        x, y = batch(step, 3)
        mb.backward(model.losses(x, y))
        plain_losses = plain.losses(x, y)
        for e, g in zip(expected, ref.shared_grads(plain_losses, plain.shared()), strict=True):
            e += g
        sum(plain_losses).backward()
    for p, q in zip(model.task(), plain.task(), strict=True):
        assert torch.equal(p.grad, q.grad)
    for p, e in zip(model.shared()[:-1], expected[:-1], strict=True):
        close(p.grad, e)


@pytest.mark.parametrize("stored_transposed", [False, True])
@pytest.mark.parametrize("pass_task_params", [True, False])
def test_gradients_are_laid_out_for_fused_adam(pass_task_params: bool, stored_transposed: bool) -> None:
    """Weights used transposed in bmm get gradients with transposed strides from autograd.grad, and a weight
    may be stored transposed; fused Adam silently misreads a gradient laid out unlike its parameter, so the
    balancer's .grad must step it exactly as plain Adam steps."""
    torch.manual_seed(0)
    shared = nn.Parameter(torch.randn(2, 4, 5).transpose(1, 2) if stored_transposed else torch.randn(2, 5, 4))
    heads = nn.Parameter(torch.randn(2, 3, 5))
    x, y = torch.randn(2, 16, 4), (torch.rand(16, 2) < 0.5).float()

    def losses() -> list[torch.Tensor]:
        hidden = torch.relu(torch.bmm(x, shared.transpose(1, 2)))  # [2, 16, 5]
        logits = torch.bmm(hidden, heads.transpose(1, 2)).sum(dim=2).t()  # [16, 2]
        return list(F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(dim=0).unbind())

    balancer = MetaBalance([shared], task_params=[heads] if pass_task_params else None)
    balancer.backward(losses())
    stepped = []
    for fused in (False, True):
        params = [nn.Parameter(p.detach().clone()) for p in (shared, heads)]
        for p, q in zip(params, (shared, heads), strict=True):
            p.grad = q.grad.clone(memory_format=torch.preserve_format)
        torch.optim.Adam(params, lr=0.1, fused=fused).step()
        stepped.append(params)
    for plain, fused in zip(*stepped, strict=True):
        torch.testing.assert_close(fused, plain)


def test_relax_zero_is_the_plain_sum() -> None:
    torch.manual_seed(2)
    model = TinyMultiTask(3)
    plain = copy.deepcopy(model)
    mb = MetaBalance(model.shared(), relax_factor=0.0, task_params=model.task())
    for step in range(2):
        x, y = batch(step, 3)
        mb.backward(model.losses(x, y))
        sum(plain.losses(x, y)).backward()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None
        else:
            close(p.grad, q.grad)


def test_state_round_trip_resumes_identically() -> None:
    torch.manual_seed(3)
    model = TinyMultiTask(3)
    first = MetaBalance(model.shared(), strategy="reduce", task_params=model.task())
    assert first.state_dict()["moving_norms"] is None
    for step in range(2):
        first.backward(model.losses(*batch(step, 3)))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = MetaBalance(model.shared(), task_params=model.task())  # settings come from the state
    second.load_state_dict(torch.load(buffer))
    assert second.strategy == "reduce"
    for step in range(2, 4):
        grads = []
        for balancer in (first, second):
            model.zero_grad(set_to_none=True)
            balancer.backward(model.losses(*batch(step, 3)))
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        for a, b in zip(*grads, strict=True):
            assert torch.equal(a, b)
    assert torch.equal(first.moving_norms, second.moving_norms)


def test_state_mismatches_are_rejected() -> None:
    model = TinyMultiTask(3)
    mb = MetaBalance(model.shared(), task_params=model.task())
    state = mb.state_dict() | {"moving_norms": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match="shape"):
        mb.load_state_dict(state)
    mb.backward(model.losses(*batch(0, 3)))
    with pytest.raises(ValueError, match="3 losses, got 2"):
        mb.backward(model.losses(*batch(1, 3))[:2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"relax_factor": 1.0}, "--relax-factor must be in"),
        ({"relax_factor": -0.1}, "--relax-factor must be in"),
        ({"beta": 1.0}, "--beta must be in"),
        ({"strategy": "shrink"}, "--strategy 'shrink' is not supported"),
    ],
)
def test_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MetaBalance(TinyMultiTask(2).shared(), **kwargs)


def test_bad_inputs() -> None:
    model = TinyMultiTask(2)
    with pytest.raises(ValueError, match="at least one shared"):
        MetaBalance([])
    with pytest.raises(ValueError, match="both shared and task"):
        MetaBalance(model.shared(), task_params=[model.trunk.bias])
    with pytest.raises(ValueError, match="MetaBalance needs 2 or more losses"):
        MetaBalance(model.shared()).backward(model.losses(*batch(0, 2))[:1])


def test_build_balancer() -> None:
    assert tuple(BALANCERS) == ("none", "metabalance", "multibalance", "pcgrad", "gradnorm", "uncertainty", "dwa",
                                "famo", "mgda", "cagrad", "nash-mtl", "imtl", "imtl-l", "aligned-mtl", "rlw", "db-mtl",
                                "gradvac")
    torch.manual_seed(4)
    model = TinyMultiTask(3)
    plain = copy.deepcopy(model)
    setup = Setup(model.shared(), model.task(), num_tasks=3)
    none = build_balancer("none", setup)
    assert isinstance(none, PlainSum) and none.state_dict() == {}
    x, y = batch(0, 3)
    none.backward(model.losses(x, y))
    sum(plain.losses(x, y)).backward()
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    assert none.grad_norm_ratio is None
    mb = build_balancer("metabalance", setup, MetaBalanceSettings(relax_factor=0.5, strategy="enlarge"))
    assert isinstance(mb, MetaBalance) and (mb.relax_factor, mb.beta, mb.strategy) == (0.5, 0.9, "enlarge")
    with pytest.raises(ValueError, match="unknown balance 'x': choose one of none, metabalance, multibalance"):
        build_balancer("x", setup)
    with pytest.raises(ValueError, match="--relax-factor must be in"):
        MetaBalanceSettings(relax_factor=2.0)


@pytest.mark.parametrize("norm", ["none", "batch", "layer"])
@pytest.mark.parametrize("strategy", ["both", "reduce", "enlarge"])
@pytest.mark.parametrize("name", ["mmoe", "shared-bottom", "ple"])
@pytest.mark.parametrize(("cards", "batch"), [([5, 7, 3], 32), ([50, 70, 30], 8), ([500, 700, 300], 4)],
                         ids=["small-table", "big-table", "huge-table"])
def test_split_forward_gives_the_same_gradients(name: str, strategy: str, cards: list[int], batch: int,
                                                norm: str) -> None:
    """The fast path (heads once, trunk per task, table rows per batch) equals the per-task full path,
    both when the table is coalesced whole (small) and on the batch's distinct rows, found by a mask (big)
    or by sorting (huge); with every kind of hidden-layer norm (batch norm's affine parameters are shared)."""
    from mbtrain.models import Inputs, ModelConfig, build_model

    config = ModelConfig(name, embed_dim=4, hidden=[8, 6], experts=3, tower=[5], dropout=0.0, norm=norm)
    inputs = Inputs(cards, num_numeric=2, num_tasks=3)
    torch.manual_seed(0)
    full, fast = build_model(config, inputs).double(), build_model(config, inputs).double()
    fast.load_state_dict(full.state_dict())
    batches = [seeded_batch(step, cards, batch, (0.3, 0.3, 0.3)) for step in range(3)]
    balancers = assert_split_metabalance_equals_full(full, fast, batches, strategy=strategy)
    torch.testing.assert_close(balancers[0].moving_norms, balancers[1].moving_norms)


def test_plain_sum_refuses_a_split_forward() -> None:
    from mbtrain.models import Inputs, ModelConfig, build_model

    model = build_model(ModelConfig("mmoe", embed_dim=2, hidden=[4], experts=2, tower=[], dropout=0.0),
                        Inputs([3], num_numeric=1, num_tasks=2))
    split = model.split_forward(torch.zeros(4, 1, dtype=torch.long), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="split"):
        PlainSum().backward(list(split.logits.sum(0).unbind()), split)


class LogicalReference:
    """MetaBalance over the model's logical tensors, literally: each task's full gradient of every shared
    parameter cut into the pieces an unfused model holds (each column's rows of the table, each expert's slice),
    norms and moving averages in Python floats per piece."""

    def __init__(self, pieces: list[tuple[int, object]], relax: float, beta: float, strategy: str) -> None:
        self.pieces, self.relax, self.beta, self.strategy = pieces, relax, beta, strategy
        self.m: dict[tuple[int, int], float] = {}

    def backward(self, model: nn.Module, losses: list[torch.Tensor]) -> None:
        shared = model.shared_parameters()
        per_task = [[torch.zeros_like(p) if g is None else dense(g) for g, p in zip(
            torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True), shared, strict=True)]
            for loss in losses]
        totals = [torch.zeros_like(p) for p in shared]
        for n, (i, where) in enumerate(self.pieces):
            for k in range(len(losses)):
                norm = per_task[k][i][where].norm().item()
                self.m[k, n] = self.beta * self.m.get((k, n), 0.0) + (1 - self.beta) * norm
            m0 = self.m[0, n]
            totals[i][where] += per_task[0][i][where]
            for k in range(1, len(losses)):
                mk, g = self.m[k, n], per_task[k][i][where]
                applies = (self.strategy == "both" or (self.strategy == "reduce" and mk > m0)
                           or (self.strategy == "enlarge" and mk < m0))
                totals[i][where] += (self.relax * m0 / (mk + EPS) + (1 - self.relax)) * g if applies else g
        for p, total in zip(shared, totals, strict=True):
            p.grad = total
        task = model.task_parameters()
        for p, g in zip(task, torch.autograd.grad(sum(losses), task, allow_unused=True), strict=True):
            p.grad = g


@pytest.mark.parametrize("split", [True, False], ids=["split-forward", "full-backward"])
@pytest.mark.parametrize("strategy", ["both", "reduce", "enlarge"])
@pytest.mark.parametrize(("name", "cards", "batch"), [("mmoe", [5, 7, 3], 32), ("mmoe", [500, 700, 300], 4),
                                                      ("shared-bottom", [5, 7, 3], 32), ("ple", [5, 7, 3], 32),
                                                      ("ple", [500, 700, 300], 4)])
def test_norms_are_per_logical_tensor_as_in_the_unfused_model(name: str, cards: list[int], batch: int,
                                                              strategy: str, split: bool) -> None:
    """Each column's rows of the fused table and each expert's slice of the stacked weights are the separate
    tables and expert MLPs of the paper's model (tests/test_models.py checks fused == unfused): MetaBalance's
    norms and moving averages are theirs, from the batch's rows (split path) or the whole table."""
    ours, theirs = twin_models(name, cards)
    offsets = [0, *torch.tensor(cards).cumsum(0).tolist()]
    pieces: list[tuple[int, object]] = [(0, slice(offsets[j], offsets[j + 1])) for j in range(len(cards))]
    for i, (p, seg) in enumerate(zip(ours.shared_parameters(), ours.shared_segments(), strict=True)):
        if i > 0:
            pieces += [(i, e) for e in range(p.shape[0])] if seg is not None else [(i, slice(None))]
    balancer = MetaBalance(ours.shared_parameters(), relax_factor=0.6, beta=0.8, strategy=strategy,
                           task_params=ours.task_parameters() if split else None, segments=ours.shared_segments())
    reference = LogicalReference(pieces, 0.6, 0.8, strategy)
    for step in range(3):
        categorical, numeric, labels = seeded_batch(step, cards, batch, (0.2, 0.5, 0.7))
        weights = torch.tensor([1.0, 6.0, 0.2], dtype=torch.double)
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            forward = model.split_forward(categorical, numeric) if model is ours and split else None
            logits = forward.logits if forward is not None else model(categorical, numeric)
            losses = list((F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)
                           * weights).unbind())
            if model is ours:
                balancer.backward(losses, forward)
            else:
                reference.backward(model, losses)
        assert_same_grads_then_step(ours, theirs)
    assert balancer.moving_norms.shape == (3, len(pieces))
    assert sorted(balancer.moving_norms.flatten().tolist()) == pytest.approx(sorted(reference.m.values()), rel=1e-9)


class UnfusedMMoE(nn.Module):
    """The paper's layout of a fused MMoE: one table per column, one MLP per expert, as separate tensors (copied
    from the fused model); gates and towers as they are. Its forward equals the fused one (test_models.py)."""

    def __init__(self, fused: nn.Module, cards: list[int]) -> None:
        super().__init__()
        starts = [0, *torch.tensor(cards).cumsum(0).tolist()]
        table = fused.embedding.table.weight.detach()
        self.tables = nn.ParameterList(nn.Parameter(table[a:b].clone())
                                       for a, b in zip(starts, starts[1:], strict=False))
        self.experts = nn.ParameterList(  # expert by expert, layer by layer: weight, bias
            nn.Parameter(tensor[e].detach().clone()) for e in range(fused.num_experts)
            for layer in fused.experts.layers for tensor in (layer.weight, layer.bias))
        self.layers = len(fused.experts.layers)
        self.num_experts = fused.num_experts
        self.gates = copy.deepcopy(fused.gates)
        self.towers = copy.deepcopy(fused.towers)

    def shared(self) -> list[nn.Parameter]:
        return [*self.tables, *self.experts]

    def task(self) -> list[nn.Parameter]:
        return [*self.gates.parameters(), *self.towers.parameters()]

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        x = torch.cat([*(table[categorical[:, j]] for j, table in enumerate(self.tables)), numeric], dim=1)
        outputs = []
        for e in range(self.num_experts):
            h = x
            for layer in range(self.layers):
                at = 2 * (e * self.layers + layer)
                h = torch.relu(h @ self.experts[at] + self.experts[at + 1][0])
            outputs.append(h)
        gate = self.gates(x).softmax(dim=2)  # [T, B, E]
        mixed = torch.stack([sum(gate[t, :, e : e + 1] * outputs[e] for e in range(self.num_experts))
                             for t in range(gate.shape[0])])
        return self.towers(mixed)

    def fused_grads(self) -> list[torch.Tensor]:
        """The gradients laid out as the fused model's shared parameters: the table, then each expert layer's
        stacked weight and bias."""
        grads = [torch.cat([table.grad for table in self.tables])]
        for layer in range(self.layers):
            for which in (0, 1):
                grads.append(torch.stack([self.experts[2 * (e * self.layers + layer) + which].grad
                                          for e in range(self.num_experts)]))
        return grads


MIXED = TaskSet.from_dict(["a", "seconds", "c"], {"a": {"type": "binary"}, "c": {"type": "binary"}, "seconds": {
    "type": "regression", "transform": "none", "loss": "mse", "mean": 0.0, "std": 1.0}})


def mixed_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Task 1 a regression on raw seconds (a squared error orders of magnitude above the log losses), through the
    fit loop's task types."""
    seconds = labels.clone()
    seconds[:, 1] = 30.0 * labels[:, 1] + 5.0 * torch.arange(len(labels), dtype=labels.dtype) % 7
    return MIXED.row_losses(logits, seconds).mean(0)


@pytest.mark.parametrize("strategy", ["both", "reduce", "enlarge"])
@pytest.mark.parametrize("tasks", ["binary", "regression"])
def test_fused_metabalance_equals_the_literal_one_on_the_unfused_model(strategy: str, tasks: str) -> None:
    """MetaBalance on the fused MMoE with the model's segments (split path) gives the gradients that the literal
    reference gives on the paper's unfused model, step after step; with a regression task among binary ones too."""
    task_losses = (lambda logits, labels: F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
                   .mean(0)) if tasks == "binary" else mixed_losses
    cards = [5, 7, 3]
    fused, _ = twin_models("mmoe", cards)
    unfused = UnfusedMMoE(fused, cards)
    balancer = MetaBalance(fused.shared_parameters(), relax_factor=0.6, beta=0.8, strategy=strategy,
                           task_params=fused.task_parameters(), segments=fused.shared_segments())
    reference = Reference(3, len(unfused.shared()), 0.6, 0.8, strategy)
    for step in range(3):
        categorical, numeric, labels = seeded_batch(step, cards, rates=(0.2, 0.5, 0.7))
        weights = torch.tensor([1.0, 6.0, 0.2], dtype=torch.double)
        fused.zero_grad(set_to_none=True)
        split = fused.split_forward(categorical, numeric)
        losses = task_losses(split.logits, labels) * weights
        balancer.backward(list(losses.unbind()), split)
        unfused.zero_grad(set_to_none=True)
        losses = list((task_losses(unfused(categorical, numeric), labels) * weights).unbind())
        for p, g in zip(unfused.shared(), reference.shared_grads(losses, unfused.shared()), strict=True):
            p.grad = g
        for p, g in zip(unfused.task(), torch.autograd.grad(sum(losses), unfused.task()), strict=True):
            p.grad = g
        for p, expected in zip(fused.shared_parameters(), unfused.fused_grads(), strict=True):
            torch.testing.assert_close(dense(p.grad), expected, rtol=1e-9, atol=1e-12)
        for p, q in zip(fused.task_parameters(), unfused.task(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
        with torch.no_grad():
            for p in [*fused.parameters(), *unfused.parameters()]:
                p.sub_(0.3 * p.grad)
