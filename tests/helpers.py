"""Tiny generated multi-task data and a CLI runner, imported by the tests."""

from __future__ import annotations

import math
import random

import polars as pl
from typer.testing import CliRunner, Result

from mbtrain.cli import app


def make_frame(rows: int = 600, seed: int = 0) -> pl.DataFrame:
    """A funnel with signal: click depends on user and price, purchase on click and rating; some nulls."""
    rng = random.Random(seed)
    users = [f"u{rng.randrange(40)}" for _ in range(rows)]
    user_taste = {f"u{i}": rng.gauss(0, 1.2) for i in range(40)}
    price = [None if rng.random() < 0.05 else round(math.exp(rng.gauss(3, 1)), 2) for _ in range(rows)]
    rating = [rng.uniform(1, 5) for _ in range(rows)]
    device = [rng.choice(["ios", "android", "web"]) for _ in range(rows)]
    hour = [rng.randrange(24) for _ in range(rows)]
    click, purchase = [], []
    for i in range(rows):
        logit = user_taste[users[i]] - 0.3 * math.log(price[i] or 20.0) + (0.5 if device[i] == "ios" else 0.0)
        clicked = rng.random() < 1 / (1 + math.exp(-logit))
        bought = clicked and rng.random() < 1 / (1 + math.exp(-(rating[i] - 4.0) * 2))
        click.append(int(clicked))
        purchase.append(int(bought))
    return pl.DataFrame({
        "row_id": list(range(rows)),
        "user": users,
        "device": device,
        "hour": hour,
        "price": price,
        "rating": rating,
        "click": click,
        "purchase": purchase,
    })


def run_cli(*args: str) -> Result:
    """Invoke the mbtrain CLI in-process; stdout and stderr stay separate on the result."""
    return CliRunner().invoke(app, list(args))
