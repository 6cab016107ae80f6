"""A Ctrl-C the run never loses.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives.  Inside a
weakref callback or a ``__del__`` — h5py runs them while ``metrics.nc`` is written, torch while
tensors are freed — the exception is printed as "Exception ignored in …" and discarded, and the
run went on (a small model spends most of an epoch's wall time in those writes: 9 of 12 Ctrl-Cs
were lost).  :func:`remembered` installs a handler that raises as Python's does and remembers the
signal; :func:`check` raises it again at the training loop's safe points (after each step and
after each epoch's files), so a discarded interrupt stops the run there.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_pending = False


def _interrupt(signum: int, frame: object) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextmanager
def remembered() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` and is remembered for :func:`check`, inside the block
    (in the main thread, where Python's own handler is in place; elsewhere nothing changes)."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _pending = False
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending = False


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT arrived since the last check (one that Python
    discarded: one that was not propagates by itself)."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt
