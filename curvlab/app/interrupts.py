"""A Ctrl-C (or a scheduler's SIGTERM) the run never loses.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives.  Inside a
weakref callback or a ``__del__`` — h5py runs them while ``metrics.nc`` is written, torch while
tensors are freed — the exception is printed as "Exception ignored in …" and discarded, and the
run went on (a small model spends most of an epoch's wall time in those writes: 9 of 12 Ctrl-Cs
were lost).  :func:`remembered` installs a handler that raises as Python's does and remembers the
signal; :func:`check` raises it again at the training loop's safe points (after each step and
after each epoch's files), so a discarded interrupt stops the run there.

SIGTERM — what a batch scheduler (SLURM's ``scancel``, a time limit) or ``kill`` sends — stops a
one-process run the same way, as :class:`Stopped`, so that it says how to resume instead of
vanishing; it takes effect when the operation running then returns, as a Ctrl-C does.  A
torchrun rank keeps the default (its launcher stops it and speaks for it).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_pending: str | None = None  # the signal whose exception Python may have discarded


class Stopped(KeyboardInterrupt):
    """The run was stopped by a signal (``signal_name``: ``"SIGTERM"``, ``"SIGINT"``)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def _raised(name: str) -> KeyboardInterrupt:
    return KeyboardInterrupt() if name == "SIGINT" else Stopped(name)


def raise_interrupt(signum: int, frame: object) -> None:
    """A signal handler: raise the signal's interrupt (SIGINT: ``KeyboardInterrupt``, another:
    :class:`Stopped`), remembered for :func:`check`."""
    global _pending
    _pending = signal.Signals(signum).name
    raise _raised(_pending)


@contextmanager
def remembered() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt``, SIGTERM :class:`Stopped` (outside torchrun's ranks),
    each remembered for :func:`check`, inside the block (in the main thread, where Python's own
    handlers are in place; elsewhere nothing changes)."""
    global _pending
    caught = []
    if threading.current_thread() is threading.main_thread():
        # each signal on its own: a job started with `&` by a script inherits SIGINT ignored, and
        # its SIGTERM (a scheduler's stop) must still stop it cleanly
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            caught.append(signal.SIGINT)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            caught.append(signal.SIGTERM)
    if not caught:
        yield
        return
    _pending = None
    previous = {sig: signal.signal(sig, raise_interrupt) for sig in caught}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _pending = None


def check() -> None:
    """Raise again the interrupt of a signal that arrived since the last check (one that Python
    discarded: one that was not propagates by itself)."""
    global _pending
    if _pending is not None:
        name, _pending = _pending, None
        raise _raised(name)
