"""Cost of ``curvlab.extract`` relative to a plain forward+backward, next to BackPACK and curvlinops.

For every model the script times, on one mini-batch,

* a plain forward + backward of the model (the unit: every cost is reported as a ratio to it);
* BackPACK's own second-order / first-order passes on an ``extend``-ed deep copy of the model
  (KFAC with one MC sample, KFLR, SqrtGGNExact, SqrtGGNMC with one sample, BatchGrad);
* curvlinops' ``KFACLinearOperator`` (MC Fisher, one sample): construction plus
  ``compute_kronecker_factors()`` (the constructor computes nothing);
* ``curvlab.extract`` with several flavour / statistics combinations.

Measurements are interleaved: every repeat runs each row once (in a rotated order), so slow drift
of the machine (other processes, thermal state) affects all rows alike.  The reported time of a
row is the median over repeats; the ratio is that median divided by the median of the plain
forward+backward.  Rows that are much faster than the timer's useful resolution run several calls
per measurement (``--min-time``); rows whose single call is slow run fewer repeats
(``--slow-seconds`` / ``--slow-repeats``), which the table says.

Usage::

    python benchmarks/bench_extract.py --device cpu --models mlp,cnn \
        --out benchmarks/results/extract_cpu.json
    python benchmarks/bench_extract.py --device cuda --models mlp,cnn,3c3d \
        --out benchmarks/results/extract_cuda.json

The JSON file holds the machine description and every row; a Markdown table is printed and
written next to it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import backpack  # noqa: E402
from backpack import extend  # noqa: E402
from backpack.extensions import KFAC, KFLR, BatchGrad, SqrtGGNExact, SqrtGGNMC  # noqa: E402

from curvlab.extract import extract  # noqa: E402

try:
    import curvlinops
    from curvlinops import KFACLinearOperator
except ImportError:  # pragma: no cover - curvlinops is optional for the benchmark
    curvlinops = None
    KFACLinearOperator = None


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    """784-128-64-10 MLP with ReLU."""
    return nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def cnn() -> nn.Module:
    """Two 3×3 convolutions, max-pool and a linear classifier for 3×32×32 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16 * 16, 10),
    )


