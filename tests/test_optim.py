"""curvlab.optim: exact steps against dense references, invariants, training, state, robustness."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import curvlab
from curvlab.approx import DEFAULT_DAMPING
from curvlab.model_blocks import model_blocks
from curvlab.optim import EKFAC, KFAC, OPTIMIZERS, TEKFAC, TKFAC
from helpers import (
    dense_ggn,
    dense_grad,
    dense_kfac,
    partial_traces,
    reload_through_file,
    tiny_cnn,
    tiny_decoder,
    tiny_mlp,
    to_matrix_order,
)

DT = torch.float64
ALL = [KFAC, EKFAC, TKFAC, TEKFAC]
IDS = [c.__name__ for c in ALL]

#: EXACT refreshes every step: EKFAC/TEKFAC warn that they never rescale (wanted here).
pytestmark = pytest.mark.filterwarnings("ignore:.*is a multiple of eigen_interval:UserWarning")

#: Settings under which one step is the damped natural-gradient step of the batch's block.
EXACT = dict(
    fisher="exact", stat_decay=0.0, stats_interval=1, eigen_interval=1, scale_interval=1,
    momentum=0.0, weight_decay=0.0, kl_clip=None, damping_strategy="exact", factor_dtype="float64",
)


def softmax_regression(seed: int = 0, d_in: int = 4, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, classes)).to(DT)


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([module.weight.detach().flatten(), module.bias.detach().flatten()])


def train_step(opt, model, loss_fn, x, y, use_track: bool = True) -> torch.Tensor:
    opt.zero_grad()
    if use_track:
        with opt.track(loss_fn):
            loss = loss_fn(model(x), y)
            loss.backward()
    else:
        loss = loss_fn(model(x), y)
        loss.backward()
    opt.step()
    return loss.detach()


def data(n: int, d_in: int = 5, classes: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen, dtype=DT), torch.randint(0, classes, (n,), generator=gen)


def assert_same_state(a: object, b: object, path: str = "state_dict") -> None:
    """Two state dicts are equal: same keys, bit-identical tensors."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same_state(u, v, f"{path}[{i}]")
    else:
        assert a == b, path


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.kron(a.contiguous(), b.contiguous())


# ----------------------------------------------------------------------------- exact steps


@pytest.mark.usefixtures("routes")
@pytest.mark.parametrize("loss", ["ce", "bce"])
@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_one_step_is_damped_natural_gradient(cls, loss):
    """N = 1, exact Fisher, no averaging: every method's block is the exact Fisher block F, so
    one step is θ − lr (F + λI)⁻¹ ∇ with F and ∇ from a dense torch.func reference (BCE: three
    independent Bernoulli outputs, F = diag(σ(1 − σ)) ⊗ x̄x̄ᵀ)."""
    model = softmax_regression()
    x, y = data(1, d_in=4)
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.BCEWithLogitsLoss()
    if loss == "bce":
        y = torch.tensor([[1.0, 0.0, 0.25]], dtype=DT)
    lr, lam = 0.3, 1e-2
    F = dense_ggn(model, loss_fn, x, y, "0")
    g = dense_grad(model, loss_fn, x, y, "0")
    expected = flat_params(model[0]) - lr * torch.linalg.solve(F + lam * torch.eye(len(g), dtype=DT), g)
    opt = cls(model, lr=lr, damping=lam, **EXACT)
    train_step(opt, model, loss_fn, x, y)
    torch.testing.assert_close(flat_params(model[0]), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [EKFAC, TEKFAC], ids=["EKFAC", "TEKFAC"])
def test_rescaling_uses_the_kfe_rotation(cls):
    """Step 0 fixes the basis Q from the batch's factors at θ0; step 1 (a scale step, no refresh,
    no averaging) must precondition with Q diag(s*)Qᵀ, s* = diag(Qᵀ F(θ1) Q) — the rotation
    U_outᵀ M U_in, not the transposed one of a widely copied EKFAC code."""
    torch.manual_seed(0)
    model, loss_fn = nn.Sequential(nn.Linear(3, 4)).to(DT), nn.CrossEntropyLoss()
    x, y = data(8, d_in=3, classes=4)
    lr, lam = 0.5, 1e-3
    opt = cls(model, lr=lr, damping=lam, **{**EXACT, "eigen_interval": 1000})
    layout = opt.blocks()[0].layout
    if cls is EKFAC:
        A, G = dense_kfac(model, loss_fn, x, y, 0)
    else:  # partial traces (δΦ input side, δΨ output side) of the exact block
        A, G = partial_traces(dense_ggn(model, loss_fn, x, y, "0"), layout)
    train_step(opt, model, loss_fn, x, y)  # step 0: refresh
    u_out, u_in = torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1]
    q = kron(u_out, u_in)  # row-major matrix order
    d_out, d_in = layout.shape
    f1 = to_matrix_order(dense_ggn(model, loss_fn, x, y, "0"), layout).reshape(d_out * d_in, -1)
    s_star = torch.diagonal(q.T @ f1 @ q)
    g1 = layout.to_matrix(dense_grad(model, loss_fn, x, y, "0")).flatten()
    direction = q @ ((q.T @ g1) / (s_star + lam))
    expected = layout.to_matrix(flat_params(model[0])).flatten() - lr * direction
    train_step(opt, model, loss_fn, x, y)  # step 1: s = s*(θ1) in the basis of θ0
    got = layout.to_matrix(flat_params(model[0])).flatten()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    s_opt = opt.approximations()["0"].eigenvalues()
    # s is in the optimizer's basis (eigenvector signs may differ; s does not depend on them)
    torch.testing.assert_close(s_opt.flatten(), s_star, rtol=1e-9, atol=1e-12)


