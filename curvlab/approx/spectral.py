"""Products with operators diagonal in a Kronecker eigenbasis, full or truncated (compressed form).

One side's basis is ``U ∈ R^{n × k}`` with orthonormal columns.  ``k = n``: a full basis.
``k < n``: a *truncated* basis, standing for ``U`` completed by any orthonormal basis of the
complement, on which every quantity of that side is flat (one value, multiplicity ``n − k``).
Quantities along a side are stored *compressed*: ``k`` entries for ``U``'s columns, plus one for
the complement when truncated (its :func:`width`).  An operator

    K = Σ_{a,b} s[a, b] · P_a ⊗ P_b,   P_a = u_a u_aᵀ (a < k),  P_k = I − U Uᵀ,

acts on ``X ∈ R^{d_out × D}`` as ``Σ s[a, b] P_a X P_b`` (:func:`diagonal_apply`); its eigenvalues
are ``s`` expanded by the multiplicities (:func:`expand`).  With full bases this is the usual
``U_out [(U_outᵀ X U_in) ⊙ s] U_inᵀ`` (four GEMMs).  A truncated side of rank ``k`` costs two
``n × k`` products instead of two ``n × n`` ones.

A full basis that permutes the unit vectors (a diagonal factor's: :mod:`curvlab.basis`) rotates
by gathering columns, not by ``n × n`` GEMMs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvlab.basis import in_basis, out_of_basis, permutation_order
from curvlab.reuse import digest, keep, kept, reuse, sharing

if TYPE_CHECKING:
    from curvlab.sqrt import SquareRoot


def is_truncated(u: Tensor) -> bool:
    """Whether the basis ``u`` (``[n, k]``) has fewer columns than rows."""
    return u.shape[-1] < u.shape[-2]


def width(u: Tensor) -> int:
    """Compressed length along this side: ``k``, plus one for a truncated basis's complement."""
    return u.shape[-1] + int(is_truncated(u))


def multiplicity(u: Tensor) -> Tensor:
    """How many eigen-directions each compressed entry stands for: ``[1, …, 1(, n − k)]``."""
    n, k = u.shape[-2:]
    out = torch.ones(width(u), dtype=u.dtype, device=u.device)
    if k < n:
        out[-1].fill_(n - k)  # (an assignment copies a host scalar: on a GPU a copy that waits)
    return out


def expand(values: Tensor, u: Tensor, dim: int = -1) -> Tensor:
    """Compressed ``values`` along ``dim`` → one entry per eigen-direction (``n`` of them)."""
    if not is_truncated(u):
        return values
    counts = multiplicity(u).long()
    return values.repeat_interleave(counts, dim=dim)


def complete_basis(u: Tensor) -> Tensor:
    """``[U, U_⊥]``: ``u`` completed to an orthonormal ``n × n`` basis (``u`` itself if full).

    For the dense/analysis paths only (it costs ``O(n² k)`` and ``n²`` memory).
    """
    if not is_truncated(u):
        return u
    return torch.cat([u, complement_basis(u)], dim=-1)


def complement_basis(u: Tensor) -> Tensor:
    """``U_⊥``: the last ``n − k`` columns of :func:`complete_basis` (``[n, n − k]``), without
    forming the completed ``n × n`` basis (a caller that places them itself saves that copy)."""
    # the Householder Q of u's QR in compact WY form, Q = H_1⋯H_k = I − V T Vᵀ with
    # T (I + striu(VᵀV) diag τ) = diag τ (no 1/τ: a reflector may be the identity, τ = 0), its
    # last n − k columns by two GEMMs: the Q of torch.linalg.qr(mode="complete") is LAPACK's
    # orgqr, unblocked below 128 reflectors (4608 × 64: 1.3 s against 0.13 s, equal to 1e-15)
    k = u.shape[-1]
    a, tau = torch.geqrf(u)
    v = a.tril(-1)
    v.diagonal(dim1=-2, dim2=-1).fill_(1)
    unit = (v.mT @ v).triu_(1).mul_(tau.unsqueeze(-2))
    unit.diagonal(dim1=-2, dim2=-1).fill_(1)
    t = torch.linalg.solve_triangular(unit, torch.diag_embed(tau), upper=True, left=False)
    rest = (v @ (t @ v[..., k:, :].mT)).neg_()
    rest[..., k:, :].diagonal(dim1=-2, dim2=-1).add_(1)
    return rest


def compress_mean(values: Tensor, u: Tensor, dim: int = -1) -> Tensor:
    """One entry per eigen-direction along ``dim`` (``n``) → compressed: the complement's
    entries replaced by their mean."""
    if not is_truncated(u):
        return values
    k = u.shape[-1]
    head, tail = values.split([k, values.shape[dim] - k], dim=dim)
    return torch.cat([head, tail.mean(dim, keepdim=True)], dim=dim)


