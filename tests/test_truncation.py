"""Truncated eigenbases (top-k eigenpairs + a flat remainder) against dense definitions (float64).

The dense references build ``K̂ = Σ s[a, b] P_a ⊗ P_b`` from projectors (``P_a = u_a u_aᵀ``,
``P_⊥ = I − U Uᵀ``), never from curvlab's completed bases or compressed products.
"""

from __future__ import annotations

import pytest
import torch

from curvlab.approx import EighPolicy, TruncatedFactor, approximate, randomized_eigh
from curvlab.approx.spectral import (complement_map, complete_basis, diagonal_apply, flat_route, optimal_scaling,
                                     transposed_basis)
from curvlab.stats import LayerStats
from curvlab.extract import maths
from helpers_approx import DT, linear_block, projectors, rel, to_flat

NAMES = ("kfac", "tkfac", "ekfac", "tekfac")
#: "in" truncates D only, "both" both sides (d_out = 3, D = 5); "out" d_out only (d_out = 5, D = 3).
POLICIES = {
    "in": EighPolicy(truncate_above=3, rank=2),
    "both": EighPolicy(truncate_above=2, rank=1),
    "out": EighPolicy(truncate_above=3, rank=2),
}
#: (d_out, weight columns) of each policy's block
SHAPES = {"in": (3, 4), "both": (3, 4), "out": (5, 2)}


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.kron(a.contiguous(), b.contiguous())


def flat_factor(values: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return sum(v * p for v, p in zip(values, projectors(u)))


def dense_from_grid(grid: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """``Σ grid[a, b] P_a ⊗ P_b`` in the row-major matrix order."""
    return sum(grid[a, b] * kron(pa, pb) for a, pa in enumerate(projectors(u_out)) for b, pb in enumerate(projectors(u_in)))


def dense_truncated(approx) -> torch.Tensor:
    """The approximation as a dense matrix (matrix order), from its compressed representation."""
    u_out, u_in = approx.eigenbasis(compressed=True)
    return dense_from_grid(approx.eigenvalues(compressed=True), u_out, u_in)


@pytest.mark.parametrize("columns", [[0, 3], [4, 1], "random"])
def test_completed_basis_is_orthonormal_and_keeps_its_columns(columns) -> None:
    """Also where a Householder reflector of the QR is the identity (columns of I: τ = 0)."""
    n = 7
    if columns == "random":
        u = torch.linalg.qr(torch.randn(n, 3, dtype=DT, generator=torch.Generator().manual_seed(0))).Q
    else:
        u = torch.eye(n, dtype=DT)[:, columns]
    q = complete_basis(u)
    assert q.shape == (n, n) and torch.equal(q[:, : u.shape[1]], u)
    assert (q.mT @ q - torch.eye(n, dtype=DT)).abs().max() < 1e-14
    assert torch.equal(complete_basis(q), q)  # a full basis is its own completion


def test_a_truncated_basis_transposed_follows_its_basis() -> None:
    """The row-major ``Uᵀ`` the damped inverses apply (kept per basis): equal to ``U.mT``, formed
    again after ``U`` changed in place; none for a full basis."""
    u = torch.linalg.qr(torch.randn(9, 3, dtype=DT, generator=torch.Generator().manual_seed(0))).Q
    t = transposed_basis(u)
    assert t.is_contiguous() and torch.equal(t, u.mT)
    assert transposed_basis(u) is t
    u.mul_(-1.0)
    assert torch.equal(transposed_basis(u), u.mT)
    assert transposed_basis(complete_basis(u)) is None


def test_randomized_eigh_recovers_a_low_rank_plus_flat_factor() -> None:
    """Exact when the sketch spans the space (rank + oversampling = n); within the power
    iterations' error otherwise."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(30, 5, generator=gen, dtype=DT)).Q
    lam = torch.tensor([9.0, 7.0, 5.0, 3.0, 2.0], dtype=DT)
    m = flat_factor(torch.cat([lam, torch.tensor([0.25], dtype=DT)]), u)
    expected = torch.tensor([2.0, 3.0, 5.0, 7.0, 9.0, 0.25], dtype=DT)
    values, vectors = randomized_eigh(m, 5, oversampling=25)
    torch.testing.assert_close(values, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(vectors @ vectors.T, u @ u.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(TruncatedFactor(values, vectors).dense(), m, rtol=0, atol=1e-10)
    values, vectors = randomized_eigh(m, 5)  # 21 of 30 columns, gap 2/0.25, 2 power iterations
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_randomized_eigh_of_a_factor_of_lower_rank_than_its_sketch_is_exact_and_finite(dtype) -> None:
    """A factor of rank below the sketch's width (an optimizer's first refresh from fewer rows
    than the sketch has columns, or a dead layer's zero factor): its eigenpairs exactly, no
    non-finite value, an orthonormal basis, a zero flat remainder."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, generator=gen, dtype=DT)
    for m in (x.T @ x, torch.zeros(40, 40, dtype=DT)):
        values, vectors = randomized_eigh(m.to(dtype), 5, oversampling=3)  # 8 columns, rank 3 or 0
        assert torch.isfinite(values).all() and torch.isfinite(vectors).all()
        tol = dict(rtol=0, atol=1e-4 * (1 + float(m.norm()))) if dtype == torch.float32 else dict(rtol=0, atol=1e-10)
        torch.testing.assert_close(values[:-1].double(), torch.linalg.eigvalsh(m)[-5:], **tol)
        torch.testing.assert_close(values[-1].double(), torch.zeros((), dtype=DT), **tol)
        torch.testing.assert_close(vectors.mT @ vectors, torch.eye(5, dtype=dtype), rtol=0, atol=1e-5)
        torch.testing.assert_close(TruncatedFactor(values, vectors).dense().double(), m, **tol)


def test_truncated_factor_is_near_the_best_one_and_keeps_the_trace() -> None:
    """On a decaying spectrum the randomized rank-k factor (2 power iterations) is within 1 % of
    the best low-rank-plus-flat factor of that rank (exact top-k eigenpairs, flat mean)."""
    gen = torch.Generator().manual_seed(1)
    q = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=DT)).Q
    m = (q * torch.logspace(0, -4, 60, dtype=DT)) @ q.T
    values, vectors = randomized_eigh(m, 8)
    lam, u = torch.linalg.eigh(m)
    best = flat_factor(torch.cat([lam[-8:], ((lam.sum() - lam[-8:].sum()) / 52).reshape(1)]), u[:, -8:])
    ours = TruncatedFactor(values, vectors).dense()
    assert float((m - ours).norm()) <= 1.01 * float((m - best).norm())
    torch.testing.assert_close(ours.trace(), m.trace(), rtol=1e-12, atol=0)
    torch.testing.assert_close(values[:-1], lam[-8:], rtol=1e-6, atol=0)


