"""The BackPACK engine for one backward pass: its hooks on, the extension active, off after.

BackPACK's ``extend`` leaves hooks on a model for good; extended models pay for them in every
later forward pass.  :class:`BackpackPass` instead registers the same hooks only for the duration
of a ``with`` block and removes them, and BackPACK's stored inputs, afterwards — also when the
block raises.  In-place activations are switched off inside the block (BackPACK cannot handle
them) and restored afterwards.
"""

from __future__ import annotations

import contextlib
from functools import partial
from types import TracebackType

import torch
from backpack import backpack, hook_run_extensions, hook_store_io, memory_cleanup
from torch import nn

from curvlab.extract.autograd.batch_check import leading_dimension
from curvlab.extract.extension import SAVEFIELD, CurvatureStatistics
from curvlab.extract.options import ExtractOptions
from curvlab.model_blocks import ModelBlocks
from curvlab.stats import LayerStats


def leaf_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that perform operations (no children)."""
    return [m for m in model.modules() if not list(m.children())]


class BackpackPass:
    """Context in which one ``loss.backward()`` through ``graph`` also computes the statistics.

    Args:
        graph: the module whose forward runs (the model, or BackPACK's converted graph of it).
        loss_fn: the loss module.
        options: what to compute.
        blocks: the model's blocks.
    """

    def __init__(self, graph: nn.Module, loss_fn: nn.Module, options: ExtractOptions, blocks: ModelBlocks) -> None:
        self.graph, self.loss_fn, self.blocks = graph, loss_fn, blocks
        self.extension = CurvatureStatistics(options, blocks.of_layer, {b.weight: b for b in blocks.parameters})
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inplace: list[nn.Module] = []
        self._hook_kinds: dict[nn.Module, bool | None] = {}
        self._stack: contextlib.ExitStack | None = None
        #: the first layer seen computing in another dtype than its weight's (torch.autocast)
        self._autocast: str | None = None

    def _modules(self) -> list[nn.Module]:
        return leaf_modules(self.graph) + [self.loss_fn]

    def __enter__(self) -> "BackpackPass":
        for module in self._modules():
            if getattr(module, "_backpack_extend", False):
                continue  # the user extended it already: BackPACK's hooks are in place
            # torch keeps a module's kind of backward hook (full or not) after the hooks are removed;
            # a stale kind left by another library's removed hooks would refuse BackPACK's, and
            # BackPACK's left behind would refuse the other library's: restored on exit
            self._hook_kinds[module] = module._is_full_backward_hook
            if not module._backward_hooks:
                module._is_full_backward_hook = None
            self._handles.append(module.register_forward_hook(hook_store_io))
            self._handles.append(module.register_full_backward_hook(hook_run_extensions))
            if getattr(module, "inplace", False):
                module.inplace = False
                self._inplace.append(module)
        self._handles.append(self.graph.register_forward_pre_hook(self._note_batch_size))
        names = {m: n for n, m in self.graph.named_modules()}
        for module in leaf_modules(self.graph):
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                self._handles.append(module.register_forward_hook(partial(self._note_autocast, names[module])))
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(backpack(self.extension))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._stack is not None:
            self._stack.__exit__(exc_type, exc, tb)
            self._stack = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, kind in self._hook_kinds.items():
            if not module._backward_hooks:
                module._is_full_backward_hook = kind
        self._hook_kinds.clear()
        for module in self._inplace:
            module.inplace = True
        self._inplace.clear()
        for module in self._modules():
            memory_cleanup(module)
        if exc_type is not None:
            self.results()  # drop partial results from the parameters
            if issubclass(exc_type, RuntimeError) and self._autocast is not None:
                raise ValueError(
                    f"curvlab.extract: the BackPACK engine failed after {self._autocast} (torch.autocast): BackPACK "
                    "cannot run a backward outside the autocast block; use engine='autograd' (or call backward() "
                    "inside the autocast block)"
                ) from exc

    def _note_batch_size(self, module: nn.Module, args: tuple) -> None:
        self.extension.batch_size = leading_dimension(args)

    def _note_autocast(self, name: str, module: nn.Module, inputs: object, output: object) -> None:
        if self._autocast is None and isinstance(output, torch.Tensor) and output.dtype != module.weight.dtype:
            self._autocast = (f"layer {name!r} ({type(module).__name__}) computed in "
                              f"{str(output.dtype).removeprefix('torch.')} from "
                              f"{str(module.weight.dtype).removeprefix('torch.')} weights")

    def results(self) -> dict[str, LayerStats]:
        """The statistics left on the parameters, by block name (removed from them)."""
        out: dict[str, LayerStats] = {}
        for param in self.graph.parameters():
            found = getattr(param, SAVEFIELD, None)
            if hasattr(param, SAVEFIELD):
                delattr(param, SAVEFIELD)
            for stats in found if isinstance(found, list) else [] if found is None else [found]:
                out[stats.name] = stats
        return out
