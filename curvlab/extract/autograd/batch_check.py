"""Whether each target layer's input follows the batch, where its shape cannot tell.

A layer called on one input and broadcast over the examples, as nanoGPT's position embedding
``wpe(torch.arange(T))``, has no per-example inputs: its Kronecker statistics would take the
``T`` positions for examples.  Its leading dimension is refused where it differs from the batch
size (:func:`~.layer_io.check_input`); where it equals it (a batch of exactly ``T`` examples) the
examples look coupled to the probing vjp, as a batch mean would make them.  One more forward pass
on ``N + 1`` examples (example 0 again) tells them apart: a layer's input that follows the batch
then has ``N + 1`` rows, a broadcast one still ``N``.  It runs without gradients, on copies of
the buffers (a train-mode BatchNorm's running statistics stay as they are) and inside a forked
RNG state, eagerly under ``torch.compile`` (no recompilation for the new batch size).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvlab.extract.autograd.backprop import eager


def on_the_batch(value, n: int, fn):
    """``value`` (a tensor, or tuples, lists and dicts of them) with ``fn`` applied to every tensor
    whose leading dimension is ``n``."""
    if isinstance(value, Tensor):
        return fn(value) if value.dim() and value.shape[0] == n else value
    if isinstance(value, (tuple, list)):
        return type(value)(on_the_batch(v, n, fn) for v in value)
    if isinstance(value, dict):
        return {k: on_the_batch(v, n, fn) for k, v in value.items()}
    return value


def leading_dimension(args: tuple, kwargs: dict | None = None) -> int | None:
    """The leading dimension of a call's first tensor argument that has one (its batch size,
    where the batch leads)."""
    values = (*args, *(kwargs or {}).values())
    first = next((a for a in values if isinstance(a, Tensor) and a.dim() > 0), None)
    return None if first is None else first.shape[0]


def per_example(value, n: int, i: int):
    """``value`` with every tensor whose leading dimension is ``n`` cut to example ``i``."""
    return on_the_batch(value, n, lambda t: t[i : i + 1])


def _one_more_example(value, n: int):
    """``value`` with example 0 appended to every tensor whose leading dimension is ``n``."""
    return on_the_batch(value, n, lambda t: torch.cat([t, t[:1]]))


@eager
def layers_off_the_batch(model: nn.Module, args: tuple, kwargs: dict, targets: Mapping[nn.Module, str],
                         n: int) -> list[str] | None:
    """The targets whose input keeps ``n`` rows when ``model`` runs on ``n + 1`` examples (``args``,
    ``kwargs``: its call on the ``n`` examples); ``None`` where that forward raises (a model built
    for one batch size): then it cannot tell."""
    rows: dict[nn.Module, set[int]] = {}

    def record(module: nn.Module, a: tuple, kw: dict) -> None:
        inp = a[0] if a else kw["input"]
        rows.setdefault(module, set()).add(inp.shape[0] if inp.dim() else 0)

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in targets]
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    first = next(iter(model.parameters()), None)
    devices = [first.device] if first is not None and first.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            functional_call(model, buffers, _one_more_example(args, n), _one_more_example(kwargs, n))
    except Exception:  # noqa: BLE001 — any failure of the user's forward on another batch size
        return None
    finally:
        for handle in handles:
            handle.remove()
    return [targets[m] for m, seen in rows.items() if n in seen]
