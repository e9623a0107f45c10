"""MGDA, CAGrad and Nash-MTL against the papers' (and the authors' code's) formulas written out here: every task's
gradient flattened into one vector, the weights by scipy (SLSQP on the simplex, as CAGrad's authors solve it;
fsolve on Gα = 1/α), over several SGD steps at either level; the solvers on random and degenerate Gram matrices;
the state round trip; the settings' bad values."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import fsolve, minimize
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from mbtrain.balance import MGDA, CAGrad, NashMTL, Setup, build_balancer, nash_mtl
from mbtrain.balance.cagrad import CagradSettings
from mbtrain.balance.mgda import MgdaSettings
from mbtrain.balance.nash_mtl import NashMtlSettings
from mbtrain.balance.per_task import PARAMETERS, REPRESENTATION
from mbtrain.models.split import SplitForward
from tests.helpers import (
    dense,
    flat_grads,
    heads_get,
    losses_of,
    run_cli,
    seeded_batch,
    step_side_by_side,
    twin_models,
    unflatten,
)

CARDS, ROWS = [40, 50, 30], 16  # a table bigger than the batch's entries: the split path's batch-rows gradients
TASKS = 3
SETTINGS = {
    "mgda": ("mgda", MgdaSettings()),  # loss+
    "mgda-none": ("mgda", MgdaSettings("none")),
    "mgda-l2": ("mgda", MgdaSettings("l2")),
    "mgda-loss": ("mgda", MgdaSettings("loss")),
    "cagrad": ("cagrad", CagradSettings()),
    "cagrad-0.8": ("cagrad", CagradSettings(0.8)),
    "nash-mtl": ("nash-mtl", NashMtlSettings()),
    "nash-mtl-every-2-unclipped": ("nash-mtl", NashMtlSettings(nash_update_weights_every=2, nash_max_norm=0.0)),
}


# the formulas, literally (numpy, float64): g is [T, dim], one flattened gradient per task


def on_the_simplex(objective, jacobian, n: int) -> np.ndarray:
    """scipy's SLSQP over the simplex from the uniform weights, as CAGrad's authors call it (tighter)."""
    result = minimize(objective, np.full(n, 1 / n), jac=jacobian, method="SLSQP", bounds=[(0, 1)] * n,
                      constraints={"type": "eq", "fun": lambda x: 1 - x.sum(), "jac": lambda x: -np.ones_like(x)},
                      options={"ftol": 1e-16, "maxiter": 1000})
    return result.x


def min_norm_reference(g: np.ndarray) -> np.ndarray:
    """Sener & Koltun: min_w ‖Σ_k w_k·g_k‖² over the simplex."""
    gram = g @ g.T
    return on_the_simplex(lambda x: x @ gram @ x, lambda x: 2 * gram @ x, len(g))


def mgda_reference(g: np.ndarray, losses: np.ndarray, normalization: str) -> np.ndarray:
    """The authors' gradient_normalizers, the min-norm weights of the normalised gradients, applied (times T:
    mbtrain's scale) to the gradients themselves, as their training loop weighs the losses."""
    norms = np.sqrt((g**2).sum(axis=1))
    n = {"none": np.ones(len(g)), "l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    return len(g) * min_norm_reference(g / n[:, None])


def cagrad_reference(g: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """The authors' cagrad(grads, alpha=c, rescale=1) without its 1e-8s, times T as their overwrite_grad: (the
    update d, the inner problem's w)."""
    gram = g @ g.T
    g0_norm = math.sqrt(gram.mean())
    radius = c * g0_norm
    mean_row = gram.mean(axis=1)

    def objective(x: np.ndarray) -> float:
        return x @ mean_row + radius * math.sqrt(max(x @ gram @ x, 0.0))

    def jacobian(x: np.ndarray) -> np.ndarray:
        norm = math.sqrt(max(x @ gram @ x, 0.0))
        return mean_row + (radius / norm * gram @ x if norm > 0 else 0.0)

    w = on_the_simplex(objective, jacobian, len(g))
    gw = w @ g
    norm = np.linalg.norm(gw)
    d = g.mean(axis=0) + (radius / norm * gw if norm > 0 else 0.0)  # g_w = 0: no direction to add (the authors: 1e-8)
    return len(g) * d / (1 + c**2), w


def bargaining_reference(g: np.ndarray) -> np.ndarray:
    """Navon et al.: α > 0 with GᵀGα = 1/α, by fsolve on log α."""
    gram = g @ g.T
    z = fsolve(lambda z: gram @ np.exp(z) - np.exp(-z), -0.5 * np.log(np.diag(gram)), xtol=1e-13)
    return np.exp(z)


def clipped(d: np.ndarray, max_norm: float) -> np.ndarray:
    """torch.nn.utils.clip_grad_norm_ on the whole vector."""
    if max_norm <= 0:
        return d
    return d * min(1.0, max_norm / (np.linalg.norm(d) + 1e-6))


class Reference:
    """The method's update from the flattened gradients, with Nash-MTL's memory (the last α, the step)."""

    def __init__(self, case: str) -> None:
        self.balance, self.settings = SETTINGS[case]
        self.alpha: np.ndarray | None = None
        self.step = 0

    def update(self, g: torch.Tensor, losses: list[torch.Tensor]) -> torch.Tensor:
        grads = g.numpy()
        if self.balance == "mgda":
            d = mgda_reference(grads, np.array([loss.item() for loss in losses]),
                               self.settings.mgda_normalization) @ grads
        elif self.balance == "cagrad":
            d, _ = cagrad_reference(grads, self.settings.cagrad_c)
        else:
            if self.step % self.settings.nash_update_weights_every == 0:
                self.alpha = bargaining_reference(grads)
            self.step += 1
            d = clipped(self.alpha @ grads, self.settings.nash_max_norm)
        return torch.from_numpy(d)


def reference_backward(model: nn.Module, losses: list[torch.Tensor], split: SplitForward | None,
                       reference: Reference) -> None:
    """The heads get the plain sum's gradient; the shared parameters (split None) the method's update of their
    flattened gradients, or the trunk's outputs that of theirs (each task's the sum over the per-task views its
    loss reads) and the trunk is back-propagated once with it."""
    heads_get(model, sum(losses))
    if split is None:
        shared = model.shared_parameters()
        for p, part in zip(shared, unflatten(reference.update(flat_grads(losses, shared), losses), shared),
                           strict=True):
            p.grad = part
        return
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, split.per_task, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(b) if grad is None else grad.sum(dim=0)).reshape(-1)
                               for grad, b in zip(grads, split.boundary, strict=True)]))
    update = reference.update(torch.stack(rows), losses)
    torch.autograd.backward(split.boundary, grad_tensors=unflatten(update, split.boundary))


