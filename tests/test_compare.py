"""Every comparison metric equals its dense computation; the invariants of the maths doc hold."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from curvlab.approx import APPROXIMATIONS, DEFAULT_DAMPING, EKFAC, approximate
from curvlab.app.report import summary_markdown
from curvlab.compare import compare
from curvlab.approx import needed_kfac_flavours
from curvlab.extract import extract
from helpers import batch, dense_ggn_full, tiny_cnn, tiny_mlp
from helpers_approx import dense_fisher_matrix_order, projectors

DT = torch.float64

APPROX = ("kfac", "kflr", "ekfac", "tkfac", "tekfac", "kfoc")
LAMBDA = 1e-2


def dense_reference(block, approx, damping: float, strategy: str, top_k: int) -> dict[str, float]:
    f = block.dense_fisher()
    k_hat = approx.to_dense()
    norm = f.norm()
    perm = block.layout.permutation()
    u_out, u_in = approx.eigenbasis()
    q = torch.kron(u_out.contiguous(), u_in.contiguous())[perm]  # columns: eigvecs in flat order
    rotated = q.T @ f @ q
    s_star = torch.diagonal(rotated)
    s = approx.eigenvalues().flatten()
    g = block.layout.to_vector(block.grad)
    exact_ng = torch.linalg.solve(f + damping * torch.eye(f.shape[0], dtype=f.dtype), g)
    approx_ng = block.layout.to_vector(approx.inv_mat_mul(block.grad, damping, strategy))
    evals, evecs = torch.linalg.eigh(f)
    return {
        "trace_ratio": (k_hat.trace() / f.trace()).item(),
        "rel_frobenius_error": ((f - k_hat).norm() / norm).item(),
        "projection_error": ((rotated - torch.diag(s_star)).norm() / norm).item(),
        "scaling_error": ((s - s_star).norm() / norm).item(),
        "ng_cosine": torch.nn.functional.cosine_similarity(exact_ng, approx_ng, dim=0).item(),
        "ng_rel_error": ((exact_ng - approx_ng).norm() / exact_ng.norm()).item(),
        "subspace_overlap": overlap_reference(f, k_hat, top_k),
        "top_eigs": evals.flip(0),
    }


def overlap_reference(f: torch.Tensor, k_hat: torch.Tensor, top_k: int) -> float:
    """``tr(U_Fᵀ P̂ U_F) / k`` from dense eigen-decompositions (``f``, ``k_hat`` in one order):
    ``U_F`` F's top-``k`` eigenvectors, ``k`` at most F's rank and raised to the end of F's
    eigenspace at its ``k``-th eigenvalue; ``P̂`` the projector onto the
    eigenspaces of ``K̂``'s largest *nonzero* eigenvalues holding ``k`` directions, the eigenspace
    of the ``k``-th one weighted by the share of it that fits (the mean over every choice of
    directions in it: no basis of an eigenspace enters, nor any direction of the null space)."""
    evals, evecs = torch.linalg.eigh(f)
    rank = int(torch.linalg.matrix_rank(f, hermitian=True))
    k = min(top_k, rank)  # no direction of a zero eigenvalue
    desc = evals.flip(0)
    while 0 < k < rank and desc[k] >= desc[k - 1] - 1e-9 * desc[0]:  # not through an eigenspace
        k += 1
    u_f = evecs[:, -k:]
    lam, v = torch.linalg.eigh(k_hat)
    lam, v = lam.flip(0), v.flip(1)
    tol = 1e-9 * lam[0]
    proj = torch.zeros_like(k_hat)
    taken, i = 0, 0
    while taken < k and i < len(lam) and lam[i] > tol:
        j = i
        while j < len(lam) and lam[i] - lam[j] <= tol:  # one eigenspace
            j += 1
        space = v[:, i:j]
        proj += min(1.0, (k - taken) / (j - i)) * space @ space.T
        taken, i = taken + (j - i), j
    return ((u_f.T @ proj @ u_f).trace() / k).item()


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def setting(request):
    model = tiny_mlp() if request.param == "mlp" else tiny_cnn()
    loss_fn = nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=6)
    ds = compare(model, loss_fn, x, y, approximations=APPROX, damping=LAMBDA, top_k=3, seed=5)
    stats = extract(model, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"),
                    kfac_flavours=needed_kfac_flavours(APPROX, "exact"), seed=5)
    return model, loss_fn, x, y, ds, stats


def test_metrics_equal_dense_computation(setting) -> None:
    *_, ds, stats = setting
    for layer, block in stats.items():
        for name in APPROX:
            approx = approximate(block, name)
            ref = dense_reference(block, approx, LAMBDA, DEFAULT_DAMPING[name], 3)
            for var in ("trace_ratio", "rel_frobenius_error", "projection_error", "scaling_error",
                        "ng_cosine", "ng_rel_error", "subspace_overlap"):
                got = ds[var].sel(layer=layer, approximation=name).item()
                assert got == pytest.approx(ref[var], rel=1e-8, abs=1e-10), (layer, name, var)
            spectrum = ds.approx_eigenvalues.sel(layer=layer, approximation=name).values
            dense_spec = torch.linalg.eigvalsh(approx.to_dense()).flip(0).numpy()
            np.testing.assert_allclose(spectrum[: len(dense_spec)], dense_spec, rtol=1e-8, atol=1e-12)
        exact = ds.exact_eigenvalues.sel(layer=layer).values
        k = min(block.sqrt.num_columns, block.num_params)
        dense_eigs = torch.linalg.eigvalsh(block.dense_fisher()).flip(0)[:k].numpy()
        np.testing.assert_allclose(exact[:k], dense_eigs, rtol=1e-8, atol=1e-12 * dense_eigs[0])
        assert ds.exact_trace.sel(layer=layer).item() == pytest.approx(block.dense_fisher().trace().item(), rel=1e-10)


@pytest.mark.parametrize("n", [1, 2, 14])  # 14: more columns (N·C = 42) than parameters (39)
def test_a_rank_deficient_block_has_no_round_off_eigenvalues(n: int) -> None:
    """A softmax over 3 classes gives F rank ≤ 2N: with ``top_k`` above it, the eigenvectors of F's
    round-off eigenvalues (~1e-17) were averaged into ``subspace_overlap`` (KFLR, equal to F at
    N = 1, overlapped it by 0.67), and the network spectrum listed more values than parameters."""
    model, loss_fn = tiny_mlp(3), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=n)
    ds = compare(model, loss_fn, x, y, approximations=APPROX, damping=LAMBDA, top_k=10, seed=5)
    stats = extract(model, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"),
                    kfac_flavours=needed_kfac_flavours(APPROX, "exact"), seed=5)
    for layer, block in stats.items():
        rank = int(torch.linalg.matrix_rank(block.dense_fisher(), hermitian=True))
        exact = ds.exact_eigenvalues.sel(layer=layer).values
        assert (exact[:rank] > 0).all() and (np.nan_to_num(exact[rank:]) == 0).all(), (layer, exact)
        for name in APPROX:
            ref = dense_reference(block, approximate(block, name), LAMBDA, DEFAULT_DAMPING[name], 10)
            got = ds.subspace_overlap.sel(layer=layer, approximation=name).item()
            assert got == pytest.approx(ref["subspace_overlap"], rel=1e-8), (layer, name)
    assert len(ds.network_exact_eigenvalues) <= sum(b.num_params for b in stats.values())
    # both eigenvalue dimensions indexed, largest first (network_eig had no coordinate)
    assert list(ds.network_eig.values) == list(range(len(ds.network_exact_eigenvalues)))
    assert "largest first" in ds.network_eig.attrs["long_name"]


@pytest.mark.parametrize("top_k", [5, 6, 10])
def test_an_exact_approximation_overlaps_fully_through_a_repeated_eigenvalue(top_k: int) -> None:
    """MSE's last layer has ``F = c·I_C ⊗ A``: every eigenvalue ``C = 3`` times.  A top-``k``
    subspace cutting one of those eigenspaces (``k`` = 5, 10) took arbitrary directions of it on
    F's side: KFLR, EKFAC, TKFAC, TEKFAC and KFOC, equal to F, overlapped it by 0.87 and 0.93 (and
    KFAC, 21 % off, by 0.97).  ``k`` now runs to the end of the eigenspace; F's eigenvalues beyond
    the Gram's ``K = N·C`` are listed as the zeros they are, NaN only beyond the block's size."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(9, 7), nn.Sigmoid(), nn.Linear(7, 3)).double()
    x, y = torch.randn(16, 9, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    ds = compare(model, nn.MSELoss(), x, y, top_k=top_k, num_eigenvalues=100)
    exact = ("kflr", "ekfac", "tkfac", "tekfac", "kfoc")
    np.testing.assert_allclose(ds.subspace_overlap.sel(layer="2", approximation=list(exact)), 1.0, atol=1e-9)
    stats = extract(model, nn.MSELoss(), x, y, stats=("sqrt", "kfac", "tkfac"), kfac_flavours=("exact", "mc"))
    kfac = dense_reference(stats["2"], approximate(stats["2"], "kfac"), LAMBDA, "exact", top_k)["subspace_overlap"]
    assert ds.subspace_overlap.sel(layer="2", approximation="kfac").item() == pytest.approx(kfac, rel=1e-8)
    # KFAC's basis diagonalises F here (its projection error is zero, read from the rotated root,
    # not as a difference of norms), its diagonal does not: the error is all scaling
    seeded = compare(model, nn.MSELoss(), x, y, approximations=("kfac",), top_k=top_k, seed=5)
    stats = extract(model, nn.MSELoss(), x, y, stats=("sqrt", "kfac"), kfac_flavours=("mc",), seed=5)
    kfac = dense_reference(stats["2"], approximate(stats["2"], "kfac"), LAMBDA, "exact", top_k)
    assert kfac["projection_error"] < 1e-12 and kfac["scaling_error"] > 0.1
    for var in ("projection_error", "scaling_error", "rel_frobenius_error"):
        got = seeded[var].sel(layer="2", approximation="kfac").item()
        assert got == pytest.approx(kfac[var], rel=1e-8, abs=1e-10), var
    first = ds.exact_eigenvalues.sel(layer="0").values  # P = 70 > K = 48
    assert (first[:48] > 0).all() and (first[48:70] == 0).all() and np.isnan(first[70:]).all(), first


@pytest.mark.parametrize("seed", range(4))
def test_one_example_of_ten_classes_overlaps_at_most_fully(seed: int) -> None:
    """N = 1, C = 10, a float32 model (as the command line's): F has rank 9 and its 10th Gram
    eigenvalue is round-off (6e-16 against a 9th of 0.01–0.14), which a cut-off of K·ε·λ_max kept:
    its direction pushed subspace_overlap to 1.0035.  KFLR and EKFAC equal F here (a Linear
    layer at N = 1): they overlap it fully."""
    torch.manual_seed(seed)
    model, loss_fn = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), nn.CrossEntropyLoss()
    x, y = torch.randn(1, 64), torch.randint(0, 10, (1,))
    ds = compare(model, loss_fn, x, y, approximations=APPROX, damping=LAMBDA, top_k=10, seed=5)
    assert float(ds.subspace_overlap.max()) <= 1 + 1e-6
    for layer in ("0", "2"):
        assert int((ds.exact_eigenvalues.sel(layer=layer) > 0).sum()) == 9, ds.exact_eigenvalues.sel(layer=layer).values[:11]
        np.testing.assert_allclose(ds.subspace_overlap.sel(layer=layer, approximation=["kflr", "ekfac"]), 1.0, atol=1e-6)


