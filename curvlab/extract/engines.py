"""Which engine extracts a model: the one place that decides whether BackPACK can run it.

BackPACK backpropagates second-order quantities only through a graph of modules it knows.  Its
own graph converter (``torch.fx``, :func:`backpack.custom_module.graph_utils.convert_module_to_backpack`,
what ``extend(model, use_converter=True)`` calls) turns residual ``+``, ``torch.flatten``, scalar
``*`` and the like into modules.  BackPACK can run the *whole* model when

* the converted graph (or, when the user's own forward pass is recorded, the model's own traced
  graph, unconverted) has only module calls, each module called once (no tied weights) and on
  tensors alone (the converter makes ``h + 1.0``, ``sum([a, b])``, ``add(b, alpha=…)`` and
  ``flatten(z, start_dim=1)`` modules called with a constant or a keyword, which fail);
* every module in it is one BackPACK can backpropagate through (AdaptiveAvgPool included);
* no BatchNorm normalises with batch statistics (train mode couples the examples; BackPACK's
  per-example roots cannot hold the coupling);
* every parameter block is a BatchNorm's affine parameter (eval mode), whose per-sample roots
  BackPACK's derivatives give; and no block is an ``nn.Embedding``.

Otherwise the autograd engine runs (module hooks and batched vjps; any differentiable forward).
:func:`choose_engine` returns the decision and the reason.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from curvlab.extract.autograd import couples_examples
from curvlab.extract.extension import KRONECKER_DERIVATIVES, supported_backprop_types
from curvlab.extract.validate import SUPPORTED_LOSSES
from curvlab.model_blocks import ModelBlocks, UnsupportedModelError


@dataclass(frozen=True)
class EngineChoice:
    """The engine that runs, the module to call for an own forward pass, and why.

    Attributes:
        engine: ``"backpack"`` or ``"autograd"``.
        module: what :func:`curvlab.extract` calls — BackPACK's converted graph (sharing the
            model's modules and parameters) or the model itself.
        reason: why BackPACK cannot run the model (empty when it can).
    """

    engine: str
    module: nn.Module
    reason: str = ""


def uncompiled(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) compiled, else ``model``: the
    wrapper forwards attribute writes to it, and its compiled backward cannot run under vmap."""
    compiled = getattr(model, "_orig_mod", None)
    return compiled if isinstance(compiled, nn.Module) else model


AUTOCAST_DROPPED = "its forward enters torch.autocast, which BackPACK's traced graph would leave out"


def _autocast_state() -> tuple[bool, ...]:
    return tuple(torch.is_autocast_enabled(device) for device in ("cpu", "cuda"))


class AutocastDropped(ValueError):
    """The converted graph would have left out the forward's ``torch.autocast``."""


