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
    "diagonal": _CB[6],  # pink: diag(F), the baseline (and the parameter blocks' approximation)
    "sgd": _CB[7],  # grey
    "adam": _CB[8],  # yellow
}

#: An optimizer's own running approximation (``"<method>@optimizer"`` in probes).
OPTIMIZER_APPROXIMATION = _CB[5]  # brown

_EXTRA = [(0.35, 0.35, 0.35)]  # dark grey: anything else

#: Display names.
LABELS = {
    "exact": "exact F",
    "kfac": "KFAC",
    "kflr": "KFLR",
    "ekfac": "EKFAC",
    "tkfac": "TKFAC",
    "tekfac": "TEKFAC",
    "kfoc": "KFOC",
    "diagonal": "diag(F)",
    "sgd": "SGD",
    "adam": "Adam",
}

#: Legend and bar order.
ORDER = ("sgd", "adam", "kfac", "kflr", "ekfac", "tkfac", "tekfac", "kfoc", "diagonal")


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
