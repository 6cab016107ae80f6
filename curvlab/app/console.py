"""The ``curvlab`` script and ``python -m curvlab``: :func:`curvlab.app.cli.main`, imported here so
that a Ctrl-C during the seconds its imports take (torch, BackPACK, xarray) ends as one during a
run does — one line and exit status 130 — not in a traceback.  Nothing is imported before the
``try`` (numpy's import alone took 0.3 s on a loaded machine)."""

import os
import sys


def main() -> int:
    """Run the command line; returns the exit status."""
    try:
        from curvlab.app.cli import main as run

        status = run()
    except KeyboardInterrupt:  # before the run's own handling (at start-up, or parsing)
        print("curvlab: interrupted", file=sys.stderr)
        from curvlab.app.options import EXIT_STOPPED

        return EXIT_STOPPED
    except Exception:
        if not _in_process_group():
            raise
        import traceback

        traceback.print_exc()
        status = 1
    if status and _in_process_group():
        # a failing rank leaves at once: tearing its process group down while the other ranks
        # still wait in a collective aborted it now and then (SIGABRT in place of its status)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _in_process_group() -> bool:
    """Whether this process is a rank of an initialised ``torch.distributed`` group."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()
