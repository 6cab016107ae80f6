"""Batched vector-Jacobian products through the recorded graph, in memory-bounded chunks.

The forward pass (see :mod:`.recording`) leaves one zero leaf ``ε`` added to the output of every
target call.  ``∂ out/∂ ε`` is the Jacobian at that layer output, so one vjp with cotangent
``v`` (shaped like the model output) gives every target layer's output gradient at once.
``torch.func.vmap`` over ``torch.autograd.grad`` batches many cotangents through the one graph.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from curvlab import device_routes


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd saves during a forward pass (distinct storages once)."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[int] = set()

        def pack(t: Tensor) -> Tensor:
            try:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self._seen:
                    self._seen.add(key)
                    self.total += storage.nbytes()
            except (RuntimeError, NotImplementedError):  # tensors without storage
                self.total += t.numel() * t.element_size()
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self) -> "SavedBytes":
        super().__enter__()
        return self


def allow_compiled_forwards() -> None:
    """What a ``torch.compile``'d model compiled from now on (at its first call) needs for the
    vjps of a recording: guards on module hooks, so that compiled code runs the recording's hooks
    (torch skips those guards by default: code compiled without hooks would keep running without
    them), and no donated buffers (its backward refuses to run twice, and the vjps run before the
    user's backward).  Process-wide torch settings, for every model compiled later (more guards;
    a compiled backward keeps buffers it could have freed), set once ``torch._dynamo`` is imported
    (by ``torch.compile``, or by a ``torch.optim`` step): it is not imported here."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.config.skip_nnmodule_hook_guards = False
        torch._functorch.config.donated_buffer = False


def eager_hook(fn: Callable) -> Callable:
    """A hook registered now, run eagerly under ``torch.compile`` where ``torch._dynamo`` is
    imported (no model can be compiled before that import): traced, a recording's hooks guarded
    its list of calls, so that each layer's call recompiled them — past dynamo's limit of 8 a
    warning naming this package, 6 s of a 12-layer model's first step — and the leaf ``ε`` they
    return broke the graph anyway (under ``fullgraph=True``, torch's own error)."""
    if "torch._dynamo" not in sys.modules:
        return fn
    return torch.compiler.disable(fn, reason=(
        "curvlab's statistics record every layer's input and output gradient through module hooks "
        "that run outside the graph, on the steps that collect statistics: compile without fullgraph=True"))


def eager(fn: Callable) -> Callable:
    """``fn`` run eagerly under ``torch.compile`` — ``torch.compiler.disable(fn)``, applied at the
    first call made once ``torch._dynamo`` is imported.  Nothing can be compiled before that
    import, and decorating at import time would import it (1.8 s of every ``import curvlab``)."""
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return run


#: On the CPU, chunks of at most this many columns (a network whose saved activations are large
#: per column) loop over their columns instead: vmap's batching rules, BatchNorm's backward with
#: its parameters' gradients among them, cost more than batching saves there (MobileNetV2 at
#: N = 16: 34 s batched 3 at a time, 17 s looped; benchmarks/results/report_resnet18_cpu.md).
LOOPED_CHUNK_ON_CPU = 4


