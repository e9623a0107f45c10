"""AITM (--model aitm): the network against a literal reference, the calibrator loss by hand and in the fit loop's
losses, the split forward's gradients against autograd's (plain sum and MetaBalance), the CLI end to end."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from mbtrain.balance import MetaBalance
from mbtrain.balance.per_task import heads_backward
from mbtrain.data.batches import EncodedData
from mbtrain.models import AITM, Inputs, ModelConfig, build_model
from mbtrain.models.scoring import ENTIRE_SPACE_DOC, NumericNormalizer, ScoringModel
from mbtrain.tasks import TaskSet
from mbtrain.train import _losses
from tests.helpers import (
    FUNNEL_ORDER,
    assert_same_grads_then_step,
    funnel_labels,
    identity_normalizer,
    run_cli,
    seeded_batch,
)

CARDS = [5, 7, 3]
ORDER = FUNNEL_ORDER


def aitm(order: list[int] = ORDER, **settings: object) -> ScoringModel:
    """A small 3-stage AITM in float64 behind an identity normaliser, as ModelSpec.build makes it."""
    torch.manual_seed(0)
    config = ModelConfig("aitm", **{"embed_dim": 4, "hidden": [8, 6], "tower": [5], "dropout": 0.0, **settings})
    network = build_model(config, Inputs(CARDS, num_numeric=2, num_tasks=3, funnel=tuple(order)))
    normalizer = identity_normalizer()
    return ScoringModel(normalizer, network, order).double()


def reference_logits(network: AITM, x: torch.Tensor) -> torch.Tensor:
    """The paper's wiring written out stage by stage: q_t = tower_t(x); p_{t−1} = ReLU(z_{t−1} W_t + b_t);
    z_t = Σ_u softmax_u(⟨u h1, u h2⟩/√d) u h3 over u ∈ {q_t, p_{t−1}}; z_1 = q_1; logit_t = z_t w_t + c_t."""
    def tower(t: int) -> torch.Tensor:
        h = x
        for layer in network.towers.hidden.layers:
            h = F.relu(h @ layer.weight[t] + layer.bias[t, 0])
        return h

    q = [tower(t) for t in range(3)]
    d = q[0].shape[1]
    z = list(q)
    for before, stage in zip(ORDER, ORDER[1:], strict=False):
        p = F.relu(z[before] @ network.transfer.weight[stage] + network.transfer.bias[stage, 0])
        h1, h2, h3 = (network.attention[stage][:, i * d : (i + 1) * d] for i in range(3))
        scores = torch.stack([((u @ h1) * (u @ h2)).sum(1) / math.sqrt(d) for u in (q[stage], p)], 1)
        w = torch.softmax(scores, dim=1)
        z[stage] = w[:, :1] * (q[stage] @ h3) + w[:, 1:] * (p @ h3)
    out = network.towers.out
    return torch.cat([z[t] @ out.weight[t] + out.bias[t, 0] for t in range(3)], 1)


def test_the_network_is_the_papers_wiring() -> None:
    model = aitm()
    categorical, numeric, _ = seeded_batch(0, CARDS, rows=16)
    x, _, _ = model.network.embedding.inputs(categorical, numeric)
    expected = reference_logits(model.network, x)
    torch.testing.assert_close(model(categorical, numeric), expected, rtol=1e-12, atol=1e-12)
    assert isinstance(model.funnel, torch.nn.Identity)  # entire-space logits already: no ESMM funnel on top
    assert model.shared_parameters() == [model.network.embedding.table.weight]
    assert model.network.attention.shape == (3, 5, 15) and model.network.transfer.weight.shape == (3, 5, 5)


def test_the_towers_start_at_the_plain_rates() -> None:
    model = aitm()
    rates = torch.tensor([0.2, 0.05, 0.6], dtype=torch.double)  # entire-space rates, not given the stage before
    model.set_base_logits(torch.logit(rates))
    torch.testing.assert_close(model.network.towers.out.bias.view(3), torch.logit(rates))


def test_the_calibrator_by_hand() -> None:
    model = aitm(calibrator_weight=0.6)
    probabilities = torch.tensor([[0.5, 0.2, 0.4],  # stages: column 2 → 0 → 1
                                  [0.1, 0.3, 0.6],
                                  [0.7, 0.9, 0.2]], dtype=torch.double)
    logits = torch.logit(probabilities)
    # column 0 above column 2: 0.1 + 0 + 0.5; column 1 above column 0: 0 + 0.2 + 0.2; the first stage: none
    expected = 0.6 * torch.tensor([0.6, 0.4, 0.0], dtype=torch.double)
    torch.testing.assert_close(model.auxiliary_losses(logits), expected, rtol=1e-12, atol=1e-12)
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1]], dtype=torch.double)
    log_loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(0)
    # the fit loop's losses: log loss and calibrator summed over the rows, divided by the global batch's rows
    torch.testing.assert_close(losses_of(model, logits, labels, 6), (log_loss + expected) / 6, rtol=1e-12,
                               atol=1e-12)
    halves = losses_of(model, logits[:2], labels[:2], 3) + losses_of(model, logits[2:], labels[2:], 3)  # two ranks
    torch.testing.assert_close(halves, losses_of(model, logits, labels, 3), rtol=1e-12, atol=1e-12)
    assert aitm(calibrator_weight=0.0).auxiliary_losses(logits) is None


def losses_of(model: ScoringModel, logits: torch.Tensor, labels: torch.Tensor, global_rows: int) -> torch.Tensor:
    """The fit loop's losses of these rows, binary tasks, for a global batch of `global_rows` rows."""
    tasks = labels.shape[1]
    batch = EncodedData(torch.empty(len(labels), 0, dtype=torch.int64), torch.empty(len(labels), 0), labels)
    return _losses(model, TaskSet.from_dict([f"t{i}" for i in range(tasks)], None), logits, batch,
                   torch.full((tasks,), float(global_rows), dtype=logits.dtype), global_rows)


