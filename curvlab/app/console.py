"""The ``curvlab`` script and ``python -m curvlab``: :func:`curvlab.app.cli.main`, imported here so
that a Ctrl-C during the seconds its imports take (torch, BackPACK, xarray) ends as one during a
run does — one line and exit status 130 — not in a traceback.  Nothing is imported before the
``try`` (numpy's import alone took 0.3 s on a loaded machine)."""

import sys


def main() -> int:
    """Run the command line; returns the exit status."""
    try:
        from curvlab.app.cli import main as run

        return run()
    except KeyboardInterrupt:  # before the run's own handling (at start-up, or parsing)
        print("curvlab: interrupted", file=sys.stderr)
        from curvlab.app.options import EXIT_STOPPED

        return EXIT_STOPPED
