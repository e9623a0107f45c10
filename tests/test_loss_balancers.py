"""Loss-level balancers (uncertainty, DWA, FAMO) against straightforward implementations written here from the
papers, over several optimizer steps; every balancer fits from TOML, resumes exactly and exports; static task
weights; bad settings."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import polars as pl
import pytest
import torch

from mbtrain.balance import BALANCERS, DWA, FAMO, Balancer, Setup, Uncertainty, build_balancer
from mbtrain.balance.registry import default_settings, settings_of
from tests.helpers import Adam, TinyThreeTasks, assert_resumes_identically, run_cli

TASKS = 3


def _step(model: TinyThreeTasks, balancer, optimizer: torch.optim.Optimizer, step: int) -> None:
    """One training step as the fit loop takes it: backward, optimizer step, then FAMO's same-batch update."""
    optimizer.zero_grad()
    balancer.backward(model.losses(step))
    optimizer.step()
    if balancer.wants_losses_after_step:
        with torch.no_grad():
            balancer.after_step(model.losses(step))


def _train(balancer_of, reference_step, steps: int = 5) -> None:
    """Train one model with the balancer and a copy with the reference's loss; parameters must stay equal."""
    ours, theirs = TinyThreeTasks(), TinyThreeTasks()
    balancer = balancer_of(ours)
    optimizer = Adam([*ours.parameters(), *balancer.parameters()], lr=0.05)
    reference = reference_step(theirs)
    for step in range(steps):
        _step(ours, balancer, optimizer, step)
        reference(step)
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_uncertainty_is_the_learned_log_variance_sum() -> None:
    log_vars = torch.zeros(TASKS, requires_grad=True)

    def reference(model: TinyThreeTasks):
        optimizer = Adam([*model.parameters(), log_vars], lr=0.05)

        def step(index: int) -> None:
            optimizer.zero_grad()
            sum(0.5 * torch.exp(-log_vars[k]) * loss + 0.5 * log_vars[k]
                for k, loss in enumerate(model.losses(index))).backward()
            optimizer.step()

        return step

    made: list[Uncertainty] = []
    _train(lambda model: made.append(Uncertainty(TASKS, list(model.parameters()))) or made[0], reference)
    torch.testing.assert_close(made[0].log_vars.detach(), log_vars.detach())
    assert log_vars.abs().sum() > 0.1  # it learned something


def test_dwa_weights_follow_the_last_two_epochs_loss_ratio() -> None:
    balancer = DWA(TASKS, temperature=2.0)
    losses = [torch.tensor(v, requires_grad=True) for v in (0.5, 0.2, 0.1)]
    balancer.backward(losses)
    assert [loss.grad.item() for loss in losses] == [1.0, 1.0, 1.0]  # no history: weight 1 each
    balancer.epoch_end(torch.tensor([0.6, 0.3, 0.2]))
    balancer.epoch_end(torch.tensor([0.3, 0.27, 0.2]))
    ratios = [0.3 / 0.6, 0.27 / 0.3, 0.2 / 0.2]
    expected = [TASKS * math.exp(r / 2) / sum(math.exp(q / 2) for q in ratios) for r in ratios]
    losses = [torch.tensor(v, requires_grad=True) for v in (0.5, 0.2, 0.1)]
    balancer.backward(losses)
    assert [loss.grad.item() for loss in losses] == pytest.approx(expected, rel=1e-6)
    balancer.epoch_end(torch.tensor([0.3, 0.3, 0.1]))  # only the last two epochs count
    ratios = [0.3 / 0.3, 0.3 / 0.27, 0.1 / 0.2]
    expected = [TASKS * math.exp(r / 2) / sum(math.exp(q / 2) for q in ratios) for r in ratios]
    assert balancer.weights.tolist() == pytest.approx(expected, rel=1e-9)
    resumed = DWA(TASKS, temperature=5.0)
    resumed.load_state_dict(copy.deepcopy(balancer.state_dict()))
    assert torch.equal(resumed.weights, balancer.weights) and resumed.temperature == 2.0


