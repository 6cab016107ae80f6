"""curvlab.approx against dense definitions and the invariants of curvature-math §6 (float64)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from curvlab.approx import (
    APPROXIMATIONS,
    DAMPING_STRATEGIES,
    EKFAC,
    KFAC,
    KFOC,
    TEKFAC,
    TKFAC,
    EighPolicy,
    ExactDamping,
    approximate,
    factor_eigh,
    psd_eigh,
)
from curvlab.approx import inverse as inverse_module
from curvlab.reuse import shared_work
from curvlab.stats import KroneckerFactors, LayerStats, TraceStats
from curvlab.block import BlockLayout
from curvlab.sqrt import DenseSqrt, FactoredSqrt
from helpers_approx import (
    CASES,
    Negated,
    DT,
    block,
    dense_fisher_matrix_order,
    fro_err,
    layout_for,
    linear_block,
    make_stats,
    rel,
    to_flat,
)

TOL = 1e-10
CASE_IDS = [f"{k}-{'bias' if b else 'nobias'}" for k, b in CASES]


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=DT)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.kron(a.contiguous(), b.contiguous())


def dense_definition(stats: LayerStats, name: str, approx) -> torch.Tensor:
    """Each approximation's dense definition in the row-major matrix order, built independently."""
    f = dense_fisher_matrix_order(stats.sqrt)
    kf = stats.kfac["mc" if name == "kfac" else "exact" if name == "kflr" else stats.flavour]
    ts = stats.tkfac
    if name in ("kfac", "kflr"):
        return kron(kf.G, kf.A)
    if name == "tkfac":
        return kron(ts.delta_psi, ts.delta_phi) / ts.delta
    if name in ("ekfac", "tekfac"):
        # The approximation's basis must diagonalise the right matrices …
        u_out, u_in = approx.eigenbasis()
        left, right = (kf.G, kf.A) if name == "ekfac" else (ts.delta_psi, ts.delta_phi)
        for u, m in ((u_out, left), (u_in, right)):
            assert torch.allclose(u.T @ u, eye(u.shape[0]), atol=1e-12)
            rot = u.T @ m @ u
            assert torch.allclose(rot, torch.diag(torch.diagonal(rot)), atol=1e-12)
        # … and s* = diag(Qᵀ F Q) (catches the transposed-rotation bug).
        q = kron(u_out, u_in)
        s_star = torch.diagonal(q.T @ f @ q)
        return (q * s_star) @ q.T
    if name == "kfoc":
        return dense_kfoc(f, *stats.layout.shape)
    if name == "diagonal":
        return torch.diag(torch.diagonal(f))
    raise AssertionError(name)


