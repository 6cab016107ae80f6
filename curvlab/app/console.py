"""The ``curvlab`` script and ``python -m curvlab``: :func:`curvlab.app.cli.main`, imported here so
that a Ctrl-C during the seconds its imports take (torch, BackPACK, xarray) ends as one during a
run does — one line and exit status 130 — not in a traceback."""

from __future__ import annotations

import sys

from curvlab.app.options import EXIT_STOPPED


def main() -> int:
    """Run the command line; returns the exit status."""
    try:
        from curvlab.app.cli import main as run

        return run()
    except KeyboardInterrupt:  # before the run's own handling (at start-up, or parsing)
        print("curvlab: interrupted", file=sys.stderr)
        return EXIT_STOPPED
