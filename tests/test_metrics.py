"""Every metric against scikit-learn (GAUC group by group), ties, single-class and null groups included."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from mbtrain.metrics import NULL_GROUP, auc, average_precision, grouped_auc, logloss
from mbtrain.tasks import TaskSet


@pytest.mark.parametrize("levels", [3, 50, None])
def test_auc_matches_sklearn_with_ties(levels: int | None) -> None:
    generator = torch.Generator().manual_seed(levels or 0)
    labels = (torch.rand(2000, generator=generator) < 0.2).float()
    noise = torch.rand(2000, generator=generator)
    scores = labels * 0.3 + noise
    if levels is not None:  # coarse scores: many ties inside and across classes
        scores = (scores * levels).floor()
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)


def test_auc_is_none_for_a_single_class() -> None:
    assert auc(torch.rand(10), torch.zeros(10)) is None
    assert auc(torch.rand(10), torch.ones(10)) is None


def test_logloss_matches_sklearn_and_survives_certain_mistakes() -> None:
    probabilities = torch.tensor([0.1, 0.8, 0.5, 0.99])
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert logloss(probabilities, labels) == pytest.approx(log_loss(labels.numpy(), probabilities.numpy()))
    assert logloss(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])) < 20  # clamped, finite


def task_metrics(probabilities: torch.Tensor, labels: torch.Tensor, tasks: list[str],
                 groups: torch.Tensor | None = None) -> dict:
    """Binary tasks' metrics as validation computes them."""
    return TaskSet.from_dict(tasks, None).metrics(probabilities, labels, groups)


def test_task_metrics_keys_and_values() -> None:
    probabilities = torch.tensor([[0.9, 0.2], [0.1, 0.3], [0.8, 0.1]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    metrics = task_metrics(probabilities, labels, ["buy", "click"])
    loss = log_loss(labels[:, 0].numpy(), probabilities[:, 0].numpy())
    entropy = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert metrics["buy"] == {"auc": 1.0, "logloss": pytest.approx(loss), "pr_auc": 1.0,
                              "calibration": pytest.approx(1.8 / 2), "ne": pytest.approx(loss / entropy),
                              "positives": 2, "rows": 3}
    click = metrics["click"]  # no positives: every ratio to them is undefined
    assert click["auc"] is None and click["pr_auc"] is None and click["calibration"] is None and click["ne"] is None
    assert "gauc" not in click


@pytest.mark.parametrize("levels", [4, None])
def test_pr_auc_matches_sklearn_with_ties(levels: int | None) -> None:
    generator = torch.Generator().manual_seed(7)
    labels = (torch.rand(3000, generator=generator) < 0.1).float()
    scores = labels * 0.2 + torch.rand(3000, generator=generator)
    if levels is not None:
        scores = (scores * levels).floor()
    expected = average_precision_score(labels.numpy(), scores.numpy())
    assert average_precision(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_ne_is_one_for_the_base_rate_and_calibration_sees_a_shift() -> None:
    labels = (torch.rand(5000, generator=torch.Generator().manual_seed(3)) < 0.2).float()
    rate = float(labels.mean())
    metrics = task_metrics(torch.full((5000, 1), rate), labels[:, None], ["t"])["t"]
    assert metrics["ne"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["calibration"] == pytest.approx(1.0, abs=1e-5)
    assert task_metrics(torch.full((5000, 1), 2 * rate), labels[:, None], ["t"])["t"]["calibration"] == \
        pytest.approx(2.0, abs=1e-5)


def _sklearn_gauc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> tuple[float | None, float]:
    """The definition, group by group."""
    total = weight = 0.0
    for key in groups.unique().tolist():
        if key == NULL_GROUP:
            continue
        rows = groups == key
        if 0 < labels[rows].sum() < rows.sum():
            total += roc_auc_score(labels[rows].numpy(), scores[rows].numpy()) * int(rows.sum())
            weight += int(rows.sum())
    return (total / weight if weight else None), weight / len(labels)


@pytest.mark.parametrize("seed", range(4))
def test_gauc_matches_sklearn_group_by_group(seed: int) -> None:
    """Groups of one class, of one row, null keys, ties within and across groups, keys in no order."""
    generator = torch.Generator().manual_seed(seed)
    rows = 2000
    groups = torch.randint(0, 150, (rows,), generator=generator) * 7919 - 50_000  # negative keys too
    groups[torch.rand(rows, generator=generator) < 0.05] = NULL_GROUP
    groups[:3] = torch.tensor([10**12, 10**12 + 1, 10**12 + 2])  # groups of one row
    labels = (torch.rand(rows, generator=generator) < 0.15).float()
    labels[groups == groups[10]] = 1.0  # a group holding positives only
    scores = (labels * 0.3 + torch.rand(rows, generator=generator)).mul(5).floor()  # many ties
    value, share = grouped_auc(scores, labels, groups)
    expected, expected_share = _sklearn_gauc(scores, labels, groups)
    assert value == pytest.approx(expected, abs=1e-12) and share == pytest.approx(expected_share, abs=1e-12)
    assert 0 < share < 1


def test_gauc_edge_cases() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.4])
    one_class_groups = torch.tensor([0, 0, 1, 1])
    assert grouped_auc(scores, torch.tensor([1.0, 1.0, 0.0, 0.0]), one_class_groups) == (None, 0.0)
    assert grouped_auc(scores, torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.full((4,), NULL_GROUP)) == (None, 0.0)
    assert grouped_auc(scores, torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([5, 5, 5, 5])) == \
        (auc(scores, torch.tensor([0.0, 1.0, 1.0, 0.0])), 1.0)
    value, share = grouped_auc(scores, torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([3, 3, NULL_GROUP, 8]))
    assert value == 1.0 and share == 0.5  # one group holds both classes; the null row and the single row do not
    metrics = task_metrics(scores[:, None], torch.tensor([[0.0], [1.0], [1.0], [0.0]]), ["t"],
                           torch.tensor([3, 3, NULL_GROUP, 8]))["t"]
    assert metrics["gauc"] == 1.0 and metrics["gauc_rows"] == 0.5
