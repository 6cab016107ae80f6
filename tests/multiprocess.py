"""Run a function on R ranks of a gloo process group in spawned processes — and never hang.

::

    from multiprocess import run_ranks

    def _work(scale):                 # top level of an importable module (spawn pickles it)
        import torch.distributed as dist
        t = torch.ones(1) * scale
        dist.all_reduce(t)
        return t.item()

    assert run_ranks(_work, 2, 3.0) == [6.0, 6.0]

Each rank is a fresh process (start method ``spawn``) that joins a process group through a file
store in a temporary directory (no port to find, no race for it), with a process-group timeout,
one torch/BLAS thread, and calls ``fn(*args, **kwargs)``.  Results come back pickled through a
queue, as a list indexed by rank.  When a rank raises, the run fails at once with that rank's
message and traceback (:class:`RankError`), and the other ranks — likely blocked in a
collective — are terminated; a rank that dies without reporting (a crash) fails the run too; a
run that exceeds ``timeout`` fails with :class:`TimeoutError` naming the silent ranks.  Every
process is terminated, then killed, before :func:`run_ranks` returns or raises.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

#: Environment variables set to ``threads`` in the ranks (BLAS pools read them at import).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class RankError(RuntimeError):
    """A rank raised (or died); the message holds its rank, message and traceback."""

    def __init__(self, rank: int, world_size: int, detail: str) -> None:
        super().__init__(f"rank {rank} of {world_size} failed:\n{detail}")
        self.rank = rank


def _rank_main(rank: int, world_size: int, store: str, backend: str, pg_timeout: float, threads: int,
               fn: Callable[..., Any], args: tuple, kwargs: dict, results: Any) -> None:
    """Body of one rank: join the group, run ``fn``, report ``("ok"|"error", rank, payload)``."""
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group(
            backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        payload = pickle.dumps(fn(*args, **kwargs))
    except BaseException:  # noqa: BLE001 - everything is reported to the parent
        results.put(("error", rank, traceback.format_exc()))
        return
    results.put(("ok", rank, payload))
    dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    pg_timeout: float = 60.0,
    backend: str = "gloo",
    threads: int = 1,
    **kwargs: Any,
) -> list[Any]:
    """``[fn(*args, **kwargs) on rank r for r in range(world_size)]``, each rank in its own process.

    Args:
        fn: a picklable (top-level) function; it runs after ``init_process_group``.
        world_size: R, the number of ranks.
        timeout: seconds for the whole run (process start, imports, ``fn``); then the ranks are
            killed and :class:`TimeoutError` is raised.
        pg_timeout: the process group's own timeout (a collective that waits longer raises).
        backend: ``"gloo"`` (CPU).
        threads: torch and BLAS threads per rank.

    Raises:
        RankError: the first rank that raised (or died without a result), with its traceback.
        TimeoutError: the run did not finish within ``timeout``.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    out: list[Any] = [None] * world_size
    procs = []
    with tempfile.TemporaryDirectory(prefix="curvlab-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
        try:
            os.environ.update({k: str(threads) for k in THREAD_VARIABLES})  # inherited at start()
            for rank in range(world_size):
                proc = ctx.Process(
                    target=_rank_main,
                    args=(rank, world_size, store, backend, pg_timeout, threads, fn, args, kwargs, results),
                    daemon=True,
                )
                proc.start()
                procs.append(proc)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        try:
            _collect(procs, results, out, time.monotonic() + timeout, timeout)
        finally:
            _stop(procs)  # every result is in (or the run failed): nothing left to wait for
            results.close()
    return out


#: After the first failure, seconds to wait for the other ranks' reports (to find the cause).
SETTLE_SECONDS = 1.5
#: Seconds a dead rank's report may take through the pipe: crashed (nonzero exit) / exit 0.
CRASH_GRACE, EXIT_GRACE = 0.5, 2.0


def _collect(procs: list, results: Any, out: list, deadline: float, timeout: float) -> None:
    """Read one report per rank; raise on a failure, a silent death or the deadline.

    After the first failure the other ranks get :data:`SETTLE_SECONDS` to report too, so that the
    cause is named rather than its echo: a crashed rank (which the others see as a broken
    connection) before a rank that raised, otherwise the first report to arrive.
    """
    world_size = len(procs)
    pending = set(range(world_size))
    errors: dict[int, str] = {}
    crashed: set[int] = set()
    dead_since: dict[int, float] = {}
    settle: float | None = None
    while pending:
        now = time.monotonic()
        if settle is not None and now >= settle:
            break
        if now > deadline:
            if errors:
                break
            raise TimeoutError(
                f"run_ranks: ranks {sorted(pending)} of {world_size} did not finish within "
                f"{timeout:.0f} s; all ranks were killed"
            )
        try:
            status, rank, payload = results.get(timeout=min(0.1, max(deadline - now, 0.01)))
        except queue.Empty:
            for rank in sorted(pending):
                code = procs[rank].exitcode
                if code is None:
                    continue
                first = dead_since.setdefault(rank, now)
                if now - first > (CRASH_GRACE if code != 0 else EXIT_GRACE):
                    errors[rank] = (f"process exited with code {code} without reporting a result "
                                    "(crashed or killed)")
                    crashed.add(rank)
                    pending.discard(rank)
                    settle = settle or now + SETTLE_SECONDS
            continue
        pending.discard(rank)
        if status == "error":
            errors[rank] = payload
            settle = settle or now + SETTLE_SECONDS
        else:
            out[rank] = pickle.loads(payload)
    if errors:
        cause = min(crashed) if crashed else next(iter(errors))
        others = [f"rank {r}: {_last_line(text)}" for r, text in errors.items() if r != cause]
        detail = errors[cause]
        if others:
            detail += "\n(other ranks failed too: " + "; ".join(others) + ")"
        raise RankError(cause, world_size, detail)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _stop(procs: list) -> None:
    """Terminate, then kill, every rank still running; reap them all."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 5.0
    for proc in procs:
        proc.join(timeout=max(deadline - time.monotonic(), 0.0))
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)
