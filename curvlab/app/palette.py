"""One colour and one display name per approximation and per optimizer, used by every figure
(reports, training probes, analyses): TEKFAC is the same vermilion as an approximation, as an
optimizer and in every legend."""

from __future__ import annotations

import seaborn as sns

_CB = sns.color_palette("colorblind", 10)

#: Name → colour; ``exact`` (the exact Fisher) is black.
PALETTE: dict[str, tuple[float, float, float]] = {
    "exact": (0.0, 0.0, 0.0),
    "kfac": _CB[0],  # blue
    "kflr": _CB[9],  # light blue: KFAC with exact factors
    "ekfac": _CB[2],  # green
    "tkfac": _CB[1],  # orange
    "tekfac": _CB[3],  # vermilion: the method under study
    "kfoc": _CB[4],  # purple: the Frobenius-optimal reference
    "sgd": _CB[7],  # grey
    "adam": _CB[8],  # yellow
}

#: An optimizer's own running approximation (``"<method>@optimizer"`` in probes).
OPTIMIZER_APPROXIMATION = _CB[5]  # brown

_EXTRA = [_CB[6]]  # pink: anything else

#: Display names.
LABELS = {
    "exact": "exact F",
    "kfac": "KFAC",
    "kflr": "KFLR",
    "ekfac": "EKFAC",
    "tkfac": "TKFAC",
    "tekfac": "TEKFAC",
    "kfoc": "KFOC",
    "sgd": "SGD",
    "adam": "Adam",
}

#: Legend and bar order.
ORDER = ("sgd", "adam", "kfac", "kflr", "ekfac", "tkfac", "tekfac", "kfoc")


def colour(name: str) -> tuple[float, float, float]:
    """The colour of an approximation or optimizer (stable for unknown names)."""
    if name in PALETTE:
        return PALETTE[name]
    if name.endswith("@optimizer"):
        return OPTIMIZER_APPROXIMATION
    return _EXTRA[sum(map(ord, name)) % len(_EXTRA)]


def label(name: str) -> str:
    """Display name: ``"tekfac@optimizer"`` → ``"TEKFAC (optimizer's)"``."""
    if name.endswith("@optimizer"):
        return f"{LABELS.get(name.split('@')[0], name)} (optimizer's)"
    return LABELS.get(name, name)


def ordered(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` in :data:`ORDER`, unknown names last in their given order."""
    known = [n for n in ORDER if n in names]
    return known + [n for n in names if n not in known]
