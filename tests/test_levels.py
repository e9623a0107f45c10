"""--balance-level representation: every gradient balancer's combination equals the method applied to the tasks'
gradients at the trunk's outputs computed by plain autograd, the trunk then back-propagated once with it."""

from __future__ import annotations

import copy

import pytest
import torch

from mbtrain.balance import BALANCERS, GradNorm, MultiBalance, Setup, build_balancer
from mbtrain.balance.per_task import REPRESENTATION, WeightedGradients
from mbtrain.models.split import SplitForward
from tests.helpers import assert_same_grads_then_step, heads_get, losses_of, run_cli, seeded_batch, twin_models

CARDS = [5, 7, 3]
WEIGHTED = [name for name, kind in BALANCERS.items()
            if REPRESENTATION in kind.levels and issubclass(kind, WeightedGradients)]


def boundary_gradients(split: SplitForward, losses: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Each task's gradient of each trunk output, by plain autograd task by task: the sum over the per-task views
    its loss reads (the funnel's heads read several)."""
    found = []
    for loss in losses:
        grads = torch.autograd.grad(loss, split.per_task, retain_graph=True, allow_unused=True)
        found.append([torch.zeros_like(b) if g is None else g.sum(dim=0)
                      for g, b in zip(grads, split.boundary, strict=True)])
    return found


def reference_backward(model: torch.nn.Module, split: SplitForward, losses: list[torch.Tensor],
                       weights_of: WeightedGradients) -> None:
    """The heads get the plain sum's gradient; the trunk Σ_k w_k·g_k at its outputs, w from the method's
    weights on the Gram matrix of the flattened representation gradients."""
    grads = boundary_gradients(split, losses)
    flat = torch.stack([torch.cat([g.reshape(-1) for g in task]) for task in grads])
    weights_of.loss_values = torch.stack([loss.detach() for loss in losses])  # the batch's, as backward sets them
    weights = weights_of.weights(flat @ flat.T)
    combined = [sum(weights[k] * grads[k][i] for k in range(len(losses))) for i in range(len(split.boundary))]
    trunk_backward(model, split, losses, combined)


def trunk_backward(model: torch.nn.Module, split: SplitForward, losses: list[torch.Tensor],
                   combined: list[torch.Tensor]) -> None:
    """The heads' parameters get the plain sum's gradient, the trunk the `combined` one at its outputs."""
    heads_get(model, sum(losses))
    torch.autograd.backward(split.boundary, grad_tensors=combined)


@pytest.mark.parametrize("name", ["mmoe", "ple", "esmm", "aitm"])
@pytest.mark.parametrize("balance", WEIGHTED)
def test_the_representation_level_combines_the_gradients_at_the_trunks_outputs(balance: str, name: str) -> None:
    ours, theirs = twin_models(name, CARDS)
    balancer = build_balancer(balance, Setup.of(ours, num_tasks=3, seed=5, level=REPRESENTATION))
    assert balancer.wants_split
    for step in range(3):
        categorical, numeric, labels = seeded_batch(step, CARDS)
        before = copy.deepcopy(balancer)  # the method's state as the step finds it
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            split = model.split_forward(categorical, numeric)
            losses = losses_of(split.logits, labels)
            if model is ours:
                balancer.backward(losses, split)
            else:
                reference_backward(model, split, losses, before)
        assert_same_grads_then_step(ours, theirs, 0.3)


def test_gradnorm_measures_the_norms_at_the_trunks_outputs() -> None:
    ours, theirs = twin_models("mmoe", CARDS)
    balancer = build_balancer("gradnorm", Setup.of(ours, num_tasks=3, level=REPRESENTATION))
    assert isinstance(balancer, GradNorm)
    initial = None
    for step in range(3):
        categorical, numeric, labels = seeded_batch(step, CARDS)
        with torch.no_grad():
            balancer.weights.clamp_(min=1e-3).mul_(3 / balancer.weights.sum())
        weights = balancer.weights.detach().clone()
        for model in (ours, theirs):
            model.zero_grad(set_to_none=True)
            split = model.split_forward(categorical, numeric)
            losses = losses_of(split.logits, labels)
            if model is ours:
                balancer.backward(losses, split)
                continue
            weighted = [w * loss for w, loss in zip(weights, losses, strict=True)]
            grads = boundary_gradients(split, weighted)
            norms = torch.stack([torch.cat([g.reshape(-1) for g in task]).norm() for task in grads])
            values = torch.stack(losses).detach()
            initial = values if initial is None else initial
            rate = values / initial
            target = norms.mean() * (rate / rate.mean()) ** 1.5
            expected = torch.sign(norms - target) * norms / weights
            torch.testing.assert_close(balancer.weights.grad, expected, rtol=1e-9, atol=1e-12)
            trunk_backward(model, split, weighted, [sum(task[i] for task in grads) for i in range(len(grads[0]))])
        assert_same_grads_then_step(ours, theirs, 0.3)
        with torch.no_grad():
            balancer.weights.sub_(0.1 * balancer.weights.grad)


def test_metabalance_at_the_representation_level_is_multibalance() -> None:
    ours, _ = twin_models("mmoe", CARDS)
    assert isinstance(build_balancer("metabalance", Setup.of(ours, 3, level=REPRESENTATION)), MultiBalance)


@pytest.mark.parametrize(("args", "message"), [
    (["--balance", "uncertainty", "--balance-level", "representation"],
     "--balance-level representation: --balance uncertainty weighs the losses, not the tasks' gradients"),
    (["--balance", "pcgrad", "--balance-level", "trunk"], "--balance-level"),
])
def test_a_level_the_balancer_lacks_is_one_error_line(args: list[str], message: str, tmp_path) -> None:
    result = run_cli("fit", "data.parquet", "--tasks", "click,purchase", *args, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