def test_tkfac_equals_kfac_when_per_sample_traces_are_equal():
    """Equal ‖ā_n‖ and (MSE, one linear layer: constant output Hessian) equal Σ_c ‖g_nc‖²:
    TKFAC = KFAC (curvature-math §3), so with the same damping strategy the steps agree."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, generator=gen, dtype=DT)
    x = x / x.norm(dim=1, keepdim=True)  # ‖ā_n‖² = 1 + 1
    y = torch.randn(6, 3, generator=gen, dtype=DT)
    loss_fn = nn.MSELoss()
    settings = {**EXACT, "eigen_interval": 1}
    params, dense = [], []
    for cls in (KFAC, TKFAC):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3)).to(DT)
        opt = cls(model, lr=0.2, damping=1e-3, **settings)
        for _ in range(3):
            train_step(opt, model, loss_fn, x, y)
        params.append(flat_params(model[0]))
        dense.append(opt.approximations()["0"].to_dense())
    torch.testing.assert_close(params[0], params[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dense[0], dense[1], rtol=1e-10, atol=1e-12)


def test_tekfac_kfac_basis_equals_ekfac_after_a_rescaling():
    """basis="kfac" (ablation): same basis as EKFAC; after a rescaling without averaging both
    invert the same approximation (only the reset and the damping strategy could differ)."""
    x, y = data(8)
    loss_fn = nn.CrossEntropyLoss()
    settings = {**EXACT, "eigen_interval": 1000}
    models, opts = [], []
    for cls, kw in ((EKFAC, {}), (TEKFAC, {"basis": "kfac"})):
        model = tiny_mlp(0)
        opt = cls(model, lr=0.1, damping=1e-3, **settings, **kw)
        train_step(opt, model, loss_fn, x, y)
        models.append(model)
        opts.append(opt)
    models[1].load_state_dict(models[0].state_dict())  # same θ1 (step 0 differed: s reset)
    for opt, model in zip(opts, models):
        train_step(opt, model, loss_fn, x, y)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_under_train_mode_batchnorm_the_optimizers_objects_are_approximates(cls):
    """The report's objects (``approximate(extract(...))``) are the optimizer's from the same batch:
    under train-mode BatchNorm, EKFAC/TEKFAC took ``s*`` from the exact coupled block, the
    optimizers from the block their Kronecker statistics describe (traces 1.31 against 0.32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).to(DT).train()
    loss_fn, (x, y) = nn.CrossEntropyLoss(), data(6, d_in=6)
    opt = cls(model, lr=0.0, **{**EXACT, "stat_decay": 0.0, "eigen_interval": 2})
    for _ in range(2):  # a refresh, then the rescaling in its basis: both from this batch
        train_step(opt, model, loss_fn, x, y)
    stats = curvlab.extract(model, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"), kfac_flavours=("exact",))
    assert stats["0"].coupled
    name = {"kfac": "kflr"}.get(opt.method, opt.method)  # fisher="exact": KFAC's factors are KFLR's
    for layer, approx in opt.approximations().items():
        reference = curvlab.approximate(stats[layer], name).to_dense()
        torch.testing.assert_close(approx.to_dense(), reference, rtol=1e-10, atol=1e-12, msg=layer)


@pytest.mark.usefixtures("routes")
def test_approximations_are_what_the_step_inverts():
    """The direction of a step (no momentum, clipping or decay) is approx.inv_mat_mul(grad)."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(16)
    opt = TEKFAC(model, lr=0.1, stats_interval=1, scale_interval=1, eigen_interval=3,
                 momentum=0.0, kl_clip=None)
    for _ in range(4):
        train_step(opt, model, loss_fn, x, y)
    approx = opt.approximations()
    assert set(approx) == {"0", "2"}
    opt.zero_grad()
    loss_fn(model(x), y).backward()  # step 4: not a stats step, no track needed
    before = {n: torch.cat([m.weight.flatten(1), m.bias[:, None]], 1).detach().clone()
              for n, m in (("0", model[0]), ("2", model[2]))}
    grads = {n: torch.cat([m.weight.grad.flatten(1), m.bias.grad[:, None]], 1)
             for n, m in (("0", model[0]), ("2", model[2]))}
    opt.damping *= 3  # (a damping schedule: the next step inverts with it, between refreshes too)
    opt.step()
    for n, m in (("0", model[0]), ("2", model[2])):
        expected = before[n] - 0.1 * approx[n].inv_mat_mul(grads[n], opt.damping, opt.damping_strategy)
        torch.testing.assert_close(torch.cat([m.weight.flatten(1), m.bias[:, None]], 1), expected)
    assert opt.damping_strategy == DEFAULT_DAMPING["tekfac"] == "nor"


@pytest.mark.parametrize("cls", [KFAC, TEKFAC], ids=["KFAC", "TEKFAC"])
def test_transposed_convolutions_are_preconditioned_by_what_the_step_inverts(cls):
    """A transposed convolution's weight [C_in, C_out, *k] enters its block with its first two axes
    swapped: the step moves every layer, in flat order, by −lr·(K̂ + λ)⁻¹∇ of its block."""
    model, loss_fn = tiny_decoder(0), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 2, 3, 3, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen)
    opt = cls(model, lr=0.1, stats_interval=2, eigen_interval=2, momentum=0.0, kl_clip=None, factor_dtype="float64")
    for _ in range(3):
        train_step(opt, model, loss_fn, x, y)
    assert [(b.name, b.module_type) for b in opt.blocks()] == [
        ("0", "ConvTranspose2d"), ("2", "ConvTranspose2d"), ("4", "Linear")]
    approx = opt.approximations()
    opt.zero_grad()
    loss_fn(model(x), y).backward()  # step 3: not a statistics step
    before = {b.name: torch.cat([p.detach().flatten() for p in b.parameters()]) for b in opt.blocks()}
    grads = {b.name: torch.cat([p.grad.flatten() for p in b.parameters()]) for b in opt.blocks()}
    opt.step()
    for b in opt.blocks():
        layout = b.layout
        direction = layout.to_vector(approx[b.name].inv_mat_mul(layout.to_matrix(grads[b.name]), opt.damping,
                                                                opt.damping_strategy))
        after = torch.cat([p.detach().flatten() for p in b.parameters()])
        torch.testing.assert_close(after, before[b.name] - 0.1 * direction)


def test_a_damping_changed_between_refreshes_is_the_one_inverted():
    """KFAC keeps its damped inverse until its statistics change: a damping schedule (or a
    Levenberg–Marquardt rule) setting opt.damping between two refreshes takes effect at once."""
    model, loss_fn = softmax_regression(), nn.CrossEntropyLoss()
    x, y = data(8, d_in=4)
    opt = KFAC(model, lr=0.1, damping=1e-2, stats_interval=100, eigen_interval=100, momentum=0.0, kl_clip=None,
               factor_dtype="float64")
    train_step(opt, model, loss_fn, x, y)  # statistics and the inverse at damping 1e-2
    approx = opt.approximations()["0"]
    for damping in (1.0, 1e-2):
        opt.damping = damping
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        before, grad = model[0].weight.detach().clone(), model[0].weight.grad.clone()
        bias_grad = model[0].bias.grad.clone()
        opt.step()
        direction = approx.inv_mat_mul(torch.cat([grad, bias_grad[:, None]], 1), damping, opt.damping_strategy)
        torch.testing.assert_close(model[0].weight.detach(), before - 0.1 * direction[:, :-1])


@pytest.mark.parametrize("cls", [KFAC, TEKFAC], ids=["KFAC", "TEKFAC"])
def test_a_channels_last_model_takes_the_same_steps(cls):
    """Convolution weights in channels_last memory (a common GPU setting) are not views of their
    matrix form: the update is written through their own layout, the same steps as contiguous."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 2, 6, 6, generator=gen, dtype=DT), torch.randint(0, 3, (6,), generator=gen)
    params = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = tiny_cnn(0).to(memory_format=memory_format)
        assert model[0].weight.is_contiguous(memory_format=memory_format)
        opt = cls(model, lr=0.1, **{**EXACT, "momentum": 0.5})
        for _ in range(2):
            train_step(opt, model, nn.CrossEntropyLoss(), x.contiguous(memory_format=memory_format), y)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    # the two layouts' convolutions sum in different orders (by CPU: 1e-11 relative on an AVX2
    # EPYC, through TEKFAC's eigenbases); a wrongly written update differs at O(1)
    torch.testing.assert_close(params[1], params[0], rtol=1e-9, atol=1e-12)


def test_momentum_accumulates_the_preconditioned_directions():
    """Heavy-ball momentum on the preconditioned direction, torch's convention: the second of two
    steps moves by ``−lr (μ d₁ + d₂)``, ``d_i`` what step ``i`` inverted (``approximations()``
    after it) applied to its gradient (a coefficient 1 − μ passed every test but a training
    benchmark)."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    lr, mu = 0.1, 0.6
    opt = TEKFAC(model, lr=lr, momentum=mu, kl_clip=None, stats_interval=1, scale_interval=1, eigen_interval=3,
                 factor_dtype="float64")

    def matrix(m, grad=False):
        w, b = (m.weight.grad, m.bias.grad) if grad else (m.weight, m.bias)
        return torch.cat([w.flatten(1), b[:, None]], 1).detach().clone()

    directions, params = [], []
    for seed in (1, 2):
        x, y = data(16, seed=seed)
        params.append({n: matrix(model[int(n)]) for n in ("0", "2")})
        train_step(opt, model, loss_fn, x, y)
        approx = opt.approximations()
        directions.append({n: approx[n].inv_mat_mul(matrix(model[int(n)], grad=True), opt.damping,
                                                     opt.damping_strategy) for n in ("0", "2")})
    for n in ("0", "2"):
        moved = matrix(model[int(n)]) - params[1][n]
        torch.testing.assert_close(moved, -lr * (mu * directions[0][n] + directions[1][n]))


def test_kl_clipping():
    """ν = min(1, √(κ / (lr² Σ⟨∇̃, ∇⟩))) scales the preconditioned direction (lr ≠ 1, so that lr²
    and lr differ: a sum with lr passed every test but a training benchmark)."""
    model, loss_fn = softmax_regression(), nn.CrossEntropyLoss()
    x, y = data(4, d_in=4)
    ref = copy.deepcopy(model)
    lr, kappa = 0.3, 1e-6
    opt = TEKFAC(model, lr=lr, **{**EXACT, "kl_clip": kappa})
    opt_ref = TEKFAC(ref, lr=lr, **EXACT)
    train_step(opt_ref, ref, loss_fn, x, y)
    delta_ref = flat_params(ref[0]) - flat_params(model[0])
    g = dense_grad(model, loss_fn, x, y, "0")
    vg = lr**2 * (-(delta_ref / lr) @ g)
    nu = min(1.0, (kappa / vg).sqrt().item())
    assert nu < 1
    before = flat_params(model[0])
    train_step(opt, model, loss_fn, x, y)
    torch.testing.assert_close(flat_params(model[0]) - before, nu * delta_ref)


# ----------------------------------------------------------------------------- training


def test_tekfac_trains_digits_faster_than_sgd():
    """150 steps, batch 64, same seeds and batches.  SGD: momentum 0.9, best of lr 0.05/0.1/0.2
    (0.1–0.2 is the best range found by hand; 0.5 diverges partly).  TEKFAC: its defaults
    (intervals 10/100/10, kl_clip 1e-3) with lr 0.03, damping 1e-2 and momentum 0.9 — and with
    all its defaults (no momentum: with 0.9 the training loss ended at 0.24, three times SGD's)."""
    from curvlab.app.data import load_dataset
    from curvlab.app.models import build_model

    ds = load_dataset("digits", flatten=True)
    x, y = ds.train_x, ds.train_y
    loss_fn = nn.CrossEntropyLoss()

    def run(make, track: bool) -> float:
        torch.manual_seed(0)
        model = build_model("mlp", (64,), 10, hidden=(32,)).float()
        opt = make(model)
        gen = torch.Generator().manual_seed(1)
        for _ in range(150):
            idx = torch.randint(0, len(x), (64,), generator=gen)
            train_step(opt, model, loss_fn, x[idx], y[idx], use_track=track)
        with torch.no_grad():
            return loss_fn(model(x), y).item()

    sgd = min(
        run(lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), track=False)
        for lr in (0.05, 0.1, 0.2)
    )
    tekfac = run(lambda m: TEKFAC(m, lr=0.03, damping=1e-2, momentum=0.9), track=True)
    defaults = run(TEKFAC, track=True)
    initial = 2.3
    assert tekfac < 0.5 * sgd < initial, (tekfac, sgd)
    assert defaults < 0.5 * sgd, (defaults, sgd)


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_resume_is_bit_identical(cls):
    """k steps, save (optimizer, model, RNG), m steps; reload into fresh objects, m steps."""
    loss_fn = nn.CrossEntropyLoss()
    batches = [data(16, seed=s) for s in range(12)]
    settings = dict(lr=0.05, stats_interval=2, eigen_interval=4, scale_interval=3, weight_decay=1e-3)

    model = tiny_cnn(0) if cls is TEKFAC else tiny_mlp(0)
    if cls is TEKFAC:
        batches = [(torch.randn(16, 2, 6, 6, generator=torch.Generator().manual_seed(s), dtype=DT), y)
                   for s, (_, y) in enumerate(batches)]
    opt = cls(model, **settings)
    torch.manual_seed(123)
    for x, y in batches[:5]:
        train_step(opt, model, loss_fn, x, y)
    saved = copy.deepcopy((opt.state_dict(), model.state_dict(), torch.get_rng_state()))
    for x, y in batches[5:]:
        train_step(opt, model, loss_fn, x, y)

    model2 = tiny_cnn(7) if cls is TEKFAC else tiny_mlp(7)
    opt2 = cls(model2, **settings)
    opt2.load_state_dict(saved[0])
    model2.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    for x, y in batches[5:]:
        train_step(opt2, model2, loss_fn, x, y)
    assert opt2.steps_done == opt.steps_done == len(batches)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert_same_state(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("cls", [KFAC, TEKFAC], ids=["KFAC", "TEKFAC"])
def test_resume_with_a_frozen_layer_is_bit_identical(cls):
    """A state dict saved while a layer is frozen keeps that layer's state (the optimizer keeps
    it for when the layer is unfrozen); it loads into a fresh optimizer over the model frozen
    alike — it was refused, even by the optimizer that wrote it — and the run, unfreezing the
    layer later, continues bit for bit."""
    loss_fn = nn.CrossEntropyLoss()
    batches = [data(16, seed=s) for s in range(10)]
    settings = dict(lr=0.05, momentum=0.9, stats_interval=2, eigen_interval=4, scale_interval=3)

    def run(model, opt, part):
        for i, (x, y) in enumerate(batches[part], start=part.start or 0):
            model[0].requires_grad_(not 3 <= i < 7)  # frozen for steps 3–6
            train_step(opt, model, loss_fn, x, y)

    model = tiny_mlp(0)
    opt = cls(model, **settings)
    torch.manual_seed(123)
    run(model, opt, slice(0, 5))
    saved = copy.deepcopy((opt.state_dict(), model.state_dict(), torch.get_rng_state()))
    assert "0" in saved[0]["curvlab"]["blocks"] and "0" not in {b.name for b in opt.blocks()}
    opt.load_state_dict(saved[0])  # its own, while the layer is frozen
    run(model, opt, slice(5, None))

    model2 = tiny_mlp(7)
    model2.load_state_dict(saved[1])
    model2[0].requires_grad_(False)
    opt2 = cls(model2, **settings)
    opt2.load_state_dict(saved[0])
    torch.set_rng_state(saved[2])
    run(model2, opt2, slice(5, None))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert_same_state(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("frozen_until", [0, 3], ids=["before-any-step", "layer-frozen-until-saved"])
@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_a_state_dict_without_a_blocks_state_loads_and_that_block_starts_afresh(cls, frozen_until: int):
    """Saved before the first step (an epoch-0 checkpoint), or while a layer had never been
    trainable, it was refused by a fresh optimizer over the same model ("holds blocks [] … another
    model"); torch's optimizers load both.  The run continues bit for bit."""
    loss_fn = nn.CrossEntropyLoss()
    batches = [data(16, seed=s) for s in range(9)]
    settings = dict(lr=0.05, momentum=0.9, stats_interval=2, eigen_interval=4, scale_interval=3)

    def run(model, opt, part):
        for i, (x, y) in enumerate(batches[part], start=part.start or 0):
            model[0].requires_grad_(i >= frozen_until)
            train_step(opt, model, loss_fn, x, y)

    model = tiny_mlp(0)
    opt = cls(model, **settings)
    torch.manual_seed(123)
    run(model, opt, slice(0, frozen_until))
    saved = copy.deepcopy((opt.state_dict(), model.state_dict(), torch.get_rng_state()))
    assert "0" not in saved[0]["curvlab"]["blocks"]
    run(model, opt, slice(frozen_until, None))

    model2 = tiny_mlp(7)
    model2.load_state_dict(saved[1])
    opt2 = cls(model2, **settings)
    opt2.load_state_dict(saved[0])
    torch.set_rng_state(saved[2])
    run(model2, opt2, slice(frozen_until, None))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert_same_state(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_a_loaded_state_dict_is_not_changed_by_later_steps(cls):
    """load_state_dict copies, as torch's does: a checkpoint kept in memory (loaded, then trained
    on through a refresh) stays as it was — a refresh's in-place inversion wrote into it."""
    loss_fn = nn.CrossEntropyLoss()
    model = tiny_mlp(0)
    opt = cls(model, lr=0.05, stats_interval=1, eigen_interval=2, scale_interval=1)
    x, y = data(16)
    for _ in range(3):
        train_step(opt, model, loss_fn, x, y)
    checkpoint = copy.deepcopy(opt.state_dict())
    kept = copy.deepcopy(checkpoint)
    opt.load_state_dict(checkpoint)
    for _ in range(3):
        train_step(opt, model, loss_fn, x, y)
    assert_same_state(checkpoint, kept)


def test_state_dict_round_trips_through_a_weights_only_file(tmp_path):
    """Everything a step depends on is in state_dict(): saved with torch.save, read back with
    torch.load(weights_only=True) into a fresh optimizer, the approximations are equal and the
    next steps identical."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    settings = dict(lr=0.1, stats_interval=1, scale_interval=1, eigen_interval=2, fisher="exact")
    opt = TEKFAC(model, **settings)
    x, y = data(8)
    for _ in range(3):
        train_step(opt, model, loss_fn, x, y)
    model2, opt2 = reload_through_file(opt, model, lambda: tiny_mlp(5), lambda m: TEKFAC(m, **settings),
                                       tmp_path / "ckpt.pt")
    assert opt2.steps_done == 3
    for name, approx in opt.approximations().items():
        assert torch.equal(approx.to_dense(), opt2.approximations()[name].to_dense())
    for _ in range(2):
        train_step(opt, model, loss_fn, x, y)
        train_step(opt2, model2, loss_fn, x, y)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


LEGACY = {"kfac": (KFAC, "kfac"), "ekfac": (EKFAC, "ekfac"), "tkfac": (TKFAC, "tkfac"),
          "tekfac": (TEKFAC, "tekfac"), "tekfac-kfac": (TEKFAC, "tekfac-kfac")}


@pytest.mark.parametrize("name", list(LEGACY))
def test_loads_state_dicts_of_curvlab_0_1(name):
    """tests/data holds state dicts written by curvlab 0.1 (per-parameter keys), with the
    approximations that version inverted next and its parameters after one more step."""
    from pathlib import Path

    fixture = torch.load(Path(__file__).parent / "data" / f"optim_state_0.1_{name}.pt", weights_only=True)
    model = tiny_mlp(3)
    model.load_state_dict(fixture["model"])
    opt = LEGACY[name][0](model, **fixture["options"], factor_dtype="float64")  # 0.1 kept float64
    opt.load_state_dict(fixture["optimizer"])
    approx = opt.approximations()
    assert set(approx) == set(fixture["approximations"])
    for block, dense in fixture["approximations"].items():
        torch.testing.assert_close(approx[block].to_dense(), dense, rtol=1e-12, atol=1e-14)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen)) for _ in range(6)]
    torch.set_rng_state(fixture["rng"])
    train_step(opt, model, nn.CrossEntropyLoss(), *batches[4])
    for p, q in zip(model.parameters(), fixture["next_params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-14)


def test_state_dict_of_another_method_is_refused():
    model = tiny_mlp(0)
    opt = EKFAC(model, lr=0.1, stats_interval=1)
    x, y = data(8)
    train_step(opt, model, nn.CrossEntropyLoss(), x, y)
    with pytest.raises(ValueError, match="block '0'"):
        TKFAC(tiny_mlp(0), lr=0.1).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="blocks"):
        EKFAC(nn.Sequential(nn.Linear(5, 3)).double(), lr=0.1).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_a_state_saved_under_another_factor_dtype_is_held_in_this_ones(cls):
    """As torch's optimizers cast a loaded state to their parameters, a state saved under
    factor_dtype float32 and loaded by a float64 optimizer is held in float64 at once (the built
    approximation too, not only the running statistics until the next refresh), and back."""
    x, y = data(16)
    loss_fn = nn.CrossEntropyLoss()
    schedule = dict(stats_interval=1, eigen_interval=2, scale_interval=3)
    saved = {}
    for dtype in ("float32", "float64"):
        model = tiny_mlp(0)
        opt = cls(model, lr=0.1, factor_dtype=dtype, **schedule)
        for _ in range(3):
            train_step(opt, model, loss_fn, x, y)
        saved[dtype] = (model, opt)
    for dtype, other in (("float64", "float32"), ("float32", "float64")):
        model, opt = saved[other]
        loaded = cls(model, lr=0.1, factor_dtype=dtype, **schedule)
        loaded.load_state_dict(opt.state_dict())
        want = getattr(torch, dtype)
        held = {f"{name}.{k}": t.dtype for name, state in loaded.state_dict()["curvlab"]["blocks"].items()
                for k, t in state["curvature"].items() if t.is_floating_point()}
        assert held and all(d == want for d in held.values()), held
        for name, a in loaded.approximations().items():
            assert a.dtype == want
            torch.testing.assert_close(a.to_dense(), opt.approximations()[name].to_dense().to(want),
                                       rtol=1e-6, atol=1e-7)


def test_lr_scheduler_scales_the_update():
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    settings = dict(fisher="exact", momentum=0.0, kl_clip=None, stats_interval=1, scale_interval=1,
                    eigen_interval=100)
    opt = EKFAC(model, lr=0.1, **settings)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    train_step(opt, model, loss_fn, x, y)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    # a copy with the original lr, same state
    model_ref = copy.deepcopy(model)
    opt_ref = EKFAC(model_ref, lr=0.1, **settings)
    opt_ref.load_state_dict(opt.state_dict())
    for g in opt_ref.param_groups:
        g["lr"] = 0.1
    before = [p.detach().clone() for p in model.parameters()]
    train_step(opt, model, loss_fn, x, y)
    train_step(opt_ref, model_ref, loss_fn, x, y)
    for b, p, q in zip(before, model.parameters(), model_ref.parameters()):
        torch.testing.assert_close(p - b, 0.25 * (q - b))


def test_param_groups_and_unmanaged_layers():
    """Per-group lr; a layer whose weight is in no group is neither preconditioned nor updated."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    frozen = [p.detach().clone() for p in model[2].parameters()]
    opt = TEKFAC(model, [{"params": model[0].parameters(), "lr": 0.05}], lr=1.0)
    assert [b.name for b in opt.blocks()] == ["0"]
    for _ in range(3):
        train_step(opt, model, loss_fn, x, y)
    for p, q in zip(model[2].parameters(), frozen):
        assert torch.equal(p, q)
    assert set(opt.approximations()) == {"0"}


def test_parameters_outside_the_model_get_sgd_and_are_named():
    """A loss's temperature in a group of its own takes SGD's step; ``KFAC(model_a,
    model_b.parameters())`` trained model_b with SGD without a word (QA17): both named."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    temperature = nn.Parameter(torch.ones((), dtype=DT))
    opt = KFAC(model, [{"params": model.parameters()}, {"params": [temperature]}], lr=0.1, stats_interval=1)
    with pytest.warns(UserWarning, match=r"KFAC: 1 parameter\(s\) .* not parameters of the model the optimizer was "
                                         r"given .*: \['param group 1: tensor 0 \(\)'\]"):
        assert [b.name for b in opt.blocks()] == ["0", "2"]
    opt.zero_grad()
    with opt.track(loss_fn):
        loss_fn(model(x) / temperature, y).backward()
    step = -0.1 * temperature.grad
    before = temperature.detach().clone()
    opt.step()
    torch.testing.assert_close(temperature.detach() - before, step)
    with pytest.warns(UserWarning, match=r"KFAC: 4 parameter\(s\) .*: \['param group 0: tensor 0 \(4, 5\)'"):
        assert KFAC(model, tiny_mlp(1).parameters()).blocks() == []


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_weight_and_bias_in_groups_of_their_own(cls):
    """The preconditioned update of one block, its weight and bias columns each with their own
    group's lr, weight decay and momentum (no decay, a larger lr and no momentum on the bias):
    two steps against the dense damped natural gradient of each."""
    model, loss_fn = softmax_regression(), nn.CrossEntropyLoss()
    x, y = data(1, d_in=4)
    lam = 1e-2
    lr = torch.tensor([0.3] * 12 + [1.0] * 3, dtype=DT)
    wd = torch.tensor([0.5] * 12 + [0.0] * 3, dtype=DT)
    mu = torch.tensor([0.9] * 12 + [0.0] * 3, dtype=DT)
    settings = {**EXACT, "momentum": 0.7, "weight_decay": 0.2}  # the defaults, overridden by both groups
    def make(net: nn.Module):
        return cls(net, [{"params": [net[0].weight], "lr": 0.3, "weight_decay": 0.5, "momentum": 0.9},
                         {"params": [net[0].bias], "lr": 1.0, "weight_decay": 0.0, "momentum": 0.0}],
                   lr=0.1, damping=lam, **settings)

    opt = make(model)
    buffer = torch.zeros(15, dtype=DT)
    for _ in range(2):
        theta = flat_params(model[0])
        F = dense_ggn(model, loss_fn, x, y, "0")
        g = dense_grad(model, loss_fn, x, y, "0")
        buffer = mu * buffer + torch.linalg.solve(F + lam * torch.eye(15, dtype=DT), g) + wd * theta
        train_step(opt, model, loss_fn, x, y)
        torch.testing.assert_close(flat_params(model[0]), theta - lr * buffer, rtol=1e-10, atol=1e-12)
    # the state, momentum included, saves and loads (the bias's column has none)
    copy_opt = make(copy.deepcopy(model))
    copy_opt.load_state_dict(opt.state_dict())
    assert_same_state(copy_opt.state_dict()["curvlab"], opt.state_dict()["curvlab"])


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_kl_clipping_weighs_each_column_block_by_its_own_lr(cls):
    """KL clipping of a block whose weight and bias are in groups with different lrs:
    ``ν = min(1, √(κ / Σ_i lr_i² ⟨∇̃_i, ∇_i⟩))`` over its column blocks ``i``, against the dense
    damped natural gradient (one example: every approximation is exact)."""
    model, loss_fn = softmax_regression(), nn.CrossEntropyLoss()
    x, y = data(1, d_in=4)
    lam, kappa = 1e-2, 1e-4
    lr = torch.tensor([0.3] * 12 + [2.0] * 3, dtype=DT)
    opt = cls(model, [{"params": [model[0].weight], "lr": 0.3}, {"params": [model[0].bias], "lr": 2.0}],
              lr=0.1, damping=lam, **{**EXACT, "kl_clip": kappa})
    F = dense_ggn(model, loss_fn, x, y, "0")
    g = dense_grad(model, loss_fn, x, y, "0")
    d = torch.linalg.solve(F + lam * torch.eye(15, dtype=DT), g)
    nu = min(1.0, math.sqrt(kappa / float((lr**2 * d * g).sum())))
    assert nu < min(1.0, math.sqrt(kappa / float(0.3**2 * d @ g)))  # the bias's own lr counts
    before = flat_params(model[0])
    train_step(opt, model, loss_fn, x, y)
    torch.testing.assert_close(flat_params(model[0]) - before, -nu * lr * d, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_a_compiled_forward_takes_the_eager_steps(fisher: str):
    """The user's forward compiled (torch.compile, AOTAutograd: a compiled backward), the
    optimizer given the model: the exact flavour's VJPs over the columns cannot be vmapped
    there (a RuntimeError from torch), so they run one by one — the same steps."""
    x, y = data(8)
    result = []
    for compiled in (False, True):
        model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        opt = TEKFAC(model, lr=0.1, **{**EXACT, "fisher": fisher})
        for _ in range(2):
            opt.zero_grad()
            with opt.track(loss_fn):
                loss_fn(forward(x), y).backward()
            opt.step()
        result.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(result[1], result[0], rtol=1e-12, atol=1e-14)


def test_an_optimizer_given_the_compiled_model_names_its_blocks_as_the_model_does():
    """``KFAC(torch.compile(model))`` named its blocks ``_orig_mod.0``…: its state dict did not
    load into an optimizer of the model itself (QA17); unwrapped as DDP's ``module.`` is."""
    x, y = data(8)
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    compiled = torch.compile(model, backend="eager")
    opt = KFAC(compiled, lr=0.1, stats_interval=1)
    train_step(opt, compiled, loss_fn, x, y)
    plain = KFAC(model, lr=0.1, stats_interval=1)
    assert [b.name for b in opt.blocks()] == [b.name for b in plain.blocks()] == ["0", "2"]
    plain.load_state_dict(opt.state_dict())
    assert plain.steps_done == 1


def test_a_compiled_resnet_takes_the_eager_steps():
    """A ResNet compiled as inductor partitions it (min-cut, donated buffers) refused the
    statistics' vjps, which run before the user's backward; the autograd engine now has such
    models compiled without donated buffers and with guards on its hooks — the eager steps.
    Two of ResNet-18's BasicBlocks, the second with its strided shortcut, are enough to be
    refused without that setting (and compile in a third of ResNet-18's time)."""
    from curvlab.app.models.architectures import BasicBlock

    x, y = torch.randn(4, 3, 8, 8, dtype=DT), torch.randint(0, 5, (4,))
    result = []
    for compiled in (False, True):
        torch.manual_seed(0)
        shortcut = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                              BasicBlock(4, 4), BasicBlock(4, 8, 2, shortcut),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).to(DT).train()
        loss_fn = nn.CrossEntropyLoss()
        forward = torch.compile(model, backend="aot_eager_decomp_partition") if compiled else model
        opt = KFAC(model, lr=0.1, fisher="exact", stats_interval=1, factor_dtype="float64")
        for _ in range(2):
            train_step(opt, forward, loss_fn, x, y)
        result.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(result[1], result[0], rtol=1e-10, atol=1e-12)


def test_a_compiled_model_runs_the_recording_hooks_outside_its_graph():
    """Traced by dynamo, the recording's hooks guarded their list of calls: each layer's call of a
    12-layer model recompiled them, past dynamo's limit of 8 (a warning naming curvlab's
    recording.py, 6 s of the first step).  They now run outside the graph, and under
    ``fullgraph=True`` torch's refusal says why."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(8, 8), nn.Tanh())], nn.Linear(8, 3))
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    opt = KFAC(model, lr=0.1, stats_interval=1)
    forward = torch.compile(model, backend="eager")
    for _ in range(2):
        train_step(opt, forward, nn.CrossEntropyLoss(), x, y)
    assert not [k for k in counters["unimplemented"] if "recompile limit" in k.lower()], dict(counters["unimplemented"])
    torch._dynamo.reset()
    strict = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception, match=r"curvlab's statistics record .* compile without fullgraph=True"):
        train_step(opt, strict, nn.CrossEntropyLoss(), x, y)


class TwoHeads(nn.Module):
    """A body and two heads: the loss's and an auxiliary one (deep supervision)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h), self.aux(h)


def test_a_sum_of_losses_through_the_tracked_loss_names_the_fix_that_works():
    """Deep supervision through the tracked loss instance was refused in ExtractionSession's and
    micro-batches' words (QA13); the message gives the fix, and the fix trains: the other term
    through another instance, the head only it reaches given the first-order update."""
    torch.manual_seed(0)
    model = TwoHeads()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    ce, aux = nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    opt = KFAC(model, lr=0.1, stats_interval=1)
    with pytest.raises(RuntimeError, match=r"called twice inside one `with opt.track\(loss_fn\)`.* another loss instance"):
        with opt.track(ce):
            main, side = model(x)
            (ce(main, y) + ce(side, y)).backward()
    opt.zero_grad()
    before = model.aux.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match=r"no curvature statistics yet for \['aux'\]"):
        with opt.track(ce):
            main, side = model(x)
            (ce(main, y) + 0.3 * aux(side, y)).backward()
        opt.step()
    assert not torch.equal(model.aux.weight, before)


def test_a_model_compiled_without_the_hooks_is_named(monkeypatch):
    """A compiled model whose first call ran outside `opt.track` (torch's default: no guards on
    module hooks) never runs the extraction's hooks: a clear error, not a tied-weight one."""
    import torch._dynamo

    torch._dynamo.reset()  # no code compiled by earlier tests, whose guards would see the hooks
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    forward = torch.compile(model, backend="aot_eager")
    forward(x)  # e.g. a warm-up
    opt = KFAC(model, lr=0.1)
    with pytest.raises(Exception, match=r"no layer's hooks ran, yet 0.weight reaches it: .* or a torch.compile'd model"):
        train_step(opt, forward, loss_fn, x, y)


def test_a_forward_pass_before_opt_track_is_named() -> None:
    """The output computed before the block, the loss inside it: the error blamed F.linear, tied
    embeddings or torch.compile."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    opt = KFAC(model, lr=0.1, stats_interval=1)
    out = model(x)
    with pytest.raises(Exception, match=r"the model was called before `opt.track` .* call it inside the block"):
        with opt.track(loss_fn):
            loss_fn(out, y).backward()


@pytest.mark.parametrize("cls", [KFAC, TEKFAC], ids=["KFAC", "TEKFAC"])
def test_a_layer_unused_on_some_steps_keeps_its_state(cls):
    """An auxiliary head the forward uses on even steps only: on the other steps its statistics
    and parameters stay as they were (no gradient: as torch's optimizers leave it) — a
    statistics step raised, asking to freeze it — and on its steps it is updated again."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.aux = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x, use_aux):
            h = torch.tanh(self.body(x))
            return self.head(h) + (self.aux(h) if use_aux else 0)

    torch.manual_seed(0)
    model, loss_fn = Net().to(DT), nn.CrossEntropyLoss()
    opt = cls(model, lr=0.1, momentum=0.9, stats_interval=1, eigen_interval=2, scale_interval=1)
    x, y = data(16)
    for step in range(4):
        use_aux = step % 2 == 0
        before = copy.deepcopy((opt.state_dict()["curvlab"]["blocks"].get("aux"), model.aux.state_dict()))
        opt.zero_grad()
        with opt.track(loss_fn):
            loss_fn(model(x, use_aux), y).backward()
        opt.step()
        after = (opt.state_dict()["curvlab"]["blocks"]["aux"], model.aux.state_dict())
        assert torch.equal(after[1]["weight"], before[1]["weight"]) != use_aux, step
        if step:
            state_same = all(torch.equal(v, before[0]["curvature"][k]) for k, v in after[0]["curvature"].items())
            assert state_same != use_aux, step


@pytest.mark.parametrize("cls", ALL, ids=IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_micro_batches_accumulate_into_the_batch_statistics(cls, reduction):
    """One `track` block per micro-batch before one step() (gradient accumulation; unequal
    micro-batches, the loss scaled so that the gradients add up to the batch's): the steps, the
    statistics and the approximations are those of the whole batch in one pass — only the last
    micro-batch's were kept.  The first layer's 12-wide input factor, from 6 and 10 examples, is
    kept as rows on the way (the optimizers' GramRows); from all 16 it has full rank (else the
    eigenbasis of its null space would be arbitrary, and so EKFAC's rescaling there)."""
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(16, 11, generator=gen, dtype=DT), torch.randint(0, 3, (16,), generator=gen)) for _ in range(3)]
    settings = dict(lr=0.1, fisher="exact", factor_dtype="float64", stats_interval=1, eigen_interval=2, scale_interval=1)
    runs = []
    for micro in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(11, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
        opt = cls(model, **settings)
        for x, y in batches:
            opt.zero_grad()
            parts = [(x[:6], y[:6]), (x[6:], y[6:])] if micro else [(x, y)]
            for xb, yb in parts:
                with opt.track(loss_fn):
                    scale = 1.0 if reduction == "sum" else len(xb) / len(x)
                    (scale * loss_fn(input=model(xb), target=yb)).backward()  # by keyword too
            opt.step()
        runs.append((model, opt))
    (model, opt), (model2, opt2) = runs
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    for name, approx in opt.approximations().items():
        torch.testing.assert_close(opt2.approximations()[name].to_dense(), approx.to_dense(), rtol=1e-9, atol=1e-12)


def test_a_layer_never_called_does_not_make_every_step_a_statistics_step():
    """A trainable head the forward never calls has no statistics; the steps still collect them
    every stats_interval steps only (it made every step a statistics step, three times the cost)."""
    model, loss_fn = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 3)).to(DT), nn.CrossEntropyLoss()
    x, y = data(8)
    opt = KFAC(model, lr=0.1, stats_interval=3)
    seen = []
    for _ in range(7):
        opt.zero_grad()
        with opt.track(loss_fn):
            loss = loss_fn(model[0](x), y)  # model[1] never called
            seen.append(bool(model[0]._forward_hooks))
            loss.backward()
        opt.step()
    assert seen == [k % 3 == 0 for k in range(7)]
    assert set(opt.approximations()) == {"0"}
    again = KFAC(model, lr=0.1, stats_interval=3)  # a resume keeps the schedule
    again.load_state_dict(opt.state_dict())
    with again.track(loss_fn):
        loss_fn(model[0](x), y).backward()
        assert not model[0]._forward_hooks  # step 7: no statistics


@pytest.mark.parametrize("outside", ["none", "after", "before", "no zero_grad"])
def test_a_backward_outside_the_track_blocks_of_a_statistics_step_is_warned_of_once(outside):
    """Gradient accumulation with one micro-batch's backward outside its track block: its
    examples were in the step's gradient and not in the statistics, without a word — after the
    block (an accumulation into the gradients), before it, or gradients left from the last step."""
    x, y = data(16)
    loss_fn = nn.CrossEntropyLoss()
    model = tiny_mlp(0)
    opt = KFAC(model, lr=0.01, stats_interval=1)
    told = []
    for _ in range(3):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if outside != "no zero_grad":
                opt.zero_grad()
            if outside == "before":
                loss_fn(model(x[8:]), y[8:]).backward()
            with opt.track(loss_fn):
                loss_fn(model(x[:8]), y[:8]).backward()
            with opt.track(loss_fn) if outside != "after" else contextlib.nullcontext():
                loss_fn(model(x[8:]), y[8:]).backward()
            opt.step()
        told += [str(w.message) for w in seen if "a statistics step" in str(w.message)]
    if outside == "none":
        assert not told
    else:
        what = {"after": "accumulated a backward pass outside", "before": "held gradients before its first",
                "no zero_grad": "held gradients before its first"}[outside]
        step = 1 if outside == "no zero_grad" else 0  # (the first step's gradients are its own)
        assert len(told) == 1 and what in told[0] and f"step {step}, a statistics step" in told[0], told


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_micro_batches_of_other_sequence_lengths_weigh_by_their_inputs(kfac_approx):
    """Micro-batches of sequences of 10 and 2 tokens: the accumulated input factor is the average
    over all 24 token positions (expand) or over all 4 examples' mean tokens (reduce) — weighing
    by examples gave the long sequences' tokens the short ones' weight."""
    torch.manual_seed(0)
    model, loss_fn = nn.Linear(3, 4).to(DT), nn.MSELoss()
    xs = [torch.randn(2, 10, 3, dtype=DT), torch.randn(2, 2, 3, dtype=DT)]
    opt = KFAC(model, lr=0.1, stat_decay=0.0, stats_interval=1, fisher="exact", factor_dtype="float64",
               kfac_approx=kfac_approx)
    opt.zero_grad()
    for x in xs:
        with opt.track(loss_fn):
            loss_fn(model(x), torch.randn(*x.shape[:2], 4, dtype=DT)).backward()
    opt.step()
    ones = lambda x: torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=DT)], -1)
    rows = torch.cat([ones(x).reshape(-1, 4) if kfac_approx == "expand" else ones(x).mean(1) for x in xs])
    a = opt.state_dict()["curvlab"]["blocks"][""]["curvature"]["A"]
    torch.testing.assert_close(a, rows.T @ rows / len(rows), rtol=1e-12, atol=1e-14)


