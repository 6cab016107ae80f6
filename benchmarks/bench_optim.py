"""Cost of a TEKFAC step relative to SGD and Adam, amortised over its statistics schedule.

For every model the script times, on one fixed mini-batch (float32),

* ``fwd+bwd``: ``zero_grad`` + forward + backward (the unit of the extraction overhead);
* ``SGD`` (momentum 0.9) and ``Adam`` steps: forward + backward + ``step()``;
* TEKFAC at its defaults (``stats_interval`` 10, ``eigen_interval`` 100, ``scale_interval`` 10)
  on each kind of step of its schedule, by pinning ``opt.steps_done``:

  - ``plain`` (k % 10 ≠ 0): ``track`` is a no-op, ``step()`` preconditions;
  - ``stats`` (k % 10 = 0, k % 100 ≠ 0): forward + backward inside ``track`` (TKFAC statistics
    and the KFE rescaling in one BackPACK pass) + ``step()``;
  - ``track only``: the same pass without ``step()`` (the extraction's share);
  - ``refresh`` (k % 100 = 0): statistics + the eigen-decompositions + ``step()``;

* **amortised (composed)** = (1·refresh + 9·stats + 90·plain)/100, the mean cost of a step over
  one period of the schedule, from the medians above;
* **amortised (direct)** (``--direct-models``): fresh SGD, Adam and TEKFAC each run
  ``--direct-steps`` consecutive steps, interleaved in chunks of 10 steps; total time / steps,
  median over ``--direct-repeats``.

Measurements are interleaved: each repeat runs every row once in a rotated order, so drift of a
shared machine affects all rows alike; the time of a row is the median over repeats (rows much
faster than ``--min-time`` run several calls per measurement).  The ``refresh`` row's first
sample is the warm-up's step 0; more are taken only while a refresh is faster than
``--slow-seconds``.  Targets: amortised ≤ 1.3× SGD, statistics step ≤ 3× fwd+bwd.

Usage::

    python benchmarks/bench_optim.py --device cpu --out benchmarks/results/optim_cpu.json
    python benchmarks/bench_optim.py --device cuda --out benchmarks/results/optim_cuda.json

The JSON file holds the machine description and every number; a Markdown table is printed and
written next to it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from curvlab.optim import TEKFAC  # noqa: E402

TARGET_AMORTISED = 1.3
TARGET_STATS = 3.0


# --------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    """784-128-64-10 MLP with ReLU."""
    return nn.Sequential(
        nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def cnn() -> nn.Module:
    """Conv(3→16) ReLU Conv(16→32) ReLU MaxPool Flatten Linear(8192→10), input 3×32×32."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8192, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": (mlp, (784,), 128),
    "cnn": (cnn, (3, 32, 32), 64),
}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of ``fn`` (``calls`` calls in one measurement)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


class Row:
    """A timed operation, measured once per repeat (``calls`` calls per measurement)."""

    def __init__(self, name: str, fn: Callable[[], None], device: torch.device, min_time: float,
                 max_samples: int | None = None, samples: list[float] | None = None) -> None:
        self.name, self.fn, self.device = name, fn, device
        self.samples: list[float] = list(samples or [])
        self.max_samples = max_samples
        first = timed(fn, device)  # warm-up call, also sizes the measurement
        self.calls = max(1, int(min_time / max(first, 1e-9)))

    def measure(self) -> None:
        if self.max_samples is not None and len(self.samples) >= self.max_samples:
            return
        self.samples.append(timed(self.fn, self.device, self.calls))

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


