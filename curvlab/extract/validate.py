"""Checks that a loss can be extracted, with errors that name the culprit.

Which modules of a model are supported is decided in :mod:`curvlab.model_blocks` (the blocks) and
:mod:`curvlab.extract.engines` (which engine can run them).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from curvlab.block import Block
from curvlab.model_blocks import ModelBlocks, UnsupportedModelError
from curvlab.reuse import keep, kept

SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)
#: Losses with one term per example over outputs ``[N, …, C]`` (the last dimension its vector), whose
#: ``mean`` averages over every element; cross-entropy's classes are on dimension 1.
ELEMENTWISE_LOSSES = (nn.MSELoss, nn.BCEWithLogitsLoss)

__all__ = ["ELEMENTWISE_LOSSES", "SUPPORTED_LOSSES", "UnsupportedModelError", "check_loss", "check_loss_inputs",
           "check_target_dtype", "checked_loss_inputs"]


def check_loss(loss_fn: nn.Module) -> None:
    """Only CrossEntropyLoss, MSELoss and BCEWithLogitsLoss, with reduction mean or sum and no extras."""
    if not isinstance(loss_fn, SUPPORTED_LOSSES):
        raise UnsupportedModelError(
            f"curvlab.extract: loss_fn is {type(loss_fn).__name__}; supported losses are "
            "nn.CrossEntropyLoss, nn.MSELoss and nn.BCEWithLogitsLoss (module instances, not functions)"
        )
    base = next(b for b in SUPPORTED_LOSSES if isinstance(loss_fn, b))
    if type(loss_fn).forward is not base.forward:  # its Hessian is not the base's
        raise UnsupportedModelError(
            f"curvlab.extract: loss_fn is {type(loss_fn).__name__}, a subclass of nn.{base.__name__} with "
            f"its own forward; curvlab knows the loss-Hessian of nn.{base.__name__}'s forward only (for a "
            "scaled loss, scale the Fisher instead: it is linear in the loss)"
        )
    if loss_fn.reduction not in ("mean", "sum"):
        raise UnsupportedModelError(
            f"curvlab.extract: loss_fn.reduction={loss_fn.reduction!r}; use 'mean' or 'sum'"
        )
    # (label smoothing is supported: its targets sum to one, so the loss-Hessian diag(p) − ppᵀ is
    # cross-entropy's; class weights scale it by each target's weight, which no root here carries)
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is not None:
        raise UnsupportedModelError(
            "curvlab.extract: CrossEntropyLoss with class weights is not supported (its loss-Hessian is "
            "weighted by each target's class, which neither engine's roots carry)"
        )
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and (loss_fn.weight is not None or loss_fn.pos_weight is not None):
        given = "weight" if loss_fn.weight is not None else "pos_weight"
        raise UnsupportedModelError(
            f"curvlab.extract: BCEWithLogitsLoss with {given} is not supported (its loss-Hessian is not "
            "the Bernoulli likelihood's σ(1 − σ), which the Fisher is)"
        )


def check_target_dtype(loss_fn: nn.Module, targets: Tensor) -> None:
    """BCE's and MSE's targets are real numbers: integer or boolean labels are refused before the
    loss is called (torch's own error names neither the loss nor the targets)."""
    if isinstance(loss_fn, ELEMENTWISE_LOSSES) and not targets.is_floating_point():
        raise ValueError(
            f"curvlab.extract ({type(loss_fn).__name__}): targets of dtype {targets.dtype}; it takes "
            "floating-point targets of the output's dtype (e.g. targets.float())"
        )


def check_eigenbases(eigenbases: Mapping[str, tuple[Tensor, Tensor]], blocks: ModelBlocks) -> None:
    """Every basis of ``"kfe"`` names a Kronecker block and fits it: ``U_out`` ``[d_out, k ≤ d_out]``,
    ``U_in`` ``[D, k ≤ D]`` (a basis for a block the model lacks was ignored)."""
    shapes = {b.name: b.layout.shape for b in blocks.kronecker}
    for name, bases in eigenbases.items():
        if name not in shapes:
            raise ValueError(f"curvlab.extract: eigenbases names {name!r}, which is not a Kronecker block of the "
                             f"model (they are: {', '.join(shapes) or 'none'})")
        if not (isinstance(bases, (tuple, list)) and len(bases) == 2
                and all(isinstance(u, Tensor) and u.dim() == 2 for u in bases)):
            raise ValueError(f"curvlab.extract: eigenbases[{name!r}] must be a pair of matrices (U_out, U_in)")
        for side, u, rows in zip(("U_out", "U_in"), bases, shapes[name]):
            if u.shape[0] != rows or not 0 < u.shape[1] <= rows:
                raise ValueError(f"curvlab.extract: eigenbases[{name!r}]: {side} has shape {tuple(u.shape)}; the "
                                 f"block is {shapes[name][0]} × {shapes[name][1]}, so {side} must be [{rows}, k ≤ {rows}]")
    _check_orthonormal(eigenbases)


def _check_orthonormal(eigenbases: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    """Every basis has orthonormal columns: ``‖U v‖ = ‖v‖`` for a random ``v`` (which fails with
    probability one for any other ``U``; ``O(D k)``, where ``UᵀU`` would cost ``O(D k²)``), all
    bases checked with one sync.  In the basis' own dtype: a float64 copy of every basis cost an
    EKFAC statistics step of the MLP 784-128-64-10 about 1 ms (the optimizers pass theirs each
    step).  Every ``v`` drawn on the host at once and copied to each device and dtype once (on a
    GPU each copy waits for the device: a basis at a time, ResNet-18's 42 bases waited 42 times);
    a matrix-vector product per basis, their norms in one op.  A basis that passed is not
    checked again while unchanged (its version): the optimizers pass the same bases on every
    rescaling step between two refreshes (0.2 ms of the MLP 784-128-64-10's EKFAC statistics step)."""
    pending = {name: pair for name, pair in eigenbases.items() if not all(kept(u, "orthonormal") for u in pair)}
    _check_bases(pending)  # raises unless every one passes
    for pair in pending.values():
        for u in pair:
            keep(u, "orthonormal", True)


def _check_bases(eigenbases: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    bases = [u.detach() for pair in eigenbases.values() for u in pair]
    if not bases:
        return
    gen = torch.Generator().manual_seed(0)  # never the global RNG: MC sampling draws from it
    drawn = torch.randn(sum(u.shape[1] for u in bases), generator=gen, dtype=torch.float64)
    kinds: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}  # → v (float64 host, device)
    for u in bases:
        if (u.device, u.dtype) not in kinds:
            v = drawn.to(u.dtype)
            kinds[u.device, u.dtype] = v.double(), v.to(u.device)
    products, vs, tolerances, start = [], [], [], 0
    for u in bases:
        k, (host, device) = u.shape[1], kinds[u.device, u.dtype]
        products.append(u @ device[start:start + k])
        vs.append(host[start:start + k])
        tolerances.append(1e-3 if torch.finfo(u.dtype).eps > 1e-10 else 1e-8)  # float32 eigh: ~1e-6
        start += k
    norms = torch._foreach_norm(products)
    if len(kinds) > 1:  # one device and dtype to stack them on
        norms = [n.to(products[0].device, torch.float64) for n in norms]
    ratios = torch.stack(norms).to("cpu", torch.float64) / torch.stack(torch._foreach_norm(vs))
    worst = (ratios.square() - 1).abs() / torch.tensor(tolerances, dtype=torch.float64)
    if not bool(torch.isfinite(worst).all() and (worst <= 1).all()):
        name, side = divmod(int(torch.nan_to_num(worst, nan=torch.inf).argmax()), 2)
        raise ValueError(f"curvlab.extract: eigenbases[{list(eigenbases)[name]!r}]: "
                         f"{('U_out', 'U_in')[side]} does not have orthonormal columns")


def checked_loss_inputs(loss_fn: nn.Module, output: Tensor, targets: Tensor | None, non_finite: str) -> bool:
    """Whether ``output`` is finite, after :func:`check_loss_inputs` — whose refusal of a
    non-finite output ``non_finite="propagate"`` leaves out (the caller then propagates NaN
    statistics; the targets are checked either way).  Both engines call this where their
    backward pass starts, and nothing after it checks the same again (each check waits for a GPU)."""
    finite = bool(torch.isfinite(output.detach()).all())
    check_loss_inputs(loss_fn, output, targets, output_finite=finite or non_finite != "raise")
    return finite


def check_loss_inputs(loss_fn: nn.Module, output: Tensor, targets: Tensor | None,
                      output_finite: bool | None = None) -> None:
    """What reaches the loss of an extraction: a batch, finite outputs, targets the Fisher
    counts the way the loss does (called where the backward pass starts).  ``output_finite``:
    the caller's finding, so the output is not checked twice (each check waits for a GPU); True
    also where the caller takes a non-finite output (:func:`checked_loss_inputs`).

    Raises:
        ValueError: an empty batch; non-finite model outputs (the curvature is undefined there)
            or MSE targets; BCE targets outside [0, 1]; a CrossEntropyLoss (``"mean"``) whose
            every target equals ``ignore_index`` (its loss is NaN; some such targets are
            taken: their terms are dropped, as torch's loss drops them).
    """
    who = f"curvlab.extract ({type(loss_fn).__name__})"
    n = output.shape[0] if output.dim() else 1
    if output.numel() == 0:
        raise ValueError(f"{who}: empty batch: the loss received {n} examples and {output.numel()} outputs")
    if output_finite is None:
        output_finite = bool(torch.isfinite(output.detach()).all())
    if not output_finite:
        bad = ~torch.isfinite(output.detach())
        rows = int(bad.reshape(n, -1).any(1).sum())
        raise ValueError(
            f"{who}: the model output has {int(bad.sum())} non-finite values (NaN/inf) in {rows} of "
            f"{n} examples; the Fisher is undefined there: check the inputs and the parameters"
        )
    if targets is None:
        return
    if isinstance(loss_fn, ELEMENTWISE_LOSSES) and targets.shape != output.shape:
        raise ValueError(
            f"{who}: targets of shape {tuple(targets.shape)} for outputs {tuple(output.shape)}; torch would "
            "broadcast them (with a warning) or refuse them: pass targets of the output's shape"
        )
    if isinstance(loss_fn, nn.MSELoss) and not bool(torch.isfinite(targets).all()):
        raise ValueError(f"{who}: the targets have non-finite values (NaN/inf)")
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and not bool(((targets >= 0) & (targets <= 1)).all()):
        # (the loss-Hessian σ(1 − σ) holds for any target, but only a probability makes the loss
        # a Bernoulli likelihood, whose Fisher that is)
        raise ValueError(f"{who}: targets must be probabilities in [0, 1] (smallest {float(targets.min()):.3g}, "
                         f"largest {float(targets.max()):.3g}; NaN is refused too)")
    if isinstance(loss_fn, nn.CrossEntropyLoss) and targets.is_floating_point():
        # class probabilities: the loss's Hessian is (Σ_c q_c)(diag p − p pᵀ), the Fisher's only
        # where they sum to one
        if targets.shape != output.shape:
            raise ValueError(f"{who}: class-probability targets of shape {tuple(targets.shape)} for logits "
                             f"{tuple(output.shape)}: they must have the logits' shape")
        total = targets.detach().sum(1)
        # at float32's precision whatever the dtype: probabilities made in float32 (a softmax,
        # then .double()) sum to one within its rounding, which scales the Fisher by 1 ± 1e-6
        tolerance = 100 * max(torch.finfo(total.dtype).eps, torch.finfo(torch.float32).eps) * output.shape[1]
        if not bool(torch.isfinite(targets).all() and (targets >= 0).all() and ((total - 1).abs() <= tolerance).all()):
            worst = float(torch.nan_to_num((total - 1).abs(), nan=torch.inf).max())
            raise ValueError(f"{who}: class-probability targets must be non-negative and sum to one over the "
                             f"classes (dim 1) within {tolerance:.1e} (worst |sum - 1|: {worst:.3g}; "
                             f"smallest entry {float(targets.min()):.3g}): the loss's curvature is the "
                             "Fisher's only then")
    if isinstance(loss_fn, nn.CrossEntropyLoss) and not targets.is_floating_point() and loss_fn.reduction == "mean":
        if targets.numel() and bool((targets == loss_fn.ignore_index).all()):
            raise ValueError(
                f"{who}: all {targets.numel()} targets equal ignore_index={loss_fn.ignore_index}: torch's mean "
                "over no loss terms is NaN, and so would the curvature be; give the batch a target the "
                "loss counts"
            )


class LayerUseCheck:
    """Refuses a Kronecker layer whose statistics would not describe its block: its parameters
    also used outside the layer's own calls (a tied output embedding ``h @ emb.weight.T``,
    ``F.linear(x, layer.weight)``, a weight transformed inside a custom ``forward``), or a call
    of the layer with gradients off (``torch.no_grad()``: its inputs would be counted, its
    output never reaches the loss).

    A Kronecker block is built from what the layer's calls see — their inputs and output
    gradients — so another use of its weight would be missing from it, silently.  Each call of
    ``nn.Linear``/``nn.Conv*``/``nn.Embedding`` reaches a parameter's gradient accumulator along
    one edge of the autograd graph; more edges than calls is another use.  (Fewer is fine: a
    compiled graph, an autocast cache or a checkpointed segment joins them.)  Usage: a context
    around the forward pass that counts the calls, then :meth:`check` on its output — at the
    loss call when given ``loss_fn`` (as :class:`~curvlab.extract.ExtractionSession` runs it).
    """

    def __init__(self, layers: dict[nn.Module, str], of_layer: Mapping[nn.Module, list[Block]],
                 loss_fn: nn.Module | None = None) -> None:
        self.layers, self.loss_fn = layers, loss_fn
        # the parameters of the layers' blocks (a bias shared with another module is a parameter
        # block of its own, its uses anywhere)
        self.own = {id(p) for blocks in of_layer.values() for b in blocks for p in b.parameters()}
        self.calls: dict[nn.Module, int] = {}
        self.detached: dict[nn.Module, int] = {}
        self._handles: list = []

    def __enter__(self) -> "LayerUseCheck":
        self.calls, self.detached = dict.fromkeys(self.layers, 0), dict.fromkeys(self.layers, 0)
        self.unreached: list[nn.Module] = []
        self._handles = [m.register_forward_hook(self._called) for m in self.layers]
        if self.loss_fn is not None:
            self._handles.append(self.loss_fn.register_forward_pre_hook(lambda _, args: self.check(args[0] if args else None)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _called(self, module: nn.Module, args: object, output: object) -> None:
        counts = self.calls if getattr(output, "requires_grad", True) else self.detached
        counts[module] += 1

    def check(self, output: object) -> None:
        """Raise :class:`UnsupportedModelError` naming the first layer used otherwise than by its
        calls, in the forward pass that gave ``output``."""
        for module, path in self.layers.items():
            if self.detached[module]:
                raise UnsupportedModelError(
                    f"curvlab.extract: {path} ({type(module).__name__}) was called {self.detached[module]} time(s) "
                    "with gradients off (torch.no_grad(), or torch.utils.checkpoint's reentrant forward) in the "
                    "forward pass: its Kronecker statistics would "
                    "count those calls' inputs, whose outputs never reach the loss — call it only where it does"
                )
        root = getattr(output, "grad_fn", None)
        if root is None:
            return
        uses = graph_uses(root)
        # called, but no parameter reaches the loss (a head of another loss): a zero block
        self.unreached = [m for m in self.layers if self.calls[m] and not any(uses.get(p, 0) for p in m.parameters(recurse=False))]
        used = [f"{path}.{name}" for m, path in self.layers.items()
                for name, p in m.named_parameters(recurse=False) if uses.get(p, 0)]
        if not any(self.calls.values()) and used:
            raise UnsupportedModelError(
                f"curvlab.extract: the loss comes from a forward pass in which no layer's hooks ran, yet "
                f"{used[0]} reaches it: the model was called before `opt.track` (or the ExtractionSession) "
                "began — call it inside the block — or its layers' weights are used without calling the "
                "modules (F.linear(x, layer.weight): call the module), or a torch.compile'd model's first "
                "call ran without curvlab's hooks and it keeps running without them (set "
                "torch._dynamo.config.skip_nnmodule_hook_guards = False before its first call)"
            )
        for module, path in self.layers.items():
            for name, p in module.named_parameters(recurse=False):
                if id(p) not in self.own:
                    continue
                if uses.get(p, 0) and not self.calls[module]:
                    raise UnsupportedModelError(
                        f"curvlab.extract: {path}.{name} ({type(module).__name__}) is used in the forward pass "
                        "but its module's forward hooks never ran: either the weight is used without calling "
                        "the module (F.linear(x, layer.weight), a tied output embedding: call the module, "
                        "tie a decoder module to it (decoder.weight = emb.weight: one parameter block), or "
                        "freeze that parameter), or a torch.compile'd model's first call ran without "
                        "curvlab's hooks (outside `opt.track` or curvlab.extract) and it keeps running "
                        "without them (set torch._dynamo.config.skip_nnmodule_hook_guards = False before "
                        "its first call)"
                    )
                if uses.get(p, 0) > self.calls[module]:
                    raise UnsupportedModelError(
                        f"curvlab.extract: {path}.{name} ({type(module).__name__}) is used {uses[p]} times in "
                        f"the forward pass but its module is called {self.calls[module]} time(s): it is also "
                        "used outside the module (e.g. a tied output embedding `h @ emb.weight.T`, or "
                        "F.linear(x, layer.weight)), and a Kronecker block sees only the module's calls — "
                        "call the module for every use, tie a module to the weight for the other use (an output "
                        "embedding: decoder = nn.Linear(d, vocab); decoder.weight = emb.weight — the shared "
                        "tensor is then one parameter block), or freeze that parameter"
                    )
                if 0 < uses.get(p, 0) < self.calls[module]:
                    raise UnsupportedModelError(
                        f"curvlab.extract: {path} ({type(module).__name__}) was called {self.calls[module]} times "
                        f"but loss_fn's output is reached through {uses[p]} of them: the others' inputs would enter its "
                        "Kronecker statistics though their outputs never reach the loss (a second forward pass "
                        "before loss_fn is called, e.g. for a consistency term) — call loss_fn before that pass, "
                        "or run it outside the block"
                    )


def graph_uses(root: object) -> dict[Tensor, int]:
    """Leaf tensor → number of edges of the autograd graph below ``root`` into its gradient
    accumulator (one per use of the tensor in the forward pass)."""
    seen, stack, counts = {root}, [root], {}
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is None:
                continue
            leaf = getattr(child, "variable", None)  # an AccumulateGrad node
            if leaf is not None:
                counts[leaf] = counts.get(leaf, 0) + 1
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    return counts