def rotated_sq_sum(sqrt: "SquareRoot", u_out: Tensor, u_in: Tensor) -> Tensor:
    """``Σ_k (U_outᵀ M_k U_in)²`` in the root's dtype, at least float32 (:meth:`SquareRoot.rotated_sq_sum`);
    inside :func:`curvlab.reuse.shared_work`, once for the same root object and the same bases.

    A bfloat16/float16 root (of such a network) is rotated in float32: in its own dtype the
    rotation's rounding swamps small ``s*`` entries, and the roots' test for input directions no
    input reaches (``ε²`` of the dtype) took 25 % of the largest energy in bfloat16 for unreached,
    zeroing most of a convolution's ``s*``."""
    if sqrt.dtype.itemsize < 4:
        sqrt = sqrt.to(torch.float32)
    u_out, u_in = u_out.to(sqrt.dtype), u_in.to(sqrt.dtype)
    if not sharing():
        return sqrt.rotated_sq_sum(u_out, u_in)
    key = ("rotated_sq_sum", id(sqrt), digest(u_out), digest(u_in))
    return reuse(key, lambda: (sqrt, sqrt.rotated_sq_sum(u_out, u_in)))[1].clone()  # sqrt: kept alive


def optimal_scaling(sqrt: "SquareRoot", u_out: Tensor, u_in: Tensor) -> Tensor:
    """Compressed ``s* = diag(Qᵀ F Q)`` for ``F = Σ_k vec M_k vec M_kᵀ`` (EKFAC's rescaling).

    On a truncated side the complement entry is the mean of ``s*`` over the complement — the
    same for every completion, and the optimal flat value.  (Analysis path: the completion is
    formed.)
    """
    full = rotated_sq_sum(sqrt, complete_basis(u_out), complete_basis(u_in))
    return compress_mean(compress_mean(full, u_in, dim=-1), u_out, dim=-2)


def diagonal_in_basis(mat: Tensor, u: Tensor) -> Tensor:
    """Compressed ``diag(Uᵀ M U)`` of a PSD ``M`` (clamped at 0 against rounding); the
    complement entry is the mean over it, ``(tr M − Σ diag)/(n − k)``."""
    order = permutation_order(u)
    diag = (mat.diagonal()[order] if order is not None else ((mat @ u) * u).sum(0)).clamp_min(0)
    if not is_truncated(u):
        return diag
    rest = (mat.diagonal().sum() - diag.sum()) / (u.shape[0] - u.shape[1])
    return torch.cat([diag, rest.clamp_min(0).reshape(1)])


def dense_factor(values: Tensor, u: Tensor) -> Tensor:
    """``U diag(v) Uᵀ (+ μ (I − U Uᵀ))`` as an ``n × n`` matrix (dense paths only)."""
    return right_apply(torch.eye(u.shape[0], dtype=u.dtype, device=u.device), u, values.reshape(1, -1))


def right_apply(z: Tensor, u: Tensor, t: Tensor, u_t: Tensor | None = None) -> Tensor:
    """``Σ_b t[:, b] ⊙ (Z P_b)`` for ``Z [..., r, n]``, compressed ``t`` broadcastable to
    ``[r, width(u)]``: row ``i`` of ``Z`` scaled by ``t[i]`` in the basis ``u``.  ``u_t``: a
    truncated ``u``'s transpose in its own rows (:func:`transposed_basis`), for the product back."""
    if not is_truncated(u):
        return out_of_basis(in_basis(z, u).mul_(t), u)  # (the product is fresh: scaled in place)
    c = z @ u  # fresh: scaled in place
    flat = t[..., -1:]
    return z * flat + c.mul_(t[..., :-1] - flat) @ (u.mT if u_t is None else u_t)


def transposed_basis(u: Tensor) -> Tensor | None:
    """``Uᵀ`` of a truncated basis (``[n, k]``) as a row-major ``[k, n]`` copy, for operators
    applied many times (a damped inverse); ``None`` for a full one.  ``C Uᵀ`` with ``U``'s own
    rows read across is a transposed operand to BLAS; from few rows it ran far slower than from
    this copy (this project's CPU, MKL, one thread, float32: ``[10, 256] @ [256, 8193]`` — the
    CNN benchmark's ``Linear(8192, 10)`` — 1.54 against 0.55 ms; ``[512, 256] @ [256, 4608]``
    6.19 against 6.10)."""
    if not is_truncated(u) or u.dim() != 2:
        return None
    held = kept(u, "transposed")  # one copy per basis: EKFAC's inverse is rebuilt at every rescaling
    return held if held is not None else keep(u, "transposed", u.mT.contiguous())


