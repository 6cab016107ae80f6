"""The ``--seed`` option of ``curvlab report`` and ``curvlab train``: one accepted range."""

from __future__ import annotations

import argparse

#: The largest ``--seed``: numpy's seeds stop here (torch's at 2⁶⁴ − 1), and what the runs derive
#: from it (``seed + rank``, ``seed·1000 + epoch``) stays within torch's 64 bits.
SEED_MAX = 2**32 - 1


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:  # torch's "Overflow when unpacking long long" came after the checks
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {SEED_MAX}] (0 to 2**32 - 1), got {text!r}")
    return value


def add_seed_option(group: argparse._ArgumentGroup, default: int, help: str) -> None:
    """The ``--seed`` option (``help``: what it seeds; the range and default are added)."""
    group.add_argument("--seed", type=_seed, default=default,
                       help=f"{help}: an integer in [0, 2**32 - 1] (default: %(default)s)")
