"""The machinery of balancers that combine each task's own gradient of the shared part (MetaBalance, PCGrad,
MGDA, ...), at either level (`--balance-level`):

- ``parameters``: each task's gradient of the shared parameters, exact under torchrun, combined by the
  subclass. With the model's split forward (models/split.py) the heads are back-propagated once and only the
  trunk once per task, the embedding table's gradients kept to the batch's rows.
- ``representation``: each task's gradient at the trunk's outputs (one backward through the heads gives them
  all), combined by the same subclass, then the trunk back-propagated once with the combination. Under
  torchrun a rank holds only its own rows' gradients there, so the statistics a method reads of them (dot
  products, norms) are summed across ranks (`global_sum`) before any weight is computed: every rank then
  weighs its rows alike, as one process would the whole batch.

Each task's backward through the trunk (and, under the funnel, through the coupled heads) runs task by task,
or with `batched` (--task-backward batched) as one backward whose cotangents are stacked over the tasks
(`torch.autograd.grad(..., is_grads_batched=True)`): the same gradients, T launches of each kernel become one.
On this project's 2-core CPU the loop is faster (docs/benchmarks.md), so it is the default.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from mbtrain.balance.base import Balancer, Gather, Reduce, reduce_grads
from mbtrain.models.split import SplitForward
from mbtrain.table import add_rows, coalesced, distinct_rows, gathered_rows, is_table, touched

Sinks = list[Any]  # the shared parameters, the embedding table's stood in for by a RowGradient on the split path
PARAMETERS, REPRESENTATION = "parameters", "representation"
LEVELS = (PARAMETERS, REPRESENTATION)
LOOP, BATCHED = "loop", "batched"
TASK_BACKWARDS = (LOOP, BATCHED)  # --task-backward


class PerTaskGradients(Balancer):
    """Each task's gradient of ``shared_params``, handed to ``combine``; every other parameter gets
    ``sum(losses)``'s gradient.

    With ``task_params`` (all non-shared trainable parameters) the plain part is one backward restricted to
    them; without it, the summed loss is back-propagated through everything and the shared parameters'
    ``.grad`` is set aside meanwhile, which is exact but also re-walks the shared part of the graph. Under
    torchrun (`reduce`, `gather`) every task's shared gradients are summed across ranks before ``combine``.
    """

    min_tasks = 2
    levels = LEVELS
    reads_losses: bool = False  # whether `combine` reads the batch's losses (loss_values)

    def __init__(self, shared_params: Iterable[torch.Tensor], task_params: Iterable[torch.Tensor] | None = None,
                 reduce: Reduce | None = None, gather: Gather | None = None, level: str = PARAMETERS) -> None:
        self.check_level(level)
        self.level = level
        self.shared = list(shared_params)
        if not self.shared:
            raise ValueError(f"{type(self).__name__} needs at least one shared parameter")
        if not all(p.requires_grad for p in self.shared):
            raise ValueError("every shared parameter must require grad")
        shared_ids = {id(p) for p in self.shared}
        if len(shared_ids) != len(self.shared):
            raise ValueError("the shared parameters contain the same tensor twice")
        self.task_params = None if task_params is None else [p for p in task_params if p.requires_grad]
        if self.task_params is not None and any(id(p) in shared_ids for p in self.task_params):
            raise ValueError("a parameter cannot be both shared and task-specific")
        if reduce is not None and self.task_params is None:
            raise ValueError(f"{type(self).__name__} needs task_params to sum gradients across ranks")
        if (reduce is None) != (gather is None):
            raise ValueError(f"distributed {type(self).__name__} needs both reduce and gather")
        self.reduce = reduce  # sums a list of gradients across ranks in place (distributed training)
        self.gather = gather  # each of a list of tensors from every rank, in rank order (distributed training)
        if level == REPRESENTATION and self.task_params is None:
            raise ValueError(f"{type(self).__name__} needs task_params at the representation level")
        self.wants_split = self.task_params is not None
        self.loss_values: torch.Tensor | None = None  # [T] the batch's losses (across ranks: summed), no graph

    def backward(self, losses: Sequence[torch.Tensor], split: SplitForward | None = None) -> None:
        """The combined gradients; with `split` (from the model's split_forward) the same result, computed by
        back-propagating the heads once and only the trunk once per task (see models/split.py). At the
        representation level `split` is needed."""
        self.check_losses(losses)
        if self.reads_losses:  # one stack (and, across ranks, one all-reduce) a step, for the methods that use it
            self.loss_values = torch.stack([loss.detach() for loss in losses])
            if self.reduce is not None:
                self.reduce([self.loss_values])
        if self.level == REPRESENTATION:
            if split is None:
                raise ValueError(f"{type(self).__name__} needs the model's split forward at the representation level")
            self._representation_backward(losses, split)
            return
        if split is not None:
            self._split_backward(losses, split)
            return
        plain_rest = self.task_params is None or bool(self.task_params)
        total = sum(losses) if plain_rest else None
        per_task = self._full_grads(losses, retain_graph=plain_rest)
        sinks, task_grads = _rows_of_tables(self.shared, [list(self._summed(self.shared, grads))
                                                          for grads in per_task])
        self.combine(sinks, task_grads)
        for table, sink in zip(self.shared, sinks, strict=True):
            if isinstance(sink, RowGradient) and sink.grad is not None:
                add_rows(table, sink.rows, sink.grad)
        if total is not None:
            self._plain_backward(total)

    def _full_grads(self, losses: Sequence[torch.Tensor], retain_graph: bool) -> list[list[torch.Tensor | None]]:
        """Each task's gradient of every shared parameter by a full backward, task by task or batched (an
        embedding table's, sparse, task by task all the same: vmap has no rule for a sparse gradient)."""
        n_tasks = len(losses)
        tables = [p for p in self.shared if is_table(p)] if self.batched else self.shared
        looped = [torch.autograd.grad(loss, tables, retain_graph=retain_graph or self.batched or k < n_tasks - 1,
                                      allow_unused=True) if tables else () for k, loss in enumerate(losses)]
        if not self.batched:
            return [list(grads) for grads in looped]
        dense = [p for p in self.shared if not is_table(p)]
        stacked = _batched_grads(losses, dense, retain_graph) if dense else ()
        found = {id(p): grads for p, grads in zip(dense, stacked, strict=True)}
        found.update({id(p): [task[j] for task in looped] for j, p in enumerate(tables)})
        return [[None if found[id(p)] is None else found[id(p)][k] for p in self.shared] for k in range(n_tasks)]

    def combine(self, sinks: Sinks, task_grads: list[list[torch.Tensor | None]]) -> None:
        """Add the combination of the tasks' gradients (task_grads[k][i]: task k's of sink i, None where the
        task does not reach it) into each sink's ``.grad`` (accumulate). A statistic summed over the gradients'
        entries must go through ``global_sum`` (``gram`` does)."""
        raise NotImplementedError

    def global_sum(self, statistic: torch.Tensor) -> torch.Tensor:
        """`statistic` (a sum over the gradients' entries: a dot product, a squared norm) for the whole batch:
        at the representation level under torchrun each rank holds its own rows' gradients, so it is summed
        across ranks in place; elsewhere every rank already holds the whole batch's gradients."""
        if self.level == REPRESENTATION and self.reduce is not None:
            self.reduce([statistic])
        return statistic

    def gram(self, task_grads: list[list[torch.Tensor | None]]) -> torch.Tensor:
        """[T, T] the dot products of the tasks' gradients, each task's over every sink as one vector (a sink
        a task does not reach counts as zeros)."""
        parts = [_gram(grads) for grads in zip(*task_grads, strict=True) if any(g is not None for g in grads)]
        like = self.shared[0]
        zero = like.new_zeros(len(task_grads), len(task_grads))
        return self.global_sum(sum(parts, zero))

    def _representation_backward(self, losses: Sequence[torch.Tensor], split: SplitForward) -> None:
        """Heads once (every task's gradient at the trunk's outputs), `combine` there, the trunk once."""
        head_grads, boundary_grads = heads_backward(losses, self.task_params, split, self.batched)
        accumulate(self.task_params, head_grads, None)
        reached = [(b, g) for b, g in zip(split.boundary, boundary_grads, strict=True) if g is not None]
        if reached:
            sinks = [Representation() for _ in reached]
            self.combine(sinks, [[g[k] for _, g in reached] for k in range(len(losses))])
            outputs = [(b, s.grad) for (b, _), s in zip(reached, sinks, strict=True) if s.grad is not None]
            torch.autograd.backward([b for b, _ in outputs], grad_tensors=[g for _, g in outputs])
        if self.reduce is not None:
            reduce_grads([*self.shared, *self.task_params], self.reduce, self.gather)

    def _split_backward(self, losses: Sequence[torch.Tensor], split: SplitForward) -> None:
        if self.task_params is None:
            raise ValueError(f"{type(self).__name__} needs task_params to use the model's split forward")
        positions = [i for i, p in enumerate(self.shared) if p is split.table]
        if len(positions) != 1:
            raise ValueError("the split forward's embedding table is not one of the shared parameters")
        table_at = positions[0]
        dense = [p for i, p in enumerate(self.shared) if i != table_at]
        # heads: their plain gradient and each task's boundary gradient (heads_backward)
        head_grads, boundary_grads = heads_backward(losses, self.task_params, split, self.batched)
        accumulate(self.task_params, self._summed(self.task_params, head_grads), None)
        # trunk: once per task, or once for all of them
        n_tasks = len(losses)
        if self.batched:
            per_task = _unstacked(torch.autograd.grad(split.boundary, [*dense, split.rows],
                                                      grad_outputs=list(boundary_grads), is_grads_batched=True,
                                                      allow_unused=True), n_tasks)
        else:
            per_task = [torch.autograd.grad(split.boundary, [*dense, split.rows],
                                            grad_outputs=[g[k] for g in boundary_grads],
                                            retain_graph=k < n_tasks - 1, allow_unused=True)
                        for k in range(n_tasks)]
        dense_grads = [list(grads[:-1]) for grads in per_task]
        row_grads = [grads[-1] for grads in per_task]
        if self.reduce is not None:  # every task's dense gradients summed across ranks in one all-reduce
            summed = self._summed(dense * n_tasks, [g for task in dense_grads for g in task])
            dense_grads = [summed[k * len(dense) : (k + 1) * len(dense)] for k in range(n_tasks)]
        rows, table_grads = self._table_gradients(split, row_grads)
        row_sink = RowGradient(rows)
        sinks = [*dense[:table_at], row_sink, *dense[table_at:]]
        self.combine(sinks, [[*dense_grads[k][:table_at], table_grads[k], *dense_grads[k][table_at:]]
                             for k in range(n_tasks)])
        if row_sink.grad is not None:
            add_rows(split.table, rows, row_sink.grad)

    def _table_gradients(self, split: SplitForward, row_grads: list[torch.Tensor | None]
                         ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """(the batch's distinct rows, each task's gradient of the embedding table on them), every task's gathered
        rows coalesced side by side (table.coalesced): no table-sized gradient per task, and the rows a lazy table
        optimizer steps are the ones the batch touched, however small the table. Across ranks every rank's rows
        and their gradients are summed alike on every rank (table.gathered_rows): the exchange grows with the
        batch, not with the table."""
        if any(g is None for g in row_grads):  # no categorical feature reaches the trunk
            return None, [None] * len(row_grads)
        dim = split.rows.shape[-1]
        flat = split.index.reshape(-1)
        side_by_side = torch.stack([g.reshape(-1, dim) for g in row_grads], dim=1)  # [B·C, T, D]
        table_rows = split.table.shape[0]
        rows, grads = coalesced(flat, side_by_side, table_rows)
        if self.gather is not None:
            rows, grads = gathered_rows(rows, grads, self.gather, table_rows)
        return rows, list(grads.unbind(1))

    def _summed(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]
                ) -> Sequence[torch.Tensor | None]:
        """Gradients summed across ranks (zeros where a rank's batch did not reach a parameter)."""
        if self.reduce is None:
            return grads
        if any(is_table(p) for p in params):
            raise ValueError(f"distributed {type(self).__name__} sums an embedding table's rows on the model's split "
                             "forward: pass it to backward")
        filled = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
        self.reduce(filled)
        return filled

    def _plain_backward(self, total: torch.Tensor) -> None:
        """The summed loss's gradient for every non-shared parameter; frees the graph."""
        if self.task_params is not None:
            grads = torch.autograd.grad(total, self.task_params, allow_unused=True)
            accumulate(self.task_params, self._summed(self.task_params, grads), None)
            return
        kept = [p.grad for p in self.shared]
        for p in self.shared:
            p.grad = None
        try:
            total.backward()
        finally:
            for p, g in zip(self.shared, kept, strict=True):
                p.grad = g


class WeightedGradients(PerTaskGradients):
    """A method whose combination is Σ_k w_k·g_k, with the weights w [T] read off the tasks' [T, T] Gram matrix
    (and, where the method says so with ``reads_losses``, the batch's losses ``loss_values``): MGDA, CAGrad,
    Nash-MTL, IMTL-G, Aligned-MTL, PCGrad, ... A subclass defines ``weights``; the fit loop's history shows
    them."""

    def combine(self, sinks: Sinks, task_grads: list[list[torch.Tensor | None]]) -> None:
        gram = self.gram(task_grads)
        weights = self.weights(gram)
        for k, grads in enumerate(task_grads):
            accumulate(sinks, grads, [weights[k]] * len(sinks))
        self.task_weights = weights.detach()
        norms = gram.diagonal().clamp(min=0).sqrt()
        self.grad_norm_ratio = norms / norms[0].clamp(min=torch.finfo(norms.dtype).tiny)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        """[T] each task's gradient's weight in the combination, from the [T, T] Gram matrix (no host sync)."""
        raise NotImplementedError


def drawn_on_host(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`index` (drawn on the host: a seeded task order) on `like`'s device without a host sync: on CUDA copied from
    pinned memory, not waited for (the pinned-memory cache reuses the block only once the copy has ended)."""
    if like.is_cuda:
        return index.pin_memory().to(like.device, non_blocking=True)
    return index.to(like.device)


def heads_backward(losses: Sequence[torch.Tensor], task_params: Sequence[torch.Tensor], split: SplitForward,
                   batched: bool = False) -> tuple[Sequence[torch.Tensor | None], Sequence[torch.Tensor | None]]:
    """The backward of the losses through the heads (models/split.py): (the task parameters' gradients of their
    sum, each boundary tensor's per-task gradient [T, ...]), None where no loss reaches one. One backward of the
    sum where each task's loss reads its own heads only. Where the heads are coupled (the funnel: a stage's loss
    reads the towers before it, each on its own task's view), task k's gradient at the boundary is the sum over
    the views of its loss's gradient: twice through the heads where the funnel over their outputs is the only
    coupling (split.outputs, _rowwise_heads_backward), else task by task, or `batched` in one backward."""
    if not split.coupled:
        grads = torch.autograd.grad(sum(losses), [*task_params, *split.per_task], allow_unused=True)
        return grads[: len(task_params)], grads[len(task_params) :]
    rows_at = _rows_at(split) if split.outputs is not None else None
    if rows_at is not None:
        return _rowwise_heads_backward(losses, task_params, split, rows_at)
    if batched:
        grads = _batched_grads(losses, [*task_params, *split.per_task])
        return ([None if g is None else g.sum(dim=0) for g in grads[: len(task_params)]],
                [None if g is None else g.sum(dim=1) for g in grads[len(task_params) :]])
    head_grads: list[list[torch.Tensor]] = [[] for _ in task_params]
    boundary_grads: list[list[torch.Tensor | None]] = [[] for _ in split.per_task]
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, [*task_params, *split.per_task], retain_graph=k < len(losses) - 1,
                                    allow_unused=True)
        for found, g in zip(head_grads, grads[: len(task_params)], strict=True):
            if g is not None:
                found.append(g)
        for found, g in zip(boundary_grads, grads[len(task_params) :], strict=True):
            found.append(None if g is None else g.sum(dim=0))
    return ([torch.stack(found).sum(dim=0) if found else None for found in head_grads],
            [_stacked(found, view) for found, view in zip(boundary_grads, split.per_task, strict=True)])


def _rows_at(split: SplitForward) -> list[int] | None:
    """Per boundary tensor, the dim of its rows: [B, F] or [G, B, H]; None where a shape is neither."""
    rows = split.outputs.shape[0]
    found = [0 if b.dim() == 2 else 1 for b in split.boundary]
    return found if all(b.dim() in (2, 3) and b.shape[at] == rows for b, at in zip(split.boundary, found,
                                                                                     strict=True)) else None


def _rowwise_heads_backward(losses: Sequence[torch.Tensor], task_params: Sequence[torch.Tensor], split: SplitForward,
                            rows_at: list[int]) -> tuple[Sequence[torch.Tensor | None], Sequence[torch.Tensor | None]]:
    """heads_backward where the losses are coupled only through a map over the heads' outputs z [B, T] (the
    funnel) and head t reads its view t alone, row by row. Each loss's gradient at z, c_k [B, T], comes from the
    small backward through the map; then the heads twice: with Σ_k c_k for their parameters, and with ones for
    u_t, each row's gradient of z[b, t] at view t. Row by row, loss k's gradient at the boundary is then
    Σ_t c_k[b, t]·u_t[b]: one einsum per boundary tensor instead of a backward through the heads per task.
    `rows_at`: each boundary tensor's row dim (_rows_at)."""
    outputs = split.outputs
    at_outputs = []
    for loss in losses:
        (grad,) = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        at_outputs.append(torch.zeros_like(outputs) if grad is None else grad)
    coefficients = torch.stack(at_outputs)  # [K, B, T]
    head_grads = torch.autograd.grad(outputs, list(task_params), grad_outputs=coefficients.sum(dim=0),
                                     retain_graph=True, allow_unused=True)
    units = torch.autograd.grad(outputs, split.per_task, grad_outputs=torch.ones_like(outputs), allow_unused=True)
    boundary_grads = []
    for unit, row in zip(units, rows_at, strict=True):
        if unit is None:
            boundary_grads.append(None)
            continue
        dims = "abcdefgh"[: unit.dim() - 1]
        boundary_grads.append(torch.einsum(f"k{dims[row]}t,t{dims}->k{dims}", coefficients, unit))
    return head_grads, boundary_grads


def _unstacked(found: Sequence[torch.Tensor | None], n_tasks: int) -> list[list[torch.Tensor | None]]:
    """Per task, its gradient of each input, out of one batched backward's [T, ...] gradients (None stays None)."""
    return [[None if g is None else g[k] for g in found] for k in range(n_tasks)]


def _batched_grads(losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], retain_graph: bool = False
                   ) -> tuple[torch.Tensor | None, ...]:
    """Each loss's gradient of each input, stacked over the losses ([T, *input.shape]; None where no loss reaches
    it), from one backward with the identity's rows as the stacked cotangents."""
    stacked = torch.stack(list(losses))
    eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    return torch.autograd.grad(stacked, list(inputs), grad_outputs=eye, is_grads_batched=True,
                               retain_graph=retain_graph, allow_unused=True)


def _gram(grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """[T, T] the dot products of one sink's per-task gradients (None: zeros; one task at least reaches it)."""
    like = next(g for g in grads if g is not None)
    flat = torch.stack([like.new_zeros(like.numel()) if g is None else g.reshape(-1) for g in grads])
    return flat @ flat.T


def _stacked(grads: list[torch.Tensor | None], view: torch.Tensor) -> torch.Tensor | None:
    """[T, ...] the tasks' gradients of one boundary tensor (zeros for a task that does not reach it), None where
    no task does."""
    if all(g is None for g in grads):
        return None
    return torch.stack([view.new_zeros(view.shape[1:]) if g is None else g for g in grads])


def _rows_of_tables(params: Sequence[torch.Tensor], task_grads: list[list[torch.Tensor | None]]
                    ) -> tuple[Sinks, list[list[torch.Tensor | None]]]:
    """The sinks and each task's gradients, an embedding table's sparse gradients (the full backward's) turned
    into a RowGradient over the rows any task touched and each task's summed gradient on those rows."""
    sinks: Sinks = list(params)
    for i, param in enumerate(params):
        if not is_table(param):
            continue
        found = [None if task[i] is None else touched(task[i]) for task in task_grads]
        reached = [pair for pair in found if pair is not None]
        if not reached:
            continue
        rows, inverse = distinct_rows(torch.cat([r for r, _ in reached]), param.shape[0])
        at = iter(inverse.split([r.numel() for r, _ in reached]))
        for task, pair in zip(task_grads, found, strict=True):
            if pair is not None:
                values = pair[1]
                task[i] = values.new_zeros(rows.numel(), *values.shape[1:]).index_put_((next(at),), values,
                                                                                       accumulate=True)
        sinks[i] = RowGradient(rows)
    return sinks, task_grads


def _laid_out_like(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`grad` with `param`'s strides, as autograd's own accumulation lays out a .grad (autograd.grad hands back
    whatever strides the backward made): fused Adam reads a gradient in its parameter's memory order, and
    silently misreads one with other strides (torch 2.13, CPU)."""
    return grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)


def accumulate(sinks: Sequence[Any], grads: Sequence[torch.Tensor | None],
               scale: Sequence[torch.Tensor] | None) -> None:
    """``sink.grad += scale[i]·g`` (None: 1; a factor broadcasts over its gradient); never writes to autograd's
    outputs, they may alias each other. A new ``.grad`` of a parameter is laid out like it (_laid_out_like)."""
    factors = scale if scale is not None else ()
    reached = [i for i, g in enumerate(grads) if g is not None]
    into = [i for i in reached if sinks[i].grad is not None]
    fresh = [i for i in reached if sinks[i].grad is None]
    if into:
        targets = [sinks[i].grad for i in into]
        sources = [grads[i] for i in into]
        if scale is None:
            torch._foreach_add_(targets, sources)
        else:
            torch._foreach_addcmul_(targets, sources, [factors[i] for i in into])
    if fresh:
        sources = [grads[i] for i in fresh]
        if scale is None:
            made = torch._foreach_clone(sources)
        else:
            made = torch._foreach_mul(sources, [factors[i] for i in fresh])
        for i, g in zip(fresh, made, strict=True):
            sinks[i].grad = _laid_out_like(g, sinks[i]) if isinstance(sinks[i], torch.Tensor) else g


class Representation:
    """Holds the combined gradient of one of the trunk's outputs (the representation level) until the trunk's
    backward reads it."""

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None


class RowGradient:
    """Holds the embedding table's balanced gradient on the batch's distinct rows (`rows`) until it becomes the
    table's gradient (table.add_rows)."""

    def __init__(self, rows: torch.Tensor | None) -> None:
        self.rows = rows
        self.grad: torch.Tensor | None = None
