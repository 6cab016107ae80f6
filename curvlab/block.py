"""The curvature block: a layer's parameters in the matrix form ``W̄ = [W b]``.

Everything in curvlab that touches a layer's parameters goes through :class:`Block` — the
extraction (which blocks a layer has, their inputs with the bias column, their gradient), the
approximations and the comparison (:class:`BlockLayout`: the flat parameter order), and the
optimizers (reading the gradient, writing the update).

Convention (fixed once for the whole project):

* A block acts on the *matrix form* ``W̄ ∈ R^{d_out × D}``: the weight reshaped to
  ``[d_out, d_in]`` (conv: ``d_in = C_in·kh·kw``, in ``weight.flatten(1)`` order), followed by the
  bias as the last input column when the bias is part of the block (``bias_column=True``).
* Kronecker products are written row-major on ``W̄``: ``(L ⊗ R) vec(W̄) = vec(L W̄ Rᵀ)``
  with ``L`` acting on the output side (``d_out × d_out``) and ``R`` on the input side
  (``D × D``).  KFAC is ``G ⊗ A`` in this order.
* The *flat parameter vector* — what ``dense_fisher()`` and ``to_dense()`` index — is
  ``torch.cat([weight.flatten(), bias.flatten()])`` (bias omitted when absent), PyTorch's own
  parameter order.  :class:`BlockLayout` converts between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class BlockLayout:
    """Shape bookkeeping of one curvature block.

    Attributes:
        out_features: ``d_out``, rows of ``W̄``.
        in_features: ``D``, columns of ``W̄`` (including the bias column if present).
        bias_column: whether the last column of ``W̄`` is the bias.
        weight_shape: shape of the weight parameter (``None`` for a bias-only block).
    """

    out_features: int
    in_features: int
    bias_column: bool
    weight_shape: tuple[int, ...] | None

    @property
    def num_params(self) -> int:
        """Number of parameters P = d_out · D."""
        return self.out_features * self.in_features

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the matrix form ``(d_out, D)``."""
        return (self.out_features, self.in_features)

    def _weight_columns(self) -> int:
        if self.weight_shape is None:
            return 0
        return self.in_features - int(self.bias_column)

    def to_vector(self, mat: Tensor) -> Tensor:
        """Matrix form ``[..., d_out, D]`` → flat parameter vector ``[..., P]``."""
        self._check(mat.shape[-2:], "matrix")
        dw = self._weight_columns()
        parts = []
        if dw:
            parts.append(mat[..., :dw].flatten(-2))
        if self.bias_column or self.weight_shape is None:
            parts.append(mat[..., dw:].flatten(-2))
        return torch.cat(parts, dim=-1)

    def to_matrix(self, vec: Tensor) -> Tensor:
        """Flat parameter vector ``[..., P]`` → matrix form ``[..., d_out, D]``."""
        if vec.shape[-1] != self.num_params:
            raise ValueError(
                f"BlockLayout: expected a vector of {self.num_params} parameters, "
                f"got shape {tuple(vec.shape)}"
            )
        lead = vec.shape[:-1]
        dw = self._weight_columns()
        cols = []
        if dw:
            cols.append(vec[..., : self.out_features * dw].reshape(*lead, self.out_features, dw))
        if self.bias_column or self.weight_shape is None:
            rest = self.in_features - dw
            cols.append(vec[..., self.out_features * dw :].reshape(*lead, self.out_features, rest))
        return torch.cat(cols, dim=-1)

    def permutation(self) -> Tensor:
        """Index ``perm`` with ``vec = mat.flatten()[perm]`` (for dense P×P conversions)."""
        idx = torch.arange(self.num_params).reshape(self.shape).to(torch.float64)
        return self.to_vector(idx).long()

    def _check(self, shape: torch.Size, what: str) -> None:
        if tuple(shape) != self.shape:
            raise ValueError(
                f"BlockLayout: expected a {what} of shape {self.shape}, got {tuple(shape)}"
            )


@dataclass(frozen=True, eq=False)
class Block:
    """One curvature block of a layer: its weight, its bias, or both as ``W̄ = [W b]``.

    Attributes:
        name: the module path, with ``.weight``/``.bias`` appended when the bias is a block of
            its own.
        module_type: the layer's class name (``"Linear"``, ``"Conv2d"``).
        layout: the matrix form and flat order (:class:`BlockLayout`).
        weight: the weight parameter (``None`` for a bias-only block).
        bias: the bias parameter of the block (``None``: no bias column).
    """

    name: str
    module_type: str
    layout: BlockLayout
    weight: Tensor | None
    bias: Tensor | None

    @classmethod
    def of_layer(cls, name: str, module: nn.Module, *, separate_bias: bool = False) -> list["Block"]:
        """The blocks of a ``Linear``/``Conv`` layer: ``[W b]`` (the bias as the last input
        column when it is trainable), or ``<name>.weight`` and ``<name>.bias`` apart."""
        weight = module.weight
        bias = module.bias if module.bias is not None and module.bias.requires_grad else None
        shape = tuple(weight.shape)
        d_out, d_in = shape[0], weight[0].numel()  # Linear: in_features; Conv: C_in·prod(kernel)
        kind = type(module).__name__
        if not separate_bias:
            layout = BlockLayout(d_out, d_in + int(bias is not None), bias is not None, shape)
            return [cls(name, kind, layout, weight, bias)]
        blocks = [cls(f"{name}.weight", kind, BlockLayout(d_out, d_in, False, shape), weight, None)]
        if bias is not None:
            blocks.append(cls(f"{name}.bias", kind, BlockLayout(d_out, 1, False, None), None, bias))
        return blocks

    def parameters(self) -> list[Tensor]:
        """The block's parameters, weight first."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def inputs(self, x: Tensor) -> Tensor:
        """The block's unfolded inputs ``[N, D, T]`` from the layer's ``x`` (``[N, d_in, T]``):
        with a row of ones appended for the bias column; only ones for a bias-only block."""
        ones = x.new_ones(x.shape[0], 1, x.shape[2])
        if self.weight is None:
            return ones
        return torch.cat([x, ones], 1) if self.bias is not None else x

    def param_matrix(self) -> Tensor:
        """``W̄`` as ``[d_out, D]`` (a view of the weight where possible)."""
        parts = [p.flatten(1) if p is self.weight else p.unsqueeze(1) for p in self.parameters()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def grad_matrix(self) -> Tensor | None:
        """The gradient in matrix form ``[d_out, D]``; a part without ``.grad`` counts as zero,
        and ``None`` is returned when no part has one."""
        if all(p.grad is None for p in self.parameters()):
            return None
        parts = []
        for p in self.parameters():
            g = torch.zeros_like(p) if p.grad is None else p.grad
            parts.append(g.flatten(1) if p is self.weight else g.unsqueeze(1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def add_(self, update: Tensor, alpha: float, *, skip: frozenset[Tensor] | set[Tensor] = frozenset()) -> None:
        """``W̄ ← W̄ + alpha · update`` (``update``: ``[d_out, D]``), leaving the parameters in
        ``skip`` (e.g. a bias no param group holds) unchanged."""
        dw = 0
        if self.weight is not None:
            w = self.weight
            dw = self.layout.in_features - int(self.bias is not None)
            if w not in skip:
                if w.is_contiguous():
                    w.view(w.shape[0], -1).add_(update[:, :dw], alpha=alpha)
                else:  # e.g. channels_last
                    w.add_(update[:, :dw].reshape(w.shape), alpha=alpha)
        if self.bias is not None and self.bias not in skip:
            self.bias.add_(update[:, dw], alpha=alpha)
