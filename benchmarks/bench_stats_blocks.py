"""How far a statistics step's own computation is from its bare kernels, block by block.

``bench_optim.py`` gives each statistics step a kernels-timed floor: the bare GEMMs of its
statistics on random inputs of every block's shape (the "traces", "rescaling" and "traces,
rescaling" rows).  Where a step misses the 3× target above that floor, is the gap in the
statistics themselves or around them?  This benchmark records, during one real statistics step
of curvlab's optimizer on a model, the inputs of every convolution's statistic —

* TKFAC: the exact partial traces (:func:`curvlab.extract.maths.tkfac_exact`);
* EKFAC: the rescaling (:func:`curvlab.extract.maths.kfe_scaling`, with the optimizer's bases);
* TEKFAC: both (:func:`curvlab.extract.maths.trace_statistics_and_kfe_scaling`) —

and times that call again, interleaved with the block's bare kernels from ``bench_optim.py``
(``traces_fn``, ``rescaling_fn``), one thread, medians of ``--repeats``.  The kernels start from
contiguous ``[N, T, D]`` patches and leave out a truncated basis' complement terms; the real call
from a fresh view of the layer's input each time, so it pays the unfold of the patches where its
route reads them whole — also where, in a step, another statistic would have unfolded them first.

Usage::

    python benchmarks/bench_stats_blocks.py --model resnet18 --out benchmarks/results/stats_blocks_cpu.json
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time

import torch
from torch import nn

import bench_optim
import common
import peers
from curvlab.extract import maths  # noqa: E402  (after common: repository on sys.path)
from curvlab.extract.autograd.layer_io import ConvInputs  # noqa: E402

#: method → the curvlab.extract.maths function whose calls are recorded
RECORDED = {"tkfac": "tkfac_exact", "ekfac": "kfe_scaling", "tekfac": "trace_statistics_and_kfe_scaling"}


def recorded_calls(method: str, spec: common.ModelSpec, device: torch.device) -> list[tuple[tuple, dict]]:
    """The arguments (positional, keyword) of every call of ``RECORDED[method]`` in one statistics step (after a
    warm-up: the bases exist), convolutions only."""
    model = spec.build(device)
    pool = spec.batches(2, device)
    stepper = peers.build(f"curvlab-{method}", model, nn.CrossEntropyLoss(), itertools.cycle(pool).__next__, lr=1e-6)
    stepper.warm_up()
    name = RECORDED[method]
    original = getattr(maths, name)
    calls = []

    def record(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    setattr(maths, name, record)
    try:
        stepper.step_at(stepper.positions["stats"])
    finally:
        setattr(maths, name, original)
    return [(args, kwargs) for args, kwargs in calls if args[1].shape[3] > 1]  # g: [C, N, d_out, T]


def bench_block(method: str, args: tuple, kwargs: dict, repeats: int, device: torch.device) -> dict:
    x, g = args[0], args[1]
    _, n, d_out, t = g.shape
    block = (d_out, x.shape[1], t)
    buffer = bench_optim.random_buffer([block], n, device)
    if method == "ekfac":
        kernel = bench_optim.rescaling_fn([block], n, buffer)
    else:
        kernel = bench_optim.traces_fn([block], n, buffer, pushes=9, rescaling=method == "tekfac")
    function = getattr(maths, RECORDED[method])

    def call() -> None:  # from a fresh view of the layer's input: it unfolds where its route reads the patches
        inputs = ConvInputs(x.block, x.call) if isinstance(x, ConvInputs) else x
        function(inputs, *args[1:], **kwargs)

    real, bare = [], []
    for _ in range(repeats):
        real.append(common.timed(call, device))
        bare.append(common.timed(kernel, device))
    row = {"d_out": d_out, "D": x.shape[1], "T": t, "real_s": statistics.median(real), "kernels_s": statistics.median(bare),
           "real_samples_s": real, "kernels_samples_s": bare}
    if method != "tkfac":
        row["k_out"], row["k_in"] = args[2].shape[1], args[3].shape[1]
    return row


def markdown(res: dict) -> str:
    lines = ["# A statistics step's own computation against its bare kernels, block by block", "",
             common.machine_line(res["machine"]), "",
             f"{res['settings']['model']}: every convolution's statistic recorded in one statistics step and timed "
             f"again, interleaved with its bare kernels (`bench_optim.py`'s rows), medians of "
             f"{res['settings']['repeats']}. Real: from the layer's input, unfolding the patches where the route "
             "reads them; kernels: contiguous patches, a truncated basis' complement left out.", ""]
    for method, rows in res["methods"].items():
        body = [[f"{r['d_out']}×{r['D']}", r["T"], f"{r['k_out']}, {r['k_in']}" if "k_out" in r else "–",
                 f"{r['real_s'] * 1e3:.1f}", f"{r['kernels_s'] * 1e3:.1f}", f"{r['real_s'] / r['kernels_s']:.2f}"]
                for r in rows]
        real, bare = sum(r["real_s"] for r in rows), sum(r["kernels_s"] for r in rows)
        body.append(["**all**", "", "", f"**{real * 1e3:.0f}**", f"**{bare * 1e3:.0f}**", f"**{real / bare:.2f}**"])
        lines += [f"## {method.upper()} ({RECORDED[method]})", "",
                  *common.md_table(["block d_out×D", "T", "basis widths", "real ms", "kernels ms", "real/kernels"], body), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = common.argument_parser(__doc__, repeats=3)
    p.add_argument("--model", default="resnet18", choices=sorted(common.MODELS))
    p.add_argument("--methods", default="tkfac,ekfac,tekfac")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in RECORDED]
    if unknown or not methods:
        p.error(f"argument --methods: {unknown or args.methods!r}; choose from {tuple(RECORDED)}")
    device, info = common.start(args, common.command_line(__file__, argv))
    spec = common.MODELS[args.model]
    res = {"machine": info, "settings": {"model": spec.label, "repeats": args.repeats, "methods": methods}, "methods": {}}
    for method in methods:
        t0 = time.perf_counter()
        calls = recorded_calls(method, spec, device)
        if not calls:
            p.error(f"--model {args.model}: no convolution, nothing to record")
        res["methods"][method] = [bench_block(method, a, kw, args.repeats, device) for a, kw in calls]
        del calls
        print(f"[{method}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        res["machine"] = common.finish(dict(info))
        common.write_results(args.out, res, markdown(res), quiet=True)  # after every method
    print(markdown(res))


if __name__ == "__main__":
    main()
