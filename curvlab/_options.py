"""What curvlab's option dataclasses share (:class:`~curvlab.extract.ExtractOptions`,
:class:`~curvlab.optim.KroneckerOptions`)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import fields, replace
from typing import ClassVar, TypeVar

import numpy

T = TypeVar("T", bound="OptionSet")


def is_int(value: object) -> bool:
    """An integer option's value: an int or numpy integer, not a bool (``True`` is no count)."""
    return isinstance(value, numbers.Integral) and not is_flag(value)


def is_number(value: object) -> bool:
    """A numeric option's value: a finite real number, numpy's too, not a bool (``True`` is no rate)."""
    return isinstance(value, numbers.Real) and not is_flag(value) and math.isfinite(value)


def is_flag(value: object) -> bool:
    """A yes/no option's value: a bool or numpy bool (a string such as ``"False"`` is not)."""
    return isinstance(value, (bool, numpy.bool_))


def check_int(who: str, name: str, value: object, minimum: int, hint: str = "") -> int:
    """``value`` as an int (numpy's too, not a bool) of at least ``minimum``; else a
    ``ValueError`` naming ``name``."""
    if not is_int(value) or value < minimum:
        need = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int ≥ {minimum}")
        raise ValueError(f"{who}: {name}={value!r} must be {need}{hint}")
    return int(value)


def check_number(who: str, name: str, value: object, *, minimum: float, strict: bool, hint: str = "") -> float:
    """``value`` as a float: a real number (numpy's too, not a bool), finite and above (``strict``)
    or at least ``minimum``; else a ``ValueError`` naming ``name``."""
    ok = is_number(value)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "positive" if strict else "non-negative"
        raise ValueError(f"{who}: {name}={value!r} must be a {bound} finite number{hint}")
    return float(value)


class OptionSet:
    """Mixin: an option set built from another one plus keyword overrides."""

    #: Who reports an unknown option (``"curvlab.extract"``, …).
    owner: ClassVar[str] = "curvlab"

    @classmethod
    def make(cls: type[T], options: T | None, overrides: Mapping[str, object]) -> T:
        """``options`` (default: all defaults) with ``overrides`` applied; unknown names raise."""
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"{cls.owner}: options= must be an instance of {cls.__name__}, got {type(options).__name__}; give "
                            f"the settings as keywords ({cls.owner}(..., **settings)) or as {cls.__name__}(**settings)")
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"{cls.owner}: unknown option(s) {unknown}; options are {sorted(names)}")
        return replace(options if options is not None else cls(), **overrides)  # type: ignore[type-var]

    def check_choices(self, who: str, **choices: tuple[str, ...]) -> None:
        """Raise a ``ValueError`` naming the first field whose value is not among its choices."""
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{who}: {name}={value!r}; choose one of {allowed}")