# --------------------------------------------------------------------------------------------
# The benchmark of one model
# --------------------------------------------------------------------------------------------


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    build, in_shape, n = MODELS[name]
    torch.manual_seed(0)
    base = build().to(device)
    gen = torch.Generator().manual_seed(1)
    pool = [
        (torch.randn(n, *in_shape, generator=gen).to(device), torch.randint(0, 10, (n,), generator=gen).to(device))
        for _ in range(args.batches)
    ]
    batches = itertools.cycle(pool)
    loss_fn = nn.CrossEntropyLoss()

    def loss_of(model: nn.Module) -> torch.Tensor:
        x, y = next(batches)
        return loss_fn(model(x), y)
    skipped: list[str] = []
    warnings.simplefilter("always")

    def record(w: warnings.WarningMessage) -> None:
        if issubclass(w.category, RuntimeWarning):
            skipped.append(str(w.message))

    model_fb = copy.deepcopy(base)

    def fwd_bwd() -> None:
        model_fb.zero_grad(set_to_none=True)
        loss_of(model_fb).backward()

    def first_order(opt_cls, **kw) -> Callable[[], None]:
        model = copy.deepcopy(base)
        opt = opt_cls(model.parameters(), **kw)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_of(model).backward()
            opt.step()

        return step

    model_t = copy.deepcopy(base)
    opt = TEKFAC(model_t, lr=args.lr)  # the defaults under test
    period = opt.eigen_interval
    assert opt.scale_interval == opt.stats_interval and period % opt.stats_interval == 0

    def tekfac_at(k: int, do_step: bool = True) -> Callable[[], None]:
        def step() -> None:
            opt.steps_done = k
            opt.zero_grad(set_to_none=True)
            with opt.track(loss_fn):
                loss_of(model_t).backward()
            if do_step:
                opt.step()
            else:
                opt._pending = None

        return step

    with warnings.catch_warnings(record=True) as caught:
        # warm-up: step 0 (statistics + the first eigen refresh) … step 10 (statistics + KFE)
        refresh_first = timed(tekfac_at(0), device)
        for k in range(1, opt.stats_interval + 1):
            tekfac_at(k)()
        rows = [
            Row("fwd+bwd", fwd_bwd, device, args.min_time),
            Row("SGD step", first_order(torch.optim.SGD, lr=args.lr, momentum=0.9), device, args.min_time),
            Row("Adam step", first_order(torch.optim.Adam, lr=args.lr * 0.1), device, args.min_time),
            Row("TEKFAC plain step", tekfac_at(1), device, args.min_time),
            Row("TEKFAC stats step", tekfac_at(opt.stats_interval), device, args.min_time),
            Row("TEKFAC track only", tekfac_at(opt.stats_interval, do_step=False), device, args.min_time),
        ]
        if refresh_first > args.slow_seconds:
            refresh = _single_sample_row("TEKFAC refresh step", refresh_first)
        else:
            refresh = Row("TEKFAC refresh step", tekfac_at(period), device, 0.0,
                          max_samples=args.refresh_repeats, samples=[refresh_first])
        rows.append(refresh)
        for r in range(args.repeats):
            order = rows[r % len(rows):] + rows[: r % len(rows)]
            for row in order:
                row.measure()
            gc.collect()
        breakdown = profile_step(opt, model_t, loss_fn, *pool[0], device, args)
        with torch.no_grad():
            p_max = statistics.mean(
                torch.softmax(model_t(xb), 1).max(1).values.mean().item() for xb, _ in pool
            )
    for w in caught:
        record(w)

    med = {row.name: row.median for row in rows}
    n_stats = period // opt.stats_interval - 1
    n_plain = period - n_stats - 1
    amortised = (med["TEKFAC refresh step"] + n_stats * med["TEKFAC stats step"]
                 + n_plain * med["TEKFAC plain step"]) / period
    result = {
        "model": name,
        "batch": n,
        "input_shape": list(in_shape),
        "params": sum(p.numel() for p in base.parameters()),
        "blocks": {b.name: list(b.layout.shape) for b in opt.blocks()},
        "rows": {
            row.name: {"median_s": row.median, "samples": len(row.samples), "calls": row.calls}
            for row in rows
        },
        "schedule": {"period": period, "refresh": 1, "stats": n_stats, "plain": n_plain},
        "amortised_composed_s": amortised,
        "ratios": {
            "amortised_composed/SGD": amortised / med["SGD step"],
            "amortised_composed/Adam": amortised / med["Adam step"],
            "plain/SGD": med["TEKFAC plain step"] / med["SGD step"],
            "stats_step/fwd+bwd": med["TEKFAC stats step"] / med["fwd+bwd"],
            "track_only/fwd+bwd": med["TEKFAC track only"] / med["fwd+bwd"],
            "refresh_step/fwd+bwd": med["TEKFAC refresh step"] / med["fwd+bwd"],
        },
        "breakdown": breakdown,
        "tekfac_model_mean_max_probability": p_max,
        "warnings": sorted(set(skipped)),
    }
    if name in args.direct_models:
        result["direct"] = direct_amortised(base, loss_of, loss_fn, device, args)
        d = result["direct"]
        result["ratios"]["amortised_direct/SGD"] = d["TEKFAC"] / d["SGD"]
        result["ratios"]["amortised_direct/Adam"] = d["TEKFAC"] / d["Adam"]
    return result


