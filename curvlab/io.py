"""Files: atomic writes and netCDF, shared by the library and the application.

Every write is atomic: the content goes to a temporary file in the target's folder, is flushed
to disk (``fsync``), and only then renamed over the target (``os.replace``).  A crash, an
interruption or a full disk mid-write therefore never leaves a truncated file at the target
path, and an existing file there is replaced only once the new one is complete.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Union

import numpy as np
import xarray as xr

PathLike = Union[str, os.PathLike]

NETCDF_ENGINE = "h5netcdf"


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the result, and rename it to ``path``; returns ``path``.

    The file gets the mode an ordinary ``open()`` would give it (an existing file's mode is
    kept).  On any exception (KeyboardInterrupt included) the temporary file is removed and
    ``path`` is left as it was.  An ``OSError`` with an errno (a full disk: ``[Errno 28]``) is
    raised again as the same error naming ``path``, whatever the writer's own message said.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates the file 0600; give it the mode a normal open() would have.
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.errno:
            raise OSError(err.errno, os.strerror(err.errno), str(path)) from err
        raise
    fsync_dir(folder)
    return path


def _file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777  # keep an existing file's permissions
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def fsync_dir(folder: PathLike) -> None:
    """Persist the rename itself (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def netcdf_attr(value: object) -> object:
    """netCDF attributes must be numbers, strings or 1-D arrays of them."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value
    if value is None:
        return "none"
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iuf":
        return value
    return str(value)


def write_netcdf(ds: xr.Dataset, path: PathLike) -> Path:
    """Write ``ds`` to ``path`` (netCDF4 via h5netcdf) atomically; returns the path.

    Attributes that netCDF cannot hold (``None``, booleans, tuples, ...) are stored as numbers
    or strings; ``ds`` itself is not modified.
    """
    out = ds.copy(deep=False)
    out.attrs = {k: netcdf_attr(v) for k, v in ds.attrs.items()}
    for name in out.variables:
        out[name].attrs = {k: netcdf_attr(v) for k, v in ds[name].attrs.items()}
    image = _netcdf_image(out)
    if image is None:
        def write(tmp: str) -> None:
            with signals_held():
                out.to_netcdf(tmp, engine=NETCDF_ENGINE)

        return atomic_write(path, write)
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(image))


def _netcdf_image(ds: xr.Dataset) -> bytes | None:
    """``ds`` as the bytes of a netCDF4 file, or None where xarray cannot write h5netcdf to
    memory (before 2025.8).  Writing the bytes is then one plain file write: a full disk is an
    ``OSError`` (HDF5 writing to a full disk itself raises ``RuntimeError`` and can crash the
    interpreter when it exits)."""
    buffer = io.BytesIO()
    try:
        with signals_held():
            ds.to_netcdf(buffer, engine=NETCDF_ENGINE)
    except (ValueError, TypeError):
        return None
    return buffer.getvalue()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held while h5netcdf opens, writes or closes a file, and delivered to
    their handlers after it: an interrupt raised inside ``h5netcdf.File.__init__`` left a
    half-built file object, whose ``__del__`` printed "Exception ignored … AttributeError" after
    the run's last line.  (Python runs signal handlers in the main thread only: elsewhere nothing
    changes.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[tuple[int, object]] = []
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in kept.items():
        if callable(handler):  # (an ignored or default signal stays as it is)
            signal.signal(sig, lambda signum, frame: arrived.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if callable(handler):
                signal.signal(sig, handler)
        for signum, frame in arrived[:1]:  # the first, as the handler would have seen it
            kept[signum](signum, frame)


def read_netcdf(path: PathLike) -> xr.Dataset:
    """Read a report written by :func:`write_netcdf` fully into memory (the file is closed).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: ``path`` is not a readable netCDF file (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"report file {path} not found")
    try:
        with signals_held(), xr.open_dataset(path, engine=NETCDF_ENGINE) as ds:
            return ds.load()
    except Exception as err:  # h5py raises OSError, xarray ValueError/KeyError, ...
        raise ValueError(f"cannot read report file {path} (not a complete netCDF4 file?): {err}") from err
