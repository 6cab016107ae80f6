"""What the autograd engine returns: per target module, its calls' ``x`` and ``g``, and the
exact square root ``M`` of its block where that needs separate backpropagations."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from curvlab.extract.autograd import layer_io


@dataclass
class LayerCall:
    """One call of a target module during the forward pass.

    Attributes:
        x: the layer input, unfolded: ``[N, D, T]`` (no bias row); ``nn.Embedding``: the token
            ids ``[N, T]`` (int64), see :func:`LayerResult.dense_inputs`.
        g: the stacked root backpropagated to the layer output, ``[C_total, N, d_out, T]``;
            column ``c`` is one vjp whose cotangent is root column ``c`` at *every* loss term of
            *every* example (``AutogradExtraction.segments`` slices the flavours).
    """

    x: Tensor
    g: Tensor


@dataclass
class LayerResult:
    """One target module.

    Attributes:
        name: the name the caller gave the module.
        module: the module.
        kind: ``"linear"``, ``"conv"`` or ``"embedding"``.
        calls: one :class:`LayerCall` per call, in forward order (tied weights: several).
        sqrt: the exact square root of the block ``[K, d_out, D]`` summed over calls, when it
            was computed (``K = C_total·T_out·N``, row ``k = (c·T_out + s)·N + n``; rows of
            flavour ``f``: ``AutogradExtraction.sqrt_segments[f]``), else ``None``.
        factorable: ``M`` follows from ``x`` and ``g`` alone (no coupling between examples and
            one loss term per example): ``M_{c,n} = Σ_calls Σ_t g_{c,n,:,t} x_{n,:,t}ᵀ``.
    """

    name: str
    module: nn.Module
    kind: str
    calls: list[LayerCall] = field(default_factory=list)
    sqrt: Tensor | None = None
    factorable: bool = True

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, D)``: the weight's matrix form (Embedding: ``Wᵀ``), bias excluded."""
        return layer_io.dims(self.module)

    def dense_inputs(self, call: LayerCall) -> Tensor:
        """``call.x`` as a dense ``[N, D, T]`` tensor (Embedding: one-hot, padding rows zero)."""
        return layer_io.dense_inputs(self.module, call.x)

    def square_root(self) -> Tensor:
        """The block's square root ``[K, d_out, D]``: ``F = Σ_k vec(M_k) vec(M_k)ᵀ``.

        :attr:`sqrt` when computed; when :attr:`factorable`, built from the calls' ``x, g``.
        """
        if self.sqrt is not None:
            return self.sqrt
        if not self.factorable:
            raise ValueError(
                f"LayerResult.square_root: {self.name!r}: the examples are coupled or the loss has "
                "several terms per example; extract with sqrt=True"
            )
        if not self.calls:
            raise ValueError(f"LayerResult.square_root: {self.name!r} was never called")
        total = None
        for call in self.calls:
            m = layer_io.contract(self.module, call.x, call.g, per_example=True)
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
        sqrt_segments: flavour → slice of the row axis of every ``sqrt``.
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

    def __getitem__(self, name: str) -> LayerResult:
        return self.layers[name]

    def g(self, call: LayerCall, flavour: str) -> Tensor:
        """``call.g`` restricted to ``flavour``'s columns."""
        return call.g[self.segments[flavour]]

    def sqrt(self, name: str, flavour: str) -> Tensor:
        """The square root of block ``name`` restricted to ``flavour``'s rows."""
        n = self.num_examples * self.terms_per_example
        seg = self.segments[flavour]
        return self.layers[name].square_root()[seg.start * n : seg.stop * n]

