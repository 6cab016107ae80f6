"""The statistics step on ResNet-18 (CIFAR stem, BatchNorm): autograd engine, BackPACK engine,
curvlinops — each as a ratio to a plain forward+backward in the same mode, in one run.

A statistics step is what an optimizer's statistics pass computes on top of its forward and
backward pass: the KFAC factors of the MC Fisher (one sampled label) for KFAC, the trace
statistics for TEKFAC.  Rows (``N = 128`` CIFAR-sized inputs, CPU, one torch thread):

* train mode (BatchNorm with batch statistics — BackPACK cannot run it): plain forward+backward;
  ``curvlab.extract`` with the autograd engine (KFAC; TEKFAC's statistics); curvlinops'
  ``KFACLinearOperator`` (``compute_kronecker_factors``; on a copy whose BatchNorms keep no
  running statistics, which it needs in train mode — the same function);
* eval mode: plain forward+backward; the autograd engine; the BackPACK engine (its graph
  converter, ``engine="backpack"``); curvlinops.

Repeats are interleaved (every row once per round), medians reported; the load average of the
machine is recorded per round.  Results: ``benchmarks/results/architectures_cpu.{json,md}``::

    .venv/bin/python benchmarks/bench_architectures.py --out benchmarks/results/architectures_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curvlab.app.models import build_model  # noqa: E402
from curvlab.extract import extract  # noqa: E402

CE = nn.CrossEntropyLoss()


def without_running_stats(model: nn.Module) -> nn.Module:
    """The same train-mode function with BatchNorms that keep no running statistics (curvlinops)."""
    m = copy.deepcopy(model)
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    return m


def rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, str, Callable[[], object]]]:
    """(mode, row name, one call) for every measured pass."""
    from curvlinops import KFACLinearOperator

    def plain(m: nn.Module) -> Callable[[], object]:
        def run() -> None:
            m.zero_grad(set_to_none=True)
            CE(m(x), y).backward()
        return run

    def curvlab_stats(m: nn.Module, engine: str, stats: tuple[str, ...]) -> Callable[[], object]:
        return lambda: extract(m, CE, x, y, engine=engine, stats=stats, fisher="mc", seed=0)

    def curvlinops_kfac(m: nn.Module) -> Callable[[], object]:
        params = [p for mod in m.modules() if isinstance(mod, (nn.Linear, nn.Conv2d)) for p in mod.parameters()]

        def run() -> None:
            op = KFACLinearOperator(m, CE, params, [(x, y)], fisher_type="mc", mc_samples=1, seed=0,
                                    check_deterministic=False)
            op.compute_kronecker_factors()
        return run

    train, evaluation = model, copy.deepcopy(model).eval()
    stateless = without_running_stats(train)
    return [
        ("train", "forward+backward", plain(train)),
        ("train", "autograd engine: KFAC statistics (mc=1)", curvlab_stats(train, "autograd", ("kfac",))),
        ("train", "autograd engine: TEKFAC statistics (δ, δΦ, δΨ; mc=1)", curvlab_stats(train, "autograd", ("tkfac",))),
        ("train", "curvlinops KFAC (mc=1)", curvlinops_kfac(stateless)),
        ("eval", "forward+backward", plain(evaluation)),
        ("eval", "autograd engine: KFAC statistics (mc=1)", curvlab_stats(evaluation, "autograd", ("kfac",))),
        ("eval", "BackPACK engine (graph converter): KFAC statistics (mc=1)", curvlab_stats(evaluation, "backpack", ("kfac",))),
        ("eval", "curvlinops KFAC (mc=1)", curvlinops_kfac(evaluation)),
    ]


def seconds(fn: Callable[[], object]) -> float:
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "backpack": version("backpack-for-pytorch"),
        "curvlinops": version("curvlinops-for-pytorch"),
    }


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# The statistics step on ResNet-18 (CIFAR stem, BatchNorm), CPU",
        "",
        f"N = {result['batch_size']} inputs 3×32×32, {result['num_params']:,} parameters, one torch thread, "
        f"{result['repeats']} interleaved repeats (medians); {m['cpu']} ({m['cpu_count']} cores, shared), "
        f"torch {m['torch']}, BackPACK {m['backpack']}, curvlinops {m['curvlinops']}, {m['date']}.",
        f"Load average (1 min) during the rounds: {', '.join(f'{v:.1f}' for v in result['loadavg_per_round'])} "
        "— the machine was shared with other jobs; ratios within one mode are measured side by side.",
        "",
        "| mode | pass | median s | ratio to forward+backward |",
        "|---|---|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['mode']} | {row['name']} | {row['median_s']:.2f} | {row['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18's first-stage width (64: the real one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10, width=args.width)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,))
    measured = rows(model, x, y)
    for _, _, fn in measured:  # warm-up
        fn()
    times: dict[int, list[float]] = {i: [] for i in range(len(measured))}
    loads = []
    for _ in range(args.repeats):
        for i, (_, _, fn) in enumerate(measured):
            times[i].append(seconds(fn))
        loads.append(os.getloadavg()[0])
    medians = {i: statistics.median(t) for i, t in times.items()}
    base = {mode: medians[i] for i, (mode, name, _) in enumerate(measured) if name == "forward+backward"}
    result = {
        "machine": machine(),
        "batch_size": args.batch_size,
        "width": args.width,
        "num_params": sum(p.numel() for p in model.parameters()),
        "repeats": args.repeats,
        "loadavg_per_round": loads,
        "rows": [
            {"mode": mode, "name": name, "seconds": times[i], "median_s": medians[i], "ratio": medians[i] / base[mode]}
            for i, (mode, name, _) in enumerate(measured)
        ],
    }
    print(markdown(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
