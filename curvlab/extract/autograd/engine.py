"""The engine: one forward pass with recording hooks, then chunked batched vjps of the loss
roots (see the package docstring for the maths and the cost model)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from curvlab.extract.autograd import layer_io
from curvlab.extract.autograd.backprop import DEFAULT_MAX_BYTES, BatchedVJP, SavedBytes, estimate
from curvlab.extract.autograd.loss_roots import FLAVOURS, LossTerms, loss_terms, stacked_root
from curvlab.extract.autograd.results import AutogradExtraction, LayerCall, LayerResult


def couples_examples(model: nn.Module) -> bool:
    """Whether the forward pass mixes the examples of a batch: a ``_BatchNorm`` (BatchNorm1d/2d/3d,
    SyncBatchNorm, lazy variants) that normalises with batch statistics (train mode, or no
    running statistics)."""
    return any(
        isinstance(m, _BatchNorm) and (m.training or m.running_mean is None) for m in model.modules()
    )


class _Recorder:
    """Forward hooks on the targets: keep each call's input, add a zero leaf ``ε`` to its output."""

    def __init__(self, targets: Mapping[nn.Module, str]) -> None:
        self.targets = targets
        self.calls: list[tuple[nn.Module, Tensor, Tensor]] = []  # (module, input, ε)
        self.versions: list[int] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        inp = args[0] if args else kwargs["input"]
        # A broadcast zero scalar: no output-sized memory; its gradient has the output's shape.
        eps = output.new_zeros(()).expand(output.shape).requires_grad_()
        self.calls.append((module, inp.detach(), eps))
        self.versions.append(inp._version)
        return output + eps

    def check_unmodified(self) -> None:
        """Inputs are kept by reference: refuse ones the forward modified in place later."""
        for (module, inp, _), version in zip(self.calls, self.versions):
            if inp._version != version:
                raise ValueError(
                    f"extract_autograd: the input of {self.targets[module]!r} was modified in place "
                    "after the call (e.g. an in-place activation on it); its value is needed"
                )

    def __enter__(self) -> "_Recorder":
        for module in self.targets:
            self._handles.append(module.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _check_options(flavours: tuple[str, ...], mc_samples: int, max_bytes: int) -> None:
    if not flavours or len(set(flavours)) != len(flavours) or not set(flavours) <= set(FLAVOURS):
        raise ValueError(f"extract_autograd: flavours={flavours!r}; distinct values from {FLAVOURS}")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"extract_autograd: mc_samples={mc_samples!r} must be a positive int")
    if max_bytes < 1:
        raise ValueError(f"extract_autograd: max_bytes={max_bytes!r} must be positive")


def extract_autograd(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor | tuple[Tensor, ...],
    targets: Tensor,
    layers: Mapping[nn.Module, str] | None = None,
    *,
    flavours: Iterable[str] = ("exact",),
    mc_samples: int = 1,
    seed: int | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    coupled: bool | None = None,
    sqrt: bool | None = None,
    vectorize: bool = True,
) -> AutogradExtraction:
    """Layer inputs and backpropagated loss-Hessian roots of any differentiable ``model``.

    Args:
        model: any ``nn.Module``; called once as ``model(*inputs)`` with its parameters detached
            (its ``.grad`` untouched; train-mode BatchNorm updates its running statistics exactly
            as one training forward pass does).
        loss_fn: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` (reduction mean or sum).
        inputs: the model input, or a tuple of positional inputs (moved to the model's device).
        targets: CE: class indices ``[N, *S]``; MSE: shaped like the output.
        layers: target module → name; default: every Linear, Conv1d/2d/3d and Embedding.
        flavours: any of ``"exact"``, ``"mc"``, ``"empirical"``, stacked in this order.
        mc_samples: labels drawn per loss term for ``"mc"``.
        seed: seeds the MC sampling (and any randomness of the forward) inside a forked RNG
            state; with the same seed the labels equal ``curvlab.extract``'s (BackPACK's).
        max_bytes: bound on the temporaries of one batched vjp (an estimate, see the cost
            model); at least one column is backpropagated at a time.
        coupled: treat the examples as coupled; default: :func:`couples_examples`.
        sqrt: compute each block's exact square root ``M`` (``LayerResult.sqrt``); default:
            when it does not follow from ``x`` and ``g`` (coupled, or ``T_out > 1``).
        vectorize: batch the columns of a chunk with ``torch.func.vmap``; ``False`` loops over
            them (for an operation whose backward vmap cannot batch at all).

    Returns:
        :class:`AutogradExtraction`.
    """
    flavours = tuple(flavours)
    _check_options(flavours, mc_samples, max_bytes)
    targets_map = dict(layer_io.default_targets(model) if layers is None else layers)
    for module, name in targets_map.items():
        layer_io.check_target(name, module)
    coupled = couples_examples(model) if coupled is None else bool(coupled)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    first = next(iter(model.parameters()), None)
    if first is not None:  # as curvlab.extract: the batch goes to the model's device
        args = tuple(a.to(first.device) if isinstance(a, Tensor) else a for a in args)
        targets = targets.to(first.device)
    devices = [first.device] if first is not None and first.device.type == "cuda" else []
    params = {k: v.detach() for k, v in model.named_parameters()}

    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.enable_grad(), _Recorder(targets_map) as rec, SavedBytes() as saved:
            output = functional_call(model, params, args)
        terms = loss_terms(loss_fn, output, targets)
        loss = loss_fn(output.detach(), targets)
        root, segments = stacked_root(loss_fn, output, targets, terms, flavours, mc_samples)

    rec.check_unmodified()
    xs = [layer_io.unfold_input(m, inp) for m, inp, _ in rec.calls]
    for (module, _, _), x in zip(rec.calls, xs):
        if x.shape[0] != terms.num_examples:
            raise ValueError(
                f"extract_autograd: {targets_map[module]!r} saw an input with leading dimension "
                f"{x.shape[0]}, not the batch size {terms.num_examples}"
            )
    leaves = [eps for _, _, eps in rec.calls]
    leaf_bytes = sum(e.numel() for e in leaves) * output.element_size()
    out_bytes = output.numel() * output.element_size()
    factorable = not coupled and terms.terms_per_example == 1
    want_sqrt = (not factorable) if sqrt is None else bool(sqrt)
    per_call_m = [
        (terms.num_examples if not coupled else 1) * math.prod(layer_io.dims(m)) * output.element_size()
        for m, _, _ in rec.calls
    ]
    extra = sum(per_call_m) if want_sqrt and not factorable else 0
    vjp = BatchedVJP(output, leaves, estimate(saved.total, leaf_bytes, out_bytes, extra), max_bytes, vectorize)

    gs = _batch_roots(vjp, root, rec.calls)
    results = {name: LayerResult(name, m, layer_io.kind(m), factorable=factorable) for m, name in targets_map.items()}
    for (module, _, _), x, g in zip(rec.calls, xs, gs):
        results[targets_map[module]].calls.append(LayerCall(x=x, g=g))

    if want_sqrt:
        if factorable:
            for res in results.values():
                res.sqrt = res.square_root() if res.calls else _zeros_sqrt(res, root.shape[0] * terms.num_examples, output)
        else:
            _separated_sqrt(vjp, root, terms, rec.calls, xs, targets_map, results, coupled, output)

    n_terms = terms.num_examples * terms.terms_per_example
    return AutogradExtraction(
        loss=loss.detach(),
        output=output.detach(),
        layers=results,
        segments=segments,
        sqrt_segments={f: slice(s.start * n_terms, s.stop * n_terms) for f, s in segments.items()},
        num_examples=terms.num_examples,
        terms_per_example=terms.terms_per_example,
        reduction_factor=terms.reduction_factor,
        coupled=coupled,
        num_vjps=vjp.num_vjps,
        columns_per_chunk=vjp.chunk,
    )