def c3d3() -> nn.Module:
    """DeepOBS' 3c3d network for CIFAR-10 (flatten size 128·3·3 = 1152 for 3×32×32)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5),  # 32 → 28
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),  # 28 → 14
        nn.Conv2d(64, 96, 3),  # 14 → 12
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),  # 12 → 6
        nn.Conv2d(96, 128, 3, padding=1),  # 6 → 6
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),  # 6 → 3
        nn.Flatten(),
        nn.Linear(1152, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


#: name → (model factory, input shape [N, ...], number of classes)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": (mlp, (128, 784), 10),
    "cnn": (cnn, (64, 3, 32, 32), 10),
    "3c3d": (c3d3, (128, 3, 32, 32), 10),
}


def check_flatten_sizes() -> None:
    """The hard-coded Linear input sizes match the conv stacks (fail early, not mid-run)."""
    for name, (factory, shape, _) in MODELS.items():
        with torch.no_grad():
            factory()(torch.zeros(2, *shape[1:]))  # raises on a mismatch
        del name


# --------------------------------------------------------------------------------------------
# Timed rows
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One timed operation."""

    key: str
    label: str
    group: str  # "plain" | "backpack" | "curvlinops" | "curvlab"
    fn: Callable[[], object]
    number: int = 1  # calls per measurement
    repeats: int = 0  # measurements actually taken (set by the planner)
    times: list[float] = field(default_factory=list)  # seconds per call
    note: str = ""
    retries: int = 0  # measurements redone because other processes were busy
    disturbed: int = 0  # measurements kept although other processes were busy
    foreign: list[float | None] = field(default_factory=list)  # other processes' cores

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def make_rows(name: str, device: torch.device, seed: int) -> tuple[list[Row], dict]:
    """The rows for one model, sharing one mini-batch and one set of weights."""
    factory, shape, classes = MODELS[name]
    torch.manual_seed(seed)
    model = factory().to(device)
    x = torch.randn(*shape, device=device)
    y = torch.randint(0, classes, (shape[0],), device=device)
    loss_fn = nn.CrossEntropyLoss()

    # BackPACK needs extended modules; extend a deep copy so the plain model has no hooks.
    bp_model = extend(copy.deepcopy(model))
    bp_loss = extend(nn.CrossEntropyLoss())

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def backpack_pass(make_ext: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            bp_model.zero_grad(set_to_none=True)
            loss = bp_loss(bp_model(x), y)
            with backpack.backpack(make_ext()):
                loss.backward()

        return run

    rows = [
        Row("plain", "plain forward+backward", "plain", plain),
        Row("bp_kfac_mc", "BackPACK KFAC (mc=1)", "backpack",
            backpack_pass(lambda: KFAC(mc_samples=1))),
        Row("bp_kflr", "BackPACK KFLR", "backpack", backpack_pass(KFLR)),
        Row("bp_sqrt_exact", "BackPACK SqrtGGNExact", "backpack", backpack_pass(SqrtGGNExact)),
        Row("bp_sqrt_mc", "BackPACK SqrtGGNMC (mc=1)", "backpack",
            backpack_pass(lambda: SqrtGGNMC(mc_samples=1))),
        Row("bp_batchgrad", "BackPACK BatchGrad", "backpack", backpack_pass(BatchGrad)),
    ]

    if KFACLinearOperator is not None:
        params = [p for p in model.parameters() if p.requires_grad]

        def curvlinops_kfac() -> None:
            op = KFACLinearOperator(
                model, loss_fn, params, [(x, y)], fisher_type="mc", mc_samples=1,
                check_deterministic=False,
            )
            op.compute_kronecker_factors()  # the constructor is lazy

        rows.append(Row("cl_kfac_mc", "curvlinops KFACLinearOperator (mc=1)", "curvlinops",
                        curvlinops_kfac))

    def curvlab(fisher: str, stats: tuple[str, ...]) -> Callable[[], object]:
        return lambda: extract(model, loss_fn, x, y, fisher=fisher, mc_samples=1, stats=stats)

    for key, fisher, stats in [
        ("cv_kfac_mc", "mc", ("kfac",)),
        ("cv_kfac_exact", "exact", ("kfac",)),
        ("cv_tkfac_mc", "mc", ("tkfac",)),
        ("cv_tkfac_exact", "exact", ("tkfac",)),
        ("cv_sqrt_exact", "exact", ("sqrt",)),
        ("cv_all_exact", "exact", ("sqrt", "kfac", "tkfac")),
        ("cv_sqrt_emp", "empirical", ("sqrt",)),
    ]:
        label = f"curvlab extract fisher={fisher} stats={','.join(stats)}"
        rows.append(Row(key, label, "curvlab", curvlab(fisher, stats)))

    info = {
        "input_shape": list(shape),
        "num_params": sum(p.numel() for p in model.parameters()),
        "layers": [type(m).__name__ for m in model],
        "check": consistency_check(model, loss_fn, x, y),
    }
    return rows, info


def consistency_check(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor,
                      y: torch.Tensor) -> dict[str, float]:
    """Sanity check that the compared passes compute the same thing (max relative difference).

    curvlab's exact KFAC factors vs curvlinops' type-2 KFAC (KFC "expand", bias as last input
    column) on every layer, and vs BackPACK's KFLR on the linear layers (BackPACK's conv factors
    follow another convention: ``A`` without the ``1/T``, ``G`` from spatially summed roots).
    """
    ours = extract(model, loss_fn, x, y, fisher="exact", stats=("kfac",))
    out: dict[str, float] = {}
    if KFACLinearOperator is not None:
        op = KFACLinearOperator(model, loss_fn, [p for p in model.parameters()], [(x, y)],
                                fisher_type="type-2", check_deterministic=False,
                                separate_weight_and_bias=False)
        op.compute_kronecker_factors()
        worst_a = worst_g = 0.0
        for name, a_cl in op._input_covariances.items():
            f, g_cl = ours[name].kfac["exact"], op._gradient_covariances[name]
            worst_a = max(worst_a, float((f.A - a_cl).norm() / a_cl.norm()))
            worst_g = max(worst_g, float((f.G - g_cl).norm() / g_cl.norm()))
        out.update(curvlinops_type2_A=worst_a, curvlinops_type2_G=worst_g)
    bp_model, bp_loss = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())
    loss = bp_loss(bp_model(x), y)
    with backpack.backpack(KFLR()):
        loss.backward()
    worst_a = worst_g = 0.0
    for (name, module), (_, bp_module) in zip(model.named_children(), bp_model.named_children()):
        if not isinstance(module, nn.Linear):
            continue
        g_bp, a_bp = bp_module.weight.kflr
        f = ours[name].kfac["exact"]
        d = a_bp.shape[0]
        worst_g = max(worst_g, float((f.G - g_bp).norm() / g_bp.norm()))
        worst_a = max(worst_a, float((f.A[:d, :d] - a_bp).norm() / a_bp.norm()))
    out.update(backpack_kflr_linear_A=worst_a, backpack_kflr_linear_G=worst_g)
    return out


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


