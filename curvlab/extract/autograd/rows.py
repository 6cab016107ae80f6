"""A loss on ``[N·k, C]`` rows of ``N`` examples: which rows are whose, checked before use.

A language model's per-token loss is usually written on its logits flattened,
``loss_fn(logits.reshape(-1, C), targets.reshape(-1))`` (HuggingFace's models, curvlinops'
convention): ``k`` loss terms per example, rows ``n·k … n·k + k − 1`` example ``n``'s where a
batch-first ``[N, T, C]`` output is flattened.  The engine takes them as such only where that
holds, not by luck of the shapes:

1. :func:`layout` — the rows are a recorded layer's output laid out anew by views, slices,
   copies and casts (``logits[:, :-1].contiguous().view(-1, C)``, ``.float()``) and entrywise
   maps with constants (a temperature ``logits / τ``, Gemma's soft-capping
   ``torch.tanh(logits / c) * c``): each entry of the rows is a function of one entry of that
   output.  A mask or an index (``logits.reshape(-1, C)[keep]``) or any other operation is
   refused.
2. :func:`misassigned_rows` — each row lands at its own example's entries of that output: the
   vjps of those nodes alone (not of the model) of ``±1`` by one bit of the example index
   each, ``⌈log₂ N⌉`` of them, each against the vjp of ones (an entrywise map scales an entry's
   cotangent by its derivative, the same for every sign; negating the cotangents negates the
   vjp exactly).  Refuses rows of other examples (``logits[1:]``, a slice of the
   flat rows, a sequence-first ``[T, N, C]`` flattened).  Kept per index map: the nodes with
   their arguments (slice bounds, sizes), the layer output's shape and the rows'.
3. :func:`misplaced_rows` — the examples (what the layers' leading dimension counts) are not
   coupled by the forward: the vjp of the rows of the examples with one bit set (or clear)
   reaches no other example's layers, ``2·⌈log₂ N⌉`` vjps through the model.  Refuses a causal
   sequence-first model (its leading dimension counts positions, and a later one depends on the
   earlier) and train-mode BatchNorm.  Kept per layout, modules' modes and ``N`` (not per sequence
   length: dynamically padded batches are not probed again; ``N``: one example shows no
   coupling).

Where 1. meets an operation it cannot follow — GPT-2's decoder tied to its embedding, a
parameter block and no recorded layer, between the last recorded layer and the logits; a
learned temperature — 3. alone decides, on every call (nothing below that operation is in the
key), with each example's rows required to reach its own layer calls too: rows that reach their
example's calls and no other's are that example's.
Then a refusal names the operation (a mask that leaves examples unequal counts of rows, a
product that copies the rows across examples).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvlab.extract.autograd.backprop import BatchedVJP
from curvlab.extract.autograd.loss_roots import LossTerms

#: autograd nodes (names without their version suffix) that only lay out their input anew
LAYOUT_NODES = frozenset({
    "ViewBackward", "UnsafeViewBackward", "ReshapeAliasBackward", "AliasBackward", "CloneBackward",
    "SliceBackward", "TransposeBackward", "TBackward", "PermuteBackward", "SqueezeBackward",
    "UnsqueezeBackward", "ToCopyBackward",
})
#: autograd nodes of entrywise maps, taken where their other operand is a constant (no gradient:
#: one input); a product's or quotient's of one element (:func:`_keeps_entries`)
ENTRYWISE_NODES = frozenset({
    "TanhBackward", "MulBackward", "DivBackward", "AddBackward", "SubBackward", "RsubBackward", "NegBackward",
})


def _keeps_entries(node: object, name: str) -> bool:
    """Whether ``node`` lays out its input anew or maps it entry by entry (:data:`ENTRYWISE_NODES`)
    with constants of one element: a product or quotient saves its constant as ``_saved_other`` or,
    on the left, ``_saved_self`` — both are checked.  A sum's or difference's constant is not
    saved: its broadcast shows in the shapes of the rows (part of the index map) and, across
    examples, in the vjps of :func:`misassigned_rows`."""
    if name in LAYOUT_NODES:
        return True
    saved = (getattr(node, a, None) for a in ("_saved_self", "_saved_other"))
    return name in ENTRYWISE_NODES and all(not isinstance(v, Tensor) or v.numel() == 1 for v in saved)


def layout(rows: Tensor, leaves: list[Tensor]) -> tuple[tuple[str, ...], tuple[str, ...], Tensor | None, str | None]:
    """The autograd nodes from ``rows`` back to the output of a recorded call (its sum with one
    of the ``ε`` ``leaves``): their names, and their names with their arguments (what makes the
    index map, with the leaf's and the rows' shapes); that leaf; and ``None`` where every node
    keeps the entries (:func:`_keeps_entries`), otherwise the node in the way."""
    ours = {id(e): e for e in leaves}
    node, names, args = rows.grad_fn, [], []
    while node is not None:
        inputs = [f for f, _ in node.next_functions if f is not None]
        leaf = next((ours[id(v)] for f in inputs if id(v := getattr(f, "variable", None)) in ours), None)
        if leaf is not None:
            return tuple(names), (*args, repr(tuple(leaf.shape)), repr(tuple(rows.shape))), leaf, None
        names.append(type(node).__name__)
        if len(inputs) != 1 or not _keeps_entries(node, names[-1].rstrip("0123456789")):
            return tuple(names), tuple(args), None, names[-1]
        saved = ((a, getattr(node, a)) for a in sorted(dir(node)) if a.startswith("_saved_"))
        args.append(repr((names[-1], [(a, v) for a, v in saved if not isinstance(v, Tensor)])))
        node = inputs[0]
    return tuple(names), tuple(args), None, "no layer's output"


def _bits(n: int) -> int:
    return max(1, math.ceil(math.log2(n)))


def misassigned_rows(rows: Tensor, leaf: Tensor, terms: LossTerms) -> int | None:
    """``None`` where every row of ``rows`` (laid out from ``leaf``'s call by :func:`layout`)
    lands at the entries of the example :class:`LossTerms` gives it; otherwise an example whose
    entries receive another's rows."""
    n = terms.num_examples
    index = torch.arange(n, device=rows.device)

    def pulled(sign: Tensor) -> Tensor:  # the adjoint of the nodes between leaf and rows only
        cot = terms.from_terms(sign[:, None, None].expand(n, terms.terms_per_example, terms.num_classes))
        return torch.autograd.grad(rows, leaf, cot, retain_graph=True)[0].reshape(n, -1)

    ones = pulled(torch.ones(n, dtype=rows.dtype, device=rows.device))
    for b in range(_bits(n)):
        sign = ((index >> b & 1) * 2 - 1).to(rows.dtype)  # ±1: exact in any dtype
        # an entry reached by its own example's rows alone: exactly ± the vjp of ones
        wrong = (pulled(sign) != sign[:, None] * ones).any(1)
        if wrong.any():
            return int(wrong.nonzero()[0])
    return None


def misplaced_rows(vjp: BatchedVJP, terms: LossTerms, names: list[str], dtype: torch.dtype,
                   device: torch.device, own: bool = False) -> tuple[str | None, int, list[int]] | None:
    """``None`` where the rows :class:`LossTerms` gives each example reach that example's layer
    calls alone (``vjp``'s leaves, leading dimension ``N``, their layers ``names``) — and, with
    ``own``, every example's rows reach some of its own calls (an example whose terms the loss all
    drops aside); otherwise ``(layer, example
    reached, the examples whose rows reached it)``, or ``(None, example, [example])`` for an
    example whose rows reach none of its calls.

    Rows reaching only their own examples' calls, each example's its own, are that example's
    rows whatever made them: where :func:`layout` cannot follow the rows (a decoder tied to the
    embedding is no recorded layer), ``own`` makes this probe tell whose they are."""
    n = terms.num_examples
    bits = _bits(n)
    index = torch.arange(n, device=device)
    chosen = torch.stack([(index >> b & 1) == v for b in range(bits) for v in (1, 0)])  # [2·bits, N]
    gen = torch.Generator(device=device).manual_seed(0)  # the global RNG untouched
    cot = torch.randn(chosen.shape[0], n, terms.terms_per_example, terms.num_classes, generator=gen,
                      dtype=dtype, device=device)
    cot = terms.from_terms(cot * chosen[:, :, None, None].to(dtype))
    reached = torch.zeros(n, dtype=torch.bool, device=device)
    for sl, grads in vjp.map(cot.shape[0], lambda sl: cot[sl]):
        for name, grad in zip(names, grads):
            hit = grad.reshape(*grad.shape[:2], -1).ne(0).any(-1)  # [probes, N]
            stray = hit & ~chosen[sl]
            if stray.any():
                probe, example = (int(i) for i in stray.nonzero()[0])
                return name, example, chosen[sl][probe].nonzero().flatten().tolist()
            reached |= hit.any(0)
    # (an example whose every term the loss drops — all its targets padding — has no rows to place)
    needed = torch.ones(n, dtype=torch.bool, device=device) if terms.kept is None else terms.kept.any(1).to(device)
    if own and not (reached | ~needed).all():
        example = int((needed & ~reached).nonzero()[0])
        return None, example, [example]
    return None