ZEROS = {
    "opt.zero_grad()": lambda model, opt: opt.zero_grad(),
    "model.zero_grad()": lambda model, opt: model.zero_grad(),
    "model.zero_grad(set_to_none=False)": lambda model, opt: model.zero_grad(set_to_none=False),
}


@pytest.mark.parametrize("zero", ZEROS)
def test_statistics_no_step_used_are_dropped_by_zero_grad(zero: str):
    """A step skipped (a GradScaler's, on inf gradients) leaves its pass's statistics behind;
    the next zero_grad() drops them, as it drops the gradients: the next step's statistics are
    its own batch's (they were combined with the skipped batch's), as with loss_fn called by
    keyword (whose micro-batches were dropped) — also the model's zero_grad(), which the
    optimizer does not see (its gradients are gone: the statistics go with them)."""
    loss_fn = nn.CrossEntropyLoss()
    (xa, ya), (xb, yb) = data(8, seed=1), data(8, seed=2)
    runs = []
    for skipped in (False, True):
        model = tiny_mlp(0)
        opt = KFAC(model, lr=0.1, stat_decay=0.0, stats_interval=1, fisher="exact", factor_dtype="float64")
        if skipped:
            with opt.track(loss_fn):
                loss_fn(model(xa), ya).backward()
        ZEROS[zero](model, opt)
        with opt.track(loss_fn):
            loss_fn(input=model(xb), target=yb).backward()
        opt.step()
        runs.append(opt.state_dict()["curvlab"]["blocks"])
    for name, block in runs[0].items():
        for key, value in block["curvature"].items():
            torch.testing.assert_close(runs[1][name]["curvature"][key], value, rtol=0, atol=0)