def wait_until_quiet(load: CpuLoad, args: argparse.Namespace, budget: float) -> float:
    """Sleep in short windows until other processes use at most --busy-cores cores (or the
    wait budget is spent); returns the seconds waited."""
    waited = 0.0
    while waited < budget:
        load.start()
        time.sleep(0.3)
        wall, busy = load.stop()
        if busy is None or busy <= args.busy_cores:
            break
        waited += wall
    return waited


def timed(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` (``number`` calls in a row)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(number):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / number


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    rows, info = make_rows(name, device, args.seed)
    by_key = {r.key: r for r in rows}

    # Warm-up (also calibrates calls per measurement and the number of repeats per row).
    for row in rows:
        t = math.inf
        for _ in range(max(args.warmup, 1)):
            t = min(t, timed(row.fn, 1, device))
        row.number = max(1, min(args.max_number, math.ceil(args.min_time / t)))
        row.repeats = args.repeats
        if t > args.slow_seconds and args.repeats > args.slow_repeats:
            row.repeats = args.slow_repeats
            row.note = f"{row.repeats} repeats (single call {t:.2f} s > {args.slow_seconds} s)"

    # Interleaved measurement: every repeat visits each row once, in a rotated order.  On a
    # shared machine a measurement during which other processes used more than --busy-cores
    # cores is redone after waiting for a quiet machine (at most --max-retries times, within
    # --max-wait / --model-budget); otherwise it is kept and counted as disturbed.
    waited, started = 0.0, time.perf_counter()
    for rep in range(args.repeats):
        k = rep % len(rows)
        for row in rows[k:] + rows[:k]:
            if len(row.times) >= row.repeats:
                continue
            for attempt in range(args.max_retries + 1):
                in_budget = time.perf_counter() - started <= args.model_budget
                if attempt > 0 and in_budget:
                    waited += wait_until_quiet(CpuLoad(), args, budget=args.max_wait - waited)
                row_load = CpuLoad()
                row_load.start()
                t = timed(row.fn, row.number, device)
                wall, busy = row_load.stop()
                # /proc/stat counts in jiffies: allow 20 ms of foreign CPU time as noise
                quiet = busy is None or busy * wall <= max(args.busy_cores * wall, 0.02)
                if quiet or not in_budget or attempt == args.max_retries:
                    break
                row.retries += 1
            row.times.append(t)
            row.foreign.append(busy)
            row.disturbed += not quiet

    base = by_key["plain"].median
    base_times = by_key["plain"].times
    out_rows = []
    for row in rows:
        # paired: median over repeats of (this row / plain in the same repeat)
        paired = statistics.median(t / b for t, b in zip(row.times, base_times))
        out_rows.append({
            "key": row.key,
            "label": row.label,
            "group": row.group,
            "median_ms": row.median * 1e3,
            "min_ms": min(row.times) * 1e3,
            "max_ms": max(row.times) * 1e3,
            "ratio": row.median / base,
            "ratio_paired": paired,
            "ratio_min": min(row.times) / min(base_times),
            "repeats": len(row.times),
            "calls_per_measurement": row.number,
            "times_ms": [t * 1e3 for t in row.times],
            "note": row.note,
            "foreign_cores": row.foreign,
            "retries": row.retries,
            "disturbed_kept": row.disturbed,
        })

    def ratio(a: str, b: str) -> float | None:
        if a in by_key and b in by_key:
            return by_key[a].median / by_key[b].median
        return None

    comparisons = {
        "cv_tkfac_mc / bp_kfac_mc": ratio("cv_tkfac_mc", "bp_kfac_mc"),
        "cv_tkfac_exact / bp_kflr": ratio("cv_tkfac_exact", "bp_kflr"),
        "cv_kfac_mc / bp_kfac_mc": ratio("cv_kfac_mc", "bp_kfac_mc"),
        "cv_kfac_exact / bp_kflr": ratio("cv_kfac_exact", "bp_kflr"),
        "cv_sqrt_exact / bp_sqrt_exact": ratio("cv_sqrt_exact", "bp_sqrt_exact"),
        "cv_kfac_mc / cl_kfac_mc": ratio("cv_kfac_mc", "cl_kfac_mc"),
    }
    return {"model": name, **info, "batch_size": info["input_shape"][0], "rows": out_rows,
            "comparisons": comparisons,
            "retried_measurements": sum(r.retries for r in rows),
            "disturbed_measurements_kept": sum(r.disturbed for r in rows),
            "waited_for_quiet_s": waited}


# --------------------------------------------------------------------------------------------
# Machine description and output
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "backpack": getattr(backpack, "__version__", None),
        "curvlinops": getattr(curvlinops, "__version__", None) if curvlinops else None,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_model()),
        "git_commit": git_commit(),
    }
    if info["backpack"] is None or info["curvlinops"] is None:
        from importlib.metadata import PackageNotFoundError, version

        for key, dist in (("backpack", "backpack-for-pytorch"),
                          ("curvlinops", "curvlinops-for-pytorch")):
            if info[key] is None:
                try:
                    info[key] = version(dist)
                except PackageNotFoundError:
                    pass
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = list(os.getloadavg())
    return info


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    st = result["settings"]
    lines = [
        f"# curvlab.extract benchmark ({m['device_name']}, {m['device']})",
        "",
        f"- date: {m['date']}, git {m['git_commit']}",
        f"- machine: {m['platform']}, {m['cpu_model']}, {m['cpu_count']} cores, "
        f"torch threads {m['torch_threads']}",
        f"- versions: torch {m['torch']}, backpack {m['backpack']}, "
        f"curvlinops {m['curvlinops']}, python {m['python']}",
        f"- settings: repeats {st['repeats']}, warmup {st['warmup']}, at least "
        f"{st['min_time']} s per measurement (fast rows: several calls, time per call); "
        f"total {result['total_wall_s']:.0f} s",
        f"- load average at start / end: {_fmt_load(m.get('loadavg_start'))} / "
        f"{_fmt_load(m.get('loadavg_end'))}",
        f"- shared machine: measurements during which other processes used > "
        f"{st['busy_cores']} cores were redone after waiting for a quiet machine: "
        + "; ".join(f"{r['model']} {r['retried_measurements']} redone, "
                    f"{r['disturbed_measurements_kept']} disturbed ones kept, waited "
                    f"{r['waited_for_quiet_s']:.0f} s"
                    for r in result["models"]),
        "",
        "ratio = median time / median time of the plain forward+backward; paired = median over "
        "repeats of (time / plain time in the same repeat); min = fastest time / fastest plain "
        "time (least sensitive to other processes); ms = median time per call.",
        "",
    ]
    models = result["models"]
    header = "| row | " + " | ".join(
        f"{r['model']} (N={r['batch_size']}) ratio | paired | min | ms" for r in models) + " |"
    lines += [header, "|---|" + "---:|---:|---:|---:|" * len(models)]
    keys = [row["key"] for row in models[0]["rows"]]
    notes = []
    for key in keys:
        cells = []
        label = None
        for res in models:
            row = next((r for r in res["rows"] if r["key"] == key), None)
            if row is None:
                cells += ["–", "–", "–", "–"]
                continue
            label = row["label"]
            mark = ""
            if row["note"]:
                notes.append(f"{res['model']} / {row['label']}: {row['note']}")
                mark = "*"
            if row["disturbed_kept"]:
                notes.append(f"{res['model']} / {row['label']}: {row['disturbed_kept']} of "
                             f"{row['repeats']} measurements disturbed by other processes")
                mark = "*"
            cells += [f"{row['ratio']:.2f}{mark}", f"{row['ratio_paired']:.2f}",
                      f"{row['ratio_min']:.2f}", f"{row['median_ms']:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Same-flavour comparisons (ratio of median times; target for TKFAC ≤ 1.0):", ""]
    comp_keys = list(models[0]["comparisons"])
    lines += ["| comparison | " + " | ".join(r["model"] for r in models) + " |",
              "|---|" + "---:|" * len(models)]
    for ck in comp_keys:
        lines.append(f"| {ck} | " + " | ".join(fmt_ratio(r["comparisons"][ck])
                                               for r in models) + " |")
    lines += ["", "Consistency of the compared passes (max relative Frobenius difference of "
              "curvlab's exact KFAC factors vs curvlinops type-2 KFAC, all layers, and vs "
              "BackPACK KFLR, linear layers): "
              + "; ".join(f"{r['model']}: " + ", ".join(f"{k} {v:.1e}"
                                                       for k, v in r["check"].items())
                          for r in models)]
    if notes:
        lines += ["", "\\* " + "; ".join(notes)]
    return "\n".join(lines) + "\n"


def _fmt_load(values: list[float | None] | None) -> str:
    if not values:
        return "n/a"
    return ", ".join("n/a" if v is None else f"{v:.2f}" for v in values)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default="mlp,cnn", help="comma list of mlp, cnn, 3c3d")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-time", type=float, default=0.02,
                   help="fast rows run several calls per measurement to last this long (s)")
    p.add_argument("--max-number", type=int, default=50,
                   help="at most this many calls per measurement")
    p.add_argument("--slow-seconds", type=float, default=2.0,
                   help="rows whose single call takes longer run --slow-repeats repeats")
    p.add_argument("--slow-repeats", type=int, default=3)
    p.add_argument("--busy-cores", type=float, default=0.1,
                   help="a measurement during which other processes used more cores is "
                        "redone (shared machines; read from /proc/stat)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="a disturbed measurement is redone at most this many times")
    p.add_argument("--max-wait", type=float, default=120.0,
                   help="seconds (per model) to wait in total for a quiet machine")
    p.add_argument("--model-budget", type=float, default=240.0,
                   help="after this many seconds of measuring one model, stop redoing busy "
                        "repeats and stop waiting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: leave torch's default)")
    p.add_argument("--out", type=Path, default=None, help="JSON output path (.md written next)")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = set(names) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {sorted(MODELS)}")
    check_flatten_sizes()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")

    result = {
        "machine": machine_info(device),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "reference": REFERENCE,
        "models": [],
    }
    started = time.perf_counter()
    for name in names:
        t0 = time.perf_counter()
        res = run_model(name, args, device)
        res["wall_s"] = time.perf_counter() - t0
        result["models"].append(res)
        print(f"[{name}] done in {res['wall_s']:.1f} s", file=sys.stderr, flush=True)
    result["total_wall_s"] = time.perf_counter() - started
    if hasattr(os, "getloadavg"):
        result["machine"]["loadavg_end"] = list(os.getloadavg())

    table = markdown(result)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table)
    return result


#: Ratios measured earlier (for comparison; see benchmarks/README.md).
REFERENCE = {
    "cpu (this 2-core machine)": {
        "mlp": {"bp_kfac_mc": 6.1, "bp_kflr": 7.9, "bp_sqrt_exact": 231, "cl_kfac_mc": 4.1},
        "cnn": {"bp_kfac_mc": 12.9, "bp_kflr": 18.2, "bp_sqrt_exact": 29.5, "cl_kfac_mc": 8.9},
    },
    "H200, 3c3d N=128": {
        "3c3d": {"bp_kfac_mc": 4.9, "bp_kflr": 5.6, "bp_sqrt_exact": 14.3, "bp_batchgrad": 3.0,
                 "cl_kfac_mc": 3.0},
    },
}


if __name__ == "__main__":
    main()
