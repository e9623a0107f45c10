"""All categorical features looked up in one embedding table, bags of them pooled."""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

from mbtrain.table import sparse_table

POOLINGS = ("mean", "sum")


class FusedEmbedding(nn.Module):
    """One ``nn.Embedding`` shared by every categorical column and bag, each owning a slice of rows.

    One table instead of one per feature means a single lookup kernel (forward and backward) per batch
    and a single shared parameter tensor for the balancer. Its gradient is sparse: the rows the batch touched,
    never the whole table (mbtrain/table.py). Feature ``j`` value ``v`` maps to row
    ``offsets[j] + v``; values are expected in ``[0, cardinalities[j])`` (the encoder reserves 0 for
    unknown / null). The last ``bags`` features are bags: the categorical input then holds, after the C
    columns, each bag's L slots (element indices, -1 past the list's end; L = the same for every bag), and
    each row's bag pools its elements' rows (``pooling`` mean or sum); an empty bag pools to its unknown row.
    """

    def __init__(self, cardinalities: list[int], dim: int, bags: int = 0, pooling: str = "mean") -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        if any(c < 1 for c in cardinalities):
            raise ValueError(f"every cardinality must be >= 1, got {cardinalities}")
        if not 0 <= bags <= len(cardinalities):
            raise ValueError(f"{bags} bags among {len(cardinalities)} features")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}: choose mean or sum")
        self.num_features = len(cardinalities)
        self.num_bags = bags
        self.num_columns = self.num_features - bags
        self.mean = pooling == "mean"
        self.dim = dim
        self.out_dim = self.num_features * dim
        self.table = sparse_table(sum(cardinalities), dim)  # its gradient: the batch's rows (mbtrain/table.py)
        nn.init.normal_(self.table.weight, std=0.05)
        starts = [0, *accumulate(cardinalities)][: self.num_features]
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.long))

    def row_features(self) -> torch.Tensor:
        """int64 [rows of the table]: the feature each row belongs to (MetaBalance's logical tensors)."""
        ends = torch.cat([self.offsets[1:], self.offsets.new_tensor([self.table.num_embeddings])])
        return torch.repeat_interleave(torch.arange(self.num_features, device=self.offsets.device),
                                       ends - self.offsets)

    def input_dim(self, num_numeric: int) -> int:
        """Width of `inputs`: every embedding plus the numeric features; at least one feature is needed."""
        width = self.out_dim + num_numeric
        if width < 1:
            raise ValueError("the model needs at least one categorical or numeric feature")
        return width

    def inputs(self, categorical: torch.Tensor, numeric: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings ⊕ pooled bags ⊕ numeric [B, input_dim], the gathered rows [B, C + bags·L, dim], their
        table rows [B, C + bags·L]; L at least 1). Slots past a list's end gather a row too, with weight 0 in
        the pooling."""
        rows_in_batch = categorical.shape[0]
        columns = self.num_columns
        if self.num_bags == 0:
            index = categorical + self.offsets
            rows = self.table(index)
            return torch.cat([rows.reshape(rows_in_batch, self.out_dim), numeric], dim=1), rows, index
        width = (categorical.shape[1] - columns) // self.num_bags
        slots = categorical[:, columns:].reshape(rows_in_batch, self.num_bags, width)  # a batch of 0 rows too
        if width == 0:  # no slots at all: every bag is empty
            slots = categorical.new_full((rows_in_batch, self.num_bags, 1), -1)
        present = slots >= 0
        empty = ~present.any(dim=2, keepdim=True)
        first = torch.arange(slots.shape[2], device=slots.device) == 0
        present = present | (empty & first)  # an empty bag: its first slot stands for the unknown row (0)
        bag_offsets = self.offsets[columns:].view(1, self.num_bags, 1)
        index = torch.cat([categorical[:, :columns] + self.offsets[:columns],
                           (slots.clamp(min=0) + bag_offsets).flatten(1)], dim=1)
        rows = self.table(index)
        weights = present.to(rows.dtype)
        if self.mean:
            weights = weights / weights.sum(dim=2, keepdim=True)
        bag_rows = rows[:, columns:].reshape(rows_in_batch, self.num_bags, slots.shape[2], self.dim)
        pooled = (bag_rows * weights.unsqueeze(3)).sum(dim=2)  # [B, bags, dim]
        x = torch.cat([rows[:, :columns].reshape(rows_in_batch, columns * self.dim),
                       pooled.reshape(rows_in_batch, self.num_bags * self.dim), numeric], dim=1)
        return x, rows, index

    def forward(self, categorical: torch.Tensor) -> torch.Tensor:
        """[B, C (+ bag slots)] int64 codes → [B, (C + bags) · dim] embeddings (an empty [B, 0] without any)."""
        x, _, _ = self.inputs(categorical, self.table.weight.new_zeros(categorical.shape[0], 0))
        return x
