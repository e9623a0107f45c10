"""Checks of one setting's value, each raising MbtrainError that names the flag: what the config sections and
every balancer's settings validate with."""

from __future__ import annotations

import math
from collections.abc import Collection

from mbtrain.errors import MbtrainError


def one_of(flag: str, value: str, choices: Collection[str]) -> None:
    if value not in choices:
        raise MbtrainError(f"{flag} {value!r} is not supported: choose one of {', '.join(choices)}")


def in_unit_interval(flag: str, value: float) -> None:
    """value in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise MbtrainError(f"{flag} must be in [0, 1): got {value}")


def positive(flag: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise MbtrainError(f"{flag} must be positive: got {value}")


def non_negative(flag: str, value: float, note: str = "") -> None:
    if not (math.isfinite(value) and value >= 0):
        raise MbtrainError(f"{flag} must be non-negative{note}: got {value}")


def at_least_one(flag: str, value: int) -> None:
    if value < 1:
        raise MbtrainError(f"{flag} must be at least 1: got {value}")
