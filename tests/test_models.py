"""Models: the contract every registered model meets, shapes, TorchScript parity, fused == unfused, learning."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbtrain.errors import MbtrainError
from mbtrain.models import (
    MODELS,
    PLE,
    FusedEmbedding,
    Inputs,
    MMoE,
    ModelConfig,
    MultiTaskModel,
    SharedBottom,
    Towers,
    build_model,
)
from mbtrain.models.funnel import Funnel
from mbtrain.models.mlp import hidden_norm
from tests.helpers import Adam, dense

CARDS = [5, 7, 3]
NAMES = sorted(MODELS)


@pytest.fixture(autouse=True)
def _seeded_single_thread() -> Iterator[None]:
    """Deterministic init; one thread, as these tiny ops only lose to thread sync on a busy machine."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(name: str, cards: list[int] = CARDS, num_numeric: int = 2, num_tasks: int = 3, bags: int = 0,
         order: list[int] | None = None, **settings) -> nn.Module:
    config = ModelConfig(name, **{"embed_dim": 4, "hidden": [8, 6], "experts": 4, "tower": [5], "dropout": 0.0,
                                  **settings})
    return build_model(config, Inputs(cards, num_numeric, num_tasks, bags, None if order is None else tuple(order)))


def inputs(cards: list[int], num_numeric: int, batch: int = 11, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    columns = [torch.randint(0, c, (batch,), generator=g) for c in cards]
    cat = torch.stack(columns, 1) if columns else torch.zeros(batch, 0, dtype=torch.long)
    return cat, torch.randn(batch, num_numeric, generator=g)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("cards", "num_numeric"), [(CARDS, 2), ([], 2), (CARDS, 0), ([9], 0)])
def test_output_shape(name: str, cards: list[int], num_numeric: int) -> None:
    model = make(name, cards, num_numeric, num_tasks=3, dropout=0.2)
    out = model(*inputs(cards, num_numeric, batch=11))
    assert out.shape == (11, 3)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_no_features_rejected() -> None:
    for name in NAMES:
        with pytest.raises(ValueError, match="at least one"):
            make(name, [], 0)


def test_mmoe_needs_expert_layers() -> None:
    with pytest.raises(ValueError, match="hidden layer"):
        make("mmoe", hidden=[])


def test_shared_bottom_without_hidden_layers() -> None:
    model = make("shared-bottom", hidden=[])
    assert model(*inputs(CARDS, 2)).shape == (11, 3)


def test_build_model() -> None:
    assert isinstance(make("mmoe"), MMoE)
    assert isinstance(PLE(ModelConfig("ple"), Inputs(CARDS, 2, 3)), PLE)
    assert isinstance(make("shared-bottom", experts=99), SharedBottom)
    assert make("mmoe", experts=6).experts.layers[0].weight.shape[0] == 6
    with pytest.raises(ValueError, match="unknown model 'x': choose shared-bottom, mmoe, ple, esmm"):
        make("x")


FUNNEL = [2, 0, 1]  # output column 2 is the first stage, then 0, then 1


