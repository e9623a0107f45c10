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

Every metric also takes optional non-negative row `weights`: a row of weight w counts as w copies of it (pairs weigh
w_i·w_j, group means weigh each group by its total weight, shares are shares of the total weight), so integer weights
give exactly the metrics of the rows repeated; counts (`rows`, `positives`) stay counts of rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mbtrain.models.funnel import conditional_probabilities

LOG_EPS = 1e-7
NULL_GROUP = -1  # group key of a row whose group column is null: such rows belong to no group


def _row_weights(weights: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """`weights` as float64 [rows], checked finite and non-negative; None stays None (unweighted)."""
    if weights is None:
        return None
    w = weights.to(torch.float64)
    if tuple(w.shape) != (rows,):
        raise ValueError(f"row weights must have shape [{rows}], not {list(w.shape)}")
    if rows and (not bool(torch.isfinite(w).all()) or bool((w < 0).any())):
        raise ValueError("row weights must be finite and non-negative")
    return w


def _in_groups(columns: tuple[torch.Tensor, ...], groups: torch.Tensor | None, weights: torch.Tensor | None
               ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None, torch.Tensor | None, float]:
    """The grouped metrics' rows: (the columns, groups and checked weights of the rows in a group, NULL_GROUP's
    dropped; the share's denominator, every row's count or weight)."""
    weights = _row_weights(weights, columns[0].numel())
    total = columns[0].numel() if weights is None else float(weights.sum())
    if groups is not None:
        keep = groups != NULL_GROUP
        columns, groups = tuple(column[keep] for column in columns), groups[keep]
        weights = None if weights is None else weights[keep]
    return columns, groups, weights, total


def auc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> float | None:
    """Area under the ROC curve via the rank-sum statistic with average ranks for ties; None for one class. With
    `weights` a pair of a positive and a negative row weighs w_i·w_j."""
    return grouped_auc(scores, labels, None, weights)[0]


def grouped_auc(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None,
                weights: torch.Tensor | None = None) -> tuple[float | None, float]:
    """(the row-weighted mean of each group's AUC over the groups holding both classes, or None where none
    does; those groups' share of all rows). Rows whose group is NULL_GROUP belong to no group; without
    `groups` every row is in one (the plain AUC: one sort, not two). With `weights`, rows count by their weight:
    in each group's AUC (a positive-negative pair weighs w_i·w_j), in the mean (a group weighs its total weight),
    in the share (of the total weight) and in "holding" a class (a positive weight of it).

    One sort by (group, score) groups the rows into tie blocks; each positive weight in a block beats the negative
    weight of the group's lower blocks and half of its own block's, which summed per group gives each group's
    Mann-Whitney AUC at once (exact for integer weights, unweighted rows weighing 1)."""
    (scores, labels), groups, weights, total = _in_groups((scores, labels), groups, weights)
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
    w = torch.ones(rows, dtype=torch.float64) if weights is None else weights[order]
    new_tie = new_group.clone()
    new_tie[1:] |= scores[1:] != scores[:-1]
    group = torch.cumsum(new_group, 0) - 1
    tie = torch.cumsum(new_tie, 0) - 1
    ties = int(tie[-1]) + 1
    tie_positive = torch.zeros(ties, dtype=torch.float64).index_add_(0, tie, w * labels)
    tie_negative = torch.zeros(ties, dtype=torch.float64).index_add_(0, tie, w * (1 - labels))
    below = torch.cumsum(tie_negative, 0) - tie_negative  # negative weight in the blocks before, of every group
    tie_group = group[new_tie]
    below = below - below[tie[new_group]][tie_group]  # ... of the block's own group
    groups_count = int(group[-1]) + 1
    wins = torch.zeros(groups_count, dtype=torch.float64).index_add_(
        0, tie_group, tie_positive * (below + tie_negative / 2))
    positives = torch.zeros(groups_count, dtype=torch.float64).index_add_(0, tie_group, tie_positive)
    negatives = torch.zeros(groups_count, dtype=torch.float64).index_add_(0, tie_group, tie_negative)
    both = (positives > 0) & (negatives > 0)
    if not bool(both.any()):
        return None, 0.0
    p, n = positives[both], negatives[both]
    group_auc = wins[both] / (p * n)
    weight = p + n
    return float((group_auc * weight).sum() / weight.sum()), float(weight.sum()) / total


def average_precision(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
                      ) -> float | None:
    """Σ over distinct thresholds (descending) of the recall gained times the precision there; None without
    positives (of positive weight). With `weights`, recall and precision are shares of weight, as sklearn's
    `sample_weight`."""
    weights = _row_weights(weights, scores.numel())
    labels = labels.to(torch.float64)
    w = torch.ones_like(labels) if weights is None else weights
    positives = float((w * labels).sum())
    if positives == 0:
        return None
    sorted_scores, order = torch.sort(scores.to(torch.float64), descending=True, stable=True)
    true_positives = torch.cumsum((w * labels)[order], 0)
    last_of_tie = torch.ones_like(sorted_scores, dtype=torch.bool)
    last_of_tie[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    taken = torch.cumsum(w[order], 0)[last_of_tie]
    hits = true_positives[last_of_tie]
    recall_gain = torch.diff(hits, prepend=hits.new_zeros(1)) / positives
    # no weight taken yet (zero-weight rows first): no hit either, so no recall gained
    return float(torch.where(taken > 0, recall_gain * hits / taken, 0.0).sum())


def logloss(probabilities: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
            ) -> float | None:
    """Mean log loss, probabilities clamped to [LOG_EPS, 1 - LOG_EPS]; with `weights` the weighted mean (None for
    a zero total weight)."""
    weights = _row_weights(weights, probabilities.numel())
    p = probabilities.to(torch.float64).clamp(LOG_EPS, 1 - LOG_EPS)
    y = labels.to(torch.float64)
    loss = -(y * p.log() + (1 - y) * (1 - p).log())
    return float(loss.mean()) if weights is None else _weighted_mean(loss, weights)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> float | None:
    total = float(weights.sum())
    return float((values * weights).sum()) / total if total > 0 else None


def xauc(predictions: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> float | None:
    """Pairwise ordering accuracy for a continuous target; None without a pair untied in the target. With `weights`
    a pair weighs w_i·w_j."""
    return grouped_xauc(predictions, targets, None, weights)[0]


def grouped_xauc(predictions: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor | None,
                 weights: torch.Tensor | None = None) -> tuple[float | None, float]:
    """(the row-weighted mean of each group's XAUC over the groups holding a pair untied in the target, or None
    where none does; those groups' share of all rows). Rows whose group is NULL_GROUP belong to no group; without
    `groups` every row is in one. With `weights` a pair weighs w_i·w_j, a group its total weight in the mean, and the
    share is of the total weight.

    Per group, of its P pairs untied in the target, D are discordant and T tied in the prediction alone, so
    XAUC = (P - D - T/2) / P. Twice P and T come from the squared weights of tie blocks after sorts (the pairs in a
    block of weights w_i are ((Σw)² - Σw²)/2, and the Σw² cancel); D is a weighted inversion count. Unweighted all
    in int64, so exact; weighted in float64 (exact for integer weights): no pair is ever formed (O(n log n))."""
    (predictions, targets), groups, weights, total = _in_groups((predictions, targets), groups, weights)
    p, t = predictions.to(torch.float64), targets.to(torch.float64)
    rows = p.numel()
    if rows == 0:
        return None, 0.0
    order = torch.argsort(p, stable=True)
    order = order[torch.argsort(t[order], stable=True)]
    if groups is not None:
        order = order[torch.argsort(groups[order], stable=True)]
    p, t = p[order], t[order]  # rows by (group, target, prediction): a row's position is its index from here on
    w = torch.ones(rows, dtype=torch.int64) if weights is None else weights[order]
    new_group = torch.zeros(rows, dtype=torch.bool)
    new_group[0] = True
    if groups is not None:
        groups = groups[order]
        new_group[1:] = groups[1:] != groups[:-1]
    group = torch.cumsum(new_group, 0) - 1  # dense group index of each position
    count = int(group[-1]) + 1
    size = torch.zeros(count, dtype=w.dtype).index_add_(0, group, w)  # rows or weight of each group
    new_target = new_group.clone()
    new_target[1:] |= t[1:] != t[:-1]
    new_both = new_target.clone()
    new_both[1:] |= p[1:] != p[:-1]
    by_prediction = torch.argsort(p, stable=True)  # positions by (group, prediction, position)
    by_prediction = by_prediction[torch.argsort(group[by_prediction], stable=True)]
    sorted_group, sorted_prediction = group[by_prediction], p[by_prediction]
    new_prediction = torch.ones(rows, dtype=torch.bool)
    new_prediction[1:] = (sorted_group[1:] != sorted_group[:-1]) | (sorted_prediction[1:] != sorted_prediction[:-1])
    untied2 = size * size - _block_squares(new_target, group, count, w)  # twice P
    prediction_ties2 = (_block_squares(new_prediction, sorted_group, count, w[by_prediction])
                        - _block_squares(new_both, group, count, w))  # twice T
    discordant = _inversions(by_prediction, group, count, None if weights is None else w)
    defined = untied2 > 0
    if not bool(defined.any()):
        return None, 0.0
    # (P - D - T/2) / P, all four times: exactly today's int64 arithmetic, scaled by a power of two, when unweighted
    score = (2 * untied2 - 4 * discordant - prediction_ties2)[defined].to(torch.float64) / (2 * untied2[defined])
    weight = size[defined].to(torch.float64)
    return float((score * weight).sum() / weight.sum()), float(weight.sum()) / total


def _block_squares(new_block: torch.Tensor, group: torch.Tensor, groups: int, weight: torch.Tensor) -> torch.Tensor:
    """Per group, Σ over the blocks of a sorted sequence (blocks start where `new_block`, `weight` in the sequence's
    order) of the block's squared total weight."""
    block = torch.cumsum(new_block, 0) - 1
    block_weight = torch.zeros(int(block[-1]) + 1, dtype=weight.dtype).index_add_(0, block, weight)
    return torch.zeros(groups, dtype=weight.dtype).index_add_(0, group[new_block], block_weight * block_weight)


def _inversions(sequence: torch.Tensor, group: torch.Tensor, groups: int, weight: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Per group, the pairs of positions i < j whose values are strictly out of order, given `sequence`: the
    positions sorted by (value, position); with `weight` (float64, by position) the sum of w_i·w_j over those
    pairs. A top-down merge sort run backwards: at each level a block of the sorted sequence splits, stably, into
    the positions of its left and its right half (one cumulative sum); a right-half position then has as many
    inversions with the left half as there are left-half positions after it in the block (or that much of their
    weight), these all holding a larger value since a tie would have put them first. O(n) a level."""
    rows = sequence.numel()
    index = torch.arange(rows)
    counts = torch.zeros(groups, dtype=torch.int64 if weight is None else torch.float64)
    for level in range(max(rows - 1, 0).bit_length(), 0, -1):  # blocks of 2**level positions, halves of 2**(level-1)
        left = ((sequence >> (level - 1)) & 1) == 0
        cumulative = torch.cumsum(left, 0)
        start = (index >> level) << level
        end = (start + (1 << level)).clamp(max=rows) - 1
        before = cumulative[start] - left[start].long()
        upto = cumulative - before  # left-half positions in the block up to here, inclusive
        left_total = cumulative[end] - before
        right = ~left
        if weight is None:
            counts.index_add_(0, group[sequence[right]], (left_total - upto)[right])
        else:
            w = weight[sequence]
            left_weight = torch.cumsum(torch.where(left, w, 0.0), 0)
            later = left_weight[end] - left_weight  # left-half weight after each position in its block
            counts.index_add_(0, group[sequence[right]], (w * later)[right])
        place = torch.where(left, start + upto - 1, start + left_total + (index - start) - upto)
        sequence = torch.empty_like(sequence).index_put_((place,), sequence)
    return counts


def regression_metrics(predictions: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor | None = None,
                       weights: torch.Tensor | None = None) -> dict[str, Any]:
    """{"rmse", "mae", "r2", "xauc", "mean_target", "mean_prediction", "rows"[, "gxauc", "gxauc_rows"]} for 1-D
    predictions and targets of the rows holding a label, in float64; `groups` (int64, NULL_GROUP for none) adds
    GXAUC. `weights` (float [rows], non-negative) weighs every mean and every pair; "rows" stays a count."""
    p, y = predictions.to(torch.float64), targets.to(torch.float64)
    rows = int(y.numel())
    w = _row_weights(weights, rows)
    values: dict[str, Any] = {"rmse": None, "mae": None, "r2": None, "xauc": None, "mean_target": None,
                              "mean_prediction": None, "rows": rows}
    total = rows if w is None else float(w.sum())
    if total > 0:
        def mean(v: torch.Tensor) -> float:
            return float(v.mean()) if w is None else float((v * w).sum()) / total

        error = p - y
        squared = float((error * error).sum() if w is None else (w * error * error).sum())
        values["rmse"] = math.sqrt(squared / total)
        values["mae"] = mean(error.abs())
        values["mean_target"] = target_mean = mean(y)
        values["mean_prediction"] = mean(p)
        weighed = y if w is None else y[w > 0]  # the rows that count
        if bool(weighed.min() < weighed.max()):  # a constant target has no variance to explain (its SST is rounding)
            deviation = (y - target_mean) ** 2
            values["r2"] = 1 - squared / float(deviation.sum() if w is None else (w * deviation).sum())
        values["xauc"] = xauc(p, y, w)
    if groups is not None:
        values["gxauc"], values["gxauc_rows"] = grouped_xauc(p, y, groups, w)
    return values


def multiclass_metrics(probabilities: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
                       ) -> dict[str, Any]:
    """{"accuracy", "logloss", "macro_auc", "rows"} for [rows, K] class probabilities and [rows] class indices
    (integers, or floats holding them). `weights` (float [rows], non-negative) weighs the means and each class's
    one-vs-rest AUC; "rows" stays a count."""
    rows, classes = int(probabilities.shape[0]), int(probabilities.shape[1])
    w = _row_weights(weights, rows)
    target = targets.to(torch.int64)
    if rows and (bool((target != targets).any()) or int(target.min()) < 0 or int(target.max()) >= classes):
        raise ValueError(f"class targets must be integers in [0, {classes})")
    if rows == 0 or (w is not None and not float(w.sum()) > 0):
        return {"accuracy": None, "logloss": None, "macro_auc": None, "rows": rows}
    p = probabilities.to(torch.float64)
    picked = p.gather(1, target[:, None]).squeeze(1).clamp(LOG_EPS, 1.0)
    one_hot = torch.nn.functional.one_hot(target, classes)
    # every class has all the rows (and so all the weight), so grouped_auc's weighted mean over the classes holding
    # both is their mean
    macro, _ = grouped_auc(p.T.reshape(-1), one_hot.T.reshape(-1), torch.arange(classes).repeat_interleave(rows),
                           None if w is None else w.repeat(classes))
    hit = (p.argmax(1) == target).to(torch.float64)
    if w is None:
        return {"accuracy": float(hit.mean()), "logloss": float(-picked.log().mean()), "macro_auc": macro,
                "rows": rows}
    return {"accuracy": _weighted_mean(hit, w), "logloss": _weighted_mean(-picked.log(), w), "macro_auc": macro,
            "rows": rows}


def _entropy(rate: float) -> float | None:
    """Entropy (nats) of a Bernoulli(rate) label: the log loss of always predicting the base rate."""
    if rate <= 0.0 or rate >= 1.0:
        return None
    return -(rate * math.log(rate) + (1 - rate) * math.log1p(-rate))


def binary_metrics(probabilities: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None) -> dict[str, Any]:
    """{"auc", "logloss", "pr_auc", "calibration", "ne", "positives", "rows"[, "gauc", "gauc_rows"][, "weight"]} of
    one binary task's [rows] probabilities and 0/1 labels; `groups` (int64 [rows], NULL_GROUP for none) adds GAUC.
    `weights` (float [rows], non-negative) weighs every metric and adds "weight" (their sum); "positives" and
    "rows" stay counts of rows."""
    rows = int(labels.shape[0])
    positives = int(labels.sum())
    w = _row_weights(weights, rows)
    if w is None:
        total, positive_weight = rows, positives
        predicted = float(probabilities.to(torch.float64).sum())
    else:
        total, positive_weight = float(w.sum()), float((w * labels.to(torch.float64)).sum())
        predicted = float((w * probabilities.to(torch.float64)).sum())
    loss = logloss(probabilities, labels, w) if total > 0 else None
    entropy = _entropy(positive_weight / total) if total > 0 else None
    values: dict[str, Any] = {
        "auc": auc(probabilities, labels, w),
        "logloss": loss,
        "pr_auc": average_precision(probabilities, labels, w),
        "calibration": predicted / positive_weight if positive_weight else None,
        "ne": loss / entropy if entropy and loss is not None else None,
        "positives": positives,
        "rows": rows,
    }
    if groups is not None:
        values["gauc"], values["gauc_rows"] = grouped_auc(probabilities, labels, groups, w)
    if w is not None:
        values["weight"] = total
    return values


def conditional_metrics(probabilities: torch.Tensor, labels: torch.Tensor, tasks: list[str], funnel: list[str],
                        weights: torch.Tensor | None = None) -> dict[str, dict[str, Any]]:
    """Each later funnel stage's {"conditional_auc", "conditional_on", "conditional_rows"}: ESMM's CVR AUC, the AUC
    of its probability given the stage before, on the rows where that stage is positive; `weights` ([rows]) weighs
    the AUC's pairs, "conditional_rows" staying a count."""
    conditional = conditional_probabilities(probabilities, [tasks.index(task) for task in funnel])
    metrics = {}
    for before, task in zip(funnel, funnel[1:], strict=False):
        i = tasks.index(task)
        passed = labels[:, tasks.index(before)] == 1
        present = passed & ~torch.isnan(labels[:, i])
        metrics[task] = {"conditional_auc": auc(conditional[present, i], labels[present, i],
                                                None if weights is None else weights[present]),
                         "conditional_on": before, "conditional_rows": int(present.sum())}
    return metrics
