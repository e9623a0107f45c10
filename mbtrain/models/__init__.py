"""Model registry: the CLI picks a model by name and builds it from the config's sizes."""

from __future__ import annotations

from torch import nn

from mbtrain.models.embedding import FusedEmbedding
from mbtrain.models.esmm import ESMM
from mbtrain.models.mmoe import MMoE
from mbtrain.models.ple import PLE
from mbtrain.models.shared_bottom import SharedBottom
from mbtrain.models.towers import Towers

MODELS: dict[str, type[nn.Module]] = {"shared-bottom": SharedBottom, "mmoe": MMoE, "ple": PLE, "esmm": ESMM}

__all__ = ["ESMM", "MODELS", "PLE", "FusedEmbedding", "MMoE", "SharedBottom", "Towers", "build_model"]


def build_model(
    name: str,
    *,
    cardinalities: list[int],
    num_numeric: int,
    num_tasks: int,
    embed_dim: int,
    hidden: list[int],
    experts: int,
    tower: list[int],
    dropout: float,
    norm: str = "none",
    task_experts: int = 1,
    levels: int = 2,
    bags: int = 0,
    pooling: str = "mean",
) -> nn.Module:
    """Build the named model; ``experts`` applies to MMoE and PLE (its shared experts per level),
    ``task_experts`` and ``levels`` to PLE; the last ``bags`` of the ``cardinalities`` are bags, pooled as
    ``pooling`` says (models/embedding.py)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose {', '.join(MODELS)}")
    sizes = dict(cardinalities=list(cardinalities), num_numeric=num_numeric, num_tasks=num_tasks,
                 embed_dim=embed_dim, hidden=list(hidden), tower=list(tower), dropout=dropout,
                 norm=norm, bags=bags, pooling=pooling)
    if name == "mmoe":
        return MMoE(**sizes, experts=experts)
    if name == "ple":
        return PLE(**sizes, experts=experts, task_experts=task_experts, levels=levels)
    if name == "esmm":
        return ESMM(**sizes)
    return SharedBottom(**sizes)
