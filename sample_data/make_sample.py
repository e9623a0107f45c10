"""Generate the synthetic e-commerce funnel sample used by mbtrain's docs, tests and demos.

Deterministic: a fixed seed and only the standard library (``random``, ``math``) plus ``polars``,
so re-running it with the same polars version rewrites the committed files byte-identically::

    python sample_data/make_sample.py

Writes, next to this script:

* ``funnel_train.parquet`` -- 4,000 impressions (zstd-compressed parquet)
* ``funnel_test.parquet``  -- 1,000 impressions (zstd-compressed parquet; CSV cannot hold the list column)

The binary labels follow a strict funnel (purchase => cart => click) and are drawn from latent logits
that share a user x item affinity term (hidden random vectors, dot product), so ``user_id`` / ``item_id``
carry real signal beyond the numeric columns and the three tasks share structure.

Two columns were added later and are drawn from their own generator (``EXTRA_SEED``) after every
draw of the main one, so that all the other columns keep their values:

* ``dwell_seconds`` -- a regression label: seconds on the item page after a click (log-normal, driven by
  the same hidden affinity and item quality, the category, the price, the device, a hidden per-user pace
  and whether the visit ended in the cart), null where ``click`` = 0;
* ``item_vec``      -- a vector feature: 4 float32 numbers per row, a fixed noisy linear view of the item's
  hidden taste vector, like a pretrained item embedding; null for the few items without one.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import polars as pl

SEED = 4  # picked among seeds 1-40: both small files land near the target funnel rates
N_TRAIN = 4_000
N_TEST = 1_000
N_USERS = 600
N_ITEMS = 300
DIM = 3  # size of the hidden user / item taste vectors
EXTRA_SEED = 25  # the separate generator of dwell_seconds and item_vec (module docstring)
VEC_DIM = 4  # length of item_vec

OUT_DIR = Path(__file__).resolve().parent

CATEGORIES = [
    "shoes",
    "electronics",
    "books",
    "home",
    "beauty",
    "toys",
    "sports",
    "grocery",
    "fashion",
    "garden",
    "jewelry",
    "pet",
]
# typical (median) price per category, used for the log-normal item prices
CATEGORY_PRICE = {
    "shoes": 60.0,
    "electronics": 180.0,
    "books": 15.0,
    "home": 45.0,
    "beauty": 22.0,
    "toys": 25.0,
    "sports": 50.0,
    "grocery": 8.0,
    "fashion": 35.0,
    "garden": 40.0,
    "jewelry": 90.0,
    "pet": 20.0,
}
DEVICES = ["ios", "android", "web"]
DEVICE_WEIGHTS = [0.38, 0.42, 0.20]
N_BRANDS = 40

# nullable-feature missing rates (applied per row, after the labels are drawn from the true values)
P_NULL_BRAND = 0.03
P_NULL_PRICE = 0.05
P_NULL_AGE = 0.08
P_NULL_RATING = 0.04

# strength of the hidden (id-only) structure: user x item taste match, item quality, user propensity
W_AFFINITY = 2.0
W_QUALITY = 1.0
QUALITY_SD = 1.0
PROPENSITY_SD = 0.8
RATING_FROM_QUALITY = 0.3  # how much of the hidden item quality leaks into the visible item_rating

# intercepts of the three latent logits, tuned so that the rates land in the target ranges
B_CLICK = -3.15
B_CART = -3.35
B_PURCHASE = -3.6

# dwell_seconds (clicked rows only): log(dwell) = log(DWELL_MEDIAN) + the terms in add_extras + noise
DWELL_MEDIAN = 35.0  # seconds, for an average user and item at the category's median price
DWELL_SD = 0.45  # sd of the log-normal noise
PACE_SD = 0.25  # sd of the hidden per-user reading pace (log scale)
DWELL_DEVICE = {"ios": 0.0, "android": -0.1, "web": 0.25}
# spec-heavy categories are read longer, everyday ones shorter (log scale)
DWELL_CATEGORY = {
    "shoes": 0.0,
    "electronics": 0.6,
    "books": 0.35,
    "home": 0.1,
    "beauty": -0.15,
    "toys": -0.15,
    "sports": 0.0,
    "grocery": -0.6,
    "fashion": -0.05,
    "garden": 0.05,
    "jewelry": 0.4,
    "pet": -0.25,
}
DWELL_MIN, DWELL_MAX = 1.0, 1800.0
# item_vec: a fixed random linear map of the item's hidden taste vector plus per-item noise; a few items have none
VEC_NOISE_SD = 0.25
P_NULL_VEC = 0.03  # share of items without a vector

COLUMNS = [
    "impression_id",
    "user_id",
    "item_id",
    "category",
    "brand",
    "device",
    "hour",
    "is_weekend",
    "price",
    "user_age",
    "item_rating",
    "past_clicks_7d",
    "discount",
    "click",
    "cart",
    "purchase",
]
# the added columns' place: item_vec after the features, dwell_seconds after the binary labels
EXTRA_COLUMNS = {"item_vec": "discount", "dwell_seconds": "purchase"}


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def unit_vector(rng: random.Random, dim: int) -> list[float]:
    v = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


def poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method; lam stays small here
    limit = math.exp(-lam)
    k, p = 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def make_users(rng: random.Random) -> list[dict]:
    users = []
    for uid in range(N_USERS):
        users.append(
            {
                "user_id": 1000 + uid,
                "vec": unit_vector(rng, DIM),
                # how click-happy / buy-happy the user is in general (hidden)
                "propensity": rng.gauss(0.0, PROPENSITY_SD),
                "age": min(75, max(18, int(round(rng.gauss(36.0, 11.0))))),
                # recent activity level, drives past_clicks_7d and correlates with propensity
                "activity": 0.0,
                "device": rng.choices(DEVICES, weights=DEVICE_WEIGHTS)[0],
                "price_sensitivity": rng.gauss(0.0, 0.35),
            }
        )
    for u in users:
        u["activity"] = math.exp(0.9 + 0.5 * u["propensity"] + rng.gauss(0.0, 0.4))
    return users


def make_items(rng: random.Random) -> list[dict]:
    brands = [f"brand_{i:02d}" for i in range(N_BRANDS)]
    # each category draws mostly from its own handful of brands
    cat_brands = {c: rng.sample(brands, 6) for c in CATEGORIES}
    items = []
    for iid in range(N_ITEMS):
        cat = CATEGORIES[rng.randrange(len(CATEGORIES))]
        quality = rng.gauss(0.0, QUALITY_SD)
        rating = min(5.0, max(1.0, 3.9 + RATING_FROM_QUALITY * quality + rng.gauss(0.0, 0.35)))
        items.append(
            {
                "item_id": 50_000 + iid * 7,
                "category": cat,
                "brand": rng.choice(cat_brands[cat]) if rng.random() < 0.85 else rng.choice(brands),
                "vec": unit_vector(rng, DIM),
                "quality": quality,
                "rating": round(rating, 1),
                "base_price": CATEGORY_PRICE[cat] * math.exp(rng.gauss(0.0, 0.55)),
            }
        )
    return items


def make_cat_device_effect(rng: random.Random) -> dict[tuple[str, str], float]:
    return {(c, d): rng.gauss(0.0, 0.35) for c in CATEGORIES for d in DEVICES}


def hour_effect(hour: int) -> float:
    # evening peak (~20h), night trough (~4h)
    return 0.35 * math.cos(2.0 * math.pi * (hour - 20) / 24.0)


def popularity(rng: random.Random, n: int, q: float, s: float) -> tuple[list[int], list[float]]:
    """A shuffled rank order and the cumulative Zipf-Mandelbrot weights 1 / (rank + q)^s over it."""
    order = list(range(n))
    rng.shuffle(order)
    cumulative, total = [], 0.0
    for rank in range(n):
        total += 1.0 / (rank + q) ** s
        cumulative.append(total)
    return order, cumulative


def generate(n_rows: int) -> pl.DataFrame:
    rng = random.Random(SEED)
    users = make_users(rng)
    items = make_items(rng)
    cat_dev = make_cat_device_effect(rng)

    # Zipf-Mandelbrot popularity 1 / (rank + q)^s over a shuffled rank order: a heavy head without
    # one user dominating the log (users: q=10, s=1.0; items: q=5, s=0.9)
    user_order, user_cum = popularity(rng, N_USERS, q=10, s=1.0)
    item_order, item_cum = popularity(rng, N_ITEMS, q=5, s=0.9)

    hour_weights = [1.0 + 0.8 * math.cos(2.0 * math.pi * (h - 20) / 24.0) for h in range(24)]

    rows: dict[str, list] = {c: [] for c in COLUMNS}
    hidden: list[dict] = []  # per row, what dwell_seconds and item_vec depend on (no draws from rng)
    for n in range(n_rows):
        u = users[user_order[rng.choices(range(N_USERS), cum_weights=user_cum)[0]]]
        it = items[item_order[rng.choices(range(N_ITEMS), cum_weights=item_cum)[0]]]
        device = u["device"] if rng.random() < 0.8 else rng.choices(DEVICES, weights=DEVICE_WEIGHTS)[0]
        hour = rng.choices(range(24), weights=hour_weights)[0]
        is_weekend = rng.random() < 2.0 / 7.0
        discount = round(rng.choice([0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]), 2)
        price = round(it["base_price"] * math.exp(rng.gauss(0.0, 0.08)) * (1.0 - discount), 2)
        past_clicks = poisson(rng, u["activity"])

        affinity = sum(a * b for a, b in zip(u["vec"], it["vec"], strict=True))  # in [-1, 1]
        log_price_rel = math.log(price / CATEGORY_PRICE[it["category"]])
        rating_c = it["rating"] - 3.9
        age_c = (u["age"] - 36.0) / 11.0
        shared = W_AFFINITY * affinity + W_QUALITY * it["quality"] + u["propensity"]

        z_click = (
            B_CLICK
            + shared
            + cat_dev[(it["category"], device)]
            + hour_effect(hour)
            + 0.15 * math.log1p(past_clicks)
            + 0.8 * discount
            - 0.15 * log_price_rel
            + rng.gauss(0.0, 0.3)
        )
        click = int(rng.random() < sigmoid(z_click))
        cart = purchase = 0
        if click:
            z_cart = (
                B_CART
                + 0.8 * shared
                + 1.6 * discount
                - (0.45 + u["price_sensitivity"]) * log_price_rel
                + 0.35 * rating_c
                + 0.15 * is_weekend
                + rng.gauss(0.0, 0.3)
            )
            cart = int(rng.random() < sigmoid(z_cart))
        if cart:
            z_purchase = (
                B_PURCHASE
                + 0.7 * shared
                + 1.2 * discount
                - 0.35 * log_price_rel
                + 0.3 * rating_c
                + 0.2 * age_c
                + (0.25 if device == "ios" else -0.15 if device == "web" else 0.0)
                + 0.25 * is_weekend
                + rng.gauss(0.0, 0.3)
            )
            purchase = int(rng.random() < sigmoid(z_purchase))

        rows["impression_id"].append(1 + n)
        rows["user_id"].append(u["user_id"])
        rows["item_id"].append(it["item_id"])
        rows["category"].append(it["category"])
        rows["brand"].append(None if rng.random() < P_NULL_BRAND else it["brand"])
        rows["device"].append(device)
        rows["hour"].append(hour)
        rows["is_weekend"].append(is_weekend)
        rows["price"].append(None if rng.random() < P_NULL_PRICE else price)
        rows["user_age"].append(None if rng.random() < P_NULL_AGE else u["age"])
        rows["item_rating"].append(None if rng.random() < P_NULL_RATING else it["rating"])
        rows["past_clicks_7d"].append(past_clicks)
        rows["discount"].append(discount)
        rows["click"].append(click)
        rows["cart"].append(cart)
        rows["purchase"].append(purchase)
        hidden.append(
            {
                "user": u["user_id"],
                "item": it["item_id"],
                "category": it["category"],
                "device": device,
                "affinity": affinity,
                "quality": it["quality"],
                "log_price_rel": log_price_rel,
                "cart": cart,
            }
        )

    schema = {
        "impression_id": pl.Int64,
        "user_id": pl.Int64,
        "item_id": pl.Int64,
        "category": pl.String,
        "brand": pl.String,
        "device": pl.String,
        "hour": pl.Int64,
        "is_weekend": pl.Boolean,
        "price": pl.Float64,
        "user_age": pl.Int64,
        "item_rating": pl.Float64,
        "past_clicks_7d": pl.Int64,
        "discount": pl.Float64,
        "click": pl.Int64,
        "cart": pl.Int64,
        "purchase": pl.Int64,
    }
    return add_extras(pl.DataFrame(rows, schema=schema), users, items, hidden)


def add_extras(df: pl.DataFrame, users: list[dict], items: list[dict], hidden: list[dict]) -> pl.DataFrame:
    """dwell_seconds and item_vec, from their own generator so that the other columns keep their values."""
    rng = random.Random(EXTRA_SEED)
    # like a pretrained item embedding: a fixed random linear map of the hidden taste vector, plus per-item noise
    projection = [[rng.gauss(0.0, 1.0) / math.sqrt(DIM) for _ in range(DIM)] for _ in range(VEC_DIM)]
    item_vec: dict[int, list[float] | None] = {}
    for it in items:
        vec = [
            sum(w * x for w, x in zip(row, it["vec"], strict=True)) + rng.gauss(0.0, VEC_NOISE_SD) for row in projection
        ]
        item_vec[it["item_id"]] = None if rng.random() < P_NULL_VEC else [round(v, 4) for v in vec]
    pace = {u["user_id"]: rng.gauss(0.0, PACE_SD) for u in users}

    dwell: list[float | None] = []
    for h, click in zip(hidden, df["click"], strict=True):
        if not click:
            dwell.append(None)
            continue
        log_dwell = (
            math.log(DWELL_MEDIAN)
            + 0.5 * h["affinity"]  # a good match is read longer
            + 0.25 * h["quality"]
            + 0.4 * h["log_price_rel"]  # pricier items are studied longer
            + DWELL_CATEGORY[h["category"]]
            + DWELL_DEVICE[h["device"]]
            + pace[h["user"]]
            + 0.3 * h["cart"]  # a visit that ends in the cart lasts longer
            + rng.gauss(0.0, DWELL_SD)
        )
        dwell.append(round(min(DWELL_MAX, max(DWELL_MIN, math.exp(log_dwell))), 1))

    df = df.with_columns(
        pl.Series("item_vec", [item_vec[h["item"]] for h in hidden], dtype=pl.List(pl.Float32)),
        pl.Series("dwell_seconds", dwell, dtype=pl.Float64),
    )
    order = []
    for name in COLUMNS:
        order.append(name)
        order.extend(extra for extra, after in EXTRA_COLUMNS.items() if after == name)
    return df.select(order)


def summarize(name: str, df: pl.DataFrame) -> None:
    n = df.height
    clicks = int(df["click"].sum())
    carts = int(df["cart"].sum())
    buys = int(df["purchase"].sum())
    print(
        f"{name}: {n} rows | click {clicks / n:.2%} ({clicks}) | cart {carts / n:.2%} ({carts}, "
        f"{carts / max(clicks, 1):.1%} of clicks) | purchase {buys / n:.2%} ({buys}, "
        f"{buys / max(carts, 1):.1%} of carts)"
    )
    dwell = df["dwell_seconds"].drop_nulls()
    print(
        f"       dwell_seconds present in {dwell.len()} rows ({dwell.len() / n:.2%}) | median {dwell.median():.1f} s"
        f" | mean {dwell.mean():.1f} s | p90 {dwell.quantile(0.9):.1f} s | max {dwell.max():.1f} s"
        f" | item_vec null in {df['item_vec'].null_count()} rows"
    )


def main() -> None:
    df = generate(N_TRAIN + N_TEST)
    # funnel sanity: purchase => cart => click
    assert df.filter((pl.col("cart") > pl.col("click")) | (pl.col("purchase") > pl.col("cart"))).height == 0
    assert df.filter(pl.col("dwell_seconds").is_null() != (pl.col("click") == 0)).height == 0
    train = df.head(N_TRAIN)
    test = df.tail(N_TEST)

    train_path = OUT_DIR / "funnel_train.parquet"
    test_path = OUT_DIR / "funnel_test.parquet"
    for frame, path in [(train, train_path), (test, test_path)]:
        frame.write_parquet(path, compression="zstd", compression_level=19, statistics=False)

    print(
        f"wrote {train_path.name} ({train_path.stat().st_size:,} bytes), "
        f"{test_path.name} ({test_path.stat().st_size:,} bytes)"
    )
    summarize("train", train)
    summarize("test ", test)
    # quick signal check: the purchase rate should move with visible features
    both = pl.concat([train, test])
    for name, expr in [
        ("discount >= 0.2", pl.col("discount") >= 0.2),
        ("item_rating >= 4.5", pl.col("item_rating") >= 4.5),
    ]:
        rates = both.group_by(expr.fill_null(False).alias("flag")).agg(pl.col("purchase").mean()).sort("flag")
        no, yes = rates["purchase"].to_list()
        print(f"purchase rate by {name}: no {no:.2%} | yes {yes:.2%}")
    # ...and the dwell time with the item's price and with the cart
    clicked = both.filter(pl.col("click") == 1)
    for name, expr in [
        ("price above the category median", pl.col("price") > pl.col("price").median().over("category")),
        ("cart", pl.col("cart") == 1),
    ]:
        medians = clicked.group_by(expr.fill_null(False).alias("flag")).agg(pl.col("dwell_seconds").median())
        no, yes = medians.sort("flag")["dwell_seconds"].to_list()
        print(f"median dwell_seconds by {name}: no {no:.1f} s | yes {yes:.1f} s")


if __name__ == "__main__":
    main()
