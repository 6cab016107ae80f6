"""Random curvature blocks with dense references for tests/test_approx.py (float64)."""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.approx import DampingStrategy
from curvlab.stats import KroneckerFactors, LayerStats, TraceStats
from curvlab.block import BlockLayout
from curvlab.sqrt import DenseSqrt, FactoredSqrt, SquareRoot

DT = torch.float64

#: (kind, bias_column) of every test block.
CASES = [("linear", True), ("linear", False), ("conv", True), ("conv", False)]


def layout_for(d_out: int, d_w: int, bias: bool, conv: bool) -> BlockLayout:
    """Layout of a ``d_out × d_w`` weight (conv: ``[d_out, d_w/2, 1, 2]``) with optional bias."""
    weight_shape = (d_out, d_w // 2, 1, 2) if conv else (d_out, d_w)
    return BlockLayout(d_out, d_w + int(bias), bias_column=bias, weight_shape=weight_shape)


def with_bias(x: Tensor, bias: bool) -> Tensor:
    """Append the homogeneous coordinate 1 as last feature when ``bias``."""
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1) if bias else x


def make_stats(
    sqrt: SquareRoot,
    layout: BlockLayout,
    A: Tensor,
    G: Tensor,
    *,
    kind: str,
    name: str = "net.layer",
    num_examples: int = 1,
    flavour: str = "mc",
) -> LayerStats:
    """LayerStats with the square root, KFAC factors (both "mc" and "exact") and TKFAC's
    partial traces of ``sqrt``."""
    delta_phi, delta_psi = sqrt.partial_traces()
    return LayerStats(
        name=name,
        module_type="Linear" if kind == "linear" else "Conv2d",
        layout=layout,
        flavour=flavour,
        num_examples=num_examples,
        num_locations=1,
        sqrt=sqrt,
        kfac={"mc": KroneckerFactors(A=A, G=G), "exact": KroneckerFactors(A=A, G=G)},
        tkfac=TraceStats(delta=sqrt.trace(), delta_phi=delta_phi, delta_psi=delta_psi),
    )


def linear_block(seed: int, bias: bool, d_out: int = 3, d_w: int = 4, n: int = 7, c: int = 2) -> LayerStats:
    """Linear layer ``M_{c,n} = g_{c,n} ā_nᵀ`` with heteroscedastic samples;
    ``A = āᵀā/N``, ``G = Σ g gᵀ`` by definition."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=gen, dtype=DT) * 2 + 0.2  # varying per-sample norms
    a = with_bias(torch.randn(n, d_w, generator=gen, dtype=DT) * scale, bias)
    g = torch.randn(c, n, d_out, generator=gen, dtype=DT) / n
    A = a.T @ a / n
    G = torch.einsum("cno,cnp->op", g, g)
    return make_stats(FactoredSqrt(a, g), layout_for(d_out, d_w, bias, False), A, G, kind="linear", num_examples=n)


def conv_block(seed: int, bias: bool, d_out: int = 3, d_w: int = 4, t: int = 3, n: int = 4, c: int = 2) -> LayerStats:
    """Conv-like layer ``M_{c,n} = G_{c,n}ᵀ Ā_n`` over ``T`` locations (DenseSqrt); KFC factors
    ``A = Σ_{n,t} ā āᵀ/(N T)``, ``G = Σ_{c,n,t} g gᵀ``."""
    gen = torch.Generator().manual_seed(seed)
    a = with_bias(torch.randn(n, t, d_w, generator=gen, dtype=DT), bias)
    a = a * (torch.rand(n, 1, 1, generator=gen, dtype=DT) * 2 + 0.2)
    g = torch.randn(c, n, t, d_out, generator=gen, dtype=DT) / n
    mats = torch.einsum("cnto,ntd->cnod", g, a).reshape(c * n, d_out, -1)
    A = torch.einsum("ntd,nte->de", a, a) / (n * t)
    G = torch.einsum("cnto,cntp->op", g, g)
    return make_stats(DenseSqrt(mats), layout_for(d_out, d_w, bias, True), A, G, kind="conv", num_examples=n)


def block(kind: str, bias: bool, seed: int = 0) -> LayerStats:
    """One of :data:`CASES`."""
    return linear_block(seed, bias) if kind == "linear" else conv_block(seed, bias)


def dense_fisher_matrix_order(sqrt: SquareRoot) -> Tensor:
    """``F`` indexed by the row-major flattening of the matrix form: ``Σ_k vec M_k vec M_kᵀ``."""
    v = sqrt.matrices().flatten(1)
    return v.T @ v


def projectors(u: Tensor) -> list[Tensor]:
    """``u_a u_aᵀ`` per column, then ``I − U Uᵀ`` if ``u`` has fewer columns than rows (a truncated
    basis's complement): the eigenspaces of a factor flat on its complement, no completion needed."""
    out = [torch.outer(u[:, a], u[:, a]) for a in range(u.shape[1])]
    if u.shape[1] < u.shape[0]:
        out.append(torch.eye(u.shape[0], dtype=u.dtype) - u @ u.T)
    return out


def to_flat(dense: Tensor, layout: BlockLayout) -> Tensor:
    """A matrix-order ``P × P`` matrix in the flat parameter order."""
    perm = layout.permutation()
    return dense[perm][:, perm]


def rel(a: Tensor, b: Tensor) -> float:
    """``‖a − b‖ / max(‖b‖, tiny)``."""
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-300))


def fro_err(f: Tensor, k: Tensor) -> float:
    """``‖F − K̂‖_F``."""
    return float(torch.linalg.norm(f - k))


class Negated(DampingStrategy):
    """A (broken) user strategy dividing by ``−(s + λ)``: the damped inverse is negative
    definite, every direction uphill, on any machine."""

    name = "negated"

    def increment(self, approx, damping):  # noqa: ANN001, ANN201
        return -damping - 2 * approx.eigenvalues(compressed=True)