def test_an_approximation_equal_to_f_has_cosine_and_overlap_one_not_more() -> None:
    """KFLR and EKFAC equal F (a Linear layer at N = 1): their natural-gradient cosine and
    subspace overlap were 1 + 4e-16 and 1 + 1e-15 by rounding, which ``arccos`` and range checks
    refuse (QA27); both lie in their ranges, at 1 to rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    x, y = torch.randn(1, 64, dtype=torch.float64), torch.randint(0, 10, (1,))
    ds = compare(model, nn.CrossEntropyLoss(), x, y, approximations=("kflr", "ekfac"), seed=5)
    for var in ("ng_cosine", "subspace_overlap", "network_ng_cosine"):
        values = ds[var].values
        assert (values <= 1.0).all() and (values >= -1.0).all(), (var, values - 1)
    np.testing.assert_allclose(ds.ng_cosine.sel(approximation="ekfac"), 1.0, atol=1e-12)  # (KFLR's damping is factored)
    np.testing.assert_allclose(ds.subspace_overlap, 1.0, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_a_low_rank_approximation_overlaps_by_its_own_directions_only(seed: int) -> None:
    """N = 1: KFAC from one MC sample is rank 1 (``g gᵀ ⊗ a aᵀ``) while F has rank C − 1 = 3;
    with ``top_k = 3`` the overlap took two directions of KFAC's null space, whatever basis
    eigh returned for it (0.33–0.59 on the same block by the MC seed).  A null direction is no
    top direction: KFAC's one direction lies in F's range, so the overlap is 1/3 — the dense
    reference, and the same for any basis of the null space."""
    from curvlab.approx import EKFAC
    from curvlab.compare.metrics import exact_block, top_eigenvector_overlap

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(1, 6, dtype=torch.float64), torch.randint(0, 4, (1,))
    ds = compare(model, loss_fn, x, y, approximations=("kfac", "kflr"), damping=LAMBDA, top_k=3, seed=seed)
    stats = extract(model, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"), kfac_flavours=("exact", "mc"), seed=seed)
    for layer, block in stats.items():
        kfac = approximate(block, "kfac")
        assert int((kfac.eigenvalues() > 1e-12 * kfac.eigenvalues().max()).sum()) == 1
        f = block.dense_fisher()
        ref = overlap_reference(f, kfac.to_dense(), 3)
        assert ref == pytest.approx(1 / 3, rel=1e-9)
        assert ds.subspace_overlap.sel(layer=layer, approximation="kfac").item() == pytest.approx(ref, rel=1e-9)
        # the same K̂ with another basis of its null space (an orthogonal mix of the null directions)
        u_out, u_in = kfac.eigenbasis()
        s = kfac.eigenvalues()
        def mix(u, values):
            null = values <= 1e-12 * values.max()
            rot = torch.linalg.qr(torch.randn(int(null.sum()), int(null.sum()), dtype=u.dtype,
                                              generator=torch.Generator().manual_seed(seed))).Q
            u = u.clone()
            u[:, null] = u[:, null] @ rot
            return u
        lam_out, lam_in = s.amax(1), s.amax(0)
        other = EKFAC(mix(u_out, lam_out), mix(u_in, lam_in), s, layout=block.layout)
        torch.testing.assert_close(other.to_dense(), kfac.to_dense(), rtol=0, atol=1e-12 * float(s.max()))
        exact = exact_block(block.sqrt, 16, 3)
        assert top_eigenvector_overlap(exact, other, 3) == pytest.approx(ref, rel=1e-9)
        assert ds.subspace_overlap.sel(layer=layer, approximation="kflr").item() == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("shape", ["wide-in", "wide-out"])
@pytest.mark.parametrize("name", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_a_truncated_basis_overlaps_independently_of_its_completion(name: str, shape: str) -> None:
    """A truncated side is flat on its complement: where the top ``k`` eigenvalues reach into that
    eigenspace, the overlap took the directions some completion of the basis happened to list
    first.  Against the dense reference (eigenspaces of ``K̂``, the one at the ``k``-th eigenvalue
    weighted by the share that fits), and the same for another completion; "wide-out": the first
    layer's output side alone is truncated (6 outputs, 2 inputs and the bias)."""
    from curvlab.approx import EighPolicy
    from curvlab.compare.metrics import exact_block, top_eigenvector_overlap

    if shape == "wide-in":
        model = tiny_mlp(d_in=9, classes=3)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=7)
    policy = EighPolicy(truncate_above=3, rank=2 if shape == "wide-in" else 1)
    ds = compare(model, loss_fn, x, y, approximations=(name,), damping=LAMBDA, top_k=6, seed=5, eigh=policy)
    stats = extract(model, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"),
                    kfac_flavours=needed_kfac_flavours((name,), "exact"), seed=5)
    reached = 0
    for layer, block in stats.items():
        approx = approximate(block, name, eigh=policy)
        f = block.sqrt.matrices().flatten(1)
        f = f.T @ f  # row-major [d_out, D] order
        k_hat = approx._dense_matrix_order()
        ref = overlap_reference(f, k_hat, 6)
        got = ds.subspace_overlap.sel(layer=layer, approximation=name).item()
        assert got == pytest.approx(ref, rel=1e-8, abs=1e-12), layer
        # a complement entry among the top 6 (multiplicity > 1 at or above the 6th value)
        grid, mult = approx.eigenvalues(compressed=True).flatten(), approx.multiplicity().flatten()
        order = grid.argsort(descending=True)
        reached += int(((mult[order].cumsum(0) - mult[order] < 6) & (mult[order] > 1)).any())
        exact = exact_block(block.sqrt, 16, 6)
        assert top_eigenvector_overlap(exact, approx.to(dtype=torch.float64), 6) == pytest.approx(got, rel=1e-10)
    assert reached


