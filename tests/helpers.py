"""Tiny generated multi-task data and a CLI runner, imported by the tests."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable

import polars as pl
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner, Result

from mbtrain.balance import Balancer, MetaBalance
from mbtrain.cli import app
from mbtrain.models import Inputs, ModelConfig, build_model
from mbtrain.models.scoring import NumericNormalizer
from mbtrain.table import dense_of


def make_frame(rows: int = 600, seed: int = 0) -> pl.DataFrame:
    """A funnel with signal: click depends on user and price, purchase on click and rating; some nulls."""
    rng = random.Random(seed)
    users = [f"u{rng.randrange(40)}" for _ in range(rows)]
    user_taste = {f"u{i}": rng.gauss(0, 1.2) for i in range(40)}
    price = [None if rng.random() < 0.05 else round(math.exp(rng.gauss(3, 1)), 2) for _ in range(rows)]
    rating = [rng.uniform(1, 5) for _ in range(rows)]
    device = [rng.choice(["ios", "android", "web"]) for _ in range(rows)]
    hour = [rng.randrange(24) for _ in range(rows)]
    click, purchase = [], []
    for i in range(rows):
        logit = user_taste[users[i]] - 0.3 * math.log(price[i] or 20.0) + (0.5 if device[i] == "ios" else 0.0)
        clicked = rng.random() < 1 / (1 + math.exp(-logit))
        bought = clicked and rng.random() < 1 / (1 + math.exp(-(rating[i] - 4.0) * 2))
        click.append(int(clicked))
        purchase.append(int(bought))
    return pl.DataFrame({
        "row_id": list(range(rows)),
        "user": users,
        "device": device,
        "hour": hour,
        "price": price,
        "rating": rating,
        "click": click,
        "purchase": purchase,
    })


def make_bag_frame(rows: int = 600, seed: int = 0) -> pl.DataFrame:
    """make_frame's funnel with two list columns: an item's tags (text, some null or empty) and the user's recent
    item ids (integers, up to 12 of them), the latter carrying click signal."""
    rng = random.Random(seed)
    frame = make_frame(rows, seed)
    tags = [None if rng.random() < 0.05 else [rng.choice(["sale", "new", "eco", "kids", "lux"])
                                               for _ in range(rng.randrange(0, 4))] for _ in range(rows)]
    recent = [[rng.randrange(30) + 30 * clicked for _ in range(rng.randrange(0, 13))] for clicked in frame["click"]]
    return frame.with_columns(pl.Series("tags", tags, dtype=pl.List(pl.String)),
                              pl.Series("recent_items", recent, dtype=pl.List(pl.Int64)))


def run_cli(*args: str) -> Result:
    """Invoke the mbtrain CLI in-process; stdout and stderr stay separate on the result."""
    return CliRunner().invoke(app, list(args))


def twin_models(name: str, cardinalities: list[int]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two identical small 3-task models in float64: one for a balancer, one for its reference."""
    torch.manual_seed(0)
    config = ModelConfig(name, embed_dim=4, hidden=[8, 6], experts=3, tower=[5], dropout=0.0)
    inputs = Inputs(cardinalities, num_numeric=2, num_tasks=3)
    ours, theirs = build_model(config, inputs).double(), build_model(config, inputs).double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def seeded_batch(step: int, cardinalities: list[int], rows: int = 32,
                 rates: tuple[float, ...] = (0.1, 0.5, 0.8)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(categorical, numeric float64, labels float64) of a step, the same for every caller."""
    generator = torch.Generator().manual_seed(step)
    categorical = torch.stack([torch.randint(0, c, (rows,), generator=generator) for c in cardinalities], 1)
    numeric = torch.randn(rows, 2, generator=generator, dtype=torch.double)
    labels = (torch.rand(rows, len(rates), generator=generator) < torch.tensor(rates)).double()
    return categorical, numeric, labels


class Adam(torch.optim.Adam):
    """torch's Adam over a model whose embedding table's gradient is its touched rows: the table's made dense
    first, as --table-optimizer adam does (mbtrain/optim.py)."""

    def step(self, closure: None = None) -> None:
        dense_of(p for group in self.param_groups for p in group["params"])
        super().step(closure)


def dense(grad: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient as a dense tensor: an embedding table's is its touched rows (mbtrain/table.py)."""
    return grad.to_dense() if grad is not None and grad.is_sparse else grad


def assert_same_grads_then_step(ours: torch.nn.Module, theirs: torch.nn.Module, rate: float = 0.3) -> None:
    """The two models' gradients agree; then both take the same plain gradient step."""
    for (label, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(dense(a.grad), dense(b.grad), rtol=1e-9, atol=1e-12, msg=label)
    with torch.no_grad():
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            a.sub_(rate * dense(a.grad))
            b.sub_(rate * dense(b.grad))


def assert_split_metabalance_equals_full(full: torch.nn.Module, fast: torch.nn.Module,
                                         batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                                         **settings: object) -> list[MetaBalance]:
    """MetaBalance (with `settings`) through `fast`'s split forward and through `full`'s per-task full backward,
    batch after batch: the logits and every gradient agree; then both take the same plain step. The two
    balancers come back (full's first)."""
    balancers = [MetaBalance(m.shared_parameters(), task_params=m.task_parameters(), **settings) for m in (full, fast)]
    for categorical, numeric, labels in batches:
        logits = []
        for model, balancer in zip((full, fast), balancers, strict=True):
            model.zero_grad(set_to_none=True)
            split = model.split_forward(categorical, numeric) if model is fast else None
            logits.append(split.logits if split is not None else model(categorical, numeric))
            losses = F.binary_cross_entropy_with_logits(logits[-1], labels, reduction="none").mean(0)
            balancer.backward(list(losses.unbind()), split)
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-12, atol=1e-12)
        assert_same_grads_then_step(full, fast)
    return balancers


def losses_of(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Each task's mean log loss."""
    return list(F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0).unbind())


def flat_grads(losses: list[torch.Tensor], inputs: list[torch.Tensor]) -> torch.Tensor:
    """[T, dim] each loss's gradient of `inputs` by plain autograd, flattened (zeros where it does not reach)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(x) if g is None else dense(g)).reshape(-1)
                               for g, x in zip(grads, inputs, strict=True)]))
    return torch.stack(rows)


def heads_get(model: nn.Module, total: torch.Tensor) -> None:
    """The model's task parameters get `total`'s gradient (the graph kept)."""
    heads = model.task_parameters()
    for p, g in zip(heads, torch.autograd.grad(total, heads, retain_graph=True, allow_unused=True), strict=True):
        p.grad = g


def unflatten(vector: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`vector` cut into tensors shaped like `like`'s."""
    return [part.view_as(t).clone() for part, t in zip(vector.split([t.numel() for t in like]), like, strict=True)]


class TinyThreeTasks(nn.Module):
    """A shared layer and one head per task, with losses of different scales."""

    tasks = 3

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 5)
        self.heads = nn.Linear(5, self.tasks)

    def losses(self, step: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(32, 4, generator=generator)
        y = torch.randint(0, 2, (32, self.tasks), generator=generator).float()
        per_task = F.binary_cross_entropy_with_logits(self.heads(torch.tanh(self.trunk(x))), y,
                                                      reduction="none").mean(0)
        return list((per_task * torch.tensor([1.0, 3.0, 0.3])).unbind())


def assert_resumes_identically(make_model: Callable[[], nn.Module], made: Callable[[nn.Module], Balancer],
                               step: Callable[[nn.Module, Balancer, torch.optim.Optimizer, int], None],
                               steps: int = 6, at: int = 3) -> None:
    """`steps` training steps straight, and with a checkpoint before step `at` (a new balancer and Adam rebuilt
    from their saved states): the model's and the balancer's parameters end the same."""

    def run(split_at: int | None) -> list[torch.Tensor]:
        model = make_model()
        balancer = made(model)
        optimizer = Adam([*model.parameters(), *balancer.parameters()], lr=0.05)
        for index in range(steps):
            if index == split_at:
                saved = copy.deepcopy((balancer.state_dict(), optimizer.state_dict()))
                balancer = made(model)
                optimizer = Adam([*model.parameters(), *balancer.parameters()], lr=0.05)
                balancer.load_state_dict(saved[0])
                optimizer.load_state_dict(saved[1])
            step(model, balancer, optimizer, index)
        return [p.detach() for p in [*model.parameters(), *balancer.parameters()]]

    for a, b in zip(run(None), run(at), strict=True):
        assert torch.equal(a, b)


def step_side_by_side(ours: nn.Module, theirs: nn.Module, balancer: Balancer,
                      batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], split: bool, level: str,
                      reference: Callable[[nn.Module, list[torch.Tensor], object], object]) -> object:
    """One backward of `balancer` on `ours` (through the split forward where `split`) and of
    `reference(model, losses, forward)` on `theirs`, which reads the trunk's outputs (the split forward) at the
    representation level and the ordinary forward otherwise; what the reference returns."""
    categorical, numeric, labels = batch
    found = None
    for model in (ours, theirs):
        model.zero_grad(set_to_none=True)
        use_split = split if model is ours else level == "representation"
        forward = model.split_forward(categorical, numeric) if use_split else None
        losses = losses_of(forward.logits if forward is not None else model(categorical, numeric), labels)
        if model is ours:
            balancer.backward(losses, forward)
        else:
            found = reference(model, losses, forward)
    return found


