"""Attach curvlab's BackPACK extension to a model for one backward pass, and detach it after.

BackPACK's ``extend`` leaves hooks on a model for good; extended models pay for them in every
later forward pass.  :class:`ExtractionSession` instead registers the same hooks only for the
duration of a ``with`` block and removes them, and BackPACK's stored inputs, afterwards — also
when the block raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType

import torch
from backpack import backpack, hook_run_extensions, hook_store_io, memory_cleanup
from torch import Tensor, nn

from curvlab.extract.extension import SAVEFIELD, STATISTICS, CurvatureStatistics, Request
from curvlab.extract.stats import FLAVOURS, LayerStats
from curvlab.extract.validate import check_loss, check_model, leaf_modules

DEFAULT_STATS = ("sqrt", "kfac", "tkfac")


def make_request(
    fisher: str,
    mc_samples: int,
    stats: Iterable[str],
    kfac_flavours: Iterable[str] | None,
    tkfac_conv: str,
    separate_bias: bool,
    eigenbases: Mapping[str, tuple[Tensor, Tensor]] | None,
) -> Request:
    """Validate the caller's options and bundle them."""
    if fisher not in FLAVOURS:
        raise ValueError(f"curvlab.extract: fisher={fisher!r}; choose one of {FLAVOURS}")
    stats = frozenset(stats)
    unknown = stats - set(STATISTICS)
    if unknown:
        raise ValueError(
            f"curvlab.extract: unknown statistics {sorted(unknown)}; choose from {STATISTICS}"
        )
    if "kfe" in stats and not eigenbases:
        raise ValueError("curvlab.extract: stats 'kfe' needs eigenbases={block: (U_out, U_in)}")
    flavours = tuple(kfac_flavours) if kfac_flavours is not None else (fisher,)
    for f in flavours:
        if f not in FLAVOURS:
            raise ValueError(f"curvlab.extract: kfac_flavours has {f!r}; choose from {FLAVOURS}")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"curvlab.extract: mc_samples={mc_samples!r} must be a positive int")
    if tkfac_conv not in ("exact", "kfc"):
        raise ValueError(f"curvlab.extract: tkfac_conv={tkfac_conv!r}; choose 'exact' or 'kfc'")
    return Request(
        fisher=fisher,
        stats=stats,
        kfac_flavours=flavours,
        mc_samples=mc_samples,
        tkfac_conv=tkfac_conv,
        separate_bias=separate_bias,
        eigenbases=dict(eigenbases or {}),
    )


class ExtractionSession:
    """Context in which one ``loss.backward()`` also computes curvlab's statistics.

    Example::

        with ExtractionSession(model, loss_fn, fisher="mc", stats=("kfac",)) as session:
            loss_fn(model(x), y).backward()
        stats = session.results()

    In-place activations are switched off inside the block (BackPACK cannot handle them) and
    restored afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        fisher: str = "exact",
        mc_samples: int = 1,
        stats: Iterable[str] = DEFAULT_STATS,
        kfac_flavours: Iterable[str] | None = None,
        tkfac_conv: str = "exact",
        separate_bias: bool = False,
        eigenbases: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        skip_unsupported: bool = False,
    ) -> None:
        check_loss(loss_fn)
        self.request = make_request(
            fisher, mc_samples, stats, kfac_flavours, tkfac_conv, separate_bias, eigenbases
        )
        self.layers = check_model(model, skip_unsupported)
        self.model, self.loss_fn = model, loss_fn
        self.extension = CurvatureStatistics(self.request, {m: n for n, m in self.layers})
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._inplace: list[nn.Module] = []
        self._context: backpack | None = None

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
        self._context = backpack(self.extension)
        self._context.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._context is not None:
            self._context.__exit__(exc_type, exc, tb)
            self._context = None
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
            blocks = [b for key, b in out.items() if key == name or key.startswith(name + ".")]
            if not blocks:
                missing.append(name)
            for block in blocks:
                block.grad = gradient_matrix(module, block)
        if missing:
            raise RuntimeError(
                f"curvlab.extract: no statistics for layers {missing}: run loss_fn(model(x), y)"
                ".backward() inside the ExtractionSession block, with loss_fn the session's loss"
            )
        return out


def gradient_matrix(module: nn.Module, stats: LayerStats) -> Tensor | None:
    """The block's mini-batch gradient ``[d_out, D]`` read from ``.grad`` (None if absent)."""
    parts = []
    if stats.layout.weight_shape is not None:
        if module.weight.grad is None:
            return None
        parts.append(module.weight.grad.flatten(1))
    if stats.layout.bias_column or stats.layout.weight_shape is None:
        if module.bias is None or module.bias.grad is None:
            return None
        parts.append(module.bias.grad.unsqueeze(1))
    return torch.cat(parts, 1).detach().clone()
