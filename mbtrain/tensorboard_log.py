"""TensorBoard event files for a run (`--tensorboard`, the optional `mbtrain[tensorboard]` extra).

Every LOG_EVERY steps: each task's training loss and the balancer's per-task weights or scales (MetaBalance:
each auxiliary task's gradient-norm ratio to the main task per logical shared tensor; MultiBalance: per
representation tensor and expert); at each validation (every epoch's end, and every --validate-every steps):
every validation metric of every task and the learning rate. The x axis counts the steps taken, so a resumed run appends
where its last checkpoint ended (events an interrupted epoch wrote past it are purged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mbtrain.errors import MbtrainError

LOG_EVERY = 20  # steps between training scalars
INSTALL = "pip install 'mbtrain[tensorboard]'"


def require_tensorboard() -> None:
    """Fail with one line, before any work, where the extra is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise MbtrainError(f"--tensorboard needs the tensorboard package: {INSTALL}") from None


class RunLog:
    """The run's TensorBoard writer; rank 0 alone makes one."""

    def __init__(self, folder: Path, tasks: list[str], steps_done: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tasks = tasks
        self.writer = SummaryWriter(str(folder), purge_step=steps_done + 1 if steps_done else None)

    def step(self, step: int, losses: torch.Tensor, norm_ratios: torch.Tensor | None,
             task_weights: torch.Tensor | None = None, ratio_names: list[str] | None = None) -> None:
        """Training scalars after `step` steps: losses [T] (this rank's batch means) and what the balancer
        has of per-task norm ratios [T, G] (G named by `ratio_names`) and loss weights [T]."""
        for task, loss in zip(self.tasks, losses.tolist(), strict=True):
            self.writer.add_scalar(f"train_loss/{task}", loss, step)
        if task_weights is not None:
            for task, weight in zip(self.tasks, task_weights.tolist(), strict=True):
                self.writer.add_scalar(f"task_weight/{task}", weight, step)
        if norm_ratios is not None:
            for task, ratios in zip(self.tasks[1:], norm_ratios[1:].tolist(), strict=True):
                for name, ratio in zip(ratio_names or map(str, range(len(ratios))), ratios, strict=True):
                    self.writer.add_scalar(f"grad_norm_ratio/{task}/{name}", ratio, step)

    def validation(self, step: int, entry: dict[str, Any]) -> None:
        """After `step` steps: a history row's validation metrics (each one that has a value) and learning rate."""
        for task, metrics in entry["valid"].items():
            for name, value in metrics.items():
                if value is not None and name not in ("positives", "rows"):
                    self.writer.add_scalar(f"valid/{task}/{name}", value, step)
        self.writer.add_scalar("lr", entry["lr"], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
