"""``convention_error`` against the dense ``‖VVᵀ − V_cV_cᵀ‖_F / ‖VVᵀ‖_F`` (float64), on both
accurate routes (``P ≤ n``: the ``P × P`` difference; ``P > n``: the QR of ``[V V_c]``) and on the
Gram expansion it falls back to above ``DENSE_EIGH_LIMIT``."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from curvlab.compare import metrics
from curvlab.compare.metrics import convention_error, exact_block
from curvlab.sqrt import DenseSqrt, FactoredSqrt, SquareRoot

torch.set_num_threads(1)

# (d_out, D, K): P = 12 ≤ n = K + K_c, and P = 35 > n
SHAPES = {"pxp": (3, 4, 10), "qr": (5, 7, 6)}


def exact_sqrt(d_out: int, d_in: int, k: int, seed: int = 0) -> DenseSqrt:
    """Random ``M_k`` with norms spread over four decades (an ill-conditioned Gram)."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(k, d_out, d_in, generator=gen, dtype=torch.float64)
    return DenseSqrt(m * torch.logspace(0, -4, k, dtype=torch.float64)[:, None, None])


def dense_error(exact: SquareRoot, convention: SquareRoot) -> tuple[float, float]:
    v, v_c = exact.matrices().flatten(1), convention.matrices().flatten(1).to(torch.float64)
    f, f_c = v.T @ v, v_c.T @ v_c
    return (torch.linalg.matrix_norm(f - f_c) / torch.linalg.matrix_norm(f)).item(), (f_c.trace() / f.trace()).item()


def mixed(sqrt: DenseSqrt, rows: int, seed: int = 1) -> DenseSqrt:
    """``M_c = Q M`` for ``Q`` (``rows × K``) with orthonormal columns: the same block, other rows."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(rows, sqrt.num_columns, generator=gen, dtype=torch.float64))[0]
    return DenseSqrt(torch.einsum("jk,kod->jod", q, sqrt.m))


def split(sqrt: DenseSqrt) -> DenseSqrt:
    """The last half of the rows split in two halves of equal weight: ``M → M/√2, M/√2``."""
    half = sqrt.num_columns // 2
    tail = sqrt.m[half:] / 2**0.5
    return DenseSqrt(torch.cat([sqrt.m[:half], tail, tail]))


@pytest.mark.parametrize("route", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 3e-5])
def test_inexact_convention_matches_dense(route: str, scale: float) -> None:
    """A random convention (another number of rows, float32 as the statistics may be), far from the
    block and close to it: at ``3e-5`` the Gram expansion is off by ~1e-8 relative, the QR by ~1e-11."""
    d_out, d_in, k = SHAPES[route]
    sqrt = exact_sqrt(d_out, d_in, k)
    noise = exact_sqrt(d_out, d_in, k + 2, seed=2).m
    conv = DenseSqrt(torch.cat([sqrt.m, torch.zeros_like(sqrt.m[:2])]) + scale * noise).to(torch.float32)
    error, ratio = convention_error(exact_block(sqrt, top=4, top_k=2), conv)
    want, want_ratio = dense_error(sqrt, conv)
    assert want > 1e-6 * scale
    assert error == pytest.approx(want, rel=1e-10)
    assert ratio == pytest.approx(want_ratio, rel=1e-12)


@pytest.mark.parametrize("route", SHAPES)
@pytest.mark.parametrize("other", ["rotated", "more_rows", "split", "factored"])
def test_exact_convention_is_zero(route: str, other: str) -> None:
    """``F_c == F`` through another square root: the error is rounding of ‖F‖ (< 1e-13; dense: ~1e-16)."""
    d_out, d_in, k = SHAPES[route]
    sqrt = exact_sqrt(d_out, d_in, k)
    if other == "factored":  # the block of a linear layer, stored factored, its rows reversed as dense
        gen = torch.Generator().manual_seed(3)
        a = torch.randn(k // 2, d_in, generator=gen, dtype=torch.float64)
        g = torch.randn(2, k // 2, d_out, generator=gen, dtype=torch.float64)
        conv: SquareRoot = FactoredSqrt(a * torch.logspace(0, -3, k // 2, dtype=torch.float64)[:, None], g)
        sqrt = DenseSqrt(conv.matrices().flip(0))
    elif other == "split":
        conv = split(sqrt)
    else:
        conv = mixed(sqrt, k if other == "rotated" else k + 3)
    want, want_ratio = dense_error(sqrt, conv)
    error, ratio = convention_error(exact_block(sqrt, top=4, top_k=2), conv)
    assert want < 1e-14
    assert error < 1e-13
    assert ratio == pytest.approx(want_ratio, rel=1e-12)


def qr_calls(monkeypatch) -> list[Tensor]:
    calls: list[Tensor] = []
    qr = torch.linalg.qr

    def counting(a, *args, **kwargs):
        calls.append(a)
        return qr(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "qr", counting)
    return calls


@pytest.mark.parametrize("route", SHAPES)
def test_fallback_above_the_limit(monkeypatch, route: str) -> None:
    """Above the work limit the Gram expansion: no QR, the value right at its resolution (√eps
    relative to ‖F‖: 1e-7 absolute for an exact convention)."""
    d_out, d_in, k = SHAPES[route]
    sqrt = exact_sqrt(d_out, d_in, k)
    block, same = exact_block(sqrt, top=4, top_k=2), mixed(sqrt, k + 3)
    inexact = DenseSqrt(sqrt.m + 0.1 * exact_sqrt(d_out, d_in, k, seed=2).m)
    calls = qr_calls(monkeypatch)
    convention_error(block, same)
    assert len(calls) == (route == "qr")  # the accurate route below the limit
    calls.clear()
    monkeypatch.setattr(metrics, "DENSE_EIGH_LIMIT", 4)
    error, _ = convention_error(block, inexact)
    assert error == pytest.approx(dense_error(sqrt, inexact)[0], rel=1e-8)
    exact, _ = convention_error(block, same)
    assert 0 <= exact < 1e-7
    assert not calls