@pytest.mark.parametrize("policy", list(POLICIES), ids=list(POLICIES))
@pytest.mark.parametrize("name", NAMES)
def test_truncated_approximation_matches_its_dense_definition(name: str, policy: str) -> None:
    """Products, damped inverses (every strategy), trace, norm and spectrum of a truncated
    approximation are those of Σ s P_a ⊗ P_b; the Kronecker products are G̃ ⊗ Ã of the
    truncated factors."""
    d_out, d_w = SHAPES[policy]
    stats = linear_block(0, bias=True, d_out=d_out, d_w=d_w, n=9)
    approx = approximate(stats, name, eigh=POLICIES[policy])
    assert approx.truncated
    dense = dense_truncated(approx)
    if name in ("kfac", "tkfac"):  # the product of the truncated factors themselves
        left, right = approx._left, approx._right
        factors = [f.dense() if isinstance(f, TruncatedFactor) else f for f in (left, right)]
        scale = 1.0 if approx._scale is None else approx._scale
        torch.testing.assert_close(dense, scale * kron(*factors), rtol=1e-10, atol=1e-12)
    flat = to_flat(dense, stats.layout)
    torch.testing.assert_close(approx.to_dense(), flat, rtol=1e-10, atol=1e-12)
    v = torch.randn(2, stats.num_params, generator=torch.Generator().manual_seed(2), dtype=DT)
    assert rel(approx.matvec(v), v @ flat) < 1e-10
    assert rel(approx.trace(), flat.trace()) < 1e-10
    assert rel(approx.frobenius_norm(), flat.norm()) < 1e-10
    assert rel(approx.spectrum(), torch.linalg.eigvalsh(flat).flip(0)) < 1e-9
    lam = 0.05 * float(flat.trace()) / stats.num_params
    eye = torch.eye(stats.num_params, dtype=DT)
    damped = {"exact": flat + lam * eye, "trace-relative": flat + lam * flat.trace() / stats.num_params * eye}
    l, r = approx.factor_eigenvalues(compressed=True)
    u_out, u_in = approx.eigenbasis(compressed=True)
    big_l, big_r = flat_factor(l, u_out), flat_factor(r, u_in)
    d_out, d_in = stats.layout.shape
    i_out, i_in = torch.eye(d_out, dtype=DT), torch.eye(d_in, dtype=DT)
    root = lam**0.5
    pi = ((big_r.trace() / d_in) / (big_l.trace() / d_out)).sqrt()
    # the damping increments of curvlab.approx.damping, from the truncated factors L̃ ⊗ R̃
    increments = {"factored": (pi * root, root / pi)}
    if approx.trace_factored:
        increments["nor"] = (root, root)
    for strategy, (b, a) in increments.items():
        inc = b * kron(big_l, i_in) + a * kron(i_out, big_r) + a * b * kron(i_out, i_in)
        damped[strategy] = flat + to_flat(inc, stats.layout)
    for strategy, mat in damped.items():
        got = approx.inverse_matvec(v, lam, strategy)
        want = torch.linalg.solve(mat, v.T).T
        assert rel(got, want) < 1e-9, strategy
        # the optimizers' route, on the weight and bias columns
        cols = approx.inv_mat_mul_columns(stats.layout.columns(stats.layout.to_matrix(v[0])), lam, strategy)
        assert rel(stats.layout.to_vector(torch.cat(cols, 1)), want[0]) < 1e-9, strategy


