"""Run settings: dataclasses with the defaults (stated once, here or in each balancer's file), validation and
JSON / TOML round-trip.

Every field is also a flag of `mbtrain fit` and a key of its `--config` TOML file, spelled with dashes
on the command line (`--relax-factor`) and with dashes or underscores in TOML. Field names are unique
across the sections so that the flat flag / TOML namespace maps onto them without ambiguity. The balance
section holds every registered balancer's own settings (mbtrain/balance/registry.py), the model section is
models/base.py's ModelConfig.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbtrain.balance.per_task import LEVELS, LOOP, PARAMETERS, TASK_BACKWARDS
from mbtrain.balance.registry import BALANCERS, default_settings, setting_fields, settings_of
from mbtrain.checks import at_least_one, non_negative, one_of
from mbtrain.distributed import DEVICES
from mbtrain.errors import MbtrainError
from mbtrain.models.base import ModelConfig
from mbtrain.optim import ADAM, LAZY_ADAM, TABLE_OPTIMIZERS
from mbtrain.tasks import TASK_TYPES, monitors
from mbtrain.tasks.regression import LOSSES, TRANSFORMS

SCHEDULES = ("constant", "cosine")
MISSING_LABELS = ("error", "skip")
GROUPED = ("gauc", "gxauc")  # the metrics that average over --group-by's groups


@dataclass
class DataConfig:
    tasks: list[str] = field(default_factory=list)
    main_task: str | None = None
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    valid: str | None = None
    valid_fraction: float = 0.1
    min_frequency: int = 2
    max_vocab: int | None = None  # each categorical column keeps at most this many values, the most frequent
    max_bag: int = 50  # a bag (list) column keeps each row's last this many elements
    memory_budget: str = "auto"  # beyond it, Parquet data is streamed; "auto" = half the physical memory
    group_by: str | None = None  # the column whose groups (users, sessions) validation's GAUC averages over
    task_type: dict[str, str] = field(default_factory=dict)  # a task not named: inferred from its column (tasks/)
    target_transform: dict[str, str] = field(default_factory=dict)  # per regression task; not named: log1p where
    # the training labels have no negative value, else standardize
    regression_loss: str = "mse"  # every regression task's: mse or huber
    missing_labels: str = "error"  # skip: a row counts for a task only where its label is present
    weight_column: str | None = None  # a column of non-negative row weights for every task's loss (not a feature)

    def check(self) -> None:
        if not self.tasks:
            raise MbtrainError("--tasks is required: name the label columns, e.g. --tasks click,purchase")
        repeated = sorted({task for task in self.tasks if self.tasks.count(task) > 1})
        if repeated:
            raise MbtrainError(f"--tasks names {', '.join(repeated)} more than once")
        if self.main_task is not None and self.main_task not in self.tasks:
            raise MbtrainError(f"--main-task {self.main_task!r} is not one of --tasks ({', '.join(self.tasks)})")
        if not 0.0 < self.valid_fraction < 1.0:
            raise MbtrainError(f"--valid-fraction must be in (0, 1): got {self.valid_fraction}")
        at_least_one("--min-frequency", self.min_frequency)
        at_least_one("--max-bag", self.max_bag)
        if self.max_vocab is not None:
            at_least_one("--max-vocab", self.max_vocab)
        for task, kind in self.task_type.items():
            if task not in self.tasks:
                raise MbtrainError(f"--task-type names {task!r}, which is not one of --tasks ({', '.join(self.tasks)})")
            one_of(f"--task-type {task}", kind, TASK_TYPES)
        for task, transform in self.target_transform.items():
            if task not in self.tasks:
                raise MbtrainError(f"--target-transform names {task!r}, which is not one of --tasks "
                                   f"({', '.join(self.tasks)})")
            one_of(f"--target-transform {task}", transform, TRANSFORMS)
        one_of("--regression-loss", self.regression_loss, LOSSES)
        one_of("--missing-labels", self.missing_labels, MISSING_LABELS)
        if self.weight_column is not None and self.weight_column in self.tasks:
            raise MbtrainError(f"--weight-column {self.weight_column!r} is one of --tasks")
        if self.weight_column is not None and self.weight_column in {*self.categorical, *self.numeric}:
            raise MbtrainError(f"--weight-column {self.weight_column!r} cannot also be a feature (--categorical, "
                               "--numeric)")
        roles = (set(self.categorical) & set(self.numeric)) | (set(self.exclude) & {*self.categorical,
                                                                                    *self.numeric})
        if roles:
            raise MbtrainError(
                f"column {sorted(roles)[0]!r} is given more than one role in --categorical/--numeric/--exclude"
            )


@dataclass
class BalanceConfig:
    """--balance, the static --task-weights, and every registered balancer's own settings by name (their
    defaults and checks live in the balancer's file)."""

    balance: str = "none"
    task_weights: dict[str, float] = field(default_factory=dict)  # static loss multipliers; a task not named: 1
    balance_level: str = PARAMETERS  # where a gradient balancer combines the tasks' gradients (per_task.py)
    settings: dict[str, Any] = field(default_factory=default_settings)

    def to_dict(self) -> dict[str, Any]:
        return {"balance": self.balance, "task_weights": dict(self.task_weights), "balance_level": self.balance_level,
                **self.settings}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BalanceConfig:
        known = setting_fields()
        unknown = sorted(set(raw) - {"balance", "task_weights", "balance_level", *known})
        if unknown:
            raise TypeError(f"unknown balance setting {unknown[0]!r}")
        settings = {**default_settings(), **{key: value for key, value in raw.items() if key in known}}
        return cls(raw.get("balance", "none"), dict(raw.get("task_weights", {})),
                   raw.get("balance_level", PARAMETERS), settings)

    @property
    def described(self) -> str:
        """--balance as the run's summary names it, with its level where the balancer has a choice of level and
        runs at the representation's."""
        chosen = len(BALANCERS[self.balance].levels) > 1 and self.balance_level != PARAMETERS
        return f"{self.balance} ({self.balance_level})" if chosen else self.balance

    def chosen(self) -> Any:
        """The --balance balancer's settings object (its class in the balancer's file)."""
        return settings_of(self.balance, self.settings)

    def check(self, tasks: list[str]) -> None:
        one_of("--balance", self.balance, BALANCERS)
        one_of("--balance-level", self.balance_level, LEVELS)
        kind = BALANCERS[self.balance]
        if self.balance_level != PARAMETERS and self.balance_level not in kind.levels:
            where = (f"works at the {' level or the '.join(kind.levels)} level only" if kind.levels
                     else "weighs the losses, not the tasks' gradients")
            raise MbtrainError(f"--balance-level {self.balance_level}: --balance {self.balance} {where}")
        if len(tasks) < kind.min_tasks:
            raise MbtrainError(f"--balance {self.balance} needs at least {_count(kind.min_tasks)} tasks in --tasks")
        for name in {kind.settings_class: name for name, kind in BALANCERS.items()}.values():
            settings_of(name, self.settings)  # every balancer's settings check themselves, chosen or not
        for task, weight in self.task_weights.items():
            if task not in tasks:
                raise MbtrainError(f"--task-weights names {task!r}, which is not one of --tasks ({', '.join(tasks)})")
            if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
                raise MbtrainError(f"--task-weights {task}={weight}: a weight must be a finite number >= 0")
            if weight == 0 and kind.positive_weights:
                raise MbtrainError(f"--task-weights {task}=0: --balance {self.balance} needs every weight positive; "
                                   f"drop {task} from --tasks instead")

    def warnings(self) -> list[str]:
        kind = BALANCERS[self.balance]
        if self.task_weights and kind.task_weights_ignored:
            return [f"--task-weights has no effect under --balance {self.balance}, {kind.task_weights_ignored}"]
        return []


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 1024
    lr: float | None = None  # None: peak_lr's batch-scaled default
    schedule: str = "constant"  # the learning rate after warm-up: constant, or cosine down to 0 at the last epoch
    warmup: float = 0.0  # epochs of linear warm-up from lr / steps to lr
    weight_decay: float = 0.0
    seed: int = 0
    shuffle: bool = True  # off: every epoch reads the training rows in file order (each rank its shard's)
    patience: int = 3
    monitor: str | None = None  # the main-task validation metric that picks the best epoch and drives early
    # stopping; None: the main task's type's (auc for binary, rmse for regression)
    tensorboard: bool = False  # event files under RUN/tensorboard (the mbtrain[tensorboard] extra)
    threads: int | None = None
    device: str = "auto"
    task_backward: str = LOOP  # per-task gradients' backward passes: one per task, or batched in one (per_task.py)
    table_optimizer: str = LAZY_ADAM  # the embedding table's (optim.py; chosen by sweep: docs/scaling.md)
    table_lr: float | None = None  # the table's peak learning rate; None: --lr's
    checkpoint_every: str | None = None  # checkpoints/last.pt inside an epoch too: every N steps ("5000") or every
    # duration ("15m", rank 0's clock); None: at each epoch's end only
    validate_every: int | None = None  # validate (history row, best.pt, --patience) every N steps inside an epoch too

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """A saved run without --table-optimizer trained its table with dense Adam, whatever today's default."""
        return cls(**{"table_optimizer": ADAM, **raw})

    def check(self, group_by: str | None) -> None:
        one_of("--device", self.device, DEVICES)
        one_of("--table-optimizer", self.table_optimizer, TABLE_OPTIMIZERS)
        if self.table_lr is not None and not self.table_lr > 0:
            raise MbtrainError(f"--table-lr must be positive: got {self.table_lr}")
        if self.table_lr is not None and self.table_optimizer == ADAM:
            raise MbtrainError("--table-lr needs --table-optimizer lazy-adam or rowwise-adagrad: adam steps the table "
                               "in the dense Adam, at --lr")
        one_of("--task-backward", self.task_backward, TASK_BACKWARDS)
        one_of("--schedule", self.schedule, SCHEDULES)
        if self.monitor is not None:
            one_of("--monitor", self.monitor, monitors())
        if self.monitor in GROUPED and not group_by:
            raise MbtrainError(f"--monitor {self.monitor} needs --group-by, the column whose groups it averages over")
        if not 0 <= self.warmup <= self.epochs:
            raise MbtrainError(f"--warmup must be in [0, --epochs], in epochs: got {self.warmup}")
        at_least_one("--epochs", self.epochs)
        at_least_one("--batch-size", self.batch_size)
        if self.lr is not None and not self.lr > 0:
            raise MbtrainError(f"--lr must be positive: got {self.lr}")
        if self.weight_decay < 0:
            raise MbtrainError(f"--weight-decay must be non-negative: got {self.weight_decay}")
        non_negative("--patience", self.patience, " (0 turns early stopping off)")
        if not 0 <= self.seed < 2**32:
            raise MbtrainError(f"--seed must be in [0, 2^32): got {self.seed}")
        if self.threads is not None:
            at_least_one("--threads", self.threads)
        if self.checkpoint_every is not None:
            Every.parse(self.checkpoint_every)
        if self.validate_every is not None:
            at_least_one("--validate-every", self.validate_every)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {name: _section_dict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        return cls(**{name: _section_from(section, raw.get(name, {})) for name, section in SECTIONS.items()})

    def flat(self) -> dict[str, Any]:
        """Every setting under its flag name (underscored), for tables and overrides."""
        return {key: value for section in self.to_dict().values() for key, value in section.items()}

    def updated(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with `overrides` (flat keys, None meaning 'not given') applied; an unknown key is a KeyError."""
        raw = self.to_dict()
        sections = setting_sections()
        for key, value in overrides.items():
            if value is not None:
                raw[sections[key]][key] = value
        return RunConfig.from_dict(raw)

    @property
    def main_task(self) -> str:
        return self.data.main_task or self.data.tasks[0]

    @property
    def weight_vector(self) -> list[float]:
        """--task-weights in ordered_tasks order, 1 for a task not named."""
        return [float(self.balance.task_weights.get(task, 1.0)) for task in self.ordered_tasks]

    @property
    def funnel_tasks(self) -> list[str] | None:
        """The funnel, first stage first (--tasks as given), when the model predicts one."""
        return list(self.data.tasks) if self.model.funnel else None  # an always-funnel model sets it itself

    @property
    def ordered_tasks(self) -> list[str]:
        """Tasks with the main task first: MetaBalance and the model's output order rely on it."""
        main = self.main_task
        return [main] + [t for t in self.data.tasks if t != main]

    def validate(self) -> None:
        """Raise MbtrainError naming the flag for the first out-of-range or inconsistent setting."""
        self.data.check()
        self.model.check(len(self.data.tasks))
        self.balance.check(self.data.tasks)
        self.train.check(self.data.group_by)


def from_run_record(saved: dict[str, Any]) -> tuple[RunConfig, Path]:
    """A run's config.json as its settings (--valid as the absolute path it recorded: the run may be resumed from
    another directory) and its data path. A damaged record raises KeyError, TypeError, ValueError or
    AttributeError."""
    config = RunConfig.from_dict(saved)
    if saved["paths"].get("valid"):
        config = config.updated({"valid": saved["paths"]["valid"]})
    return config, Path(saved["paths"]["data"])


def differing(saved: dict[str, Any], config: RunConfig, data: Path) -> list[str]:
    """What a run's config.json was written with that differs from `config` and `data`: "DATA" first, then each
    setting's flag. A damaged record raises as from_run_record does."""
    settings, saved_data = from_run_record(saved)
    theirs, ours = settings.flat(), config.flat()
    ours["valid"] = str(Path(ours["valid"]).resolve()) if ours["valid"] else None
    found = [f"--{key.replace('_', '-')}" for key in ours if ours[key] != theirs.get(key)]
    return (["DATA"] if saved_data != data.resolve() else []) + found


UNITS = {"s": 1, "m": 60, "h": 3600}  # --checkpoint-every's duration suffixes


@dataclass(frozen=True)
class Every:
    """--checkpoint-every: a number of steps inside an epoch, or a duration (seconds of rank 0's clock)."""

    steps: int | None = None
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> Every:
        """`5000` (steps) or `90s`, `15m`, `2h`; anything else is one error line naming the flag."""
        given, text = text, text.strip().lower()
        number, unit = (text[:-1], text[-1]) if text[-1:] in UNITS else (text, "")
        try:
            value = float(number) if unit else int(number)
        except ValueError:
            value = 0
        if not value > 0:
            raise MbtrainError(f"--checkpoint-every takes a number of steps (5000) or a duration (90s, 15m, 2h), "
                               f"above 0: got {given!r}")
        return cls(seconds=value * UNITS[unit]) if unit else cls(steps=int(value))


BASE_LR = 1e-2  # the default learning rate from BASE_BATCH rows of global batch up
BASE_BATCH = 1024


def peak_lr(train: TrainConfig, world_size: int = 1) -> float:
    """--lr, or by default BASE_LR scaled down linearly for global batches under BASE_BATCH rows: measured
    best at both ends on Adult and the sample funnel (benchmarks/defaults_sweep.py; its table is in
    docs/benchmarks.md, "Choosing the defaults"), and never above BASE_LR, where Adam's linear scaling stops
    holding."""
    if train.lr is not None:
        return train.lr
    return BASE_LR * min(1.0, train.batch_size * world_size / BASE_BATCH)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "balance": BalanceConfig,
    "train": TrainConfig,
}


def setting_sections() -> dict[str, str]:
    """Each setting's section, by flag name (balancers registered since import included)."""
    return {name: section for section, names in _section_fields().items() for name in names}


def setting_types() -> dict[str, str]:
    """Each setting's type as written in its dataclass ("float", "list[int]", "str | None", ...)."""
    return {name: _type_name(f.type) for fields in _section_fields().values() for name, f in fields.items()}


def _type_name(kind: Any) -> str:
    """A field's annotation as written ("float", "list[int]"), whether or not its module defers annotations."""
    return kind if isinstance(kind, str) else kind.__name__ if isinstance(kind, type) else str(kind)


def _section_fields() -> dict[str, dict[str, dataclasses.Field]]:
    fields = {name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()}
    del fields["balance"]["settings"]  # the registered balancers' own settings, which stand in its place:
    fields["balance"].update(setting_fields())
    names = [name for section in fields.values() for name in section]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(f"setting {clashes[0]!r} is declared by two sections (or a balancer): names must be unique")
    return fields


def _section_dict(section: Any) -> dict[str, Any]:
    return section.to_dict() if hasattr(section, "to_dict") else dataclasses.asdict(section)


def _section_from(cls: type, raw: dict[str, Any]) -> Any:
    return cls.from_dict(raw) if hasattr(cls, "from_dict") else cls(**raw)


def _count(number: int) -> str:
    return {2: "two", 3: "three"}.get(number, str(number))


def parse_list(flag: str, text: str | None, item: type = str) -> list | None:
    """'64,32' -> [64, 32]; None stays None (flag not given)."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return [item(part) for part in parts]
    except ValueError:
        raise MbtrainError(f"{flag} expects a comma-separated list of {item.__name__}: got {text!r}") from None


def parse_pairs(flag: str, text: str, value_type: type = float) -> dict[str, Any]:
    """'purchase=1,click=0.3' -> {"purchase": 1.0, "click": 0.3} (or text values: 'watch=regression'); the checks on
    tasks and values are validate's."""
    pairs: dict[str, Any] = {}
    example = "purchase=1,click=0.3" if value_type is float else "watch_time=regression"
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        task, equals, value = part.partition("=")
        if not equals or not task.strip():
            raise MbtrainError(f"{flag} expects task={'weight' if value_type is float else 'value'} pairs, e.g. "
                               f"{example}: got {part!r}")
        try:
            pairs[task.strip()] = value_type(value.strip())
        except ValueError:
            raise MbtrainError(f"{flag} {part}: {value.strip()!r} is not a number") from None
    return pairs


def read_toml(path: Path) -> dict[str, Any]:
    """A `--config` TOML file as flat overrides (dashes or underscores, lists or comma strings)."""
    return dict(toml_setting(str(path), key, value) for key, value in load_toml(path).items())


def load_toml(path: Path) -> dict[str, Any]:
    """A TOML file's top-level table, as written."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MbtrainError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MbtrainError(f"{path}: not a valid TOML file ({exc})") from None


def toml_setting(where: str, key: str, value: Any) -> tuple[str, Any]:
    """(setting name, value) of one TOML key (dashes or underscores; a list or dict also as a comma string),
    MbtrainError naming `where` and the key for an unknown key or a value of the wrong type."""
    name = key.replace("-", "_")
    types = setting_types()
    if name not in types:
        raise MbtrainError(f"{where}: unknown setting {key!r}")
    kind = types[name]
    if kind.startswith("list") and isinstance(value, str):
        value = parse_list(f"{where}: {key}", value, int if "int" in kind else str)
    if kind.startswith("dict") and isinstance(value, str):
        value = parse_pairs(f"{where}: {key}", value, float if "float" in kind else str)
    if kind.startswith("str") and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # as the flag reads it: checkpoint_every = 5000
    if not _matches(value, kind):
        raise MbtrainError(f"{where}: {key} should be {kind.replace(' | None', '')}: got {value!r}")
    return name, value


def toml_text(settings: dict[str, Any]) -> str:
    """Flat settings as a `--config` TOML file (None: not written, the default applies)."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in settings.items() if value is not None)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{json.dumps(str(key))} = {_toml_value(item)}" for key, item in value.items()) + "}"


def _matches(value: Any, kind: str) -> bool:
    scalar = {"int": (int,), "float": (int, float), "str": (str,)}
    if kind == "bool" or isinstance(value, bool):  # bool is an int to isinstance: only a bool setting takes one
        return kind == "bool" and isinstance(value, bool)
    if kind.startswith("list["):
        inner = scalar[kind[5:-1]]
        return isinstance(value, list) and all(isinstance(v, inner) and not isinstance(v, bool) for v in value)
    if kind == "dict[str, float]":
        return isinstance(value, dict) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                               for v in value.values())
    if kind == "dict[str, str]":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    return isinstance(value, scalar[kind.replace(" | None", "")])