def _single_sample_row(name: str, sample: float) -> Row:
    row = Row.__new__(Row)
    row.name, row.samples, row.max_samples, row.calls = name, [sample], 1, 1
    row.measure = lambda: None  # type: ignore[method-assign]
    return row


def profile_step(opt: TEKFAC, model: nn.Module, loss_fn: nn.Module, x: torch.Tensor,
                 y: torch.Tensor, device: torch.device, args: argparse.Namespace) -> dict:
    """Where a plain step's time goes: each block's ``inv_mat_mul`` and the eigen-decompositions."""
    from curvlab.approx.base import psd_eigh

    opt.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    out: dict[str, dict] = {}
    approx = opt.approximations()
    for b in opt.blocks():
        grad = opt._grad_matrix(b)
        a = approx[b.name]
        inv = statistics.median(
            timed(lambda: a.inv_mat_mul(grad, opt.damping, opt.damping_strategy), device, 5)
            for _ in range(5)
        )
        st = opt.state[b.weight]
        eigh = {}
        for key in ("delta_psi", "delta_phi"):
            mat = st[key]
            if mat.shape[0] > args.max_eigh_dim:  # the refresh row holds it; too slow to repeat
                eigh[key] = None
                continue
            eigh[key] = statistics.median(timed(lambda: psd_eigh(mat), device) for _ in range(3))
        out[b.name] = {"shape": list(b.layout.shape), "inv_mat_mul_s": inv, "eigh_s": eigh}
    return out


