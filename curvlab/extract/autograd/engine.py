"""The engine: one forward pass with recording hooks, then chunked batched vjps of the loss
roots (see the package docstring for the maths and the cost model)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from curvlab.extract.autograd import layer_io
from curvlab.extract.options import DEFAULT_MAX_BYTES
from curvlab.extract.autograd.recording import Recording, Request
from curvlab.extract.autograd.results import AutogradExtraction


def couples_examples(model: nn.Module) -> bool:
    """Whether the forward pass mixes the examples of a batch: a ``_BatchNorm`` (BatchNorm1d/2d/3d,
    SyncBatchNorm, lazy variants) that normalises with batch statistics (train mode, or no
    running statistics)."""
    return any(
        isinstance(m, _BatchNorm) and (m.training or m.running_mean is None) for m in model.modules()
    )


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
    sqrt_flavours: Iterable[str] | None = None,
    terms: bool = False,
    include_bias: bool = False,
    params: Mapping[str, Tensor] | None = None,
) -> AutogradExtraction:
    """Layer inputs and backpropagated loss-Hessian roots of any differentiable ``model``.

    Args:
        model: any ``nn.Module``; called once as ``model(*inputs)`` with its parameters detached
            (its ``.grad`` untouched; train-mode BatchNorm updates its running statistics exactly
            as one training forward pass does) — and where the examples look coupled once more,
            without gradients, on one more example, its buffers and the RNG state left as they were
            (:mod:`~curvlab.extract.autograd.batch_check`); for ``params`` outside the local
            modules, once on each example alone, the same way (:mod:`~curvlab.extract.autograd.reruns`).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or ``nn.BCEWithLogitsLoss`` (reduction
            mean or sum).
        inputs: the model input, or a tuple of positional inputs (moved to the model's device).
        targets: CE: class indices ``[N, *S]``; MSE, BCE: shaped like the output.
        layers: target module → name; default: every Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d and
            Embedding.
        flavours: any of ``"exact"``, ``"mc"``, ``"empirical"``, stacked in this order.
        mc_samples: labels drawn per loss term for ``"mc"``.
        seed: seeds the MC sampling (and any randomness of the forward) inside a forked RNG
            state; with the same seed the labels equal ``curvlab.extract``'s (BackPACK's).
        max_bytes: bound on the temporaries of one batched vjp (an estimate, see the cost
            model); at least one column is backpropagated at a time.
        coupled: treat the examples as coupled; default: where :func:`couples_examples`, else
            where the vjp of one example's output reaches another's layers
            (:func:`~curvlab.extract.autograd.recording.probe_coupling`).
        sqrt: compute each block's exact square root ``M`` (``LayerResult.sqrt``); default:
            when it does not follow from ``x`` and ``g`` (coupled, or ``T_out > 1``).
        vectorize: batch the columns of a chunk with ``torch.func.vmap``; ``False`` loops over
            them (for an operation whose backward vmap cannot batch at all).
        sqrt_flavours: flavours whose rows the square roots (and ``g_terms``, ``param_sqrt``)
            have; default all of ``flavours``.
        terms: with ``T_out > 1`` loss terms per example, keep every call's term-separated roots
            (``LayerCall.g_terms``; ``C_sel·T_out`` extra vjps).
        include_bias: square roots include the bias column of layers with a trainable bias.
        params: parameter path → parameter of ``model``: their per-column gradients, rows as the
            square roots (``AutogradExtraction.param_sqrt``; one vjp per root column, loss term
            and example, whether or not the examples are coupled).

    Returns:
        :class:`AutogradExtraction`.
    """
    flavours = tuple(flavours)
    request = Request(
        flavours=flavours, mc_samples=mc_samples, max_bytes=max_bytes, vectorize=vectorize, sqrt=sqrt,
        sqrt_flavours=None if sqrt_flavours is None else tuple(sqrt_flavours), terms=terms,
        include_bias=include_bias, params=dict(params or {}),
    )
    request.check()
    targets_map = dict(layer_io.default_targets(model) if layers is None else layers)
    coupled = (True if couples_examples(model) else None) if coupled is None else bool(coupled)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    first = next(iter(model.parameters()), None)
    if first is not None:  # as curvlab.extract: the batch goes to the model's device
        args = tuple(a.to(first.device) if isinstance(a, Tensor) else a for a in args)
        targets = targets.to(first.device)
    devices = [first.device] if first is not None and first.device.type == "cuda" else []
    wanted = {id(p) for p in request.params.values()}  # differentiated: kept as they are
    state = {k: v if id(v) in wanted else v.detach() for k, v in model.named_parameters()}

    recording = Recording(targets_map, loss_fn, request, coupled, model=model)
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.enable_grad(), recording:
            loss_fn(functional_call(model, state, args), targets)
    return recording.result
