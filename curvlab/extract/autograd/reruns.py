"""Per-example square roots of parameter blocks by running the model on one example at a time.

A parameter held by the model's own module classes — a ViT's cls token and position embedding —
has no module whose input and output gradient give its per-example gradients
(:mod:`.local_params`).  The generic route backpropagates once per root column *and example*
through the batch's graph (:func:`.routes.separated_roots`): ``N`` times the work of one batched
vjp per column.  Where the examples are not coupled and the loss is taken of the model's own
output, example ``n``'s gradient for root column ``j`` is the vjp of the model run on example
``n`` alone: ``N`` forwards of one example and ``N`` vjps of the ``k`` columns, about one batched
pass per column.  Each rerun's output must equal the batch's row — what active dropout or a
forward that depends on the batch would break —, else :func:`rerun_roots` gives ``None`` and the
generic route runs.  Reruns use copies of the buffers, inside a forked RNG state, eagerly under
``torch.compile``, as :mod:`.batch_check`'s forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlab.extract.autograd.backprop import BatchedVJP, eager
from curvlab.extract.autograd.batch_check import per_example

#: A rerun's output may differ from the batch's row by this many units of roundoff of the output's
#: dtype, relative to the largest output (a batch of one sums in another order).
TOLERANCE_ULPS = 1000


def matches(out: object, row: Tensor, scale: float) -> bool:
    """Whether a rerun's output ``out`` is the batch output's ``row`` ``[1, …]`` up to roundoff
    (``scale``: the batch output's largest magnitude)."""
    if not isinstance(out, Tensor) or out.shape != row.shape or out.dtype != row.dtype:
        return False
    tol = TOLERANCE_ULPS * torch.finfo(row.dtype).eps
    return bool(torch.allclose(out.detach(), row, rtol=tol, atol=tol * scale))


@eager
def rerun_roots(model: nn.Module, args: tuple, kwargs: dict, output: Tensor, cotangents: Tensor,
                params: dict[str, Tensor], per_column_bytes: int, max_bytes: int,
                vectorize: bool) -> tuple[dict[str, Tensor], int] | None:
    """Each root column's and example's gradient of ``params``, ``{path: [k, N, *shape]}``, and
    the vjp count — or ``None`` where a rerun's output is not the batch's.

    Args:
        model, args, kwargs: the model and its call on the batch, whose output is ``output``
            (``[N, …]``, float32 or float64).
        cotangents: the root columns ``[k, *output.shape]``.
        params: parameter path → the tensor.
        per_column_bytes, max_bytes, vectorize: the chunking of each example's vjps (:class:`~.backprop.BatchedVJP`).
    """
    n, k = output.shape[0], cotangents.shape[0]
    names, tensors = list(params), list(params.values())
    batch = output.detach()
    scale = float(batch.abs().max())
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    first = tensors[0]
    devices = [first.device] if first.device.type == "cuda" else []
    roots = {name: p.new_zeros(k, n, *p.shape) for name, p in params.items()}
    num_vjps = 0
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        for i in range(n):
            try:
                out = functional_call(model, buffers, per_example(args, n, i), per_example(kwargs, n, i))
            except Exception:  # noqa: BLE001 — any failure of the user's forward on one example
                return None
            if not matches(out, batch[i : i + 1], scale):
                return None
            vjp = BatchedVJP(out, tensors, per_column_bytes, max_bytes, vectorize)
            for sl, grads in vjp.map(k, lambda sl: cotangents[sl, i : i + 1]):
                for name, grad in zip(names, grads):
                    roots[name][sl, i] = grad
            num_vjps += vjp.num_vjps
    return roots, num_vjps