def contract_batch(bags: int, rows: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(categorical with `bags` bags of up to 4 elements after CARDS' columns, numeric float64, labels float64)."""
    generator = torch.Generator().manual_seed(7)
    categorical = torch.stack([torch.randint(0, c, (rows,), generator=generator) for c in CARDS], 1)
    for _ in range(bags):
        slots = torch.randint(0, 6, (rows, 4), generator=generator)
        lengths = torch.randint(0, 5, (rows, 1), generator=generator)
        categorical = torch.cat([categorical, torch.where(torch.arange(4) < lengths, slots, -1)], 1)
    numeric = torch.randn(rows, 2, generator=generator, dtype=torch.double)
    labels = (torch.rand(rows, 3, generator=generator) < torch.tensor([0.2, 0.5, 0.7])).double()
    return categorical, numeric, labels


@pytest.mark.parametrize("variant", ["plain", "funnel", "bags", "batch norm"])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_meets_the_contract(name: str, variant: str) -> None:
    """models/base.py's MultiTaskModel, what the fit loop and the balancers rely on, for every registered model:
    split_forward's logits are forward's; shared and task parameters split the trainable ones, the table among the
    shared; shared_segments maps each shared parameter's first dim onto logical tensors 0..n-1; and autograd agrees
    with the split: each logical shared tensor is reached by at least two tasks' losses, each slice of a task
    parameter (stacked task by task on its first dim) by its own task's loss only (under the funnel, where a
    stage's loss reads the towers of the stages before it, by its own stage's and later stages'; a network that is
    its own funnel, AITM, is one over FUNNEL in every variant, its logits read by their own stage's loss only)."""
    bags = 1 if variant == "bags" else 0
    cards = CARDS + [6] * bags
    own = MODELS[name].entire_space
    model = make(name, cards, bags=bags, order=FUNNEL if own else None,
                 norm="batch" if variant == "batch norm" else "none").double()
    assert isinstance(model, MultiTaskModel)
    assert isinstance(model.embedding, FusedEmbedding) and isinstance(model.towers, Towers)
    assert model.towers.num_tasks == 3 and isinstance(type(model).describe(ModelConfig(name)), str)
    assert ModelConfig(name).funnel is type(model).always_funnel
    categorical, numeric, labels = contract_batch(bags)
    logits = model(categorical, numeric)
    assert logits.shape == (64, 3)
    torch.testing.assert_close(model.split_forward(categorical, numeric).logits, logits, rtol=1e-12, atol=1e-12)

    shared, task = model.shared_parameters(), model.task_parameters()
    shared_ids, task_ids = [id(p) for p in shared], [id(p) for p in task]
    assert shared and task and len(set(shared_ids + task_ids)) == len(shared_ids) + len(task_ids)
    assert set(shared_ids + task_ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.embedding.table.weight) in shared_ids
    segments = model.shared_segments()
    assert len(segments) == len(shared)
    for p, segment in zip(shared, segments, strict=True):
        if segment is not None:
            assert segment.dtype == torch.int64 and segment.shape == (p.shape[0],)
            assert torch.equal(segment.unique(), torch.arange(int(segment.max()) + 1))

    if variant == "funnel" and not own:
        logits = Funnel(FUNNEL).double()(logits)
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0).unbind()
    grads = [[dense(g) for g in torch.autograd.grad(loss, shared + task, retain_graph=True, allow_unused=True)]
             for loss in losses]

    def reaching(at: int, part: torch.Tensor | slice) -> set[int]:
        return {k for k, task_grads in enumerate(grads)
                if task_grads[at] is not None and torch.count_nonzero(task_grads[at][part])}

    for at, (p, segment) in enumerate(zip(shared, segments, strict=True)):
        parts = [slice(None)] if segment is None else [segment == value for value in segment.unique()]
        for part in parts:
            assert len(reaching(at, part)) >= 2, f"shared {p.shape} reached by tasks {reaching(at, part)}"

    def readers(owner: int) -> set[int]:
        return set(FUNNEL[FUNNEL.index(owner) :]) if variant == "funnel" or own else {owner}

    for at, p in enumerate(task, start=len(shared)):
        for index in range(p.shape[0]):  # only its readers; a ReLU dead on every row may leave it unreached
            found = reaching(at, index)
            assert found <= readers(index // (p.shape[0] // 3)), f"task {p.shape}[{index}] reached by tasks {found}"
    bias = len(shared) + task_ids.index(id(model.towers.out.bias))  # always reached: the logits' own bias
    assert [reaching(bias, owner) for owner in range(3)] == [{owner} if own else readers(owner) for owner in range(3)]


@pytest.mark.parametrize(("settings", "num_tasks", "message"), [
    ({"model": "x"}, 2, "--model 'x' is not supported: choose one of shared-bottom, mmoe, ple, esmm"),
    ({"norm": "group"}, 2, "--norm 'group' is not supported: choose one of none, batch, layer"),
    ({"pooling": "max"}, 2, "--pooling 'max' is not supported: choose one of mean, sum"),
    ({"model": "esmm"}, 1, "--model esmm needs at least two tasks in --tasks, the funnel's stages in order (e.g. "
                           "click,cart,purchase)"),
    ({"funnel": True}, 1, "--funnel needs at least two tasks"),
    ({"dropout": 1.0}, 2, "--dropout must be in [0, 1): got 1.0"),
    ({"levels": 0}, 2, "--levels must be at least 1: got 0"),
    ({"tower": [4, 0]}, 2, "--tower sizes must be positive integers: got [4, 0]"),
    ({"hidden": []}, 2, "--hidden needs at least one layer size, e.g. --hidden 64,32"),
])
def test_model_config_names_the_flag(settings: dict, num_tasks: int, message: str) -> None:
    ModelConfig().check(2)
    with pytest.raises(MbtrainError) as raised:
        ModelConfig(**settings).check(num_tasks)
    assert str(raised.value).startswith(message)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("cards", "num_numeric"), [(CARDS, 2), ([], 3), (CARDS, 0)])
def test_torchscript_matches_eager(name: str, cards: list[int], num_numeric: int) -> None:
    model = make(name, cards, num_numeric, dropout=0.3).eval()
    scripted = torch.jit.script(model)
    cat, num = inputs(cards, num_numeric, batch=17, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(scripted(cat, num), model(cat, num), rtol=0, atol=0)


def test_fused_embedding_equals_per_column_lookup() -> None:
    emb = FusedEmbedding(CARDS, 4)
    assert emb.table.weight.shape == (sum(CARDS), 4)
    cat, _ = inputs(CARDS, 0, batch=13)
    cat[0] = torch.tensor([c - 1 for c in CARDS])  # last row of every column's slice
    starts = [0, 5, 12]
    expected = torch.cat([emb.table.weight[starts[j] + cat[:, j]] for j in range(len(CARDS))], 1)
    torch.testing.assert_close(emb(cat), expected, rtol=0, atol=0)
    assert FusedEmbedding([], 4)(torch.zeros(4, 0, dtype=torch.long)).shape == (4, 0)


def reference_mlp(x: torch.Tensor, layers: nn.ModuleList, group: int) -> torch.Tensor:
    """One group of a StackedMLP, layer by layer with plain F.linear."""
    for layer in layers:
        x = F.relu(F.linear(x, layer.weight[group].T, layer.bias[group, 0]))
    return x


def reference_towers(towers: Towers, xs: list[torch.Tensor]) -> torch.Tensor:
    logits = []
    for t, x in enumerate(xs):
        h = reference_mlp(x, towers.hidden.layers, t)
        logits.append(F.linear(h, towers.out.weight[t].T, towers.out.bias[t, 0]))
    return torch.cat(logits, 1)


def test_fused_mmoe_equals_unfused_reference() -> None:
    num_tasks, experts = 3, 4
    model = make("mmoe", num_tasks=num_tasks, experts=experts, hidden=[8, 6], tower=[5, 3]).double().eval()
    cat, num = inputs(CARDS, 2, batch=19)
    num = num.double()
    x = torch.cat([model.embedding(cat), num], 1)
    expert_out = [reference_mlp(x, model.experts.layers, e) for e in range(experts)]
    mixed = []
    for t in range(num_tasks):
        gate = F.linear(x, model.gates.weight[t].T, model.gates.bias[t, 0]).softmax(1)
        mixed.append(sum(gate[:, e : e + 1] * expert_out[e] for e in range(experts)))
    torch.testing.assert_close(model(cat, num), reference_towers(model.towers, mixed), rtol=1e-12, atol=1e-12)


def test_towers_shared_input_equals_per_task_reference() -> None:
    towers = Towers(7, [6, 4], num_tasks=3, dropout=0.0).double()
    x = torch.randn(10, 7, dtype=torch.double)
    expected = reference_towers(towers, [x, x, x])
    torch.testing.assert_close(towers(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(towers(x.expand(3, -1, -1)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_fits_tiny_multitask_problem(name: str) -> None:
    cards = [4, 6]
    cat, num = inputs(cards, 3, batch=256, seed=1)
    targets = torch.stack([(num[:, 0] > 0), (cat[:, 0] >= 2), (num[:, 1] + (cat[:, 1] == 3).float() > 0.5)], 1).float()
    model = make(name, cards, 3, num_tasks=3, embed_dim=4, hidden=[16, 8], experts=3, tower=[8])
    opt = Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(100):
        loss = F.binary_cross_entropy_with_logits(model(cat, num), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


@pytest.mark.parametrize("groups", [None, 3])
def test_norms_equal_torch_batch_norm_and_layer_norm(groups: int | None) -> None:
    """RowBatchNorm is G BatchNorm1d (training output, running statistics, eval output); FeatureLayerNorm
    is LayerNorm; both with their affine parameters moved off 1 / 0."""
    features, rows = 6, 17
    shape = [rows, features] if groups is None else [groups, rows, features]
    x = torch.randn(*shape) * 3 + 1
    for kind, reference in (("batch", nn.BatchNorm1d), ("layer", nn.LayerNorm)):
        ours = hidden_norm(kind, features, groups)
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
        for g in range(groups or 1):
            theirs = reference(features)
            with torch.no_grad():
                theirs.weight.copy_(ours.weight[g].reshape(-1) if groups else ours.weight)
                theirs.bias.copy_(ours.bias[g].reshape(-1) if groups else ours.bias)
            xg = (x[g] if groups else x).detach().requires_grad_()
            inputs = x.detach().requires_grad_()
            trained = ours(inputs)
            expected = theirs(xg)
            torch.testing.assert_close(trained[g] if groups else trained, expected)
            upstream = torch.randn_like(expected)  # gradients of input, weight and bias, as autograd's
            (ours_x,) = torch.autograd.grad(trained[g] if groups else trained, inputs, upstream, retain_graph=True)
            torch.testing.assert_close(ours_x[g] if groups else ours_x, torch.autograd.grad(expected, xg, upstream,
                                                                                           retain_graph=True)[0])
            ours_w, ours_b = torch.autograd.grad(trained[g] if groups else trained, [ours.weight, ours.bias], upstream)
            theirs_w, theirs_b = torch.autograd.grad(expected, [theirs.weight, theirs.bias], upstream)
            torch.testing.assert_close((ours_w[g] if groups else ours_w).reshape(-1), theirs_w)
            torch.testing.assert_close((ours_b[g] if groups else ours_b).reshape(-1), theirs_b)
            if kind == "batch":
                for name in ("running_mean", "running_var"):
                    ours_stat = getattr(ours, name)
                    torch.testing.assert_close((ours_stat[g] if groups else ours_stat).reshape(-1),
                                               getattr(theirs, name))
                ours.eval()
                theirs.eval()
                evaluated = ours(x)
                torch.testing.assert_close(evaluated[g] if groups else evaluated, theirs(xg))
                ours.train()
                ours.running_mean.zero_()
                ours.running_var.fill_(1.0)


def test_batch_norm_trains_on_one_row_or_none_and_leaves_its_statistics() -> None:
    norm = hidden_norm("batch", 4, groups=2)
    for rows in (0, 1):
        out = norm(torch.randn(2, rows, 4))
        assert out.shape == (2, rows, 4) and torch.isfinite(out).all()
    assert torch.equal(norm.running_mean, torch.zeros(2, 1, 4)) and torch.equal(norm.running_var, torch.ones(2, 1, 4))


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("name", NAMES)
def test_normed_models_script_like_eager(name: str, norm: str) -> None:
    model = make(name, norm=norm)
    model(*inputs(CARDS, 2, batch=32))  # one training step's statistics
    model.eval()
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(*inputs(CARDS, 2, seed=1)), model(*inputs(CARDS, 2, seed=1)))
    assert not any("norm" in key for key in make(name).state_dict())  # none: checkpoints as before norms
