"""Run settings: dataclasses with the defaults (stated once, here), validation and JSON / TOML round-trip.

Every field is also a flag of `mbtrain fit` and a key of its `--config` TOML file, spelled with dashes
on the command line (`--relax-factor`) and with dashes or underscores in TOML. Field names are unique
across the sections so that the flat flag / TOML namespace maps onto them without ambiguity.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mbtrain.balance import BALANCERS as BALANCES
from mbtrain.balance.metabalance import STRATEGIES
from mbtrain.distributed import DEVICES
from mbtrain.errors import MbtrainError
from mbtrain.models import MODELS
from mbtrain.models.embedding import POOLINGS
from mbtrain.models.mlp import NORMS

SCHEDULES = ("constant", "cosine")
MONITORS = ("auc", "gauc", "logloss", "ne")


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


@dataclass
class ModelConfig:
    model: str = "mmoe"
    embed_dim: int = 8
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    experts: int = 8  # MMoE's experts; PLE's shared experts per level
    task_experts: int = 1  # PLE's experts per task per level
    levels: int = 2  # PLE's extraction levels
    tower: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.0
    norm: str = "none"  # over each hidden layer: none, batch or layer
    pooling: str = "mean"  # how a bag's elements' embeddings become one: mean or sum
    funnel: bool = False  # ESMM's entire-space funnel over --tasks in their order (always on for --model esmm)


@dataclass
class BalanceConfig:
    balance: str = "none"
    task_weights: dict[str, float] = field(default_factory=dict)  # static loss multipliers; a task not named: 1
    relax_factor: float = 0.7
    beta: float = 0.9
    strategy: str = "both"
    temperature: float = 2.0  # DWA's T
    famo_lr: float = 0.025  # FAMO's learning rate for its task logits
    famo_decay: float = 0.01  # FAMO's weight decay (gamma) on its task logits
    famo_same_batch: bool = False  # FAMO's update from the same batch scored again (the reference code), not the next
    gradnorm_alpha: float = 1.5  # GradNorm's asymmetry α


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
    monitor: str = "auc"  # the main-task validation metric that picks the best epoch and drives early stopping
    tensorboard: bool = False  # event files under RUN/tensorboard (the mbtrain[tensorboard] extra)
    threads: int | None = None
    device: str = "auto"


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.model == "esmm":  # ESMM's network is its funnel: config.json and compare say so
            self.model.funnel = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        return cls(**{name: section(**raw.get(name, {})) for name, section in SECTIONS.items()})

    def flat(self) -> dict[str, Any]:
        """Every setting under its flag name (underscored), for tables and overrides."""
        return {key: getattr(getattr(self, section), key) for key, section in FIELD_SECTION.items()}

    def updated(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with `overrides` (flat keys, None meaning 'not given') applied."""
        raw = self.to_dict()
        for key, value in overrides.items():
            if value is not None:
                raw[FIELD_SECTION[key]][key] = value
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
        return list(self.data.tasks) if self.model.funnel else None  # esmm's is set by __post_init__

    @property
    def ordered_tasks(self) -> list[str]:
        """Tasks with the main task first: MetaBalance and the model's output order rely on it."""
        main = self.main_task
        return [main] + [t for t in self.data.tasks if t != main]

    def validate(self) -> None:
        """Raise MbtrainError naming the flag for the first out-of-range or inconsistent setting."""
        d, m, b, t = self.data, self.model, self.balance, self.train
        if not d.tasks:
            raise MbtrainError("--tasks is required: name the label columns, e.g. --tasks click,purchase")
        duplicates = sorted({task for task in d.tasks if d.tasks.count(task) > 1})
        if duplicates:
            raise MbtrainError(f"--tasks names {', '.join(duplicates)} more than once")
        if d.main_task is not None and d.main_task not in d.tasks:
            raise MbtrainError(f"--main-task {d.main_task!r} is not one of --tasks ({', '.join(d.tasks)})")
        _choice("--model", m.model, MODELS)
        _choice("--balance", b.balance, BALANCES)
        _choice("--strategy", b.strategy, STRATEGIES)
        _choice("--device", t.device, DEVICES)
        _choice("--norm", m.norm, NORMS)
        _choice("--pooling", m.pooling, POOLINGS)
        _choice("--schedule", t.schedule, SCHEDULES)
        _choice("--monitor", t.monitor, MONITORS)
        if t.monitor == "gauc" and not d.group_by:
            raise MbtrainError("--monitor gauc needs --group-by, the column whose groups GAUC averages over")
        if not 0 <= t.warmup <= t.epochs:
            raise MbtrainError(f"--warmup must be in [0, --epochs], in epochs: got {t.warmup}")
        if self.funnel_tasks is not None and len(d.tasks) < 2:
            why = "--model esmm" if m.model == "esmm" else "--funnel"
            raise MbtrainError(f"{why} needs at least two tasks in --tasks, the funnel's stages in order (e.g. "
                               "click,cart,purchase)")
        if b.balance in ("metabalance", "multibalance", "pcgrad", "gradnorm") and len(d.tasks) < 2:
            raise MbtrainError(f"--balance {b.balance} needs at least two tasks in --tasks")
        _in_range("--relax-factor", b.relax_factor, 0.0, 1.0, "[0, 1)")
        _in_range("--beta", b.beta, 0.0, 1.0, "[0, 1)")
        _in_range("--dropout", m.dropout, 0.0, 1.0, "[0, 1)")
        for task, weight in b.task_weights.items():
            if task not in d.tasks:
                raise MbtrainError(f"--task-weights names {task!r}, which is not one of --tasks ({', '.join(d.tasks)})")
            if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
                raise MbtrainError(f"--task-weights {task}={weight}: a weight must be a finite number >= 0")
            if weight == 0 and b.balance in ("famo", "uncertainty"):  # log(0) / an unbounded log-variance
                raise MbtrainError(f"--task-weights {task}=0: --balance {b.balance} needs every weight positive; "
                                   f"drop {task} from --tasks instead")
        for flag, value in (("--temperature", b.temperature), ("--famo-lr", b.famo_lr),
                            ("--gradnorm-alpha", b.gradnorm_alpha)):
            if not (math.isfinite(value) and value > 0):
                raise MbtrainError(f"{flag} must be positive: got {value}")
        if not (math.isfinite(b.famo_decay) and b.famo_decay >= 0):
            raise MbtrainError(f"--famo-decay must be non-negative: got {b.famo_decay}")
        if not 0.0 < d.valid_fraction < 1.0:
            raise MbtrainError(f"--valid-fraction must be in (0, 1): got {d.valid_fraction}")
        for flag, value in (
            ("--embed-dim", m.embed_dim),
            ("--experts", m.experts),
            ("--task-experts", m.task_experts),
            ("--levels", m.levels),
            ("--epochs", t.epochs),
            ("--batch-size", t.batch_size),
            ("--min-frequency", d.min_frequency),
            ("--max-bag", d.max_bag),
        ):
            if value < 1:
                raise MbtrainError(f"{flag} must be at least 1: got {value}")
        for flag, sizes in (("--hidden", m.hidden), ("--tower", m.tower)):
            if any(size < 1 for size in sizes):
                raise MbtrainError(f"{flag} sizes must be positive integers: got {sizes}")
        if not m.hidden:
            raise MbtrainError("--hidden needs at least one layer size, e.g. --hidden 64,32")
        if t.lr is not None and not t.lr > 0:
            raise MbtrainError(f"--lr must be positive: got {t.lr}")
        if t.weight_decay < 0:
            raise MbtrainError(f"--weight-decay must be non-negative: got {t.weight_decay}")
        if t.patience < 0:
            raise MbtrainError(f"--patience must be non-negative (0 turns early stopping off): got {t.patience}")
        if not 0 <= t.seed < 2**32:
            raise MbtrainError(f"--seed must be in [0, 2^32): got {t.seed}")
        if d.max_vocab is not None and d.max_vocab < 1:
            raise MbtrainError(f"--max-vocab must be at least 1: got {d.max_vocab}")
        if t.threads is not None and t.threads < 1:
            raise MbtrainError(f"--threads must be at least 1: got {t.threads}")
        overlap = (set(d.categorical) & set(d.numeric)) | (set(d.exclude) & (set(d.categorical) | set(d.numeric)))
        if overlap:
            raise MbtrainError(
                f"column {sorted(overlap)[0]!r} is given more than one role in --categorical/--numeric/--exclude"
            )