def test_network_entries_equal_dense_full_fisher(setting) -> None:
    model, loss_fn, x, y, ds, stats = setting
    layers = list(stats)
    full = dense_ggn_full(model, loss_fn, x, y, layers)
    norm = full.norm()
    k = next(iter(stats.values())).sqrt.num_columns
    dense_eigs = torch.linalg.eigvalsh(full).flip(0)[:k].numpy()
    np.testing.assert_allclose(ds.network_exact_eigenvalues.values[:k], dense_eigs, rtol=1e-8, atol=1e-12 * dense_eigs[0])
    sizes = [stats[l].num_params for l in layers]
    blockdiag = torch.block_diag(*[stats[l].dense_fisher() for l in layers])
    assert ds.network_blockdiag_error.item() == pytest.approx(((full - blockdiag).norm() / norm).item(), rel=1e-8)
    g = torch.cat([stats[l].layout.to_vector(stats[l].grad) for l in layers])
    exact_ng = torch.linalg.solve(full + LAMBDA * torch.eye(full.shape[0], dtype=full.dtype), g)
    for name in APPROX:
        approx = [approximate(stats[l], name) for l in layers]
        k_hat = torch.block_diag(*[a.to_dense() for a in approx])
        got = ds.network_rel_frobenius_error.sel(approximation=name).item()
        assert got == pytest.approx(((full - k_hat).norm() / norm).item(), rel=1e-8)
        ng = torch.cat([stats[l].layout.to_vector(a.inv_mat_mul(stats[l].grad, LAMBDA, DEFAULT_DAMPING[name]))
                        for l, a in zip(layers, approx)])
        cos = torch.nn.functional.cosine_similarity(ng, exact_ng, dim=0).item()
        assert ds.network_ng_cosine.sel(approximation=name).item() == pytest.approx(cos, rel=1e-8)
    assert sum(sizes) == full.shape[0]


def test_invariants(setting) -> None:
    *_, ds, _ = setting
    err = ds.rel_frobenius_error
    for name in ("tkfac", "ekfac", "tekfac"):
        np.testing.assert_allclose(ds.trace_ratio.sel(approximation=name), 1.0, rtol=1e-10)
    assert (err.sel(approximation="ekfac") <= err.sel(approximation="kflr") + 1e-12).all()
    assert (err.sel(approximation="tekfac") <= err.sel(approximation="tkfac") + 1e-12).all()
    assert (err.sel(approximation="kfoc") <= err.sel(approximation="kflr") + 1e-9).all()
    # EKFAC's error is the projection error of its basis, i.e. of KFLR's (same exact factors)
    np.testing.assert_allclose(err.sel(approximation="ekfac"), ds.projection_error.sel(approximation="kflr"), rtol=1e-8)
    np.testing.assert_allclose(ds.scaling_error.sel(approximation="ekfac"), 0.0, atol=1e-10)
    np.testing.assert_allclose(err**2, ds.projection_error**2 + ds.scaling_error**2, rtol=1e-10)


