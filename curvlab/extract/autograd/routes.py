"""The engine's vjp routes through the recorded graph (see the package docstring for the maths).

* :func:`batch_roots`: ``g`` of every call, one vjp per stacked root column with its cotangent at
  every loss term of every example (the batch convention).
* :func:`separated_roots`: one vjp per (root column, loss term) — all examples at once
  (``per_example=False``: the term-separated roots ``g_terms``) or one example at a time
  (``per_example=True``: the exact square root with the coupling between examples, and the
  per-column gradients of parameter blocks).  Results are handed chunk by chunk to consumers, so
  the ``[k, N, d_out, T]`` gradients exist one chunk at a time only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvlab.extract.autograd import layer_io
from curvlab.extract.autograd.backprop import BatchedVJP
from curvlab.extract.autograd.loss_roots import LossTerms

#: ``(columns slice, gradients of the chunk per vjp input)`` → None.
Consumer = Callable[[slice, tuple[Tensor, ...]], None]


def batch_roots(vjp: BatchedVJP, root: Tensor, calls: Sequence,
                further: Callable[[slice, int, Tensor], None] | None = None) -> list[Tensor]:
    """The batch-convention ``g`` of every call, ``[C_total, N, d_out, T]``; each chunk's
    gradients at the ``vjp``'s further leaves (after the calls' own) go to ``further(columns,
    leaf, gradient)`` as they come, not kept."""
    parts: list[list[Tensor]] = [[] for _ in calls]
    for sl, grads in vjp.map(root.shape[0], lambda sl: root[sl]):
        for i, grad in enumerate(grads):
            if i < len(calls):
                parts[i].append(layer_io.grads_to_layout(calls[i][0], grad))
            elif further is not None:
                further(sl, i - len(calls), grad)
    return [layer_io.joined(p, 0) for p in parts]


def selected_columns(segments: dict[str, slice], flavours: Sequence[str], device: torch.device) -> tuple[Tensor, dict[str, slice]]:
    """Root columns of ``flavours`` (in that order) and each flavour's slice of them."""
    index, out, start = [], {}, 0
    for f in flavours:
        seg = segments[f]
        index.append(torch.arange(seg.start, seg.stop, device=device))
        out[f] = slice(start, start + seg.stop - seg.start)
        start += seg.stop - seg.start
    return torch.cat(index), out


def separated_roots(
    vjp: BatchedVJP, root: Tensor, terms: LossTerms, columns: Tensor, per_example: bool, consume: Consumer
) -> None:
    """Backpropagate root column ``c = columns[j]`` at loss term ``s`` alone (column
    ``j' = j·T_out + s``), for all examples at once or (``per_example``) at example ``n`` alone
    (column ``j'·N + n``), and hand every chunk's gradients to ``consume``."""
    n, t = terms.num_examples, terms.terms_per_example
    root_terms = terms.to_terms(root)  # [C, N, T_out, C_out]
    count = columns.numel() * t
    total = count * n if per_example else count

    def cotangents(sl: slice) -> Tensor:
        ids = torch.arange(sl.start, sl.stop, device=root.device)
        cot = root_terms.new_zeros(ids.numel(), n, t, terms.num_classes)
        rows = torch.arange(ids.numel(), device=root.device)
        col, ex = (ids // n, ids % n) if per_example else (ids, None)
        c, s = columns[col // t], col % t
        if per_example:
            cot[rows, ex, s] = root_terms[c, ex, s]
        else:
            cot[rows, :, s] = root_terms[c, :, s]
        return terms.from_terms(cot)

    for sl, grads in vjp.map(total, cotangents):
        consume(sl, grads)