@contextlib.contextmanager
def _autocast_noted() -> Iterator[list[bool]]:
    """While BackPACK's ``torch.fx`` tracer runs in the block, note (a non-empty list) a forward
    that enters ``torch.autocast``: the traced graph drops the context, so BackPACK would compute
    another network's statistics."""
    from backpack.custom_module.graph_utils import BackpackTracer

    start, entered, create_node = _autocast_state(), [], BackpackTracer.create_node

    def noting(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 (torch.fx's)
        if _autocast_state() != start:
            entered.append(True)
        return create_node(self, *args, **kwargs)

    BackpackTracer.create_node = noting
    try:
        yield entered
    finally:
        BackpackTracer.create_node = create_node


def convert(model: nn.Module) -> nn.Module:
    """BackPACK's ``torch.fx`` conversion of ``model``, leaving ``model`` as it was.

    The converter registers new modules on the module it is given and switches in-place
    activations off; it is given a shallow copy of the root, and the flags are restored.  A
    ``torch.compile``'d model is converted as the module it compiled (the wrapper forwards
    attribute writes to it: its copy's new ``_modules`` replaced the user's model's).
    """
    from backpack.custom_module.graph_utils import convert_module_to_backpack

    model = uncompiled(model)
    root = copy.copy(model)
    root._modules = dict(model._modules)  # new submodules land on the copy only
    root._parameters, root._buffers = dict(model._parameters), dict(model._buffers)
    inplace = [m for m in model.modules() if getattr(m, "inplace", False)]
    try:
        with warnings.catch_warnings(), _autocast_noted() as entered:  # (by the converter's own trace)
            warnings.simplefilter("ignore")  # the converter warns about non-module nodes; checked below
            converted = convert_module_to_backpack(root, False)
    finally:
        for m in inplace:
            m.inplace = True
    if entered:
        raise AutocastDropped(AUTOCAST_DROPPED)
    return converted


def _is_known_chain(module: nn.Module) -> bool:
    """Every container is an ``nn.Sequential`` or one of BackPACK's own (``Parallel``), so the
    forward is the module tree itself, and no module appears twice in it."""
    containers_known = all(  # (a subclass of nn.Sequential with a forward of its own is traced as any module)
        type(m).forward is nn.Sequential.forward or type(m).__module__.startswith("backpack.custom_module")
        for m in module.modules() if list(m.children())
    )
    paths = [m for _, m in module.named_modules(remove_duplicate=False)]
    return containers_known and len(paths) == len({id(m) for m in paths})


def _converter_failure(err: Exception) -> str:
    """Why BackPACK's converter failed, in the model's terms where that is known: its pass that
    removes duplicate modules takes a torch function called twice (``torch.relu`` in two places)
    for a module path (the function read from that pass's frame)."""
    tb, target = err.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_transform_remove_duplicates":
            target = tb.tb_frame.f_locals.get("target")
        tb = tb.tb_next
    if callable(target):
        name = f"{getattr(target, '__module__', None) or 'torch'}.{getattr(target, '__name__', target)}"
        return (f"its forward calls {name} more than once, which BackPACK's graph converter cannot convert "
                "(a module instance per use, e.g. nn.ReLU(), it can)")
    return f"BackPACK's graph converter failed ({type(err).__name__}: {err})"


def _graph_obstacle(module: nn.Module) -> str | None:
    """Why BackPACK cannot run ``module``'s traced graph (``None``: it can)."""
    supported = tuple(supported_backprop_types())
    if _is_known_chain(module):  # no tracing needed (BackPACK's Parallel is not traceable)
        for name, sub in module.named_modules():
            if not list(sub.children()) and not isinstance(sub, supported):
                return f"module {name!r} ({type(sub).__name__}) has no BackPACK second-order derivatives"
        return None
    from backpack.custom_module.graph_utils import BackpackTracer

    try:
        with _autocast_noted() as entered:
            graph = BackpackTracer().trace(module)
    except Exception as err:  # noqa: BLE001 — any tracing failure means "not BackPACK"
        return f"its forward cannot be traced by torch.fx ({type(err).__name__}: {err})"
    if entered:
        return AUTOCAST_DROPPED
    called: set[str] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_module":
            # a function by its name: its repr carries a memory address into reports
            target = getattr(node.target, "__name__", node.target)
            return f"its forward applies {node.op} {target!r} outside a module"
        if node.target in called:
            return f"module {node.target!r} is called more than once (tied weights)"
        # BackPACK's converted modules take tensors: `h + 1.0`, `sum([a, b])` (0 + a), `add(b, alpha=)`
        # and `flatten(z, start_dim=1)` become modules its forward cannot call
        if node.kwargs or not all(isinstance(a, torch.fx.Node) for a in node.args):
            return f"module {node.target!r} is called with arguments other than tensors ({_call_repr(node)})"
        called.add(node.target)
    for name in called:
        sub = module.get_submodule(name)
        if not isinstance(sub, supported):
            return f"module {name!r} ({type(sub).__name__}) has no BackPACK second-order derivatives"
    return None


def _call_repr(node: "torch.fx.Node") -> str:
    """``node``'s call as the forward wrote it, its tensor arguments by name."""
    args = [a.name if isinstance(a, torch.fx.Node) else repr(a) for a in node.args]
    args += [f"{k}={v.name if isinstance(v, torch.fx.Node) else repr(v)}" for k, v in node.kwargs.items()]
    return f"{node.target}({', '.join(args)})"


def backpack_obstacle(model: nn.Module, blocks: ModelBlocks, loss_fn: nn.Module | None = None) -> str | None:
    """Why BackPACK cannot run ``model`` with ``loss_fn`` whatever its graph (``None``: the graph
    decides)."""
    if loss_fn is not None and type(loss_fn) not in SUPPORTED_LOSSES:
        return f"its loss is {type(loss_fn).__name__}, a subclass BackPACK's extensions do not know"
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.ignore_index != -100:
        return (f"its CrossEntropyLoss has ignore_index={loss_fn.ignore_index}, BackPACK implements the "
                "default -100 only")
    if couples_examples(model):
        return "a BatchNorm normalises with batch statistics (train mode), which couples the examples"
    param = next(model.parameters(), None)
    if param is not None and torch.is_autocast_enabled(param.device.type):
        return ("torch.autocast is on, under which BackPACK's extensions would compute the statistics in "
                f"{str(torch.get_autocast_dtype(param.device.type)).removeprefix('torch.')}")
    hooked = [name or "the model" for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if hooked or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        where = f"module {hooked[0]!r} has" if hooked else "torch has global module"
        return (f"{where} forward hooks or forward pre-hooks of its own (one may change an input or an output, "
                "which BackPACK's derivatives would not see)")
    hooked = [name or "the model" for name, m in model.named_modules()
              if m._backward_hooks and m._is_full_backward_hook is False]
    if hooked:
        return (f"module {hooked[0]!r} has a backward hook registered by register_backward_hook, beside which torch "
                "allows none of the full backward hooks BackPACK runs on")
    for module, name in blocks.layers.items():
        if type(module) not in KRONECKER_DERIVATIVES:
            return f"module {name!r} ({type(module).__name__}) is not a BackPACK Kronecker layer"
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and (
            module.padding_mode != "zeros" or isinstance(module.padding, str)
        ):
            return f"module {name!r} uses padding={module.padding!r}, padding_mode={module.padding_mode!r}"
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    for block in blocks.parameters:
        owner = owners.get(id(block.weight))
        if not (isinstance(owner, _BatchNorm) and owner.affine and owner.track_running_stats):
            return f"parameter {block.name!r} ({block.module_type}) is not a BatchNorm affine parameter"
    return None


def choose_engine(model: nn.Module, blocks: ModelBlocks, engine: str, *, own_forward: bool,
                  loss_fn: nn.Module | None = None) -> EngineChoice:
    """The engine for ``model`` (and ``loss_fn``): ``engine`` (``"auto"``, ``"backpack"``,
    ``"autograd"``).

    Args:
        own_forward: the extraction runs its own forward pass (it may call BackPACK's converted
            graph); otherwise it records the user's forward of ``model`` itself, which BackPACK
            can follow only if the model's traced graph needs no conversion.

    Raises:
        UnsupportedModelError: ``engine="backpack"`` for a model BackPACK cannot run (the message
            says why and suggests ``engine="autograd"``).
    """
    if engine == "autograd":
        return EngineChoice("autograd", model)
    reason = backpack_obstacle(model, blocks, loss_fn)
    module = model
    if reason is None:
        if own_forward and not _is_known_chain(model):  # a plain chain runs as it is (tracing it costs ~50 ms)
            try:
                module = convert(model)
            except AutocastDropped as err:
                reason = str(err)
            except Exception as err:  # noqa: BLE001 — the converter raises many types
                reason = _converter_failure(err)
        if reason is None:
            reason = _graph_obstacle(module)
            if reason is not None and not own_forward and reason != AUTOCAST_DROPPED:
                reason += " (the recorded forward is the model's own, unconverted)"
    if reason is None:
        return EngineChoice("backpack", module)
    if engine == "backpack":
        raise UnsupportedModelError(
            f"curvlab.extract: engine='backpack' cannot run this model: {reason}; use engine='autograd' "
            "(or 'auto', which picks it; --engine on the command line)"
        )
    return EngineChoice("autograd", model, reason)