def test_kflr_exact_for_one_example_linear_model() -> None:
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=1)
    ds = compare(model, loss_fn, x, y, approximations=("kflr", "ekfac", "tekfac"), damping=LAMBDA,
                 damping_strategies={"kflr": "exact"})
    np.testing.assert_allclose(ds.rel_frobenius_error.sel(approximation="kflr"), 0.0, atol=1e-7)
    np.testing.assert_allclose(ds.ng_cosine.sel(approximation="kflr"), 1.0, atol=1e-10)
    np.testing.assert_allclose(ds.rel_frobenius_error.sel(approximation="ekfac"), 0.0, atol=1e-7)


def test_netcdf_round_trip(tmp_path, setting) -> None:
    *_, ds, _ = setting
    path = tmp_path / "report.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    back = xr.open_dataset(path, engine="h5netcdf").load()
    xr.testing.assert_identical(back, ds)


def test_bad_arguments() -> None:
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=2)
    with pytest.raises(ValueError, match="unknown approximation 'shampoo'"):
        compare(model, loss_fn, x, y, approximations=("shampoo",))
    with pytest.raises(ValueError, match="damping=0"):
        compare(model, loss_fn, x, y, damping=0)
    with pytest.raises(TypeError, match="model must be an nn.Module, got function"):
        compare(lambda inputs: model(inputs), loss_fn, x, y)


def test_an_approximation_named_twice_is_measured_once() -> None:
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=4)
    twice = compare(model, loss_fn, x, y, approximations=("kflr", "kfac", "kflr"), seed=0)
    once = compare(model, loss_fn, x, y, approximations=("kflr", "kfac"), seed=0)
    assert list(twice.approximation.values) == ["kflr", "kfac"]
    timeless = lambda ds: {k: v for k, v in ds.attrs.items() if k != "created"}  # noqa: E731 (to the second)
    assert timeless(twice) == timeless(once) and twice.equals(once)


def test_an_undefined_damping_is_refused_before_the_extraction() -> None:
    """``"nor"`` needs TKFAC's trace split and ``"factored"`` Kronecker factors: such a combination
    failed only when the approximation was measured, after the extraction (minutes on a ResNet-18,
    after a report's warm-up); it is refused before, with the same message, and the combinations
    that are defined still run."""
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=4)

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted before the settings were checked")

    for name, strategy, why in (("kfac", "nor", "trace split"), ("kfoc", "nor", "trace split"),
                                ("ekfac", "nor", "trace split"), ("diagonal", "factored", "no Kronecker factor")):
        with pytest.raises(ValueError, match=rf"damping_strategies\['{name}'\]: damping strategy '{strategy}' is "
                                             rf"not defined for approximation '{name}': .*{why}"):
            compare(model, loss_fn, x, y, approximations=(name, "tkfac"), damping_strategies={name: strategy},
                    extractor=no_extraction)
    ds = compare(model, loss_fn, x, y, approximations=("ekfac", "tekfac", "diagonal"), seed=5,
                 damping_strategies={"ekfac": "factored", "tekfac": "exact", "diagonal": "trace-relative"})
    assert ds.attrs["damping_strategies"] == "ekfac=factored;tekfac=exact;diagonal=trace-relative"


def test_settings_take_numpy_scalars() -> None:
    """``top_k=np.int64(3)`` or ``damping=np.float32(0.1)`` were refused, which the option
    objects take; they give what the Python numbers give, and bad ones are still named."""
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=4)
    kwargs = dict(approximations=("kflr",), seed=5)
    plain = compare(model, loss_fn, x, y, damping=0.5, top_k=2, num_eigenvalues=5, **kwargs)
    scalars = compare(model, loss_fn, x, y, damping=np.float32(0.5), top_k=np.int64(2),
                      num_eigenvalues=np.int32(5), **kwargs)
    xr.testing.assert_identical(scalars.drop_attrs(), plain.drop_attrs())
    assert (scalars.attrs["damping"], scalars.attrs["top_k"]) == (0.5, 2)
    assert (type(scalars.attrs["damping"]), type(scalars.attrs["top_k"])) == (float, int)
    for name, bad in (("damping", np.float64("nan")), ("damping", np.bool_(True)), ("top_k", np.int64(0)),
                      ("num_eigenvalues", np.bool_(True)), ("top_k", np.float64(2.0))):
        with pytest.raises(ValueError, match=f"curvlab.compare: {name}="):
            compare(model, loss_fn, x, y, **{name: bad}, **kwargs)


def test_lanczos_path_matches_dense(monkeypatch) -> None:
    """Large Gram matrices use scipy's eigsh; force that path on a small problem."""
    import curvlab.compare.metrics as metrics

    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=8)
    dense = compare(model, loss_fn, x, y, approximations=("kflr", "tekfac"), top_k=2, num_eigenvalues=5)
    monkeypatch.setattr(metrics, "DENSE_EIGH_LIMIT", 4)
    lanczos = compare(model, loss_fn, x, y, approximations=("kflr", "tekfac"), top_k=2, num_eigenvalues=5)
    np.testing.assert_allclose(lanczos.exact_eigenvalues[:, :5], dense.exact_eigenvalues[:, :5], rtol=1e-8)
    np.testing.assert_allclose(lanczos.network_exact_eigenvalues, dense.network_exact_eigenvalues, rtol=1e-8)
    np.testing.assert_allclose(lanczos.subspace_overlap, dense.subspace_overlap, rtol=1e-8)


def test_dead_layer_gives_finite_metrics() -> None:
    """A layer whose inputs are all zero has F = 0 (apart from the bias): no solver may fail."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 3, bias=False)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU is dead: layer 2 sees zeros, layer 0 gets no gradient
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    ds = compare(model, nn.CrossEntropyLoss(), x, y, approximations=("kflr", "tekfac"), top_k=2)
    assert np.all(ds.exact_trace.values == 0)
    assert np.isfinite(ds.network_exact_eigenvalues.values).all()


def test_each_factor_decomposed_once(monkeypatch) -> None:
    """KFAC, KFLR and EKFAC share the input factor A, TKFAC and TEKFAC δΦ and δΨ: the comparison
    decomposes every distinct matrix once (a ResNet-18's 4608-wide A is tens of seconds each)."""
    model, loss_fn = tiny_cnn(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=6)
    seen = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m, *a, **k: seen.append(m.numpy().tobytes()) or eigh(m, *a, **k))
    compare(model, loss_fn, x, y, approximations=("kfac", "kflr", "ekfac", "tkfac", "tekfac"), seed=5)
    factors = 5 * sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))  # A, G, G_LR, δΦ, δΨ
    assert len(seen) >= factors
    assert len(set(seen)) == len(seen)


