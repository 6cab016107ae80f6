"""The optimizers' fast paths: float32 factors against float64, truncated eigenbases, the inverse form.

Stated tolerances (float32 factors of a float64 model, 6 steps with statistics every step and
a refresh every 2): the parameter displacement agrees with the float64 run to 1e-4 relative.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlab
from curvlab.approx.inverse import KroneckerInverse
from curvlab.approx.spectral import optimal_scaling
from curvlab.extract import extract
from curvlab.optim import EKFAC, KFAC, OPTIMIZERS, TEKFAC, TKFAC
from helpers import batches, reload_through_file, tiny_cnn, tiny_mlp, train
from helpers_approx import Negated

DT = torch.float64
ALL = [KFAC, EKFAC, TKFAC, TEKFAC]
IDS = [c.__name__ for c in ALL]
#: Relative agreement of the float32 route with the float64 one (see the module docstring).
FLOAT32_RTOL = 1e-4
SCHEDULE = dict(stats_interval=1, scale_interval=1, eigen_interval=2, kl_clip=None, fisher="exact")


def displacement(cls, data, **options) -> torch.Tensor:
    model = tiny_mlp(0)
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    train(cls(model, lr=0.05, **SCHEDULE, **options), model, data)
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - start


@pytest.mark.usefixtures("routes")
@pytest.mark.parametrize("truncated", [False, True], ids=["full", "truncated"])
@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_float32_factors_agree_with_float64(cls, truncated: bool) -> None:
    """On factors with well separated eigenvalues (an eigenbasis within a (near-)degenerate
    eigenspace is arbitrary, and EKFAC's s* depends on it in any precision); with every input
    factor truncated to rank 3 as well."""
    data = batches(shape=(5,))
    options = dict(truncate_above=4, truncation_rank=3) if truncated else {}
    ref = displacement(cls, data, factor_dtype="float64", **options)
    got = displacement(cls, data, **options)  # the default: float32
    assert float((got - ref).norm() / ref.norm()) < FLOAT32_RTOL


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_truncated_optimizer_steps_with_its_approximation(cls) -> None:
    """With factors above truncate_above truncated, every step still preconditions with exactly
    the object approximations() returns, and that object is truncated."""
    model, loss_fn = tiny_cnn(0), nn.CrossEntropyLoss()
    opt = cls(model, lr=0.05, momentum=0.0, truncate_above=15, truncation_rank=4, **SCHEDULE)
    data = batches(4)
    train(opt, model, data[:3])
    approx = opt.approximations()
    assert approx["0"].truncated and approx["4"].truncated and not approx["2"].truncated  # D = 19, 19, 13
    x, y = data[3]
    opt.steps_done = 1  # a plain step: no statistics, no refresh
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    blocks = {b.name: b for b in opt.blocks()}
    before = {n: b.param_matrix().detach().clone() for n, b in blocks.items()}
    grads = {n: b.grad_matrix().clone() for n, b in blocks.items()}
    opt.step()
    for n, b in blocks.items():
        # float32 (the default): the step applies the same map to the weight and bias columns
        # apart, so its rounding differs from inv_mat_mul's on the whole matrix
        want = -0.05 * approx[n].inv_mat_mul(grads[n], opt.damping, opt.damping_strategy)
        got = b.param_matrix().detach() - before[n]
        assert float((got - want).norm() / want.norm()) < 1e-5, n


@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_truncated_state_resumes_bit_identically(cls, tmp_path) -> None:
    """A state with truncated factors/bases goes through a weights-only file and the next steps
    of the resumed optimizer are bit-identical."""
    options = dict(lr=0.05, truncate_above=4, truncation_rank=3, stats_interval=1, scale_interval=1,
                   eigen_interval=3, fisher="exact")
    data = batches(5, shape=(5,))
    model = tiny_mlp(0)
    opt = cls(model, **options)
    train(opt, model, data[:2])
    model2, opt2 = reload_through_file(opt, model, lambda: tiny_mlp(3), lambda m: cls(m, **options),
                                       tmp_path / "ckpt.pt")
    assert all(a.truncated for a in opt2.approximations().values())
    train(opt, model, data[2:])
    train(opt2, model2, data[2:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [EKFAC, TEKFAC], ids=["EKFAC", "TEKFAC"])
def test_rescaling_in_a_truncated_basis_is_the_flat_optimum(cls) -> None:
    """A rescaling step (no averaging) in a truncated basis sets s to the compressed s* of the
    batch's exact block: s* on the kept directions, its mean over the complement."""
    model, loss_fn = tiny_mlp(0, d_in=12), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 12, generator=gen, dtype=DT), torch.randint(0, 3, (10,), generator=gen)
    opt = cls(model, lr=0.0, momentum=0.0, truncate_above=8, truncation_rank=3, factor_dtype="float64",
              stat_decay=0.0, **{**SCHEDULE, "eigen_interval": 100})
    for _ in range(2):  # step 0: refresh; step 1: rescale in that basis (lr 0: θ fixed)
        train(opt, model, [(x, y)])
    approx = opt.approximations()["0"]
    assert approx.truncated
    sqrt = extract(model, loss_fn, x, y, fisher="exact", stats=("sqrt",))["0"].sqrt
    torch.testing.assert_close(approx.scaling, optimal_scaling(sqrt, *approx.eigenbasis(compressed=True)),
                               rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("name", ["kfac", "tkfac"])
def test_default_damping_uses_the_inverse_form(name: str) -> None:
    """KFAC/TKFAC with their default damping invert the two damped factors (no eigenbasis),
    and keep that inverse with the object."""
    model = tiny_mlp(0)
    opt = OPTIMIZERS[name](model, lr=0.1, **SCHEDULE)
    gen = torch.Generator().manual_seed(3)
    train(opt, model, [(torch.randn(8, 5, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen))])
    approx = opt.approximations()["0"]
    inverse = approx.inverse(opt.damping, opt.damping_strategy)
    assert isinstance(inverse, KroneckerInverse)
    assert approx.inverse(opt.damping, opt.damping_strategy) is inverse
    assert approx._eig is None  # no eigen-decomposition was needed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_cuda_fast_paths_match_the_cpu_float64_route(cls) -> None:
    """On CUDA: float32 factors, truncated bases (the same sketch on every device) and the
    inverse form give the CPU float64 route's displacement to FLOAT32_RTOL."""
    data = batches(shape=(5,))
    options = dict(truncate_above=4, truncation_rank=3)
    ref = displacement(cls, data, factor_dtype="float64", **options)
    model = tiny_mlp(0).cuda()
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt = cls(model, lr=0.05, **SCHEDULE, **options)
    train(opt, model, [(x.cuda(), y.cuda()) for x, y in data])
    assert all(a.device.type == "cuda" and a.truncated for a in opt.approximations().values())
    got = (torch.cat([p.detach().flatten() for p in model.parameters()]) - start).cpu()
    assert float((got - ref).norm() / ref.norm()) < FLOAT32_RTOL


def test_an_optimizers_float32_approximation_is_analysed_in_float64() -> None:
    """compare converts the optimizer's objects to float64; their decompositions are then done
    in float64 too (the spectrum of the float64 copy is that of its float64 factors)."""
    model = tiny_mlp(0)
    opt = KFAC(model, lr=0.1, **SCHEDULE)
    gen = torch.Generator().manual_seed(4)
    train(opt, model, [(torch.randn(8, 5, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen))])
    approx = opt.approximations()["0"]
    assert approx.dtype == torch.float32
    a64 = approx.to(torch.float64)
    expected = torch.outer(*(torch.linalg.eigvalsh(f.double()) for f in (approx.G, approx.A))).flatten()
    torch.testing.assert_close(a64.spectrum(), expected.sort(descending=True).values, rtol=1e-12, atol=1e-15)


def test_trace_weighted_approximations_of_a_huge_trace_stay_finite_in_float32() -> None:
    """A float32 regression with one un-normalised feature (a timestamp in milliseconds, ~1.7e12):
    the first layer's δ = tr F is ~3e23, finite, but TKFAC's ``λ_Ψ λ_Φᵀ`` and ``δΨ X δΦᵀ`` before
    their division by δ (~δ²) overflowed — trace, eigenvalues and the dense block were inf, the
    trace-relative inverse exactly 0, and TEKFAC's reset scaling inf, then every step skipped."""
    torch.manual_seed(0)
    x = torch.rand(64, 3) * torch.tensor([5.0, 3.0, 0.0])
    x[:, 2] = 1.7e12 * (1 + 0.01 * torch.rand(64))
    y = x[:, :1] / 3
    make = lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))  # noqa: E731
    torch.manual_seed(1)
    model = make()
    model64 = make().double()
    model64.load_state_dict(model.state_dict())
    s32 = extract(model, nn.MSELoss(), x, y, stats=("kfac", "tkfac"))["0"]
    s64 = extract(model64, nn.MSELoss(), x.double(), y.double(), stats=("kfac", "tkfac"))["0"]
    assert s32.tkfac.delta > 1e22
    for name in ("tkfac", "tekfac"):
        a32 = curvlab.approximate(s32, name, scaling="kronecker") if name == "tekfac" else curvlab.approximate(s32, name)
        a64 = curvlab.approximate(s64, name, scaling="kronecker") if name == "tekfac" else curvlab.approximate(s64, name)
        torch.testing.assert_close(a32.trace().double(), a64.trace(), rtol=1e-4, atol=0)
        torch.testing.assert_close(a32.eigenvalues().double(), a64.eigenvalues(), rtol=1e-4, atol=1e-4 * a64.trace().item())
        dense = a32.to_dense().double()
        assert torch.isfinite(dense).all()
        torch.testing.assert_close(dense, a64.to_dense(), rtol=1e-3, atol=1e-4 * a64.trace().item())
        step = a32.inv_mat_mul(s32.grad, 1e-3, "trace-relative").double()
        ref = a64.inv_mat_mul(s64.grad, 1e-3, "trace-relative")
        assert (step - ref).norm() < 1e-2 * ref.norm()  # (float32's conditioning at λ = 1e-3 tr/P)


