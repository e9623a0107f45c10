"""What scoring raw rows needs: the model spec, the numeric normaliser in front of the network, batched inference.

Numeric preprocessing lives inside the model so that training, eval and the exported file share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mbtrain.data.batches import SCORE_ROWS, Rows
from mbtrain.data.encoders import Encoders, NumericEncoder
from mbtrain.models.base import MODELS, Inputs, ModelConfig, build_model
from mbtrain.models.funnel import Funnel, conditional_probabilities
from mbtrain.models.split import SplitForward
from mbtrain.tasks import TaskSet

SPEC_FORMAT = "mbtrain/1"
INPUTS_DOC = (
    "categorical: int64 [B, C], the index of each value in that column's 'values' list plus 1 "
    "(0 for null or unseen); numeric: float32 [B, N], raw values in the order of 'numeric', NaN for null "
    "(the model applies log1p / mean / std itself), where the scalar columns come first and then, for each "
    "entry of 'vectors' in order, that column's 'length' elements, named 'name[0]', 'name[1]', … in 'numeric' "
    "(a null list: all NaN); bags (only where 'bags' is not empty): int64 [B, K, L] "
    "for the K bags in the order of 'bags', each row's list as the indices of its elements in that bag's "
    "'values' plus 1 (0 for null or unseen), padded with -1 to any common length L (an empty list is all -1; "
    "mbtrain keeps a list's last 'max_bag' elements); output: float32 [B, C] predictions, each task's columns in "
    "'tasks' order, in its units ('task_types'): a binary task's probability, a regression task's value in the "
    "column's own units (one column each), a multiclass task's one probability per class in the order of its "
    "'classes' (C = T without multiclass tasks)"
)

FUNNEL_DOC = (
    "'funnel' lists the tasks as stages, first stage first: each output is its stage's probability over every "
    "impression, the product of the conditional probabilities down the funnel, never above the output of the "
    "stage before it; a stage's conditional probability is its output divided by that earlier output"
)
ENTIRE_SPACE_DOC = (  # a network that is its own funnel (AITM): its outputs are not products
    "'funnel' lists the tasks as stages, first stage first: each output is its stage's probability over every "
    "impression, predicted directly; training penalises an output above the output of the stage before it but "
    "does not forbid one; a stage's conditional probability is its output divided by that earlier output (above "
    "1 where the outputs break the funnel)"
)


class NumericNormalizer(nn.Module):
    """log1p (for skewed columns), standardise with training statistics, then 0 for null / NaN."""

    def __init__(self, encoders: list[NumericEncoder]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([e.mean for e in encoders], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([e.std for e in encoders], dtype=torch.float32))
        self.register_buffer("log1p", torch.tensor([e.log1p for e in encoders], dtype=torch.bool))

    def forward(self, numeric: torch.Tensor) -> torch.Tensor:
        # clamp keeps log1p defined for unseen negative values in a column that was non-negative in training
        logged = torch.where(self.log1p, torch.log1p(numeric.clamp(min=0.0)), numeric)
        return torch.nan_to_num((logged - self.mean) / self.std, nan=0.0, posinf=0.0, neginf=0.0)


class ScoringModel(nn.Module):
    """A multi-task network behind its numeric normaliser, and under its funnel where it has one: raw inputs in,
    one logit per task out (with a funnel, of the entire-space probability). A network that is its own funnel
    (`entire_space`, AITM) gets no ESMM funnel on top: its logits are the entire-space ones already."""

    def __init__(self, normalizer: NumericNormalizer, network: nn.Module, funnel: list[int] | None = None) -> None:
        super().__init__()
        self.normalizer = normalizer
        self.network = network
        self.funnel_order = funnel
        own = getattr(network, "entire_space", False)
        if own and funnel is not None and list(network.funnel_order) != list(funnel):
            raise ValueError(f"the network's funnel {network.funnel_order} is not the model's {funnel}")
        self.conditional_towers = funnel is not None and not own  # towers predict a stage given the one before
        self.funnel = Funnel(funnel) if self.conditional_towers else nn.Identity()

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        return self.funnel(self.network(categorical, self.normalizer(numeric)))

    def split_forward(self, categorical: torch.Tensor, numeric: torch.Tensor) -> SplitForward:
        split = self.network.split_forward(categorical, self.normalizer(numeric))
        if self.conditional_towers:  # a stage's probability multiplies the towers of the stages before it
            if not split.coupled and self.network.rowwise:  # the funnel is the only coupling (heads_backward)
                split.outputs = split.logits
            split.logits, split.coupled = self.funnel(split.logits), True
        return split

    def auxiliary_losses(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The network's own loss terms ([T], summed over the rows) from this model's logits (models/base.py)."""
        return self.network.auxiliary_losses(logits)

    def set_base_logits(self, logits: torch.Tensor) -> None:
        """Start every tower at its task's best constant prediction (TaskSet.base_logits): with an ESMM funnel (its
        stages binary), at the share of positives among the rows where the stage before it is positive."""
        if self.conditional_towers and self.funnel_order is not None:
            logits = torch.logit(conditional_probabilities(torch.sigmoid(logits), self.funnel_order), eps=1e-4)
        self.network.towers.set_base_logits(logits)

    def shared_parameters(self) -> list[nn.Parameter]:
        return self.network.shared_parameters()

    def task_parameters(self) -> list[nn.Parameter]:
        return self.network.task_parameters()

    def shared_segments(self) -> list[torch.Tensor | None]:
        return self.network.shared_segments()


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and feed it raw rows: embedded in checkpoints and exports."""

    tasks: list[str]  # main task first: the model's output columns
    encoders: Encoders
    model: dict[str, Any]  # ModelConfig fields
    funnel: list[str] | None = None  # the tasks first stage first, for a model with the entire-space funnel
    task_types: dict[str, dict[str, Any]] | None = None  # TaskSet.to_dict(); None: a run from before task types,
    # whose tasks are all binary

    @property
    def main_task(self) -> str:
        return self.tasks[0]

    @property
    def task_set(self) -> TaskSet:
        return TaskSet.from_dict(self.tasks, self.task_types)

    @property
    def funnel_order(self) -> list[int] | None:
        """The output columns first funnel stage first (None without a funnel)."""
        return None if self.funnel is None else [self.tasks.index(task) for task in self.funnel]

    def build(self) -> ScoringModel:
        order = self.funnel_order
        inputs = Inputs(self.encoders.cardinalities, len(self.encoders.numeric), len(self.tasks),
                        len(self.encoders.bags), None if order is None else tuple(order),
                        tuple(self.task_set.widths))
        network = build_model(ModelConfig(**self.model), inputs)  # an older run's spec lacks later fields: defaults
        return ScoringModel(NumericNormalizer(self.encoders.numeric), network, self.funnel_order)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "tasks": self.tasks,
            "main_task": self.main_task,
            "inputs": INPUTS_DOC,
            **({"funnel": self.funnel, "outputs": self._outputs_doc()} if self.funnel is not None else {}),
            "task_types": self.task_set.to_dict(),
            **self.encoders.to_dict(),
            "model": self.model,
        }

    def _outputs_doc(self) -> str:
        kind = MODELS.get(self.model.get("model", ""))
        return ENTIRE_SPACE_DOC if kind is not None and kind.entire_space else FUNNEL_DOC

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelSpec:
        if raw.get("format") != SPEC_FORMAT:
            raise ValueError(f"unknown model spec format {raw.get('format')!r}")
        funnel = raw.get("funnel")
        return cls(list(raw["tasks"]), Encoders.from_dict(raw), dict(raw["model"]),
                   None if funnel is None else list(funnel), raw.get("task_types"))


class Predictions(nn.Module):
    """The scoring model with each task's output on top (a probability, or a regression target in the column's
    units: tasks/): what eval, predict and the exported file run. Bags come either as their own [B, K, L] tensor
    (the exported contract, INPUTS_DOC) or, as mbtrain's encoders make them, as slots after the categorical columns
    (models/embedding.py)."""

    def __init__(self, model: ScoringModel, tasks: TaskSet) -> None:
        super().__init__()
        self.model = model
        self.outputs = tasks.outputs()

    def forward(self, categorical: torch.Tensor, numeric: torch.Tensor,
                bags: torch.Tensor | None = None) -> torch.Tensor:
        if bags is not None:  # one more empty slot: a length of 0 means what it says, in ONNX's graph too
            categorical = torch.cat([categorical, F.pad(bags, (0, 1), value=-1.0).flatten(1)], dim=1)
        return self.outputs(self.model(categorical, numeric))


def score_rows(module: nn.Module, data: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(predictions [rows, T], labels [rows, T], group keys [rows] or None) of every row of `data`, chunk by
    chunk: only the outputs, labels and keys are kept, which is what the exact metrics need."""
    probabilities, labels, groups = [], [], []
    for chunk in data.chunks():
        probabilities.append(predict_rows(module, chunk.categorical, chunk.numeric))
        labels.append(chunk.labels)
        if chunk.groups is not None:
            groups.append(chunk.groups)
    return torch.cat(probabilities), torch.cat(labels), torch.cat(groups) if groups else None


def predict_rows(module: nn.Module, categorical: torch.Tensor, numeric: torch.Tensor,
            batch_size: int = SCORE_ROWS) -> torch.Tensor:
    """[rows, T] outputs of a Predictions-like module, in eval mode, in large batches without autograd."""
    was_training = module.training
    module.eval()
    device = next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))
    with torch.inference_mode():
        parts = [
            module(categorical[start : start + batch_size].to(device), numeric[start : start + batch_size].to(device))
            .cpu()
            for start in range(0, categorical.shape[0], batch_size)
        ]
    module.train(was_training)
    return torch.cat(parts)