@pytest.mark.parametrize("name", ["kfac", "tkfac"])
def test_truncation_changes_nothing_when_the_rank_holds_the_spectrum(name: str) -> None:
    """Input factors that are exactly rank-2 plus a multiple of I: the truncated route (rank 2)
    gives the full route's approximation, inverse and spectrum."""
    stats = linear_block(0, bias=True, d_out=3, d_w=4, n=9)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(5, 2, generator=gen, dtype=DT)
    low_rank = v @ v.T + 0.3 * torch.eye(5, dtype=DT)
    stats.kfac["mc"].A = low_rank
    stats.tkfac.delta_phi = low_rank
    stats.tkfac.delta = low_rank.trace()
    full = approximate(stats, name)
    trunc = approximate(stats, name, eigh=EighPolicy(truncate_above=3, rank=2))
    assert trunc.truncated and not full.truncated
    torch.testing.assert_close(trunc.to_dense(), full.to_dense(), rtol=1e-10, atol=1e-12)
    x = torch.randn(4, 15, generator=gen, dtype=DT)
    for strategy in ("exact", "factored", "trace-relative", *(["nor"] if name == "tkfac" else [])):
        assert rel(trunc.inverse_matvec(x, 0.01, strategy), full.inverse_matvec(x, 0.01, strategy)) < 1e-10
    assert rel(trunc.spectrum(), full.spectrum()) < 1e-10


def test_eigen_corrected_scaling_in_a_truncated_basis_is_the_flat_optimum() -> None:
    """EKFAC's s* in a truncated basis: s* on the kept directions, the complement's mean on it —
    which minimises ‖F − K̂‖ among approximations flat on the complement."""
    stats = linear_block(2, bias=True, d_out=3, d_w=4, n=9)
    approx = approximate(stats, "ekfac", eigh=POLICIES["in"])
    u_out, u_in = approx.eigenbasis(compressed=True)
    f = stats.sqrt.matrices().flatten(1)
    f = f.T @ f
    err = float((f - dense_truncated(approx)).norm())
    for delta in (1e-3, -1e-3):
        nudged = approx.with_scaling(approx.scaling + delta * torch.eye(3, 3, dtype=DT)[:, -1:].expand(3, 3))
        assert float((f - dense_truncated(nudged)).norm()) > err
    torch.testing.assert_close(approx.scaling, optimal_scaling(stats.sqrt, u_out, u_in), rtol=1e-12, atol=0)


