"""The output folder of one ``curvlab train`` run: checked before any compute, locked while
the run writes it, and never silently shared by two runs.

A folder that already holds a run (any of :data:`RUN_FILES`) is refused unless the run
continues it (``resume``) or replaces it (``overwrite``: its files are removed once the new run
has passed every check and is about to write — a run that fails its checks loses nothing).
While a run trains, ``OUT/.curvlab.lock`` (:class:`curvlab.app.outdir.FolderLock`) keeps a second
run out.  A folder the run created is removed again if the run fails before writing into it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from curvlab.app.outdir import FolderLock, OutputFolderError, check_writable

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.nc"
PROBE = "probe.nc"
#: The files of a run.
RUN_FILES = (CHECKPOINT, METRICS, PROBE)
WHO = "curvlab train"


@dataclass
class RunFolder:
    """The locked output folder of one run, and the files of the run it replaces."""

    path: Path
    replaced: list[str]

    def replace_previous(self) -> None:
        """Remove the replaced run's files (call before the new run writes its first file)."""
        for name in self.replaced:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        self.replaced = []


@contextlib.contextmanager
def run_folder(out: Path, *, resume: bool, overwrite: bool) -> Iterator[RunFolder]:
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
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"{WHO}: cannot create output folder {out} ({err.strerror or err})") from None
    try:
        with FolderLock(out, WHO):
            present = [name for name in RUN_FILES if (out / name).exists()]
            if resume and not (out / CHECKPOINT).exists():
                hint = f" ({', '.join(present)} from a run killed before its first epoch ended: start again with --overwrite)" if present else ""
                raise FileNotFoundError(f"{WHO}: --resume given but {out / CHECKPOINT} does not exist{hint}")
            if present and not resume and not overwrite:
                raise OutputFolderError(
                    f"{WHO}: {out} already holds a run ({', '.join(present)}); pass --resume to continue "
                    "it, --overwrite to replace it, or choose another --out"
                )
            yield RunFolder(out, [] if resume else present)
    except BaseException:
        if created:  # nothing of this run's is left in a folder it made (rmdir: only if empty)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
