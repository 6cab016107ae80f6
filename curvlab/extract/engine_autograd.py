"""The autograd engine for the forward and backward pass of a ``with`` block.

:class:`AutogradPass` records the forward pass run inside the block (the user's own, or
:func:`curvlab.extract`'s) with module hooks, and at the loss call runs the vjps of
:mod:`curvlab.extract.autograd` through that graph, before the user's ``loss.backward()``, which
it leaves untouched.  Its results go through :mod:`curvlab.extract.layer_stats`, as BackPACK's do.
"""

from __future__ import annotations

import weakref

from torch import nn

from curvlab.extract.autograd import couples_examples
from curvlab.extract.autograd.backprop import allow_compiled_forwards
from curvlab.extract.autograd.layer_io import (
    CONV, EMBEDDING, ConvInputs, EmbeddingInputs, cat_positions, dense_inputs, joined,
)
from curvlab.extract.autograd.local_params import is_local
from curvlab.extract.autograd.recording import Recording, Request
from curvlab.extract.layer_stats import KroneckerData, kronecker_stats, parameter_stats, split_columns
from curvlab.extract.options import ExtractOptions
from curvlab.model_blocks import TRANSPOSED_CONV_LAYERS, ModelBlocks
from curvlab.stats import LayerStats

#: Statistics taken on the term-separated roots when a loss has several terms per example.
_TERM_STATISTICS = {"sqrt", "tkfac", "kfe"}

#: Per model, what the recordings' coupling probes found (:class:`~.autograd.Recording`'s ``probed``).
_PROBED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class AutogradPass:
    """Context recording one forward pass of ``model`` and the loss; :meth:`results` after it."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, options: ExtractOptions, blocks: ModelBlocks) -> None:
        self.options, self.blocks = options, blocks
        # coupled: a batch-statistics BatchNorm, else found at the loss call (one probing vjp)
        coupled = True if couples_examples(model) else None
        want_sqrt = "sqrt" in options.stats
        request = Request(
            flavours=options.flavours,
            mc_samples=options.mc_samples,
            max_bytes=options.max_bytes,
            coupled=coupled,
            sqrt="coupled" if want_sqrt else False,  # uncoupled: the root follows from x and the term roots
            sqrt_flavours=(options.fisher,),
            terms=bool(_TERM_STATISTICS & options.stats),
            include_bias=True,
            params={b.name: b.weight for b in blocks.parameters} if want_sqrt else {},
            local=_local_parameters(model, blocks) if want_sqrt and not coupled else {},
            non_finite=options.non_finite,
        )
        self.recording = Recording(blocks.layers, loss_fn, request, coupled, _PROBED.setdefault(model, {}), model)

    def __enter__(self) -> "AutogradPass":
        allow_compiled_forwards()
        self.recording.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.recording.__exit__(*exc)

    def results(self) -> dict[str, LayerStats]:
        """Per-block statistics ({} when no loss was computed in the block)."""
        res = self.recording.result
        if res is None:
            return {}
        opts, out = self.options, {}
        for module, blocks in self.blocks.of_layer.items():
            layer = res.layers[self.blocks.layers[module]]
            if not layer.calls:  # a zero block: the session refuses it, or leaves it out
                continue
            calls = layer.calls  # several calls: more positions (no copy for one)
            # the inputs unfolded here, one layer at a time, and not kept (a convolution's patches
            # are large); a convolution called once only where a statistic reads its patches
            # (a transposed one's patches come from its zero-stuffed input: unfolded here)
            lazy = len(calls) == 1 and layer.kind == CONV and not isinstance(module, TRANSPOSED_CONV_LAYERS)
            if layer.kind == EMBEDDING:  # token ids, every call's positions after the last's
                x = EmbeddingInputs(module, joined([c.unfolded() for c in calls], 1))
            else:
                x = None if lazy else cat_positions([dense_inputs(module, c.unfolded()) for c in calls])
            g = joined([c.g for c in calls], 3)
            g_terms = None if calls[0].g_terms is None else joined([c.g_terms for c in calls], 3)
            exact_roots = None if calls[0].coupled_roots is None else joined([c.coupled_roots for c in calls], 3)
            for block in blocks:
                exact = None if layer.sqrt is None else split_columns(block, layer.sqrt, layer.with_bias)
                inputs = ConvInputs(block, calls[0]) if lazy else x if layer.kind == EMBEDDING else block.inputs(x)
                data = KroneckerData(inputs, g, res.segments, g_terms, exact, res.terms_per_example, exact_roots)
                out[block.name] = kronecker_stats(block, data, opts, "autograd")
        for block in self.blocks.parameters:
            columns = res.param_sqrt.get(block.name)
            if columns is not None:
                out[block.name] = parameter_stats(
                    block, columns, opts, "autograd", res.num_examples, res.terms_per_example, res.coupled
                )
        return {b.name: out[b.name] for b in self.blocks.blocks if b.name in out}


def _local_parameters(model: nn.Module, blocks: ModelBlocks) -> dict[nn.Module, dict[str, str]]:
    """The modules holding parameter blocks whose roots follow from the module's own input and
    output gradient (:func:`~curvlab.extract.autograd.local_params.is_local`) → ``{attribute: block}``."""
    shared = set(blocks.tied)
    owner = {id(p): (m, attr) for m in model.modules() for attr, p in m.named_parameters(recurse=False)}
    out: dict[nn.Module, dict[str, str]] = {}
    for block in blocks.parameters:
        module, attr = owner[id(block.weight)]
        if block.name not in shared and attr in ("weight", "bias") and is_local(module):
            out.setdefault(module, {})[attr] = block.name
    return out