def dense_kfoc(f: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """Van Loan–Pitsianis by a dense SVD of the rearrangement R(F)[(i,k),(j,l)] = F[(i,j),(k,l)]."""
    r = f.reshape(d_out, d_in, d_out, d_in).permute(0, 2, 1, 3).reshape(d_out * d_out, d_in * d_in)
    u, s, vh = torch.linalg.svd(r)
    b = (u[:, 0] * s[0]).reshape(d_out, d_out)
    c = vh[0].reshape(d_in, d_in)
    return kron(b, c)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def stats(request) -> LayerStats:
    kind, bias = request.param
    return block(kind, bias)


# ----------------------------------------------------------------------------- dense forms


@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_to_dense_matches_definition(stats: LayerStats, name: str) -> None:
    approx = approximate(stats, name)
    assert approx.name == name
    want = to_flat(dense_definition(stats, name, approx), stats.layout)
    # KFOC is iterative (tol 1e-12 on the factor): its dense form is accurate to ~1e-12.
    assert rel(approx.to_dense(), want) < (1e-9 if name == "kfoc" else TOL)


@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_products_spectrum_norms_match_dense(stats: LayerStats, name: str) -> None:
    approx = approximate(stats, name)
    dense = approx.to_dense()
    p = stats.num_params
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(3, p, generator=gen, dtype=DT)
    x = stats.layout.to_matrix(v)

    assert rel(approx.matvec(v[0]), dense @ v[0]) < TOL
    assert rel(approx.matvec(v), v @ dense) < TOL  # batched
    assert rel(approx.mat_mul(x), stats.layout.to_matrix(v @ dense)) < TOL
    lam = 0.1 * float(torch.diagonal(dense).mean())
    solve = torch.linalg.solve(dense + lam * eye(p), v.T).T
    assert rel(approx.inverse_matvec(v, lam), solve) < 1e-9
    assert rel(approx.inv_mat_mul(x, lam, ExactDamping()), stats.layout.to_matrix(solve)) < 1e-9

    ref_spec = torch.linalg.eigvalsh(dense).flip(0)
    assert approx.spectrum().shape == (p,)
    assert torch.allclose(approx.spectrum(), ref_spec, atol=1e-12 * float(ref_spec[0]))
    assert math.isclose(float(approx.trace()), float(torch.trace(dense)), rel_tol=1e-12)
    assert math.isclose(float(approx.frobenius_norm()), float(torch.linalg.norm(dense)), rel_tol=1e-12)
    u_out, u_in = approx.eigenbasis()
    assert torch.allclose(u_out.T @ u_out, eye(u_out.shape[0]), atol=1e-12)
    assert torch.allclose(u_in @ u_in.T, eye(u_in.shape[0]), atol=1e-12)
    assert approx.eigenvalues().shape == stats.layout.shape


def test_flat_order_against_to_vector() -> None:
    """to_dense's permutation agrees with LayerStats.dense_fisher (built via layout.to_vector):
    KFLR is exact at N = 1 for a linear layer (curvature-math §1), with C = 3 columns."""
    for bias in (True, False):
        stats = linear_block(5, bias, n=1, c=3)
        kflr = approximate(stats, "kflr")
        f = stats.dense_fisher()
        assert rel(kflr.to_dense(), f) < 1e-12
        assert fro_err(f, kflr.to_dense()) < 1e-12 * float(torch.linalg.norm(f)) + 1e-15


# ----------------------------------------------------------------------------- invariants


def errors(stats: LayerStats) -> dict[str, float]:
    f = stats.dense_fisher()
    return {name: fro_err(f, approximate(stats, name).to_dense()) for name in APPROXIMATIONS}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind, bias", CASES, ids=CASE_IDS)
def test_error_ordering_and_traces(kind: str, bias: bool, seed: int) -> None:
    stats = block(kind, bias, seed)
    err = errors(stats)
    tr_f = float(stats.sqrt.trace())
    for name in ("tkfac", "ekfac", "tekfac"):
        assert math.isclose(float(approximate(stats, name).trace()), tr_f, rel_tol=1e-12), name
    assert err["ekfac"] <= err["kfac"] * (1 + 1e-12)
    assert err["tekfac"] <= err["tkfac"] * (1 + 1e-12)
    assert err["kfoc"] <= err["kfac"] * (1 + 1e-9)
    assert err["kfoc"] <= err["tkfac"] * (1 + 1e-9)
    # Heteroscedastic data: the approximations are genuinely inexact (the test can fail).
    assert err["kfac"] > 1e-3 * float(torch.linalg.norm(stats.dense_fisher()))


def test_ekfac_projection_error_decomposition(stats: LayerStats) -> None:
    """‖F − K̂‖² = (‖F‖² − ‖s*‖²) + ‖s − s*‖² in the KFAC basis (curvature-math §5)."""
    f = stats.dense_fisher()
    kfac, ekfac = approximate(stats, "kfac"), approximate(stats, "ekfac")
    s_star = ekfac.scaling
    lhs = fro_err(f, kfac.to_dense()) ** 2
    rhs = float(torch.linalg.norm(f) ** 2 - s_star.square().sum() + (kfac.eigenvalues() - s_star).square().sum())
    assert math.isclose(lhs, rhs, rel_tol=1e-9)


def test_tekfac_kfac_basis_equals_ekfac(stats: LayerStats) -> None:
    tek = approximate(stats, "tekfac", basis="kfac")
    ek = approximate(stats, "ekfac")
    assert rel(tek.to_dense(), ek.to_dense()) < TOL
    assert rel(tek.spectrum(), ek.spectrum()) < TOL
    assert rel(approximate(stats, "tekfac").to_dense(), ek.to_dense()) > 1e-6  # the bases differ


def test_tkfac_equals_kfac_for_equal_per_sample_traces() -> None:
    """‖ā_n‖² = α and Σ_c ‖g_nc‖² = γ for all n ⇒ δΦ = γ N A, δΨ = α G, δ = N α γ ⇒ TKFAC = KFAC."""
    n, c, d_out, d_w = 6, 2, 3, 4
    gen = torch.Generator().manual_seed(3)
    a = torch.cat([torch.randn(n, d_w, generator=gen, dtype=DT), torch.ones(n, 1, dtype=DT)], 1)
    a = a / a.norm(dim=1, keepdim=True) * 1.7
    g = torch.randn(c, n, d_out, generator=gen, dtype=DT)
    g = g / g.square().sum((0, 2)).sqrt()[None, :, None] * 0.3
    A, G = a.T @ a / n, torch.einsum("cno,cnp->op", g, g)
    stats = make_stats(FactoredSqrt(a, g), layout_for(d_out, d_w, True, False), A, G, kind="linear")
    tk, kf = approximate(stats, "tkfac"), approximate(stats, "kfac")
    assert rel(tk.to_dense(), kf.to_dense()) < 1e-12
    assert rel(tk.to_dense(), stats.dense_fisher()) > 1e-3  # yet neither is exact
    # … and with unequal traces they differ.
    other = linear_block(0, True)
    assert rel(approximate(other, "tkfac").to_dense(), approximate(other, "kfac").to_dense()) > 1e-3


def test_tkfac_attributes_normalised(stats: LayerStats) -> None:
    tk = approximate(stats, "tkfac")
    assert math.isclose(float(torch.trace(tk.phi)), 1.0, rel_tol=1e-12)
    assert math.isclose(float(torch.trace(tk.psi)), 1.0, rel_tol=1e-12)
    assert math.isclose(float(tk.delta), float(stats.sqrt.trace()), rel_tol=1e-14)
    kf = approximate(stats, "kfac")
    assert torch.equal(kf.A, stats.kfac["mc"].A) and torch.equal(kf.G, stats.kfac["mc"].G)


# ----------------------------------------------------------------------------- KFOC


def test_kfoc_exact_for_kronecker_fisher() -> None:
    """F exactly Kronecker: M_{jl} = x_j y_lᵀ gives Σ vec M vec Mᵀ = (Σ x xᵀ) ⊗ (Σ y yᵀ)."""
    gen = torch.Generator().manual_seed(4)
    d_out, d_in = 3, 5
    xs = torch.randn(4, d_out, generator=gen, dtype=DT)
    ys = torch.randn(6, d_in, generator=gen, dtype=DT)
    mats = torch.einsum("jo,ld->jlod", xs, ys).reshape(-1, d_out, d_in)
    layout = BlockLayout(d_out, d_in, bias_column=True, weight_shape=(d_out, d_in - 1))
    stats = make_stats(DenseSqrt(mats), layout, eye(d_in), eye(d_out), kind="conv")
    fit = approximate(stats, "kfoc")
    assert fit.converged and fit.iterations <= 3
    assert rel(fit.to_dense(), stats.dense_fisher()) < 1e-12
    assert rel(fit.to_dense(), to_flat(kron(xs.T @ xs, ys.T @ ys), layout)) < 1e-12
    # PSD factors with balanced norms.
    assert torch.linalg.eigvalsh(fit.B).min() > -1e-12 and torch.linalg.eigvalsh(fit.C).min() > -1e-12
    assert math.isclose(float(fit.B.norm()), float(fit.C.norm()), rel_tol=1e-12)


def test_kfoc_converges_where_power_iteration_crawls() -> None:
    """F = s₁ B₁⊗C₁ + s₂ B₂⊗C₂ + a little noise with σ₂/σ₁ = 0.98: alternating power iteration
    contracts the error by (σ₂/σ₁)² ≈ 0.96 a step (~700 steps to 1e-12); Lanczos needs a few."""
    gen = torch.Generator().manual_seed(7)
    d_out, d_in = 4, 6
    mats = []
    for scale, outs, ins in ((1.0, (0, 1), (0, 1, 2)), (0.98, (2, 3), (3, 4, 5))):
        for o in outs:  # B_i, C_i: projections onto disjoint coordinates, ‖B_i ⊗ C_i‖_F = √6
            for i in ins:
                m = torch.zeros(d_out, d_in, dtype=DT)
                m[o, i] = math.sqrt(scale)
                mats.append(m)
    mats.extend(1e-3 * torch.randn(5, d_out, d_in, generator=gen, dtype=DT))
    sqrt = DenseSqrt(torch.stack(mats))
    layout = BlockLayout(d_out, d_in, bias_column=False, weight_shape=(d_out, d_in))
    fit = KFOC.fit(sqrt, layout=layout)
    assert fit.converged and fit.iterations <= 30
    want = dense_kfoc(dense_fisher_matrix_order(sqrt), d_out, d_in)
    assert rel(fit.to_dense(), to_flat(want, layout)) < 1e-9


def test_kfoc_restarts_keep_the_answer(stats: LayerStats, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a Krylov basis of 3 vectors (a block too large for more) the restarted iteration
    reaches the same pair."""
    full = approximate(stats, "kfoc", init="identity")
    monkeypatch.setattr("curvlab.approx.kfoc.LANCZOS_ELEMENTS", 1)
    short = approximate(stats, "kfoc", init="identity")
    assert short.converged and short.iterations > 3
    assert rel(short.to_dense(), full.to_dense()) < 1e-9


def test_kfoc_init_and_convergence_report(stats: LayerStats) -> None:
    a = approximate(stats, "kfoc", init="identity")
    b = approximate(stats, "kfoc", init="kfac")
    assert a.converged and b.converged
    assert rel(a.to_dense(), b.to_dense()) < 1e-9
    with pytest.warns(RuntimeWarning, match="did not converge"):
        c = KFOC.fit(stats.sqrt, max_iter=1, tol=0.0, layout=stats.layout)
    assert not c.converged and c.iterations == 1 and c.residual > 0
    f32 = KFOC.fit(stats.sqrt.to(dtype=torch.float32), layout=stats.layout)
    assert f32.dtype == torch.float32 and rel(f32.to_dense().double(), a.to_dense()) < 1e-5


# ----------------------------------------------------------------------------- damping


def dense_damped(stats: LayerStats, name: str, strategy: str, lam: float) -> torch.Tensor:
    """Dense (K̂ + damping) by each strategy's formula, in the matrix order."""
    approx = approximate(stats, name)
    k = dense_definition(stats, name, approx)
    p, (d_out, d_in) = stats.num_params, stats.layout.shape
    if strategy == "exact":
        return k + lam * eye(p)
    if strategy == "trace-relative":
        return k + lam * torch.trace(k) / p * eye(p)
    ts = stats.tkfac
    if name in ("kfac", "kflr", "ekfac"):
        kf = stats.kfac["mc" if name == "kfac" else "exact"]
        left, right = kf.G, kf.A
    elif name in ("tkfac", "tekfac"):
        left, right = ts.delta_psi / ts.delta.sqrt(), ts.delta_phi / ts.delta.sqrt()
    else:
        left, right = approx.B, approx.C
    if strategy == "factored":
        pi = math.sqrt(float(torch.trace(right) / d_in) / float(torch.trace(left) / d_out))
        damped = kron(left + math.sqrt(lam) / pi * eye(d_out), right + pi * math.sqrt(lam) * eye(d_in))
    else:  # nor
        damped = kron(left + math.sqrt(lam) * eye(d_out), right + math.sqrt(lam) * eye(d_in))
    # Plain Kronecker products are damped as products; eigenvalue-corrected ones get the increment.
    return damped if name in ("kfac", "kflr", "tkfac", "kfoc") else k + damped - kron(left, right)


SUPPORTED = {
    "exact": APPROXIMATIONS,
    "trace-relative": APPROXIMATIONS,
    "factored": tuple(a for a in APPROXIMATIONS if a != "diagonal"),  # no Kronecker factors to damp
    "nor": ("tkfac", "tekfac"),
}


@pytest.mark.usefixtures("routes")
@pytest.mark.parametrize("strategy", DAMPING_STRATEGIES)
@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_damped_inverse_matches_dense(stats: LayerStats, name: str, strategy: str) -> None:
    approx = approximate(stats, name)
    lam = 0.05 * float(approx.trace()) / stats.num_params
    v = torch.randn(2, stats.num_params, generator=torch.Generator().manual_seed(2), dtype=DT)
    if name not in SUPPORTED[strategy]:
        with pytest.raises(ValueError, match=f"(?s){strategy}.*{name}"):
            approx.inverse_matvec(v, lam, strategy)
        return
    # one object at two dampings and back (it keeps its last damped inverse: a damping schedule
    # between refreshes must not read the previous one's)
    for damping in (lam, 10 * lam, lam):
        dense = to_flat(dense_damped(stats, name, strategy, damping), stats.layout)
        assert rel(approx.inverse_matvec(v, damping, strategy), torch.linalg.solve(dense, v.T).T) < 1e-9
    # The damped eigenvalues are the spectrum of the damped matrix.
    damped = approx.damped_eigenvalues(lam, strategy).flatten().sort(descending=True).values
    assert rel(damped, torch.linalg.eigvalsh(dense).flip(0)) < 1e-10


@pytest.mark.usefixtures("routes")
@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_a_damped_inverse_claims_positive_definiteness_only_where_it_holds(stats: LayerStats, name: str) -> None:
    """``positive_definite`` (what lets the optimizers skip their uphill check) is never claimed
    for a map whose dense matrix has a non-positive eigenvalue, and is claimed by every route
    through orthonormal bases with positive damped eigenvalues: the eigenvalue-corrected methods,
    any method damped exactly, and truncated factors' spectral inverses (both sides truncated)."""
    policies = [None] + ([EighPolicy(truncate_above=2, rank=1)] if name in ("kfac", "ekfac", "tkfac", "tekfac") else [])
    for policy in policies:
        approx = approximate(stats, name) if policy is None else approximate(stats, name, eigh=policy)
        lam = 0.05 * float(approx.trace()) / stats.num_params
        identity = eye(stats.num_params)
        for strategy in (*(s for s in DAMPING_STRATEGIES if name in SUPPORTED[s]), Negated()):
            inverse = approx.inverse(lam, strategy)
            dense = approx.inverse_matvec(identity, lam, strategy)
            lowest = float(torch.linalg.eigvalsh((dense + dense.T) / 2).min())
            if inverse.positive_definite:
                assert lowest > 0, (policy, strategy, lowest)
            if isinstance(strategy, Negated):
                assert lowest < 0 and not inverse.positive_definite
            elif strategy == "exact" or name in ("ekfac", "tekfac") or policy is not None:
                assert inverse.positive_definite, (policy, strategy)


@pytest.mark.usefixtures("routes")
def test_a_float32_cholesky_inverse_beyond_its_resolution_is_not_claimed_positive_definite() -> None:
    """Why a dense Cholesky inverse claims nothing: five inputs of scale 1e6 for nine weights
    leave ``A`` rank deficient, its spectrum spanning far more than float32 resolves at the
    damping's shift, and the float32 inverse KFAC stores has negative eigenvalues (the optimizers
    then check every step's direction)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 9, generator=gen) * 1e6
    g = torch.randn(1, 5, 3, generator=gen)
    stats = make_stats(FactoredSqrt(a, g), layout_for(3, 9, False, False), a.T @ a / 5,
                       torch.einsum("cno,cnp->op", g, g), kind="linear", num_examples=5)
    kfac = approximate(stats, "kfac")
    assert kfac.dtype == torch.float32
    dense = kfac.inverse_matvec(torch.eye(27), 1e-3, "factored").double()  # (KFAC's default damping)
    assert float(torch.linalg.eigvalsh((dense + dense.T) / 2).min()) < 0
    assert not kfac.inverse(1e-3, "factored").positive_definite


@pytest.mark.usefixtures("routes")
@pytest.mark.parametrize("route", ["joined", "blockwise", "blockwise, X U_in as written", "blockwise, rows padded"])
@pytest.mark.parametrize("name", APPROXIMATIONS)
def test_damped_inverse_by_column_blocks_matches_dense(stats: LayerStats, name: str, route: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizers' route: ``inv_mat_mul_columns`` on ``X``'s column blocks (the layer's
    weight and bias columns, or any other cut) gives the column blocks of ``(K̂ + λ)⁻¹ X``, and
    ``inv_mat_mul_columns_and_inner`` with them ``vec(X)ᵀ (K̂ + λ)⁻¹ vec(X)`` — by every route
    (``X`` joined into one matrix, as for a small block, or each column block on its own; in a
    full eigenbasis, ``X U_in`` transposed or as written; a dense factor inverse and its blocks
    kept with padded rows, as for rows 4 KiB long)."""
    monkeypatch.setattr(inverse_module, "JOIN_MAX_ENTRIES", 10**9 if route == "joined" else 0)
    monkeypatch.setattr(inverse_module, "WIDE_INPUT_RATIO", 0 if route.endswith("as written") else 10**9)
    monkeypatch.setattr(inverse_module, "ALIASED_ROW", 1 if route.endswith("padded") else 1024)
    approx = approximate(stats, name)
    lam = 0.05 * float(approx.trace()) / stats.num_params
    d_out, d_in = stats.layout.shape
    x = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(3), dtype=DT)
    for strategy in (s for s in DAMPING_STRATEGIES if name in SUPPORTED[s]):
        dense = dense_damped(stats, name, strategy, lam)  # matrix order: vec(X) row-major
        want = torch.linalg.solve(dense, x.flatten()).reshape(d_out, d_in)
        cuts = [stats.layout.columns(x), [x[:, :1], x[:, 1:-1], x[:, -1:]]]
        for parts in cuts:
            got = approx.inv_mat_mul_columns(parts, lam, strategy)
            assert [g.shape for g in got] == [p.shape for p in parts]
            assert rel(torch.cat(got, 1), want) < 1e-10, (strategy, len(parts))
            got, inner = approx.inv_mat_mul_columns_and_inner(parts, lam, strategy)
            assert [g.shape for g in got] == [p.shape for p in parts]
            assert rel(torch.cat(got, 1), want) < 1e-10, (strategy, len(parts))
            assert inner.shape == () and abs(float(inner) - float(x.flatten() @ want.flatten())) < 1e-10 * float(
                x.square().sum() / torch.linalg.eigvalsh(dense).min()), (strategy, len(parts))
        # float32 blocks into the float64 approximation: computed in float64, returned in float32
        got32 = approx.inv_mat_mul_columns([p.float() for p in cuts[0]], lam, strategy)
        assert all(g.dtype == torch.float32 for g in got32) and rel(torch.cat(got32, 1).double(), want) < 1e-5
        got32, inner = approx.inv_mat_mul_columns_and_inner([p.float() for p in cuts[0]], lam, strategy)
        assert all(g.dtype == torch.float32 for g in got32) and inner.dtype == DT
    with pytest.raises(ValueError, match=f"column blocks .* do not make a \\[{d_out}, {d_in}\\] matrix"):
        approx.inv_mat_mul_columns([x[:, :-1]], lam, "exact")
    with pytest.raises(ValueError, match=f"column blocks .* do not make a \\[{d_out}, {d_in}\\] matrix"):
        approx.inv_mat_mul_columns_and_inner([x[:, :-1]], lam, "exact")


@pytest.mark.parametrize("shape", [(7, 1024), (1024, 1024), (3, 2048), (5, 1023), (4, 1025)])
def test_a_repeated_operand_is_the_matrix_with_rows_4_kib_apart_padded(shape: tuple[int, int]) -> None:
    """A damped inverse's operand: ``m``'s values, row-major; on the CPU rows a multiple of 1024
    elements long are kept 16 elements further apart (MKL's GEMM reads rows 4 KiB apart through
    the same cache sets), others contiguous — also from a transposed or sliced ``m``."""
    from curvlab.approx.inverse import repeated_operand

    gen = torch.Generator().manual_seed(0)
    for m in (torch.randn(shape, generator=gen), torch.randn(shape[::-1], generator=gen).mT,
              torch.randn(shape[0], shape[1] + 1, generator=gen)[:, :-1]):
        got = repeated_operand(m)
        assert got.shape == m.shape and torch.equal(got, m) and got.stride(1) == 1
        assert got.stride(0) == (shape[1] + 16 if shape[1] % 1024 == 0 else shape[1]), (shape, got.stride())


@pytest.mark.parametrize("kind", ["rotation", "permutation"])
def test_an_eigenbasis_1024_wide_is_applied_as_it_is_and_kept_no_longer_than_it_lives(kind: str) -> None:
    """EKFAC's inverse in a 1024-wide basis (kept padded: rows 4 KiB apart, see above; a
    permutation, an embedding's, left as it is): ``U_out [(U_outᵀ X U_in) ⊘ s] U_inᵀ``, and
    nothing of the basis outlives it (the padded copy is kept per basis, as long as it lives)."""
    import gc
    import weakref

    from curvlab.approx.inverse import DiagonalInverse

    gen = torch.Generator().manual_seed(0)
    u_in = (torch.linalg.qr(torch.randn(1024, 1024, generator=gen))[0] if kind == "rotation"
            else torch.eye(1024)[:, torch.randperm(1024, generator=gen)])
    u_out = torch.linalg.qr(torch.randn(3, 3, generator=gen))[0]
    s = torch.rand(3, 1024, generator=gen) + 0.5
    x = torch.randn(3, 1024, generator=gen)
    want = (u_out.double() @ ((u_out.double().T @ x.double() @ u_in.double()) / s.double()) @ u_in.double().T).float()
    for _ in range(2):  # a second inverse of the same basis finds the kept copy
        inverse = DiagonalInverse(u_out, u_in, s)
        torch.testing.assert_close(inverse(x), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.cat(inverse.columns([x[:, :1000], x[:, 1000:]]), 1), want, rtol=1e-4, atol=1e-5)
    alive = weakref.ref(u_in)
    del inverse, u_in
    gc.collect()
    assert alive() is None


def test_cholesky_inverse_in_place_where_torch_links_mkl() -> None:
    """``curvlab.mkl.spd_inverse_`` (LAPACK ``potrf`` + ``potri`` through the MKL in torch's CPU
    build, the damped factor inverses' route) is found wherever torch reports MKL, inverts in
    place in float32 and float64 (against float64 ``linalg.inv``) reading only the upper
    triangle, reports a failed factorisation, and refuses other layouts by name."""
    from curvlab import mkl

    assert mkl.available("inverse", torch.float32) == mkl.available("inverse", torch.float64) == torch.backends.mkl.is_available()
    if not torch.backends.mkl.is_available():
        return
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(400, 150, generator=gen, dtype=torch.float64)
    spd = x.T @ x / 400 + 0.1 * torch.eye(150, dtype=torch.float64)
    want = torch.linalg.inv(spd)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        m = spd.to(dtype).triu() + torch.full((150, 150), float("nan"), dtype=dtype).tril(-1)  # lower never read
        assert mkl.spd_inverse_(m)
        assert torch.equal(m, m.T) and rel(m.double(), want) < tol
    assert not mkl.spd_inverse_(torch.diag(torch.tensor([1.0, -1e-3])))
    with pytest.raises(ValueError, match="spd_inverse_: needs"):
        mkl.spd_inverse_(torch.eye(4)[:, :3])


@pytest.mark.usefixtures("routes")
def test_damped_inverse_of_an_indefinite_factor_clamps_its_eigenvalues() -> None:
    """A factor that rounding left indefinite, damped too little for Cholesky, is inverted from
    its eigenvalues clamped at 0: ``(c·max(λ, 0) + shift)⁻¹`` in its eigenbasis."""
    from curvlab.approx.inverse import damped_inverse_matrix

    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(6), dtype=DT))
    lam = torch.tensor([3.0, 1.0, 0.5, 0.2, 0.0, -1e-4], dtype=DT)
    factor = (q * lam) @ q.T
    c, shift = torch.tensor(2.0, dtype=DT), torch.tensor(1e-6, dtype=DT)
    want = (q / (c * lam.clamp(min=0) + shift)) @ q.T
    for dtype in (torch.float64, torch.float32):  # computed in float64 (1/shift directions), returned in dtype
        got = damped_inverse_matrix(factor.to(dtype), c, shift, torch.float64)
        assert got.dtype == dtype and rel(got.double(), want) < (1e-8 if dtype == torch.float64 else 1e-5)