def direct_amortised(base: nn.Module, loss_of: Callable[[nn.Module], torch.Tensor], loss_fn: nn.Module,
                     device: torch.device, args: argparse.Namespace) -> dict:
    """Consecutive steps from a fresh optimizer, interleaved in chunks of 10; median over repeats
    of total time / steps."""
    totals: dict[str, list[float]] = {"SGD": [], "Adam": [], "TEKFAC": []}
    for _ in range(args.direct_repeats):
        runners = {}
        for label in totals:
            model = copy.deepcopy(base)
            if label == "TEKFAC":
                opt = TEKFAC(model, lr=args.lr)

                def step(model=model, opt=opt) -> None:
                    opt.zero_grad(set_to_none=True)
                    with opt.track(loss_fn):
                        loss_of(model).backward()
                    opt.step()
            else:
                cls, kw = (torch.optim.SGD, dict(lr=args.lr, momentum=0.9)) if label == "SGD" else (
                    torch.optim.Adam, dict(lr=args.lr * 0.1))
                opt = cls(model.parameters(), **kw)

                def step(model=model, opt=opt) -> None:
                    opt.zero_grad(set_to_none=True)
                    loss_of(model).backward()
                    opt.step()

            runners[label] = step
        spent = dict.fromkeys(totals, 0.0)
        labels = list(totals)
        for c in range(args.direct_steps // 10):
            for label in labels[c % 3:] + labels[: c % 3]:
                spent[label] += timed(runners[label], device, 10) * 10
        for label in totals:
            totals[label].append(spent[label] / (args.direct_steps // 10 * 10))
    return {label: statistics.median(v) for label, v in totals.items()} | {
        "steps": args.direct_steps // 10 * 10, "repeats": args.direct_repeats}


# --------------------------------------------------------------------------------------------
# Machine description and output
# --------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": _cpu_name(),
        "loadavg_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import backpack

        info["backpack"] = backpack.__version__
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor()


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"# curvlab.optim: TEKFAC step cost ({m['device']})",
        "",
        f"{m['date']}; {m.get('gpu', m['cpu'])}; {m['cpus']} CPUs, {m['threads']} torch threads; "
        f"torch {m['torch']}; load average {m['loadavg_start'][0]:.1f} at start, "
        f"{m['loadavg_end'][0]:.1f} at end.",
        "",
        *([f"Note: {m['note']}", ""] if m.get("note") else []),
        "TEKFAC at its defaults (stats 10, eigen 100, scale 10).  Medians over interleaved repeats; "
        "amortised (composed) = (1 refresh + 9 stats + 90 plain steps)/100.",
        "",
    ]
    for r in res["models"]:
        lines += [
            f"## {r['model']} (N={r['batch']}, input {tuple(r['input_shape'])}, {r['params']} parameters; "
            f"blocks {', '.join(f'{k}: {v[0]}×{v[1]}' for k, v in r['blocks'].items())})",
            "",
            "| row | median ms | × fwd+bwd | × SGD step | × Adam step | samples |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        fb = r["rows"]["fwd+bwd"]["median_s"]
        sgd = r["rows"]["SGD step"]["median_s"]
        adam = r["rows"]["Adam step"]["median_s"]
        for name, row in r["rows"].items():
            t = row["median_s"]
            lines.append(
                f"| {name} | {t * 1e3:.2f} | {t / fb:.2f} | {t / sgd:.2f} | {t / adam:.2f} | {row['samples']} |"
            )
        t = r["amortised_composed_s"]
        lines.append(f"| **TEKFAC amortised (composed)** | {t * 1e3:.2f} | {t / fb:.2f} | "
                     f"**{t / sgd:.2f}** | **{t / adam:.2f}** | |")
        if "direct" in r:
            d = r["direct"]
            lines.append(
                f"| TEKFAC amortised (direct, {d['steps']} steps × {d['repeats']}) | {d['TEKFAC'] * 1e3:.2f} | "
                f"{d['TEKFAC'] / fb:.2f} | {d['TEKFAC'] / d['SGD']:.2f} (vs SGD {d['SGD'] * 1e3:.2f} ms) | "
                f"{d['TEKFAC'] / d['Adam']:.2f} (vs Adam {d['Adam'] * 1e3:.2f} ms) | |"
            )
        ra = r["ratios"]
        ok_a = ra["amortised_composed/SGD"] <= TARGET_AMORTISED
        ok_s = ra["stats_step/fwd+bwd"] <= TARGET_STATS
        sch = r["schedule"]
        parts = {
            "plain": sch["plain"] * r["rows"]["TEKFAC plain step"]["median_s"],
            "stats": sch["stats"] * r["rows"]["TEKFAC stats step"]["median_s"],
            "refresh": sch["refresh"] * r["rows"]["TEKFAC refresh step"]["median_s"],
        }
        total = sum(parts.values())
        inv = sum(v["inv_mat_mul_s"] for v in r["breakdown"].values())
        floor = fb + inv
        lines += [
            "",
            "Where the amortised time goes (per period of " + str(sch["period"]) + " steps): "
            + ", ".join(f"{k} steps ×{sch[k]}: {100 * v / total:.0f}%" for k, v in parts.items())
            + f".  A plain step cannot be cheaper than fwd+bwd + Σ inv_mat_mul = {floor * 1e3:.2f} ms "
            f"({floor / sgd:.2f}× SGD); it took {r['rows']['TEKFAC plain step']['median_s'] * 1e3:.2f} ms.",
        ]
        lines += [
            "",
            f"Targets: amortised ≤ {TARGET_AMORTISED}× SGD: **{ra['amortised_composed/SGD']:.2f}× "
            f"({'met' if ok_a else 'missed'})**; statistics step ≤ {TARGET_STATS}× fwd+bwd: "
            f"**{ra['stats_step/fwd+bwd']:.2f}× ({'met' if ok_s else 'missed'})**.",
            "",
            "| block | d_out × D | inv_mat_mul ms | eigh δΨ ms | eigh δΦ ms |",
            "|---|---|---:|---:|---:|",
        ]
        for b, v in r["breakdown"].items():
            lines.append(
                f"| {b} | {v['shape'][0]}×{v['shape'][1]} | {v['inv_mat_mul_s'] * 1e3:.2f} | "
                f"{_ms(v['eigh_s']['delta_psi'])} | {_ms(v['eigh_s']['delta_phi'])} |"
            )
        lines += ["", f"Mean max softmax probability of the TEKFAC model at the end: "
                      f"{r['tekfac_model_mean_max_probability']:.2f} (a model whose softmax saturates "
                      "makes the float32 statistics underflow into subnormals, ~10× slower on CPU)."]
        if r["warnings"]:
            lines += ["", "Warnings: " + "; ".join(r["warnings"])]
        lines.append("")
    return "\n".join(lines)


def _ms(t: float | None) -> str:
    return "(in refresh row)" if t is None else f"{t * 1e3:.1f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--direct-models", default=None,
                   help="models also timed by consecutive steps (default: mlp on CPU, all on CUDA)")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per measurement")
    p.add_argument("--refresh-repeats", type=int, default=3)
    p.add_argument("--slow-seconds", type=float, default=20.0,
                   help="refresh steps slower than this are timed once (the warm-up's step 0)")
    p.add_argument("--max-eigh-dim", type=int, default=2048,
                   help="the per-block breakdown times eigh only up to this factor size")
    p.add_argument("--direct-steps", type=int, default=300)
    p.add_argument("--direct-repeats", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-6,
                   help="tiny (the cost of a step does not depend on it), so that the models stay "
                        "near their initialisation and never saturate (see --batches)")
    p.add_argument("--batches", type=int, default=16,
                   help="pool of random batches cycled through; 1 (one fixed batch) lets the model "
                        "memorise it, and the float32 statistics of a saturated softmax underflow "
                        "into subnormals, which are ~10x slower on CPU")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--note", default=None, help="free text stored with the machine description")
    p.add_argument("--out", default=None)
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only re-render the Markdown table of an earlier result file (next to it)")
    args = p.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        md = markdown(res)
        print(md)
        Path(args.render).with_suffix(".md").write_text(md + "\n")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.direct_models is None:
        args.direct_models = models if device.type == "cuda" else ["mlp"]
    else:
        args.direct_models = [m.strip() for m in args.direct_models.split(",") if m.strip()]
    info = machine(device)
    if args.note:
        info["note"] = args.note
    results = []
    for name in models:
        t0 = time.perf_counter()
        results.append(bench_model(name, args, device))
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    info["loadavg_end"] = list(os.getloadavg())
    res = {"machine": info, "targets": {"amortised/SGD": TARGET_AMORTISED, "stats_step/fwd+bwd": TARGET_STATS},
           "models": results}
    md = markdown(res)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
        out.with_suffix(".md").write_text(md + "\n")


if __name__ == "__main__":
    main()