def test_each_basis_rotated_once(monkeypatch) -> None:
    """KFAC's s* is EKFAC's scaling and TKFAC's TEKFAC's: per layer the comparison rotates the
    root into three bases (KFAC's, KFLR's, TKFAC's), once each, and measures what a comparison of
    each approximation alone measures."""
    model, loss_fn = tiny_cnn(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=6)
    names = ("kfac", "kflr", "ekfac", "tkfac", "tekfac")
    alone = {n: compare(model, loss_fn, x, y, approximations=(n,), seed=5) for n in names}
    calls = []
    for cls in {type(s.sqrt) for s in extract(model, loss_fn, x, y, stats=("sqrt",)).values()}:
        method = cls.rotated_sq_sum
        monkeypatch.setattr(cls, "rotated_sq_sum", lambda self, *a, _m=method: calls.append(1) or _m(self, *a))
    ds = compare(model, loss_fn, x, y, approximations=names, seed=5)
    assert len(calls) == 3 * ds.sizes["layer"]
    for n in names:
        for var in ("rel_frobenius_error", "scaling_error", "ng_cosine", "subspace_overlap", "network_ng_cosine"):
            np.testing.assert_allclose(ds[var].sel(approximation=n), alone[n][var].sel(approximation=n), rtol=1e-12)