def fit_losses(model: ScoringModel, logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    return list(losses_of(model, logits, labels, labels.shape[0]).unbind())


def test_the_split_forward_gives_the_plain_sums_and_each_tasks_gradients() -> None:
    """Heads back-propagated task by task (a later stage's loss, the calibrator in it, reads the towers before
    it): each task's boundary gradient, through the trunk, is its loss's gradient; the heads get the plain sum's."""
    model = aitm()
    categorical, numeric, _ = seeded_batch(0, CARDS, rows=16)
    labels = funnel_labels(0, 16)
    split = model.split_forward(categorical, numeric)
    assert split.coupled
    torch.testing.assert_close(split.logits, model(categorical, numeric), rtol=1e-12, atol=1e-12)
    head_grads, boundary_grads = heads_backward(fit_losses(model, split.logits, labels), model.task_parameters(),
                                                split)
    plain = fit_losses(model, model(categorical, numeric), labels)
    shared = model.shared_parameters()
    for k, loss in enumerate(plain):
        got = torch.autograd.grad(split.boundary, shared, [g[k] for g in boundary_grads], retain_graph=True)
        for g, want in zip(got, torch.autograd.grad(loss, shared, retain_graph=True), strict=True):
            torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    summed = torch.autograd.grad(split.boundary, shared, [g.sum(0) for g in boundary_grads])
    every = torch.autograd.grad(sum(plain), [*shared, *model.task_parameters()])
    for got, want in zip([*summed, *head_grads], every, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_metabalance_through_the_split_forward_equals_the_straightforward_one() -> None:
    full, fast = aitm(), aitm()
    balancers = [MetaBalance(m.shared_parameters(), task_params=m.task_parameters(),
                             segments=m.shared_segments()) for m in (full, fast)]
    for step in range(3):
        categorical, numeric, _ = seeded_batch(step, CARDS, rows=24)
        labels = funnel_labels(step, 24)
        logits = []
        for model, balancer in zip((full, fast), balancers, strict=True):
            model.zero_grad(set_to_none=True)
            split = model.split_forward(categorical, numeric) if model is fast else None
            logits.append(split.logits if split is not None else model(categorical, numeric))
            balancer.backward(fit_losses(model, logits[-1], labels), split)
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-12, atol=1e-12)
        assert_same_grads_then_step(full, fast)


def test_a_network_and_its_scoring_model_agree_on_the_funnel() -> None:
    network = build_model(ModelConfig("aitm"), Inputs(CARDS, 2, 3, funnel=(0, 1, 2)))
    with pytest.raises(ValueError, match="funnel"):
        ScoringModel(NumericNormalizer([]), network, ORDER)


FIT = ["--tasks", "click,purchase", "--main-task", "purchase", "--epochs", "1", "--batch-size", "64",
       "--threads", "1", "--patience", "0", "--model", "aitm"]


def test_aitm_runs_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("fit", str(data_dir / "train.parquet"), *FIT, "--balance", "metabalance", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "aitm (funnel click → purchase)" in result.output
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["funnel"] and model["calibrator_weight"] == 0.6
    metrics = json.loads((out / "metrics.json").read_text())["tasks"]
    assert metrics["purchase"]["conditional_on"] == "click"
    assert metrics["purchase"]["conditional_rows"] == metrics["click"]["positives"]
    assert 0 <= metrics["purchase"]["conditional_auc"] <= 1 and "conditional_auc" not in metrics["click"]
    test = str(data_dir / "test.csv")
    predictions = tmp_path / "p.parquet"
    result = run_cli("predict", str(out), test, "--output", str(predictions), "--conditional")
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(predictions)
    assert frame.columns == ["pred_purchase", "pred_click", "cond_purchase", "cond_click"]
    assert (frame["cond_click"] == frame["pred_click"]).all()  # the rest is pred_purchase / pred_click
    torch.testing.assert_close(torch.tensor(frame["cond_purchase"] * frame["pred_click"]),
                               torch.tensor(frame["pred_purchase"]), rtol=1e-5, atol=1e-7)
    evaluated = run_cli("eval", str(out), test, "--json", str(tmp_path / "eval.json"))
    assert evaluated.exit_code == 0, evaluated.output
    assert "conditional_auc" in json.loads((tmp_path / "eval.json").read_text())["tasks"]["purchase"]
    formats = [("model.pt", "torchscript")]
    try:
        import onnxruntime  # noqa: F401
        formats.append(("model.onnx", "onnx"))
    except ImportError:
        pass
    for name, fmt in formats:
        exported = tmp_path / name
        result = run_cli("export", str(out), "--output", str(exported), "--format", fmt)
        assert result.exit_code == 0, result.output
        again = tmp_path / f"{fmt}.parquet"
        assert run_cli("predict", str(exported), test, "--output", str(again), "--conditional").exit_code == 0
        torch.testing.assert_close(torch.tensor(pl.read_parquet(again).to_numpy()),
                                   torch.tensor(frame.to_numpy()), rtol=1e-5, atol=1e-7)
    files = {"mbtrain.json": ""}
    with warnings.catch_warnings():  # TorchScript's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(tmp_path / "model.pt"), _extra_files=files)
    assert json.loads(files["mbtrain.json"])["outputs"] == ENTIRE_SPACE_DOC  # not ESMM's products


def test_a_negative_calibrator_weight_is_one_clear_line(data_dir: Path, tmp_path: Path) -> None:
    result = run_cli("fit", str(data_dir / "train.parquet"), *FIT, "--calibrator-weight", "-0.5", "--out",
                     str(tmp_path / "run"))
    assert result.exit_code == 2 and "--calibrator-weight must be non-negative: got -0.5" in result.stderr
