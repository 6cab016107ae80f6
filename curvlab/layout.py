"""How a layer's parameters map to the matrix form W̄ = [W b] that all curvature blocks use.

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
from torch import Tensor


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