def reference_kfe(m: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """Σ_k ‖P_a M_k P_b‖² over the projectors: the compressed sums of (Qᵀ M Q)²."""
    rows, cols = projectors(u_out), projectors(u_in)
    return torch.stack([torch.stack([(pa @ m @ pb).square().sum() for pb in cols]) for pa in rows])


@pytest.mark.parametrize("truncated", ["none", "in", "out", "both"])
@pytest.mark.parametrize("t", [1, 2, 5, 8], ids=["linear", "conv-T2", "conv-T5", "conv-T8"])
def test_kfe_scaling_in_a_truncated_basis(t: int, truncated: str) -> None:
    """The extraction's rescaling statistic in a full or truncated basis: compressed sums.
    (The locations T reach each route of a convolution: rotating first, with the truncated
    side's row norms through Gram matrices (T=2) or explicitly (T=5), and forming every
    M_k first (T=8).)"""
    gen = torch.Generator().manual_seed(4)
    c, n, d_out, d_in = 2, 5, 4, 6
    x = torch.randn(n, d_in, t, generator=gen, dtype=DT)
    g = torch.randn(c, n, d_out, t, generator=gen, dtype=DT)
    u_out = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=DT)).Q
    u_in = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen, dtype=DT)).Q
    if truncated in ("out", "both"):
        u_out = u_out[:, :2]
    if truncated in ("in", "both"):
        u_in = u_in[:, :3]
    m = maths.per_sample_gradients(x, g)
    torch.testing.assert_close(maths.kfe_scaling(x, g, u_out, u_in), reference_kfe(m, u_out, u_in),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_tekfac_kfac_basis_damping_statistics_in_a_truncated_basis(policy: str) -> None:
    """basis='kfac' with a truncated basis: λ_Ψ, λ_Φ are the diagonals of Ψ, Φ in that basis,
    the complement's entry the mean over it, tr(P_⊥ M)/(n − k) — from the projectors (a mean
    over n − k + 1 passed every test: the damping references read the object's own λ)."""
    d_out, d_w = SHAPES[policy]
    stats = linear_block(0, bias=True, d_out=d_out, d_w=d_w, n=9)
    tek = approximate(stats, "tekfac", basis="kfac", eigh=POLICIES[policy])
    assert tek.truncated
    ts = stats.tkfac
    for got, mat, u in zip(tek.factor_eigenvalues(compressed=True), (ts.delta_psi, ts.delta_phi),
                           tek.eigenbasis(compressed=True)):
        want = torch.stack([torch.trace(p @ mat) / torch.trace(p) for p in projectors(u)]) / ts.delta.sqrt()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_ekfac_from_kfe_sums_in_a_truncated_basis(policy: str) -> None:
    """Without the square root, EKFAC from stats.kfe_scaling extracted in its truncated basis
    (compressed *sums* over each entry's directions) is the EKFAC built from the root (the sums
    kept undivided by their multiplicity passed every test: the full basis has multiplicity 1)."""
    d_out, d_w = SHAPES[policy]
    stats = linear_block(2, bias=True, d_out=d_out, d_w=d_w, n=9)
    ref = approximate(stats, "ekfac", eigh=POLICIES[policy])
    assert ref.truncated
    u_out, u_in = ref.eigenbasis(compressed=True)
    sums = reference_kfe(stats.sqrt.matrices(), u_out, u_in)
    bare = LayerStats(stats.name, stats.module_type, stats.layout, stats.flavour, 1, 1,
                      kfac=stats.kfac, kfe_scaling=sums)
    got = approximate(bare, "ekfac", eigh=POLICIES[policy])
    assert rel(dense_truncated(got), dense_truncated(ref)) < 1e-10


def test_tkfac_attributes_of_truncated_factors_are_normalised() -> None:
    """TKFAC's Φ = δΦ/δ and Ψ = δΨ/δ (unit trace) where the policy truncates both factors."""
    stats = linear_block(0, True, d_out=6, d_w=8, n=30)
    tk = approximate(stats, "tkfac", eigh=EighPolicy(truncate_above=5, rank=2))
    delta = float(tk.delta)
    for normalised, summed in ((tk.phi, tk.delta_phi), (tk.psi, tk.delta_psi)):
        assert isinstance(normalised, TruncatedFactor)
        assert rel(normalised.dense(), summed.dense() / delta) < 1e-12
        assert float(normalised.dense().trace()) == pytest.approx(1.0, rel=1e-12)



#: (d_out, D, k_out, k_in) → the route of a damped inverse (its complement map prepared) and of a
#: single product (formed on the spot): flat_route's choice, by flop count
ROUTES = {(4, 9, 4, 3): ("in", None), (3, 9, 3, 2): ("in", "in"), (4, 12, 4, 6): (None, None),
          (9, 4, 3, 4): ("out", None), (9, 3, 2, 3): ("out", "out"), (6, 7, 2, 3): (None, None),
          (5, 6, 5, 6): (None, None)}


@pytest.mark.parametrize("shape", list(ROUTES), ids=lambda shape: "x".join(map(str, shape)))
def test_a_truncated_operator_applies_as_its_dense_definition_by_every_route(shape) -> None:
    """``diagonal_apply`` — through the full side's complement map (prepared by a damped inverse,
    or formed on the spot where that costs fewer flops) or by rotating ``X`` in full — is
    ``Σ s P_a X P_b``, also on a batch of matrices."""
    d_out, d, k_out, k_in = shape
    gen = torch.Generator().manual_seed(4)
    u_out = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=DT)).Q[:, :k_out]
    u_in = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT)).Q[:, :k_in]
    grid = torch.rand(k_out + (k_out < d_out), k_in + (k_in < d), generator=gen, dtype=DT)
    x = torch.randn(2, d_out, d, generator=gen, dtype=DT)
    want = (x.reshape(2, -1) @ dense_from_grid(grid, u_out, u_in).T).reshape(2, d_out, d)
    assert (flat_route(u_out, u_in), flat_route(u_out, u_in, prepared=False)) == ROUTES[shape]
    side = flat_route(u_out, u_in)
    prepared = None if side is None else complement_map(side, u_out, u_in, grid)
    assert rel(diagonal_apply(x, u_out, u_in, grid), want) < 1e-12
    assert rel(diagonal_apply(x[0], u_out, u_in, grid), want[0]) < 1e-12
    assert rel(diagonal_apply(x[1], u_out, u_in, grid, flat_map=prepared), want[1]) < 1e-12