class ReferenceFAMO:
    """FAMO as the paper's Algorithm 1 and its authors' code: logits w, z = softmax(w); the loss
    Σ z_k·log(ℓ_k + ε) / c with c = Σ z_k / (ℓ_k + ε); after the step, w.grad = ∂z/∂w ᵀ (log ℓ − log ℓ')."""

    def __init__(self, lr: float, decay: float) -> None:
        self.w = torch.zeros(TASKS, requires_grad=True)
        self.optimizer = Adam([self.w], lr=lr, weight_decay=decay)

    def loss(self, losses: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(losses)
        self.previous = stacked.detach()
        z = torch.softmax(self.w, -1)
        shifted = stacked + 1e-8
        c = (z / shifted).sum().detach()
        return (shifted.log() * z / c).sum()

    def update(self, losses: list[torch.Tensor]) -> None:
        delta = (self.previous + 1e-8).log() - (torch.stack(losses) + 1e-8).log()
        with torch.enable_grad():
            d = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta.detach())[0]
        self.optimizer.zero_grad()
        self.w.grad = d
        self.optimizer.step()


@pytest.mark.parametrize("same_batch", [True, False])
@pytest.mark.parametrize(("lr", "decay"), [(0.025, 0.01), (0.2, 0.0)])
def test_famo_matches_the_reference_algorithm(lr: float, decay: float, same_batch: bool) -> None:
    """same_batch: the authors' loop (score the batch again after the step); otherwise the update waits for the
    next step's losses, on the next batch."""
    famo = ReferenceFAMO(lr, decay)

    def reference(model: TinyThreeTasks):
        optimizer = Adam(model.parameters(), lr=0.05)

        def step(index: int) -> None:
            losses = model.losses(index)
            if not same_batch and index > 0:
                famo.update([loss.detach() for loss in losses])
            optimizer.zero_grad()
            famo.loss(losses).backward()
            optimizer.step()
            if same_batch:
                with torch.no_grad():
                    famo.update(model.losses(index))

        return step

    made: list[FAMO] = []
    _train(lambda model: made.append(FAMO(TASKS, list(model.parameters()), lr=lr, decay=decay,
                                          same_batch=same_batch)) or made[0], reference, steps=6)
    torch.testing.assert_close(made[0].logits.detach(), famo.w.detach())
    assert famo.w.abs().sum() > 0  # the logits moved


@pytest.mark.parametrize(("name", "same_batch"), [("uncertainty", False), ("dwa", False), ("famo", False),
                                                  ("famo", True)])
def test_state_round_trip_continues_identically(name: str, same_batch: bool) -> None:
    def made(model: TinyThreeTasks) -> Balancer:
        settings = settings_of(name, {**default_settings(), "famo_same_batch": same_batch})
        return build_balancer(name, Setup(list(model.parameters()), [], TASKS), settings)

    def step(model: TinyThreeTasks, balancer: Balancer, optimizer: torch.optim.Optimizer, index: int) -> None:
        _step(model, balancer, optimizer, index)
        if index % 2:
            balancer.epoch_end(torch.stack(model.losses(index)).detach())

    assert_resumes_identically(TinyThreeTasks, made, step)


# the balancer's own state after resuming, where it has one beyond the model and optimizer
STATE = {"metabalance": "moving_norms", "multibalance": "moving_norms", "pcgrad": "generator", "gradnorm": "weights",
         "uncertainty": "log_vars", "dwa": "history", "famo": "logits", "imtl-l": "log_scales", "rlw": "generator",
         "db-mtl": "buffers", "gradvac": "targets", "nash-mtl": "alpha"}  # the others keep no state