def test_truncated_bases_measure_the_truncated_objects() -> None:
    """``eigh=EighPolicy(truncate_above=…)``: the dataset measures the approximations with the
    truncated bases the optimizers invert for wide factors (top-``rank`` eigenpairs and the rest
    flat), against the dense exact block; the default measures the full ones."""
    from curvlab.approx import EighPolicy

    model, loss_fn = tiny_cnn(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=6)
    policy = EighPolicy(truncate_above=8, rank=3)
    names = ("kflr", "ekfac", "tkfac", "tekfac")
    ds = compare(model, loss_fn, x, y, approximations=names, damping=LAMBDA, top_k=3, seed=5, eigh=policy)
    full = compare(model, loss_fn, x, y, approximations=names, damping=LAMBDA, top_k=3, seed=5)
    assert ds.attrs["factor_eigh"].startswith("truncated above 8 to rank 3") and full.attrs["factor_eigh"] == "full"
    stats = extract(model, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"), kfac_flavours=("exact",), seed=5)
    assert any(max(block.layout.shape) > 8 for block in stats.values())  # some factors are truncated
    for layer, block in stats.items():
        for name in names:
            approx = approximate(block, name, eigh=policy)
            ref = dense_reference(block, approx, LAMBDA, DEFAULT_DAMPING[name], 3)
            for var in ("trace_ratio", "rel_frobenius_error", "ng_cosine", "ng_rel_error"):
                got = ds[var].sel(layer=layer, approximation=name).item()
                assert got == pytest.approx(ref[var], rel=1e-8, abs=1e-10), (layer, name, var)
    assert not np.allclose(ds.rel_frobenius_error.values, full.rel_frobenius_error.values)
    with pytest.raises(ValueError, match="eigh=2048 must be a curvlab.approx.EighPolicy"):
        compare(model, loss_fn, x, y, eigh=2048)


@pytest.mark.parametrize("name", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_a_truncated_basis_splits_the_error_independently_of_its_completion(name: str) -> None:
    """With a truncated eigenbasis ``K̂`` is flat on the complement, so the best approximation in its
    eigenspaces is ``K* = Σ s̄*_c P_c`` over the cells ``P_a ⊗ P_b`` (``P_⊥ = I − U Uᵀ``),
    ``s̄*_c = tr(F P_c) / tr P_c``: projection error ``‖F − K*‖``, scaling error ``‖K̂ − K*‖``.
    Built from projectors only, so no completion of the basis enters the reference; the split
    read in one arbitrary completion moved error between the two (0.078–0.118 for one layer)."""
    from curvlab.approx import EighPolicy

    model = tiny_mlp(d_in=9, classes=3)
    loss_fn = nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=7)
    policy = EighPolicy(truncate_above=3, rank=2)  # both sides of the 4×10 layer, the input side of the 3×5
    ds = compare(model, loss_fn, x, y, approximations=(name,), damping=LAMBDA, top_k=2, seed=5, eigh=policy)
    stats = extract(model, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"),
                    kfac_flavours=needed_kfac_flavours((name,), "exact"), seed=5)
    for layer, block in stats.items():
        approx = approximate(block, name, eigh=policy)
        u_out, u_in = approx.eigenbasis(compressed=True)
        assert u_in.shape[1] < u_in.shape[0]
        f = dense_fisher_matrix_order(block.sqrt)  # row-major [d_out, D] order, as the cells below
        cells = [torch.kron(pa.contiguous(), pb.contiguous()) for pa in projectors(u_out) for pb in projectors(u_in)]
        s_bar = [(f * c).sum() / c.trace() for c in cells]
        k_star = sum(s * c for s, c in zip(s_bar, cells))
        grid = approx.eigenvalues(compressed=True).flatten()
        k_hat = sum(s * c for s, c in zip(grid, cells))
        norm = f.norm()
        got = ds.sel(layer=layer, approximation=name)
        assert got.projection_error.item() == pytest.approx(((f - k_star).norm() / norm).item(), rel=1e-8), layer
        assert got.scaling_error.item() == pytest.approx(((k_hat - k_star).norm() / norm).item(), rel=1e-8, abs=1e-12), layer
        assert got.rel_frobenius_error.item() == pytest.approx(((f - k_hat).norm() / norm).item(), rel=1e-8), layer


def test_approximations_keep_their_order_where_one_applies_to_later_layers_only() -> None:
    """KFOC is measured only on blocks it fits (the first layer here has 180 300 parameters in the
    span of 400 rows, above 2¹⁷): the approximation coordinate listed it after the diagonal,
    in the order the layers first showed them; it keeps the requested order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(600, 300), nn.Tanh(), nn.Linear(300, 3))
    x, y = torch.randn(400, 600), torch.randint(0, 3, (400,))
    ds = compare(model, nn.CrossEntropyLoss(), x, y, num_eigenvalues=16)
    assert list(ds.approximation.values) == list(APPROXIMATIONS)
    kfoc = ds.rel_frobenius_error.sel(approximation="kfoc").values
    assert np.isnan(kfoc[0]) and np.isfinite(kfoc[1])


def test_natural_gradient_metrics_beyond_float64_are_nan_with_a_warning() -> None:
    """A raw feature of size ~1e6 (λ_max(F)/λ ~ 1e13): Woodbury's ``λ⁻¹[g − V(…)Vᵀg]`` cancels,
    and ng_cosine read 0.02 where a 60-digit solve gives 0.26 (and a timestamp feature made
    Cholesky fail, naming nothing).  Below the limit the values are the dense solve's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    for scale, resolved in ((1.0, True), (1e6, False), (1.7e9, False)):
        xs = x * torch.tensor([scale, 1.0, 1.0], dtype=torch.float64)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            ds = compare(model, loss_fn, xs, y, damping=1e-3, approximations=("kflr",))
        beyond = [str(w.message) for w in said if "beyond float64's reach" in str(w.message)]
        assert bool(beyond) == (not resolved)
        assert np.isnan(ds.ng_cosine.sel(layer="0").values).all() == (not resolved)
        assert np.isnan(ds.network_ng_cosine.values).all() == (not resolved)
        assert np.isfinite(ds.rel_frobenius_error.values).all()  # the other metrics stand
        unresolved = ds.attrs["ng_unresolved"]
        assert (unresolved == "none") if resolved else ("0" in unresolved.split(","))
        assert ("Natural gradients not measured (–) on" in summary_markdown(ds)) == (not resolved)
        if resolved:  # the dense damped solve, at this conditioning as accurate as Woodbury
            dense = dense_ggn_full(model, loss_fn, xs, y, ["0"])
            stats = extract(model, loss_fn, xs, y, stats=("kfac",), kfac_flavours=("exact",))["0"]
            g = stats.layout.to_vector(stats.grad)
            exact_ng = torch.linalg.solve(dense + 1e-3 * torch.eye(dense.shape[0], dtype=dense.dtype), g)
            ng = stats.layout.to_vector(approximate(stats, "kflr").inv_mat_mul(stats.grad, 1e-3, DEFAULT_DAMPING["kflr"]))
            cos = (ng @ exact_ng / (ng.norm() * exact_ng.norm())).item()
            np.testing.assert_allclose(ds.ng_cosine.sel(layer="0", approximation="kflr").item(), cos, rtol=1e-8)


def test_layers_whose_curvature_the_damping_swamps_are_named() -> None:
    """λ_max(F) < damping/100 (a barely trained BatchNorm network's early layers at the default
    damping): every damped natural gradient is the gradient over the damping, so every
    approximation's ng_cosine is near 1 — named in the attributes and the summary, as the
    dense damped solves confirm; at a damping below the curvature, none is named."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = 0.01 * torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,))
    loss_fn = nn.CrossEntropyLoss()
    dense = dense_ggn_full(model, loss_fn, x, y, ["0"])
    top = torch.linalg.eigvalsh(dense)[-1].item()
    for damping, named in ((1000 * top, True), (0.1 * top, False)):
        ds = compare(model, loss_fn, x, y, damping=damping, approximations=("kfac", "tkfac", "diagonal"))
        assert ("0" in ds.attrs["ng_damping_dominated"].split(",")) == named
        assert ("Natural gradients set by the damping" in summary_markdown(ds)) == named
        if named:  # what the name says: every approximation's natural gradient is the gradient's direction
            assert (ds.ng_cosine.sel(layer="0") > 0.999).all()
    # a dead layer (its ReLU never fires: F = 0), at any damping: its cosines of 1 say nothing either
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    dead = nn.Sequential(model[0], nn.ReLU(), model[2])
    ds = compare(dead, loss_fn, x, y, damping=1e-8, approximations=("kfac", "diagonal"))
    assert float(ds.exact_trace.sel(layer="0")) == 0.0
    assert "0" in ds.attrs["ng_damping_dominated"].split(",")


def test_a_zero_gradient_gives_undefined_natural_gradient_metrics() -> None:
    """MSE at a zero residual: F ≠ 0 but g = 0, so both natural gradients vanish; ng_cosine read
    0 ("orthogonal") beside a NaN ng_rel_error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    with pytest.warns(RuntimeWarning, match="the gradient of layer '0' is zero"):
        ds = compare(model, nn.MSELoss(), x, y, approximations=("kfac", "tekfac"))
    assert (ds.exact_trace.values > 0).all()
    assert np.isnan(ds.ng_cosine.values).all() and np.isnan(ds.network_ng_cosine.values).all()


def test_natural_gradient_is_reported_up_to_the_rounding_limit_and_not_beyond() -> None:
    """The limit ε₆₄·λ_max(F)/λ = 1e-5 is λ_max/λ ≈ 4.5e10 (where Woodbury still agrees with a
    60-digit solve to 1e-5; 0.6 % at 1.6e11).  At λ_max/λ = 1.5e10 the metrics are reported, at
    1.5e11 they are NaN with the warning.  λ_max is read from the comparison itself; the damping
    is chosen to put the layer on either side."""
    from curvlab.compare import compare
    from curvlab.compare.metrics import natural_gradient_resolved

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x, y = torch.randn(16, 3, dtype=DT), torch.randn(16, 2, dtype=DT)
    first = compare(model, nn.MSELoss(), x, y, approximations=("kflr",))
    top = float(first.exact_eigenvalues.sel(layer="0").values[0])
    assert natural_gradient_resolved(torch.tensor([1.5e10]), 1.0)
    assert not natural_gradient_resolved(torch.tensor([1.5e11]), 1.0)
    for ratio, resolved in ((1.5e10, True), (1.5e11, False)):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            ds = compare(model, nn.MSELoss(), x, y, damping=top / ratio, approximations=("kflr",))
        beyond = [w for w in said if "layer '0'" in str(w.message) and "beyond float64's reach" in str(w.message)]
        assert bool(beyond) == (not resolved), ratio
        assert np.isnan(ds.ng_cosine.sel(layer="0").values).all() == (not resolved), ratio


def test_a_gradient_with_some_zero_entries_is_not_called_zero() -> None:
    """An input feature that is 0 for every example zeroes a column of the first layer's
    gradient, not the gradient: no "the gradient of layer … is zero" warning and finite
    natural-gradient metrics (the warning's condition is ``not grad.any()``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT)
    x[:, 0] = 0.0
    from curvlab.compare import compare

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ds = compare(model, nn.MSELoss(), x, y, approximations=("kfac",))
    assert not [w for w in said if "is zero" in str(w.message)], [str(w.message) for w in said]
    assert np.isfinite(ds.ng_cosine.values).all()


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_ekfac_under_reduce_is_flagged_where_its_basis_is_the_eigensolvers_choice(kfac_approx: str) -> None:
    """Under ``reduce`` a convolution's per-example gradients reach the null space of ``A`` (the
    sums of too few examples' inputs): EKFAC's rescaling there depends on which basis ``eigh``
    returns for it — a change of ``A`` in its last bits moves the approximation by a visible
    amount.  compare says so, naming the layers (warning and ``basis_dependent``); under
    ``expand`` the gradients stay in the factors' ranges and the same change does nothing."""
    net = tiny_cnn(0)
    x, y = batch(net, nn.CrossEntropyLoss(), 4)
    loss_fn = nn.CrossEntropyLoss()
    flagged = [l for l, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ds = compare(net, loss_fn, x, y, approximations=("kflr", "ekfac"), kfac_approx=kfac_approx)
    told = [str(w.message) for w in said if "null spaces" in str(w.message)]
    stats = extract(net, loss_fn, x, y, stats=("sqrt", "kfac"), kfac_flavours=("exact",), kfac_approx=kfac_approx)
    moved = {}
    for layer in flagged:
        s = stats[layer]
        a, g = s.kfac["exact"].A.double(), s.kfac["exact"].G.double()
        noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        nudged = a + (noise + noise.T) * 1e-16 * a.abs().max()
        dense = [EKFAC.from_factors(f, g, sqrt=s.sqrt, layout=s.layout).to_dense() for f in (a, nudged)]
        moved[layer] = ((dense[1] - dense[0]).norm() / dense[0].norm()).item()
    if kfac_approx == "reduce":
        assert len(told) == 1 and all(f"'{l}'" in told[0] for l in flagged)
        assert ds.attrs["basis_dependent"] == ",".join(flagged)
        assert max(moved.values()) > 1e-3, moved  # why it is flagged
    else:
        assert not told and ds.attrs["basis_dependent"] == "none"
        assert max(moved.values()) < 1e-8, moved


def _ekfac_dense(f: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor, layout) -> torch.Tensor:  # noqa: ANN001
    """EKFAC in the basis ``u_out ⊗ u_in`` from the dense block: ``Σ s_ij q_ij q_ijᵀ`` with
    ``s_ij = q_ijᵀ F q_ij`` and ``q_ij`` the flat ``u_i v_jᵀ``."""
    q = torch.stack([layout.to_vector(torch.outer(u_out[:, i], u_in[:, j]))
                     for i in range(u_out.shape[1]) for j in range(u_in.shape[1])], dim=1)
    return q @ torch.diag(torch.einsum("pk,pq,qk->k", q, f, q)) @ q.T


@pytest.mark.parametrize("net", ["upsampling", "convolution"])
def test_a_repeated_eigenvalue_weighed_unequally_is_flagged_under_expand(net: str) -> None:
    """A U-Net's ``ConvTranspose2d(k=2, stride=2)``: every tap sees the same pixels, so ``A =
    I_4 ⊗ A_c`` repeats each eigenvalue, and EKFAC in another orthonormal basis of those
    eigenspaces — as much eigh's answer — is another approximation (QA29: its error 0.856–0.865).
    compare names the layer, also under expand; an ordinary convolution's factors repeat nothing."""
    torch.manual_seed(0)
    first = nn.ConvTranspose2d(4, 2, 2, stride=2) if net == "upsampling" else nn.Conv2d(4, 2, 3, padding=1)
    side = 8 if net == "upsampling" else 4
    model = nn.Sequential(first, nn.Tanh(), nn.Flatten(), nn.Linear(2 * side * side, 3)).double()
    x, y = torch.randn(6, 4, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ds = compare(model, nn.CrossEntropyLoss(), x, y, approximations=("kflr", "ekfac"))
    told = [str(w.message) for w in said if "repeated eigenvalues" in str(w.message)]
    s = extract(model, nn.CrossEntropyLoss(), x, y, stats=("sqrt", "kfac"), kfac_flavours=("exact",))["0"]
    lam, u_in = torch.linalg.eigh(s.kfac["exact"].A.double())
    u_out = torch.linalg.eigh(s.kfac["exact"].G.double())[1]
    rotated, start = u_in.clone(), 0
    while start < len(lam):  # another orthonormal basis of each repeated eigenspace
        end = start + 1
        while end < len(lam) and lam[end] - lam[end - 1] < 1e-12 * lam[-1]:
            end += 1
        if end - start > 1:
            turn = torch.linalg.qr(torch.randn(end - start, end - start, generator=torch.Generator().manual_seed(start),
                                               dtype=torch.float64))[0]
            rotated[:, start:end] = u_in[:, start:end] @ turn
        start = end
    f = s.dense_fisher()
    ekfac = [_ekfac_dense(f, u_out, basis, s.layout) for basis in (u_in, rotated)]
    moved = float((ekfac[1] - ekfac[0]).norm() / ekfac[0].norm())
    if net == "upsampling":
        assert ds.attrs["basis_dependent"] == "0" and len(told) == 1 and "['0']" in told[0], told
        assert moved > 1e-3, moved  # why it is flagged
    else:
        assert ds.attrs["basis_dependent"] == "none" and not told
        assert moved < 1e-12, moved


def test_a_repeated_eigenvalue_weighed_isotropically_overall_but_not_by_each_output_is_flagged() -> None:
    """``A`` repeats an eigenvalue on ``span(r₁, r₂)`` (not axis-aligned); example 1 reaches only
    output 1 with input ``r₁``, example 2 only output 2 with ``r₂``: the partial trace
    ``Σ M_kᵀM_k`` is isotropic on that eigenspace, yet EKFAC's ``s*_1j = (r₁ᵀv_j)²`` depends on
    the basis ``v`` of it — so EKFAC moves with eigh's choice, and compare says so."""
    from curvlab.compare import measure
    from curvlab.sqrt import FactoredSqrt
    from helpers_approx import layout_for, make_stats

    dt = torch.float64
    r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=dt))[0]
    a = torch.stack([r[:, 0], r[:, 1], 2 * r[:, 2]])  # [N, D]
    g = torch.diag(torch.tensor([1.0, 1.0, 3.0], dtype=dt))[None]  # [C=1, N, d_out]: example n reaches output n
    stats = make_stats(FactoredSqrt(a, g), layout_for(3, 3, False, False), a.T @ a / 3,
                       torch.einsum("cno,cnp->op", g, g), kind="linear", num_examples=3)
    stats.grad = torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=dt)
    ekfac = approximate(stats, "ekfac")
    with pytest.warns(RuntimeWarning, match=r"repeated eigenvalues.*\['0'\]|\['0'\].*repeated eigenvalues"):
        ds = measure({"0": stats}, {"0": {"ekfac": ekfac}}, damping=1e-3,
                     damping_strategies={"ekfac": DEFAULT_DAMPING["ekfac"]})
    assert ds.attrs["basis_dependent"] == "0", ds.attrs["basis_dependent"]
    # why: the partial trace is isotropic there, the approximation is not the same in another basis
    lam, u_in = torch.linalg.eigh(stats.kfac["mc"].A)
    space = u_in[:, :2]  # eigenvalue 1/3, twice (4/3 once)
    assert float(lam[1] - lam[0]) < 1e-12 and float(lam[2] - lam[1]) > 0.5
    weights = space.T @ stats.sqrt.partial_traces()[0] @ space
    assert torch.allclose(weights, weights.diagonal().mean() * torch.eye(2, dtype=dt), atol=1e-12)
    turned = u_in.clone()
    turned[:, :2] = space @ torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=dt)
    u_out = torch.eye(3, dtype=dt)
    f = stats.dense_fisher()
    ekfac_dense = [_ekfac_dense(f, u_out, basis, stats.layout) for basis in (u_in, turned)]
    assert float((ekfac_dense[1] - ekfac_dense[0]).norm() / ekfac_dense[0].norm()) > 1e-2