def test_tekfac_kfac_basis_damping_is_diagonal_of_damping_matrix(stats: LayerStats) -> None:
    """In a basis that is not Ψ⊗Φ's, TEKFAC's nor/factored increment is the diagonal (in that
    basis) of the same damping matrix."""
    tek = approximate(stats, "tekfac", basis="kfac")
    ts, lam = stats.tkfac, 0.3
    d_out, d_in = stats.layout.shape
    left, right = ts.delta_psi / ts.delta.sqrt(), ts.delta_phi / ts.delta.sqrt()
    q = kron(*tek.eigenbasis())
    pi = math.sqrt(float(torch.trace(right) / d_in) / float(torch.trace(left) / d_out))
    for strategy, (lo, ro) in {"nor": (1.0, 1.0), "factored": (1 / pi, pi)}.items():
        extra = kron(left + lo * math.sqrt(lam) * eye(d_out), right + ro * math.sqrt(lam) * eye(d_in)) - kron(left, right)
        want = tek.scaling.flatten() + torch.diagonal(q.T @ extra @ q)
        assert rel(tek.damped_eigenvalues(lam, strategy).flatten(), want) < 1e-12, strategy


def test_damping_argument_checks(stats: LayerStats) -> None:
    kf = approximate(stats, "kfac")
    x = torch.zeros(stats.layout.shape, dtype=DT)
    with pytest.raises(ValueError, match="unknown damping strategy 'bogus'"):
        kf.inv_mat_mul(x, 0.1, "bogus")
    for bad in (-1.0, 0.0, float("nan"), float("inf"), torch.tensor(-1.0, dtype=DT), torch.tensor(0.0, dtype=DT),
                torch.tensor(float("nan"))):
        for strategy in ("exact", "factored"):
            with pytest.raises(ValueError, match="damping must be a positive finite number"):
                kf.inv_mat_mul(x, bad, strategy)
    for strategy in ("exact", "factored", "nor"):  # a RuntimeError about shapes inside the damping
        with pytest.raises(ValueError, match=r"damping must be one number, got a tensor of shape \(2,\)"):
            approximate(stats, "tkfac").inv_mat_mul(x, torch.tensor([1e-3, 1e-2], dtype=DT), strategy)
    assert kf.inv_mat_mul(x, torch.tensor([1e-2], dtype=DT)).shape == x.shape  # one number, in any shape
    with pytest.raises(ValueError, match="expected matrices"):
        kf.mat_mul(torch.zeros(2, 2, dtype=DT))
    bare = EKFAC(*kf.eigenbasis(), kf.eigenvalues())  # no factor eigenvalues kept
    with pytest.raises(ValueError, match="'factored'.*'ekfac'"):
        bare.damped_eigenvalues(0.1, "factored")


