"""Data-parallel curvlab optimizers: communication per step and step time on 1, 2, 4 ranks.

For each world size R the script spawns R processes (``torch.multiprocessing.spawn``; gloo on
CPU, one torch thread each), wraps the benchmark MLP of ``bench_optim.py`` (784-128-64-10) in
``DistributedDataParallel`` and gives every rank ``N/R`` examples of the same global batch of
``N = 128`` (R = 1: the plain single-process optimizer).  For each method it pins
``opt.steps_done`` to each kind of step of the default schedule (statistics every 10 steps,
eigen refresh every 100, rescaling every 10):

* ``plain`` (k = 1): no statistics — the optimizer communicates nothing (DDP averages the
  gradients in its backward);
* ``stats`` (k = 10): statistics (and, for EKFAC/TEKFAC, the KFE rescaling ``s*``) all-reduced;
* ``refresh`` (k = 100): statistics, then the eigen refreshes spread over the ranks and
  broadcast.

**Communication** is counted by wrapping the ``torch.distributed`` functions the optimizer calls
(``all_reduce``, ``all_gather``, ``broadcast``, ``all_gather_object``): per step and rank, the
number of collectives and the bytes of the tensors handed to them (``numel × element size``;
for ``all_gather_object`` the pickled size).  These are payload sizes: a ring ``all_reduce``
moves about ``2 (R−1)/R`` times its payload through each rank's link, a ``broadcast``
``(R−1)/R``.  DDP's own gradient all-reduce (C++, not counted by the wrappers) is listed
separately from the parameter count (float32: 4 bytes per parameter, every step).

**Time**: each repeat runs every (method, step kind) once in a rotated order; a step is timed
on rank 0 between two barriers (so it includes waiting for the slowest rank); medians over
repeats.  The machine's cores are shared: with more ranks than cores (R = 4 on 2 CPUs) the
ranks time-share, which the table states.

Usage::

    python benchmarks/bench_distributed.py --out benchmarks/results/distributed_cpu.json
    # GPUs (one per rank, nccl): launch the same measurement through torchrun instead —
    # see the README's multi-GPU recipe; this script's spawner is for CPU ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, str(path))

from bench_optim import MODELS, machine  # noqa: E402

from curvlab.optim import OPTIMIZERS  # noqa: E402

#: Pinned steps of the default schedule (stats 10, eigen 100, scale 10).
KINDS = {"plain": 1, "stats": 10, "refresh": 100}
COUNTED = ("all_reduce", "all_gather", "broadcast", "all_gather_object")


# --------------------------------------------------------------------------------------------
# Counting the collectives
# --------------------------------------------------------------------------------------------


class CommLog:
    """While active, records ``(collective, payload bytes)`` of every counted call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self._saved: dict[str, Callable] = {}

    def __enter__(self) -> "CommLog":
        for name in COUNTED:
            original = getattr(dist, name)
            self._saved[name] = original
            setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)

    def _wrap(self, name: str, original: Callable) -> Callable:
        def counted(*args, **kwargs):
            if name == "all_gather_object":
                size = len(pickle.dumps(args[1]))
            elif name == "all_gather":
                size = args[1].numel() * args[1].element_size()
            else:
                size = args[0].numel() * args[0].element_size()
            self.calls.append((name, size))
            return original(*args, **kwargs)

        return counted

    def summary(self) -> dict:
        per: dict[str, dict] = {}
        for name, size in self.calls:
            entry = per.setdefault(name, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += size
        return {"count": len(self.calls), "bytes": sum(s for _, s in self.calls), "by_collective": per}


# --------------------------------------------------------------------------------------------
# One rank
# --------------------------------------------------------------------------------------------


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def bench_rank(rank: int, world: int, args: argparse.Namespace) -> dict:
    build, in_shape, n = MODELS[args.model]
    gen = torch.Generator().manual_seed(1)
    lo, hi = rank * n // world, (rank + 1) * n // world
    batches = []
    for _ in range(4):
        x, y = torch.randn(n, *in_shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)
        batches.append((x[lo:hi], y[lo:hi]))
    loss_fn = nn.CrossEntropyLoss()
    out: dict = {"examples_per_rank": hi - lo, "methods": {}}
    steppers = {}
    for method in args.methods:
        torch.manual_seed(0)
        model = build()  # one model per method: the rows do not disturb each other
        out["params"] = sum(p.numel() for p in model.parameters())
        net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        opt = OPTIMIZERS[method](net, lr=1e-3)
        counter = [0]

        def step_at(k: int, opt=opt, net=net, counter=counter) -> None:
            x, y = batches[counter[0] % len(batches)]
            counter[0] += 1
            opt.steps_done = k
            opt.zero_grad(set_to_none=True)
            with opt.track(loss_fn):
                loss_fn(net(x), y).backward()
            opt.step()

        step_at(0)  # warm-up: statistics and the first refresh
        comm = {}
        for kind, k in KINDS.items():
            with CommLog() as log:
                step_at(k)
            comm[kind] = log.summary()
        out["methods"][method] = {"comm": comm, "times": {kind: [] for kind in KINDS}}
        steppers[method] = step_at
    rows = [(m, kind) for m in args.methods for kind in KINDS]
    for repeat in range(args.repeats):
        shift = repeat % len(rows)
        for method, kind in rows[shift:] + rows[:shift]:
            if kind == "refresh" and repeat >= args.refresh_repeats:
                continue
            barrier(world)
            start = time.perf_counter()
            steppers[method](KINDS[kind])
            barrier(world)
            out["methods"][method]["times"][kind].append(time.perf_counter() - start)
    return out


def _rank_main(rank: int, world: int, store: str, args: argparse.Namespace, results: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    res = bench_rank(rank, world, args)
    if rank == 0:
        Path(results).write_text(json.dumps(res))
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> dict:
    os.environ.update({k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    with tempfile.TemporaryDirectory(prefix="curvlab-bench-") as tmp:
        results = os.path.join(tmp, "rank0.json")
        mp.spawn(_rank_main, args=(world, os.path.join(tmp, "store"), args, results), nprocs=world, join=True)
        return json.loads(Path(results).read_text())


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def kib(nbytes: float) -> str:
    return f"{nbytes / 1024:,.1f}"


def refresh_shares(model_name: str, worlds: list[int]) -> dict[int, float]:
    """The busiest rank's share of a refresh's eigendecomposition work under the greedy assignment."""
    from curvlab.block import Block
    from curvlab.optim.assignment import assign_greedy, balance, refresh_cost

    model = MODELS[model_name][0]()
    costs = [refresh_cost(Block.of_layer(name, m)[0].layout) for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]
    return {w: max(balance(costs, assign_greedy(costs, w), w).values()) / sum(costs) for w in worlds}


def markdown(res: dict) -> str:
    m = res["machine"]
    worlds = [int(w) for w in res["worlds"]]
    first = res["worlds"][str(worlds[0])]
    lines = [
        "# curvlab.optim data-parallel: communication and step time (cpu, gloo)",
        "",
        f"{m['date']}; {m['cpu']}; {m['cpus']} CPUs, one torch thread per rank; torch {m['torch']}; "
        f"load average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end.",
        "",
        f"Model: `{res['model']}` ({first['params']:,} parameters), global batch {res['batch']} split over the ranks, "
        "DDP-wrapped for R > 1; default schedule (statistics and rescaling every 10 steps, refresh every 100). "
        f"Command: `{res['command']}`.",
        "",
        "## Communication per step and rank (the optimizer's collectives; payload bytes from the tensor sizes)",
        "",
        "| method | step | R | collectives | KiB | by collective |",
        "|---|---|---:|---:|---:|---|",
    ]
    for method in res["methods"]:
        for kind in KINDS:
            for world in worlds[1:]:
                comm = res["worlds"][str(world)]["methods"][method]["comm"][kind]
                detail = ", ".join(f"{name} ×{v['count']} ({kib(v['bytes'])} KiB)" for name, v in comm["by_collective"].items())
                lines.append(f"| {method} | {kind} | {world} | {comm['count']} | {kib(comm['bytes'])} | {detail or '—'} |")
    grad = first["params"] * 4
    lines += [
        "",
        f"DDP's gradient all-reduce (not counted above): {kib(grad)} KiB payload every step, all methods.",
        "",
        "Refresh work (`d_out³ + D³` per block, `curvlab.optim.assignment`) on the busiest rank: "
        + ", ".join(f"R = {w}: {100 * share:.1f} %" for w, share in refresh_shares(res["model"], worlds[1:]).items())
        + " of the total (the blocks cannot be split, so the largest one bounds a refresh).",
        "",
        "## Step time (rank 0, between barriers; median ms over repeats)",
        "",
        "| method | step | " + " | ".join(f"R = {w}" for w in worlds) + " |",
        "|---|---|" + "---:|" * len(worlds),
    ]
    for method in res["methods"]:
        for kind in KINDS:
            cells = []
            for world in worlds:
                times = res["worlds"][str(world)]["methods"][method]["times"][kind]
                cells.append(f"{1e3 * statistics.median(times):.1f} (n={len(times)})" if times else "—")
            lines.append(f"| {method} | {kind} | " + " | ".join(cells) + " |")
    lines += ["", res.get("note", "")]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=sorted(MODELS))
    parser.add_argument("--methods", default="kfac,ekfac,tkfac,tekfac")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--refresh-repeats", type=int, default=5)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed_cpu.json")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    info = machine(torch.device("cpu"))
    info["threads"] = 1
    given = list(argv if argv is not None else sys.argv[1:])
    if "--note" in given:  # the note is printed below the tables, not in the command
        i = given.index("--note")
        given[i + 1] = "..."
    res = {"machine": info, "model": args.model, "batch": MODELS[args.model][2], "methods": args.methods,
           "command": "python benchmarks/bench_distributed.py " + " ".join(given), "worlds": {}, "note": args.note}
    for world in (int(w) for w in args.worlds.split(",")):
        print(f"R = {world} ...", flush=True)
        res["worlds"][str(world)] = run_world(world, args)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    text = markdown(res)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
