"""All categorical features looked up in one embedding table."""

from __future__ import annotations

import torch
from torch import nn


class FusedEmbedding(nn.Module):
    """One ``nn.Embedding`` shared by every categorical column, each column owning a slice of rows.

    One table instead of one per feature means a single lookup kernel (forward and backward) per batch
    and a single shared parameter tensor for the balancer. Column ``j`` value ``v`` maps to row
    ``offsets[j] + v``; values are expected in ``[0, cardinalities[j])`` (the encoder reserves 0 for
    unknown / null).
    """

    def __init__(self, cardinalities: list[int], dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        if any(c < 1 for c in cardinalities):
            raise ValueError(f"every cardinality must be >= 1, got {cardinalities}")
        self.num_features = len(cardinalities)
        self.dim = dim
        self.table = nn.Embedding(sum(cardinalities), dim)
        nn.init.normal_(self.table.weight, std=0.05)
        starts = [0]
        for c in cardinalities[:-1]:
            starts.append(starts[-1] + c)
        self.register_buffer("offsets", torch.tensor(starts[: self.num_features], dtype=torch.long))

    @property
    def out_dim(self) -> int:
        return self.num_features * self.dim

    def forward(self, categorical: torch.Tensor) -> torch.Tensor:
        """[B, C] int64 codes → [B, C * dim] concatenated embeddings (an empty [B, 0] when C == 0)."""
        rows = self.table(categorical + self.offsets)
        return rows.reshape(categorical.shape[0], self.num_features * self.dim)