def test_a_head_of_another_loss_takes_the_first_order_step():
    """A head trained by a second loss instance that `track` does not see: its output never
    reaches the tracked loss, so its block would be zero and its preconditioned step 1/damping
    times too large (90× here, silently); it takes SGD's step instead, and the extraction names
    it where a zero block would be returned."""
    torch.manual_seed(0)
    model, loss_fn, aux_loss = TwoHeads().to(DT), nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    x, y = data(16)
    opt = KFAC(model, lr=0.1, momentum=0.0, stats_interval=1)
    for _ in range(2):
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no curvature statistics yet" for the aux head
            with opt.track(loss_fn):
                out, aux = model(x)
                (loss_fn(out, y) + 0.4 * aux_loss(aux, y)).backward()
            before = model.aux.weight.detach().clone()
            opt.step()
        torch.testing.assert_close(model.aux.weight.detach(), before - 0.1 * model.aux.weight.grad, rtol=0, atol=1e-15)
    assert set(opt.approximations()) == {"body", "head"}
    from curvlab.extract import ExtractionSession

    with pytest.raises(ValueError, match=r"the outputs of \['aux'\] do not reach the loss"):
        with ExtractionSession(model, loss_fn, engine="autograd", stats=("kfac",)) as session:
            out, aux = model(x)
            (loss_fn(out, y) + aux_loss(aux, y)).backward()
        session.results()


