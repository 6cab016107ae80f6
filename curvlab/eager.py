"""torch.optim's optimizers without the wrappers that import ``torch._dynamo``, while no compiler
is loaded.

torch wraps ``Optimizer.add_param_group``, ``state_dict``, ``load_state_dict`` and ``zero_grad``
in ``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` — measured at 1.2–2.6 s
on this project's CPU, as long as ``import torch`` itself — only to mark them as not to be
traced; and its optimizers' ``step`` (SGD's, Adam's) in a wrapper that imports it at every call,
to switch gradients off and mark breaks for the compiler.  Nothing traces them in a process that
has not imported ``torch._dynamo``: there :func:`eager` calls the function the wrapper holds
(``__wrapped__``, set by ``functools.wraps``) and :func:`eager_optimizer`'s ``step`` torch's own
under the gradient mode its wrapper sets; once ``torch._dynamo`` is imported (``torch.compile``
in use), torch's wrappers.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.optim import Optimizer

F = TypeVar("F", bound=Callable[..., Any])
O = TypeVar("O", bound=type[Optimizer])

#: the methods of ``torch.optim.Optimizer`` wrapped by ``torch._disable_dynamo``
WRAPPED_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def compiler_loaded() -> bool:
    """Whether ``torch._dynamo`` is imported: only then can a function be traced."""
    return "torch._dynamo" in sys.modules


def eager(fn: F) -> F:
    """``fn`` (a torch function wrapped by ``torch._disable_dynamo``), called without that wrapper
    while ``torch._dynamo`` is not imported; ``fn`` itself where it wraps nothing."""
    plain = getattr(fn, "__wrapped__", None)
    if plain is None:
        return fn

    @functools.wraps(plain)
    def call(*args: Any, **kwargs: Any) -> Any:
        return (fn if compiler_loaded() else plain)(*args, **kwargs)

    return call  # type: ignore[return-value]


@functools.cache
def eager_optimizer(cls: O) -> O:
    """A subclass of the torch optimizer ``cls`` (of the same name) whose :data:`WRAPPED_METHODS`
    and ``step`` run without their wrappers while ``torch._dynamo`` is not imported; its maths and
    state are ``cls``'s."""
    torch_step = cls.step
    while getattr(torch_step, "hooked", False):  # torch's profiling wrapper: the subclass gets its own
        torch_step = torch_step.__wrapped__
    plain_step = inspect.unwrap(torch_step)

    def step(self: Optimizer, closure: Any = None) -> Any:
        if compiler_loaded():
            return torch_step(self, closure)
        # what torch's wrapper sets around the step outside a compiled region
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            return plain_step(self, closure)

    methods = {name: eager(getattr(cls, name)) for name in WRAPPED_METHODS}  # (cls's own where it has one)
    return type(cls.__name__, (cls,), {**methods, "step": step, "__module__": __name__,  # type: ignore[return-value]
                                       "__doc__": f"torch's {cls.__name__} (:func:`eager_optimizer`)."})
