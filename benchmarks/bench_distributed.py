"""Data-parallel curvlab optimizers: communication per step and step time on 1, 2, 4 ranks.

For each world size R the script spawns R processes (``torch.multiprocessing.spawn``; gloo on
CPU, ``--threads`` torch threads each, default one), wraps a benchmark model (``--model``, a key
of ``common.MODELS``; default the MLP 784-128-64-10) in ``DistributedDataParallel`` and gives
every rank ``N/R`` examples of the same global batch (the model's, ``N = 128`` for the MLP;
R = 1: the plain single-process optimizer).  For each method it pins
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

**Time**: each repeat runs every (method, step kind) once in a rotated order
(:func:`common.measure_interleaved` on every rank); a step is timed on rank 0 between two
barriers (so it includes waiting for the slowest rank); medians over repeats.  The machine's
cores are shared: with more ranks than cores (R = 4 on 2 CPUs) the ranks time-share, which the
table states.

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
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import common
from common import Row

from curvlab.optim import OPTIMIZERS  # noqa: E402  (after common: repository on sys.path)

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


def bench_rank(rank: int, world: int, args: argparse.Namespace) -> dict:
    spec = common.MODELS[args.model]
    lo, hi = rank * spec.batch // world, (rank + 1) * spec.batch // world
    batches = [(x[lo:hi], y[lo:hi]) for x, y in spec.batches(4)]
    loss_fn = nn.CrossEntropyLoss()
    out: dict = {"examples_per_rank": hi - lo, "methods": {}}
    rows = []
    for method in args.methods:
        model = spec.build()  # one model per method: the rows do not disturb each other
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
        comm, times = {}, {}
        for kind, k in KINDS.items():
            with CommLog() as log:
                step_at(k)
            comm[kind] = log.summary()
            rows.append(Row(f"{method}:{kind}", lambda step_at=step_at, k=k: step_at(k),
                            max_samples=args.refresh_repeats if kind == "refresh" else None))
            times[kind] = rows[-1].samples  # filled in by the measurement below
        out["methods"][method] = {"comm": comm, "times": times}
    common.measure_interleaved(rows, args.repeats, "cpu", barrier=dist.barrier if world > 1 else None)
    return out


def _rank_main(rank: int, world: int, store: str, args: argparse.Namespace, results: str) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    res = bench_rank(rank, world, args)
    if rank == 0:
        Path(results).write_text(json.dumps(res))
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> dict:
    if args.threads:
        os.environ.update({k: str(args.threads)
                           for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
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

    model = common.MODELS[model_name].build()
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
        common.machine_line(m) + " (The torch threads are per rank.)",
        "",
        f"Model: `{res['model']}` ({first['params']:,} parameters), global batch {res['batch']} split over the ranks, "
        "DDP-wrapped for R > 1; default schedule (statistics and rescaling every 10 steps, refresh every 100).",
        "",
        "## Communication per step and rank (the optimizer's collectives; payload bytes from the tensor sizes)",
        "",
    ]
    body = []
    for method in res["methods"]:
        for kind in KINDS:
            for world in worlds[1:]:
                comm = res["worlds"][str(world)]["methods"][method]["comm"][kind]
                detail = ", ".join(f"{name} ×{v['count']} ({kib(v['bytes'])} KiB)" for name, v in comm["by_collective"].items())
                body.append([method, kind, world, comm["count"], kib(comm["bytes"]), detail or "—"])
    lines += common.md_table(["method", "step", "R", "collectives", "KiB", "by collective"], body, "llrrrl")
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
    ]
    body = []
    for method in res["methods"]:
        for kind in KINDS:
            cells = []
            for world in worlds:
                times = res["worlds"][str(world)]["methods"][method]["times"][kind]
                cells.append(f"{1e3 * statistics.median(times):.1f} (n={len(times)})" if times else "—")
            body.append([method, kind, *cells])
    lines += common.md_table(["method", "step", *(f"R = {w}" for w in worlds)], body, "ll" + "r" * len(worlds))
    lines += ["", res.get("note", "")]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__, repeats=11, device=False)  # CPU ranks (gloo) only
    parser.add_argument("--model", default="mlp", choices=sorted(common.MODELS))
    parser.add_argument("--methods", default="kfac,ekfac,tkfac,tekfac")
    parser.add_argument("--worlds", type=common.int_list(), default="1,2,4")
    parser.add_argument("--refresh-repeats", type=common.positive_int, default=5)
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(OPTIMIZERS))
    if unknown or not args.methods:  # before any rank starts (a KeyError inside each rank otherwise)
        parser.error(f"--methods: unknown {unknown}; choose from {','.join(OPTIMIZERS)}" if unknown
                     else "--methods names no method")
    # the note is printed below the tables, not in the command
    _, info = common.start(args, common.command_line(__file__, argv, hide=("--note",)))
    res = {"machine": info, "model": args.model, "batch": common.MODELS[args.model].batch, "methods": args.methods,
           "worlds": {}, "note": args.note}
    for world in args.worlds:
        print(f"R = {world} ...", flush=True)
        res["worlds"][str(world)] = run_world(world, args)
    common.finish(info)
    common.write_results(args.out, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
