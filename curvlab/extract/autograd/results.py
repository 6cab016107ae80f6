"""What the autograd engine returns: per target module, its calls' ``x`` and ``g``, and the
exact square root ``M`` of its block where that needs separate backpropagations."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

from curvlab.extract.autograd import layer_io


@dataclass
class LayerCall:
    """One call of a target module during the forward pass.

    Attributes:
        name: the target's name (for errors).
        module: the module called.
        inp: its input as called (detached, kept by reference, in its own dtype — bfloat16
            under autocast —: unfolded and cast only when read, one layer at a time — the
            patches of every convolution at once would hold gigabytes).
        version: ``inp._version`` at the call (an input modified in place since is refused).
        g: the stacked root backpropagated to the layer output, ``[C_total, N, d_out, T]``;
            column ``c`` is one vjp whose cotangent is root column ``c`` at *every* loss term of
            *every* example (``AutogradExtraction.segments`` slices the flavours).
        g_terms: with ``T_out > 1`` loss terms per example (when requested): the term-separated
            roots ``[C_sel·T_out, N, d_out, T]``, column ``j·T_out + s`` the vjp of root column
            ``j`` (of the selected flavours) at term ``s`` alone, all examples at once
            (``AutogradExtraction.term_segments`` slices the flavours).
        coupled_roots: where the examples are coupled and the layer's batch has fewer
            locations than its width (``N·ΣT < D``): every exact-root row's gradient at this
            call's output, ``[K, N, d_out, T]`` (rows as :attr:`LayerResult.sqrt`'s), kept
            instead of their contractions ``M_k``, at ``N·T/D`` of their size
            (:meth:`LayerResult.square_root` contracts them when asked).
    """

    name: str
    module: nn.Module
    inp: Tensor
    version: int
    g: Tensor
    g_terms: Tensor | None = None
    coupled_roots: Tensor | None = None

    def unfolded(self) -> Tensor:
        """The layer input unfolded, ``[N, D, T]`` (no bias row; ``nn.Embedding``: the token ids
        ``[N, T]``, see :func:`LayerResult.dense_inputs`), computed now and not kept."""
        layer_io.check_unmodified(self.name, self.inp, self.version)
        return layer_io.unfold_input(self.module, self.inp)

    @cached_property
    def x(self) -> Tensor:
        """:meth:`unfolded`, kept after the first read."""
        return self.unfolded()


@dataclass
class LayerResult:
    """One target module.

    Attributes:
        name: the name the caller gave the module.
        module: the module.
        kind: ``"linear"``, ``"conv"`` or ``"embedding"``.
        calls: one :class:`LayerCall` per call, in forward order (tied weights: several).
        sqrt: the exact square root of the block ``[K, d_out, D]`` summed over calls, when it
            was computed (``K = C_sel·T_out·N`` for the selected flavours, row
            ``k = (j·T_out + s)·N + n``; rows of flavour ``f``:
            ``AutogradExtraction.sqrt_segments[f]``; ``D`` includes the bias column when
            :attr:`with_bias`), else ``None`` (coupled with the roots kept per call instead:
            :attr:`LayerCall.coupled_roots`).
        factorable: ``M`` follows from ``x`` and ``g`` alone (no coupling between examples and
            one loss term per example): ``M_{c,n} = Σ_calls Σ_t g_{c,n,:,t} x_{n,:,t}ᵀ``.
        with_bias: the square root has the bias as its last column (``include_bias=True`` and a
            trainable bias).
    """

    name: str
    module: nn.Module
    kind: str
    calls: list[LayerCall] = field(default_factory=list)
    sqrt: Tensor | None = None
    factorable: bool = True
    with_bias: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, D)``: the weight's matrix form (Embedding: ``Wᵀ``), bias excluded."""
        return layer_io.dims(self.module)

    @property
    def has_trainable_bias(self) -> bool:
        bias = getattr(self.module, "bias", None)
        return isinstance(bias, Tensor) and bias.requires_grad

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(d_out, D)`` of :attr:`sqrt`'s matrices (with the bias column when :attr:`with_bias`)."""
        d_out, d_in = self.shape
        return d_out, d_in + int(self.with_bias)

    def contraction_inputs(self, x: Tensor) -> Tensor:
        """``x`` with a row of ones appended when the square root has the bias column."""
        if not self.with_bias:
            return x
        return torch.cat([x, x.new_ones(x.shape[0], 1, x.shape[2])], 1)

    def dense_inputs(self, call: LayerCall) -> Tensor:
        """``call.unfolded()`` as a dense ``[N, D, T]`` tensor (Embedding: one-hot, padding rows zero)."""
        return layer_io.dense_inputs(self.module, call.unfolded())

    def square_root(self, columns: Tensor | None = None) -> Tensor:
        """The block's square root ``[K, d_out, D]``: ``F = Σ_k vec(M_k) vec(M_k)ᵀ``.

        :attr:`sqrt` when computed; contracted from the calls' :attr:`~LayerCall.coupled_roots`
        where those were kept; when :attr:`factorable`, built from the calls' ``x, g``
        (restricted to the root ``columns`` given).
        """
        if self.sqrt is not None and columns is None:
            return self.sqrt
        if columns is None and self.calls and self.calls[0].coupled_roots is not None:
            return sum(layer_io.contract(self.module, self.contraction_inputs(c.unfolded()), c.coupled_roots,
                                         per_example=False) for c in self.calls)
        if not self.factorable:
            raise ValueError(
                f"LayerResult.square_root: {self.name!r}: the examples are coupled or the loss has "
                "several terms per example; extract with sqrt=True"
            )
        if not self.calls:
            raise ValueError(f"LayerResult.square_root: {self.name!r} was never called")
        total = None
        for call in self.calls:
            g = call.g if columns is None else call.g[columns]
            m = layer_io.contract(self.module, self.contraction_inputs(call.unfolded()), g, per_example=True)
            total = m if total is None else total + m
        return total.reshape(-1, *total.shape[2:])


