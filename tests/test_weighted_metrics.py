"""Row-weighted metrics: integer weights (0 included) give the metrics of the rows repeated that many times, ties in
scores and targets, groups and null groups included; float weights match scikit-learn's `sample_weight` and, for
XAUC, every pair weighed w_i·w_j."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)

from mbtrain.metrics import NULL_GROUP, binary_metrics, grouped_auc, multiclass_metrics, regression_metrics, xauc

COUNTS = {"rows", "positives", "weight"}  # counts of rows, not of weight


def repeated(weights: torch.Tensor, *columns: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each row repeated its (integer) weight times."""
    counts = weights.to(torch.int64)
    return [None if c is None else c.repeat_interleave(counts, 0) for c in columns]


def assert_same(weighted: dict, plain: dict) -> None:
    assert weighted.keys() - {"weight"} == plain.keys()
    for key, value in plain.items():
        if key in COUNTS:
            continue
        assert (weighted[key] is None) == (value is None), key
        if value is not None:
            assert weighted[key] == pytest.approx(value, abs=1e-12), key


def integer_weights(generator: torch.Generator, rows: int) -> torch.Tensor:
    return torch.randint(0, 4, (rows,), generator=generator).to(torch.float32)  # a quarter of the rows weigh 0


def groups_of(generator: torch.Generator, rows: int) -> torch.Tensor:
    groups = torch.randint(0, 12, (rows,), generator=generator) * 31 - 100
    groups[torch.rand(rows, generator=generator) < 0.1] = NULL_GROUP
    return groups


