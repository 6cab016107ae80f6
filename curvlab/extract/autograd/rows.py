"""A loss on ``[N·k, C]`` rows of ``N`` examples: which rows are whose, checked before use.

A language model's per-token loss is usually written on its logits flattened,
``loss_fn(logits.reshape(-1, C), targets.reshape(-1))`` (HuggingFace's models, curvlinops'
convention): ``k`` loss terms per example, rows ``n·k … n·k + k − 1`` example ``n``'s where a
batch-first ``[N, T, C]`` output is flattened.  The engine takes them as such only where that
holds for every batch, not by luck of the shapes:

1. :func:`layout` — the rows are a recorded layer's output laid out anew by views,
   slices, copies and casts alone (``logits[:, :-1].contiguous().view(-1, C)``,
   ``.float()``).  Those do not depend on the data, so the check below holds for every batch
   laid out the same way; a mask or an index (``logits.reshape(-1, C)[keep]``: how many rows each
   example keeps varies) or any other operation is refused.
2. :func:`misplaced_rows` — the vjp of the rows taken for some examples reaches the layers of
   those examples only.  One pair of cotangents per bit of the example index (the rows whose
   example has the bit set, those whose example has it clear): a row that is another example's,
   or depends on several (a sequence-first ``[T, N, C]`` flattened, examples reordered, a forward
   that couples the examples), meets an example it was not taken for in one of them.
   ``2·⌈log₂ N⌉`` vjps, once per layout of the rows (the path of 1.) and modules' modes: not
   again for every sequence length of dynamically padded batches.
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


def layout(rows: Tensor, leaves: list[Tensor]) -> tuple[tuple[str, ...], str | None]:
    """The autograd nodes from ``rows`` back to the output of a recorded call (its sum with one
    of the ``ε`` ``leaves``), and ``None`` where they are :data:`LAYOUT_NODES` alone; otherwise
    the node in the way."""
    ours = {id(e) for e in leaves}
    node, path = rows.grad_fn, []
    while node is not None:
        inputs = [f for f, _ in node.next_functions if f is not None]
        if any(id(getattr(f, "variable", None)) in ours for f in inputs):
            return tuple(path), None
        path.append(type(node).__name__)
        if path[-1].rstrip("0123456789") not in LAYOUT_NODES or len(inputs) != 1:
            return tuple(path), path[-1]
        node = inputs[0]
    return tuple(path), "no layer's output"


def misplaced_rows(vjp: BatchedVJP, terms: LossTerms, names: list[str], dtype: torch.dtype,
                   device: torch.device) -> tuple[str, int, list[int]] | None:
    """``None`` where the rows :class:`LossTerms` gives each example reach that example's layer
    calls alone (``vjp``'s leaves, leading dimension ``N``, their layers ``names``); otherwise
    ``(layer, example reached, the examples whose rows reached it)``."""
    n = terms.num_examples
    bits = max(1, math.ceil(math.log2(n)))
    index = torch.arange(n, device=device)
    chosen = torch.stack([(index >> b & 1) == v for b in range(bits) for v in (1, 0)])  # [2·bits, N]
    gen = torch.Generator(device=device).manual_seed(0)  # the global RNG untouched
    cot = torch.randn(chosen.shape[0], n, terms.terms_per_example, terms.num_classes, generator=gen,
                      dtype=dtype, device=device)
    cot = terms.from_terms(cot * chosen[:, :, None, None].to(dtype))
    for sl, grads in vjp.map(cot.shape[0], lambda sl: cot[sl]):
        for name, grad in zip(names, grads):
            stray = grad.reshape(*grad.shape[:2], -1).ne(0).any(-1) & ~chosen[sl]  # [probes, N]
            if stray.any():
                probe, example = (int(i) for i in stray.nonzero()[0])
                return name, example, chosen[sl][probe].nonzero().flatten().tolist()
    return None