def test_tkfac_mat_mul_of_a_huge_trace_stays_finite_in_float32() -> None:
    """The regression of test_trace_weighted_approximations_of_a_huge_trace_stay_finite_in_float32
    (δ ~ 3e23) through ``mat_mul``: ``L X Rᵀ`` before the division by δ is ~δ² and overflowed
    float32; the product itself is ~δ.  Reference: the float64 model's product."""
    torch.manual_seed(0)
    x = torch.rand(64, 3) * torch.tensor([5.0, 3.0, 0.0])
    x[:, 2] = 1.7e12 * (1 + 0.01 * torch.rand(64))
    y = x[:, :1] / 3
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    model64 = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    model64.load_state_dict(model.state_dict())
    s32 = extract(model, nn.MSELoss(), x, y, stats=("kfac", "tkfac"))["0"]
    s64 = extract(model64, nn.MSELoss(), x.double(), y.double(), stats=("kfac", "tkfac"))["0"]
    assert s32.tkfac.delta > 1e22
    a32, a64 = curvlab.approximate(s32, "tkfac"), curvlab.approximate(s64, "tkfac")
    v = torch.randn(s32.grad.shape, generator=torch.Generator().manual_seed(2))
    ref = a64.mat_mul(v.double())
    out = a32.mat_mul(v).double()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tekfac_with_the_kronecker_scaling_is_tkfac(dtype: torch.dtype) -> None:
    """``scaling="kronecker"`` (the optimizers' reset at an eigen refresh) is TKFAC's own
    diagonal ``δ λ_Ψ λ_Φᵀ`` in TKFAC's basis, so the object is TKFAC: the same dense matrix,
    eigenvalues and trace.  Float32 and float64 apply the same formula, so the existing huge-δ
    test (float32 against float64) could not see a wrong power of δ."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    x, y = torch.randn(8, 4, dtype=dtype), torch.randint(0, 3, (8,))
    for name, stats in extract(model, nn.CrossEntropyLoss(), x, y, stats=("kfac", "tkfac")).items():
        tkfac = curvlab.approximate(stats, "tkfac")
        tekfac = curvlab.approximate(stats, "tekfac", scaling="kronecker")
        tol = dict(rtol=1e-4, atol=1e-6 * tkfac.trace().item()) if dtype == torch.float32 else {}
        torch.testing.assert_close(tekfac.to_dense(), tkfac.to_dense(), **tol)
        torch.testing.assert_close(tekfac.trace(), tkfac.trace(), **tol)
        torch.testing.assert_close(tekfac.eigenvalues(), tkfac.eigenvalues(), **tol)


@pytest.mark.usefixtures("routes")
def test_an_uphill_direction_skips_the_step_and_says_why(monkeypatch) -> None:
    """Inputs of scale 1e6, five examples for eight inputs: the float32 input factor's spectrum
    spans more than float32 resolves at the damping's shift, and KFAC's direction pointed uphill
    (⟨K̂⁻¹g, g⟩ = −1e6 against +0.05 in float64) and was applied, KL clipping switched off by
    the negative sum (QA23).  Whatever the machine's float32 rounding gives there, no applied step
    ascends: it descends in every block, or it is skipped with the warning — as it always is with
    a damped inverse that is indefinite on every machine (the strategy above); in float64 the
    same step descends."""
    def step(factor_dtype: str, **options) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
        x, y = torch.randn(5, 8) * 1e6, torch.randint(0, 4, (5,))
        opt = KFAC(model, lr=0.1, damping=1e-3, factor_dtype=factor_dtype, **options)
        loss_fn = nn.CrossEntropyLoss()
        before = [p.detach().clone() for p in model.parameters()]
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            opt.step()
        moved = [p.detach().double() - b.double() for p, b in zip(model.parameters(), before)]
        return moved, grads, [str(w.message) for w in seen]

    def descends(moved: list[torch.Tensor], grads: list[torch.Tensor]) -> bool:
        # weight and bias of each block together
        return all(sum(float((m * g.double()).sum()) for m, g in zip(moved[i:i + 2], grads[i:i + 2])) < 0 for i in (0, 2))

    moved, grads, said = step("float64")
    assert not said and descends(moved, grads)
    moved, grads, said = step("float32")
    if said:
        assert len(said) == 1 and "pointing uphill in [" in said[0] and "factor_dtype='float64'" in said[0], said
        assert all(not m.any() for m in moved)
    else:
        assert descends(moved, grads)
    moved, _, said = step("float64", damping_strategy=Negated())
    assert len(said) == 1 and "pointing uphill in ['0', '2']" in said[0], said
    assert all(not m.any() for m in moved)
    # a negative product within the rounding margin is not uphill: the step is taken
    monkeypatch.setattr(curvlab.optim.update, "UPHILL_COSINE", 1e9)
    moved, grads, said = step("float64", damping_strategy=Negated())
    assert not said and moved[0].any() and not descends(moved, grads)