FUNNEL_ORDER = [2, 0, 1]  # output column 2 is the first stage, then 0 (the main task), then 1


def identity_normalizer(numeric: int = 2) -> NumericNormalizer:
    """A numeric normaliser that leaves `numeric` columns as they are (ScoringModel's, for hand-built models)."""
    normalizer = NumericNormalizer([])
    normalizer.mean, normalizer.std = torch.zeros(numeric), torch.ones(numeric)
    normalizer.log1p = torch.zeros(numeric, dtype=torch.bool)
    return normalizer


def funnel_labels(step: int, rows: int) -> torch.Tensor:
    """Labels [rows, 3] that keep FUNNEL_ORDER's funnel: column 2, then 0, then 1."""
    generator = torch.Generator().manual_seed(100 + step)
    first = torch.rand(rows, generator=generator) < 0.6
    second = first & (torch.rand(rows, generator=generator) < 0.5)
    third = second & (torch.rand(rows, generator=generator) < 0.5)
    return torch.stack([second, third, first], 1).double()


def make_log(rows: int = 600, seed: int = 0) -> pl.DataFrame:
    """An impression log of mixed tasks: click (binary), like (binary, null where not clicked), watch seconds
    (log-normal regression, short where not clicked) driven by the user's taste and the item; a weight per row."""
    rng = random.Random(seed)
    taste = {f"u{i}": rng.gauss(0, 1.0) for i in range(30)}
    quality = {f"i{i}": rng.gauss(0, 1.0) for i in range(20)}
    users = [f"u{rng.randrange(30)}" for _ in range(rows)]
    items = [f"i{rng.randrange(20)}" for _ in range(rows)]
    length = [round(rng.uniform(5, 60), 1) for _ in range(rows)]
    click, like, watch = [], [], []
    for user, item, seconds in zip(users, items, length, strict=True):
        clicked = rng.random() < 1 / (1 + math.exp(-(taste[user] + 0.5 * quality[item] - 0.5)))
        click.append(int(clicked))
        like.append(int(rng.random() < 1 / (1 + math.exp(-2 * quality[item]))) if clicked else None)
        watch.append(round(seconds * math.exp(0.4 * taste[user] + 0.6 * quality[item] + rng.gauss(-1, 0.5)
                                              - (0.0 if clicked else 2.0)), 2))
    return pl.DataFrame({"user": users, "item": items, "length": length, "click": click, "like": like,
                         "watch": watch, "weight": [rng.choice([1.0, 1.0, 3.0]) for _ in range(rows)]})
