"""Running a ``curvlab`` command on several processes.

Two ways, the same result::

    torchrun --standalone --nproc-per-node 4 -m curvlab train ...   # torchrun sets RANK, WORLD_SIZE, ...
    curvlab train --nproc 4 ...                                     # runs exactly that torchrun command

Each process joins a ``torch.distributed`` process group (``gloo`` on CPU, ``nccl`` with
``--device cuda``: one GPU per process, ``cuda:LOCAL_RANK``) with the timeout
:data:`TIMEOUT_SECONDS`, so a rank that stops answering fails the collectives of the others
instead of hanging them; torchrun stops every process as soon as one fails and reports its
error.  Rank 0 writes the output files.

A global batch is split over the ranks in rank order (:func:`shard`): rank ``r`` takes the
``r``-th contiguous part, the sizes differing by at most one example — what the distributed
analysis and the optimizers treat as "the concatenation of the shards".
"""

from __future__ import annotations

import argparse
import atexit
import codecs
import ctypes
import datetime
import gc
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO

import torch
import torch.distributed as dist

from curvlab.app.interrupts import Stopped, raise_interrupt
from curvlab.app.options import EXIT_PEER_LOST

#: The process group's timeout: a collective waiting longer raises (on every waiting rank).
TIMEOUT_SECONDS = float(os.environ.get("CURVLAB_DIST_TIMEOUT", "600"))


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        """The default process group's ranks (rank 0 of 1 without one)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the files and prints."""
        return self.rank == 0

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous part of each tensor (rows; as equal as possible, lower ranks
        taking the remainder)."""
        n = tensors[0].shape[0]
        part = shard(n, self.rank, self.world_size)
        return tuple(t[part] for t in tensors)

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """``values`` summed over the ranks (one ``all_reduce``; as they are on one process)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


    def raise_together(self, error: BaseException | None) -> None:
        """Raise ``error`` (of one rank) on every rank, after the ranks have met (one collective):
        a check made by rank 0 alone must not leave the other ranks waiting for it."""
        if not self.distributed:
            if error is not None:
                raise error
            return
        errors: list = [None] * self.world_size
        dist.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise RuntimeError(f"{first[0]} on another rank: {first[1]}")


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (in place; nothing to do for one process)."""
    if Ranks.current().distributed:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rows of rank ``rank``'s part of ``n`` rows split over ``world_size`` ranks in order."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def check_batch_split(option: str, size: int | None, world_size: int) -> None:
    """A batch of ``size`` examples (``option`` names it; ``None``: chosen later) gives every one
    of ``world_size`` ranks an example.

    Raises:
        ValueError: it does not (a rank would hold an empty shard).
    """
    if size is not None and size < world_size:
        raise ValueError(f"{option} {size} is smaller than the {world_size} processes: each process takes a part "
                         f"of every batch; use a batch of at least {world_size} examples or fewer processes")


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


#: What a collective raises in a rank whose peer has ended (gloo's TCP pairs; NCCL's watchdog).
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def peer_lost(err: BaseException) -> str | None:
    """Which of :data:`PEER_LOST` ``err`` says, where it is a collective's failure because another
    rank ended (its own message, and torchrun's line naming it, say why: this rank's traceback
    would bury them); else ``None``."""
    if not (launched() and isinstance(err, RuntimeError)):
        return None
    return next((s for s in PEER_LOST if s in str(err)), None)


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, checked to be usable here.

    Raises:
        ValueError: malformed name, or CUDA/MPS asked for but not available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"invalid device {device!r}: {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def join_process_group(device: str) -> str:
    """Join the process group torchrun describes (nothing to do for one process, or when a group
    exists already); return the device this rank uses (``cuda`` becomes ``cuda:LOCAL_RANK``).
    The group is destroyed when the process exits."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1 or (dist.is_available() and dist.is_initialized()):
        return device
    _die_with_launcher()
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    atexit.register(_destroy_group)  # on any exit; after a success, leave_process_group did it already
    return device


