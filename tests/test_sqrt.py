"""Every square-root back-end against the dense definitions of its reductions (float64), with
``M`` reduced whole and in chunks of ``k`` (:data:`curvlab.sqrt.CHUNK_ELEMENTS`)."""

from __future__ import annotations

import pytest
import torch

import curvlab.sqrt
from curvlab.sqrt import DenseSqrt, FactoredSqrt, SquareRoot, UnfoldedSqrt

DT = torch.float64
C, N, D_OUT, D_IN, T = 2, 3, 3, 5, 4


def roots() -> dict[str, SquareRoot]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(N, D_IN, generator=gen, dtype=DT)
    g = torch.randn(C, N, D_OUT, generator=gen, dtype=DT)
    factored = FactoredSqrt(a, g)
    conv = DenseSqrt(torch.randn(C * N, D_OUT, D_IN, generator=gen, dtype=DT))
    unfolded = UnfoldedSqrt(torch.randn(N, D_IN, T, generator=gen, dtype=DT),
                            torch.randn(C, N, D_OUT, T, generator=gen, dtype=DT))
    few_locations = UnfoldedSqrt(torch.randn(N, D_IN, 2, generator=gen, dtype=DT),  # T² ≤ D: the Gram by T × T products
                                 torch.randn(C, N, D_OUT, 2, generator=gen, dtype=DT))
    # coupled examples (maths.coupled_square_root): every column reaches all N·T locations
    one_example = UnfoldedSqrt(torch.randn(1, D_IN, N * T, generator=gen, dtype=DT),
                               torch.randn(C * N, 1, D_OUT, N * T, generator=gen, dtype=DT))
    return {"factored": factored, "dense-of-factored": DenseSqrt(factored.matrices()), "dense": conv,
            "unfolded": unfolded, "unfolded-few-locations": few_locations, "unfolded-one-example": one_example}


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DT))
    return q[:, :k]


@pytest.fixture(params=[None, 1, 2], ids=["whole", "chunks-of-1", "chunks-of-2"])
def chunk_columns(request, monkeypatch):
    """Chunks of this many ``M_k`` (``None``: the default limit, one chunk here)."""
    if request.param is not None:
        monkeypatch.setattr(curvlab.sqrt, "CHUNK_ELEMENTS", request.param * D_OUT * D_IN)
    return request.param


@pytest.mark.parametrize("name", ["factored", "dense-of-factored", "dense", "unfolded", "unfolded-few-locations",
                                  "unfolded-one-example"])
