"""A few training steps of every registered balancer at each of its levels, on tiny models: run under torchrun
(`python -m torch.distributed.run --nproc-per-node 2 tests/distributed_steps.py OUT`) each rank takes its slice
of every global batch, and the final weights and balancer state must equal one process's on the whole batches
(tests/test_distributed.py). One launch of the ranks serves every balancer: a launch costs seconds, a step
milliseconds."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from mbtrain.balance import BALANCERS, Setup, build_balancer
from mbtrain.distributed import Cluster, cluster_from_env
from mbtrain.models import Inputs, ModelConfig, build_model
from mbtrain.optim import TABLE_OPTIMIZERS, TrainOptimizer
from tests.helpers import seeded_batch

STEPS = 4
GLOBAL_ROWS = 16
RATES = (0.2, 0.5, 0.8)


# balance, level, model, cardinalities, --task-backward, --table-optimizer (sgd: plain SGD on every parameter)
Case = tuple[str, str, str, list[int], str, str]


def cases() -> list[Case]:
    """Every balancer at each of its levels on MMoE with a table larger than the batch (the gathered-rows path),
    with SGD and with each table optimizer beside fused Adam, and, for the gradient balancers, the funnel's
    coupled heads (AITM) and PLE with a table smaller than the batch; the gradient balancers' per-task backward
    passes one by one, and batched on MMoE and AITM."""
    found = []
    for balance, kind in BALANCERS.items():
        for level in kind.levels or ("parameters",):
            for optimizer in ("sgd", *TABLE_OPTIMIZERS):
                found.append((balance, level, "mmoe", [50, 70, 30], "loop", optimizer))
            if kind.levels:
                found.append((balance, level, "aitm", [5, 7, 3], "loop", "sgd"))
                found.append((balance, level, "ple", [5, 7, 3], "loop", "sgd"))
                found.append((balance, level, "mmoe", [50, 70, 30], "batched", "sgd"))
                found.append((balance, level, "aitm", [5, 7, 3], "batched", "sgd"))
    return found


def name_of(case: Case) -> str:
    balance, level, model, cards, task_backward, optimizer = case
    return f"{balance}-{level}-{model}-{sum(cards)}-{task_backward}-{optimizer}"


def train(case: Case, cluster: Cluster) -> dict:
    """The model's and the balancer's state after STEPS steps on this rank's share of each batch."""
    balance, level, model_name, cards, task_backward, table_optimizer = case
    torch.manual_seed(0)
    config = ModelConfig(model_name, embed_dim=4, hidden=[8], experts=2, tower=[4], dropout=0.0)
    model = build_model(config, Inputs(cards, num_numeric=2, num_tasks=len(RATES)))
    balancer = build_balancer(balance, Setup.of(model, len(RATES), seed=3, cluster=cluster, level=level,
                                                task_backward=task_backward))
    if table_optimizer == "sgd":
        optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.2)
    else:
        optimizer = TrainOptimizer(model.parameters(), table_optimizer, lr=0.02, weight_decay=0.0,
                                   balancer_params=balancer.parameters())
    share = GLOBAL_ROWS // cluster.world_size
    rows = slice(cluster.rank * share, (cluster.rank + 1) * share)
    for step in range(STEPS):
        categorical, numeric, labels = seeded_batch(step, cards, GLOBAL_ROWS, RATES)
        categorical, numeric, labels = categorical[rows], numeric[rows].float(), labels[rows].float()
        split = model.split_forward(categorical, numeric) if balancer.wants_split else None
        logits = split.logits if split is not None else model(categorical, numeric)
        losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(dim=0) / GLOBAL_ROWS
        optimizer.zero_grad()
        balancer.backward(list(losses.unbind()), split)
        optimizer.step()
        after = F.binary_cross_entropy_with_logits(model(categorical, numeric), labels, reduction="none")
        if balancer.wants_losses_after_step:
            balancer.after_step(list((after.detach().sum(dim=0) / GLOBAL_ROWS).unbind()))
        means = losses.detach().clone()
        cluster.sum_([means])
        balancer.epoch_end(means)  # as if each step were an epoch: DWA's weights move from the third
    return {"model": model.state_dict(), "balancer": balancer.state_dict()}


def main(out: Path) -> None:
    cluster = cluster_from_env("cpu")
    torch.set_num_threads(1)
    try:
        for case in cases():
            state = train(case, cluster)
            if cluster.is_main:
                torch.save(state, out / f"{name_of(case)}.pt")
    finally:
        cluster.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