def test_a_layer_unfrozen_mid_run_is_preconditioned():
    """Its block was found once, at the first step, and the layer kept the first-order update."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    model[0].requires_grad_(False)
    opt = KFAC(model, lr=0.1, stats_interval=1)
    train_step(opt, model, loss_fn, x, y)
    assert set(opt.approximations()) == {"2"}
    model[0].requires_grad_(True)
    train_step(opt, model, loss_fn, x, y)
    assert set(opt.approximations()) == {"0", "2"}
    model[2].requires_grad_(False)
    train_step(opt, model, loss_fn, x, y)
    assert [b.name for b in opt.blocks()] == ["0"]


@pytest.mark.parametrize("cls", [KFAC, TEKFAC])
def test_a_bias_frozen_or_unfrozen_mid_run_restarts_its_block(cls):
    """The block's matrix form loses or regains its bias column: its running statistics (of the
    old width) made the next statistics step fail."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    opt = cls(model, lr=0.1, stats_interval=1)
    for _ in range(2):
        train_step(opt, model, loss_fn, x, y)
    bias = model[0].bias.detach().clone()
    model[0].bias.requires_grad_(False)
    train_step(opt, model, loss_fn, x, y)
    assert torch.equal(model[0].bias, bias)
    assert opt.approximations()["0"].layout.shape == (4, 5)  # the weight's columns only
    restored = cls(model, lr=0.1, stats_interval=1)
    restored.load_state_dict(opt.state_dict())
    model[0].bias.requires_grad_(True)
    train_step(opt, model, loss_fn, x, y)
    assert opt.approximations()["0"].layout.shape == (4, 6)


