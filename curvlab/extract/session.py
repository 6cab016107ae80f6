"""Attach an extraction engine to a model for one forward and backward pass, and detach it after.

:class:`ExtractionSession` decides which blocks the model has (:func:`curvlab.model_blocks.model_blocks`)
and which engine runs (:func:`curvlab.extract.engines.choose_engine`), then attaches that engine's
hooks for the duration of a ``with`` block only:

* **BackPACK**: its module hooks and curvlab's extension for the backward pass;
* **autograd**: forward hooks recording the layer inputs and a hook on the loss that runs the
  batched vjps while the graph is intact — the user's ``loss.backward()`` then runs unchanged.

Either way the user's own backward gives the gradient, and :meth:`ExtractionSession.results` the
per-block statistics (with that gradient) afterwards.
"""

from __future__ import annotations

import contextlib
import warnings
from types import TracebackType

import torch
from torch import nn

from curvlab.extract.engine_autograd import AutogradPass
from curvlab.extract.engine_backpack import BackpackPass
from curvlab.extract.engines import choose_engine
from curvlab.extract.options import ExtractOptions
from curvlab.extract.validate import LayerUseCheck, check_eigenbases, check_loss
from curvlab.model_blocks import ModelBlocks, check_materialised, model_blocks
from curvlab.stats import LayerStats


