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


def funnel_log(rows: int, seed: int = 0) -> pl.DataFrame:
    """An ad impression log with a click → cart → purchase funnel (purchase ⊂ cart ⊂ click; ~14 % click, ~4.5 %
    cart, ~2 % purchase) whose labels hang on additive per-id propensities, not a user·item dot product.

    3,000 users and 1,000 items (a heavy head over a long tail), 30 categories, device, hour, ad slot, price and
    the user's activity. Each stage's logit adds effects it shares with the others: the user's taste (in part
    told by `user_activity`), the item's quality and its category; and drivers of its own: click the ad slot
    (position bias), the hour and an item's catchiness (`bait`, which lowers cart); cart a category effect of
    its own; purchase the price (strongest there), the device (web buys more) and the evening; plus a
    per-row, per-stage noise the log does not record."""
    rng = np.random.default_rng(seed)
    users, items, categories = 3_000, 1_000, 30

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-x))

    # who and what: a heavy head of busy users and popular items over a long tail (ids shuffled off rank order)
    user_p = 1 / (np.arange(users) + 10.0) ** 0.9
    item_p = 1 / (np.arange(items) + 5.0) ** 0.8
    user = rng.permutation(users)[rng.choice(users, rows, p=user_p / user_p.sum())]
    item = rng.permutation(items)[rng.choice(items, rows, p=item_p / item_p.sum())]
    # per user: activity (a feature) partly tells a hidden taste that every stage shares, each with a twist
    log_activity = rng.normal(0, 1, users)
    taste = 0.25 * log_activity + rng.normal(0, 0.6, users)
    taste_click = taste + rng.normal(0, 0.3, users)
    taste_buy = taste + rng.normal(0, 0.4, users)
    home_device = rng.choice(3, users, p=[0.45, 0.4, 0.15])  # ios, android, web
    # per item: a category, a quality every stage shares, a catchiness, a price about its category's level
    category = rng.integers(0, categories, items)
    cat_effect = rng.normal(0, 0.3, categories)
    cat_cart = cat_effect + rng.normal(0, 0.3, categories)
    cat_price = rng.normal(3.5, 0.7, categories)
    quality = rng.normal(0, 0.5, items)
    bait = rng.normal(0, 0.7, items)  # a catchy image: clicks that convert worse
    item_log_price = cat_price[category] + rng.normal(0, 0.5, items)
    # each impression's context: mostly the user's own device, a daily rhythm, the ad's slot, today's price
    device = np.where(rng.random(rows) < 0.8, home_device[user], rng.integers(0, 3, rows))
    hour_p = 1 + 0.7 * np.sin((np.arange(24) - 9) / 24 * 2 * np.pi)
    hour = rng.choice(24, rows, p=hour_p / hour_p.sum())
    slot = rng.integers(1, 7, rows)
    log_price = item_log_price[item] + rng.normal(0, 0.1, rows)
    lp = log_price - 3.5
    u, i, c = user, item, category[item]
    evening = ((hour >= 19) & (hour <= 23)).astype(float)
    click_logit = (-1.8 + taste_click[u] + quality[i] + bait[i] + cat_effect[c] - 0.3 * (slot - 1)
                   + np.array([0.2, 0.0, -0.3])[device] + 0.2 * evening - 0.05 * lp)
    cart_logit = -1.2 + 0.7 * taste[u] + 0.7 * quality[i] + cat_cart[c] - 0.3 * bait[i] - 0.2 * lp
    buy_logit = (-1.0 + 0.7 * taste_buy[u] + 0.4 * quality[i] - 0.4 * lp + np.array([0.2, -0.2, 0.4])[device]
                 + 0.3 * evening)
    noise = rng.normal(0, 1, (3, rows)) * np.array([[0.7], [0.8], [1.0]])  # what the log does not record
    click = rng.random(rows) < sigmoid(click_logit + noise[0])
    cart = click & (rng.random(rows) < sigmoid(cart_logit + noise[1]))  # a stage only after the one before
    purchase = cart & (rng.random(rows) < sigmoid(buy_logit + noise[2]))
    return pl.DataFrame({
        "user_id": user,
        "item_id": item,
        "category": np.array([f"cat{k}" for k in range(categories)])[c],
        "device": np.array(["ios", "android", "web"])[device],
        "hour": hour.astype(np.int8),
        "slot": slot.astype(np.int8),
        "price": np.round(np.exp(log_price), 2),
        "user_activity": np.round(np.exp(log_activity), 3)[u],
        "click": click.astype(np.int8),
        "cart": cart.astype(np.int8),
        "purchase": purchase.astype(np.int8),
    })
