"""Plumbing shared by every benchmark script: models, timing, the machine, the output files.

* Models are curvlab's built-ins (:func:`curvlab.app.models.build_model`), named by
  :data:`MODELS` with the batch size each benchmark uses; nothing is redefined here.
* Timing: :class:`Row` (one operation, calls per measurement sized to ``min_time``) and
  :func:`measure_interleaved` — every repeat runs each row once, in a rotated order, so drift of
  a shared machine affects all rows alike; a row's time is the median over repeats.  With
  ``busy_cores`` set, a measurement during which other processes used more cores (read from
  ``/proc/stat``) is redone after waiting for a quiet machine, a bounded number of times.
  ``barrier`` (e.g. ``torch.distributed.barrier``) lines the processes of a data-parallel run
  up before and after each measurement.
* :func:`argument_parser` (``--device``, ``--threads``, ``--out``, ``--repeats``),
  :func:`machine_info` (versions, CPU/GPU, threads, git commit, load average at start; call
  :func:`finish` at the end; :func:`loadavg` in between), :func:`command_line` (the command
  to state in a result) and :func:`write_results` (JSON + Markdown next to it).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from curvlab.app import provenance  # noqa: E402
from curvlab.app.allocator import apply_malloc_option  # noqa: E402
from curvlab.app.options import nonnegative_int, positive_float, positive_int  # noqa: E402  (the CLI's option types)
from curvlab.app.models import build_model  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model at the batch size a benchmark uses."""

    key: str
    builtin: str
    input_shape: tuple[int, ...]
    batch: int
    options: tuple[tuple[str, object], ...] = ()
    classes: int = 10
    note: str = ""

    def build(self, device: torch.device | str = "cpu", seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(self.builtin, self.input_shape, self.classes, **dict(self.options)).to(device)

    def batches(self, count: int, device: torch.device | str = "cpu", seed: int = 1) -> list[Batch]:
        """``count`` random mini-batches (inputs ~ N(0, 1), uniform labels)."""
        gen = torch.Generator().manual_seed(seed)
        return [
            (torch.randn(self.batch, *self.input_shape, generator=gen).to(device),
             torch.randint(0, self.classes, (self.batch,), generator=gen).to(device))
            for _ in range(count)
        ]

    @property
    def label(self) -> str:
        return f"{self.key} (N={self.batch})"


#: Every benchmark model by key.
MODELS: dict[str, ModelSpec] = {
    spec.key: spec
    for spec in (
        ModelSpec("mlp", "mlp", (784,), 128, note="784-128-64-10, ReLU"),
        ModelSpec("mlp-1024", "mlp", (784,), 1024, note="784-128-64-10, ReLU"),
        # every kernel negligible: a step takes its host time, what a launch-bound GPU step pays
        ModelSpec("host", "mlp", (16,), 4, options=(("hidden", (16,) * 19),), classes=16,
                  note="20 × Linear(16, 16), ReLU, N = 4: a step's time is its host overhead"),
        ModelSpec("cnn", "cnn-bench", (3, 32, 32), 64, note="conv16 → conv32 → max-pool → Linear(8192, 10)"),
        ModelSpec("3c3d", "3c3d", (3, 32, 32), 128, note="DeepOBS 3c3d with TF 'same' padding (curvlab.app.models)"),
        ModelSpec("resnet18", "resnet18", (3, 32, 32), 128,
                  note="ResNet-18, CIFAR stem, BatchNorm (curvlab.app.models 'resnet18')"),
    )
}


def models(keys: str) -> list[ModelSpec]:
    """The specs of a comma-separated list of keys (a clear error for unknown ones)."""
    names = [k.strip() for k in keys.split(",") if k.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    return [MODELS[k] for k in names]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str, calls: int = 1,
          barrier: Callable[[], object] | None = None) -> float:
    """Seconds per call of ``fn`` (``calls`` calls in a row, synchronised; with ``barrier``, all
    processes of a data-parallel run wait for each other before and after, so the time includes
    waiting for the slowest)."""
    sync(device)
    if barrier is not None:
        barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    if barrier is not None:
        barrier()
    return (time.perf_counter() - start) / calls


class CpuLoad:
    """CPU seconds used by *other* processes over an interval (``/proc/stat`` minus our own
    process time); ``None`` where ``/proc/stat`` is unavailable.  Resolution: one jiffy."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _busy(self) -> float | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        vals = [int(v) for v in fields[:8]]
        return (sum(vals) - vals[3] - vals[4]) / self.hz  # minus idle and iowait

    def start(self) -> None:
        self._t0, self._b0, self._p0 = time.perf_counter(), self._busy(), time.process_time()

    def stop(self) -> tuple[float, float | None]:
        """(wall seconds, average number of cores busy with other processes)."""
        wall = time.perf_counter() - self._t0
        busy = self._busy()
        if busy is None or self._b0 is None:
            return wall, None
        foreign = (busy - self._b0) - (time.process_time() - self._p0)
        return wall, max(foreign, 0.0) / wall


@dataclass
class Row:
    """One timed operation.

    Attributes:
        key, label: identifiers; ``fn``: the operation; ``calls``: calls per measurement;
        max_samples: stop measuring after this many (slow rows); samples: seconds per call;
        foreign: cores used by other processes during each measurement; retries: measurements
        redone because the machine was busy; note: free text for the table; warm: one untimed
        call before every measurement (see :meth:`calibrate`); setup: run untimed before every
        call (what ``fn`` needs but does not measure; one call per measurement then).
    """

    key: str
    fn: Callable[[], object]
    label: str = ""
    calls: int = 1
    max_samples: int | None = None
    samples: list[float] = field(default_factory=list)
    foreign: list[float | None] = field(default_factory=list)
    retries: int = 0
    note: str = ""
    warm: bool = False
    setup: Callable[[], object] | None = None

    def calibrate(self, device: torch.device | str, min_time: float, warmup: int = 1,
                  warm_below: float = 0.1) -> float:
        """Run ``fn`` ``warmup`` times (the fastest is kept as the first sample's estimate) and
        size ``calls`` so that a measurement lasts at least ``min_time``.  A call faster than
        ``warm_below`` seconds gets an untimed call before every measurement: after the other
        rows, the first call pays for cold caches (~0.5 ms of a 4.5 ms MLP step), which would
        otherwise weigh on a row by how few calls its calibration happened to give it."""
        t = min(self.measure(device) for _ in range(max(warmup, 1)))
        self.calls = 1 if self.setup else max(1, int(min_time / max(t, 1e-9)))
        self.warm = t < warm_below
        return t

    def measure(self, device: torch.device | str, barrier: Callable[[], object] | None = None,
                calls: int | None = None, started: Callable[[], object] | None = None) -> float:
        """Seconds per call of one measurement of ``calls`` calls (default :attr:`calls`;
        :attr:`setup` first, untimed; then ``started``, e.g. a load meter's start)."""
        if self.setup is not None:
            self.setup()
        if started is not None:
            started()
        return timed(self.fn, device, calls or self.calls, barrier)

    @property
    def done(self) -> bool:
        return self.max_samples is not None and len(self.samples) >= self.max_samples

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def measure_interleaved(
    rows: Sequence[Row], repeats: int, device: torch.device | str, *,
    busy_cores: float | None = None, max_retries: int = 2, max_wait: float = 60.0,
    progress: Callable[[int], None] | None = None, barrier: Callable[[], object] | None = None,
) -> float:
    """``repeats`` rounds, each measuring every row once in a rotated order; returns the seconds
    spent waiting for a quiet machine (``busy_cores``: see the module docstring).  ``progress``
    is called after every round with its index; ``barrier``: see :func:`timed` (every process
    must then measure the same rows, so leave ``busy_cores`` unset: retries would differ)."""
    if barrier is not None and busy_cores is not None:
        raise ValueError("busy_cores retries differ between processes: not with a barrier")
    waited = 0.0
    for rep in range(repeats):
        k = rep % len(rows)
        for row in list(rows[k:]) + list(rows[:k]):
            if row.done:
                continue
            for attempt in range(max_retries + 1):
                if attempt:
                    waited += _wait_until_quiet(busy_cores or 0.0, max(max_wait - waited, 0.0))
                load = CpuLoad()
                gc.collect()
                if row.warm:  # one call, as every call: after its setup
                    row.measure(device, barrier, calls=1)
                t = row.measure(device, barrier, started=load.start)
                wall, busy = load.stop()
                # /proc/stat counts in jiffies: allow 20 ms of foreign CPU time as noise
                quiet = busy_cores is None or busy is None or busy * wall <= max(busy_cores * wall, 0.02)
                if quiet or attempt == max_retries:
                    break
                row.retries += 1
            row.samples.append(t)
            row.foreign.append(busy)
        if progress is not None:
            progress(rep)
    return waited


def _wait_until_quiet(busy_cores: float, budget: float) -> float:
    waited = 0.0
    while waited < budget:
        load = CpuLoad()
        load.start()
        time.sleep(0.3)
        wall, busy = load.stop()
        if busy is None or busy <= busy_cores:
            break
        waited += wall
    return waited


# --------------------------------------------------------------------------------------------
# The machine and the output
# --------------------------------------------------------------------------------------------


def int_list(length: int | None = None) -> Callable[[str], list[int]]:
    """argparse type: comma-separated integers ≥ 1 (exactly ``length`` of them when given),
    e.g. ``"64,48"``."""
    def parse(text: str) -> list[int]:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts) or (length is not None and len(parts) != length):
            what = f"{length} comma-separated integers" if length else "comma-separated integers"
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}, e.g. {','.join(['64', '48', '32'][:length or 2])}")
        return [positive_int(p) for p in parts]

    return parse


def argument_parser(doc: str, threads: int | None = 1, *, repeats: int | None = None,
                    device: bool = True) -> argparse.ArgumentParser:
    """A parser with ``--device`` (unless ``device`` is false: CPU-only scripts), ``--threads``
    (default ``threads``; 0: torch's default), ``--out`` (the JSON path; the Markdown goes next
    to it) and, with ``repeats``, ``--repeats`` (interleaved rounds, that default)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if device:
        p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=nonnegative_int, default=threads, help="torch threads (0 or unset: torch's default)")
    p.add_argument("--out", default=None, help="JSON output path (.md written next to it)")
    p.add_argument("--malloc", choices=("reuse", "default"), default="reuse",
                   help="reuse: glibc's malloc keeps freed memory for the next allocation "
                        "(curvlab.app.allocator); default: as the process started")
    if repeats is not None:
        p.add_argument("--repeats", type=positive_int, default=repeats, help="interleaved rounds (medians over them)")
    return p


def start(args: argparse.Namespace, command: str | None = None) -> tuple[torch.device, dict]:
    """Apply ``--threads``; the device (``--device``, else the CPU) and :func:`machine_info`
    (taken after the threads), with ``command`` (:func:`command_line`: what :func:`machine_line`
    prints, so that a result says how to run it again)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(getattr(args, "device", "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    return device, {**machine_info(device), "malloc": apply_malloc_option(getattr(args, "malloc", "default")),
                    "command": command}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """The repository's commit (:func:`curvlab.app.provenance.git_commit`)."""
    return provenance.git_commit(ROOT)


def command_line(script: str | Path, argv: Sequence[str] | None = None, hide: Sequence[str] = ()) -> str:
    """The command that ran ``script`` with ``argv`` (default: this process's arguments), as the
    README writes it; the values of the options in ``hide`` (free text) are shown as ``...``."""
    shown, hiding = [], False
    for arg in sys.argv[1:] if argv is None else argv:
        name, eq, _ = arg.partition("=")
        shown.append("..." if hiding else f"{name}=..." if eq and name in hide else arg)
        hiding = not hiding and arg in hide
    path = Path(script).resolve()
    return shlex.join(["python", str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), *shown])


def loadavg() -> list[float] | None:
    """The load average (1, 5, 15 min), ``None`` where the system has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info(device: torch.device | str) -> dict:
    """Versions, hardware, threads, git commit and the load average at the start."""
    device = torch.device(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "backpack": _version("backpack-for-pytorch"),
        "curvlinops": _version("curvlinops-for-pytorch"),
        "asdfghjkl": _version("asdfghjkl"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "git_commit": git_commit(),
    }
    info["loadavg_start"] = loadavg()
    return info


def finish(info: dict) -> dict:
    """Add the load average at the end."""
    info["loadavg_end"] = loadavg()
    return info


def machine_line(m: dict) -> str:
    """One Markdown line describing the machine and its load."""
    load = lambda key: ", ".join(f"{v:.2f}" for v in m[key]) if m.get(key) else "n/a"  # noqa: E731
    return (
        f"{m['date']}; {m['device_name']} ({m['device']}); {m['cpus']} CPUs, {m['threads']} torch threads; "
        f"torch {m['torch']}, BackPACK {m.get('backpack')}, curvlinops {m.get('curvlinops')}, "
        f"asdfghjkl {m.get('asdfghjkl')}; git {m.get('git_commit')}; malloc {m.get('malloc', 'default')}; "
        f"load average (1, 5, 15 min) "
        f"{load('loadavg_start')} at start, {load('loadavg_end')} at end."
        + (f" Command: `{m['command']}`." if m.get("command") else "")
    )


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> list[str]:
    """A Markdown table (``align``: one ``l``/``r`` per column; default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def write_results(out: str | Path | None, result: dict, markdown: str, quiet: bool = False) -> None:
    """Print the Markdown (unless ``quiet``); with ``out``, write ``out`` (JSON) and the
    Markdown next to it."""
    if not quiet:
        print(markdown)
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # each file replaced whole: a run stopped while writing (a time limit) leaves the last results
    for path, text in ((out, json.dumps(result, indent=2, default=str)), (out.with_suffix(".md"), markdown.rstrip())):
        part = path.with_name(path.name + ".part")
        part.write_text(text + "\n")
        os.replace(part, path)
