"""Per-task ranking and calibration metrics, exact and vectorised (no Python loop over rows or groups).

Definitions (docs/metrics.md): `auc` with ties counted one half; `pr_auc` = average precision, as
sklearn's `average_precision_score`; `logloss`; `calibration` = Σ predicted / Σ actual; `ne` = log loss over
the entropy of the rows' positive rate; with groups, `gauc` = the row-weighted mean AUC of the groups
holding both classes and `gauc_rows` = those groups' share of the rows; with a funnel, a later stage's
`conditional_auc` = the AUC of its conditional probability on the `conditional_rows` rows where the stage
before it (`conditional_on`) is positive. Undefined values are None.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mbtrain.models.funnel import conditional_probabilities

LOG_EPS = 1e-7
NULL_GROUP = -1  # group key of a row whose group column is null: such rows belong to no group


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Area under the ROC curve via the rank-sum statistic with average ranks for ties; None for one class."""
    return grouped_auc(scores, labels, None)[0]


def grouped_auc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None
                ) -> tuple[float | None, float]:
    """(the row-weighted mean of each group's AUC over the groups holding both classes, or None where none
    does; those groups' share of all rows). Rows whose group is NULL_GROUP belong to no group; without
    `groups` every row is in one (the plain AUC: one sort, not two).

    One sort by (group, score) gives every row its rank within its group, ties averaged; per-group rank sums
    of the positives then give each group's Mann-Whitney AUC at once."""
    total = scores.numel()
    if groups is not None:
        keep = groups != NULL_GROUP
        scores, labels, groups = scores[keep], labels[keep], groups[keep]
    scores, labels = scores.to(torch.float64), labels.to(torch.float64)
    rows = scores.numel()
    if rows == 0:
        return None, 0.0
    order = torch.argsort(scores, stable=True)
    new_group = torch.zeros(rows, dtype=torch.bool)
    new_group[0] = True
    if groups is not None:
        order = order[torch.argsort(groups[order], stable=True)]
        groups = groups[order]
        new_group[1:] = groups[1:] != groups[:-1]
    scores, labels = scores[order], labels[order]
    new_tie = new_group.clone()
    new_tie[1:] |= scores[1:] != scores[:-1]
    position = torch.arange(rows, dtype=torch.float64)
    group = torch.cumsum(new_group, 0) - 1
    rank = position - position[new_group][group] + 1  # 1-based rank within the group
    tie = torch.cumsum(new_tie, 0) - 1
    tie_size = torch.bincount(tie).to(torch.float64)
    average_rank = (rank[new_tie] + (tie_size - 1) / 2)[tie]
    count = torch.bincount(group).to(torch.float64)
    positives = torch.zeros_like(count).index_add_(0, group, labels)
    rank_sum = torch.zeros_like(count).index_add_(0, group, average_rank * labels)
    negatives = count - positives
    both = (positives > 0) & (negatives > 0)
    if not bool(both.any()):
        return None, 0.0
    p, n = positives[both], negatives[both]
    group_auc = (rank_sum[both] - p * (p + 1) / 2) / (p * n)
    weight = count[both]
    return float((group_auc * weight).sum() / weight.sum()), float(weight.sum()) / total


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Σ over distinct thresholds (descending) of the recall gained times the precision there; None without
    positives."""
    labels = labels.to(torch.float64)
    positives = float(labels.sum())
    if positives == 0:
        return None
    sorted_scores, order = torch.sort(scores.to(torch.float64), descending=True, stable=True)
    true_positives = torch.cumsum(labels[order], 0)
    last_of_tie = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    taken = torch.arange(1, labels.numel() + 1, dtype=torch.float64)[last_of_tie]
    hits = true_positives[last_of_tie]
    recall_gain = torch.diff(hits, prepend=hits.new_zeros(1)) / positives
    return float((recall_gain * hits / taken).sum())


def logloss(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    p = probabilities.to(torch.float64).clamp(LOG_EPS, 1 - LOG_EPS)
    y = labels.to(torch.float64)
    return float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())


def _entropy(rate: float) -> float | None:
    """Entropy (nats) of a Bernoulli(rate) label: the log loss of always predicting the base rate."""
    if rate <= 0.0 or rate >= 1.0:
        return None
    return -(rate * math.log(rate) + (1 - rate) * math.log1p(-rate))


def task_metrics(probabilities: torch.Tensor, labels: torch.Tensor, tasks: list[str],
                 groups: torch.Tensor | None = None, funnel: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{task: {"auc", "logloss", "pr_auc", "calibration", "ne", "positives", "rows"[, "gauc", "gauc_rows"]}}
    for [rows, T] probabilities and labels; `groups` (int64 [rows], NULL_GROUP for none) adds GAUC; `funnel`
    (the tasks, first stage first) adds each later stage's conditional_auc, conditional_on, conditional_rows."""
    metrics = {}
    rows = int(labels.shape[0])
    conditional = None if funnel is None else conditional_probabilities(
        probabilities, [tasks.index(task) for task in funnel])
    for i, task in enumerate(tasks):
        p, y = probabilities[:, i], labels[:, i]
        positives = int(y.sum())
        loss = logloss(p, y)
        entropy = _entropy(positives / rows) if rows else None
        values: dict[str, Any] = {
            "auc": auc(p, y),
            "logloss": loss,
            "pr_auc": average_precision(p, y),
            "calibration": float(p.to(torch.float64).sum()) / positives if positives else None,
            "ne": loss / entropy if entropy else None,
            "positives": positives,
            "rows": rows,
        }
        if groups is not None:
            values["gauc"], values["gauc_rows"] = grouped_auc(p, y, groups)
        if conditional is not None and task != funnel[0]:  # ESMM's CVR AUC: on the rows that passed the stage before
            before = funnel[funnel.index(task) - 1]
            passed = labels[:, tasks.index(before)] == 1
            values["conditional_auc"] = auc(conditional[passed, i], y[passed])
            values["conditional_on"] = before
            values["conditional_rows"] = int(passed.sum())
        metrics[task] = values
    return metrics
