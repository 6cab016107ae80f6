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
* ``nn.Embedding``: its input is one-hot, so its matrix form is ``Wᵀ``
  (``[embedding_dim, num_embeddings]``, output × input as for ``nn.Linear``); the layout is
  ``transposed`` and the flat order stays ``weight.flatten()``.  ``nn.ConvTranspose1d/2d/3d``
  likewise: its weight ``[C_in, C_out, *k]`` with the first two axes swapped,
  ``[C_out, C_in·prod(k)]``.
* A *parameter block* (kind ``"parameter"``) is one trainable tensor outside the Kronecker layers
  (a norm layer's affine weight or bias, a position embedding, a cls token, attention's packed
  projections): its matrix form is the tensor reshaped to ``[prod(shape[:i]), prod(shape[i:])]``
  with the most balanced split ``i``, in row-major (flat) order.  Which blocks a model has is
  decided in one place, :func:`curvlab.model_blocks.model_blocks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvlab import device_routes


@dataclass(frozen=True)
class BlockLayout:
    """Shape bookkeeping of one curvature block.

    Attributes:
        out_features: ``d_out``, rows of ``W̄``.
        in_features: ``D``, columns of ``W̄`` (including the bias column if present).
        bias_column: whether the last column of ``W̄`` is the bias.
        weight_shape: shape of the weight parameter (``None`` for a bias-only block).
        transposed: the weight's matrix form swaps its first two axes (``nn.Embedding``: ``Wᵀ``;
            a transposed convolution's ``[C_in, C_out, *k]`` → ``[C_out, C_in·prod(k)]``), so
            the flat order of the weight part runs over the inputs first.
    """

    out_features: int
    in_features: int
    bias_column: bool
    weight_shape: tuple[int, ...] | None
    transposed: bool = False

    @property
    def num_params(self) -> int:
        """Number of parameters P = d_out · D."""
        return self.out_features * self.in_features

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the matrix form ``(d_out, D)``."""
        return (self.out_features, self.in_features)

    def _axis0(self) -> int:
        """A transposed layout's weight's first axis (``num_embeddings``, ``C_in``)."""
        return self.weight_shape[0]

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
            weight = mat[..., :dw]
            if self.transposed:  # [.., d_out, C_in·K] → [.., C_in, d_out, K]
                weight = weight.unflatten(-1, (self._axis0(), -1)).transpose(-3, -2).flatten(-2)
            parts.append(weight.flatten(-2))
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
            weight = vec[..., : self.out_features * dw]
            if self.transposed:
                a = self._axis0()
                cols.append(weight.reshape(*lead, a, self.out_features, dw // a).transpose(-3, -2).reshape(
                    *lead, self.out_features, dw))
            else:
                cols.append(weight.reshape(*lead, self.out_features, dw))
        if self.bias_column or self.weight_shape is None:
            rest = self.in_features - dw
            cols.append(vec[..., self.out_features * dw :].reshape(*lead, self.out_features, rest))
        return torch.cat(cols, dim=-1)

    def columns(self, mat: Tensor) -> list[Tensor]:
        """Matrix form ``[d_out, D]`` → its column blocks, weight columns then the bias column
        (views; one block when there is no bias column): as :meth:`Block.grad_columns` gives them."""
        self._check(mat.shape, "matrix")
        dw = self._weight_columns()
        return [mat[:, :dw], mat[:, dw:]] if dw and self.bias_column else [mat]

    def permutation(self) -> Tensor:
        """Index ``perm`` with ``vec = mat.flatten()[perm]`` (for dense P×P conversions)."""
        idx = torch.arange(self.num_params).reshape(self.shape).to(torch.float64)
        return self.to_vector(idx).long()

    def _check(self, shape: torch.Size, what: str) -> None:
        if tuple(shape) != self.shape:
            raise ValueError(
                f"BlockLayout: expected a {what} of shape {self.shape}, got {tuple(shape)}"
            )


#: Row length (in elements) the statistics' Gram matrices are padded to where that pays
#: (:func:`curvlab.gram.gram`); :meth:`Block.inputs` leaves its rows that much room.
ROW_ALIGNMENT = 16

#: Rows narrower than this are neither padded (:func:`curvlab.gram.gram`) nor given room
#: (:meth:`Block.inputs`): their products cost less than the room's three copies and the
#: padded view (20 × Linear(16, 16) at N = 4, a block's inputs and Gram 32 → 17 µs, interleaved).
ALIGNED_MIN_WIDTH = 64


def planes_first(x: Tensor) -> bool:
    """Whether the unfolded inputs ``x [N, D, T]`` are stored as ``[D, N, T]`` memory (a
    convolution's patches, :func:`curvlab.extract.autograd.layer_io.unfold_input`) rather than
    as rows of ``D`` (a Linear layer's input)."""
    return x.permute(1, 0, 2).is_contiguous()


def ones_plane_after(x: Tensor) -> Tensor | None:
    """``[x; 1]`` (``[N, D + 1, T]``) as a view of ``x``'s storage when the plane after its
    ``[D, N, T]`` memory holds ones (a CPU convolution's patches with a bias: the unfold leaves
    that plane, :func:`curvlab.extract.autograd.layer_io.unfold_input`), else ``None``.  The
    ones are checked — O(N·T), against a copy of all ``D·N·T`` — so that no other tensor's
    memory is ever read as them; off the CPU the check would synchronise, and is not made."""
    n, d_in, t = x.shape
    if not device_routes.cpu_tuned(x) or not planes_first(x) or x.stride(1) != n * t:
        return None
    end = x.storage_offset() + (d_in + 1) * n * t
    if end > x.untyped_storage().nbytes() // x.element_size():
        return None
    full = x.as_strided((d_in + 1, n, t), (n * t, t, 1)).permute(1, 0, 2)
    return full if bool(full[:, d_in].eq(1).all()) else None


@dataclass(frozen=True, eq=False)
class Block:
    """One curvature block of a layer: its weight, its bias, or both as ``W̄ = [W b]``.

    Attributes:
        name: the module path, with ``.weight``/``.bias`` appended when the bias is a block of
            its own; a parameter block's name is the parameter's path.
        module_type: the layer's class name (``"Linear"``, ``"Conv2d"``; a parameter block: its
            owner's class name).
        layout: the matrix form and flat order (:class:`BlockLayout`).
        weight: the weight parameter (``None`` for a bias-only block; a parameter block: the
            parameter).
        bias: the bias parameter of the block (``None``: no bias column).
        kind: ``"kronecker"`` (a Linear/Conv/Embedding layer) or ``"parameter"`` (one tensor
            outside those layers, see the module docstring).
    """

    name: str
    module_type: str
    layout: BlockLayout
    weight: Tensor | None
    bias: Tensor | None
    kind: str = "kronecker"

    def __post_init__(self) -> None:
        # asked for several times by every optimizer step: built once
        object.__setattr__(self, "_parameters", tuple(p for p in (self.weight, self.bias) if p is not None))

    def __repr__(self) -> str:  # the dataclass's printed every parameter's values
        d_out, d_in = self.layout.shape
        return f"Block({self.name!r}, {self.kind}, {self.module_type}, {d_out}×{d_in})"

    @classmethod
    def of_layer(cls, name: str, module: nn.Module, *, separate_bias: bool = False,
                 own_bias: bool = True) -> list["Block"]:
        """The blocks of a ``Linear``/``Conv1d/2d/3d``/``ConvTranspose1d/2d/3d``/``Embedding`` layer:
        ``[W b]`` (the bias as the last input column when it is trainable and ``own_bias``: not
        shared with another module), or ``<name>.weight`` and ``<name>.bias`` apart.
        ``nn.Embedding`` (no bias) has the matrix form ``Wᵀ``, a transposed convolution its
        weight's first two axes swapped."""
        weight = module.weight
        bias = getattr(module, "bias", None)
        bias = bias if bias is not None and bias.requires_grad and own_bias else None
        shape = tuple(weight.shape)
        kind = type(module).__name__
        if isinstance(module, nn.Embedding):
            layout = BlockLayout(shape[1], shape[0], False, shape, transposed=True)
            return [cls(name, kind, layout, weight, None)]
        swapped = isinstance(module, nn.modules.conv._ConvTransposeNd)  # weight [C_in, C_out, *k]
        d_out = shape[1] if swapped else shape[0]
        d_in = weight.numel() // d_out  # Linear: in_features; Conv: C_in·prod(kernel)
        if not separate_bias:
            layout = BlockLayout(d_out, d_in + int(bias is not None), bias is not None, shape, transposed=swapped)
            return [cls(name, kind, layout, weight, bias)]
        blocks = [cls(f"{name}.weight", kind, BlockLayout(d_out, d_in, False, shape, transposed=swapped), weight, None)]
        if bias is not None:
            blocks.append(cls(f"{name}.bias", kind, BlockLayout(d_out, 1, False, None), None, bias))
        return blocks

    @classmethod
    def of_parameter(cls, name: str, param: Tensor, owner_type: str) -> "Block":
        """The parameter block of one tensor (kind ``"parameter"``), matrix form
        ``[prod(shape[:i]), prod(shape[i:])]`` with the most balanced split ``i``."""
        shape = tuple(param.shape)
        rows, cols = balanced_split(shape)
        return cls(name, owner_type, BlockLayout(rows, cols, False, shape), param, None, kind="parameter")

    def parameters(self) -> tuple[Tensor, ...]:
        """The block's parameters, weight first."""
        return self._parameters

    def inputs(self, x: Tensor) -> Tensor:
        """The block's unfolded inputs ``[N, D, T]`` from the layer's ``x`` (``[N, d_in, T]``):
        with a row of ones appended for the bias column; only ones for a bias-only block."""
        if self.weight is None:
            return x.new_ones(x.shape[0], 1, x.shape[2])
        if self.bias is None:
            return x
        n, d_in, t = x.shape
        d = d_in + 1
        if t > 1 and planes_first(x):
            # the [D, N, T] memory of a convolution's patches: the row of ones is one more plane,
            # the one the unfold leaves after them where it does (no copy of the patches)
            ones = ones_plane_after(x)
            if ones is not None:
                return ones
            out = x.new_empty(d, n, t)
            out[:d_in] = x.permute(1, 0, 2)
            out[d_in] = 1
            return out.permute(1, 0, 2)
        # the [N, T, D] memory of a Linear layer's inputs (rows of D contiguous), each row
        # followed by zeros up to a multiple of ROW_ALIGNMENT: curvlab.gram.gram pads
        # odd widths it finds faster aligned, and uses these columns instead of a padded copy
        if d < ALIGNED_MIN_WIDTH:
            return torch.cat([x.transpose(1, 2), x.new_ones(n, t, 1)], 2).transpose(1, 2)
        out = x.new_empty(n, t, d + (-d % ROW_ALIGNMENT))
        out[..., :d_in] = x.transpose(1, 2)
        out[..., d_in] = 1
        out[..., d:] = 0
        return out[..., :d].transpose(1, 2)

    def _as_matrix(self, t: Tensor, is_weight: bool) -> Tensor:
        """The weight (or bias) tensor ``t`` in the block's matrix form."""
        if not is_weight:
            return t.unsqueeze(1)
        if self.kind == "parameter":
            return t.reshape(self.layout.shape)
        if self.layout.transposed:
            return t.transpose(0, 1).flatten(1)  # (Embedding: a view, Wᵀ)
        return t if t.dim() == 2 else t.flatten(1)

    def param_columns(self) -> list[Tensor]:
        """``W̄``'s column blocks, weight then bias (:meth:`BlockLayout.columns`; views where
        possible)."""
        return [self._as_matrix(p, p is self.weight) for p in self.parameters()]

    def param_matrix(self) -> Tensor:
        """``W̄`` as ``[d_out, D]`` (a view of the weight where possible)."""
        parts = self.param_columns()
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def grad_columns(self) -> list[Tensor] | None:
        """The gradient's column blocks, weight then bias (views of ``.grad`` where possible; a
        part without ``.grad`` counts as zero); ``None`` when no part has one."""
        grads = [p.grad for p in self._parameters]
        if all(g is None for g in grads):
            return None
        return [self._as_matrix(torch.zeros_like(p) if g is None else g, p is self.weight)
                for p, g in zip(self._parameters, grads)]

    def grad_matrix(self, *, copy: bool = False) -> Tensor | None:
        """The gradient in matrix form ``[d_out, D]`` (see :meth:`grad_columns`; ``copy``: never a
        view of ``.grad`` — the join of a bias column is a copy already, one parameter's is cloned)."""
        parts = self.grad_columns()
        if parts is None:
            return None
        if len(parts) > 1:
            return torch.cat(parts, 1)
        return parts[0].clone() if copy else parts[0]

    def update_targets(self, update: Tensor | Sequence[Tensor], *,
                       skip: frozenset[Tensor] | set[Tensor] = frozenset()) -> list[tuple[Tensor, Tensor, int]]:
        """``W̄ ← W̄ + α · update`` as ``(target, part, i)`` for each parameter not in ``skip`` (e.g.
        a bias no param group holds): ``target.add_(part, alpha=α_i)`` (the parameter, or a view
        of it) adds column block ``i`` of ``update`` (``[d_out, D]``, or its column blocks as
        :meth:`BlockLayout.columns` cuts them) — for several blocks in one ``torch._foreach_add_``."""
        parts = self.layout.columns(update) if isinstance(update, Tensor) else update
        targets = []
        for i, (p, part) in enumerate(zip(self._parameters, parts)):
            if skip and p in skip:  # (a tensor's hash is a Python call)
                continue
            if p is not self.weight:  # the bias column
                targets.append((p, part[:, 0], i))
            elif self.layout.transposed:
                targets.append((p, part.reshape(p.shape[1], p.shape[0], *p.shape[2:]).transpose(0, 1), i))
            elif p.dim() == 2 and p.shape[0] == self.layout.out_features:  # (a Linear's weight: its matrix form)
                targets.append((p, part, i))
            elif p.is_contiguous():
                targets.append((p.view(self.layout.out_features, -1), part, i))
            else:  # e.g. channels_last
                targets.append((p, part.reshape(p.shape), i))
        return targets


def balanced_split(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(prod(shape[:i]), prod(shape[i:]))`` for the ``i ≥ 1`` that makes the two most alike
    (a scalar: ``(1, 1)``): a parameter block's matrix form, small identity bases included."""
    if not shape:
        return 1, 1
    options = [(math.prod(shape[:i]), math.prod(shape[i:])) for i in range(1, len(shape) + 1)]
    return min(options, key=lambda rc: max(rc))