def _zeros_sqrt(res: LayerResult, k: int, like: Tensor) -> Tensor:
    return like.new_zeros(k, *res.shape)


def _batch_roots(vjp: BatchedVJP, root: Tensor, calls: list) -> list[Tensor]:
    """The batch-convention ``g`` of every call: one vjp per stacked root column, its cotangent at
    every loss term of every example."""
    parts: list[list[Tensor]] = [[] for _ in calls]
    for _, grads in vjp.map(root.shape[0], lambda sl: root[sl]):
        for i, ((module, _, _), grad) in enumerate(zip(calls, grads)):
            parts[i].append(layer_io.grads_to_layout(module, grad))
    return [torch.cat(p, 0) for p in parts]


def _separated_sqrt(
    vjp: BatchedVJP,
    root: Tensor,
    terms: LossTerms,
    calls: list,
    xs: list[Tensor],
    targets_map: Mapping[nn.Module, str],
    results: dict[str, LayerResult],
    coupled: bool,
    output: Tensor,
) -> None:
    """The exact square root with one column per (root column, loss term[, example]).

    Column ``c' = c·T_out + s`` backpropagates root column ``c`` at term ``s`` only.  Uncoupled:
    all examples in one vjp, contracted per example (``M[c'·N + n]``).  Coupled: one vjp per
    ``k = c'·N + n`` with the cotangent at example ``n`` only, contracted over all examples
    at once, so ``[K, N, d_out, T]`` is never stored.
    """
    n, t = terms.num_examples, terms.terms_per_example
    root_terms = terms.to_terms(root)  # [C, N, T, C_out]
    columns = root.shape[0] * t
    total = columns * n if coupled else columns
    sqrt = {name: output.new_zeros(columns * n, *res.shape) for name, res in results.items()}

    def cotangents(sl: slice) -> Tensor:
        ids = torch.arange(sl.start, sl.stop, device=root.device)
        k = ids.numel()
        cot = root_terms.new_zeros(k, n, t, terms.num_classes)
        rows = torch.arange(k, device=root.device)
        if coupled:
            col, ex = ids // n, ids % n
            c, s = col // t, col % t
            cot[rows, ex, s] = root_terms[c, ex, s]
        else:
            c, s = ids // t, ids % t
            cot[rows, :, s] = root_terms[c, :, s]
        return terms.from_terms(cot)

    for sl, grads in vjp.map(total, cotangents):
        for (module, _, _), x, grad in zip(calls, xs, grads):
            g = layer_io.grads_to_layout(module, grad)  # [k, N, d_out, T]
            m = layer_io.contract(module, x, g, per_example=not coupled)
            target = sqrt[targets_map[module]]
            if coupled:
                target[sl] += m
            else:
                target.view(columns, n, *target.shape[1:])[sl] += m
    for name, res in results.items():
        res.sqrt = sqrt[name]
