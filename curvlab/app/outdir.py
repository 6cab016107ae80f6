"""Output folders of ``curvlab report`` and ``curvlab train``: checked first, locked, replaced whole.

* :func:`check_writable` runs before any compute: a file in the way, or a folder that cannot
  be created or written, is an error at once rather than after the compute.
* :class:`FolderLock` keeps two runs out of one folder: an ``fcntl`` lock on
  ``OUT/.curvlab.lock``, which names the owner's pid.  The kernel drops the lock when its
  process dies (SIGKILL included), so a lock file left by a dead run is stale by construction and
  is taken over.
* :func:`publish` replaces a whole folder by a fully written staging folder in one atomic
  ``renameat2(RENAME_EXCHANGE)`` (Linux), so a report folder always holds one complete run.
  Elsewhere it falls back to two renames, between which the folder is briefly missing (never
  mixed).  Files themselves are written with :func:`curvlab.io.atomic_write`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from curvlab.io import fsync_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, runs are not locked
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".curvlab.lock"
_STAGING = ".staging-"


class OutputFolderError(ValueError):
    """An output folder cannot be used (a file in the way, not writable, in use, foreign files)."""


def check_writable(folder: Path, who: str) -> None:
    """Raise :class:`OutputFolderError` unless ``folder`` is (or can be created as) a writable folder.

    Nothing is created: the nearest existing ancestor is checked by creating and removing a
    temporary file in it.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
        raise OutputFolderError(f"{who}: output folder {folder} {where}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".curvlab-check-", dir=existing)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        what = "is not writable" if existing == folder else f"cannot be created in {existing}"
        raise OutputFolderError(f"{who}: output folder {folder} {what} ({err.strerror or err})") from None


def foreign_entries(folder: Path, allowed: set[str]) -> list[str]:
    """Names in ``folder`` that are neither ``allowed`` nor curvlab's lock file."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name not in allowed and p.name != LOCK_NAME)


class FolderLock:
    """Exclusive lock on ``folder`` for one run (context manager).

    Raises :class:`OutputFolderError` naming the holder's pid when another live process holds it.
    """

    def __init__(self, folder: Path, who: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.who = who
        self._fd: int | None = None

    def check(self) -> None:
        """Raise as entering would where another live process holds the lock, without taking it
        or creating anything (a check before a command starts its processes)."""
        if fcntl is None:  # pragma: no cover
            return
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:  # no lock file: nobody holds it
            return
        try:
            self._lock_or_raise(fd)
        finally:
            os.close(fd)  # (which releases the lock)

    def _lock_or_raise(self, fd: int) -> None:
        """Lock ``fd`` (the lock file), or raise naming the process that holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputFolderError(
                f"{self.who}: {self.path.parent} is in use by another curvlab run (pid {_read_pid(fd)}, "
                f"lock file {self.path}); wait for it to finish or choose another output folder"
            ) from None

    def __enter__(self) -> "FolderLock":
        if fcntl is None:  # pragma: no cover
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._lock_or_raise(fd)
            except OutputFolderError:
                os.close(fd)
                raise
            # The previous holder may have removed the file between our open and flock: then our
            # lock is on an unlinked inode and a newcomer could lock a fresh file; retry.
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still holding the lock (see __enter__)
        os.close(self._fd)
        self._fd = None


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------------- whole folders


def staging_folder(target: Path) -> Path:
    """A new empty folder beside ``target`` (same file system, so it can be renamed onto it),
    with ``target``'s permissions, or those ``mkdir`` gives under the umask where ``target`` is
    new (``mkdtemp`` makes it private, 0700); stale staging folders of dead runs are removed
    first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}{_STAGING}"
    for old in target.parent.glob(prefix + "*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=target.parent))
    mode = target.stat().st_mode & 0o7777 if target.is_dir() else 0o777 & ~_umask()
    os.chmod(stage, mode)
    return stage


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it: set, then restore
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(stage: Path, target: Path) -> None:
    """Make the complete folder ``stage`` the folder ``target`` in one step and remove the
    previous content of ``target``."""
    stage, target = Path(stage), Path(target)
    fsync_dir(stage)
    if not target.exists():
        with contextlib.suppress(OSError):  # another run may create it meanwhile: exchange then
            os.rename(stage, target)
            fsync_dir(target.parent)
            return
    if not _exchange(stage, target):
        old = stage.with_name(stage.name + "-old")
        os.rename(target, old)
        os.rename(stage, target)
        stage = old
    fsync_dir(target.parent)
    shutil.rmtree(stage, ignore_errors=True)  # now the previous content


def discard(stage: Path) -> None:
    """Remove a staging folder that will not be published."""
    shutil.rmtree(stage, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(b))