@pytest.mark.parametrize("seed", range(4))
def test_binary_integer_weights_repeat_rows(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = 400
    labels = (torch.rand(rows, generator=generator) < 0.25).float()
    probabilities = ((labels * 0.3 + torch.rand(rows, generator=generator)) * 6).floor() / 8 + 0.01  # many ties
    groups = groups_of(generator, rows)
    weights = integer_weights(generator, rows)
    lonely = groups == groups[0]  # a group whose positives all weigh 0: one class left once weighted
    weights[lonely & (labels == 1)] = 0.0
    weighted = binary_metrics(probabilities, labels, groups, weights)
    plain = binary_metrics(*repeated(weights, probabilities, labels, groups))
    assert_same(weighted, plain)
    assert weighted["positives"] == int(labels.sum()) and weighted["rows"] == rows
    assert weighted["weight"] == float(weights.sum()) and "weight" not in plain
    assert weighted["gauc_rows"] < 1.0


@pytest.mark.parametrize("seed", range(2))
def test_regression_integer_weights_repeat_rows(seed: int) -> None:
    generator = torch.Generator().manual_seed(10 + seed)
    for rows in [1, 2, 8, 9, 33, 150]:  # around powers of two: the inversion count's block edges
        targets = torch.randint(0, 5, (rows,), generator=generator).float()
        predictions = torch.randint(0, 6, (rows,), generator=generator).float() / 3 + targets * 0.4
        groups = groups_of(generator, rows)
        weights = integer_weights(generator, rows)
        weighted = regression_metrics(predictions, targets, groups, weights)
        plain = regression_metrics(*repeated(weights, predictions, targets, groups))
        assert_same(weighted, plain)
        assert weighted["rows"] == rows and "weight" not in weighted


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_integer_weights_repeat_rows(seed: int) -> None:
    generator = torch.Generator().manual_seed(20 + seed)
    rows, classes = 120, 4
    targets = torch.randint(0, classes, (rows,), generator=generator)
    logits = torch.randn(rows, classes, generator=generator).round()  # coarse: ties between rows
    logits[torch.arange(rows), targets] += 1.0
    probabilities = torch.softmax(logits, 1)
    weights = integer_weights(generator, rows)
    weights[targets == 3] = 0.0  # class 3 present among the rows but weighing nothing: no AUC for it
    weighted = multiclass_metrics(probabilities, targets, weights)
    plain = multiclass_metrics(*repeated(weights, probabilities, targets))
    assert_same(weighted, plain)
    assert weighted["rows"] == rows


def test_binary_float_weights_match_sklearn() -> None:
    generator = torch.Generator().manual_seed(5)
    rows = 1000
    labels = (torch.rand(rows, generator=generator) < 0.2).float()
    probabilities = ((labels * 0.25 + torch.rand(rows, generator=generator)) * 10).floor() / 14 + 0.02
    weights = torch.rand(rows, generator=generator) * 3
    weights[:50] = 0.0
    y, p, w = labels.numpy(), probabilities.double().numpy(), weights.double().numpy()
    metrics = binary_metrics(probabilities, labels, None, weights)
    loss = log_loss(y, p, sample_weight=w)
    rate = float((w * y).sum() / w.sum())
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert metrics == {
        "auc": pytest.approx(roc_auc_score(y, p, sample_weight=w), abs=1e-12),
        "pr_auc": pytest.approx(average_precision_score(y, p, sample_weight=w), abs=1e-12),
        "logloss": pytest.approx(loss, rel=1e-12),
        "calibration": pytest.approx((w * p).sum() / (w * y).sum(), rel=1e-12),
        "ne": pytest.approx(loss / entropy, rel=1e-12),
        "positives": int(labels.sum()),
        "rows": rows,
        "weight": pytest.approx(w.sum(), rel=1e-12),
    }


def test_gauc_float_weights_group_by_group() -> None:
    generator = torch.Generator().manual_seed(6)
    rows = 600
    groups = groups_of(generator, rows)
    labels = (torch.rand(rows, generator=generator) < 0.3).float()
    scores = ((labels * 0.3 + torch.rand(rows, generator=generator)) * 5).floor()
    weights = torch.rand(rows, generator=generator).double()
    total = weight = 0.0
    for key in set(groups.tolist()) - {NULL_GROUP}:
        rows_of = groups == key
        if 0 < labels[rows_of].sum() < rows_of.sum():
            group_weight = float(weights[rows_of].sum())
            total += roc_auc_score(labels[rows_of].numpy(), scores[rows_of].numpy(),
                                   sample_weight=weights[rows_of].numpy()) * group_weight
            weight += group_weight
    value, share = grouped_auc(scores, labels, groups, weights)
    assert value == pytest.approx(total / weight, abs=1e-12)
    assert share == pytest.approx(weight / float(weights.sum()), abs=1e-12)


def test_regression_float_weights_match_sklearn_and_every_pair() -> None:
    generator = torch.Generator().manual_seed(7)
    rows = 70
    targets = torch.randint(0, 6, (rows,), generator=generator).double()
    predictions = torch.randint(0, 8, (rows,), generator=generator).double() / 2 + targets * 0.5
    weights = torch.rand(rows, generator=generator).double() * 2
    weights[:5] = 0.0
    y, p, w = targets.numpy(), predictions.numpy(), weights.numpy()
    agreed = pairs = 0.0
    for i, j in itertools.combinations(range(rows), 2):
        if y[i] != y[j]:
            sign = (p[i] - p[j]) * (y[i] - y[j])
            pairs += w[i] * w[j]
            agreed += w[i] * w[j] * (1.0 if sign > 0 else 0.5 if sign == 0 else 0.0)
    metrics = regression_metrics(predictions, targets, None, weights)
    assert metrics == {
        "rmse": pytest.approx(math.sqrt(mean_squared_error(y, p, sample_weight=w)), rel=1e-12),
        "mae": pytest.approx(mean_absolute_error(y, p, sample_weight=w), rel=1e-12),
        "r2": pytest.approx(r2_score(y, p, sample_weight=w), rel=1e-12),
        "xauc": pytest.approx(agreed / pairs, abs=1e-12),
        "mean_target": pytest.approx((w * y).sum() / w.sum(), rel=1e-12),
        "mean_prediction": pytest.approx((w * p).sum() / w.sum(), rel=1e-12),
        "rows": rows,
    }


def test_multiclass_float_weights_match_sklearn() -> None:
    generator = torch.Generator().manual_seed(8)
    rows, classes = 300, 3
    targets = torch.randint(0, classes, (rows,), generator=generator)
    logits = torch.randn(rows, classes, generator=generator, dtype=torch.float64).mul(2).round()
    logits[torch.arange(rows), targets] += 1.0
    probabilities = torch.softmax(logits, 1)
    weights = torch.rand(rows, generator=generator).double()
    p, y, w = probabilities.numpy(), targets.numpy(), weights.numpy()
    aucs = [roc_auc_score(y == k, p[:, k], sample_weight=w) for k in range(classes)]
    metrics = multiclass_metrics(probabilities, targets, weights)
    assert metrics == {
        "accuracy": pytest.approx(accuracy_score(y, p.argmax(1), sample_weight=w), rel=1e-12),
        "logloss": pytest.approx(log_loss(y, p, sample_weight=w, labels=list(range(classes))), rel=1e-12),
        "macro_auc": pytest.approx(sum(aucs) / classes, abs=1e-12),
        "rows": rows,
    }


def test_unit_weights_change_nothing_but_add_the_weight() -> None:
    generator = torch.Generator().manual_seed(9)
    rows = 200
    labels = (torch.rand(rows, generator=generator) < 0.3).float()
    probabilities = torch.rand(rows, generator=generator)
    groups = groups_of(generator, rows)
    ones = torch.ones(rows)
    weighted = binary_metrics(probabilities, labels, groups, ones)
    assert weighted.pop("weight") == rows
    assert weighted == pytest.approx(binary_metrics(probabilities, labels, groups), abs=1e-12)
    targets = torch.randint(0, 4, (rows,), generator=generator).float()
    assert regression_metrics(probabilities, targets, groups, ones) == \
        pytest.approx(regression_metrics(probabilities, targets, groups), abs=1e-12)
    scaled = regression_metrics(probabilities, targets, groups, torch.full((rows,), 2.5))  # only ratios: scale-free
    assert scaled == pytest.approx(regression_metrics(probabilities, targets, groups), abs=1e-12)


def test_zero_total_weight_and_bad_weights() -> None:
    probabilities, labels = torch.tensor([0.2, 0.7, 0.6]), torch.tensor([0.0, 1.0, 0.0])
    zero = torch.zeros(3)
    assert binary_metrics(probabilities, labels, torch.tensor([1, 1, 2]), zero) == {
        "auc": None, "logloss": None, "pr_auc": None, "calibration": None, "ne": None, "positives": 1, "rows": 3,
        "gauc": None, "gauc_rows": 0.0, "weight": 0.0}
    assert regression_metrics(probabilities, labels, torch.tensor([1, 1, 2]), zero) == {
        "rmse": None, "mae": None, "r2": None, "xauc": None, "mean_target": None, "mean_prediction": None, "rows": 3,
        "gxauc": None, "gxauc_rows": 0.0}
    assert multiclass_metrics(torch.tensor([[0.3, 0.7], [0.6, 0.4]]), torch.tensor([1, 0]), torch.zeros(2)) == {
        "accuracy": None, "logloss": None, "macro_auc": None, "rows": 2}
    # weight only on the negatives: no weighted positive, so no AUC or calibration, but a log loss
    only_negatives = binary_metrics(probabilities, labels, None, torch.tensor([1.0, 0.0, 2.0]))
    assert only_negatives["auc"] is None and only_negatives["calibration"] is None and only_negatives["ne"] is None
    assert only_negatives["logloss"] == pytest.approx(-(math.log(0.8) + 2 * math.log(0.4)) / 3)
    # a target constant over the rows that weigh: no R², no XAUC
    constant = regression_metrics(torch.tensor([0.1, 0.5, 0.9]), torch.tensor([1.0, 2.0, 2.0]), None,
                                  torch.tensor([0.0, 1.0, 3.0]))
    assert constant["r2"] is None and constant["xauc"] is None and constant["rmse"] is not None
    with pytest.raises(ValueError, match="non-negative"):
        binary_metrics(probabilities, labels, None, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        regression_metrics(probabilities, labels, None, torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="shape"):
        multiclass_metrics(torch.tensor([[0.3, 0.7]]), torch.tensor([1]), torch.ones(2))


def test_weighted_xauc_of_a_binary_target_is_the_weighted_auc() -> None:
    generator = torch.Generator().manual_seed(12)
    labels = (torch.rand(300, generator=generator) < 0.3).float()
    scores = torch.randint(0, 7, (300,), generator=generator).float() + labels * 2
    weights = torch.rand(300, generator=generator) * 4
    assert xauc(scores, labels, weights) == pytest.approx(
        roc_auc_score(labels.numpy(), scores.numpy(), sample_weight=weights.double().numpy()), abs=1e-12)