class ExtractionSession:
    """Context in which one forward pass and ``loss.backward()`` also compute curvlab's statistics.

    Example::

        with ExtractionSession(model, loss_fn, fisher="mc", stats=("kfac",)) as session:
            loss_fn(model(x), y).backward()
        stats = session.results()

    Args:
        model, loss_fn: the network and its loss module.
        options: an :class:`~curvlab.extract.ExtractOptions`; keyword arguments override its
            fields (e.g. ``fisher="mc"``, ``engine="autograd"``).
        own_forward: the caller runs the forward pass through :attr:`forward_model` (BackPACK's
            converted graph when BackPACK runs a model that needs conversion) instead of the
            model's own forward (the default: BackPACK then only runs models whose forward is a
            plain chain of modules).
        blocks: the blocks to extract (e.g. an optimizer's preconditioned layers only); default
            :func:`~curvlab.model_blocks.model_blocks` of the model with the options'
            ``separate_bias`` and ``skip_unsupported``.
        skip_uncalled: a Kronecker layer the forward pass does not call (a branch unused on this
            step), or whose output does not reach the loss (a head of another loss), gets no
            statistics, instead of an error (its block would be zero).

    Inside the block exactly one forward pass, one call of ``loss_fn`` and a backward pass
    through that loss must run (a second call raises: micro-batches take a session each, or one
    session on their concatenation; :meth:`results` refuses a block without the backward), with
    either engine.  With ``seed`` set, the MC sampling inside the block is seeded and the global random state is restored on
    exit.

    Attributes:
        options: the options.
        blocks: the model's :class:`~curvlab.model_blocks.ModelBlocks`.
        engine: ``"backpack"`` or ``"autograd"``.
        engine_reason: why BackPACK does not run the model (empty when it does).
        forward_model: the module to call with ``own_forward=True``.
    """

    def __init__(
        self, model: nn.Module, loss_fn: nn.Module, options: ExtractOptions | None = None, *,
        own_forward: bool = False, blocks: ModelBlocks | None = None, skip_uncalled: bool = False,
        **overrides: object,
    ) -> None:
        check_materialised(model, "curvlab.extract.ExtractionSession")
        check_loss(loss_fn)
        self.options = ExtractOptions.make(options, overrides)
        self.blocks = blocks if blocks is not None else model_blocks(
            model, separate_bias=self.options.separate_bias, skip_unsupported=self.options.skip_unsupported
        )
        check_eigenbases(self.options.eigenbases, self.blocks)
        choice = choose_engine(model, self.blocks, self.options.engine, own_forward=own_forward, loss_fn=loss_fn)
        self.engine, self.engine_reason, self.forward_model = choice.engine, choice.reason, choice.module
        self.model, self.loss_fn = model, loss_fn
        self._pass = self._new_pass()
        self._entered = False
        self._stack: contextlib.ExitStack | None = None
        self._loss = _LossCalls(loss_fn)
        self._uses = LayerUseCheck(self.blocks.layers, self.blocks.of_layer, loss_fn)
        self.skip_uncalled = skip_uncalled

    def _new_pass(self) -> BackpackPass | AutogradPass:
        """The engine's recorder of one ``with`` block."""
        if self.engine == "backpack":
            return BackpackPass(self.forward_model, self.loss_fn, self.options, self.blocks)
        return AutogradPass(self.model, self.loss_fn, self.options, self.blocks)

    @property
    def backward_seen(self) -> bool:
        """Whether a backward pass went through that call's loss in the ``with`` block."""
        return self._loss.backward

    @property
    def loss(self) -> torch.Tensor | None:
        """The (detached) value of that call, once it returned."""
        return self._loss.loss

    @property
    def loss_inputs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Its ``(input, target)``."""
        return self._loss.inputs

    @property
    def device(self) -> torch.device:
        """The device of the model's (first block's) parameters."""
        return self.blocks.blocks[0].parameters()[0].device

    def __enter__(self) -> "ExtractionSession":
        if self._stack is not None:
            raise RuntimeError("curvlab.extract: this ExtractionSession's block is already running; "
                               "a session runs one `with` block at a time")
        if self._entered:  # a session used again: the next block's statistics, recorded afresh
            self._pass = self._new_pass()
        self._entered = True
        self._stack = contextlib.ExitStack()
        if self.options.seed is not None:
            device = self.device
            self._stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            torch.manual_seed(self.options.seed)
        self._stack.enter_context(self._pass)
        self._stack.enter_context(self._loss)  # before the use check: a call it refuses is counted
        self._stack.enter_context(self._uses)
        # BackPACK's full backward hook on a first layer whose input needs no gradient; and its
        # warning on a backward from c·loss (a GradScaler), which no root depends on (the
        # empirical one is taken from the loss itself)
        self._stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="The output of .* seems to have been modified")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.__exit__(exc_type, exc, tb)
        if exc is not None and not self._loss.calls and "backpropagation quantity" in str(exc):
            # BackPACK's assertion in the backward of a loss its hooks did not see
            raise LossNotSeenError(f"curvlab.extract: loss_fn was not called inside the block; {_ONE_PASS}") from exc

    def results(self) -> dict[str, LayerStats]:
        """Per-block statistics of the pass run inside the block, with gradients (each parameter's
        ``.grad`` as it is after the block: it accumulates, so without a ``zero_grad`` before the
        block it holds earlier passes' gradients too, as an optimizer step would read it).

        Raises:
            RuntimeError: if no block received statistics (no forward and backward ran in the
                block, or the loss was not ``loss_fn``).
        """
        if not self._loss.calls or not self.backward_seen:
            what = "loss_fn was not called" if not self._loss.calls else "no backward pass went through the loss"
            raise RuntimeError(f"curvlab.extract: {what} inside the ExtractionSession block; {_ONE_PASS}")
        # Kronecker blocks that are zero: their layers not called, or their outputs not reaching the
        # loss (a head of another loss) — refused, or (skip_uncalled) left without statistics,
        # since a zero block would inflate an optimizer's step by 1/damping
        not_called = [m for m in self.blocks.of_layer if not self._uses.calls.get(m)]
        uncalled = {b.name for m in not_called for b in self.blocks.of_layer[m]}
        unreached = {b.name for m in self._uses.unreached for b in self.blocks.of_layer[m]}
        if not_called and not self.skip_uncalled:
            m = not_called[0]
            raise ValueError(
                f"curvlab.extract: layer {self.blocks.layers[m]!r} ({type(m).__name__}) was not called in the "
                "forward pass, so its block is zero; freeze its parameters (requires_grad=False) if it is "
                "never used (curvlab's optimizers on one process skip a layer a step does not call; "
                "data-parallel ranks must call every layer on a statistics step)"
            )
        if unreached and not self.skip_uncalled:
            raise ValueError(
                f"curvlab.extract: the outputs of {sorted(unreached)} do not reach the loss (a head of another "
                "loss?), so their blocks are zero; freeze their parameters (requires_grad=False) (curvlab's "
                "optimizers on one process give such a layer SGD's step; data-parallel ranks cannot)"
            )
        out = {name: stats for name, stats in self._pass.results().items() if name not in unreached}
        expected = [b for b in self.blocks.blocks if b.kind == "kronecker" or "sqrt" in self.options.stats]
        expected = [b for b in expected if b.name not in uncalled | unreached]
        missing = sorted({b.name for b in expected if b.name not in out})
        if missing:
            raise RuntimeError(
                f"curvlab.extract: no statistics for blocks {missing}; {_ONE_PASS}"
            )
        for block in self.blocks.blocks:
            if block.name not in out:  # a parameter block without "sqrt": nothing to report
                continue
            grad = block.grad_matrix(copy=True)  # .grad may change after the block
            out[block.name].grad = None if grad is None else grad.detach()
        return out


class LossNotSeenError(RuntimeError):
    """The backward pass in an :class:`ExtractionSession` block started from a loss the session's
    ``loss_fn`` did not compute."""


_ONE_PASS = ("run loss_fn(model(x), y).backward() inside the ExtractionSession block, with loss_fn the "
             "session's loss module (another loss module or a function such as F.cross_entropy is not seen)")


class _LossCalls:
    """Counts the calls of the loss module in a ``with`` block — a second one raises —, keeps
    the call's value and inputs, and whether a backward pass went through that loss."""

    def __init__(self, loss_fn: nn.Module) -> None:
        self.loss_fn = loss_fn
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._reset()

    def _reset(self) -> None:
        self.calls, self.backward = 0, False
        self.loss: torch.Tensor | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> "_LossCalls":
        self._reset()
        self._handles = [
            self.loss_fn.register_forward_pre_hook(self._before),
            # after the engine's own hook, also when that raises (a non-finite loss)
            self.loss_fn.register_forward_hook(self._after, with_kwargs=True, always_call=True),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, _module: nn.Module, _args: tuple) -> None:
        if self.calls:
            raise RuntimeError(
                "curvlab: loss_fn was called twice inside one `with opt.track(loss_fn)` (or "
                "ExtractionSession) block, whose statistics are of one forward pass and one loss. For "
                "micro-batches use one block each (the optimizer combines them at step()); for a sum of "
                "losses (deep supervision, an auxiliary or distillation term) compute the other terms with "
                "another loss instance, e.g. `aux = nn.CrossEntropyLoss()`: the statistics are then the "
                "tracked loss's, and parameters only the other terms reach get the first-order update"
            )
        self.calls += 1

    def _after(self, _module: nn.Module, args: tuple, kwargs: dict, loss: object) -> None:
        if not isinstance(loss, torch.Tensor) or self.loss is not None:
            return
        self.loss = loss.detach()
        inputs = [*args, *(kwargs[k] for k in ("input", "target") if k in kwargs)]
        if len(inputs) == 2:
            self.inputs = (inputs[0], inputs[1])
        if loss.requires_grad:
            loss.register_hook(self._reached)

    def _reached(self, _grad: torch.Tensor) -> None:
        self.backward = True