@pytest.mark.parametrize("widths", [(D_OUT, D_IN), (2, 3)], ids=["full-basis", "truncated-basis"])
def test_reductions_are_their_dense_definitions(name: str, widths: tuple[int, int], chunk_columns) -> None:
    root = roots()[name]
    m = root.matrices()
    v = m.flatten(1)  # [K, P], row-major vec(M_k)
    fisher = v.T @ v
    u_out, u_in = orthonormal(D_OUT, widths[0], 1), orthonormal(D_IN, widths[1], 2)
    q = torch.kron(u_out, u_in)  # vec(U_outᵀ M U_in) = qᵀ vec(M)
    b = torch.randn(D_OUT, D_OUT, dtype=DT)
    c = torch.randn(D_IN, D_IN, dtype=DT)
    x = torch.randn(D_OUT, D_IN, dtype=DT)
    w = torch.randn(m.shape[0], dtype=DT)

    torch.testing.assert_close(root.column_norms_sq(), (v * v).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(root.gram(), v @ v.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(root.inner(x), v @ x.flatten(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(root.combine(w), (w @ v).reshape(D_OUT, D_IN), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(root.sandwich_in(b), sum(mk.T @ b @ mk for mk in m), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(root.sandwich_out(c), sum(mk @ c @ mk.T for mk in m), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(root.rotated_sq_sum(u_out, u_in), torch.diagonal(q.T @ fisher @ q).reshape(widths),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(root.diagonal(), torch.diagonal(fisher).reshape(D_OUT, D_IN), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(root.trace(), torch.trace(fisher), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["unfolded", "dense"])
def test_rotation_beyond_the_span_of_the_inputs(kind: str) -> None:
    """Inputs spanning 6 of 20 directions (3 examples at 2 locations), rotated into a basis of
    their span completed to the whole space: the sums of the directions no input reaches are 0
    and the others are their dense definitions — for the unfolded root, and for the dense one
    of coupled examples given the inputs (each M_k a mix of every example's products)."""
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 20, 2, generator=gen, dtype=DT)
    root = UnfoldedSqrt(a, torch.randn(C, 3, D_OUT, 2, generator=gen, dtype=DT))
    if kind == "dense":
        mixing = torch.randn(C * 3 + 2, C * 3, generator=gen, dtype=DT)
        root = DenseSqrt(torch.einsum("jk,kod->jod", mixing, root.matrices()), root.input_rows())
        assert root.input_rows() is not None and root.to(dtype=torch.float32).input_rows().dtype == torch.float32
    span = torch.linalg.qr(a.transpose(1, 2).reshape(-1, 20).T).Q
    u_in = torch.linalg.qr(torch.cat([span, torch.randn(20, 14, generator=gen, dtype=DT)], 1)).Q
    u_in = u_in[:, torch.randperm(20, generator=gen)].contiguous()  # reached and unreached mixed
    u_out = orthonormal(D_OUT, D_OUT, 1)
    v = root.matrices().flatten(1)
    q = torch.kron(u_out.contiguous(), u_in)
    dense = torch.diagonal(q.T @ (v.T @ v) @ q).reshape(D_OUT, 20)
    got = root.rotated_sq_sum(u_out, u_in)
    unreached = (span.T @ u_in).norm(dim=0) < 1e-8
    assert int(unreached.sum()) == 14 and bool((got[:, unreached] == 0).all())
    torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12 * dense.max().item())


@pytest.mark.parametrize("chunks", [1, 3])
def test_wide_sandwiches_of_symmetric_matrices(chunks: int, monkeypatch) -> None:
    """Sides of 256 or more take the upper-triangle products (a symmetric ``B`` or ``C``, as
    KFOC's iterates): still the dense definitions."""
    gen = torch.Generator().manual_seed(3)
    k, d_out, d_in = 6, 260, 270
    m = torch.randn(k, d_out, d_in, generator=gen, dtype=DT)
    monkeypatch.setattr(curvlab.sqrt, "CHUNK_ELEMENTS", -(-k // chunks) * 2 * d_out * d_in)
    root = DenseSqrt(m)
    b = torch.randn(d_out, d_out, generator=gen, dtype=DT)
    c = torch.randn(d_in, d_in, generator=gen, dtype=DT)
    b, c = b @ b.T, c @ c.T
    b, c = (b + b.T) / 2, (c + c.T) / 2  # exactly symmetric, as KFOC symmetrizes its start
    torch.testing.assert_close(root.sandwich_in(b), sum(mk.T @ b @ mk for mk in m), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(root.sandwich_out(c), sum(mk @ c @ mk.T for mk in m), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("d_in,t", [(40, 2), (5, 8)], ids=["few-locations", "many-locations"])
def test_unfolded_gram_and_matrices_at_few_and_many_locations(d_in: int, t: int, chunk_columns) -> None:
    """The Gram of an unfolded root by the ``T × T`` products (few locations for the width) or
    by its ``M_k`` formed in chunks of examples (many): both ``VᵀV``."""
    gen = torch.Generator().manual_seed(4)
    root = UnfoldedSqrt(torch.randn(N, d_in, t, generator=gen, dtype=DT), torch.randn(C, N, 6, t, generator=gen, dtype=DT))
    m = torch.einsum("cnot,ndt->cnod", root.g, root.a).reshape(C * N, 6, d_in)  # k = c·N + n
    torch.testing.assert_close(root.matrices(), m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(root.gram(), m.flatten(1) @ m.flatten(1).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d_out,d_in", [(3, 1), (1, 4), (1, 1)])
def test_sandwiches_of_a_block_one_wide(d_out: int, d_in: int) -> None:
    """A 1×1 convolution of one channel (D = 1) failed in sandwich_out (a view of a copy)."""
    m = torch.randn(4, d_out, d_in, generator=torch.Generator().manual_seed(5), dtype=DT)
    root = DenseSqrt(m)
    b, c = torch.eye(d_out, dtype=DT), torch.eye(d_in, dtype=DT)
    torch.testing.assert_close(root.sandwich_out(c), sum(mk @ mk.T for mk in m), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(root.sandwich_in(b), sum(mk.T @ mk for mk in m), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d_in,t", [(40, 2), (5, 8)], ids=["few-locations", "many-locations"])
def test_unfolded_cross_gram_with_other_examples(d_in: int, t: int, chunk_columns) -> None:
    """``VᵀV_other`` of two unfolded roots of one layer on different examples (a shard of
    another process), by either route: the products of their matrices."""
    gen = torch.Generator().manual_seed(6)

    def root(n: int) -> UnfoldedSqrt:
        return UnfoldedSqrt(torch.randn(n, d_in, t, generator=gen, dtype=DT), torch.randn(C, n, 6, t, generator=gen, dtype=DT))

    mine, other = root(N), root(N + 2)
    want = mine.matrices().flatten(1) @ other.matrices().flatten(1).T
    torch.testing.assert_close(mine.cross_gram(other), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(other.cross_gram(mine), want.T, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="not of one layer"):
        mine.cross_gram(UnfoldedSqrt(other.a[:, :-1], other.g))


@pytest.mark.parametrize("name", ["factored", "dense", "unfolded"])
def test_root_in_an_input_basis(name: str) -> None:
    """``in_input_basis(Q)``: every ``M_k Q``, in the same back-end (the inputs rotated, for a
    dense root its input rows too)."""
    root = roots()[name]
    if name == "dense":
        root = DenseSqrt(root.matrices(), torch.randn(4, D_IN, generator=torch.Generator().manual_seed(9), dtype=DT))
    q = orthonormal(D_IN, 3, 7)
    got = root.in_input_basis(q)
    assert type(got) is type(root) and got.shape == (D_OUT, 3)
    torch.testing.assert_close(got.matrices(), root.matrices() @ q, rtol=1e-12, atol=1e-12)
    if name == "dense":
        torch.testing.assert_close(got.input_rows(), root.input_rows() @ q, rtol=1e-12, atol=1e-12)