def left_apply(z: Tensor, u: Tensor, t: Tensor) -> Tensor:
    """``Σ_a t[a] ⊙ (P_a Z)`` for ``Z [..., n, r]`` and compressed ``t [width(u)]`` (a factor
    function applied from the left: ``f(M) Z``)."""
    return right_apply(z.mT, u, t.reshape(1, -1)).mT


def diagonal_apply(x: Tensor, u_out: Tensor, u_in: Tensor, grid: Tensor,
                   flat_map: Tensor | None = None, u_in_t: Tensor | None = None) -> Tensor:
    """``Σ_{a,b} grid[a, b] P_a X P_b`` for ``X [..., d_out, D]`` and the compressed
    ``grid [width(u_out), width(u_in)]``.

    Where one side is truncated and the other a full dense basis, by :func:`flat_route` when
    that costs fewer flops; ``flat_map``: its :func:`complement_map`, prepared by a caller that
    applies the same operator many times (a damped inverse), else formed here; ``u_in_t``
    likewise: a truncated ``U_in``'s :func:`transposed_basis`."""
    back = u_in.mT if u_in_t is None else u_in_t
    if flat_map is not None:  # (the caller took flat_route's decision)
        side = "in" if is_truncated(u_in) else "out"
    else:
        side = flat_route(u_out, u_in, prepared=False)
        if side is not None:
            flat_map = complement_map(side, u_out, u_in, grid)
    if side == "in":  # F X + U_out [(s[:, :k] − s[:, k]) ⊙ (U_outᵀ X U_in)] U_inᵀ
        c = (u_out.mT @ (x @ u_in)).mul_(grid[:, :-1] - grid[:, -1:])
        return (flat_map @ x).addmm_(u_out @ c, back) if x.dim() == 2 else flat_map @ x + (u_out @ c) @ back
    if side == "out":  # X H + U_out [(s[:k] − s[k]) ⊙ (U_outᵀ X U_in)] U_inᵀ
        c = ((u_out.mT @ x) @ u_in).mul_(grid[:-1, :] - grid[-1:, :]) @ u_in.mT
        return (x @ flat_map).addmm_(u_out, c) if x.dim() == 2 else x @ flat_map + u_out @ c
    y = u_out.mT @ x
    if not is_truncated(u_out):
        return u_out @ right_apply(y, u_in, grid, u_in_t)
    rest = x - u_out @ y
    return u_out @ right_apply(y, u_in, grid[:-1], u_in_t) + right_apply(rest, u_in, grid[-1:], u_in_t)


def flat_route(u_out: Tensor, u_in: Tensor, prepared: bool = True) -> str | None:
    """``"in"`` (``"out"``) where :func:`diagonal_apply` takes the complement of the truncated input
    (output) side through the full side's :func:`complement_map` ``F`` (``H``), else ``None``.

    With ``U_in`` truncated to ``k`` of ``D`` columns and ``U_out`` full (``d_out``), the
    complement's part ``Σ_a s[a, k] P_a X (I − U_in U_inᵀ)`` is ``F X − F X U_in U_inᵀ`` with
    ``F = U_out diag(s[:, k]) U_outᵀ``; the second term joins the rank-``k`` one.  That is
    ``2 d_out² D + 4 d_out D k + 4 d_out² k`` flops against ``4 d_out² D + 4 d_out D k`` by rotating
    ``X`` in full (ResNet-18's ``512 × 4608`` blocks at ``k = 256``: 5.1 against 7.2 GFLOP), the
    fewer where ``D > 2k`` — and forming ``F`` (``2 d_out³``) where it is not ``prepared``.  The
    mirror image for a truncated output side (``H = U_in diag(s[k, :]) U_inᵀ``, ``D × D``) saves
    flops wherever ``H`` is prepared; it is taken on the same test, ``d_out > 2k`` (plus ``D``
    where ``H`` is formed on the spot).  Not for a basis
    that permutes the unit vectors (:func:`~curvlab.basis.permutation_order`: gathered, no GEMM)
    or leading batch dimensions in a basis."""
    if u_out.dim() != 2 or u_in.dim() != 2 or is_truncated(u_out) == is_truncated(u_in):
        return None
    side, full, trunc = ("in", u_out, u_in) if is_truncated(u_in) else ("out", u_in, u_out)
    n, (big, k) = full.shape[0], trunc.shape
    if permutation_order(full) is not None:
        return None
    form = 0 if prepared else n
    return side if big > 2 * k + form else None