class BatchedVJP:
    """``v ↦ (∂out/∂ε_1ᵀ v, …)`` for a batch of cotangents ``v``, chunked under a memory bound.

    Args:
        output: the model output (part of the graph).
        leaves: the ``ε`` leaves, one per target call.
        per_column_bytes: estimated temporaries of one cotangent column (see :func:`estimate`).
        max_bytes: bound on one chunk's temporaries; at least one column runs at a time.
        vectorize: ``torch.func.vmap`` over a chunk's columns, else a Python loop (also on the
            CPU for chunks of at most :data:`LOOPED_CHUNK_ON_CPU` columns).
    """

    def __init__(self, output: Tensor, leaves: list[Tensor], per_column_bytes: int, max_bytes: int,
                 vectorize: bool = True) -> None:
        self.output, self.leaves = output, leaves
        self.chunk = max(1, int(max_bytes // max(per_column_bytes, 1)))
        self.vectorize = vectorize and not (device_routes.cpu_tuned(output) and self.chunk <= LOOPED_CHUNK_ON_CPU)
        self.num_vjps = 0
        self._live = output.requires_grad and bool(leaves)

    def _vjp(self, v: Tensor) -> tuple[Tensor, ...]:
        return torch.autograd.grad(
            self.output, self.leaves, v, retain_graph=True, allow_unused=True, materialize_grads=True
        )

    def __call__(self, cotangents: Tensor) -> tuple[Tensor, ...]:
        """One chunk: ``cotangents [k, *out.shape]`` → per leaf ``[k, *leaf.shape]``."""
        self.num_vjps += cotangents.shape[0]
        if not self._live:
            return tuple(cotangents.new_zeros(cotangents.shape[0], *e.shape) for e in self.leaves)
        if self.vectorize and cotangents.shape[0] > 1:
            try:
                with warnings.catch_warnings():  # torch's notice that an op's batching rule is a loop (right values)
                    warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
                    return torch.func.vmap(self._vjp)(cotangents)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:
                # a backward vmap cannot batch (a torch.compile'd forward's compiled backward; BatchNorm
                # under bfloat16 autocast): one VJP at a time gives the same numbers, one call per
                # column — or raises what is wrong with the graph itself
                warnings.warn(
                    f"curvlab (autograd engine): torch.func.vmap cannot batch this backward "
                    f"({str(err).splitlines()[0][:200]}); its vjps run one column at a time",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.vectorize = False
        try:
            if cotangents.shape[0] == 1:  # one column (a single MC sample): no stacking copy
                return tuple(grad.unsqueeze(0) for grad in self._vjp(cotangents[0]))
            columns = [self._vjp(v) for v in cotangents]
        except RuntimeError as err:
            if "donated buffer" not in str(err):
                raise
            raise RuntimeError(
                "curvlab (autograd engine): the torch.compile'd model's backward was compiled with donated "
                "buffers, which allow one backward pass only, and curvlab's statistics backpropagate before "
                "yours; set torch._functorch.config.donated_buffer = False before the compiled model's "
                "first call (curvlab sets it where that call runs inside `opt.track` or curvlab.extract)"
            ) from err
        return tuple(torch.stack(per_leaf) for per_leaf in zip(*columns))

    def chunks(self, total: int) -> Iterator[slice]:
        """Column slices of at most :attr:`chunk` columns covering ``range(total)``."""
        for start in range(0, total, self.chunk):
            yield slice(start, min(start + self.chunk, total))

    def map(self, total: int, cotangents: Callable[[slice], Tensor]) -> Iterator[tuple[slice, tuple[Tensor, ...]]]:
        """For every chunk ``sl`` of ``range(total)``: ``(sl, self(cotangents(sl)))``."""
        for sl in self.chunks(total):
            yield sl, self(cotangents(sl))


#: A request of at most this many bytes is taken to fit without reading the free memory (Linux's
#: ``/proc/meminfo``: ~0.1 ms, read by every statistics step's checks of a small model).
SURELY_FREE = 64 * 2**20


def short_of(need: int, device: torch.device) -> int | None:
    """The free memory of ``device`` where ``need`` bytes exceed it (:func:`available_bytes`);
    else ``None`` — also where it is unknown, and for requests of at most :data:`SURELY_FREE`."""
    if need <= SURELY_FREE:
        return None
    free = available_bytes(device)
    return free if free is not None and need > free else None


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (``None``: unknown): CUDA's free memory, or Linux's
    ``MemAvailable`` on the CPU — what a result can take before the machine swaps or kills."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate(saved_bytes: int, leaf_bytes: int, output_bytes: int, extra_bytes: int = 0) -> int:
    """Temporaries of one cotangent column: the gradients returned for every leaf, a gradient
    flowing through every saved activation (an upper-bound proxy for backward's buffers), the
    cotangent itself and ``extra_bytes`` for the caller's own per-column work."""
    return saved_bytes + 2 * leaf_bytes + output_bytes + extra_bytes
