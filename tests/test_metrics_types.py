"""Regression and multiclass metrics against brute-force references written here (every pair counted), ties in
target and prediction, null groups, all-tied groups and empty input included."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mbtrain.metrics import LOG_EPS, NULL_GROUP, auc, grouped_xauc, multiclass_metrics, regression_metrics, xauc


def pair_xauc(predictions: list[float], targets: list[float]) -> float | None:
    """Every pair untied in the target: 1 when ordered like it, 1/2 when tied in the prediction."""
    agreed = pairs = 0.0
    for i, j in itertools.combinations(range(len(targets)), 2):
        if targets[i] == targets[j]:
            continue
        pairs += 1
        sign = (predictions[i] - predictions[j]) * (targets[i] - targets[j])
        agreed += 1.0 if sign > 0 else 0.5 if sign == 0 else 0.0
    return agreed / pairs if pairs else None


def pair_grouped_xauc(predictions: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor
                      ) -> tuple[float | None, float]:
    values, weights = [], []
    for key in sorted(set(groups.tolist()) - {NULL_GROUP}):
        rows = groups == key
        value = pair_xauc(predictions[rows].tolist(), targets[rows].tolist())
        if value is not None:
            values.append(value)
            weights.append(int(rows.sum()))
    if not weights:
        return None, 0.0
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights), sum(weights) / groups.numel()


def pair_auc(scores: list[float], labels: list[bool]) -> float | None:
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not positives or not negatives:
        return None
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def coarse(generator: torch.Generator, rows: int, levels: int) -> torch.Tensor:
    """Few distinct values: many ties."""
    return torch.randint(0, levels, (rows,), generator=generator).to(torch.float32) / levels


@pytest.mark.parametrize("seed", range(4))
def test_xauc_counts_every_pair_with_ties(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for rows in [2, 3, 7, 8, 9, 31, 64, 77]:  # around powers of two: the inversion count's block edges
        targets = coarse(generator, rows, 4)
        predictions = coarse(generator, rows, 5) + targets * 0.3  # correlated, ties in both and in both at once
        expected = pair_xauc(predictions.tolist(), targets.tolist())
        value = xauc(predictions, targets)
        assert (value is None and expected is None) or value == pytest.approx(expected, abs=1e-12)


def test_xauc_without_ties_and_its_extremes() -> None:
    generator = torch.Generator().manual_seed(11)
    targets = torch.randn(50, generator=generator, dtype=torch.float64)
    predictions = targets + torch.randn(50, generator=generator, dtype=torch.float64)
    assert xauc(predictions, targets) == pytest.approx(pair_xauc(predictions.tolist(), targets.tolist()), abs=1e-12)
    assert xauc(targets * 2, targets) == 1.0
    assert xauc(-targets, targets) == 0.0
    assert xauc(torch.zeros(50), targets) == 0.5  # every pair tied in the prediction


def test_xauc_of_a_binary_target_is_the_auc() -> None:
    generator = torch.Generator().manual_seed(5)
    labels = (torch.rand(200, generator=generator) < 0.3).float()
    scores = coarse(generator, 200, 6) + labels * 0.2
    assert xauc(scores, labels) == pytest.approx(auc(scores, labels), abs=1e-12)


def test_xauc_is_none_without_an_untied_pair() -> None:
    assert xauc(torch.zeros(0), torch.zeros(0)) is None
    assert xauc(torch.tensor([0.3]), torch.tensor([1.0])) is None
    assert xauc(torch.tensor([0.1, 0.9, 0.5]), torch.full((3,), 2.0)) is None


@pytest.mark.parametrize("seed", range(3))
def test_grouped_xauc_matches_group_by_group(seed: int) -> None:
    generator = torch.Generator().manual_seed(100 + seed)
    rows = 90
    groups = torch.randint(0, 6, (rows,), generator=generator)
    groups[torch.rand(rows, generator=generator) < 0.2] = NULL_GROUP
    targets = coarse(generator, rows, 3)
    predictions = coarse(generator, rows, 4) + targets
    targets[groups == 2] = 0.5  # a group whose targets all tie: no pair, left out of the mean and of the share
    groups[0], groups[1] = 9, 10  # one-row groups: no pair either
    value, share = grouped_xauc(predictions, targets, groups)
    expected_value, expected_share = pair_grouped_xauc(predictions, targets, groups)
    assert value == pytest.approx(expected_value, abs=1e-12)
    assert share == pytest.approx(expected_share, abs=1e-15)
    assert share < 1.0


def test_grouped_xauc_without_a_group_holding_a_pair() -> None:
    targets = torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0])
    predictions = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    assert grouped_xauc(predictions, targets, torch.full((5,), NULL_GROUP)) == (None, 0.0)
    assert grouped_xauc(predictions, targets, torch.tensor([0, 1, 2, 2, 2])) == (None, 0.0)
    assert grouped_xauc(predictions[:0], targets[:0], torch.zeros(0, dtype=torch.int64)) == (None, 0.0)
    assert grouped_xauc(predictions, targets, None) == (1.0, 1.0)


def test_regression_metrics_match_their_definitions() -> None:
    generator = torch.Generator().manual_seed(3)
    rows = 60
    targets = coarse(generator, rows, 5) * 10
    predictions = targets + torch.randn(rows, generator=generator)
    groups = torch.randint(0, 4, (rows,), generator=generator)
    groups[:7] = NULL_GROUP
    y, p = targets.double().tolist(), predictions.double().tolist()
    mean = sum(y) / rows
    sse = sum((a - b) ** 2 for a, b in zip(p, y, strict=True))
    sst = sum((b - mean) ** 2 for b in y)
    metrics = regression_metrics(predictions, targets, groups)
    gxauc, gxauc_rows = pair_grouped_xauc(predictions, targets, groups)
    assert metrics == {
        "rmse": pytest.approx(math.sqrt(sse / rows), rel=1e-12),
        "mae": pytest.approx(sum(abs(a - b) for a, b in zip(p, y, strict=True)) / rows, rel=1e-12),
        "r2": pytest.approx(1 - sse / sst, rel=1e-12),
        "xauc": pytest.approx(pair_xauc(p, y), abs=1e-12),
        "gxauc": pytest.approx(gxauc, abs=1e-12),
        "gxauc_rows": pytest.approx(gxauc_rows, abs=1e-15),
        "mean_target": pytest.approx(mean, rel=1e-12),
        "mean_prediction": pytest.approx(sum(p) / rows, rel=1e-12),
        "rows": rows,
    }
    assert isinstance(metrics["rows"], int)
    assert "gxauc" not in regression_metrics(predictions, targets)


def test_regression_metrics_edge_cases() -> None:
    empty = regression_metrics(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert empty == {"rmse": None, "mae": None, "r2": None, "xauc": None, "mean_target": None,
                     "mean_prediction": None, "rows": 0, "gxauc": None, "gxauc_rows": 0.0}
    single = regression_metrics(torch.tensor([2.0]), torch.tensor([3.0]))
    assert single["rmse"] == 1.0 and single["mae"] == 1.0 and single["r2"] is None and single["xauc"] is None
    constant = regression_metrics(torch.tensor([0.1, 0.2, 0.3]), torch.full((3,), 0.1, dtype=torch.float64))
    assert constant["r2"] is None and constant["xauc"] is None  # 0.1's mean is not exactly 0.1: still no SST
    assert constant["mean_target"] == pytest.approx(0.1)
    perfect = regression_metrics(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 2.0, 4.0]))
    assert perfect["r2"] == 1.0 and perfect["rmse"] == 0.0 and perfect["xauc"] == 1.0


def test_multiclass_metrics_match_their_definitions() -> None:
    generator = torch.Generator().manual_seed(8)
    rows, classes = 40, 4
    targets = torch.randint(0, 3, (rows,), generator=generator)  # class 3 never occurs: no AUC for it
    logits = torch.randn(rows, classes, generator=generator)
    logits[torch.arange(rows), targets] += 1.0
    probabilities = torch.softmax((logits * 2).round() / 2, 1)  # coarse logits: ties between rows
    p, y = probabilities.double().tolist(), targets.tolist()
    aucs = [pair_auc([row[k] for row in p], [c == k for c in y]) for k in range(classes)]
    defined = [a for a in aucs if a is not None]
    assert len(defined) == 3
    hits = sum(max(range(classes), key=row.__getitem__) == c for row, c in zip(p, y, strict=True))
    metrics = multiclass_metrics(probabilities, targets.double())  # float class indices are accepted
    assert metrics == {
        "accuracy": pytest.approx(hits / rows, abs=1e-15),
        "logloss": pytest.approx(-sum(math.log(row[c]) for row, c in zip(p, y, strict=True)) / rows, rel=1e-12),
        "macro_auc": pytest.approx(sum(defined) / len(defined), abs=1e-12),
        "rows": rows,
    }


def test_multiclass_metrics_edge_cases() -> None:
    assert multiclass_metrics(torch.zeros(0, 3), torch.zeros(0)) == {"accuracy": None, "logloss": None,
                                                                    "macro_auc": None, "rows": 0}
    certain_mistake = multiclass_metrics(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
    assert certain_mistake == {"accuracy": 0.0, "logloss": pytest.approx(-math.log(LOG_EPS)), "macro_auc": None,
                               "rows": 1}
    one_class = multiclass_metrics(torch.tensor([[0.7, 0.3], [0.4, 0.6]]), torch.tensor([0, 0]))
    assert one_class["macro_auc"] is None and one_class["accuracy"] == 0.5  # no class is both present and absent
    with pytest.raises(ValueError, match="integers"):
        multiclass_metrics(torch.tensor([[0.5, 0.5]]), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="integers"):
        multiclass_metrics(torch.tensor([[0.5, 0.5]]), torch.tensor([2]))
