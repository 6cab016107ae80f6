"""The output folder of one ``curvlab train`` run: checked before any compute, locked while
the run writes it, and never silently shared by two runs.

A folder that already holds a run (any of :data:`RUN_FILES`) is refused unless the run
continues it (``resume``) or replaces it (``overwrite``: its files are removed first).  While a
run trains, ``OUT/.curvlab.lock`` (:class:`curvlab.app.outdir.FolderLock`) keeps a second run out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from curvlab.app.outdir import FolderLock, OutputFolderError, check_writable

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.nc"
PROBE = "probe.nc"
#: The files of a run.
RUN_FILES = (CHECKPOINT, METRICS, PROBE)
WHO = "curvlab train"


@contextlib.contextmanager
def run_folder(out: Path, *, resume: bool, overwrite: bool) -> Iterator[Path]:
    """``out``, created and locked for the duration of the block.

    Raises:
        OutputFolderError: ``out`` is a file, not writable, in use by another run, or holds a
            run and neither ``resume`` nor ``overwrite`` is given.
        FileNotFoundError: ``resume`` without ``out/checkpoint.pt``.
    """
    out = Path(out)
    if resume and overwrite:
        raise ValueError(f"{WHO}: resume and overwrite exclude each other")
    check_writable(out, WHO)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"{WHO}: cannot create output folder {out} ({err.strerror or err})") from None
    with FolderLock(out, WHO):
        present = [name for name in RUN_FILES if (out / name).exists()]
        if resume and not (out / CHECKPOINT).exists():
            hint = f" ({', '.join(present)} from a run killed before its first epoch ended: start again with --overwrite)" if present else ""
            raise FileNotFoundError(f"{WHO}: --resume given but {out / CHECKPOINT} does not exist{hint}")
        if present and not resume:
            if not overwrite:
                raise OutputFolderError(
                    f"{WHO}: {out} already holds a run ({', '.join(present)}); pass --resume to continue "
                    "it, --overwrite to replace it, or choose another --out"
                )
            for name in present:
                (out / name).unlink()
        yield out
