"""The optimizers' plain step with the matrices their damped inverses multiply by kept with rows
4 KiB apart, and padded.

``curvlab.approx.inverse.repeated_operand`` keeps a dense damped factor inverse (KFAC, TKFAC; and
each block of it a biased layer's update multiplies by) and ``repeated_basis`` a full eigenbasis
(EKFAC, TEKFAC) with their rows 16 elements further apart on the CPU where they are a multiple of
``ALIASED_ROW`` (1024) elements long: MKL's GEMM reads rows 4 KiB apart through the same cache
sets.  Here two copies of the same model and optimizer, one built
with the padding and one without (``ALIASED_ROW`` set out of reach while its inverses are
built), take ``opt.step()`` on the same gradients, interleaved, one torch thread; medians.

Usage::

    python benchmarks/bench_padded_rows.py --out benchmarks/results/padded_rows_cpu.json
"""

from __future__ import annotations

import time

import torch
from torch import nn

import common
import curvlab.approx.inverse as inverse_module
from curvlab.optim import EKFAC, KFAC, TEKFAC, TKFAC

#: (input widths of a Linear stack, bias): 1024 and 2048 wide inputs, and the MLP's 785-wide
#: block, whose rows are no such multiple (a 2049-wide factor is above truncate_above: spectral)
MODELS = [((1024, 64, 10), True), ((1024, 64, 10), False), ((2048, 128, 10), False), ((784, 128, 10), True)]


def optimizer(cls: type, widths: tuple[int, ...], bias: bool, padded: bool, n: int) -> KFAC:
    """A refreshed optimizer of ``cls`` on a Linear/ReLU stack, with gradients of one batch."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    model, loss_fn = nn.Sequential(*layers[:-1]), nn.CrossEntropyLoss()
    opt = cls(model, lr=1e-6, damping=1e-2, stats_interval=10, eigen_interval=100)
    x, y = torch.randn(n, widths[0]), torch.randint(0, widths[-1], (n,))
    kept = inverse_module.ALIASED_ROW
    inverse_module.ALIASED_ROW = kept if padded else 2**62
    try:
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
        opt.step()  # statistics and refresh: the inverses are built here
    finally:
        inverse_module.ALIASED_ROW = kept
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    return opt


def main(argv: list[str] | None = None) -> None:
    p = common.argument_parser(__doc__, device=False)
    p.add_argument("--steps", type=common.positive_int, default=301, help="interleaved plain steps of each")
    p.add_argument("--batch-size", type=common.positive_int, default=256)
    args = p.parse_args(argv)
    _, info = common.start(args, common.command_line(__file__, argv))
    rows = []
    for cls in (KFAC, TKFAC, EKFAC, TEKFAC):
        for widths, bias in MODELS:
            opts = {"contiguous": optimizer(cls, widths, bias, False, args.batch_size),
                    "padded": optimizer(cls, widths, bias, True, args.batch_size)}
            samples: dict[str, list[float]] = {k: [] for k in opts}
            for _ in range(args.steps):
                for key, opt in opts.items():
                    opt.steps_done = 1  # a plain step every time
                    t = time.perf_counter()
                    opt.step()
                    samples[key].append(time.perf_counter() - t)
            med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in samples.items()}
            rows.append({"optimizer": cls.__name__, "widths": list(widths), "bias": bias, **med,
                         "ratio": med["padded"] / med["contiguous"]})
    res = {"machine": common.finish(info), "settings": vars(args), "rows": rows}
    lines = ["# The rows of a damped inverse's matrices padded (cpu)", "", common.machine_line(res["machine"]), "",
             f"`opt.step()` of a plain step, medians of {args.steps} interleaved steps, batch {args.batch_size}, "
             "one torch thread.", "",
             "| optimizer | Linear widths | bias | contiguous ms | padded ms | padded / contiguous |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['optimizer']} | {'-'.join(map(str, r['widths']))} | {'yes' if r['bias'] else 'no'} | "
              f"{r['contiguous']:.3f} | {r['padded']:.3f} | {r['ratio']:.3f} |" for r in rows]
    common.write_results(args.out, res, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
