"""What every model is built from and what it must provide, stated once: its settings (ModelConfig), what the
data decides (Inputs), the contract the fit loop and the balancers rely on (MultiTaskModel), the registry that
--model picks from (each model's own file registers its class; models/__init__.py imports them all), and the
opening lines every network shares (MultiTaskNetwork).

Adding a model is its file (a registered MultiTaskNetwork taking ``(config, inputs)``), its import in
models/__init__.py and its tests: tests/test_models.py's contract test runs on every registered model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from mbtrain.checks import at_least_one, in_unit_interval, non_negative, one_of
from mbtrain.errors import MbtrainError
from mbtrain.models.embedding import POOLINGS, FusedEmbedding
from mbtrain.models.mlp import NORMS
from mbtrain.models.split import SplitForward
from mbtrain.models.towers import Towers


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
    calibrator_weight: float = 0.6  # AITM's calibrator loss weight α (Xi et al., KDD 2021; their code's default)

    def __post_init__(self) -> None:
        kind = MODELS.get(self.model)
        if kind is not None and kind.always_funnel:  # ESMM's network is its funnel: config.json and compare say so
            self.funnel = True

    def check(self, num_tasks: int) -> None:
        """Raise MbtrainError naming the flag of the first setting out of range; the funnel needs `num_tasks`
        of at least two."""
        one_of("--model", self.model, MODELS)
        one_of("--norm", self.norm, NORMS)
        one_of("--pooling", self.pooling, POOLINGS)
        if self.funnel and num_tasks < 2:
            why = f"--model {self.model}" if MODELS[self.model].always_funnel else "--funnel"
            raise MbtrainError(f"{why} needs at least two tasks in --tasks, the funnel's stages in order (e.g. "
                               "click,cart,purchase)")
        in_unit_interval("--dropout", self.dropout)
        non_negative("--calibrator-weight", self.calibrator_weight)
        for flag, value in (("--embed-dim", self.embed_dim), ("--experts", self.experts),
                            ("--task-experts", self.task_experts), ("--levels", self.levels)):
            at_least_one(flag, value)
        for flag, sizes in (("--hidden", self.hidden), ("--tower", self.tower)):
            if any(size < 1 for size in sizes):
                raise MbtrainError(f"{flag} sizes must be positive integers: got {sizes}")
        if not self.hidden:
            raise MbtrainError("--hidden needs at least one layer size, e.g. --hidden 64,32")


@dataclass(frozen=True)
class Inputs:
    """What the data decides about a network's shape; the ModelConfig decides the rest."""

    cardinalities: list[int]  # rows per categorical column's embedding, the bags' last
    num_numeric: int
    num_tasks: int
    bags: int = 0  # how many of the cardinalities, the last ones, are bags
    funnel: tuple[int, ...] | None = None  # with a funnel, the output columns first stage first (ModelSpec's)
    widths: tuple[int, ...] | None = None  # logits per task (a multiclass task's: one per class); None: one each


@runtime_checkable
class MultiTaskModel(Protocol):
    """What the fit loop and the balancers need from a network; tests/test_models.py checks every registered
    model against it."""

    embedding: FusedEmbedding
    """Every categorical column and bag in one table, whose weight is one of shared_parameters()."""

    towers: Towers
    """One head per task, logits in output order; the fit loop starts them at the base rates (set_base_logits)."""

    always_funnel: ClassVar[bool]
    """The network is ESMM's funnel: ModelConfig turns --funnel on for it and the summary names it so."""

    entire_space: ClassVar[bool]
    """The network is a funnel of its own whose logits are already each stage's entire-space probability (AITM,
    over Inputs.funnel): the scoring model puts no ESMM funnel over them and starts the towers at the plain rates."""

    @classmethod
    def describe(cls, config: ModelConfig) -> str:
        """The name the run's summary shows for this model under `config`."""

    def shared_parameters(self) -> list[nn.Parameter]:
        """The parameters more than one task's loss reaches; with task_parameters() exactly the trainable ones,
        none in both."""

    def task_parameters(self) -> list[nn.Parameter]:
        """Every other trainable parameter: each slice of them is reached by one task's loss only."""

    def shared_segments(self) -> list[torch.Tensor | None]:
        """Per shared parameter, None (one logical tensor) or int64 [p.shape[0]], the logical tensor each index
        of its first dim belongs to (0..n-1): the tensors MetaBalance normalises one by one."""

    def split_forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> SplitForward:
        """Forward cut at the trunk for per-task gradients (models/split.py); its logits equal forward's."""

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        """Logits [B, T] in output order (main task first) from codes [B, C (+ bag slots)] and numeric [B, N]."""

    def auxiliary_losses(self, logits: torch.Tensor) -> torch.Tensor | None:
        """[T] loss terms of the model's own beyond the log losses (AITM's calibrator), each summed over the rows
        of `logits` and added to its task's loss by the fit loop before the division by the global batch's rows;
        None for none."""


class MultiTaskNetwork(nn.Module):
    """The opening every network shares: the fused embedding of the categorical columns and bags, the width of
    its output ⊕ the numeric features (`in_dim`, what the network reads), the number of tasks; and the
    registry's defaults (no funnel of its own, no auxiliary losses; the summary shows the model's name)."""

    always_funnel: ClassVar[bool] = False
    entire_space: ClassVar[bool] = False

    def __init__(self, config: ModelConfig, inputs: Inputs) -> None:
        super().__init__()
        self.embedding = FusedEmbedding(inputs.cardinalities, config.embed_dim, inputs.bags, config.pooling)
        self.in_dim = self.embedding.input_dim(inputs.num_numeric)
        self.num_tasks = inputs.num_tasks
        self.rowwise = config.norm != "batch"  # a row's outputs read that row alone (training batch norm mixes rows)

    @classmethod
    def describe(cls, config: ModelConfig) -> str:
        return config.model

    def auxiliary_losses(self, logits: torch.Tensor) -> torch.Tensor | None:
        return None


MODELS: dict[str, type[MultiTaskNetwork]] = {}  # in registration order: the order --help and errors list them
Kind = TypeVar("Kind", bound=type[MultiTaskNetwork])


def register(name: str) -> Callable[[Kind], Kind]:
    """Class decorator: make a network `--model name`."""

    def add(cls: Kind) -> Kind:
        if name in MODELS:
            raise ValueError(f"a model called {name!r} is already registered")
        MODELS[name] = cls
        return cls

    return add


def build_model(config: ModelConfig, inputs: Inputs) -> nn.Module:
    """The network `config.model` names, sized by the config and the data."""
    if config.model not in MODELS:
        raise ValueError(f"unknown model {config.model!r}: choose {', '.join(MODELS)}")
    return MODELS[config.model](config, inputs)
