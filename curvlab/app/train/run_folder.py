"""The output folder of one ``curvlab train`` run: checked before any compute, locked while
the run writes it, and never silently shared by two runs.

A folder that holds a ``curvlab report`` is refused; one that already holds a run (any of
:data:`RUN_FILES`) is refused unless the run
continues it (``resume``) or replaces it (``overwrite``: once the new run has passed every check
and is about to write, its files are set aside in ``OUT/.curvlab-replaced/``, and removed when the
new run has saved its first checkpoint — a run that fails or is stopped before that, even by
SIGKILL (the next run in the folder puts them back), loses nothing).
While a run trains, ``OUT/.curvlab.lock`` (:class:`curvlab.app.outdir.FolderLock`) keeps a second
run out.  A folder the run created is removed again if the run fails before writing into it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from curvlab.app.outdir import FolderLock, OutputFolderError, check_writable

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.nc"
PROBE = "probe.nc"
#: The figures redrawn after every epoch (curvlab.app.train.figures).
TRAINING_FIGURE = "training.png"
PROBE_FIGURE = "probe.png"
#: The files of a run.
RUN_FILES = (CHECKPOINT, METRICS, PROBE, TRAINING_FIGURE, PROBE_FIGURE)
WHO = "curvlab train"
#: Where the files of a run being replaced wait until the new run's first checkpoint.
SET_ASIDE = ".curvlab-replaced"


@dataclass
class RunFolder:
    """The locked output folder of one run, and the files of the run it replaces."""

    path: Path
    replaced: list[str]

    @property
    def aside(self) -> Path:
        return self.path / SET_ASIDE

    def replace_previous(self) -> None:
        """Set the replaced run's files aside (call before the new run writes its first file)."""
        if self.replaced:
            self.aside.mkdir()
            for name in self.replaced:
                os.replace(self.path / name, self.aside / name)
        self.replaced = []

    def commit(self) -> None:
        """Remove the replaced run for good (call once the new run's checkpoint is saved)."""
        if self.aside.exists():
            shutil.rmtree(self.aside)

    def restore_replaced(self) -> bool:
        """Put a replaced run back in place of the files of a run that ended before its first
        checkpoint; whether there was one."""
        if not self.aside.is_dir():
            return False
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
            if (self.aside / name).exists():
                os.replace(self.aside / name, self.path / name)
        shutil.rmtree(self.aside)
        return True


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """What :func:`run_folder` checks, without creating or locking anything (before the command
    starts its ranks).  Raises as :func:`run_folder` does."""
    out = _checked_path(out, resume=resume, overwrite=overwrite)
    if not out.is_dir():
        if resume:
            raise FileNotFoundError(f"{WHO}: --resume given but {out / CHECKPOINT} does not exist")
        return
    FolderLock(out, WHO).check()
    if not (out / SET_ASIDE).exists():  # (a run set aside: run_folder puts it back first)
        _check_contents(out, resume=resume, overwrite=overwrite)


def _checked_path(out: Path, *, resume: bool, overwrite: bool) -> Path:
    out = Path(out)
    if resume and overwrite:
        raise ValueError(f"{WHO}: resume and overwrite exclude each other")
    check_writable(out, WHO)
    return out


def _check_contents(out: Path, *, resume: bool, overwrite: bool) -> None:
    from curvlab.app.report.files import COUPLING_FIGURE, REPORT_FILES

    report = [name for name in (*REPORT_FILES.values(), COUPLING_FIGURE) if (out / name).exists()]
    if report:  # the run's files beside it would leave its manifest wrong, and the report could not be rewritten
        raise OutputFolderError(f"{WHO}: {out} holds a curvlab report ({', '.join(report)}); choose another --out")
    present = [name for name in RUN_FILES if (out / name).exists()]
    if resume and not (out / CHECKPOINT).exists():
        # (a run killed before its first epoch ended leaves these without a checkpoint; so does a deleted one)
        hint = (f" (the folder holds {', '.join(present)} but no checkpoint to continue from: a run killed before its "
                "first epoch ended, or a checkpoint moved or deleted; start again with --overwrite)") if present else ""
        raise FileNotFoundError(f"{WHO}: --resume given but {out / CHECKPOINT} does not exist{hint}")
    if present and not resume and not overwrite:
        raise OutputFolderError(
            f"{WHO}: {out} already holds a run ({', '.join(present)}); pass --resume to continue "
            "it, --overwrite to replace it, or choose another --out"
        )


@contextlib.contextmanager
def run_folder(out: Path, *, resume: bool, overwrite: bool) -> Iterator[RunFolder]:
    """``out``, created and locked for the duration of the block.

    Raises:
        OutputFolderError: ``out`` is a file, not writable, in use by another run, or holds a
            run and neither ``resume`` nor ``overwrite`` is given.
        FileNotFoundError: ``resume`` without ``out/checkpoint.pt``.
    """
    out = _checked_path(out, resume=resume, overwrite=overwrite)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"{WHO}: cannot create output folder {out} ({err.strerror or err})") from None
    try:
        with FolderLock(out, WHO):
            if RunFolder(out, []).restore_replaced():  # set aside by a run killed before its first checkpoint
                print(f"{WHO}: put back the run in {out} that a run killed before its first checkpoint "
                      "was replacing", file=sys.stderr)
            _check_contents(out, resume=resume, overwrite=overwrite)
            present = [name for name in RUN_FILES if (out / name).exists()]
            folder = RunFolder(out, [] if resume else present)
            try:
                yield folder
            except BaseException:
                folder.restore_replaced()  # the new run ended before its first checkpoint
                raise
    except BaseException:
        if created:  # nothing of this run's is left in a folder it made (rmdir: only if empty)
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