# ----------------------------------------------------------------------------- construction


def test_plain_constructors_match_from_stats(stats: LayerStats) -> None:
    kf, ts = stats.kfac["mc"], stats.tkfac
    lay = stats.layout
    pairs = [
        (KFAC(kf.A, kf.G, layout=lay), approximate(stats, "kfac")),
        (TKFAC(ts.delta, ts.delta_phi, ts.delta_psi, layout=lay), approximate(stats, "tkfac")),
        (EKFAC.from_factors(kf.A, kf.G, sqrt=stats.sqrt, layout=lay), approximate(stats, "ekfac")),
        (TEKFAC.from_trace_stats(ts.delta, ts.delta_phi, ts.delta_psi, sqrt=stats.sqrt, layout=lay),
         approximate(stats, "tekfac")),
    ]
    for built, ref in pairs:
        assert rel(built.to_dense(), ref.to_dense()) < 1e-14


def test_ekfac_scaling_sources(stats: LayerStats) -> None:
    """Without the square root EKFAC falls back to an explicit scaling or stats.kfe_scaling."""
    ref = approximate(stats, "ekfac")
    bare = LayerStats(stats.name, stats.module_type, stats.layout, stats.flavour, 1, 1,
                      kfac=stats.kfac, kfe_scaling=ref.scaling.clone())
    assert rel(approximate(bare, "ekfac").to_dense(), ref.to_dense()) < 1e-14
    bare.kfe_scaling = None
    assert rel(approximate(bare, "ekfac", scaling=ref.scaling).to_dense(), ref.to_dense()) < 1e-14