@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_a_loss_not_computed_by_the_tracked_loss_fn_is_named(engine: str):
    """Another instance or ``F.cross_entropy`` inside ``track``: BackPACK's hooks failed with an
    AssertionError of their own, the autograd engine named ExtractionSession."""
    model, x, y = tiny_mlp(0), *data(8)
    opt = KFAC(model, lr=0.1, stats_interval=1, engine=engine)
    with pytest.raises(Exception) as failed:
        with opt.track(nn.CrossEntropyLoss()):
            nn.functional.cross_entropy(model(x), y).backward()
    said = "\n".join([str(failed.value), *getattr(failed.value, "__notes__", [])])
    assert "KFAC: loss_fn was not called inside `with opt.track(loss_fn):`" in said
    train_step(opt, model, nn.CrossEntropyLoss(), x, y)  # the next, right, step runs
    assert opt.steps_done == 1


@pytest.mark.parametrize("engine", ["auto", "autograd"])
def test_a_backward_outside_track_is_named(engine: str):
    """The loss computed inside ``track`` and its backward run after the block: the error named
    ExtractionSession, which the user never opened."""
    model, loss_fn, (x, y) = tiny_mlp(0), nn.CrossEntropyLoss(), data(8)
    opt = KFAC(model, lr=0.1, stats_interval=1, engine=engine)
    with pytest.raises(RuntimeError, match=r"KFAC: no backward pass .* inside `with opt.track\(loss_fn\):`"):
        with opt.track(loss_fn):
            loss = loss_fn(model(x), y)
    loss.backward()
    opt.zero_grad()
    train_step(opt, model, loss_fn, x, y)  # the next, right, step runs
    assert opt.steps_done == 1


def test_an_optimizer_is_not_copied_or_pickled_into_a_broken_one():
    """torch's ``__getstate__`` keeps defaults, state and param groups: a deepcopy, a pickle or a
    ``torch.save(opt)`` gave, without a word, an optimizer without its model, options and
    curvature state that failed at its first step.  Refused, saying what to save instead."""
    import pickle

    opt = KFAC(tiny_mlp(0), lr=0.1)
    for copier in (copy.deepcopy, copy.copy, pickle.dumps):
        with pytest.raises(TypeError, match=r"^KFAC cannot be copied or pickled: .*opt\.state_dict\(\)"):
            copier(opt)


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_a_layer_replaced_at_the_same_path_starts_from_its_own_state(cls):
    """Fine-tuning a new head: ``model[2] = nn.Linear(...)`` given by ``add_param_group``.  Its
    state was looked up by its path: its first step took 0.9 × the old head's momentum (and the
    old head's statistics).  Now it starts afresh, as torch's optimizers start a new parameter:
    its step is a fresh optimizer's on the same model and batch."""
    loss_fn = nn.CrossEntropyLoss()
    options = dict(lr=0.1, momentum=0.9, stats_interval=1, kl_clip=None, factor_dtype="float64", fisher="exact")
    model = tiny_mlp(0)
    opt = cls(model, **options)
    for seed in range(3):
        train_step(opt, model, loss_fn, *data(8, seed=seed))
    torch.manual_seed(7)
    model[2] = nn.Linear(4, 3).double()
    opt.add_param_group({"params": list(model[2].parameters())})
    fresh_model = copy.deepcopy(model)
    fresh = cls(fresh_model, **options)
    x, y = data(8, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EKFAC/TEKFAC: the interval warnings
        train_step(opt, model, loss_fn, x, y)
        train_step(fresh, fresh_model, loss_fn, x, y)
    torch.testing.assert_close(flat_params(model[2]), flat_params(fresh_model[2]), rtol=0, atol=1e-12)


def test_a_torch_optimizers_state_dict_is_refused_naming_the_block():
    """``torch.optim.SGD(momentum=0.9)``'s state dict, whose momentum buffers are the weight's
    alone, failed deep in the block layout without naming the optimizer or the block."""
    loss_fn = nn.CrossEntropyLoss()
    model = tiny_mlp(0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_step(sgd, model, loss_fn, *data(8), use_track=False)
    with pytest.raises(ValueError, match=r"^KFAC.load_state_dict: block '0': .*another method or optimizer"):
        KFAC(model, lr=0.1, momentum=0.9).load_state_dict(sgd.state_dict())


def test_zero_grad_clears_the_groups_gradients_only():
    """``zero_grad()`` drops every grouped parameter's gradient (``set_to_none=False``: zeros,
    as torch's), and leaves a parameter in no group alone."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    opt = KFAC(model, [{"params": model[0].parameters()}], lr=0.1)
    loss_fn(model(x), y).backward()
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model[0].parameters())
    loss_fn(model(x), y).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model[0].parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model[2].parameters())


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("where", ["grad", "input"])
def test_non_finite_step_is_skipped(where):
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    opt = TEKFAC(model, lr=0.1, stats_interval=1, scale_interval=1, eigen_interval=2)
    for _ in range(3):
        train_step(opt, model, loss_fn, x, y)
    state = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    xb = x.clone()
    if where == "input":
        xb[0, 0] = float("nan")
    # a NaN input gives NaN statistics: the backward completes (every rank of a data-parallel
    # run must finish it) and the step below is skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.track(loss_fn):
            loss_fn(model(xb), y).backward()
    if where == "grad":
        model[2].weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    assert_same_state(opt.state_dict(), state)
    train_step(opt, model, loss_fn, x, y)  # and it goes on
    assert opt.steps_done == 4


@pytest.mark.filterwarnings("ignore:KFAC. no curvature statistics yet")
def test_a_skipped_first_order_step_leaves_the_momentum_as_it_was():
    """Before its first statistics a layer takes SGD's step with heavy-ball momentum: a step
    skipped for an inf gradient leaves that momentum too (torch.optim.SGD, not given the step,
    is the reference); an inf written into it would refuse every later step."""
    model, loss_fn = softmax_regression(), nn.CrossEntropyLoss()
    ref = copy.deepcopy(model)
    x, y = data(8, d_in=4)
    opt, sgd = KFAC(model, lr=0.1, momentum=0.9), torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        for net, o in ((model, opt), (ref, sgd)):
            o.zero_grad()
            loss_fn(net(x), y).backward()  # no track: no statistics, the first-order update
            if step == 1 and o is opt:
                net[0].weight.grad[0, 0] = float("inf")
                with pytest.warns(RuntimeWarning, match="non-finite"):
                    o.step()
            elif step != 1:
                o.step()
    assert opt.steps_done == 3
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_closure_with_non_finite_loss_is_skipped():
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    opt = KFAC(model, lr=0.1)

    def closure():
        opt.zero_grad()
        with opt.track(loss_fn):
            loss = loss_fn(model(x), y)
            loss.backward()
        return loss * float("inf")

    params = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    assert opt.steps_done == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_a_streak_of_skipped_steps_warns_once():
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    bad = x.clone()
    bad[0, 0] = float("nan")
    opt = KFAC(model, lr=0.1, stats_interval=1)

    def steps(xb: torch.Tensor, n: int) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                train_step(opt, model, loss_fn, xb, y)
        return sum("non-finite" in str(w.message) or "not finite" in str(w.message) for w in caught)

    assert steps(bad, 5) == 1  # the skipped step, once
    assert opt.steps_done == 0
    assert steps(x, 1) == 0 and opt.steps_done == 1
    assert steps(bad, 3) == 1  # a new streak warns again


@pytest.mark.parametrize("engine", ["backpack", "autograd"])
def test_no_extraction_outside_statistics_steps(engine):
    """Only statistics steps attach the extraction — BackPACK's hooks store every module's input
    (``input0``) during the forward pass, the autograd engine registers forward hooks on the
    layers; other steps leave the model untouched."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    opt = TEKFAC(model, lr=0.1, stats_interval=3, scale_interval=3, eigen_interval=6, engine=engine)
    layers = [m for m in model if isinstance(m, nn.Linear)]

    def attached() -> bool:
        if engine == "backpack":
            return all(hasattr(m, "input0") for m in model if not isinstance(m, nn.Sequential))
        return all(m._forward_hooks for m in layers)

    seen = []
    for k in range(7):
        opt.zero_grad()
        with opt.track(loss_fn):
            loss = loss_fn(model(x), y)
            seen.append(attached())
            loss.backward()
        opt.step()
        assert not any(hasattr(m, "input0") or m._forward_hooks or m._backward_hooks for m in model.modules())
    assert seen == [k % 3 == 0 for k in range(7)]


def test_step_without_track_falls_back_to_sgd_and_warns_once():
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    ref = copy.deepcopy(model)
    x, y = data(8)
    opt = TEKFAC(model, lr=0.1, momentum=0.5, weight_decay=1e-2)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5, weight_decay=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            train_step(opt, model, loss_fn, x, y, use_track=False)
            train_step(sgd, ref, loss_fn, x, y, use_track=False)
    assert sum("no curvature statistics yet" in str(w.message) for w in caught) == 1
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    train_step(opt, model, loss_fn, x, y)  # statistics as soon as track is used
    assert set(opt.approximations()) == {"0", "2"}


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_a_step_before_any_backward_is_no_step(cls):
    """``step()`` with no gradient at all changes nothing and is not counted: the steps after it
    (statistics and refreshes on their schedule) are those of a run without it."""
    x, y = data(8)
    runs = []
    for idle_first in (False, True):
        model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
        opt = cls(model, lr=0.1, damping=1e-2, stats_interval=2, eigen_interval=3, **({"scale_interval": 1} if cls in (EKFAC, TEKFAC) else {}))
        if idle_first:
            before = torch.nn.utils.parameters_to_vector(model.parameters()).clone()
            opt.step()
            assert opt.steps_done == 0 and torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), before)
        for _ in range(5):
            train_step(opt, model, loss_fn, x, y)
        runs.append(torch.nn.utils.parameters_to_vector(model.parameters()))
    assert torch.equal(runs[0], runs[1])


