"""Where each kind of optimizer step spends its time on a device: ``torch.profiler`` over a few
steps of every peer, one kind of step at a time, so that a short GPU session leaves what the
sessions without one need to cut a step's launches, syncs and kernels.

For every model, peer (the :mod:`peers` steppers of ``bench_optim.py``, the same schedule and
damping) and kind of step (plain, statistics, refresh; first-order peers: plain), per step:

* wall time, unprofiled (median of ``--steps`` synchronised steps) and under the profiler;
* on a GPU, the time its kernels keep the device busy (the union of their intervals) and how
  many kernels it launches (memory copies and sets included) — a step whose busy time is well below its wall time is bound by the
  host (Python, launches, syncs), not by the device;
* top-level aten ops (those no other aten op called: what the Python issues) and host reads of
  device values (``aten::_local_scalar_dense``, ``aten::nonzero``: each one waits for the device
  to finish everything queued before it), and on a GPU the copies from the host onto it (a tensor
  made from Python numbers on the device: from pageable memory, each waits for the device too);
* the peak of the device's allocated memory over the peer's steps (GPU);
* the ops with the most self time on the device (GPU: kernels) or the host (CPU: aten ops).

On the CPU the profiler's tables overstate copies and fresh allocations (large temporaries fault
in afresh under it; ``benchmarks/README.md``): use its op counts and host reads there, and time
with ``bench_optim.py``.
With ``--as-on-gpu`` the CPU takes the routes a GPU takes (:func:`curvlab.device_routes.plain_routes`:
no MKL, no CPU-tuned layouts or loops), so that its op counts and host reads are those a GPU's
step issues (its times are not a GPU's, nor the CPU's best).

Usage::

    python benchmarks/profile_steps.py --device cuda --models resnet18,mlp \\
        --out benchmarks/results/profile_cuda.json
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import common
import peers
from curvlab import device_routes

#: aten ops that read a device value on the host (a sync on a GPU)
HOST_READS = ("aten::_local_scalar_dense", "aten::nonzero")
#: peers profiled by default: SGD for reference, curvlab's four, ASDL's K-FAC (the fastest peer)
DEFAULT_PEERS = ("sgd", "curvlab-kfac", "curvlab-tkfac", "curvlab-ekfac", "curvlab-tekfac", "asdl-kfac")


def step_counts(text: str) -> dict[str, int]:
    """``plain=10,stats=3,refresh=1`` → steps profiled per kind (every kind named, each ≥ 1)."""
    counts = {"plain": 10, "stats": 3, "refresh": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, value = part.partition("=")
        if kind not in counts or not value.isdigit() or int(value) < 1:
            raise ValueError(f"{part!r}: expected kind=count with kind in {tuple(counts)} and count >= 1")
        counts[kind] = int(value)
    return counts


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (µs)."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def _top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def profile_kind(run, device: torch.device, steps: int, top: int) -> dict:
    """Profile ``steps`` calls of ``run`` (one step each) after one unprofiled call."""
    run()
    wall = statistics.median(common.timed(run, device) for _ in range(steps))
    cuda = device.type == "cuda"
    common.sync(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for _ in range(steps):
            run()
        common.sync(device)
    profiled = (time.perf_counter() - start) / steps
    events = prof.events()
    on_device = [e for e in events if e.device_type == DeviceType.CUDA]
    aten = [e for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")]
    averages = prof.key_averages()

    def ranked(rows, time_of) -> list[dict]:
        rows = sorted((a for a in rows if time_of(a) > 0), key=lambda a: -time_of(a))
        return [{"name": a.key, "calls": a.count / steps, "ms": time_of(a) / steps / 1e3} for a in rows[:top]]

    # an aten op's self time on the device: that of the kernels it launched itself
    self_time = (lambda a: a.self_device_time_total) if cuda else (lambda a: a.self_cpu_time_total)
    top_ops = ranked([a for a in averages if a.key.startswith("aten::")], self_time)
    top_kernels = ranked([a for a in averages if a.device_type == DeviceType.CUDA], lambda a: a.self_device_time_total)
    return {
        "steps": steps,
        "wall_ms": wall * 1e3,
        "profiled_ms": profiled * 1e3,
        "device_busy_ms": _busy_us([(e.time_range.start, e.time_range.end) for e in on_device]) / steps / 1e3 if cuda else None,
        "kernels": len(on_device) / steps if cuda else None,
        "host_copies": sum("HtoD" in e.name for e in on_device) / steps if cuda else None,
        "aten_ops": sum(map(_top_level, aten)) / steps,
        "host_reads": sum(e.name in HOST_READS for e in aten) / steps,
        "top": top_ops,
        "top_kernels": top_kernels if cuda else None,
    }


def profile_peer(stepper: peers.Stepper, args, device: torch.device) -> dict:
    """Every kind of step ``stepper`` takes, profiled after its warm-up."""
    stepper.warm_up()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kinds = {kind: position for kind, position in stepper.positions.items()
             if stepper.kind(position) == kind}  # first-order peers: plain only
    rows = {kind: profile_kind(lambda k=k: stepper.step_at(k), device, args.steps[kind], args.top)
            for kind, k in kinds.items()}
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"kinds": rows, "peak_allocated_mib": peak}


def profile_model(spec: common.ModelSpec, args, device: torch.device, deadline: float, result: dict,
                  save: Callable[[], None]) -> None:
    """Fill ``result`` peer by peer, calling ``save`` after each (a stopped or failing run keeps
    what it measured; a peer that fails is recorded with its error)."""
    base = spec.build(device)
    pool = spec.batches(4, device)
    loss_fn = nn.CrossEntropyLoss()
    options = dict(damping=args.damping, stats_interval=args.stats_interval, refresh_interval=args.refresh_interval)
    result.update(model=spec.label, peers={}, left_out=[], failed={})
    for name in args.peers:
        if time.perf_counter() > deadline:
            result["left_out"].append(name)
            continue
        t0 = time.perf_counter()
        try:
            stepper = peers.build(name, copy.deepcopy(base), loss_fn, itertools.cycle(pool).__next__, lr=1e-6, **options)
            result["peers"][name] = profile_peer(stepper, args, device)
        except Exception as err:  # e.g. out of memory: the other peers still run
            result["failed"][name] = f"{type(err).__name__}: {err}"[:300]
        stepper = None  # before the next peer's: the peak memory is each peer's own
        print(f"  [{spec.key}] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        save()


def markdown(res: dict) -> str:
    m, s = res["machine"], res["settings"]
    lines = [f"# Where an optimizer step spends its time ({m['device']})", "", common.machine_line(m), "",
             f"`torch.profiler` over {s['steps']['plain']} plain, {s['steps']['stats']} statistics and "
             f"{s['steps']['refresh']} refresh steps (after one unprofiled step of each kind); statistics "
             f"every {s['stats_interval']} steps, refresh every {s['refresh_interval']}, damping {s['damping']}. "
             "\"Busy\": the union of the step's kernel intervals on the device; \"ops\": top-level aten "
             "ops (what the Python issues); \"reads\": host reads of device values (`_local_scalar_dense`, "
             "`nonzero`), each a sync on a GPU; \"H→D\": copies from the host onto the GPU (from pageable "
             "memory, as a tensor made from Python numbers, each waits for the device). \"Wall\": unprofiled, "
             "median; \"busy/wall\" well below 100 % "
             "is a step bound by the host (the profiler slows the host, not the kernels).", ""]
    if s.get("as_on_gpu"):
        lines += ["**A GPU's routes, taken on the CPU** (`--as-on-gpu`): the ops and host reads are those a "
                  "GPU's step issues; the times are neither a GPU's nor the CPU's best.", ""]
    ms = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for model in res["models"]:
        lines += [f"## {model['model']}", ""]
        body = []
        for name, p in model["peers"].items():
            for kind, r in p["kinds"].items():
                busy = r["device_busy_ms"]
                body.append([name, kind, ms(r["wall_ms"]), ms(r["profiled_ms"]), ms(busy),
                             "–" if busy is None else f"{100 * busy / r['wall_ms']:.0f} %",
                             "–" if r["kernels"] is None else f"{r['kernels']:.0f}", f"{r['aten_ops']:.0f}",
                             f"{r['host_reads']:.0f}",
                             "–" if r.get("host_copies") is None else f"{r['host_copies']:.0f}",
                             "–" if p["peak_allocated_mib"] is None else f"{p['peak_allocated_mib']:.0f}"])
        lines += common.md_table(["peer", "step", "wall ms", "profiled ms", "busy ms", "busy/wall", "kernels",
                                  "ops", "reads", "H→D", "peak MiB"], body, "ll" + "r" * 9)
        if model["left_out"]:
            lines += ["", f"Left out (the time budget ran out): {', '.join(model['left_out'])}."]
        if model.get("failed"):
            lines += ["", *(f"- {name} failed: {error}" for name, error in model["failed"].items())]
        lines += ["", "The aten ops with the most self time per step (" + (
            "on the device: the kernels each launched itself" if m["device"].startswith("cuda") else
            "on the host; overstated for copies on the CPU") + "):", ""]
        for name, p in model["peers"].items():
            for kind, r in p["kinds"].items():
                ops = "; ".join(f"`{o['name'][:60]}` ×{o['calls']:.0f} {o['ms']:.2f} ms" for o in r["top"])
                lines.append(f"- {name}, {kind}: {ops}")
        kernels = [(name, kind, r["top_kernels"]) for name, p in model["peers"].items()
                   for kind, r in p["kinds"].items() if r.get("top_kernels")]
        if kernels:
            lines += ["", "The kernels with the most time per step:", ""]
            lines += [f"- {name}, {kind}: " + "; ".join(f"`{o['name'][:90]}` ×{o['calls']:.0f} {o['ms']:.2f} ms" for o in top)
                      for name, kind, top in kernels]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = common.argument_parser(__doc__, threads=1)
    p.add_argument("--models", default="resnet18,mlp")
    p.add_argument("--peers", default=",".join(DEFAULT_PEERS))
    p.add_argument("--steps", default="plain=10,stats=3,refresh=1", help="steps profiled per kind")
    p.add_argument("--top", type=common.positive_int, default=8, help="ops listed per step")
    p.add_argument("--budget", type=common.positive_float, default=float("inf"),
                   help="seconds: peers that would start later are left out (and listed)")
    p.add_argument("--stats-interval", type=common.positive_int, default=10)
    p.add_argument("--refresh-interval", type=common.positive_int, default=100)
    p.add_argument("--damping", type=common.positive_float, default=1e-2)
    p.add_argument("--batch-size", type=common.positive_int, default=None, help="override every model's batch size")
    p.add_argument("--as-on-gpu", action="store_true",
                   help="on the CPU, take a GPU's routes: the ops and host reads a GPU's step issues")
    args = p.parse_args(argv)
    try:
        args.steps = step_counts(args.steps)
    except ValueError as err:
        p.error(f"argument --steps: {err}")
    args.peers = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in args.peers if n not in peers.PEERS]
    if unknown:
        p.error(f"argument --peers: unknown {unknown}; choose from {peers.PEERS}")
    models = common.models(args.models)
    device, info = common.start(args, common.command_line(__file__, argv))
    if args.as_on_gpu and device.type != "cpu":
        p.error(f"argument --as-on-gpu: for the CPU (--device {device.type} takes its own routes)")
    if any(n.startswith("asdl") for n in args.peers):
        try:
            peers.import_asdl()
        except ImportError as err:
            print(f"profile_steps: {err}; running without the ASDL peers", file=sys.stderr)
            args.peers = [n for n in args.peers if not n.startswith("asdl")]
    deadline = time.perf_counter() + args.budget
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    results: list[dict] = []

    def result() -> dict:
        return {"machine": common.finish(dict(info)), "settings": settings, "models": results}

    def save() -> None:
        res = result()
        common.write_results(args.out, res, markdown(res), quiet=True)

    with device_routes.plain_routes() if args.as_on_gpu else contextlib.nullcontext():
        for spec in models:
            if args.batch_size:
                spec = dataclasses.replace(spec, batch=args.batch_size)
            results.append({})
            profile_model(spec, args, device, deadline, results[-1], save)
    res = result()
    print(markdown(res))


if __name__ == "__main__":
    main()