@pytest.mark.parametrize("case", ["taps alike", "dead channel"])
def test_reduce_flags_a_factor_that_loses_rank_by_structure_and_only_where_the_gradients_reach_it(case: str) -> None:
    """More examples than inputs, and still a rank-deficient ``A`` under ``reduce``: a U-Net's
    ``ConvTranspose2d(k=2, stride=2)`` sums every tap over the same pixels (rank ``C_in + 1``), and
    EKFAC moved with eigh's basis of its null space while ``basis_dependent`` said none (QA24). A
    dead input channel also leaves ``A`` a null space, which no gradient reaches: not flagged."""
    torch.manual_seed(0)
    if case == "taps alike":
        net = nn.Sequential(nn.ConvTranspose2d(3, 2, 2, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(128, 3)).double()
        x = torch.randn(40, 3, 4, 4, dtype=torch.float64)
    else:
        net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 3)).double()
        x = torch.randn(40, 2, 6, 6, dtype=torch.float64)
        x[:, 0] = 0
    y, loss_fn = torch.randint(0, 3, (40,)), nn.CrossEntropyLoss()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        ds = compare(net, loss_fn, x, y, approximations=("kflr", "ekfac"), kfac_approx="reduce")
    told = [str(w.message) for w in said if "null spaces" in str(w.message)]
    s = extract(net, loss_fn, x, y, stats=("sqrt", "kfac"), kfac_flavours=("exact",), kfac_approx="reduce")["0"]
    a, g = s.kfac["exact"].A.double(), s.kfac["exact"].G.double()
    assert s.num_examples >= a.shape[0] and int(torch.linalg.matrix_rank(a, hermitian=True)) < a.shape[0]
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    nudged = a + (noise + noise.T) * 1e-16 * a.abs().max()
    dense = [EKFAC.from_factors(f, g, sqrt=s.sqrt, layout=s.layout).to_dense() for f in (a, nudged)]
    moved = ((dense[1] - dense[0]).norm() / dense[0].norm()).item()
    if case == "taps alike":
        assert ds.attrs["basis_dependent"] == "0" and len(told) == 1 and "'0'" in told[0]
        assert moved > 1e-3  # why it is flagged
    else:
        assert ds.attrs["basis_dependent"] == "none" and not told
        assert moved < 1e-8