def test_to_dtype_and_shapes(stats: LayerStats) -> None:
    for name in APPROXIMATIONS:
        approx = approximate(stats, name)
        low = approx.to(dtype=torch.float32)
        assert type(low) is type(approx) and low.dtype == torch.float32 and low.name == approx.name
        assert rel(low.to_dense().double(), approx.to_dense()) < 1e-5
        x = torch.randn(4, 2, *stats.layout.shape, dtype=torch.float32)
        assert low.mat_mul(x).shape == x.shape and low.inv_mat_mul(x, 0.1).dtype == torch.float32
        for moved in (approx.to("cpu"), approx.to(torch.device("cpu")), approx.to(device="cpu")):  # as Tensor.to
            assert type(moved) is type(approx) and moved.dtype == approx.dtype
            assert torch.equal(moved.to_dense(), approx.to_dense())
        with pytest.raises(TypeError, match=rf"{type(approx).__name__} .*\.to: dtype=1 must be a torch.dtype"):
            approx.to(1)
        with pytest.raises(TypeError, match=r"expected a tensor of matrices \[\.\.\., \d+, \d+\], got list"):
            approx.inv_mat_mul(x[0, 0].tolist(), 0.1)


def test_to_dense_refuses_large_blocks() -> None:
    big = KFAC(torch.eye(201, dtype=DT), torch.eye(100, dtype=DT))
    with pytest.raises(ValueError, match="P=20100"):
        big.to_dense()
    x = torch.ones(100, 201, dtype=DT)
    assert torch.equal(big.mat_mul(x), x)  # matrix-free products still work