def _die_with_launcher() -> None:
    """On Linux, this rank is killed when the process that started it (torchrun's agent) dies.
    torchrun starts its ranks in sessions of their own, so a SIGKILL to the command's process
    group (``kill -KILL -- -PGID``), which ends the launcher and torchrun, left them running: they
    held the output folder's lock and went on writing the run into it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl: the ranks outlive a killed launcher, as before
        return
    if os.getppid() == 1:  # the launcher died before the request: reparented to init already
        os.kill(os.getpid(), signal.SIGKILL)


#: prctl's option that asks for a signal when the parent dies (linux/prctl.h).
PR_SET_PDEATHSIG = 1


def leave_process_group() -> None:
    """The end of a command that succeeded on every rank: wait for the other ranks, then destroy
    the group, while the interpreter is whole.  Torch asks for an explicit
    ``destroy_process_group`` once communication is over, before the interpreter exits (objects
    in reference cycles, such as the model's hooks, may still hold the group then).  With the
    group left to exit alone, a rank of the two-process CLI test aborted at its end twice in
    some 55 runs on this project's CPU (SIGABRT, "terminate called without an active
    exception"; not reproduced on demand, the cause not isolated)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
    _destroy_group()


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


#: How long an interrupted launch waits for torchrun to stop its ranks before killing it.
STOP_SECONDS = 60.0


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``curvlab <argv>`` (without its ``--nproc``) on ``nproc`` local processes with torchrun;
    return torchrun's exit status.

    Stopping this process (SIGINT, SIGTERM) stops the ranks: torchrun is sent SIGTERM, which it
    passes to its workers (each in a session of its own, out of reach of a signal to this
    process's group), and waited for — killing it outright would leave them running — and
    :class:`Stopped` is raised.  torchrun's and the ranks' stderr passes through this process,
    up to the stop: what torchrun prints when stopped (its own traceback, its workers'
    shutdown) is dropped, so that the command ends with one line."""
    torchrun = ["--standalone", f"--nproc-per-node={nproc}", "-m", "curvlab", *without_nproc(argv)]
    print("curvlab: -m torch.distributed.run " + " ".join(torchrun), file=sys.stderr, flush=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if nproc > cores:  # (64 processes on 2 cores had not finished an epoch that 1 process took 3 s for)
        print(f"curvlab: note: --nproc {nproc} starts more processes than the {cores} CPU core{'s' * (cores != 1)} this command "
              "may use: they take turns on them, and every step waits for the slowest", file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, raise_interrupt)  # before torchrun starts: it is never left behind
    proc, forward, quiet = None, None, threading.Event()
    try:
        launcher = TORCHRUN_WITH_LAUNCHER.format(launcher=os.getpid(), peer_lost=EXIT_PEER_LOST)
        command = [sys.executable, "-c", launcher, *torchrun]
        # in a session of its own: a terminal's Ctrl-C (a signal to this process's group) reaches
        # this process alone, which stops torchrun in order, its output then dropped; torchrun
        # signalled too printed its traceback, and its ranks their own lines, before that
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, start_new_session=True)
        forward = threading.Thread(target=_forward, args=(proc.stderr, quiet), daemon=True)
        forward.start()
        code = proc.wait()
        forward.join(timeout=10.0)  # the ranks' last words (a failing rank's message) first; a rank left behind holds the pipe
        return code
    except KeyboardInterrupt as err:
        quiet.set()
        if proc is not None:
            _stop(proc)
        if forward is not None:
            forward.join(timeout=5.0)
        raise err if isinstance(err, Stopped) else Stopped("SIGINT") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


#: ``python -m torch.distributed.run``, sent SIGTERM (which it passes to its workers) when the
#: launcher dies (Linux): a ``kill -9`` of the command's own process left torchrun and its ranks
#: training on, holding the output folder's lock and writing into it.  A rank that fails is named
#: in one line (its own message, if any, came before), in place of torchrun's traceback, failure
#: table and log lines.  Self-contained (no curvlab import: that would delay every launch by seconds).
TORCHRUN_WITH_LAUNCHER = (
    "import ctypes, logging, os, runpy, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "    if os.getppid() != {launcher}:  # the launcher died before the request\n"
    "        sys.exit(143)\n"
    "from torch.distributed.elastic.multiprocessing.api import SignalException\n"
    "from torch.distributed.elastic.multiprocessing.errors import ChildFailedError\n"
    "logging.getLogger('torch.distributed.elastic.multiprocessing.api').setLevel(logging.CRITICAL)\n"
    "logging.getLogger('torch.distributed.elastic.agent.server.api').setLevel(logging.ERROR)\n"
    "sys.argv[0] = 'torchrun'\n"
    "try:\n"
    "    runpy.run_module('torch.distributed.run', run_name='__main__', alter_sys=True)\n"
    "except SignalException as err:  # signalled itself (a scheduler's stop signals every process): the launcher says it\n"
    "    sys.exit(128 + int(err.sigval))\n"
    "except ChildFailedError as err:  # one line, not its traceback and table\n"
    "    # the first rank to fail of itself: not one that stopped because it lost its peer (status {peer_lost}),\n"
    "    # which torchrun, timing failures by the second, may name first\n"
    "    failed = {{r: f for r, f in err.failures.items() if f.exitcode != {peer_lost}}} or err.failures\n"
    "    rank = min(failed, key=lambda r: (failed[r].timestamp, r))\n"
    "    failure = failed[rank]\n"
    "    how = ('ended by ' + failure.signal_name() + (' (the out-of-memory killer, or kill -9)' if failure.exitcode == -9 else '')\n"
    "           if failure.exitcode < 0 else 'exited with status %d' % failure.exitcode)\n"
    "    sys.stderr.write('curvlab: rank %d (pid %d) %s; torchrun stopped the other ranks\\n' % (rank, failure.pid, how))\n"
    "    sys.exit(1)\n"
)


def _forward(pipe: IO[bytes], quiet: threading.Event) -> None:
    """Copy ``pipe`` to this process's stderr as it comes (progress bars too), until ``quiet``."""
    out = getattr(sys.stderr, "buffer", None)
    decode = codecs.getincrementaldecoder("utf-8")("replace").decode
    while chunk := os.read(pipe.fileno(), 1 << 16):
        if quiet.is_set():
            continue  # read on: torchrun must not block on a full pipe while it stops
        try:
            if out is not None:
                sys.stderr.flush()
                out.write(chunk)
                out.flush()
            else:  # (a text-only stderr, as under a test's capture)
                sys.stderr.write(decode(chunk))
                sys.stderr.flush()
        except (OSError, ValueError):  # stderr closed: the run goes on
            quiet.set()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to torchrun (it stops its workers), then SIGKILL if it has not exited in
    :data:`STOP_SECONDS`."""
    # a second SIGINT or SIGTERM must not cut the wait short
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def relaunch_with_data(nproc: int, argv: Sequence[str], parser: argparse.ArgumentParser,
                       dataset: str, data_dir: str | None, checks: Callable[[], None],
                       usage_errors: tuple[type[Exception], ...] = ()) -> int:
    """:func:`relaunch`, once the command's own ``checks`` (the model, the output folder) and the
    data files are checked here — once, not by every rank, each followed by torchrun's traceback.
    A problem is reported and returns 1 (2, with the usage line, for a model spec that builds
    nothing and for the command's ``usage_errors``, as one process)."""
    from curvlab.app.data import DataError, check_data_dir
    from curvlab.app.messages import print_error
    from curvlab.app.models import ModelSpecError
    from curvlab.app.options import EXIT_FAILURE, EXIT_USAGE

    try:
        checks()  # first, as one process does: a model curvlab refuses needs no data
        check_data_dir(dataset, data_dir)
    except ModelSpecError as err:
        print_error(parser, f"argument --model: {err}", usage=True)
        return EXIT_USAGE
    except usage_errors as err:
        print_error(parser, err, usage=True)
        return EXIT_USAGE
    except (DataError, ValueError, OSError) as err:
        print_error(parser, err)
        return EXIT_FAILURE
    return relaunch(nproc, argv)


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc R`` (or ``--nproc=R``, or an abbreviation such as ``--np R``),
    which torchrun's own parser would take for its ``--nproc-per-node``."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
            continue
        name, eq, _ = token.partition("=")
        if len(name) >= 4 and "--nproc".startswith(name):
            skip = not eq
            continue
        out.append(token)
    return out


def wants_relaunch(nproc: int) -> bool:
    """Whether ``--nproc nproc`` asks this (unlaunched) process to start the ranks."""
    return nproc > 1 and not launched()


def _process_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {count}")
    return count


def add_nproc_option(group: argparse._ArgumentGroup, what: str) -> None:
    """The ``--nproc`` option of a subcommand (``what``: what the ranks share)."""
    group.add_argument(
        "--nproc", type=_process_count, default=1, metavar="R",
        help=f"run on R local processes (torchrun --standalone --nproc-per-node R; gloo on CPU, nccl "
        f"with --device cuda, one GPU each); {what}; rank 0 writes the files (default: %(default)s)",
    )
