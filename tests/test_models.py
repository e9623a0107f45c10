"""Models: shapes, parameter partition, TorchScript parity, fused == unfused, learning, task isolation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbtrain.models import MODELS, FusedEmbedding, MMoE, SharedBottom, Towers, build_model
from mbtrain.models.mlp import hidden_norm

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


def make(name: str, cards: list[int] = CARDS, num_numeric: int = 2, num_tasks: int = 3, **kw) -> nn.Module:
    sizes = dict(embed_dim=4, hidden=[8, 6], experts=4, tower=[5], dropout=0.0)
    sizes.update(kw)
    return build_model(name, cardinalities=cards, num_numeric=num_numeric, num_tasks=num_tasks, **sizes)


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
    assert isinstance(make("shared-bottom", experts=99), SharedBottom)
    assert make("mmoe", experts=6).experts.layers[0].weight.shape[0] == 6
    with pytest.raises(ValueError, match="unknown model 'x': choose shared-bottom, mmoe, ple, esmm"):
        make("x")


@pytest.mark.parametrize("name", NAMES)
def test_parameters_partition(name: str) -> None:
    model = make(name)
    shared, task = model.shared_parameters(), model.task_parameters()
    assert shared and task
    ids = [id(p) for p in shared + task]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert model.embedding.table.weight in shared


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
def test_task_loss_reaches_only_its_own_tower(name: str) -> None:
    model = make(name, num_tasks=3, tower=[5])
    model(*inputs(CARDS, 2))[:, 0].sum().backward()
    assert model.towers.out.bias.grad[0].item() != 0
    for p in model.towers.parameters():
        assert torch.count_nonzero(p.grad[1:]) == 0
    if name == "mmoe":
        for p in model.gates.parameters():  # stacked per task: [T, ...]
            assert torch.count_nonzero(p.grad[1:]) == 0


@pytest.mark.parametrize("name", NAMES)
def test_fits_tiny_multitask_problem(name: str) -> None:
    cards = [4, 6]
    cat, num = inputs(cards, 3, batch=256, seed=1)
    targets = torch.stack([(num[:, 0] > 0), (cat[:, 0] >= 2), (num[:, 1] + (cat[:, 1] == 3).float() > 0.5)], 1).float()
    model = make(name, cards, 3, num_tasks=3, embed_dim=4, hidden=[16, 8], experts=3, tower=[8])
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
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
