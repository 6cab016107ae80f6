"""torch.optim.Optimizer's methods as torch wrote them, without the wrapper that keeps the
compiler out of them, while no compiler is loaded.

torch wraps ``Optimizer.add_param_group``, ``state_dict``, ``load_state_dict`` and ``zero_grad``
in ``torch._disable_dynamo``, whose first call imports ``torch._dynamo`` — measured at 1.2–2.6 s
on this project's CPU, as long as ``import torch`` itself — only to mark them as not to be
traced.  Nothing traces them in a process that has not imported ``torch._dynamo``: there
:func:`eager` calls the function the wrapper holds (``__wrapped__``, set by ``functools.wraps``);
once ``torch._dynamo`` is imported (``torch.compile`` in use), torch's wrapper.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


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