@dataclass
class AutogradExtraction:
    """Result of :func:`~curvlab.extract.autograd.extract_autograd`.

    Attributes:
        loss: ``loss_fn(output, targets)``, detached.
        output: the model output, detached.
        layers: name → :class:`LayerResult`, in the order of the targets mapping.
        segments: flavour → slice of the column axis of every ``g``.
        sqrt_segments: flavour → slice of the row axis of every ``sqrt`` and ``param_sqrt``.
        term_segments: flavour → slice of the column axis of every ``g_terms``.
        num_examples: N.
        terms_per_example: ``T_out``, loss terms per example (CE on ``[N, C, T]``: T).
        reduction_factor: R in ``L = R Σ ℓ``.
        coupled: whether the examples were treated as coupled (train-mode BatchNorm).
        num_vjps: cotangent columns backpropagated in all.
        columns_per_chunk: columns per batched vjp under ``max_bytes``.
    """

    loss: Tensor
    output: Tensor
    layers: dict[str, LayerResult]
    segments: dict[str, slice]
    sqrt_segments: dict[str, slice]
    num_examples: int
    terms_per_example: int
    reduction_factor: float
    coupled: bool
    num_vjps: int = 0
    columns_per_chunk: int = 1
    term_segments: dict[str, slice] = field(default_factory=dict)
    param_sqrt: dict[str, Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerResult:
        return self.layers[name]

    def g(self, call: LayerCall, flavour: str) -> Tensor:
        """``call.g`` restricted to ``flavour``'s columns."""
        return call.g[self.segments[flavour]]

    def sqrt(self, name: str, flavour: str) -> Tensor:
        """The square root of block ``name`` restricted to ``flavour``'s rows."""
        return self.layers[name].square_root()[self.sqrt_segments[flavour]]