def test_dead_layer_is_zero_not_nan() -> None:
    z = torch.zeros
    tk = TKFAC(torch.tensor(0.0, dtype=DT), z(3, 3, dtype=DT), z(2, 2, dtype=DT))
    assert torch.equal(tk.to_dense(), z(6, 6, dtype=DT))
    assert torch.isfinite(tk.inverse_matvec(torch.ones(6, dtype=DT), 0.1, "factored")).all()
    fit = KFOC.fit(DenseSqrt(z(2, 2, 3, dtype=DT)))
    assert fit.converged and torch.equal(fit.to_dense(), z(6, 6, dtype=DT))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("strategy", ["exact", "factored"])
def test_non_finite_factor_is_named_not_ill_conditioned(value: float, strategy: str) -> None:
    """A NaN/inf in a factor made eigh fail as 'ill-conditioned or too many repeated eigenvalues',
    after a jitter retry that failed the same way (a Cholesky inverse falls back to eigh too)."""
    a = torch.eye(4, dtype=DT) + 0.1
    a[1, 2] = a[2, 1] = value
    kfac = KFAC(a, torch.eye(3, dtype=DT))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no jitter retry is announced
        with pytest.raises(ValueError, match="2 non-finite entries"):
            kfac.inv_mat_mul(torch.ones(3, 4, dtype=DT), 1e-3, strategy)
    with pytest.raises(ValueError, match="non-finite"):
        psd_eigh(a)


