"""Runs ``curvlab`` in a process of its own with a fault injected (used by tests/test_faults.py).

    python tests/fault_driver.py kill-at N -- report --out ...
        SIGKILL this process at the N-th file-system event of a write: an fsync, a rename or
        replace, a folder exchange, a folder removal (odd N: just before the event, even N:
        just after it).  The count is printed to stderr at exit when the run survives.
    python tests/fault_driver.py enospc NAME -- train ...
        Every write of a file whose name starts with NAME (a temporary file of the atomic writers
        starts with ``.NAME.``) fails as a full disk does: ``OSError(ENOSPC)`` (tests use
        :func:`enospc_patches` in their own process too).

Nothing here changes curvlab: the faults are injected by wrapping ``os`` functions and the
folder-exchange call, the way the operating system would fail or a kill would land.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys


def _kill_at(target: int) -> None:
    import curvlab.app.outdir as outdir

    count = 0

    def event(real):
        def wrapped(*args, **kwargs):
            nonlocal count
            count += 1
            if count == target and target % 2:
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(*args, **kwargs)
            if count == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        return wrapped

    os.fsync = event(os.fsync)
    os.replace = event(os.replace)
    os.rename = event(os.rename)
    shutil.rmtree = event(shutil.rmtree)
    outdir._exchange = event(outdir._exchange)
    import atexit

    atexit.register(lambda: print(f"fault_driver: {count} write events", file=sys.stderr))


def enospc_patches(prefix: str) -> list[tuple[object, str, object]]:
    """``(object, attribute, replacement)``: writes of files whose name starts with ``prefix`` (or
    their temporary files ``.prefix.*``) fail as on a full disk, after writing part of the data."""
    import builtins
    import io
    import pathlib

    def full(name: object) -> bool:
        base = os.path.basename(os.fsdecode(name)) if isinstance(name, (str, bytes, os.PathLike)) else ""
        return base.startswith(prefix) or base.startswith(f".{prefix}.")

    real_open, real_write_bytes = builtins.open, pathlib.Path.write_bytes

    def open_(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if full(file) and any(c in mode for c in "wax+"):
            fh.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fh

    def write_bytes(self, data):
        if full(self):
            real_write_bytes(self, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_bytes(self, data)

    return [(builtins, "open", open_), (io, "open", open_), (pathlib.Path, "write_bytes", write_bytes)]


def main(argv: list[str]) -> int:
    mode, arg, sep, *rest = argv
    assert sep == "--", "usage: fault_driver.py MODE ARG -- CURVLAB_ARGS..."
    if mode == "kill-at":
        _kill_at(int(arg))
    elif mode == "enospc":
        for obj, name, value in enospc_patches(arg):
            setattr(obj, name, value)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    from curvlab.app.cli import main as curvlab

    return curvlab(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
