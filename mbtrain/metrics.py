"""Per-task AUC (exact, ties counted as half) and log loss."""

from __future__ import annotations

import torch

LOG_EPS = 1e-7


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve via the rank-sum statistic with average ranks for ties; None for one class."""
    labels = labels.to(torch.float64)
    positives = float(labels.sum())
    negatives = labels.numel() - positives
    if positives == 0 or negatives == 0:
        return None
    sorted_scores, order = torch.sort(scores.to(torch.float64))
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    average_rank = ends - (counts.to(torch.float64) - 1) / 2  # 1-based mean rank of each tie group
    rank_sum = float((average_rank[inverse] * labels[order]).sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def logloss(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    p = probabilities.to(torch.float64).clamp(LOG_EPS, 1 - LOG_EPS)
    y = labels.to(torch.float64)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def task_metrics(probabilities: torch.Tensor, labels: torch.Tensor, tasks: list[str]) -> dict[str, dict]:
    """{task: {"auc", "logloss", "positives", "rows"}} for [rows, T] probabilities and labels."""
    return {
        task: {
            "auc": auc(probabilities[:, i], labels[:, i]),
            "logloss": logloss(probabilities[:, i], labels[:, i]),
            "positives": int(labels[:, i].sum()),
            "rows": int(labels.shape[0]),
        }
        for i, task in enumerate(tasks)
    }
