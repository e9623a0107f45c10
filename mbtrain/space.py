"""Search ranges: what `mbtrain sweep --trials N` samples a setting from. A user writes one as `LOW:HIGH` or
`LOW:HIGH:log` (`--lr 0.001:0.03:log`, `--task-weights click=0.05:1:log`); a balancer declares the default range of
each of its settings with `tuned` (its field's metadata), so that `--trials N` alone searches what matters.

No Optuna here: sweep/tune.py turns a Range into Optuna's distributions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from mbtrain.errors import MbtrainError

SPACE = "space"  # the metadata key of a settings field's default search space


@dataclass(frozen=True)
class Range:
    """From `low` to `high`, on a log scale or not; whole numbers for an integer setting."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"{self.text()}: the low end should be below the high end")
        if self.log and not self.low > 0:
            raise ValueError(f"{self.text()}: a log range starts above 0")

    def text(self) -> str:
        """As the user writes it."""
        number = (lambda v: str(int(v))) if self.integer else (lambda v: f"{v:g}")
        return f"{number(self.low)}:{number(self.high)}" + (":log" if self.log else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def parse(cls, where: str, text: str, integer: bool = False) -> Range:
        """`LOW:HIGH` or `LOW:HIGH:log`; one clear line (naming `where`) otherwise."""
        parts = [part.strip() for part in text.split(":")]
        scale = parts.pop() if len(parts) == 3 else None
        if len(parts) != 2 or scale not in (None, "log"):
            raise MbtrainError(f"{where}: {text!r} is not a range: write LOW:HIGH or LOW:HIGH:log")
        try:
            low, high = ((int if integer else float)(part) for part in parts)
        except ValueError:
            kind = "whole numbers" if integer else "numbers"
            raise MbtrainError(f"{where}: {text!r}: a range's ends should be {kind}") from None
        if not all(math.isfinite(end) for end in (low, high)):
            raise MbtrainError(f"{where}: {text!r}: a range's ends should be finite")
        try:
            return cls(low, high, scale == "log", integer)
        except ValueError as exc:
            raise MbtrainError(f"{where}: {exc}") from None


def is_range(text: Any) -> bool:
    """Whether a flag's or TOML value's text is written as a range."""
    return isinstance(text, str) and ":" in text


def plain(choice: Any) -> Any:
    """A choice as a plain value: itself where it is one (a number, text, a switch, None), else its JSON text (a
    list of widths); what Optuna stores, and what the text of a space shows."""
    return choice if choice is None or isinstance(choice, bool | int | float | str) else json.dumps(choice)


def space_text(space: Range | tuple[Any, ...]) -> str:
    """A range as the user writes it (`0.3:0.95`), or the choices (`both|reduce|enlarge`)."""
    return space.text() if isinstance(space, Range) else "|".join(str(plain(choice)) for choice in space)


def tuned(default: Any, space: Range | tuple[Any, ...]) -> Any:
    """A settings field with its default and the default space `--trials` searches it in: a Range, or a tuple of
    choices."""
    return dataclasses.field(default=default, metadata={SPACE: space})


def default_space(settings_class: type) -> dict[str, Range | tuple[Any, ...]]:
    """A settings class's fields declared with `tuned`, by name."""
    if not dataclasses.is_dataclass(settings_class):
        return {}
    fields = dataclasses.fields(settings_class)
    return {field.name: field.metadata[SPACE] for field in fields if SPACE in field.metadata}