def assert_close_grads_then_step(ours: nn.Module, theirs: nn.Module, rtol: float) -> None:
    """helpers.assert_same_grads_then_step at the reference solver's precision."""
    for (label, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        scale = dense(b.grad).abs().max().item()
        torch.testing.assert_close(dense(a.grad), dense(b.grad), rtol=rtol, atol=rtol * scale, msg=label)
    with torch.no_grad():
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            a.sub_(0.5 * dense(a.grad))
            b.sub_(0.5 * dense(a.grad))  # the same step on both: the models stay equal, each step compares afresh


@pytest.mark.parametrize("model_name", ["mmoe", "esmm"])
@pytest.mark.parametrize(("level", "split"), [(PARAMETERS, True), (PARAMETERS, False), (REPRESENTATION, True)],
                         ids=["parameters-split", "parameters-full", "representation"])
@pytest.mark.parametrize("case", SETTINGS)
def test_the_balancers_match_the_literal_formulas_over_steps(case: str, level: str, split: bool,
                                                             model_name: str) -> None:
    balance, settings = SETTINGS[case]
    ours, theirs = twin_models(model_name, CARDS)
    balancer = build_balancer(balance, Setup.of(ours, num_tasks=TASKS, level=level), settings)
    reference = Reference(case)
    seen = []
    for step in range(3):
        step_side_by_side(ours, theirs, balancer, seeded_batch(step, CARDS, ROWS), split, level,
                          lambda model, losses, forward: reference_backward(model, losses, forward, reference))
        # fsolve reaches rounding; SLSQP stops at ~1e-8 on MGDA's weights, ~1e-6 on CAGrad's (a flat optimum:
        # test_cagrad_solves_its_inner_problem finds ours no worse to 1e-9)
        assert_close_grads_then_step(ours, theirs, rtol={"nash-mtl": 1e-9, "mgda": 1e-6, "cagrad": 2e-5}[balance])
        seen.append(balancer.task_weights)
    weights = torch.stack(seen)
    assert torch.isfinite(weights).all() and weights.std(dim=1).min() > 1e-3  # the tasks were weighed apart


# the solvers on their own: Gram matrices of random and degenerate gradients


def gradients(case: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sum(map(ord, case)))
    scales = torch.tensor([1.0, 0.3, 2.0, 0.7, 1.5, 0.2, 1.1, 3.0, 0.5, 0.9], dtype=torch.float64)

    def draw(tasks: int, dim: int) -> torch.Tensor:
        return torch.randn(tasks, dim, generator=generator, dtype=torch.float64) * scales[:tasks, None]

    a, b = draw(2, 8)
    return {
        "random-3": lambda: draw(3, 8),
        "random-5": lambda: draw(5, 8),
        "collinear": lambda: torch.stack([a, 2.5 * a, b]),
        "identical": lambda: torch.stack([a, a, b]),
        "zero-gradient": lambda: torch.stack([a, 0 * a, b]),
        "opposed": lambda: torch.stack([a, -0.5 * a, b]),
        "rank-deficient": lambda: draw(5, 2),
        "many-tasks": lambda: draw(10, 12),  # above EXACT_MAX_TASKS: Frank–Wolfe
        "all-zero": lambda: torch.zeros(3, 8, dtype=torch.float64),
    }[case]()


CASES = ["random-3", "random-5", "collinear", "identical", "zero-gradient", "opposed", "rank-deficient", "many-tasks",
         "all-zero"]
ONE = nn.Parameter(torch.zeros(1, dtype=torch.float64))  # the balancers' weights() read only the Gram matrix


def scale_of(g: torch.Tensor) -> float:
    return max(g.square().sum(dim=1).max().item(), 1e-300)


@pytest.mark.parametrize("case", CASES)
def test_mgda_finds_the_min_norm_point(case: str) -> None:
    """The min-norm point Σ w_k·g_k is unique even where w is not (collinear, identical): compare the points,
    ‖p − p*‖² ≤ ‖p‖² − ‖p*‖² in the convex hull. Frank–Wolfe (many tasks) to its fixed steps' precision."""
    g = gradients(case)
    w = MGDA([ONE], normalization="none").weights(g @ g.T) / len(g)
    assert torch.isfinite(w).all() and (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-12)
    ours, theirs = w @ g, torch.from_numpy(min_norm_reference(g.numpy())) @ g
    tolerance = (1e-3 if case == "many-tasks" else 1e-10) * scale_of(g)
    assert ours.square().sum() <= theirs.square().sum() + tolerance
    assert (ours - theirs).square().sum() <= 2 * tolerance
    if case in ("opposed", "all-zero"):  # 0 is in the hull
        assert ours.square().sum() <= 1e-10 * scale_of(g)


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_mgdas_normalisers_count_a_zero_gradient_or_loss_as_1(normalization: str) -> None:
    g = gradients("zero-gradient")
    balancer = MGDA([ONE], normalization=normalization)
    balancer.loss_values = torch.tensor([0.5, 0.0, 0.2], dtype=torch.float64)
    w = balancer.weights(g @ g.T)
    assert w.tolist() == [0.0, 3.0, 0.0]  # the zero gradient is the min-norm point, weighed T
    if normalization != "l2":
        with pytest.raises(ValueError, match="needs the batch's losses"):
            MGDA([ONE], normalization=normalization).weights(g @ g.T)


@pytest.mark.parametrize("c", [0.4, 0.9])
@pytest.mark.parametrize("case", CASES)
def test_cagrad_solves_its_inner_problem(case: str, c: float) -> None:
    """The inner problem's value against SLSQP's (ours no worse), and the update d itself where g_w is not 0 (its
    direction is then defined; the update is unique)."""
    g = gradients(case)
    gram = g @ g.T
    weights = CAGrad([ONE], c=c).weights(gram)
    assert torch.isfinite(weights).all()
    ours = weights @ g
    theirs_d, theirs_w = cagrad_reference(g.numpy(), c) if g.any() else (np.zeros(g.shape[1]), None)
    if theirs_w is None:
        assert not ours.any()
        return
    # recover our w from the update: d·(1 + c²)/T − g_0 = λ·g_w; compare the objective at SLSQP's w and at ours
    radius = c * math.sqrt(gram.mean().item())
    mean_row = gram.mean(dim=1).numpy()

    def objective(x: np.ndarray) -> float:
        return x @ mean_row + radius * math.sqrt(max(x @ gram.numpy() @ x, 0.0))

    ours_w = (weights * (1 + c**2) - 1) / len(g)  # T·λ·w_k / T
    lam_w_sum = ours_w.sum().item()
    tolerance = (3e-3 if case == "many-tasks" else 1e-9) * scale_of(g)
    if lam_w_sum > 1e-12:
        assert objective((ours_w / lam_w_sum).numpy()) <= objective(theirs_w) + tolerance
    if np.linalg.norm(theirs_w @ g.numpy()) > 1e-3 * math.sqrt(scale_of(g)) and case != "many-tasks":
        torch.testing.assert_close(ours, torch.from_numpy(theirs_d), rtol=0, atol=1e-5 * math.sqrt(scale_of(g)))


@pytest.mark.parametrize("case", CASES)
def test_nash_mtl_solves_the_bargaining_equations(case: str) -> None:
    """Gα = 1/α where it has a solution; a zero gradient's task gets 0 and the others bargain alone; with no
    solution (a positive combination of the gradients is 0) the weights stay finite and the update's norm at
    most √T; all zero: 0."""
    g = gradients(case)
    alpha = NashMTL([ONE], max_norm=0.0).weights(g @ g.T)
    assert torch.isfinite(alpha).all() and (alpha >= 0).all()
    if case in ("random-3", "random-5", "collinear", "identical", "many-tasks"):
        torch.testing.assert_close(alpha, torch.from_numpy(bargaining_reference(g.numpy())), rtol=1e-9, atol=0)
    elif case == "zero-gradient":
        assert alpha[1].item() == 0.0
        torch.testing.assert_close(alpha[[0, 2]], torch.from_numpy(bargaining_reference(g[[0, 2]].numpy())),
                                   rtol=1e-9, atol=0)
    elif case == "all-zero":
        assert not alpha.any()
    else:
        assert (alpha @ g).square().sum().item() <= len(g) * (1 + 1e-6)


@pytest.mark.parametrize("balance", ["mgda", "cagrad", "nash-mtl"])
def test_a_float32_gram_matrix_gives_float32_weights_close_to_float64s(balance: str) -> None:
    g = gradients("random-3")
    setup = Setup([ONE], [], TASKS)
    balancer, again = build_balancer(balance, setup), build_balancer(balance, setup)
    balancer.loss_values = again.loss_values = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    single, double = balancer.weights((g @ g.T).float()), again.weights(g @ g.T)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, double.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_nash_mtls_early_stop_on_the_cpu_gives_the_fixed_counts_weights(case: str, dtype: torch.dtype,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's solve (no search where it would be discarded, a stop once converged) against the other devices'
    (every step's search, NEWTON_STEPS steps) on the CPU: the same weights within rounding."""
    g = gradients(case)
    gram = (g @ g.T).to(dtype)
    stopping = NashMTL([ONE], max_norm=0.0).weights(gram)
    monkeypatch.setattr(nash_mtl, "HOST_DEVICES", ())
    fixed = NashMTL([ONE], max_norm=0.0).weights(gram)
    torch.testing.assert_close(stopping, fixed, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)


def test_nash_mtl_clips_the_update_and_reuses_its_weights_between_solves() -> None:
    g = gradients("random-3")
    first, second = g, g * torch.tensor([[2.0], [1.0], [0.5]], dtype=torch.float64)
    balancer = NashMTL([ONE], update_weights_every=2, max_norm=1.0)
    alpha = torch.from_numpy(bargaining_reference(first.numpy()))
    clipped_first = balancer.weights(first @ first.T)
    torch.testing.assert_close(clipped_first, alpha / (math.sqrt(3) + 1e-6), rtol=1e-9, atol=0)  # ‖Σαg‖ = √T
    reused = balancer.weights(second @ second.T)  # step 1: α kept, the clip on this batch's gradients
    norm = (alpha @ second).norm()
    torch.testing.assert_close(reused, alpha * min(1.0, 1 / (norm.item() + 1e-6)), rtol=1e-9, atol=0)
    assert balancer.step == 2


@pytest.mark.parametrize("tasks", [3, 10], ids=["exact", "frank-wolfe"])
@pytest.mark.parametrize("balance", ["mgda", "cagrad", "nash-mtl"])
def test_the_weights_read_no_value_on_the_host(balance: str, tasks: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """No .item(), no bool() of a tensor, no data-dependent shape (each a host sync on a GPU): under fake tensors,
    which have no values, any of them raises. (Nash-MTL's solver reads values on the CPU only, where they cost no
    sync: the fake tensors, on the CPU, take the other devices' path.)"""
    monkeypatch.setattr(nash_mtl, "HOST_DEVICES", ())
    balancer = build_balancer(balance, Setup([ONE], [], tasks))
    balancer.loss_values = torch.rand(tasks, dtype=torch.float64)
    with FakeTensorMode(allow_non_fake_inputs=True):
        g = torch.randn(tasks, 5, dtype=torch.float64)
        for _ in range(2):  # Nash-MTL: a solve, then a reuse
            assert balancer.weights(g @ g.T).shape == (tasks,)


# the state, the settings


@pytest.mark.parametrize(("balance", "settings"), [("mgda", MgdaSettings()), ("cagrad", CagradSettings()),
                                                   ("nash-mtl", NashMtlSettings(nash_update_weights_every=3))])
def test_a_balancer_rebuilt_from_its_state_continues_identically(balance: str, settings: object) -> None:
    model, _ = twin_models("mmoe", CARDS)
    balancer = build_balancer(balance, Setup.of(model, num_tasks=TASKS), settings)

    def step(on: nn.Module, by: object, at: int) -> list[torch.Tensor]:
        on.zero_grad(set_to_none=True)
        categorical, numeric, labels = seeded_batch(at, CARDS, ROWS)
        forward = on.split_forward(categorical, numeric)
        by.backward(losses_of(forward.logits, labels), forward)
        return [dense(p.grad).clone() for p in on.parameters()]

    for at in range(2):
        step(model, balancer, at)
    buffer = io.BytesIO()
    torch.save(balancer.state_dict(), buffer)  # as a checkpoint holds it
    buffer.seek(0)
    twin = copy.deepcopy(model)
    again = build_balancer(balance, Setup.of(twin, num_tasks=TASKS), settings)
    again.load_state_dict(torch.load(buffer, weights_only=True))
    for at in range(2, 5):
        for a, b in zip(step(model, balancer, at), step(twin, again, at), strict=True):
            assert torch.equal(a, b)
    assert again.state_dict().keys() == balancer.state_dict().keys()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--mgda-normalization", "l1", "--mgda-normalization 'l1' is not supported: choose one of none, l2, loss, loss+"),
    ("--cagrad-c", "1", "--cagrad-c must be in [0, 1): got 1.0"),
    ("--cagrad-c", "-0.1", "--cagrad-c must be in [0, 1): got -0.1"),
    ("--nash-update-weights-every", "0", "--nash-update-weights-every must be at least 1: got 0"),
    ("--nash-max-norm", "-1", "--nash-max-norm must be non-negative (0: no clipping): got -1.0"),
    ("--nash-max-norm", "nan", "--nash-max-norm must be non-negative (0: no clipping): got nan"),
])
def test_a_bad_setting_is_one_error_line_naming_its_flag(flag: str, value: str, message: str, tmp_path: Path) -> None:
    result = run_cli("fit", "data.parquet", "--tasks", "click,purchase", flag, value, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.stderr