def test_unsupported_layer_parameters_get_sgd():
    """An eval-mode BatchNorm1d (BackPACK passes through it): torch SGD with momentum and wd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    model[1].eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(8)
    lr, mu, wd = 0.1, 0.9, 1e-2
    opt = TEKFAC(model, lr=lr, momentum=mu, weight_decay=wd, stats_interval=1)
    assert [b.name for b in opt.blocks()] == ["0", "3"]
    bn = list(model[1].parameters())
    p0 = [p.detach().clone() for p in bn]
    train_step(opt, model, loss_fn, x, y)
    g1 = [p.grad.clone() for p in bn]
    buf = [g + wd * p for g, p in zip(g1, p0)]
    p1 = [p - lr * b for p, b in zip(p0, buf)]
    for p, q in zip(bn, p1):
        torch.testing.assert_close(p.detach(), q)
    train_step(opt, model, loss_fn, x, y)
    g2 = [p.grad.clone() for p in bn]
    buf = [mu * b + g + wd * p for b, g, p in zip(buf, g2, p1)]
    for p, q, b in zip(bn, p1, buf):
        torch.testing.assert_close(p.detach(), q - lr * b)
    assert set(opt.approximations()) == {"0", "3"}


@pytest.mark.parametrize("factor_dtype", ["float32", "float64"])
def test_failed_eigh_is_retried_with_jitter(monkeypatch, factor_dtype):
    """When torch's eigh fails on a factor, the refresh retries it once with a small jitter
    (in either factor dtype)."""
    calls = []
    real = torch.linalg.eigh

    def flaky(mat, *args, **kwargs):
        calls.append(mat.clone())
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("simulated failure")
        return real(mat, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    opt = TEKFAC(model, lr=0.1, factor_dtype=factor_dtype)
    with pytest.warns(RuntimeWarning, match="retrying"):
        train_step(opt, model, loss_fn, x, y)
    assert set(opt.approximations()) == {"0", "2"}
    assert calls[0].dtype == getattr(torch, factor_dtype)
    jitter = calls[1] - calls[0]  # the same factor, retried with ε·I added
    eps = jitter.diagonal()
    expected = 1e-6 * calls[0].diagonal().abs().mean()
    # float32: (a + ε) − a is ε up to the rounding of a, ~6e-8·a
    rtol = 1e-6 if factor_dtype == "float64" else 0.5
    assert torch.all(eps > 0) and torch.allclose(eps, expected.expand_as(eps), rtol=rtol)
    torch.testing.assert_close(jitter, torch.diag(eps), rtol=0, atol=0)


def test_invalid_arguments():
    model = tiny_mlp(0)
    with pytest.raises(ValueError, match="basis"):
        TEKFAC(model, lr=0.1, basis="nope")
    with pytest.raises(ValueError, match="damping_strategy"):
        KFAC(model, lr=0.1, damping_strategy="nope")
    with pytest.raises(ValueError, match="stats_interval"):
        EKFAC(model, lr=0.1, stats_interval=0)
    with pytest.raises(ValueError, match="fisher"):
        TKFAC(model, lr=0.1, fisher="nope")
    with pytest.raises(ValueError, match="nor"):
        EKFAC(model, lr=0.1, damping_strategy="nor")
    with pytest.raises(ValueError, match=r"momentum=1.0 must be in \[0, 1\)"):
        KFAC(model, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match=r"param group 0: momentum=1.5 must be in \[0, 1\)"):
        KFAC(model, [{"params": model.parameters(), "momentum": 1.5}], lr=0.1)
    with pytest.raises(TypeError, match="KFAC: model must be an nn.Module, got function"):
        KFAC(lambda x: model(x), lr=0.1)
    with pytest.raises(TypeError, match="KFAC: options= must be an instance of KroneckerOptions, got dict"):
        KFAC(model, options={"lr": 0.1})
    # the setters check as the constructor does, and a refused value changes nothing
    opt = KFAC(model, lr=0.1)
    for name, value in (("damping_strategy", "nor"), ("damping_strategy", "nope"), ("damping", -1.0),
                        ("damping", float("nan"))):
        with pytest.raises(ValueError, match=rf"KFAC: .*{name}"):
            setattr(opt, name, value)
    assert (opt.damping_strategy, opt.damping) == (DEFAULT_DAMPING["kfac"], KFAC(model, lr=0.1).damping)


# 'nor' is TKFAC/TEKFAC's damping: the other two reject it (tested above).
STRATEGY_CASES = [
    (cls, strategy)
    for cls in ALL
    for strategy in ("exact", "factored", "nor", "trace-relative")
    if strategy != "nor" or cls.trace_factored
]


@pytest.mark.parametrize("cls,strategy", STRATEGY_CASES, ids=[f"{c.__name__}-{s}" for c, s in STRATEGY_CASES])
def test_every_damping_strategy_runs(cls, strategy):
    model, loss_fn = tiny_cnn(0), nn.CrossEntropyLoss()
    x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=DT)
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    opt = cls(model, lr=0.05, damping_strategy=strategy, stats_interval=1, scale_interval=1,
              eigen_interval=2)
    losses = [train_step(opt, model, loss_fn, x, y) for _ in range(4)]
    assert all(torch.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert set(opt.approximations()) == {"0", "2", "4"}
    assert set(OPTIMIZERS) == {"kfac", "ekfac", "tkfac", "tekfac"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_cuda_matches_cpu(cls):
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(16)
    out = []
    for device in ("cpu", "cuda"):
        model = tiny_mlp(0).to(device)
        opt = cls(model, lr=0.05, fisher="exact", stats_interval=1, scale_interval=1, eigen_interval=2,
                  factor_dtype="float64")
        for _ in range(4):
            train_step(opt, model, loss_fn, x.to(device), y.to(device))
        state = opt.state_dict()["curvlab"]["blocks"]
        assert all(t.device.type == device for entry in state.values() for t in entry["curvature"].values())
        out.append([p.detach().cpu() for p in model.parameters()])
    for p, q in zip(*out):
        torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


@pytest.mark.filterwarnings("error:.*is a multiple of eigen_interval:UserWarning")
def test_a_schedule_that_never_rescales_is_warned_about_and_is_the_kronecker_baseline():
    """With scale_interval a multiple of eigen_interval every rescaling step is a refresh, which
    resets s: EKFAC takes KFAC's steps (exact damping) and TEKFAC TKFAC's — the warning's claim.
    A schedule that rescales between refreshes is not warned about and differs."""
    x, y = data(16)
    loss_fn = nn.CrossEntropyLoss()

    def run(cls, eigen: int, scale: int, **kw) -> torch.Tensor:
        model = tiny_mlp(0)
        opt = cls(model, lr=0.1, damping=1e-2, fisher="exact", factor_dtype="float64", stats_interval=1,
                  eigen_interval=eigen, scale_interval=scale, **kw)
        for i in range(6):
            train_step(opt, model, loss_fn, x[i % 2 * 8:][:8], y[i % 2 * 8:][:8])
        return flat_params(model[0])

    for rescaled, baseline in ((EKFAC, {"cls": KFAC, "damping_strategy": "exact"}), (TEKFAC, {"cls": TKFAC})):
        with pytest.warns(UserWarning, match="scale_interval=4 is a multiple of eigen_interval=2"):
            never = run(rescaled, 2, 4)
        torch.testing.assert_close(never, run(eigen=2, scale=4, **baseline), rtol=1e-10, atol=1e-12)
        assert (run(rescaled, 4, 1) - run(eigen=4, scale=1, **baseline)).abs().max() > 1e-6


@pytest.mark.parametrize("bias", [False, True], ids=["decoder-without-bias", "decoder-with-bias"])
def test_a_weight_tied_across_modules_takes_sgds_step_whatever_the_decoder_bias(bias: bool) -> None:
    """A decoder tied to the embedding (PyTorch's word_language_model) trained without a decoder
    bias but was refused with one ("used 2 times … call the module for every use"), which an
    embedding lookup cannot do; the tied matrix was also counted as the embedding's block."""

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.h = nn.Embedding(11, 6), nn.Linear(6, 6)
            self.decoder = nn.Linear(6, 11, bias=bias)
            self.decoder.weight = self.encoder.weight

        def forward(self, t):
            return self.decoder(torch.tanh(self.h(self.encoder(t))))

    torch.manual_seed(0)
    model, loss_fn = TiedLM().double(), nn.CrossEntropyLoss()
    t, y = torch.randint(0, 11, (16,)), torch.randint(0, 11, (16,))
    opt = KFAC(model, lr=0.1, momentum=0.0, stats_interval=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the decoder's bias, without a Kronecker block once its weight is tied, is named too
    said = r"shared by several modules: \['encoder.weight'\]" + (
        r"; the bias of a layer whose weight is frozen \(requires_grad=False\) or shared: \['decoder.bias'\]" if bias else "")
    with pytest.warns(UserWarning, match="have no Kronecker block .* — " + said):
        train_step(opt, model, loss_fn, t, y)
    assert [b.name for b in opt.blocks()] == ["h"]
    for name, p in model.named_parameters():  # every parameter but h's: SGD's step
        if not name.startswith("h."):
            torch.testing.assert_close(p.detach(), before[name] - 0.1 * p.grad, rtol=0, atol=1e-15)
    assert not torch.allclose(model.h.weight.detach(), before["h.weight"] - 0.1 * model.h.weight.grad)
    blocks = model_blocks(model)  # the tied matrix: one parameter block (compare measures it exactly)
    assert blocks.tied == ["encoder.weight"] and not blocks.skipped
    assert [(b.name, b.kind, b.module_type) for b in blocks.blocks] == [
        ("encoder.weight", "parameter", "Embedding+Linear"), ("h", "kronecker", "Linear"),
        *([("decoder.bias", "parameter", "Linear")] * bias)]


@pytest.mark.parametrize("with_head", [True, False], ids=["lstm+linear", "lstm-only"])
def test_parameters_of_unsupported_modules_are_named_once(with_head: bool) -> None:
    """An LSTM's parameters got SGD's update without a word (norm layers' is documented); a model
    of unsupported modules only, none at all."""

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 8 if with_head else 3, batch_first=True)
            self.fc = nn.Linear(8, 3) if with_head else nn.Identity()

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model, loss_fn = Recurrent(), nn.CrossEntropyLoss()
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    opt = KFAC(model, lr=0.1, stats_interval=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            train_step(opt, model, loss_fn, x, y)
    said = [str(w.message) for w in caught if "have no Kronecker block" in str(w.message)]
    assert len(said) == 1 and "'lstm.weight_ih_l0'" in said[0] and "fc" not in said[0], said


class HostSyncs(TorchDispatchMode):
    """Counts the reads of a tensor's value into Python (``.item()``, ``bool()``, ``int()``: aten's
    ``_local_scalar_dense``) — on a GPU each one waits until the device has run every queued kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_a_plain_step_waits_for_the_device_once(cls):
    """A step without statistics or refresh reads one value from the device: the finiteness of
    its updates, checked in one stacked sum (a second read would stall a GPU's launch queue once
    more every step, most of the steps of a schedule)."""
    model = tiny_mlp().to(DT)
    loss_fn = nn.CrossEntropyLoss()
    opt = cls(model, lr=0.01, stats_interval=5, eigen_interval=10, scale_interval=5)
    x, y = data(16)
    for _ in range(11):  # statistics, refresh and rescaling have all run once
        train_step(opt, model, loss_fn, x, y)
    assert opt.steps_done % 5 != 0
    syncs = HostSyncs()
    with syncs:
        train_step(opt, model, loss_fn, x, y)
    assert syncs.count == 1


def test_step_inside_the_track_block_is_refused() -> None:
    """The whole step indented under ``track``: the statistics, handed over when the block ends,
    were tagged with the step before and dropped as stale, so the run stayed SGD without a word."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    opt = TEKFAC(model, lr=0.1)
    with pytest.raises(RuntimeError, match=r"TEKFAC.step\(\) was called inside `with opt.track\(loss_fn\):`; call it after"):
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
            opt.step()
    assert opt.steps_done == 0
    train_step(opt, model, loss_fn, x, y)  # the same optimizer, used as it should be
    assert opt.steps_done == 1 and opt.approximations()


def test_a_sparse_embedding_gets_the_first_order_update() -> None:
    """``nn.Embedding(sparse=True)``: the finiteness check raised torch's 'SparseCPU' error on every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randint(0, 10, (6, 3)), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    sgd_model = copy.deepcopy(model)
    opt = KFAC(model, lr=0.1)
    with pytest.warns(UserWarning, match="0.weight"):
        train_step(opt, model, loss_fn, x, y)
    sgd = torch.optim.SGD(sgd_model[0].parameters(), lr=0.1)
    loss_fn(sgd_model(x), y).backward()
    sgd.step()
    torch.testing.assert_close(model[0].weight, sgd_model[0].weight)
    assert opt.approximations().keys() == {"2"}


def test_a_sparse_gradient_with_weight_decay_is_refused_before_anything_changes() -> None:
    """torch's SGD cannot add weight decay to a sparse gradient: the step raised after the
    preconditioned head had moved (half a step, steps_done unchanged); now before any update."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randint(0, 10, (6, 3)), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(model, lr=0.1, weight_decay=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="0.weight"), pytest.raises(ValueError, match=r"sparse gradient .* weight_decay=0.01"):
        train_step(opt, model, loss_fn, x, y)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and opt.steps_done == 0


def test_a_statistics_step_without_track_warns_once() -> None:
    """Forgetting ``track`` on a step due for statistics kept the old ones without a word."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = data(8)
    opt = KFAC(model, lr=0.1, stats_interval=2)
    train_step(opt, model, loss_fn, x, y)  # step 0: statistics
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):  # steps 1-4: 2 and 4 were due
            train_step(opt, model, loss_fn, x, y, use_track=False)
    said = [str(w.message) for w in caught if "was due for curvature statistics" in str(w.message)]
    assert len(said) == 1 and "step 2 was due" in said[0]


def test_the_first_order_warning_names_only_the_optimizers_own_parameters() -> None:
    """A second optimizer for the LSTM (Adam) and KFAC for the head: KFAC updates no LSTM weight,
    so it says nothing of them; the LSTM's names came with every KFAC built on a part of the model."""
    model = nn.Sequential(nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [b.name for b in KFAC(model, model[1].parameters(), lr=0.1).blocks()] == ["1"]
        KFAC(model, lr=0.1).blocks()
    said = [str(w.message) for w in caught if "have no Kronecker block" in str(w.message)]
    assert len(said) == 1 and "'0.weight_ih_l0'" in said[0], said


def test_the_first_order_warning_names_each_parameter_once_when_the_blocks_are_found_again() -> None:
    """Freezing a weight (or loading a state) makes the optimizer find its blocks again; the LSTM,
    named at the first step, is not named again; the Linear's bias, whose weight is now frozen,
    is named then, alone."""

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm, self.fc = nn.LSTM(4, 8, batch_first=True), nn.Linear(8, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(self.lstm(x)[0][:, -1])

    torch.manual_seed(0)
    model = Recurrent()
    x, y = torch.randn(6, 5, 4), torch.randint(0, 3, (6,))
    opt = KFAC(model, lr=0.1, stats_interval=1)

    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad()
        with opt.track(loss_fn):
            loss_fn(model(torch.randn_like(x)), y).backward()  # a new batch: new statistics
        opt.step()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
        opt.load_state_dict(opt.state_dict())  # the blocks are found again
        step()
        model.fc.weight.requires_grad_(False)  # and again
        step()
    said = [str(w.message) for w in caught if "have no Kronecker block" in str(w.message)]
    assert len(said) == 2, said
    assert "'lstm.weight_ih_l0'" in said[0] and "fc" not in said[0], said
    assert "['fc.bias']" in said[1] and "lstm" not in said[1], said


def test_options_set_on_the_optimizer_take_effect_or_are_refused() -> None:
    """``opt.lr`` read the constructor's value after a scheduler had halved it thrice, and
    ``opt.lr = …`` or ``opt.stats_interval = …`` were taken and did nothing (QA26): the group
    options read and set the param groups, the schedule's options the next step, and the options
    the state depends on are refused."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    opt = KFAC(model, lr=0.1, stats_interval=10, eigen_interval=10)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def step() -> None:
        opt.zero_grad()
        with opt.track(loss_fn):
            loss_fn(model(torch.randn_like(x)), y).backward()  # a new batch: new statistics
        opt.step()
        scheduler.step()

    for _ in range(3):
        step()
    assert opt.lr == opt.param_groups[0]["lr"] == pytest.approx(0.0125)
    opt.lr = 1e-3
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.lr == 1e-3
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0
    before = opt.state_dict()["curvlab"]["blocks"]["0"]["curvature"]["A"].clone()
    opt.stats_interval = 1  # step 3 takes statistics now (it would not at 10)
    step()
    assert not torch.equal(opt.state_dict()["curvlab"]["blocks"]["0"]["curvature"]["A"], before)
    opt.kl_clip = 1e-2
    assert opt.options.kl_clip == 1e-2 == opt.kl_clip
    with pytest.raises(AttributeError, match="factor_dtype is fixed when the optimizer is built"):
        opt.factor_dtype = "float64"
    opt.damping = 0.05  # a property, as before
    assert opt.options.damping == 0.05
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))], "lr": 0.5})
    with pytest.raises(AttributeError, match=r"different lr values .* read opt.param_groups\[i\]\['lr'\]"):
        opt.lr
