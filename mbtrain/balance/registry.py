"""The balancers by name: each balancer's own file registers its class (balance/__init__.py imports them all),
and the config, the TOML keys, the validation, the factory and the docs' table read them from here.

Adding one is its file, its flag in cli.py and its tests (docs/adding-a-balancer.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from mbtrain.balance.base import Balancer, Gather, Reduce
from mbtrain.balance.per_task import BATCHED, LOOP
from mbtrain.space import default_space, space_text

if TYPE_CHECKING:
    from mbtrain.distributed import Cluster

BALANCERS: dict[str, type[Balancer]] = {}  # in registration order: the order --help and the docs list them
Kind = TypeVar("Kind", bound=type[Balancer])


def register(name: str) -> Callable[[Kind], Kind]:
    """Class decorator: make a Balancer subclass `--balance name`. Its settings' field names join the flat
    namespace of flags and TOML keys, so another balancer may share them only by sharing the settings class."""

    def add(cls: Kind) -> Kind:
        if name in BALANCERS:
            raise ValueError(f"a balancer called {name!r} is already registered")
        if cls.build.__func__ is Balancer.build.__func__:
            raise TypeError(f"{cls.__name__} needs a build(setup, settings) classmethod to be registered")
        taken = {field.name: other for other in {kind.settings_class for kind in BALANCERS.values()}
                 for field in _fields(other)}
        for field in _fields(cls.settings_class):
            if field.name in taken and taken[field.name] is not cls.settings_class:
                raise ValueError(f"setting {field.name!r} of {name!r} is already {taken[field.name].__name__}'s")
        BALANCERS[name] = cls
        return cls

    return add


def setting_fields() -> dict[str, dataclasses.Field]:
    """Every registered balancer's settings fields by name: the balance section's flags and TOML keys."""
    return {field.name: field for kind in BALANCERS.values() for field in _fields(kind.settings_class)}


def default_settings() -> dict[str, Any]:
    return {name: _default(field) for name, field in setting_fields().items()}


def setting_names(name: str) -> list[str]:
    """The `name` balancer's own settings."""
    return [field.name for field in _fields(BALANCERS[name].settings_class)]


def settings_of(name: str, values: dict[str, Any]) -> Any:
    """The `name` balancer's settings object from the flat `values` (its dataclass checks them)."""
    return BALANCERS[name].settings_class(**{setting: values[setting] for setting in setting_names(name)})


@dataclass
class Setup:
    """What a balancer is built from besides its own settings: the model's parameters as balancers see them, the
    number of tasks, the run's seed (PCGrad's task orders) and, under torchrun, the collectives."""

    shared: list[torch.Tensor]  # the model's shared_parameters()
    task: list[torch.Tensor]  # its task_parameters()
    num_tasks: int
    segments: list[torch.Tensor | None] | None = None  # shared_segments(): MetaBalance's logical tensors
    shared_names: list[str] | None = None  # the shared parameters' names, for TensorBoard
    seed: int = 0
    reduce: Reduce | None = None  # sums tensors across ranks in place
    gather: Gather | None = None  # tensors as every rank holds them (embedding-table rows)
    world_size: int = 1
    level: str = "parameters"  # --balance-level: where a gradient balancer combines the tasks' gradients
    task_backward: str = LOOP  # --task-backward: the per-task backward passes one by one, or batched in one

    @property
    def every(self) -> list[torch.Tensor]:
        """Every trainable parameter: what a balancer that sums gradients across ranks sums."""
        return [*self.shared, *self.task]

    @classmethod
    def of(cls, model: Any, num_tasks: int, seed: int = 0, cluster: Cluster | None = None,
           level: str = "parameters", task_backward: str = LOOP) -> Setup:
        """The setup for a model that meets models.base.MultiTaskModel, on `cluster`'s ranks."""
        names = {id(p): name for name, p in model.named_parameters()}
        shared = list(model.shared_parameters())
        distributed = cluster is not None and cluster.world_size > 1
        return cls(shared, list(model.task_parameters()), num_tasks, model.shared_segments(),
                   [names[id(p)] for p in shared], seed, cluster.sum_ if distributed else None,
                   cluster.gather if distributed else None, cluster.world_size if cluster is not None else 1, level,
                   task_backward)


def build_balancer(name: str, setup: Setup, settings: Any = None) -> Balancer:
    """The balancer called `name` for `setup`, with `settings` (its settings class; None: the defaults)."""
    if name not in BALANCERS:
        raise ValueError(f"unknown balance {name!r}: choose one of {', '.join(BALANCERS)}")
    kind = BALANCERS[name]
    balancer = kind.build(setup, kind.settings_class() if settings is None else settings)
    balancer.batched = setup.task_backward == BATCHED
    return balancer


def balancer_table() -> str:
    """The docs' table of balancers (docs/balancers.md), one row per registered balancer."""
    rows = ["| `--balance` | method | `--balance-level` | settings (flag = default) | `--trials` searches (default) |",
            "|---|---|---|---|---|"]
    for name, kind in BALANCERS.items():
        flags = ", ".join(f"`--{field.name.replace('_', '-')}` = {_shown(_default(field))}"
                          for field in _fields(kind.settings_class)) or "—"
        levels = ", ".join(kind.levels) or "— (weighs the losses)"
        searched = ", ".join(f"`{setting.replace('_', '-')} {space_text(space)}`"
                             for setting, space in default_space(kind.settings_class).items()) or "—"
        rows.append(f"| `{name}` | {kind.method} | {levels} | {flags} | {searched} |")
    return "\n".join(rows) + "\n"


def _fields(settings_class: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(settings_class) if dataclasses.is_dataclass(settings_class) else ()


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
