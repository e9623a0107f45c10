"""--task-backward batched: the per-task backward passes as one, stacked over the tasks, give the loop's gradients
for every model (the funnel's coupled heads too, with batch norm, layer norm and dropout) and for every balancer
built on per-task gradients, at each of its levels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mbtrain.balance import BALANCERS, Setup, build_balancer
from mbtrain.balance.per_task import heads_backward
from mbtrain.models import Inputs, ModelConfig, build_model
from mbtrain.models.scoring import ScoringModel
from tests.helpers import FUNNEL_ORDER, funnel_labels, identity_normalizer, losses_of, run_cli, seeded_batch

CARDS = [5, 7, 3]
PER_TASK = [(name, level) for name, kind in BALANCERS.items() for level in kind.levels]
MODELS = {  # id: (model, its settings, whether it predicts the funnel)
    "shared-bottom": ("shared-bottom", {}, False),
    "mmoe": ("mmoe", {}, False),
    "mmoe-funnel-batch-norm-dropout": ("mmoe", {"norm": "batch", "dropout": 0.2}, True),
    "ple": ("ple", {}, False),
    "ple-3-levels-layer-norm": ("ple", {"levels": 3, "norm": "layer", "task_experts": 2}, False),
    "esmm": ("esmm", {}, True),
    "aitm": ("aitm", {}, True),
}


def twins(key: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two identical 3-task float64 models of MODELS[key], with the funnel over them where it says so."""
    return twins_of(*MODELS[key])


def twins_of(name: str, settings: dict, funnel: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    config = ModelConfig(name, **{"embed_dim": 4, "hidden": [8, 6], "experts": 3, "tower": [5], "dropout": 0.0,
                                  **settings})
    inputs = Inputs(CARDS, num_numeric=2, num_tasks=3, funnel=tuple(FUNNEL_ORDER) if funnel else None)
    found = []
    for _ in range(2):
        torch.manual_seed(0)
        network = build_model(config, inputs)
        found.append(ScoringModel(identity_normalizer(), network, FUNNEL_ORDER if funnel else None).double())
    return found[0], found[1]


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize(("balance", "level"), PER_TASK, ids=[f"{n}-{lvl}" for n, lvl in PER_TASK])
def test_the_batched_backward_gives_the_loops_gradients(balance: str, level: str, key: str) -> None:
    loop, batched = twins(key)
    balancers = [build_balancer(balance, Setup.of(model, 3, seed=3, level=level, task_backward=mode))
                 for model, mode in ((loop, "loop"), (batched, "batched"))]
    assert [b.batched for b in balancers] == [False, True]
    funnel = MODELS[key][2]
    for step in range(3):
        categorical, numeric, labels = seeded_batch(step, CARDS)
        if funnel:
            labels = funnel_labels(step, labels.shape[0])
        for model, balancer in zip((loop, batched), balancers, strict=True):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(step)  # the same dropout masks
            split = model.split_forward(categorical, numeric) if balancer.wants_split else None
            logits = split.logits if split is not None else model(categorical, numeric)
            extra = model.auxiliary_losses(logits)  # AITM's calibrator, as the fit loop adds it
            losses = losses_of(logits, labels)
            if extra is not None:
                losses = [loss + term / labels.shape[0] for loss, term in zip(losses, extra.unbind(), strict=True)]
            balancer.backward(losses, split)
        for (label, a), b in zip(loop.named_parameters(), batched.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=label)
        with torch.no_grad():
            for a, b in zip(loop.parameters(), batched.parameters(), strict=True):
                if a.grad is not None:
                    a.sub_(0.3 * a.grad)
                    b.sub_(0.3 * b.grad)


def test_the_full_backward_batched_gives_the_loops_gradients() -> None:
    """Without the split forward (a model without one, or a balancer built without task parameters) every task's
    gradient of the shared parameters comes from one backward of the stacked losses."""
    loop, batched = twins("mmoe")
    balancers = [build_balancer("pcgrad", Setup.of(model, 3, task_backward=mode))
                 for model, mode in ((loop, "loop"), (batched, "batched"))]
    categorical, numeric, labels = seeded_batch(0, CARDS)
    for model, balancer in zip((loop, batched), balancers, strict=True):
        balancer.backward(losses_of(model(categorical, numeric), labels))
    for a, b in zip(loop.parameters(), batched.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12)


def test_a_fit_with_the_batched_backward_learns_what_the_loop_does(data_dir: Path, tmp_path: Path) -> None:
    common = ["--tasks", "click,purchase", "--main-task", "purchase", "--epochs", "2", "--batch-size", "64",
              "--exclude", "row_id", "--balance", "metabalance", "--funnel", "--seed", "1"]
    metrics = {}
    for mode in ("loop", "batched"):
        out = tmp_path / mode
        result = run_cli("fit", str(data_dir / "train.parquet"), *common, "--task-backward", mode, "--out", str(out))
        assert result.exit_code == 0, result.output
        metrics[mode] = json.loads((out / "metrics.json").read_text())["tasks"]
    for task, values in metrics["loop"].items():
        assert metrics["batched"][task]["logloss"] == pytest.approx(values["logloss"], rel=1e-4), task
    bad = run_cli("fit", str(data_dir / "train.parquet"), *common, "--task-backward", "vmap", "--out",
                  str(tmp_path / "bad"))
    assert bad.exit_code == 2 and "--task-backward" in bad.stderr and "vmap" in bad.stderr


@pytest.mark.parametrize("key", ["mmoe", "shared-bottom", "ple", "ple-3-levels-layer-norm", "esmm"])
def test_the_funnels_heads_backward_row_by_row_gives_the_task_by_task_gradients(key: str) -> None:
    """Under the funnel over uncoupled towers the heads are back-propagated twice (split.outputs), not once per
    task: the same gradients as task by task, dropout included."""
    name, settings, _ = MODELS[key]
    model, _ = twins_of(name, {**settings, "dropout": 0.3}, funnel=True)
    categorical, numeric, _ = seeded_batch(0, CARDS)
    labels = funnel_labels(0, categorical.shape[0])
    found = []
    for rowwise in (True, False):
        torch.manual_seed(1)  # the same dropout masks
        split = model.split_forward(categorical, numeric)
        assert split.coupled and split.outputs is not None
        if not rowwise:
            split.outputs = None
        found.append(heads_backward(losses_of(split.logits, labels), model.task_parameters(), split))
    (ours_heads, ours_boundary), (their_heads, their_boundary) = found
    for ours, theirs in zip([*ours_heads, *ours_boundary], [*their_heads, *their_boundary], strict=True):
        assert (ours is None) == (theirs is None)
        if ours is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)


def test_batch_norm_in_the_heads_keeps_the_funnels_heads_task_by_task() -> None:
    model, _ = twins("mmoe-funnel-batch-norm-dropout")
    categorical, numeric, _ = seeded_batch(0, CARDS)
    split = model.split_forward(categorical, numeric)
    assert split.coupled and split.outputs is None
