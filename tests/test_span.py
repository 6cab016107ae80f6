"""Decompositions through the span of a layer's inputs (:func:`curvlab.approx.eigh.within_span`):
the same eigenpairs, inverses and comparison as the full decomposition, where a factor's range
lies in the span, and the full decomposition where it does not."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import curvlab.approx.eigh as eigh_module
from curvlab.approx import EighPolicy, factor_eigh, psd_eigh
from curvlab.approx.eigh import span_basis, span_projection, within_span
from curvlab import mkl
from curvlab.approx.inverse import FactorInverse
from curvlab.approx.kfoc import KFOC
from curvlab.approx.registry import REGISTRY
from curvlab.compare import compare
from curvlab.sqrt import DenseSqrt, UnfoldedSqrt

DT = torch.float64

N, R = 40, 12  # factor width, rows (R ≤ N/2: span_basis gives a span)


def low_rank_factor(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A PSD ``Xᵀ diag(w) X`` of ``R`` rows, one row repeated (the span has a zero direction)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(R, N, generator=gen, dtype=torch.float64)
    x[-1] = x[0]
    w = torch.rand(R, generator=gen, dtype=torch.float64) + 0.1
    return x.T @ (w[:, None] * x), x


def test_span_eigenpairs_are_the_full_ones() -> None:
    m, x = low_rank_factor()
    basis = span_basis(x)
    assert basis is not None and basis.shape == (N, R)
    with within_span(basis):
        lam, u = factor_eigh(m)
    lam_ref, _ = psd_eigh(m)
    torch.testing.assert_close(lam, lam_ref, atol=1e-12 * lam_ref[-1].item(), rtol=0)
    torch.testing.assert_close(u.T @ u, torch.eye(N, dtype=torch.float64), atol=1e-13, rtol=0)
    torch.testing.assert_close((u * lam) @ u.T, m, atol=1e-12 * m.abs().max().item(), rtol=0)
    assert bool((lam[1:] >= lam[:-1]).all())


def test_a_factor_outside_the_span_is_not_taken() -> None:
    _, x = low_rank_factor()
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(2 * N, N, generator=gen, dtype=torch.float64)
    assert span_projection(y.T @ y, span_basis(x)) is None  # full rank: most of it outside
    m, _ = low_rank_factor()
    m[0, 0] = float("nan")
    assert span_projection(m, span_basis(x)) is None  # left to psd_eigh, which names the cause
    with pytest.raises(ValueError, match="non-finite"), within_span(span_basis(x)):
        factor_eigh(m)


def test_span_basis_only_where_it_pays() -> None:
    gen = torch.Generator().manual_seed(0)
    assert span_basis(torch.randn(N // 2 + 1, N, generator=gen)) is None
    assert span_basis(torch.randn(N // 2, N, generator=gen)).dtype == torch.float64


def test_factor_eigh_goes_through_the_span_of_the_scope(monkeypatch) -> None:
    m, x = low_rank_factor()
    sizes = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *args, **kw: sizes.append(a.shape[0]) or eigh(a, *args, **kw))
    with within_span(span_basis(x)):
        lam, u = factor_eigh(m)
        truncated = factor_eigh(m, EighPolicy(truncate_above=N - 1, rank=4))  # a truncation is not replaced
    assert sizes[0] == R and N not in sizes[1:] and len(truncated[0]) == 5
    lam_ref, _ = psd_eigh(m)
    torch.testing.assert_close(lam, lam_ref, atol=1e-12 * lam_ref[-1].item(), rtol=0)
    sizes.clear()
    factor_eigh(m)  # outside the scope: the full decomposition
    assert sizes == [N]


def test_span_damped_inverse_is_the_dense_one(monkeypatch) -> None:
    """Through the span the damped inverse is applied in its spectral form (no ``N × N`` inverse,
    no Cholesky): from either side, the dense float64 inverse's product."""
    m, x = low_rank_factor()
    c, shift = torch.tensor(0.7, dtype=torch.float64), torch.tensor(1e-3, dtype=torch.float64)
    ref = torch.linalg.inv(c * m + shift * torch.eye(N, dtype=torch.float64))
    z = torch.randn(5, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", None)  # a dense route would fail
    monkeypatch.setattr(mkl, "spd_inverse_", None)
    with within_span(span_basis(x)):
        inv = FactorInverse(m, c, shift, None)
    scale = ref.abs().max().item() * z.abs().max().item()
    torch.testing.assert_close(inv.from_right(z), z @ ref, atol=1e-10 * scale, rtol=0)
    torch.testing.assert_close(inv.from_left(z.T), ref @ z.T, atol=1e-10 * scale, rtol=0)


def conv_net() -> nn.Sequential:
    """Convolutions whose input factors are wider than twice the batch's rows (3 examples)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),  # 8 × 4 × 4
        nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(),  # 16 × 2 × 2: D = 73 from 12 rows
        nn.Linear(64, 5),  # D = 65 from 3 rows
    ).double()


@pytest.mark.parametrize("coupled", [False, True])
def test_comparison_through_spans_equals_the_full_one(coupled: bool, monkeypatch) -> None:
    """Also with a train-mode BatchNorm: the roots of its coupled examples keep the layer's
    inputs for their span, and the coupling error is taken in it."""
    model, loss_fn = conv_net(), nn.CrossEntropyLoss()
    if coupled:  # in train mode: batch statistics
        model.insert(4, nn.BatchNorm2d(16).double())
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3, 16, 16, generator=gen, dtype=torch.float64), torch.randint(0, 5, (3,), generator=gen)
    names = ("kfac", "kflr", "ekfac", "tkfac", "tekfac", "kfoc")
    sizes = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a, *args, **kw: sizes.append(a.shape[0]) or eigh(a, *args, **kw))
    through = compare(model, loss_fn, x, y, approximations=names, seed=0)
    assert 73 not in sizes and 65 not in sizes  # the input factors of the last two layers: spans
    monkeypatch.setattr(eigh_module, "SPAN_MAX_SHARE", 0.0)  # no span: every factor in full
    sizes.clear()
    full = compare(model, loss_fn, x, y, approximations=names, seed=0)
    assert 73 in sizes and 65 in sizes
    for var in through.data_vars:
        a, b = through[var].values, full[var].values
        if a.dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=var)


@pytest.mark.parametrize("kind", ["unfolded", "dense"])
def test_kfoc_fits_in_the_span_of_the_inputs(kind: str, monkeypatch) -> None:
    """Inside a span holding the root's input rows KFOC iterates on ``r × r`` input-side
    matrices (``M_k Q``) and returns ``C = Q C̃ Qᵀ``: the pair the full iteration finds."""
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(3, N, 4, generator=gen, dtype=torch.float64)  # 12 rows spanning 12 of 40
    root = UnfoldedSqrt(a, torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64))
    if kind == "dense":
        root = DenseSqrt(root.matrices(), root.input_rows())
    start = root.sandwich_in(torch.eye(5, dtype=torch.float64))  # a PSD start in the span
    full = KFOC.fit(root, init=start)
    widths = []
    method = type(root).sandwich_out
    monkeypatch.setattr(type(root), "sandwich_out", lambda self, c: widths.append(c.shape[0]) or method(self, c))
    with within_span(span_basis(root.input_rows())):
        spanned = KFOC.fit(root, init=start)
    assert widths and set(widths) == {R}
    assert spanned.converged and spanned.C.shape == (N, N)
    torch.testing.assert_close(spanned.B, full.B, atol=1e-9 * full.B.abs().max().item(), rtol=0)
    torch.testing.assert_close(spanned.C, full.C, atol=1e-9 * full.C.abs().max().item(), rtol=0)
    with within_span(span_basis(torch.randn(R, N, generator=gen, dtype=torch.float64))):  # another span
        widths.clear()
        KFOC.fit(root, init=start)
    assert set(widths) == {N}


def test_kfoc_size_limit_counts_the_span(monkeypatch) -> None:
    """KFOC's ``max_params`` bounds the block it fits: ``d_out·r`` in the span of a narrower
    batch's ``r`` input rows, else ``P`` (its iteration's cost)."""
    model, loss_fn = conv_net(), nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 3, 16, 16, generator=gen, dtype=torch.float64), torch.randint(0, 5, (3,), generator=gen)
    unlimited = compare(model, loss_fn, x, y, approximations=("kfac", "kfoc"), seed=0)
    # P: 224 (768 rows: no span), 1168 (16·12 = 192 in the span), 325 (5·3 = 15 in the span)
    assert unlimited.num_params.values.tolist() == [224, 1168, 325]
    monkeypatch.setitem(REGISTRY, "kfoc", dataclasses.replace(REGISTRY["kfoc"], max_params=200))
    limited = compare(model, loss_fn, x, y, approximations=("kfac", "kfoc"), seed=0)
    kfoc = limited.rel_frobenius_error.sel(approximation="kfoc").values
    assert np.isnan(kfoc[0])
    np.testing.assert_array_equal(kfoc[1:], unlimited.rel_frobenius_error.sel(approximation="kfoc").values[1:])
    assert not np.isnan(kfoc[1:]).any()


def test_spanned_eigh_places_the_complement_as_the_sorted_concatenation() -> None:
    """λ on both sides of μ: the fast placement [λ ≤ μ | complement | λ > μ] is, bit for bit,
    ``cat([Q W, complete_basis(Q)[:, r:]])[:, argsort(values, stable)]`` — the construction it
    replaced (the commit's claim: report.nc bit-identical) — and an eigendecomposition of M."""
    from curvlab.approx.eigh import spanned_eigh
    from curvlab.approx.spectral import complete_basis

    gen = torch.Generator().manual_seed(0)
    n, r = 9, 4
    basis = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=DT))[0]
    a = torch.randn(r, r, generator=gen, dtype=DT)
    lam, w = torch.linalg.eigh(a @ a.T)
    flat = lam[1:3].mean()  # two λ below μ, two above
    values, vectors = spanned_eigh(basis, lam, w, flat)
    all_values = torch.cat([lam, flat.expand(n - r)])
    order = all_values.argsort(stable=True)
    expected = torch.cat([basis @ w, complete_basis(basis)[:, r:]], 1)[:, order]
    assert torch.equal(values, all_values[order]) and torch.equal(vectors, expected)
    m = basis @ (a @ a.T) @ basis.T + flat * (torch.eye(n, dtype=DT) - basis @ basis.T)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, m)