def test_unknown_approximation_lists_choices(stats: LayerStats) -> None:
    with pytest.raises(ValueError, match="unknown approximation 'shampoo'.*kfac.*kfoc"):
        approximate(stats, "shampoo")


@pytest.mark.parametrize(
    "name, strip, needs",
    [
        ("kfac", "kfac", r"kfac\['mc'\]"),
        ("kflr", "kfac", r"kfac\['exact'\]"),
        ("ekfac", "kfac", r"kfac\['mc'\]"),
        ("ekfac", "sqrt", "stats.sqrt"),
        ("tkfac", "tkfac", "stats.tkfac"),
        ("tekfac", "tkfac", "stats.tkfac"),
        ("tekfac", "sqrt", "stats.sqrt"),
        ("kfoc", "sqrt", "stats.sqrt"),
    ],
)
def test_missing_statistics_name_layer(name: str, strip: str, needs: str) -> None:
    stats = block("linear", True)
    stats.name = "encoder.fc7"
    setattr(stats, strip, {} if strip == "kfac" else None)
    with pytest.raises(ValueError, match=f"(?s)'encoder.fc7'.*'{name}'.*{needs}.*curvlab.extract"):
        approximate(stats, name)


def test_option_errors(stats: LayerStats) -> None:
    with pytest.raises(ValueError, match="unknown basis"):
        approximate(stats, "tekfac", basis="nope")
    with pytest.raises(ValueError, match="unknown init"):
        approximate(stats, "kfoc", init="nope")
    with pytest.raises(ValueError, match="layout"):
        KFAC(eye(3), eye(2), layout=stats.layout)