@pytest.mark.parametrize("balance", [name for name in BALANCERS if name != "none"])
def test_each_balancer_fits_from_toml_and_resumes_like_a_straight_run(balance: str, data_dir: Path,
                                                                      tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(f'tasks = "purchase,click"\nbalance = "{balance}"\npatience = 0\nbatch_size = 64\n'
                      'task_weights = {click = 0.5}\nthreads = 1\n')
    straight, split = tmp_path / "straight", tmp_path / "split"
    train = str(data_dir / "train.parquet")
    assert run_cli("fit", train, "--config", str(config), "--epochs", "4", "--out", str(straight)).exit_code == 0
    assert run_cli("fit", train, "--config", str(config), "--epochs", "2", "--out", str(split)).exit_code == 0
    result = run_cli("fit", "--resume", "--out", str(split), "--epochs", "4")
    assert result.exit_code == 0, result.output
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][name], rtol=1e-5, atol=1e-6, msg=name)
    key = STATE.get(balance)
    if key is not None and isinstance(a["balancer"][key], torch.Tensor):
        torch.testing.assert_close(a["balancer"][key], b["balancer"][key], rtol=1e-5, atol=1e-6)
    history = [json.loads(line) for line in (straight / "history.jsonl").read_text().splitlines()]
    assert json.loads((straight / "config.json").read_text())["balance"]["task_weights"] == {"click": 0.5}
    assert history[-1]["task_weights"] == {"purchase": 1.0, "click": 0.5}
    assert run_cli("export", str(straight), "--output", str(tmp_path / "model.pt")).exit_code == 0


def test_a_zero_task_weight_makes_the_run_blind_to_that_tasks_labels(data_dir: Path, tmp_path: Path) -> None:
    frame = pl.read_parquet(data_dir / "train.parquet")
    flipped = tmp_path / "flipped.parquet"
    frame.with_columns((1 - pl.col("click")).alias("click")).write_parquet(flipped)
    common = ["--tasks", "purchase,click", "--task-weights", "click=0", "--epochs", "2", "--batch-size", "64",
              "--threads", "1", "--balance", "metabalance"]
    for source, out in ((data_dir / "train.parquet", tmp_path / "a"), (flipped, tmp_path / "b")):
        result = run_cli("fit", str(source), *common, "--out", str(out))
        assert result.exit_code == 0, result.output
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["model"]
    bias = "network.towers.out.bias"
    assert not torch.equal(a[bias][1], b[bias][1])  # the click logit starts at its own base rate
    a[bias][1], b[bias][1] = 0.0, 0.0
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.mark.parametrize(("args", "message"), [
    (["--task-weights", "cart=1"], "--task-weights names 'cart', which is not one of --tasks"),
    (["--task-weights", "click"], "--task-weights expects task=weight pairs"),
    (["--task-weights", "click=abc"], "--task-weights click=abc: 'abc' is not a number"),
    (["--task-weights", "click=-1"], "a weight must be a finite number >= 0"),
    (["--task-weights", "click=inf"], "a weight must be a finite number >= 0"),
    (["--balance", "dwa", "--temperature", "0"], "--temperature must be positive"),
    (["--balance", "famo", "--famo-lr", "-1"], "--famo-lr must be positive"),
    (["--balance", "famo", "--famo-decay", "-0.1"], "--famo-decay must be non-negative"),
    (["--balance", "gradnorm", "--gradnorm-alpha", "0"], "--gradnorm-alpha must be positive"),
    (["--balance", "famo", "--task-weights", "click=0"], "--balance famo needs every weight positive"),
    (["--balance", "uncertainty", "--task-weights", "click=0"], "--balance uncertainty needs every weight positive"),
    (["--tasks", "click", "--balance", "pcgrad"], "--balance pcgrad needs at least two tasks"),
])
def test_bad_balance_settings_are_one_line(args: list[str], message: str, data_dir: Path, tmp_path: Path) -> None:
    result = run_cli("fit", str(data_dir / "train.parquet"), "--tasks", "purchase,click", *args, "--out",
                     str(tmp_path / "run"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
