"""AUC and log loss against scikit-learn, ties and single-class labels included."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from mbtrain.metrics import auc, logloss, task_metrics


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


def test_task_metrics_shape() -> None:
    probabilities = torch.tensor([[0.9, 0.2], [0.1, 0.3], [0.8, 0.1]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    metrics = task_metrics(probabilities, labels, ["buy", "click"])
    assert metrics["buy"] == {"auc": 1.0, "logloss": pytest.approx(0.1446, abs=1e-4), "positives": 2, "rows": 3}
    assert metrics["click"]["auc"] is None and metrics["click"]["positives"] == 0
