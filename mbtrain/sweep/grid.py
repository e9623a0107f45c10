"""What a sweep runs: any fit setting given as a list of alternatives, on the command line or in a TOML file,
read through the same table of settings fit uses (config.py; each balancer's own settings from the registry).

`--balance` names the methods compared; every other list is a hyper-parameter: a setting that belongs to some
balancers' settings multiplies those methods' runs only, `--balance-level` those of the methods that work at
more than one level (the others run at their own), any other setting every method's. A method's
configurations are the product of its lists; each runs once per seed. In a TOML file, a table `[method.NAME]`
adds a method of its own name with its own settings and lists (`balance = "none"` and a list of task weights: the
plain sum with tuned weights, beside the untuned one).

With `--trials N` a setting may also be a range (`--lr 0.001:0.03:log`, `--task-weights click=0.05:1:log`, or the
same text in TOML), which sweep/tune.py searches; a task weight's range is kept as `task_weights.TASK`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbtrain.balance.registry import BALANCERS, setting_fields, setting_names
from mbtrain.config import RunConfig, load_toml, parse_list, parse_pairs, setting_types, toml_setting
from mbtrain.errors import MbtrainError
from mbtrain.space import Range, is_range

# settings every run of a sweep shares: they define the data, its split, or what selection reads
FIXED = {"tasks", "main_task", "valid", "valid_fraction", "group_by", "categorical", "numeric", "exclude",
         "monitor", "threads", "device", "memory_budget", "tensorboard", "seed", "task_backward",
         "task_type", "missing_labels"}  # a task's type names its metrics; skip or not, the rows that count
DEFAULT_SEEDS = 5
LEVEL = "balance_level"


@dataclass
class Grid:
    """The sweep's settings: `fixed` (one value each, flat names), `lists` (alternatives per setting, in the
    order given), the methods (--balance) and the seeds."""

    fixed: dict[str, Any] = field(default_factory=dict)
    lists: dict[str, list[Any]] = field(default_factory=dict)
    methods: list[str] = field(default_factory=lambda: ["none"])
    seeds: list[int] = field(default_factory=lambda: list(range(DEFAULT_SEEDS)))
    variants: dict[str, dict[str, list[Any]]] = field(default_factory=dict)  # a [method.NAME] table's settings
    seeds_given: bool = False  # --seeds or --seed named them (else DEFAULT_SEEDS, or a sweep folder's own)
    ranges: dict[str, Range] = field(default_factory=dict)  # --trials: settings searched in a range
    trials: int | None = None  # --trials: each method's budget of trials (None: the grid's configurations)

    def __post_init__(self) -> None:
        self.ranges = {name: Range(**value) if isinstance(value, dict) else value
                       for name, value in self.ranges.items()}  # as definition.json holds them

    def balancer(self, method: str) -> str:
        """The --balance a method runs (a [method.NAME] table's `balance`, else its own name)."""
        return self.variants.get(method, {}).get("balance", [method])[0]

    def configurations(self, method: str) -> list[dict[str, Any]]:
        """The method's configurations: one dict of its varied settings each (empty: the one configuration)."""
        balancer = self.balancer(method)
        own = setting_names(balancer)
        others = {*setting_fields(), LEVEL}  # other balancers' settings do not multiply this method's runs
        if len(BALANCERS[balancer].levels) > 1:
            own.append(LEVEL)
        lists = {**self.lists, **self.variants.get(method, {})}
        varied = {name: values for name, values in lists.items()
                  if len(values) > 1 and (name in own or name not in others)}
        names = list(varied)
        return [dict(zip(names, values, strict=True)) for values in itertools.product(*varied.values())]

    def config(self, method: str, configuration: dict[str, Any], seed: int) -> RunConfig:
        """The run's complete settings (data paths are the protocol's)."""
        lists = {**self.lists, **self.variants.get(method, {})}
        chosen = {name: values[0] for name, values in lists.items()}  # a list that does not vary it: its first
        settings = {**self.fixed, **chosen, **configuration, "balance": self.balancer(method), "seed": seed}
        if settings.get(LEVEL) not in BALANCERS[self.balancer(method)].levels:
            settings.pop(LEVEL, None)  # a method with no choice of level runs at its own
        return RunConfig().updated(settings)

    def to_dict(self) -> dict[str, Any]:
        return {"fixed": self.fixed, "lists": self.lists, "methods": self.methods, "seeds": self.seeds,
                "variants": self.variants, "ranges": {name: r.to_dict() for name, r in self.ranges.items()},
                "trials": self.trials}


def read_grid(arguments: list[str], config_file: Path | None, seeds: int | None,
              switches: dict[str, tuple[str, bool]], trials: int | None = None) -> Grid:
    """The grid from fit's flags (each may take a comma list, or several values, or repeat; with `trials`, a
    range) over a TOML file's keys (a TOML list is a list of alternatives), and --seeds N (seeds 0..N-1) or --seed
    with a list. `switches` maps each spelling of fit's on/off flags (--funnel, --no-funnel, ...) to (setting,
    value)."""
    alternatives: dict[str, list[Any]] = {}
    variants: dict[str, dict[str, list[Any]]] = {}
    ranges: dict[str, Range] = {}
    if config_file is not None:
        for key, value in load_toml(config_file).items():
            if key == "method" and isinstance(value, dict):
                variants = _variants(str(config_file), value)
                continue
            name = key.replace("-", "_")
            alternatives[name] = _toml_alternatives(str(config_file), key, value)
    alternatives.update(_flag_alternatives(arguments, switches))
    if trials is not None and trials < 1:
        raise MbtrainError(f"--trials must be at least 1: got {trials}")
    alternatives = {name: _without_ranges(name, values, ranges) for name, values in alternatives.items()}
    for name in ranges:
        if name == "seed":
            raise MbtrainError("--seed takes the sweep's seeds, not a range: --seeds N, or --seed 0,1,2")
        if name in FIXED | {"balance"}:
            raise MbtrainError(f"--{_flag(name)} takes one value in a sweep (every run shares it): it is not searched")
    if ranges and trials is None:
        name, searched = next(iter(ranges.items()))
        raise MbtrainError(f"--{_flag(name.partition('.')[0])} {searched.text()} is a range, which --trials N "
                           "searches: give --trials, or values")
    grid = Grid(variants=variants, ranges=ranges, trials=trials)
    for name, values in alternatives.items():
        if not values:
            if any(searched.partition(".")[0] == name for searched in ranges):
                continue
            raise MbtrainError(f"--{_flag(name)}: an empty list; give at least one value")
        if name == "balance":
            grid.methods = _unique(name, values)
        elif name == "seed":
            grid.seeds, grid.seeds_given = _unique(name, values), True
        elif len(values) > 1 and name in FIXED:
            raise MbtrainError(f"--{_flag(name)} takes one value in a sweep (every run shares it): got "
                               f"{len(values)}")
        elif len(values) > 1:
            grid.lists[name] = _unique(name, values)
        else:
            grid.fixed[name] = values[0]
    if seeds is not None:
        if "seed" in alternatives:
            raise MbtrainError("--seeds and --seed both name the seeds: give one of them")
        if seeds < 1:
            raise MbtrainError(f"--seeds must be at least 1: got {seeds}")
        grid.seeds, grid.seeds_given = list(range(seeds)), True
    if variants:
        grid.methods = [*(m for m in grid.methods if m not in variants), *variants] if "balance" in alternatives \
            else [*variants]
    for method in grid.methods:
        if grid.balancer(method) not in BALANCERS:
            raise MbtrainError(f"--balance {grid.balancer(method)!r} is not a method: choose among "
                               f"{', '.join(BALANCERS)}")
    return grid


def _without_ranges(name: str, values: list[Any], ranges: dict[str, Range]) -> list[Any]:
    """The values that are not ranges; the ranges go to `ranges` (a task weight's as `task_weights.TASK`)."""
    kept = []
    for value in values:
        searched: dict[str, Range] = {}
        if isinstance(value, Range):
            searched = {name: value}
        elif isinstance(value, dict):
            searched = {f"{name}.{task}": weight for task, weight in value.items() if isinstance(weight, Range)}
            value = {task: weight for task, weight in value.items() if not isinstance(weight, Range)}
        if searched and len(values) > 1:
            raise MbtrainError(f"--{_flag(name)}: a range is searched on its own: give it without other values")
        ranges.update(searched)
        if not isinstance(value, Range) and not (searched and value == {}):
            kept.append(value)
    return kept


def _variants(where: str, tables: dict[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """[method.NAME] tables: each method's own settings as alternatives (its `balance` defaults to NAME)."""
    variants = {}
    for method, table in tables.items():
        if not isinstance(table, dict):
            raise MbtrainError(f"{where}: method.{method} should be a table of settings")
        settings = {key.replace("-", "_"): _toml_alternatives(f"{where}: method.{method}", key, value)
                    for key, value in table.items()}
        ranged = [name for name, values in settings.items()
                  if any(isinstance(v, Range) or isinstance(v, dict) and any(isinstance(w, Range) for w in v.values())
                         for v in values)]
        if ranged:
            raise MbtrainError(f"{where}: method.{method}: {ranged[0]} is a range; a method's own table takes values: "
                               "give the range at the top level, where it applies to the methods it belongs to")
        fixed = [name for name, values in settings.items() if len(values) > 1 and name in FIXED | {"balance"}]
        if fixed:
            raise MbtrainError(f"{where}: method.{method}: {fixed[0]} takes one value in a sweep")
        variants[method] = {"balance": [method], **settings}
    return variants


def _flag_alternatives(arguments: list[str], switches: dict[str, tuple[str, bool]]) -> dict[str, list[Any]]:
    """Each flag's values in order: `--lr 0.01,0.003`, `--lr 0.01 0.003` or `--lr 0.01 --lr 0.003`; a list or
    task-weights setting takes one value per word (`--hidden 64,32 128,64`); `--x` / `--no-x` for a switch."""
    types = setting_types()
    found: dict[str, list[Any]] = {}
    at = 0
    while at < len(arguments):
        word = arguments[at]
        if not word.startswith("--"):
            raise MbtrainError(f"unexpected argument {word!r}: give fit's flags, e.g. --balance none,metabalance")
        flag, equals, attached = word[2:].partition("=")
        values = [attached] if equals else []
        at += 1
        while not equals and at < len(arguments) and not arguments[at].startswith("--"):
            values.append(arguments[at])
            at += 1
        if f"--{flag}" in switches:
            if values:
                raise MbtrainError(f"--{flag} is a switch and takes no value")
            name, switch = switches[f"--{flag}"]
            found.setdefault(name, []).append(switch)
            continue
        name = flag.replace("-", "_")
        if name not in types:
            raise MbtrainError(f"--{flag} is not a setting of mbtrain fit (see mbtrain fit --help)")
        kind = types[name]
        if not values:
            raise MbtrainError(f"--{flag} needs a value")
        found.setdefault(name, []).extend(_parsed(flag, kind, values))
    return found


def _parsed(flag: str, kind: str, words: list[str]) -> list[Any]:
    where = f"--{flag}"
    if kind.startswith("list"):
        return [parse_list(where, word, int if "int" in kind else str) for word in words]
    if kind.startswith("dict"):
        return [_pairs(where, word) if "float" in kind else parse_pairs(where, word, str) for word in words]
    scalar = {"int": int, "float": float, "str": str}[kind.replace(" | None", "")]
    values = []
    for part in (part.strip() for word in words for part in word.split(",")):
        if not part:
            raise MbtrainError(f"{where}: an empty value in the list")
        if scalar is not str and is_range(part):
            values.append(Range.parse(where, part, integer=scalar is int))
            continue
        try:
            values.append(scalar(part))
        except ValueError:
            raise MbtrainError(f"{where}: {part!r} is not {'an' if scalar is int else 'a'} "
                               f"{scalar.__name__}") from None
    return values


def _pairs(where: str, text: str) -> dict[str, float | Range]:
    """Task weights, each a number or a range: 'cart=0.3,click=0.05:1:log'."""
    if not is_range(text):
        return parse_pairs(where, text)
    pairs: dict[str, float | Range] = {}
    for part in (part.strip() for part in text.split(",") if part.strip()):
        task, _, weight = part.partition("=")
        pairs.update({task.strip(): Range.parse(f"{where} {task.strip()}", weight)} if is_range(weight) else
                     parse_pairs(where, part))
    return pairs


def _toml_alternatives(where: str, key: str, value: Any) -> list[Any]:
    """A TOML value as alternatives: a list of scalars for a scalar setting, a list of lists (of tables or
    comma strings) for a list or task-weights setting, a range as text ("0.001:0.03:log"); anything else is one
    value."""
    name = key.replace("-", "_")
    kind = setting_types().get(name, "")
    if is_range(value) and kind.replace(" | None", "") in ("int", "float", "dict[str, float]"):
        return _parsed(f"{where}: {key}", kind, [value])
    several = isinstance(value, list) and (not kind.startswith("list") or any(isinstance(v, list) for v in value))
    if kind.startswith("dict") and isinstance(value, list):
        several = True
    items = value if several else [value]
    return [toml_setting(where, key, item)[1] for item in items]


def _unique(name: str, values: list[Any]) -> list[Any]:
    kept = []
    for value in values:
        if value in kept:
            raise MbtrainError(f"--{_flag(name)} lists {value!r} twice")
        kept.append(value)
    return kept


def _flag(name: str) -> str:
    return name.replace("_", "-")

