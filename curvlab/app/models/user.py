"""Loading a user's model from a ``module:function`` spec."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

from torch import nn


class ModelSpecError(ValueError):
    """A model the command line cannot build: an unknown name, or a ``module:function`` spec that
    does not give an ``nn.Module`` (a usage error: exit status 2, naming ``--model``)."""


def load_user_model(spec: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build a user model from ``"package.module:function"`` or ``"path/to/file.py:function"``.

    ``function`` (a dotted attribute path works too, e.g. ``"mod:Factory.build"``) is called with
    ``input_shape=`` and/or ``num_classes=`` when it accepts them (or ``**kwargs``), else with no
    arguments. An ``nn.Module`` instance named by the spec is returned as is. Dotted modules are
    imported with the current directory on ``sys.path``, as ``python -m`` would.

    Raises:
        ModelSpecError: malformed spec, module or file not found, attribute missing, or the result
            is not an ``nn.Module``; the message names the spec.
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target.strip() or not attr.strip():
        raise ModelSpecError(
            f"model spec {spec!r}: expected 'package.module:function' or 'path/to/file.py:function'"
        )
    module = _import_target(spec, target.strip())
    obj: object = module
    for part in attr.strip().split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelSpecError(f"model spec {spec!r}: {target!r} has no attribute {attr!r}") from None
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelSpecError(f"model spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    kwargs = _supported_kwargs(obj, input_shape=tuple(input_shape), num_classes=num_classes)
    try:
        model = obj(**kwargs)
    except Exception as err:  # noqa: BLE001 — the user's code: named, not a curvlab traceback
        if traceback.extract_tb(err.__traceback__)[-1].filename == __file__:  # the call itself: its signature
            given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise ModelSpecError(f"model spec {spec!r}: {attr} cannot be called as {attr}({given}): {err}; "
                                 "curvlab passes input_shape= and num_classes= where it takes them, nothing else") from err
        raise ModelSpecError(f"model spec {spec!r}: {attr}() raised {_where(err)}") from err
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model spec {spec!r}: {attr}() returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def resolved_spec(spec: str) -> str:
    """``spec`` with its file made an absolute path (``path/to/file.py:function``): the file it
    names from the current directory, as a run records it and a resume or ``--weights``
    compares it (the same text from another directory names another file); other specs as
    they are."""
    target, sep, attr = spec.rpartition(":")
    if sep and _names_a_file(target.strip()):
        return f"{Path(target.strip()).expanduser().resolve()}:{attr.strip()}"
    return spec


def _names_a_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_target(spec: str, target: str) -> ModuleType:
    if _names_a_file(target):
        path = Path(target).expanduser()
        if path.is_dir():
            raise ModelSpecError(f"model spec {spec!r}: {path} is a folder; name the .py file that defines the model")
        if not path.is_file():
            raise ModelSpecError(f"model spec {spec!r}: file {path} not found")
        # A name unique per file, so two user files called model.py do not clash in sys.modules.
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        mod_name = f"curvlab_user_model_{path.stem}_{digest}"
        file_spec = importlib.util.spec_from_file_location(mod_name, path)
        if file_spec is None or file_spec.loader is None:
            raise ModelSpecError(f"model spec {spec!r}: cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[mod_name] = module  # dataclasses/pickle look the module up here
        try:
            file_spec.loader.exec_module(module)
        except BaseException as err:
            del sys.modules[mod_name]
            if isinstance(err, Exception):  # the user's code: named, not a curvlab traceback
                raise ModelSpecError(f"model spec {spec!r}: importing {path} raised {_where(err)}") from err
            raise
        return module
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(target)
    except ImportError as err:
        raise ModelSpecError(f"model spec {spec!r}: cannot import module {target!r}: {err}") from err
    except Exception as err:  # noqa: BLE001 — the user's code: named, not a curvlab traceback
        raise ModelSpecError(f"model spec {spec!r}: importing module {target!r} raised {_where(err)}") from err
    finally:
        if added:
            sys.path.remove(cwd)


def _where(err: Exception) -> str:
    """``Type: message (file:line)`` of the innermost frame ``err`` was raised in (a syntax
    error's message names its line already)."""
    frames = traceback.extract_tb(err.__traceback__)
    where = "" if isinstance(err, SyntaxError) or not frames else f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return f"{type(err).__name__}: {err}{where}"


def _supported_kwargs(fn: Callable[..., object], **candidates: object) -> dict[str, object]:
    """The subset of ``candidates`` that ``fn`` accepts as keyword arguments."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: call with no arguments
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return dict(candidates)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in candidates.items() if k in names}
