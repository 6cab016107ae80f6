"""The command lines' option types and exit statuses (``curvlab report`` and ``curvlab train``
parse the same options alike; the benchmarks use the number types too)."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable

from curvlab._options import is_number

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: a rank that stopped because another rank ended (its collective lost the peer): the launcher
#: names a rank that failed of itself, which torchrun's first failure (by the second) may not be
EXIT_PEER_LOST = 3
#: interrupted (Ctrl-C): 128 + SIGINT, as a shell reports it
EXIT_STOPPED = 130


def exit_stopped(signal_name: str | None) -> int:
    """The exit status of a run stopped by the signal ``signal_name`` (``"SIGTERM"``: 143), as a
    shell reports a process that signal ended; :data:`EXIT_STOPPED` without one (Ctrl-C)."""
    return 128 + signal.Signals[signal_name].value if signal_name else EXIT_STOPPED


def _number(cast: Callable[[str], float], minimum: float, strict: bool, what: str,
            maximum: float = float("inf")) -> Callable[[str], float]:
    """An argparse type: ``cast(text)``, finite and above (``strict``) or at least ``minimum``,
    at most ``maximum``."""

    def parse(text: str) -> float:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not minimum <= value <= maximum or (strict and value == minimum) or value == float("inf"):  # NaN too
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = _number(int, 1, False, "a positive integer")
nonnegative_int = _number(int, 0, False, "an integer >= 0")
positive_float = _number(float, 0.0, True, "a positive finite number")
#: cross-entropy's label smoothing ε, in torch's range
label_smoothing = _number(float, 0.0, False, "a number in [0, 1]", maximum=1.0)
LABEL_SMOOTHING_HELP = ("cross-entropy's label smoothing ε (timm's recipes use 0.1): the loss trained, evaluated and "
                        "measured; its loss-Hessian is cross-entropy's, so it changes the gradient and the "
                        "empirical Fisher, not the exact or MC Fisher (default: %(default)s)")


def check_label_smoothing(who: str, value: object) -> float:
    """``value`` as cross-entropy's label smoothing ε ∈ [0, 1], else a ``ValueError`` naming it."""
    if not is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"{who}: label_smoothing={value!r} must be a number in [0, 1] (cross-entropy's label smoothing)")
    return float(value)


def dataset(text: str) -> str:
    from curvlab.app.data import DATASETS, canonical_name

    key = canonical_name(text)
    if key not in DATASETS:
        raise argparse.ArgumentTypeError(f"unknown dataset {text!r}; choose one of {', '.join(DATASETS)}")
    return key


def model(text: str) -> str:
    from curvlab.app.models import MODELS
    from curvlab.app.models.user import resolved_spec

    spec = text.strip()
    if ":" in spec:
        target, _, attr = spec.rpartition(":")
        if not target.strip() or not attr.strip():
            raise argparse.ArgumentTypeError(
                f"model spec {text!r}: expected 'package.module:function' or 'path/to/file.py:function'"
            )
        return resolved_spec(spec)  # the file it names from here, whatever the later directory
    if spec.lower() not in MODELS:
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; choose one of {', '.join(MODELS)}, or give 'module:function'"
        )
    return spec.lower()


def widths(text: str) -> tuple[int, ...]:
    """``--hidden``: comma-separated positive widths, e.g. ``128,64``."""
    try:
        out = tuple(int(h) for h in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers, e.g. 128,64")
    return out


def models_taking_hidden() -> list[str]:
    """The built-in models that take hidden widths (``--hidden``)."""
    from curvlab.app.models import MODELS, model_options

    return [m for m in MODELS if "hidden" in model_options(m)]


def hidden_help() -> str:
    """``--hidden``'s help: which built-in models take how many widths."""
    from curvlab.app.models import option_default

    takes = models_taking_hidden()
    one = [m for m in takes if isinstance(option_default(m, "hidden"), int)]
    many = [m for m in takes if m not in one]
    return (f"hidden widths of the built-in {', '.join(many)}, comma-separated (e.g. 128,64); one width for "
            f"{', '.join(one)} (the classifier's hidden layer)")


def hidden_options(command: str, model: str, hidden: tuple[int, ...] | None) -> dict:
    """The model options ``--hidden`` gives ``model`` (``{}`` without it): its widths, or the one
    width of a built-in model with a single hidden layer (``vgg``'s classifier).

    Raises:
        ValueError: ``model`` is a built-in model that takes no hidden widths, or one width and
            was given several."""
    from curvlab.app.models import MODELS, option_default

    if hidden is None:
        return {}
    takes = models_taking_hidden()
    if model not in takes:  # (--model's type gives built-ins lower-case)
        which = "a module:function (it builds its own widths)" if model not in MODELS else model
        raise ValueError(f"{command}: --hidden applies to the built-in models {', '.join(takes)}, not {which}")
    if isinstance(option_default(model, "hidden"), int):
        if len(hidden) != 1:
            raise ValueError(f"{command}: --hidden {','.join(map(str, hidden))}: {model} has one hidden layer "
                             "(its classifier's): give one width")
        return {"hidden": hidden[0]}
    return {"hidden": hidden}


def options_attr(options: dict) -> str:
    """Model options as a netCDF attribute: ``hidden=(128, 64)`` (``""`` for none)."""
    return ";".join(f"{k}={v}" for k, v in options.items())


def approximations(text: str) -> tuple[str, ...]:
    from curvlab.approx import APPROXIMATIONS

    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return tuple(APPROXIMATIONS)
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of approximations")
    if "all" in names:
        raise argparse.ArgumentTypeError(f"{text!r}: 'all' stands alone (it is every approximation)")
    unknown = [n for n in names if n not in APPROXIMATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown approximation(s) {', '.join(unknown)}; choose from {', '.join(APPROXIMATIONS)} (or 'all')"
        )
    return tuple(dict.fromkeys(names))


def damping_strategies(text: str) -> dict[str, str]:
    from curvlab.approx import APPROXIMATIONS, DAMPING_STRATEGIES

    out: dict[str, str] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        name, sep, strategy = (p.strip().lower() for p in item.partition("="))
        if not sep or not name or not strategy:
            raise argparse.ArgumentTypeError(f"expected NAME=STRATEGY pairs, got {item!r}")
        if name not in APPROXIMATIONS:
            raise argparse.ArgumentTypeError(
                f"unknown approximation {name!r} in {item!r}; choose from {', '.join(APPROXIMATIONS)}"
            )
        if strategy not in DAMPING_STRATEGIES:
            raise argparse.ArgumentTypeError(
                f"unknown damping strategy {strategy!r} in {item!r}; choose from {', '.join(DAMPING_STRATEGIES)}"
            )
        if name in out:
            raise argparse.ArgumentTypeError(f"{name} is given two strategies ({out[name]}, {strategy}); give it one")
        out[name] = strategy
    if not out:
        raise argparse.ArgumentTypeError("expected NAME=STRATEGY pairs, e.g. kfac=factored,tkfac=nor")
    return out
