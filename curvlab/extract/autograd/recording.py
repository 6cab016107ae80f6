"""Recording one forward pass — the engine's own, or the user's inside a ``with`` block — and
running the vjps when the loss is computed, while its graph is intact.

:class:`Recording` is a context: forward hooks on the target layers keep each call's input and
add a zero leaf ``ε`` to its output; a forward hook on the loss module, when the loss is
computed, draws the loss-Hessian roots and runs every requested vjp route
(:mod:`.routes`) through the recorded graph with ``retain_graph=True``.  A later
``loss.backward()`` by the user is untouched (the vjps never accumulate into ``.grad``), so the
gradient and these statistics come from one forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from curvlab._options import check_int
from curvlab.extract.autograd import layer_io
from curvlab.extract.autograd.batch_check import layers_off_the_batch, leading_dimension
from curvlab.extract.autograd.backprop import BatchedVJP, SavedBytes, eager_hook, estimate, short_of
from curvlab.extract.autograd.local_params import batched, local_roots
from curvlab.extract.autograd.loss_roots import LossTerms, loss_terms, stacked_root
from curvlab.extract.autograd.reruns import rerun_roots
from curvlab.extract.autograd.rows import layout, misassigned_rows, misplaced_rows
from curvlab.extract.options import DEFAULT_MAX_BYTES
from curvlab.stats import FLAVOURS
from curvlab.extract.validate import checked_loss_inputs
from curvlab.extract.autograd.results import AutogradExtraction, LayerCall, LayerResult
from curvlab.extract.autograd.routes import batch_roots, selected_columns, separated_roots


@dataclass(frozen=True)
class Request:
    """What a recording computes at the loss call (see :func:`~curvlab.extract.autograd.extract_autograd`).

    Attributes:
        flavours, mc_samples: the stacked roots.
        max_bytes, vectorize: chunking of the batched vjps.
        coupled: treat the examples as coupled (``None``: whether the model couples them).
        sqrt: compute the Kronecker layers' exact square roots (``None``: when they do not follow
            from ``x`` and ``g``; ``"coupled"``: only where the examples are coupled).
        sqrt_flavours: flavours whose rows the square roots, term roots and parameter columns
            have (``None``: all).
        terms: with ``T_out > 1``, keep each call's term-separated roots ``g_terms``.
        include_bias: square roots include the bias column of layers with a trainable bias.
        params: parameter path → tensor whose per-column gradients form its square root.
        local: modules whose parameters among ``params`` act on each example alone
            (:func:`~.local_params.is_local`) → ``{attribute: path}``: where the examples are not
            coupled, those parameters' roots come from the gradients at the module's output
            (:func:`~.local_params.local_roots`), without a vjp per example.
        non_finite: a non-finite model output ``"raise"``s (with the other loss-input checks of
            :func:`curvlab.extract.validate.check_loss_inputs`), or ``"propagate"``s: NaN roots.
    """

    flavours: tuple[str, ...] = ("exact",)
    mc_samples: int = 1
    max_bytes: int = DEFAULT_MAX_BYTES
    vectorize: bool = True
    coupled: bool | None = None
    sqrt: bool | str | None = None
    sqrt_flavours: tuple[str, ...] | None = None
    terms: bool = False
    include_bias: bool = False
    params: Mapping[str, Tensor] = field(default_factory=dict)
    local: Mapping[nn.Module, Mapping[str, str]] = field(default_factory=dict)
    non_finite: str = "raise"

    def check(self) -> None:
        flavours = self.flavours
        if not flavours or len(set(flavours)) != len(flavours) or not set(flavours) <= set(FLAVOURS):
            raise ValueError(f"extract_autograd: flavours={flavours!r}; distinct values from {FLAVOURS}")
        if self.sqrt_flavours is not None and not set(self.sqrt_flavours) <= set(flavours):
            raise ValueError(f"extract_autograd: sqrt_flavours={self.sqrt_flavours!r} not all in {flavours!r}")
        for name in ("mc_samples", "max_bytes"):
            check_int("extract_autograd", name, getattr(self, name), 1)
        if self.sqrt not in (None, True, False, "coupled"):
            raise ValueError(f"extract_autograd: sqrt={self.sqrt!r}; True, False, None or 'coupled'")


class Recording:
    """Context recording one forward pass of ``model`` and running ``request`` at the loss call.

    Args:
        targets: target module → name (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding).
        loss_fn: the loss module whose (first) call inside the block triggers the vjps.
        request: what to compute.
        coupled: whether the examples are coupled (see
            :func:`~curvlab.extract.autograd.couples_examples`); ``None``: found at the loss call,
            by :func:`probe_coupling`.
        probed: what the probes of earlier recordings of the same model found, by the calls'
            modules, input shapes and modes and the output's shape: read and filled here (the
            optimizers' statistics passes probe once).
        model: the module the forward pass calls with the batch; where the examples look coupled,
            it runs once more on one more example to refuse a target whose input does not follow
            the batch (:func:`~.batch_check.layers_off_the_batch`); ``None``: not checked.

    After the block, :attr:`result` holds the :class:`AutogradExtraction` (``None`` if the loss
    was never computed inside the block).
    """

    def __init__(self, targets: Mapping[nn.Module, str], loss_fn: nn.Module, request: Request,
                 coupled: bool | None, probed: dict | None = None, model: nn.Module | None = None) -> None:
        request.check()
        for module, name in targets.items():
            layer_io.check_target(name, module)
        self.targets, self.loss_fn, self.request, self.coupled = dict(targets), loss_fn, request, coupled
        self.probed = {} if probed is None else probed
        self.model = model
        self._model_call: tuple[tuple, dict] | None = None  # the model's first call in the block
        self._model_output: Tensor | None = None  # what that call returned
        self._model_calls = 0
        self.calls: list[tuple[nn.Module, Tensor, Tensor]] = []  # (module, input, ε)
        self.versions: list[int] = []
        self.local_calls: list[tuple[nn.Module, Tensor, Tensor]] = []  # request.local's modules, as calls
        self.local_versions: list[int] = []
        self.result: AutogradExtraction | None = None
        self._handles: list = []
        self._saved: SavedBytes | None = None
        self._computing = False  # inside the vjps of the loss call
        self._checking = False  # inside batch_check's forward or the reruns (.reruns): not recorded

    # ------------------------------------------------------------------ hooks

    def _model_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._checking:
            return
        self._model_calls += 1
        if self._model_call is None:
            self._model_call = (args, kwargs)

    def _model_output_hook(self, module: nn.Module, args: tuple, output: object) -> None:
        if not self._checking and self._model_output is None:
            self._model_output = output

    def _layer_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        return self._record(module, args, kwargs, output, self.calls, self.versions)

    def _local_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        return self._record(module, args, kwargs, output, self.local_calls, self.local_versions)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor, calls: list, versions: list) -> Tensor:
        if self._checking:  # batch_check's forward or a rerun: not recorded
            return output
        if self._computing:  # the vjps ran the layer's forward again
            name = self.targets.get(module) or next(iter(self.request.local[module].values()))
            raise RuntimeError(
                f"curvlab (autograd engine): {name!r} ran its forward again while curvlab's vjps "
                "backpropagated through it: activation checkpointing (torch.utils.checkpoint) recomputes "
                "its forward in the backward pass, which the recording cannot follow; run the block "
                "without checkpointing"
            )
        # kept as called: under autocast a bfloat16 input to a float32 layer, which autograd
        # keeps anyway; unfold_input casts it when read (a float32 copy here doubled its memory)
        inp = args[0] if args else kwargs["input"]
        if calls is self.calls:
            layer_io.check_transposed_output(self.targets[module], module, inp, output)
        # A broadcast zero scalar: no output-sized memory; its gradient has the output's shape.
        eps = output.new_zeros(()).expand(output.shape).requires_grad_()
        calls.append((module, inp.detach(), eps))
        versions.append(inp._version)
        return output + eps

    def _loss_hook(self, module: nn.Module, args: tuple, kwargs: dict, loss: Tensor) -> None:
        if self.result is not None:
            raise RuntimeError(
                "curvlab (autograd engine): loss_fn was called twice inside one extraction; "
                "compute the loss once per forward pass in the block"
            )
        output = args[0] if args else kwargs["input"]
        targets = args[1] if len(args) > 1 else kwargs["target"]
        if output.numel() == 0 and self.request.non_finite == "propagate":
            return  # an empty batch (a rank's empty shard): no statistics, its NaN loss skips the step
        self._computing = True
        try:
            self.result = self._compute(output, targets, loss)
        finally:
            self._computing = False

    def __enter__(self) -> "Recording":
        layer_hook, local_hook = eager_hook(self._layer_hook), eager_hook(self._local_hook)
        for module in self.targets:  # first of the module's hooks: ε at its own output, before a user's hook
            self._handles.append(module.register_forward_hook(layer_hook, with_kwargs=True, prepend=True))
        for module in self.request.local:
            self._handles.append(module.register_forward_hook(local_hook, with_kwargs=True, prepend=True))
        self._handles.append(self.loss_fn.register_forward_hook(eager_hook(self._loss_hook), with_kwargs=True))
        if self.model is not None:
            self._handles.append(self.model.register_forward_pre_hook(eager_hook(self._model_hook), with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(eager_hook(self._model_output_hook)))
        self._saved = SavedBytes().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            self._saved.__exit__(*exc)
            self._saved = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ the vjps

    def _compute(self, output: Tensor, targets: Tensor, loss: Tensor) -> AutogradExtraction:
        req, calls = self.request, self.calls
        finite = checked_loss_inputs(self.loss_fn, output, targets, req.non_finite)
        # the examples: the layers' leading dimension, else (a layer is refused then) the model input's
        n_layers, model_n = self._layers_batch(), leading_dimension(*(self._model_call or ((), {})))
        terms = loss_terms(self.loss_fn, output, targets, n_layers if n_layers is not None else model_n)
        if n_layers is not None and output.dim() and output.shape[0] < n_layers == model_n:
            raise ValueError(
                f"curvlab (autograd engine): loss_fn's input has {output.shape[0]} rows for the {n_layers} examples of "
                "the model's input (and of its layers' inputs): the output leaves examples out or merges them (a "
                "slice or selection across the batch, logits[:k], a mean over the batch); give the loss every "
                "example's rows, N or N·T of them"
            )
        if n_layers is not None and output.shape[0] > n_layers and terms.num_examples != n_layers:
            raise ValueError(
                f"curvlab (autograd engine): loss_fn's input has {output.shape[0]} rows for the {n_layers} examples "
                "the layers' leading dimension counts, not a whole number of rows an example: a loss on [N·T, C] rows "
                "needs every example's T rows (a mask, logits.reshape(-1, C)[keep], drops some: keep every row and "
                "set the dropped targets to ignore_index (-100) instead)"
            )
        if finite:
            root, segments = stacked_root(self.loss_fn, output, targets, terms, req.flavours, req.mc_samples)
        else:  # non_finite="propagate": NaN statistics, no sampling from NaN outputs
            root, segments = stacked_root(self.loss_fn, torch.zeros_like(output), targets, terms, req.flavours, req.mc_samples)
            root = torch.full_like(root, float("nan"))
        # the inputs are kept by reference and unfolded when read (LayerCall.unfolded), one layer
        # at a time; what would stop that is refused here, at the loss call
        for (module, inp, _), version in zip(calls, self.versions):
            layer_io.check_input(self.targets[module], module, inp, version, terms.num_examples)
        n, t_out, size = terms.num_examples, terms.terms_per_example, output.element_size()
        leaves = [eps for _, _, eps in calls]
        saved = self._saved.total if self._saved is not None else 0
        leaf_bytes = sum(e.numel() for e in leaves) * size
        out_bytes = output.numel() * size
        local_leaves = [eps for _, _, eps in self.local_calls]
        local_bytes = sum(e.numel() for e in local_leaves) * size
        layers = BatchedVJP(output, leaves + local_leaves, estimate(saved, leaf_bytes + local_bytes, out_bytes),
                            req.max_bytes, req.vectorize)

        coupled = self.coupled
        key = (tuple((id(m), tuple(inp.shape), m.training) for m, inp, _ in calls), tuple(output.shape))
        if terms.num_examples != output.shape[0] and finite:
            self._check_rows(layers, output, terms, coupled)
            coupled = False  # every example's rows reach its own calls alone
        if coupled is None:
            coupled = self.probed.get(key)
            if coupled is None:
                coupled = finite and probe_coupling(layers, output, [self.targets[m] for m, _, _ in calls], n)
                if finite:
                    self.probed[key] = coupled
        if coupled:
            self._check_batch(key, n)
        factorable = not coupled and t_out == 1
        want_sqrt = coupled if req.sqrt == "coupled" else (not factorable) if req.sqrt is None else req.sqrt
        sqrt_flavours = req.sqrt_flavours or req.flavours
        columns, local = selected_columns(segments, sqrt_flavours, root.device)
        results = {name: LayerResult(name, m, layer_io.kind(m), factorable=factorable) for m, name in self.targets.items()}
        param_sqrt: dict[str, Tensor] = {}
        local_into = self._local_roots(columns, n, output.device, param_sqrt) if not coupled and t_out == 1 else None
        g_calls = batch_roots(layers, root, calls, local_into)
        layer_calls = [LayerCall(self.targets[module], module, inp, version, g)
                       for (module, inp, _), version, g in zip(calls, self.versions, g_calls)]
        for call in layer_calls:  # in forward order: a module's calls in the order it was called
            results[call.name].calls.append(call)
        for res in results.values():
            res.with_bias = req.include_bias and res.has_trainable_bias

        if t_out > 1 and (req.terms or (want_sqrt and not coupled)):
            _term_roots(layers, root, terms, columns, layer_calls)
        num_vjps = layers.num_vjps
        need_exact = want_sqrt and coupled
        params = {name: p for name, p in req.params.items() if name not in param_sqrt}
        if params and not coupled and t_out == 1 and finite:
            reran = self._rerun(output, root[columns], params, param_sqrt, key, saved)
            if reran is not None:
                num_vjps, params = num_vjps + reran, {}
        if need_exact or params:
            num_vjps += self._per_example(output, root, terms, columns, results, layer_calls, need_exact, params,
                                          param_sqrt, saved, leaf_bytes, out_bytes)
        if want_sqrt and not coupled:
            for res in results.values():
                if not res.calls:
                    res.sqrt = output.new_zeros(columns.numel() * t_out * n, *res.matrix_shape, dtype=res.module.weight.dtype)
                elif t_out == 1:
                    res.sqrt = res.square_root(columns=columns)
                else:  # M[(j·T_out + s)·N + n] from the term-separated roots
                    res.sqrt = sum(
                        layer_io.contract(res.module, res.contraction_inputs(c.unfolded()), c.g_terms, per_example=True)
                        for c in res.calls
                    ).flatten(0, 1)
        rows = t_out * n
        return AutogradExtraction(
            loss=loss.detach(),
            output=output.detach(),
            layers=results,
            segments=segments,
            sqrt_segments={f: slice(s.start * rows, s.stop * rows) for f, s in local.items()},
            term_segments={f: slice(s.start * t_out, s.stop * t_out) for f, s in local.items()},
            num_examples=n,
            terms_per_example=t_out,
            reduction_factor=terms.reduction_factor,
            coupled=coupled,
            num_vjps=num_vjps,
            columns_per_chunk=layers.chunk,
            param_sqrt=param_sqrt,
        )

    def _layers_batch(self) -> int | None:
        """The leading dimension of every recorded layer input, where they agree."""
        sizes = {inp.shape[0] for module, inp, _ in self.calls if inp.dim() >= 2 or isinstance(module, nn.Embedding)}
        return sizes.pop() if len(sizes) == 1 else None

    def _check_rows(self, vjp: BatchedVJP, output: Tensor, terms: LossTerms, coupled: bool | None) -> None:
        """Refuse ``[N·k, C]`` loss rows unless rows ``n·k … n·k + k − 1`` are example ``n``'s
        (:mod:`.rows`: laid out from a layer's output by views, slices, copies and entrywise maps, each row
        at its example's entries of that output, or reaching its example's layers and no other's; and the
        examples not coupled by the forward)."""
        per = output.shape[0] // terms.num_examples
        rows = (f"curvlab (autograd engine): loss_fn's input has {output.shape[0]} rows for the {terms.num_examples} "
                f"examples the layers' leading dimension counts, taken as {per} rows an example in order")
        grouped = ("flatten batch-first logits [N, T, C] with logits.reshape(-1, C) and targets [N, T] with "
                   "targets.reshape(-1), or pass [N, C, T] logits with [N, T] targets")
        if coupled:
            raise ValueError(f"{rows}, but the forward couples the examples (train-mode BatchNorm, or coupled=True): "
                             "which rows are whose cannot be told; pass [N, C, T] logits with [N, T] targets")
        path, index_map, leaf, obstacle = layout(output, [eps for _, _, eps in self.calls])
        grouping = ("rows grouped by example", index_map, terms.num_examples)
        if obstacle is None and grouping not in self.probed:
            example = misassigned_rows(output, leaf, terms)
            if example is not None:
                source = next(self.targets[m] for m, _, eps in self.calls if eps is leaf)
                self._refuse_sequence_first(rows, terms, source)
                raise ValueError(
                    f"{rows}, but example {example}'s entries of the output of {source!r} receive rows taken for "
                    "another example: the rows are not grouped by example (a slice across the examples, "
                    f"logits[1:], or of the flat rows; a sequence-first [T, N, C] flattened); {grouped}"
                )
            self.probed[grouping] = True
        # the coupling is kept per layout, modes and N (one example shows none), not per sequence length
        # (dynamically padded batches are not probed again); with an obstacle the probe alone places the
        # rows, below an operation the key does not describe (which may mix the examples on one batch
        # and not on another): probed every time, 2·⌈log₂ N⌉ vjp columns beside the statistics' N·T·C
        key = ("examples' rows not coupled", path, tuple((id(m), m.training) for m, _, _ in self.calls), terms.num_examples)
        if obstacle is None and key in self.probed:
            return
        misplaced = misplaced_rows(vjp, terms, [self.targets[m] for m, _, _ in self.calls], output.dtype, output.device,
                                   own=obstacle is not None)
        if misplaced is not None:
            self._refuse_sequence_first(rows, terms, misplaced[0])
        if misplaced is not None and obstacle is not None:  # rows laid out by an operation not followed
            layer, example, _ = misplaced
            raise ValueError(
                f"{rows}, but they come from the layers' outputs through {obstacle}, and "
                + (f"example {example}'s rows reach none of its layers" if layer is None else
                   f"the rows taken for other examples reach example {example} at {layer!r}")
                + ", so which rows are whose cannot be told: a mask or an index (logits.reshape(-1, C)[keep]) leaves "
                "as many rows to an example as it keeps — keep every row and set the dropped targets to ignore_index "
                "(-100), which drops their terms the same way —, and an operation across the examples (a batch "
                f"mean, a roll) mixes them; else {grouped}"
            )
        if misplaced is not None:
            layer, example, taken = misplaced
            shown = ", ".join(map(str, taken[:6])) + (", …" if len(taken) > 6 else "")
            raise ValueError(
                f"{rows}, but the vjp of the rows of examples {shown} reaches example {example} at {layer!r}: the "
                "forward couples the examples (train-mode BatchNorm; a sequence-first model, whose leading dimension "
                "counts positions, where a later position depends on the earlier ones), so no example's rows can be "
                f"told apart; {self._sequence_first_hint() or grouped}"
            )
        if obstacle is None:
            self.probed[key] = True

    def _sequence_first_hint(self) -> str | None:
        """The model's sequence-first modules (``batch_first=False``: on batch-first data they attend
        or recur across the examples), named, with what to do; ``None`` where it has none."""
        found = [path for path, m in (self.model.named_modules() if self.model is not None else ())
                 if getattr(m, "batch_first", None) is False]
        if not found:
            return None
        shown = ", ".join(map(repr, found[:3])) + (", …" if len(found) > 3 else "")
        return (f"{shown} {'is' if len(found) == 1 else 'are'} sequence-first (batch_first=False): on batch-first "
                "[N, T, ...] inputs it mixes the examples; build it with batch_first=True")

    def _refuse_sequence_first(self, rows: str, terms: LossTerms, layer: str | None) -> None:
        """Where rows are refused and the model was called on another number of examples than its
        layers' leading dimension counts, say that (a sequence-first module in a batch-first model)."""
        model_n = leading_dimension(*(self._model_call or ((), {})))
        if model_n in (None, terms.num_examples):
            return
        at = f" ({layer!r})" if layer else ""
        raise ValueError(
            f"{rows}, but the model was called on {model_n} examples (its input's leading dimension): its "
            f"layers{at} carry the batch on another dimension than their leading one — a sequence-first module, "
            "as nn.TransformerEncoderLayer with its default batch_first=False, inside a batch-first model —, so "
            "no example's rows can be told apart; build those modules batch-first (batch_first=True)"
        )

    def _check_batch(self, key: tuple, n: int) -> None:
        """Refuse a target whose input does not follow the batch although its leading dimension is
        the batch size (:mod:`.batch_check`): once per model call shape."""
        key = ("follows the batch", key)
        if self.model is None or self._model_call is None or n < 2 or key in self.probed:
            return
        self._checking = True
        try:
            off = layers_off_the_batch(self.model, *self._model_call, self.targets, n)
        finally:
            self._checking = False
        if off:  # kept unchecked: the next call raises again
            raise ValueError(
                f"curvlab (autograd engine): {off[0]!r} saw an input with leading dimension {n}, the batch size, "
                f"but still {n} when the model ran on {n + 1} examples: its input does not follow the batch, its "
                "output is broadcast over the examples (e.g. a position embedding wpe(torch.arange(T)) with "
                "T = N), so no example has inputs of its own; call it on the batch (wpe(pos.expand(N, -1)): "
                "the same values, a Kronecker block per example)"
            )
        self.probed[key] = True  # None (the model cannot run another batch size): not tried again

    def _local_roots(self, columns: Tensor, n: int, device: torch.device,
                     param_sqrt: dict[str, Tensor]) -> Callable[[slice, int, Tensor], None] | None:
        """Where ``request.local``'s modules were called once: their parameters' roots allocated in
        ``param_sqrt`` (rows ``j·N + n``, as the per-example route's), and the consumer of the
        layers' chunks that fills them from the gradients at the modules' outputs, chunk by chunk
        (every column's gradient at every BatchNorm's output would take gigabytes)."""
        modules = [m for m, _, _ in self.local_calls]
        once = {i for i, (m, inp, eps) in enumerate(self.local_calls)
                if modules.count(m) == 1 and batched(m, inp, eps, n)}
        if not once:
            return None
        paths, j = self.request.local, columns.numel()
        for i in once:
            layer_io.check_unmodified(next(iter(paths[modules[i]].values())), self.local_calls[i][1], self.local_versions[i])
        params = [(path, getattr(modules[i], attr)) for i in once for attr, path in paths[modules[i]].items()]
        _check_fits([(path, p.shape, p.element_size()) for path, p in params], j * n, device,
                    self.request.sqrt_flavours or self.request.flavours)
        for path, p in params:
            param_sqrt[path] = p.new_zeros(j * n, *p.shape)
        row_of = {c: row for row, c in enumerate(columns.tolist())}  # root column → its rows' block

        def consume(sl: slice, leaf: int, grad: Tensor) -> None:
            taken = [(row_of[c], c - sl.start) for c in range(sl.start, sl.stop) if c in row_of]
            if leaf not in once or not taken:
                return
            rows, at = (list(t) for t in zip(*taken))
            module, inp, _ = self.local_calls[leaf]
            for attr, root in local_roots(module, inp, grad[at]).items():
                param_sqrt[paths[module][attr]].view(j, n, *root.shape[2:])[rows] = root

        return consume

    def _rerun(self, output: Tensor, cotangents: Tensor, params: dict[str, Tensor], param_sqrt: dict[str, Tensor],
               key: tuple, saved: int) -> int | None:
        """The parameter blocks' roots (rows ``j·N + n``) by running the model on one example at a
        time (:mod:`.reruns`), where the loss is of the output of the model's only call in the
        block; the vjp count, or ``None`` (not possible, or a rerun's output differed from the
        batch's: then not tried again for this call's shapes)."""
        key = ("reruns", key)
        if (self.model is None or self._model_calls != 1 or output is not self._model_output
                or output.dtype not in (torch.float32, torch.float64) or self.probed.get(key) is False):
            return None
        req, n, size = self.request, output.shape[0], output.element_size()
        _check_fits([(name, p.shape, p.element_size()) for name, p in params.items()], cotangents.shape[0] * n,
                    output.device, req.sqrt_flavours or req.flavours)
        param_bytes = sum(p.numel() for p in params.values()) * size
        per_column = estimate(saved // n, param_bytes, output.numel() // n * size)
        self._checking = True
        try:
            got = rerun_roots(self.model, *self._model_call, output, cotangents, params, per_column,
                              req.max_bytes, req.vectorize)
        finally:
            self._checking = False
        self.probed[key] = got is not None
        if got is None:
            return None
        roots, num_vjps = got
        for name, root in roots.items():
            param_sqrt[name] = root.flatten(0, 1)
        return num_vjps

    def _per_example(self, output, root, terms, columns, results, layer_calls, need_exact, params, param_sqrt, saved,
                     leaf_bytes, out_bytes) -> int:
        """One vjp per (root column, term, example): the coupled exact roots of the layers
        (``need_exact``) and the per-column gradients of the parameter blocks."""
        calls, req = self.calls, self.request
        n, t_out, size = terms.num_examples, terms.terms_per_example, output.element_size()
        rows = columns.numel() * t_out * n
        leaves = [eps for _, _, eps in calls] if need_exact else []
        params = list(params.items())
        param_bytes = sum(p.numel() for _, p in params) * size
        # output locations of every call: T = |output| / (N·d_out)
        locations = [eps.numel() // (n * results[call.name].shape[0]) for (_, _, eps), call in zip(calls, layer_calls)]
        kept = _keeps_roots(layer_calls, locations, results, n) if need_exact else set()
        contraction = sum(math.prod(results[call.name].matrix_shape) for call in layer_calls
                          if call.name not in kept) * size if need_exact else 0
        per_column = estimate(saved, leaf_bytes if need_exact else 0, out_bytes, contraction + 2 * param_bytes)
        vjp = BatchedVJP(output, leaves + [p for _, p in params], per_column, req.max_bytes, req.vectorize)
        x_aug: list[Tensor | None] = [None] * len(calls)
        dense = [(name, p.shape, p.element_size()) for name, p in params]
        if need_exact:
            dense += [(res.name, res.matrix_shape, res.module.weight.element_size()) for res in results.values()
                      if res.name not in kept]
        _check_fits(dense, rows, output.device, req.sqrt_flavours or req.flavours)
        if need_exact:
            for res in results.values():
                if res.name not in kept:  # the weight's dtype: under autocast the output may be bfloat16
                    res.sqrt = output.new_zeros(rows, *res.matrix_shape, dtype=res.module.weight.dtype)
            for i, (call, t) in enumerate(zip(layer_calls, locations)):
                res = results[call.name]
                if res.name in kept:
                    call.coupled_roots = output.new_zeros(rows, n, res.shape[0], t, dtype=call.module.weight.dtype)
                else:
                    x_aug[i] = res.contraction_inputs(layer_io.unfold_input(call.module, call.inp))
        for name, p in params:
            param_sqrt[name] = output.new_zeros(rows, *p.shape, dtype=p.dtype)

        def consume(sl: slice, grads: tuple[Tensor, ...]) -> None:
            for i, (module, _, _) in enumerate(calls if need_exact else ()):
                g = layer_io.grads_to_layout(module, grads[i])  # [k, N, d_out, T]
                if x_aug[i] is None:
                    layer_calls[i].coupled_roots[sl] = g
                else:
                    results[self.targets[module]].sqrt[sl] += layer_io.contract(module, x_aug[i], g, per_example=False)
            for j, (name, _) in enumerate(params):
                param_sqrt[name][sl] = grads[len(leaves) + j]

        separated_roots(vjp, root, terms, columns, True, consume)
        return vjp.num_vjps


def _check_fits(roots: list[tuple[str, tuple[int, ...], int]], rows: int, device: torch.device, flavours) -> None:
    """Refuse, before allocating them, dense square roots (``rows`` × a block, one row per root
    column, term and example: ``(name, block shape, element size)``) larger than the device's
    free memory — a tied vocabulary matrix under the exact Fisher, where ``rows`` counts every
    class of every token."""
    need = rows * sum(math.prod(shape) * size for _, shape, size in roots)
    free = short_of(need, device)
    if free is None:
        return
    name, shape, _ = max(roots, key=lambda root: math.prod(root[1]))
    raise MemoryError(
        f"curvlab.extract: the exact square roots need {need / 2**30:.1f} GiB ({rows} columns × "
        f"{sum(math.prod(r[1]) for r in roots)} entries; the largest block {name!r}, {tuple(shape)}), more than "
        f"the {free / 2**30:.1f} GiB free on {device}. A column per loss-root column, term and example "
        f"(fisher={'/'.join(flavours)}; 'exact' has one per class): use fisher='mc' (mc_samples per term), "
        "fewer examples, or freeze that parameter (requires_grad=False)"
    )


def probe_coupling(vjp: BatchedVJP, output: Tensor, names: list[str], n: int) -> bool:
    """Whether the forward couples the examples: the vjp of a random cotangent at example 0 of
    the output alone reaches another example of a target call's output (``vjp``'s leaves, their
    layers ``names``).  One vjp; it finds what no module type shows — a functional batch norm, a
    batch mean — and refuses a layer that sees the batch on its input's dimension 1 (a
    sequence-first ``[T, N, D]`` tensor whose ``T`` happens to equal ``N``): the vjp reaches
    every position of example 0 there, and nothing else."""
    if n < 2 or not vjp.leaves:
        return False
    gen = torch.Generator(device=output.device).manual_seed(0)  # the global RNG untouched
    cotangent = torch.zeros_like(output)
    cotangent[0] = torch.randn(output.shape[1:], generator=gen, device=output.device, dtype=output.dtype)
    coupled = False
    for name, grad in zip(names, vjp(cotangent[None])):
        grad = grad[0]
        if not grad[1:].any():
            continue
        if grad.dim() > 2 and grad.shape[1] == n and not grad[:, 1:].any():
            raise ValueError(
                f"curvlab (autograd engine): {name!r} sees the batch on dimension 1 (its output has shape "
                f"{tuple(grad.shape)}: a sequence-first [T, N, ...] tensor, e.g. batch_first=False); "
                "curvlab needs the batch as the leading dimension (batch_first=True)"
            )
        coupled = True
    return coupled


def _keeps_roots(layer_calls: list[LayerCall], locations: list[int], results: dict, n: int) -> set[str]:
    """Layers whose coupled exact root is kept as the roots at their outputs
    (:attr:`LayerCall.coupled_roots`): a Linear or convolution whose batch has fewer locations
    than the layer's width, ``N·ΣT < D`` — those roots take ``N·ΣT/D`` of the ``M_k``'s size,
    and every ``M_k``'s rows lie in the span of the ``N·ΣT`` inputs (ResNet-18's last two
    stages at N = 8: 1/9 and 1/36 of it)."""
    totals: dict[str, int] = {}
    for call, t in zip(layer_calls, locations):
        totals[call.name] = totals.get(call.name, 0) + t
    return {name for name, t in totals.items()
            if results[name].kind != layer_io.EMBEDDING and n * t < results[name].matrix_shape[1]}


def _term_roots(vjp: BatchedVJP, root: Tensor, terms, columns: Tensor, layer_calls: list[LayerCall]) -> None:
    """Each call's term-separated roots ``g_terms [columns·T_out, N, d_out, T]``."""
    parts: list[list[Tensor]] = [[] for _ in layer_calls]

    def consume(sl: slice, grads: tuple[Tensor, ...]) -> None:
        for i, (call, grad) in enumerate(zip(layer_calls, grads)):
            parts[i].append(layer_io.grads_to_layout(call.module, grad))

    separated_roots(vjp, root, terms, columns, False, consume)
    for call, p in zip(layer_calls, parts):
        call.g_terms = torch.cat(p, 0)
