"""The statistics step on ResNet-18 (CIFAR stem, BatchNorm): autograd engine, BackPACK engine,
curvlinops — each as a ratio to a plain forward+backward in the same mode, in one run.

A statistics step is what an optimizer's statistics pass computes on top of its forward and
backward pass: the KFAC factors of the MC Fisher (one sampled label) for KFAC, the trace
statistics for TEKFAC.  Rows (``common.MODELS["resnet18"]``: ``N = 128`` CIFAR-sized inputs,
CPU, one torch thread by default):

* train mode (BatchNorm with batch statistics — BackPACK cannot run it): plain forward+backward;
  ``curvlab.extract`` with the autograd engine (KFAC; TEKFAC's statistics); curvlinops'
  ``KFACLinearOperator`` (``compute_kronecker_factors``; on a copy whose BatchNorms keep no
  running statistics, which it needs in train mode — the same function);
* eval mode: plain forward+backward; the autograd engine; the BackPACK engine (its graph
  converter, ``engine="backpack"``); curvlinops.

Repeats are interleaved (:func:`common.measure_interleaved`: every row once per round, in a
rotated order), medians reported; the load average of the machine is recorded per round.
Results: ``benchmarks/results/architectures_cpu.{json,md}``::

    .venv/bin/python benchmarks/bench_architectures.py --out benchmarks/results/architectures_cpu.json
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable

import torch
from torch import nn

import common
from common import Row

from curvlab.extract import extract  # noqa: E402  (after common: repository on sys.path)

CE = nn.CrossEntropyLoss()
SPEC = common.MODELS["resnet18"]


def without_running_stats(model: nn.Module) -> nn.Module:
    """The same train-mode function with BatchNorms that keep no running statistics (curvlinops)."""
    m = copy.deepcopy(model)
    for bn in m.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.track_running_stats = False
            bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    return m


def rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, Row]]:
    """(mode, row) for every measured pass."""
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
    measured = [
        ("train", "forward+backward", plain(train)),
        ("train", "autograd engine: KFAC statistics (mc=1)", curvlab_stats(train, "autograd", ("kfac",))),
        ("train", "autograd engine: TEKFAC statistics (δ, δΦ, δΨ; mc=1)", curvlab_stats(train, "autograd", ("tkfac",))),
        ("train", "curvlinops KFAC (mc=1)", curvlinops_kfac(stateless)),
        ("eval", "forward+backward", plain(evaluation)),
        ("eval", "autograd engine: KFAC statistics (mc=1)", curvlab_stats(evaluation, "autograd", ("kfac",))),
        ("eval", "BackPACK engine (graph converter): KFAC statistics (mc=1)", curvlab_stats(evaluation, "backpack", ("kfac",))),
        ("eval", "curvlinops KFAC (mc=1)", curvlinops_kfac(evaluation)),
    ]
    return [(mode, Row(f"{mode}: {name}", fn, name)) for mode, name, fn in measured]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# The statistics step on ResNet-18 (CIFAR stem, BatchNorm), {m['device']}",
        "",
        common.machine_line(m),
        "",
        f"N = {result['batch_size']} inputs 3×32×32, first-stage width {result['width']}, "
        f"{result['num_params']:,} parameters; {result['repeats']} interleaved repeats (medians).",
        f"Load average (1 min) after each round: "
        f"{', '.join(f'{v:.1f}' for v in result['loadavg_per_round']) or 'n/a'} "
        "— ratios within one mode are measured side by side.",
        "",
    ]
    lines += common.md_table(
        ["mode", "pass", "median s", "ratio to forward+backward"],
        [[r["mode"], r["name"], f"{r['median_s']:.2f}", f"{r['ratio']:.2f}"] for r in result["rows"]], "llrr")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = common.argument_parser(__doc__, repeats=3)
    parser.add_argument("--batch-size", type=common.positive_int, default=SPEC.batch)
    parser.add_argument("--width", type=common.positive_int, default=64, help="ResNet-18's first-stage width (64: the real one)")
    args = parser.parse_args(argv)
    device, info = common.start(args, common.command_line(__file__, argv))
    warnings.filterwarnings("ignore")
    spec = dataclasses.replace(SPEC, batch=args.batch_size, options=(*SPEC.options, ("width", args.width)))
    model = spec.build(device)
    (x, y), = spec.batches(1, device)
    measured = rows(model, x, y)
    for _, row in measured:
        row.calibrate(device, 0.0)  # warm-up; one call per measurement
    loads: list[float] = []
    common.measure_interleaved([row for _, row in measured], args.repeats, device,
                               progress=lambda _: loads.extend((common.loadavg() or [])[:1]))
    base = {mode: row.median for mode, row in measured if row.label == "forward+backward"}
    result = {
        "machine": common.finish(info),
        "batch_size": args.batch_size,
        "width": args.width,
        "num_params": sum(p.numel() for p in model.parameters()),
        "repeats": args.repeats,
        "loadavg_per_round": loads,
        "rows": [
            {"mode": mode, "name": row.label, "seconds": row.samples, "median_s": row.median,
             "ratio": row.median / base[mode], "foreign_cores": row.foreign}
            for mode, row in measured
        ],
    }
    common.write_results(args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