def complement_map(side: str, u_out: Tensor, u_in: Tensor, grid: Tensor) -> Tensor:
    """:func:`diagonal_apply`'s map of the truncated ``side``'s complement (:func:`flat_route`):
    ``F = U_out diag(s[:, k]) U_outᵀ`` for ``"in"``, ``H = U_in diag(s[k, :]) U_inᵀ`` for ``"out"``."""
    u, values = (u_out, grid[:, -1]) if side == "in" else (u_in, grid[-1, :])
    return (u * values) @ u.mT


def projected_energy(x: Tensor, u_out: Tensor | None, u_in: Tensor | None, rows: Tensor, cols: Tensor) -> Tensor:
    """``‖P_a X P_b‖²_F`` for each compressed entry ``(a, b) = (rows, cols)``: ``P_a = u_a u_aᵀ`` for a
    basis column, ``I − U Uᵀ`` for a truncated side's complement (see
    this module's docstring); the complement's value is the same for every completion.  ``None``
    for both bases: the identity's (the diagonal approximation's; no ``D × D`` identity formed)."""
    if u_out is None and u_in is None:
        return x[rows, cols].square()
    out_full, in_full = rows < u_out.shape[1], cols < u_in.shape[1]
    energy = torch.zeros(len(rows), dtype=x.dtype, device=x.device)
    both = out_full & in_full
    if both.any():  # (u_aᵀ X u_b)²: one bilinear form each
        left, right = u_out[:, rows[both]], u_in[:, cols[both]]
        energy[both] = ((x @ right) * left).sum(0).square()
    sel = out_full & ~in_full
    if sel.any():  # ‖u_aᵀ X‖² − ‖u_aᵀ X U_in‖²
        r = u_out[:, rows[sel]].mT @ x
        energy[sel] = r.square().sum(1) - (r @ u_in).square().sum(1)
    sel = ~out_full & in_full
    if sel.any():  # ‖X u_b‖² − ‖U_outᵀ X u_b‖²
        c = x @ u_in[:, cols[sel]]
        energy[sel] = c.square().sum(0) - (u_out.mT @ c).square().sum(0)
    sel = ~out_full & ~in_full
    if sel.any():  # ‖(I − U_out U_outᵀ) X (I − U_in U_inᵀ)‖²
        rest = x - u_out @ (u_out.mT @ x)
        rest = rest - (rest @ u_in) @ u_in.mT
        energy[sel] = rest.square().sum()
    return energy.clamp_min(0)


@dataclass(frozen=True)
class TruncatedFactor:
    """A PSD factor given by a truncated eigen-decomposition (what
    :func:`curvlab.approx.eigh.randomized_eigh` returns):
    ``M̃ = U diag(values[:k]) Uᵀ + values[k] (I − U Uᵀ)``.

    Attributes:
        values: ``[k + 1]`` (the top eigenvalues, then the flat remainder μ).
        vectors: ``U``, ``[n, k]`` with ``k < n``.
    """

    values: Tensor
    vectors: Tensor

    def __post_init__(self) -> None:
        n, k = self.vectors.shape
        if not k < n or tuple(self.values.shape) != (k + 1,):
            raise ValueError(
                f"TruncatedFactor: vectors must be [n, k] with k < n and values [k + 1], got "
                f"{tuple(self.vectors.shape)} and {tuple(self.values.shape)}"
            )

    @property
    def size(self) -> int:
        return self.vectors.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.vectors.dtype

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    def trace(self) -> Tensor:
        return (self.values * multiplicity(self.vectors)).sum()

    def dense(self) -> Tensor:
        """``M̃`` as an ``n × n`` matrix."""
        return dense_factor(self.values, self.vectors)

    def tensors(self) -> dict[str, Tensor]:
        return {"values": self.values, "vectors": self.vectors}

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "TruncatedFactor":
        return TruncatedFactor(self.values.to(dtype=dtype, device=device), self.vectors.to(dtype=dtype, device=device))


def flatten_tensors(parts: dict[str, Tensor | TruncatedFactor]) -> dict[str, Tensor]:
    """``name → tensor`` with each :class:`TruncatedFactor` as ``name.values``/``name.vectors``."""
    out: dict[str, Tensor] = {}
    for key, value in parts.items():
        if isinstance(value, TruncatedFactor):
            out.update({f"{key}.{k}": v for k, v in value.tensors().items()})
        else:
            out[key] = value
    return out


def unflatten_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor | TruncatedFactor]:
    """Inverse of :func:`flatten_tensors`."""
    out: dict[str, Tensor | TruncatedFactor] = {}
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        head, dot, field = key.partition(".")
        if dot:
            groups.setdefault(head, {})[field] = value
        else:
            out[key] = value
    for head, fields in groups.items():
        try:
            out[head] = TruncatedFactor(**fields)
        except TypeError as err:
            raise ValueError(f"incomplete truncated factor {head!r}: {sorted(fields)} ({err})") from None
    return out