BASE_LR = 1e-2  # the default learning rate from BASE_BATCH rows of global batch up
BASE_BATCH = 1024


def peak_lr(train: TrainConfig, world_size: int = 1) -> float:
    """--lr, or by default BASE_LR scaled down linearly for global batches under BASE_BATCH rows: measured
    best at both ends on Adult and the sample funnel (1e-2 at batch 1024, ~1e-3 at batch 128; the
    benchmarks/defaults_sweep.py table in the README), and never above BASE_LR, where Adam's linear scaling
    stops holding."""
    if train.lr is not None:
        return train.lr
    return BASE_LR * min(1.0, train.batch_size * world_size / BASE_BATCH)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "balance": BalanceConfig,
    "train": TrainConfig,
}
FIELD_SECTION: dict[str, str] = {
    f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
}
FIELD_TYPES: dict[str, str] = {
    f.name: str(f.type) for cls in SECTIONS.values() for f in dataclasses.fields(cls)
}


def _choice(flag: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MbtrainError(f"{flag} {value!r} is not supported: choose one of {', '.join(choices)}")


def _in_range(flag: str, value: float, low: float, high: float, shown: str) -> None:
    if not low <= value < high:
        raise MbtrainError(f"{flag} must be in {shown}: got {value}")


def parse_list(flag: str, text: str | None, item: type = str) -> list | None:
    """'64,32' -> [64, 32]; None stays None (flag not given)."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return [item(part) for part in parts]
    except ValueError:
        raise MbtrainError(f"{flag} expects a comma-separated list of {item.__name__}: got {text!r}") from None


def parse_weights(flag: str, text: str) -> dict[str, float]:
    """'purchase=1,click=0.3' -> {"purchase": 1.0, "click": 0.3}; the checks on tasks and ranges are validate's."""
    weights: dict[str, float] = {}
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        task, equals, value = part.partition("=")
        if not equals or not task.strip():
            raise MbtrainError(f"{flag} expects task=weight pairs, e.g. purchase=1,click=0.3: got {part!r}")
        try:
            weights[task.strip()] = float(value)
        except ValueError:
            raise MbtrainError(f"{flag} {part}: {value.strip()!r} is not a number") from None
    return weights


def read_toml(path: Path) -> dict[str, Any]:
    """A `--config` TOML file as flat overrides (dashes or underscores, lists or comma strings)."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MbtrainError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MbtrainError(f"{path}: not a valid TOML file ({exc})") from None
    overrides: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELD_SECTION:
            raise MbtrainError(f"{path}: unknown setting {key!r}")
        kind = FIELD_TYPES[name]
        if kind.startswith("list") and isinstance(value, str):
            value = parse_list(f"{path}: {key}", value, int if "int" in kind else str)
        if kind.startswith("dict") and isinstance(value, str):
            value = parse_weights(f"{path}: {key}", value)
        if not _matches(value, kind):
            raise MbtrainError(f"{path}: {key} should be {kind.replace(' | None', '')}: got {value!r}")
        overrides[name] = value
    return overrides


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
    return isinstance(value, scalar[kind.replace(" | None", "")])
