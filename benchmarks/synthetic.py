"""Generated impression logs at benchmark sizes: ~30 columns of strings, ints, floats and nulls, 3 labels."""

from __future__ import annotations

import numpy as np
import polars as pl

TASKS = ["purchase", "cart", "click"]


def impressions(rows: int, users: int = 20_000, items: int = 5_000, seed: int = 0, extra: int = 14) -> pl.DataFrame:
    """A click → cart → purchase funnel driven by user / item affinities and a few feature effects."""
    rng = np.random.default_rng(seed)
    # a heavy head of busy users and popular items over a uniform tail, so most ids appear
    user = np.where(rng.random(rows) < 0.3, rng.zipf(1.3, rows) % users, rng.integers(0, users, rows))
    item = np.where(rng.random(rows) < 0.5, rng.zipf(1.2, rows) % items, rng.integers(0, items, rows))
    user_vec, item_vec = rng.normal(0, 0.7, (users, 4)), rng.normal(0, 0.7, (items, 4))
    category = item % 40
    device = rng.integers(0, 3, rows)
    hour = rng.integers(0, 24, rows)
    price = np.exp(rng.normal(3, 1, rows))
    rating = rng.uniform(1, 5, rows)
    affinity = (user_vec[user] * item_vec[item]).sum(1)
    click_logit = -2.0 + affinity + 0.3 * (device == 0) - 0.2 * np.log(price) + 0.1 * rating
    click = rng.random(rows) < 1 / (1 + np.exp(-click_logit))
    cart = click & (rng.random(rows) < 1 / (1 + np.exp(-(-1.0 + affinity + 0.2 * rating))))
    purchase = cart & (rng.random(rows) < 1 / (1 + np.exp(-(-0.5 + 0.5 * affinity - 0.1 * np.log(price)))))
    columns: dict[str, object] = {
        "user_id": user,
        "item_id": item,
        "category": np.array([f"cat{c}" for c in range(40)])[category],
        "device": np.array(["ios", "android", "web"])[device],
        "hour": hour,
        "price": price,
        "rating": rating,
    }
    for j in range(extra):  # filler features of every kind, some with nulls
        kind = j % 3
        if kind == 0:
            columns[f"s{j}"] = np.array([f"v{v}" for v in range(50 + 10 * j)])[rng.integers(0, 50 + 10 * j, rows)]
        elif kind == 1:
            columns[f"i{j}_code"] = rng.integers(0, 200 * (j + 1), rows)
        else:
            columns[f"f{j}"] = rng.normal(0, 1 + j, rows)
    frame = pl.DataFrame(columns)
    nulls = {name: rng.random(rows) < 0.05 for name in ("price", "category", "s0", "f2")}
    frame = frame.with_columns(
        [pl.when(pl.Series(mask)).then(None).otherwise(pl.col(name)).alias(name) for name, mask in nulls.items()]
    )
    return frame.with_columns(
        pl.Series("click", click.astype(np.int8)),
        pl.Series("cart", cart.astype(np.int8)),
        pl.Series("purchase", purchase.astype(np.int8)),
    )


def id_log(rows: int, values: int, seed: int = 0) -> pl.DataFrame:
    """One id column (`ad_id`, `values` distinct ids: each at least once, the rest from a heavy head over a
    uniform tail) beside two small categoricals and a number; `click` and `purchase` driven by each id's own
    propensity and the others. The log of issue 24's scale benchmark (benchmarks/vocab.py)."""
    rng = np.random.default_rng(seed)
    if values > rows:
        raise ValueError(f"{values:,} distinct ids need at least as many rows, got {rows:,}")
    rest = rows - values
    drawn = np.where(rng.random(rest) < 0.5, rng.zipf(1.3, rest) % values, rng.integers(0, values, rest))
    ids = np.concatenate([np.arange(values), drawn])[rng.permutation(rows)]
    effect = rng.normal(0, 1, values)[ids]
    device = rng.integers(0, 3, rows)
    region = rng.integers(0, 50, rows)
    price = np.exp(rng.normal(3, 1, rows))
    click_logit = -1.5 + effect + 0.3 * (device == 0) - 0.2 * np.log(price) + 0.01 * region
    click = rng.random(rows) < 1 / (1 + np.exp(-click_logit))
    purchase = click & (rng.random(rows) < 1 / (1 + np.exp(-(-2.0 + 0.5 * effect))))
    return pl.DataFrame({"ad_id": ids, "device": device.astype(np.int8), "region": region.astype(np.int16),
                         "price": price, "click": click.astype(np.int8), "purchase": purchase.astype(np.int8)})


def feed_log(rows: int, users: int = 2_000, items: int = 500, seed: int = 0) -> pl.DataFrame:
    """A short-video feed's impressions with tasks of two kinds (issue 25's measurement, benchmarks/task_types.py):
    `click` (binary, ~30 %), `like` (binary, null where not clicked: a like exists only for a watched item) and
    `watch` (seconds, log-normal: a median of ~6 s with a tail past 100 s, on every row, far shorter where not
    clicked), driven by user and item effects (ids), a user-item affinity and the numeric features."""
    rng = np.random.default_rng(seed)
    user = np.where(rng.random(rows) < 0.3, rng.zipf(1.3, rows) % users, rng.integers(0, users, rows))
    item = np.where(rng.random(rows) < 0.5, rng.zipf(1.2, rows) % items, rng.integers(0, items, rows))
    user_vec, item_vec = rng.normal(0, 0.6, (users, 4)), rng.normal(0, 0.6, (items, 4))
    taste, patience = rng.normal(0, 0.5, users), rng.normal(0, 0.5, users)  # a user's click and watch effects
    quality = rng.normal(0, 0.7, items)
    length = np.exp(rng.normal(3.5, 0.6, items))[item]  # the video's length in seconds, ~33 s median
    device = rng.integers(0, 3, rows)
    hour = rng.integers(0, 24, rows)
    activity = np.exp(rng.normal(0, 1, users))[user]  # sessions a day: a user feature
    freshness = rng.exponential(10, rows)  # days since upload
    affinity = (user_vec[user] * item_vec[item]).sum(1)
    click_logit = (-1.2 + affinity + taste[user] + 0.8 * quality[item] + 0.4 * (device == 0) + 0.3 * np.log(activity)
                   - 0.03 * freshness)
    click = rng.random(rows) < 1 / (1 + np.exp(-click_logit))
    like = rng.random(rows) < 1 / (1 + np.exp(-(-1.5 + 0.8 * affinity + 1.5 * quality[item])))
    log_watch = (np.log(length) - 0.6 + 0.5 * affinity + patience[user] + 0.8 * quality[item] + 0.1 * np.log(activity)
                 - 1.5 * ~click + rng.normal(0, 0.6, rows))
    watch = np.minimum(np.exp(log_watch), 1.2 * length)  # a replay at most
    return pl.DataFrame({
        "user_id": user,
        "item_id": item,
        "category": np.array([f"cat{c}" for c in range(30)])[item % 30],
        "device": np.array(["ios", "android", "web"])[device],
        "hour": hour,
        "length": np.round(length, 1),
        "activity": activity,
        "freshness": freshness,
        "click": click.astype(np.int8),
        "like": like.astype(np.int8),
        "watch": np.round(watch, 2),
    }).with_columns(pl.when(pl.col("click") == 1).then(pl.col("like")).otherwise(None).alias("like"))