def test_the_dataset_says_what_each_approximation_is_built_from() -> None:
    """KFAC is built from MC labels and KFLR from the exact GGN whatever ``fisher`` is, the others
    from F's own flavour: under ``fisher="empirical"`` the columns are not like for like, which
    nothing said (QA20); and the block-size limit named only the approximations measured."""
    model = tiny_mlp(0)
    x, y = batch(model, nn.CrossEntropyLoss(), 8)
    ds = compare(model, nn.CrossEntropyLoss(), x, y, fisher="empirical", approximations=("kfac", "kflr", "tekfac"))
    assert ds.attrs["built_from"] == "kfac: mc; kflr: exact; tekfac: empirical"
    assert ds.attrs["measured_up_to"] == "none"
    text = summary_markdown(ds)
    assert "built from (the flavour of its statistics" in text and "kfac: mc; kflr: exact; tekfac: empirical" in text
    assert "Measured only on blocks up to" not in text
    ds = compare(model, nn.CrossEntropyLoss(), x, y, fisher="mc", approximations=("ekfac", "kfoc"))
    assert ds.attrs["built_from"] == "ekfac: mc; kfoc: mc" and ds.attrs["measured_up_to"] == "kfoc: P ≤ 131072"


def test_measure_damps_each_approximation_as_compare_does_and_refuses_what_it_cannot_place() -> None:
    """``curvlab.measure`` damped every approximation missing from ``damping_strategies`` "exact"
    (TEKFAC's ng_cosine 0.819 against compare's 0.824 under its "nor"), took a misspelt key
    silently, and let ``attrs`` replace the damping and flavour it records (QA26)."""
    import curvlab

    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, 6)
    reference = compare(model, loss_fn, x, y, approximations=("kfac", "tekfac"), damping=1e-2, seed=0)
    stats = extract(model, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"), kfac_flavours=("exact", "mc"), seed=0)
    objects = {layer: {n: approximate(s, n) for n in ("kfac", "tekfac")} for layer, s in stats.items()}
    ds = curvlab.measure(stats, objects, damping=1e-2, damping_strategies={})
    assert ds.attrs["damping_strategies"] == f"kfac={DEFAULT_DAMPING['kfac']};tekfac={DEFAULT_DAMPING['tekfac']}"
    np.testing.assert_allclose(ds.ng_cosine.values, reference.ng_cosine.values, rtol=1e-10)
    with pytest.raises(ValueError, match=r"damping_strategies names \['tekfc'\], which nothing measured is"):
        curvlab.measure(stats, objects, damping=1e-2, damping_strategies={"tekfc": "nor"})
    own = {layer: {"tekfac@mine": a["tekfac"]} for layer, a in objects.items()}
    with pytest.raises(ValueError, match=r"has no entry for \['tekfac@mine'\], which have no default damping"):
        curvlab.measure(stats, own, damping=1e-2, damping_strategies={})
    with pytest.raises(ValueError, match=r"attrs\['damping'\] = 0.1 would replace the damping the comparison records"):
        compare(model, loss_fn, x, y, approximations=("kfac",), damping=1e-2, attrs={"damping": 0.1})
    with pytest.raises(ValueError, match=r"attrs\['seed'\] = 42 would replace the seed"):
        compare(model, loss_fn, x, y, approximations=("kfac",), seed=0, attrs={"seed": 42})
    kept = compare(model, loss_fn, x, y, approximations=("kfac",), damping=1e-2,
                   attrs={"damping": 1e-2, "data_seed": 42})  # the same value, or a name of its own: kept
    assert kept.attrs["damping"] == 1e-2 and kept.attrs["data_seed"] == 42
