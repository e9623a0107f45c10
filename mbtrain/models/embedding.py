"""All categorical features looked up in one embedding table."""

from __future__ import annotations

from itertools import accumulate

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
        self.out_dim = self.num_features * dim
        self.table = nn.Embedding(sum(cardinalities), dim)
        nn.init.normal_(self.table.weight, std=0.05)
        starts = [0, *accumulate(cardinalities)][: self.num_features]
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.long))

    def row_features(self) -> torch.Tensor:
        """int64 [rows of the table]: the column each row belongs to (MetaBalance's logical tensors)."""
        ends = torch.cat([self.offsets[1:], self.offsets.new_tensor([self.table.num_embeddings])])
        return torch.repeat_interleave(torch.arange(self.num_features, device=self.offsets.device),
                                       ends - self.offsets)

    def lookup(self, categorical: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, C, dim] gathered rows, [B, C] their row numbers in the table)."""
        index = categorical + self.offsets
        return self.table(index), index

    def input_dim(self, num_numeric: int) -> int:
        """Width of `inputs`: every embedding plus the numeric features; at least one feature is needed."""
        width = self.out_dim + num_numeric
        if width < 1:
            raise ValueError("the model needs at least one categorical or numeric feature")
        return width

    def inputs(self, categorical: torch.Tensor, numeric: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings ⊕ numeric [B, input_dim], the gathered rows [B, C, dim], their table rows [B, C])."""
        rows, index = self.lookup(categorical)
        return torch.cat([rows.reshape(categorical.shape[0], self.out_dim), numeric], dim=1), rows, index

    def forward(self, categorical: torch.Tensor) -> torch.Tensor:
        """[B, C] int64 codes → [B, C * dim] concatenated embeddings (an empty [B, 0] when C == 0)."""
        rows, _ = self.lookup(categorical)
        return rows.reshape(categorical.shape[0], self.out_dim)
