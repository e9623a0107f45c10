"""Per-task ranking and calibration metrics, exact and vectorised (no Python loop over rows or groups).

Definitions (docs/metrics.md): `auc` with ties counted one half; `pr_auc` = average precision, as
sklearn's `average_precision_score`; `logloss`; `calibration` = Σ predicted / Σ actual; `ne` = log loss over
the entropy of the rows' positive rate; with groups, `gauc` = the row-weighted mean AUC of the groups
holding both classes and `gauc_rows` = those groups' share of the rows; with a funnel, a later stage's
`conditional_auc` = the AUC of its conditional probability on the `conditional_rows` rows where the stage
before it (`conditional_on`) is positive. Undefined values are None.

Regression targets: `rmse`, `mae`, `r2` = 1 - SSE/SST (None for a constant target); `xauc` = the share of the pairs
untied in the target whose predictions are ordered as their targets are, pairs tied in the prediction only counting
one half; with groups, `gxauc` = the row-weighted mean XAUC of the groups holding an untied pair and `gxauc_rows` =
those groups' share of the rows. Class targets: `accuracy` (argmax), `logloss` = mean -log p(target), `macro_auc` =
the mean one-vs-rest AUC over the classes both present and absent among the rows.
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


def xauc(predictions: torch.Tensor, targets: torch.Tensor) -> float | None:
    """Pairwise ordering accuracy for a continuous target; None without a pair untied in the target."""
    return grouped_xauc(predictions, targets, None)[0]


def grouped_xauc(predictions: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor | None
                 ) -> tuple[float | None, float]:
    """(the row-weighted mean of each group's XAUC over the groups holding a pair untied in the target, or None
    where none does; those groups' share of all rows). Rows whose group is NULL_GROUP belong to no group; without
    `groups` every row is in one.

    Per group, of its P pairs untied in the target, D are discordant and T tied in the prediction alone, so
    XAUC = (P - D - T/2) / P. P and T come from tie-block sizes after sorts; D is an inversion count. All in
    int64, so exact: no pair is ever formed (O(n log n))."""
    total = predictions.numel()
    if groups is not None:
        keep = groups != NULL_GROUP
        predictions, targets, groups = predictions[keep], targets[keep], groups[keep]
    p, t = predictions.to(torch.float64), targets.to(torch.float64)
    rows = p.numel()
    if rows == 0:
        return None, 0.0
    order = torch.argsort(p, stable=True)
    order = order[torch.argsort(t[order], stable=True)]
    if groups is not None:
        order = order[torch.argsort(groups[order], stable=True)]
    p, t = p[order], t[order]  # rows by (group, target, prediction): a row's position is its index from here on
    new_group = torch.zeros(rows, dtype=torch.bool)
    new_group[0] = True
    if groups is not None:
        groups = groups[order]
        new_group[1:] = groups[1:] != groups[:-1]
    group = torch.cumsum(new_group, 0) - 1  # dense group index of each position
    count = torch.bincount(group)
    new_target = new_group.clone()
    new_target[1:] |= t[1:] != t[:-1]
    new_both = new_target.clone()
    new_both[1:] |= p[1:] != p[:-1]
    by_prediction = torch.argsort(p, stable=True)  # positions by (group, prediction, position)
    by_prediction = by_prediction[torch.argsort(group[by_prediction], stable=True)]
    sorted_group, sorted_prediction = group[by_prediction], p[by_prediction]
    new_prediction = torch.ones(rows, dtype=torch.bool)
    new_prediction[1:] = (sorted_group[1:] != sorted_group[:-1]) | (sorted_prediction[1:] != sorted_prediction[:-1])
    untied = count * (count - 1) // 2 - _tied_pairs(new_target, group, count.numel())
    prediction_ties = (_tied_pairs(new_prediction, sorted_group, count.numel())
                       - _tied_pairs(new_both, group, count.numel()))
    discordant = _inversions(by_prediction, group, count.numel())
    defined = untied > 0
    if not bool(defined.any()):
        return None, 0.0
    score = (2 * (untied - discordant) - prediction_ties)[defined].to(torch.float64) / (2 * untied[defined])
    weight = count[defined].to(torch.float64)
    return float((score * weight).sum() / weight.sum()), float(weight.sum()) / total


def _tied_pairs(new_block: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """Per group, the pairs inside the same block of a sorted sequence (blocks start where `new_block`): each row
    counts the rows of its block before it."""
    index = torch.arange(new_block.numel())
    start = index[new_block][torch.cumsum(new_block, 0) - 1]
    return torch.zeros(groups, dtype=torch.int64).index_add_(0, group, index - start)


def _inversions(sequence: torch.Tensor, group: torch.Tensor, groups: int) -> torch.Tensor:
    """Per group, the pairs of positions i < j whose values are strictly out of order, given `sequence`: the
    positions sorted by (value, position). A top-down merge sort run backwards: at each level a block of the
    sorted sequence splits, stably, into the positions of its left and its right half (one cumulative sum); a
    right-half position then has as many inversions with the left half as there are left-half positions after
    it in the block, these all holding a larger value since a tie would have put them first. O(n) a level."""
    rows = sequence.numel()
    index = torch.arange(rows)
    counts = torch.zeros(groups, dtype=torch.int64)
    for level in range(max(rows - 1, 0).bit_length(), 0, -1):  # blocks of 2**level positions, halves of 2**(level-1)
        left = ((sequence >> (level - 1)) & 1) == 0
        cumulative = torch.cumsum(left, 0)
        start = (index >> level) << level
        end = (start + (1 << level)).clamp(max=rows) - 1
        before = cumulative[start] - left[start].long()
        upto = cumulative - before  # left-half positions in the block up to here, inclusive
        left_total = cumulative[end] - before
        right = ~left
        counts.index_add_(0, group[sequence[right]], (left_total - upto)[right])
        place = torch.where(left, start + upto - 1, start + left_total + (index - start) - upto)
        sequence = torch.empty_like(sequence).index_put_((place,), sequence)
    return counts


def regression_metrics(predictions: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor | None = None
                       ) -> dict[str, Any]:
    """{"rmse", "mae", "r2", "xauc", "mean_target", "mean_prediction", "rows"[, "gxauc", "gxauc_rows"]} for 1-D
    predictions and targets of the rows holding a label, in float64; `groups` (int64, NULL_GROUP for none) adds
    GXAUC."""
    p, y = predictions.to(torch.float64), targets.to(torch.float64)
    rows = int(y.numel())
    values: dict[str, Any] = {"rmse": None, "mae": None, "r2": None, "xauc": None, "mean_target": None,
                              "mean_prediction": None, "rows": rows}
    if rows:
        error = p - y
        squared = float((error * error).sum())
        values["rmse"] = math.sqrt(squared / rows)
        values["mae"] = float(error.abs().mean())
        mean = float(y.mean())
        values["mean_target"] = mean
        values["mean_prediction"] = float(p.mean())
        if bool(y.min() < y.max()):  # a constant target has no variance to explain (its SST would be rounding)
            values["r2"] = 1 - squared / float(((y - mean) ** 2).sum())
        values["xauc"] = xauc(p, y)
    if groups is not None:
        values["gxauc"], values["gxauc_rows"] = grouped_xauc(p, y, groups)
    return values


def multiclass_metrics(probabilities: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """{"accuracy", "logloss", "macro_auc", "rows"} for [rows, K] class probabilities and [rows] class indices
    (integers, or floats holding them)."""
    rows, classes = int(probabilities.shape[0]), int(probabilities.shape[1])
    target = targets.to(torch.int64)
    if rows and (bool((target != targets).any()) or int(target.min()) < 0 or int(target.max()) >= classes):
        raise ValueError(f"class targets must be integers in [0, {classes})")
    if rows == 0:
        return {"accuracy": None, "logloss": None, "macro_auc": None, "rows": 0}
    p = probabilities.to(torch.float64)
    picked = p.gather(1, target[:, None]).squeeze(1).clamp(LOG_EPS, 1.0)
    one_hot = torch.nn.functional.one_hot(target, classes)
    # every class has all the rows, so grouped_auc's row-weighted mean over the classes holding both is their mean
    macro, _ = grouped_auc(p.T.reshape(-1), one_hot.T.reshape(-1), torch.arange(classes).repeat_interleave(rows))
    return {"accuracy": float((p.argmax(1) == target).to(torch.float64).mean()),
            "logloss": float(-picked.log().mean()), "macro_auc": macro, "rows": rows}

def _entropy(rate: float) -> float | None:
    """Entropy (nats) of a Bernoulli(rate) label: the log loss of always predicting the base rate."""
    if rate <= 0.0 or rate >= 1.0:
        return None
    return -(rate * math.log(rate) + (1 - rate) * math.log1p(-rate))


def binary_metrics(probabilities: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None
                   ) -> dict[str, Any]:
    """{"auc", "logloss", "pr_auc", "calibration", "ne", "positives", "rows"[, "gauc", "gauc_rows"]} of one binary
    task's [rows] probabilities and 0/1 labels; `groups` (int64 [rows], NULL_GROUP for none) adds GAUC."""
    rows = int(labels.shape[0])
    positives = int(labels.sum())
    loss = logloss(probabilities, labels) if rows else None
    entropy = _entropy(positives / rows) if rows else None
    values: dict[str, Any] = {
        "auc": auc(probabilities, labels),
        "logloss": loss,
        "pr_auc": average_precision(probabilities, labels),
        "calibration": float(probabilities.to(torch.float64).sum()) / positives if positives else None,
        "ne": loss / entropy if entropy else None,
        "positives": positives,
        "rows": rows,
    }
    if groups is not None:
        values["gauc"], values["gauc_rows"] = grouped_auc(probabilities, labels, groups)
    return values


def conditional_metrics(probabilities: torch.Tensor, labels: torch.Tensor, tasks: list[str], funnel: list[str]
                        ) -> dict[str, dict[str, Any]]:
    """Each later funnel stage's {"conditional_auc", "conditional_on", "conditional_rows"}: ESMM's CVR AUC, the AUC
    of its probability given the stage before, on the rows where that stage is positive."""
    conditional = conditional_probabilities(probabilities, [tasks.index(task) for task in funnel])
    metrics = {}
    for before, task in zip(funnel, funnel[1:], strict=False):
        i = tasks.index(task)
        passed = labels[:, tasks.index(before)] == 1
        present = passed & ~torch.isnan(labels[:, i])
        metrics[task] = {"conditional_auc": auc(conditional[present, i], labels[present, i]),
                         "conditional_on": before, "conditional_rows": int(present.sum())}
    return metrics
