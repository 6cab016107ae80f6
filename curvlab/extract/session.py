"""Attach curvlab's BackPACK extension to a model for one backward pass, and detach it after.

BackPACK's ``extend`` leaves hooks on a model for good; extended models pay for them in every
later forward pass.  :class:`ExtractionSession` instead registers the same hooks only for the
duration of a ``with`` block and removes them, and BackPACK's stored inputs, afterwards — also
when the block raises.
"""

from __future__ import annotations

import contextlib
from types import TracebackType

import torch
from backpack import backpack, hook_run_extensions, hook_store_io, memory_cleanup
from torch import nn

from curvlab.block import Block
from curvlab.extract.extension import SAVEFIELD, CurvatureStatistics
from curvlab.extract.options import ExtractOptions
from curvlab.extract.validate import check_loss, check_model, leaf_modules
from curvlab.stats import LayerStats


class ExtractionSession:
    """Context in which one ``loss.backward()`` also computes curvlab's statistics.

    Example::

        with ExtractionSession(model, loss_fn, fisher="mc", stats=("kfac",)) as session:
            loss_fn(model(x), y).backward()
        stats = session.results()

    Args:
        model, loss_fn: the network and its loss module.
        options: an :class:`~curvlab.extract.ExtractOptions`; keyword arguments override its
            fields (e.g. ``fisher="mc"``).

    In-place activations are switched off inside the block (BackPACK cannot handle them) and
    restored afterwards.  With ``seed`` set, the MC sampling inside the block is seeded and the
    global random state is restored on exit.
    """

    def __init__(
        self, model: nn.Module, loss_fn: nn.Module, options: ExtractOptions | None = None, **overrides: object
    ) -> None:
        check_loss(loss_fn)
        self.options = ExtractOptions.make(options, overrides)
        self.layers = check_model(model, self.options.skip_unsupported)
        self.blocks = {
            module: Block.of_layer(name, module, separate_bias=self.options.separate_bias)
            for name, module in self.layers
        }
        self.model, self.loss_fn = model, loss_fn
        self.extension = CurvatureStatistics(self.options, self.blocks)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inplace: list[nn.Module] = []
        self._stack: contextlib.ExitStack | None = None

    def _modules(self) -> list[nn.Module]:
        return [m for _, m in leaf_modules(self.model)] + [self.loss_fn]

    def __enter__(self) -> "ExtractionSession":
        for module in self._modules():
            if getattr(module, "_backpack_extend", False):
                continue  # the user extended it already: BackPACK's hooks are in place
            self._handles.append(module.register_forward_hook(hook_store_io))
            self._handles.append(module.register_full_backward_hook(hook_run_extensions))
            if getattr(module, "inplace", False):
                module.inplace = False
                self._inplace.append(module)
        self._stack = contextlib.ExitStack()
        if self.options.seed is not None:
            param = next(p for blocks in self.blocks.values() for p in blocks[0].parameters())
            devices = [param.device] if param.device.type == "cuda" else []
            self._stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.manual_seed(self.options.seed)
        self._stack.enter_context(backpack(self.extension))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            self._stack.__exit__(exc_type, exc, tb)
            self._stack = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._inplace:
            module.inplace = True
        self._inplace.clear()
        for module in self._modules():
            memory_cleanup(module)
        if exc_type is not None:
            self._collect()  # drop partial results from the parameters

    def _collect(self) -> dict[str, LayerStats]:
        out: dict[str, LayerStats] = {}
        for _, module in self.layers:
            blocks = getattr(module.weight, SAVEFIELD, None)
            if blocks is None:
                continue
            delattr(module.weight, SAVEFIELD)
            for block in blocks:
                out[block.name] = block
        return out

    def results(self) -> dict[str, LayerStats]:
        """Per-block statistics of the backward pass run inside the block, with gradients.

        Raises:
            RuntimeError: if no layer received statistics (no backward ran in the block).
        """
        out = self._collect()
        missing = []
        for name, module in self.layers:
            for block in self.blocks[module]:
                if block.name not in out:
                    missing.append(name)
                    continue
                grad = block.grad_matrix()  # a copy: .grad may change after the block
                out[block.name].grad = None if grad is None else grad.detach().clone()
        if missing:
            raise RuntimeError(
                f"curvlab.extract: no statistics for layers {sorted(set(missing))}: run "
                "loss_fn(model(x), y).backward() inside the ExtractionSession block, with loss_fn "
                "the session's loss"
            )
        return out
