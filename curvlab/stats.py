"""Per-layer curvature statistics: what :func:`curvlab.extract` returns for each block."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvlab.block import BlockLayout
from curvlab.gram import GramRows
from curvlab.sqrt import SquareRoot

#: Largest dense P×P block :meth:`LayerStats.dense_fisher` builds by default (bytes).
DENSE_LIMIT_BYTES = 2 * 1024**3

FLAVOURS = ("exact", "mc", "empirical")


@dataclass
class KroneckerFactors:
    """KFAC factors of one flavour: ``F ≈ G ⊗ A`` (row-major on ``W̄``).

    ``A = 1/(N·T) Σ_{n,t} ā ā ᵀ`` (``[D, D]``) and ``G = Σ_{c,n,t} g gᵀ`` (``[d_out, d_out]``)
    with the loss scaling folded into ``g``; ``T = 1`` for linear layers (KFC "expand").  An
    extraction with ``gram_rows=True`` may give either as its rows (:class:`~curvlab.gram.GramRows`).
    """

    A: Tensor | GramRows
    G: Tensor | GramRows


@dataclass
class TraceStats:
    """TKFAC's unnormalised statistics: ``δ = tr F``, ``δΦ = Σ M_kᵀM_k``, ``δΨ = Σ M_kM_kᵀ``.

    ``form`` is ``"exact"`` (the partial traces of F, trace-preserving) or ``"kfc"`` (conv only:
    per-example ``Λ_n = Σ_t ā āᵀ``, ``Γ = (1/T) Σ_t g gᵀ``).  An extraction with
    ``gram_rows=True`` may give ``δΦ``, ``δΨ`` as their rows (:class:`~curvlab.gram.GramRows`).
    """

    delta: Tensor
    delta_phi: Tensor | GramRows
    delta_psi: Tensor | GramRows
    form: str = "exact"


@dataclass
class LayerStats:
    """Curvature statistics of one block (a layer, or its weight or bias alone).

    Attributes:
        name: block name: the module path, with ``.weight``/``.bias`` appended when the bias is
            kept separate.
        module_type: the layer's class name (``"Linear"``, ``"Conv2d"``, …; a parameter block:
            its owner's).
        layout: shape bookkeeping and flattening (:class:`~curvlab.block.BlockLayout`).
        flavour: ``"exact"``, ``"mc"`` or ``"empirical"``.
        num_examples: N.
        num_locations: T, output locations per example (1 for linear layers).
        grad: mini-batch gradient of the loss in matrix form ``[d_out, D]``.
        sqrt: the block's square root (per-sample gradient matrices), if requested.
        kfac: KFAC factors per flavour (``kfac["exact"]`` are KFLR's), if requested.
        tkfac: TKFAC statistics, if requested.
        kfe_scaling: ``Σ_k (U_outᵀ M_k U_in)²`` in the eigenbasis passed to ``extract``.
        kind: ``"kronecker"`` (a Linear/Conv/Embedding layer: every statistic) or
            ``"parameter"`` (one tensor outside those layers: ``sqrt`` and ``grad`` only).
        engine: the extraction engine that computed it, ``"backpack"`` or ``"autograd"``.
        kfac_approx: the weight-sharing convention of ``kfac`` (and of ``tkfac`` in its KFC
            form): ``"expand"`` or ``"reduce"``.
        coupled: the batch couples the examples (train-mode BatchNorm): ``sqrt`` is then the exact
            block with the coupling, the Kronecker statistics ignore it (see
            ``convention_sqrt``).
        terms_per_example: loss terms per example (``T_out``; a per-token loss on
            ``[N, C, T]`` logits has ``T``).
        convention_sqrt: when ``coupled``, the square root of the block the Kronecker statistics
            describe (per-example inputs and output gradients of the batch computation, the
            coupling ignored); ``None`` when that block is the exact one.
    """

    name: str
    module_type: str
    layout: BlockLayout
    flavour: str
    num_examples: int
    num_locations: int
    grad: Tensor | None = None
    sqrt: SquareRoot | None = None
    kfac: dict[str, KroneckerFactors] = field(default_factory=dict)
    tkfac: TraceStats | None = None
    kfe_scaling: Tensor | None = None
    kind: str = "kronecker"
    engine: str = "backpack"
    kfac_approx: str = "expand"
    coupled: bool = False
    terms_per_example: int = 1
    convention_sqrt: SquareRoot | None = None

    @property
    def kronecker_sqrt(self) -> SquareRoot | None:
        """The square root of the block the Kronecker statistics describe: ``convention_sqrt``
        where the batch couples the examples, else ``sqrt`` — EKFAC's and TEKFAC's ``s*`` come
        from it, as the optimizers' statistics pass forms them."""
        return self.sqrt if self.convention_sqrt is None else self.convention_sqrt

    @property
    def num_params(self) -> int:
        """P, the number of parameters in the block."""
        return self.layout.num_params

    def dense_fisher(self, max_bytes: int = DENSE_LIMIT_BYTES) -> Tensor:
        """The exact ``P × P`` block of this flavour, in the flat parameter order.

        For tests and small layers only; refuses blocks larger than ``max_bytes``.
        """
        if self.sqrt is None:
            raise ValueError(
                f"LayerStats.dense_fisher: layer {self.name!r} was extracted without its square "
                "root; pass stats=('sqrt', ...) to curvlab.extract"
            )
        p = self.num_params
        size = p * p * torch.finfo(self.sqrt.dtype).bits // 8
        if size > max_bytes:
            raise MemoryError(
                f"LayerStats.dense_fisher: layer {self.name!r} has P={p} parameters; its dense "
                f"block needs {size / 2**30:.2f} GiB > max_bytes={max_bytes / 2**30:.2f} GiB. "
                "Use the matrix-free metrics in curvlab.compare instead."
            )
        cols = self.sqrt.columns(self.layout)
        return cols.T @ cols