def test_kfac_factors_dataclass_untouched() -> None:
    """from_stats does not alias-mutate the extracted factors (they are symmetrised copies)."""
    stats = block("conv", True)
    before = stats.kfac["mc"].A.clone()
    approximate(stats, "kfac").to_dense()
    assert torch.equal(stats.kfac["mc"].A, before)
    assert isinstance(stats.kfac["mc"], KroneckerFactors) and isinstance(stats.tkfac, TraceStats)


def test_shared_work_decomposes_each_factor_once(monkeypatch) -> None:
    """Inside the scope, a factor with the same values (in the compute dtype) under the same
    policy is decomposed once, and every caller gets what a fresh call gives, as its own copy."""
    torch.manual_seed(0)
    x = torch.randn(40, 12)
    a32 = x.T @ x / 40
    a32 = (a32 + a32.T) / 2
    fresh32, fresh64 = factor_eigh(a32), factor_eigh(a32.double())
    other = factor_eigh(a32 + torch.eye(12))
    truncating = EighPolicy(truncate_above=8, rank=4)
    fresh_truncated = factor_eigh(a32, truncating)

    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: calls.append(m.shape) or eigh(m, *a, **k))
    with shared_work():
        got32 = factor_eigh(a32)
        got64 = factor_eigh(a32.double())  # the same float64 values decomposed: no second eigh
        assert len(calls) == 1
        got_other = factor_eigh(a32 + torch.eye(12))
        got_truncated = factor_eigh(a32, truncating)  # another policy: decomposed again
        again = factor_eigh(a32.clone())
        assert len(calls) == 3
    for got, fresh in ((got32, fresh32), (got64, fresh64), (got_other, other), (got_truncated, fresh_truncated),
                       (again, fresh32)):
        for g, f in zip(got, fresh):
            assert g.dtype == f.dtype and torch.equal(g, f)
    again[1].zero_()  # a copy each: one caller's change leaves the others' alone
    assert torch.equal(got32[1], fresh32[1])
    factor_eigh(a32)  # outside the scope nothing is kept
    assert len(calls) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_diagonal_factor_is_decomposed_and_inverted_exactly(dtype: torch.dtype) -> None:
    """An embedding's input factor (token frequencies, ties and unseen tokens among them): its
    eigenpairs are its sorted diagonal with unit vectors — LAPACK's eigenvalues, ``U`` orthonormal,
    ``U diag(λ) Uᵀ = M`` — and its damped inverse ``(cM + shift)⁻¹`` torch.linalg.inv's."""
    from curvlab.approx.eigh import psd_eigh
    from curvlab.approx.inverse import damped_inverse_matrix

    counts = torch.tensor([3.0, 0.0, 5.0, 3.0, 1.0, 0.0, 8.0], dtype=torch.float64) / 20
    m = torch.diag(counts).to(dtype)
    lam, u = psd_eigh(m, compute_dtype=dtype)
    eye = torch.eye(7, dtype=dtype)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(m.double()).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(u.mT @ u, eye, rtol=0, atol=0)
    torch.testing.assert_close(u @ torch.diag(lam) @ u.mT, m, rtol=0, atol=0)
    c, shift = torch.tensor(2.0, dtype=dtype), torch.tensor(1e-3, dtype=dtype)
    torch.testing.assert_close(damped_inverse_matrix(m, c, shift, dtype), torch.linalg.inv(c * m + shift * eye))


@pytest.mark.parametrize("where", [(0, 3), (2, 6)])
def test_a_factor_coupled_off_its_first_off_diagonal_is_not_taken_as_diagonal(where: tuple[int, int]) -> None:
    """Zeros next to the diagonal (inputs that never co-occur with their neighbours, MNIST's
    empty corner pixels) with a coupling further out: the full eigen-decomposition and inverse,
    not the diagonal's — and a NaN there is refused, not decomposed as a diagonal."""
    from curvlab.approx.eigh import psd_eigh
    from curvlab.approx.inverse import damped_inverse_matrix

    m = torch.diag(torch.tensor([3.0, 1.0, 5.0, 2.0, 1.0, 4.0, 8.0], dtype=torch.float64))
    i, j = where
    m[i, j] = m[j, i] = 0.9
    assert not bool(m.diagonal(1).any())
    lam, u = psd_eigh(m, compute_dtype=torch.float64)
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(m))
    torch.testing.assert_close(u @ torch.diag(lam) @ u.mT, m)
    c, shift = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64)
    torch.testing.assert_close(damped_inverse_matrix(m, c, shift, None),
                               torch.linalg.inv(c * m + shift * torch.eye(7, dtype=torch.float64)))
    m[i, j] = m[j, i] = float("nan")
    with pytest.raises(ValueError, match="NaN|non-finite"):
        psd_eigh(m, compute_dtype=torch.float64)
