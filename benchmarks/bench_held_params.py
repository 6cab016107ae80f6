"""The exact blocks of parameters held by the model's own class — vit-tiny's cls token and
position embedding — by the model run on one example at a time, against the generic route.

``curvlab.extract`` (autograd engine, exact Fisher) of ``vit-tiny`` on ``N`` CIFAR-shaped random
inputs: the whole extraction with the per-example reruns (:mod:`curvlab.extract.autograd.reruns`)
and with the generic route (one vjp per root column and example through the batch's graph; the
benchmark turns the reruns off, as before they existed), interleaved repeats, one torch thread;
both blocks' largest relative difference between the routes.  Results:
``benchmarks/results/held_params_cpu.md``::

    .venv/bin/python benchmarks/bench_held_params.py --n 16 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

import common  # noqa: F401  (puts the repository on sys.path)

import curvlab
import curvlab.extract.autograd.recording as recording
from curvlab.app.models import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=16, help="examples in the batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("vit-tiny", (3, 32, 32), 10).eval()
    x, y = torch.randn(args.n, 3, 32, 32), torch.randint(0, 10, (args.n,))
    ce = nn.CrossEntropyLoss()
    rerun = recording.Recording._rerun
    routes = {"reruns": rerun, "generic": lambda *a, **k: None}
    times: dict[str, list[float]] = {k: [] for k in routes}
    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for r in range(args.repeats):
        for name in (list(routes) if r % 2 == 0 else list(routes)[::-1]):
            recording.Recording._rerun = routes[name]
            start = time.perf_counter()
            stats = curvlab.extract(model, ce, x, y, engine="autograd")
            times[name].append(time.perf_counter() - start)
            blocks[name] = {b: stats[b].dense_fisher() for b in ("cls_token", "pos_embed")}
    recording.Recording._rerun = rerun
    diff = max(((blocks["reruns"][b] - blocks["generic"][b]).norm() / blocks["generic"][b].norm()).item()
               for b in blocks["generic"])
    load = os.getloadavg()[0]
    print(f"vit-tiny, N = {args.n}, exact Fisher, {args.threads} thread(s), load average {load:.2f}, torch {torch.__version__}")
    print("| route | median s | repeats |")
    print("|---|---:|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} | {', '.join(f'{t:.1f}' for t in ts)} |")
    print(f"generic / reruns: {statistics.median(times['generic']) / statistics.median(times['reruns']):.1f}×; "
          f"largest relative difference of the two blocks: {diff:.1e}")


if __name__ == "__main__":
    main()
