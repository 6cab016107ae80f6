"""The square root of a layer at ``T`` locations: kept unfolded (``UnfoldedSqrt``) against every
``M_k`` explicit (``DenseSqrt``), on the blocks ``curvlab report`` measures.

For a convolution (or a Linear over tokens) ``M_{c,n} = Σ_t g_{c,n,t} ā_{n,t}ᵀ``.  The extraction
keeps the unfolded inputs and the roots where :func:`curvlab.sqrt.unfolded_is_cheaper` says so;
this script takes such roots from a real extraction (the exact Fisher of N random CIFAR-shaped
inputs, float64, K = 10·N columns, as the report measures them), forms the same root densely, and
times what the comparison does with a root: its Gram matrix (once per layer) and a rotation into
a Kronecker eigenbasis (``rotated_sq_sum``, three per layer: KFAC's, KFLR's and TKFAC's bases;
here the eigenbasis of the layer's KFAC factors).  Medians of interleaved calls, and the agreement of
the two back-ends.

Usage::

    python benchmarks/bench_sqrt.py --out benchmarks/results/sqrt_cpu.json
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import common

from curvlab.extract import extract  # noqa: E402  (after common: repository on sys.path)
from curvlab.sqrt import DenseSqrt, UnfoldedSqrt  # noqa: E402

#: (model, N, layers): the report's default batch.
CASES = (("resnet18", 9, ("layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2")),
         ("vit-tiny", 20, ("blocks.1.attn.qkv", "blocks.1.mlp.0")))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def bench_layer(model: str, name: str, stats, repeats: int) -> dict:
    if not isinstance(stats.sqrt, UnfoldedSqrt):
        raise SystemExit(f"{model} {name}: the extraction kept a {type(stats.sqrt).__name__}, not an UnfoldedSqrt")
    unfolded = stats.sqrt.to(dtype=torch.float64)
    dense = DenseSqrt(unfolded.matrices())
    factors = stats.kfac[stats.flavour]
    u_out = torch.linalg.eigh(factors.G.to(torch.float64))[1]
    u_in = torch.linalg.eigh(factors.A.to(torch.float64))[1]
    row = {"model": model, "layer": name, "shape": list(unfolded.shape),
           "locations": int(unfolded.a.shape[2]),
           "columns": unfolded.num_columns,
           "unfolded_bytes": sum(t.numel() * t.element_size() for t in (unfolded.a, unfolded.g)),
           "dense_bytes": dense.m.numel() * dense.m.element_size()}
    outputs: dict[str, torch.Tensor] = {}
    for op, call in (("gram", lambda r: r.gram()), ("rotation", lambda r: r.rotated_sq_sum(u_out, u_in))):
        times: dict[str, list[float]] = {"unfolded": [], "dense": []}
        for _ in range(repeats):  # interleaved
            for backend, root in (("unfolded", unfolded), ("dense", dense)):
                seconds, out = timed(lambda: call(root))
                times[backend].append(seconds)
                outputs[backend] = out
        for backend, ts in times.items():
            row[f"{op}_{backend}_s"] = statistics.median(ts)
            row[f"{op}_{backend}_samples_s"] = ts
        row[f"{op}_agreement"] = rel(outputs["unfolded"], outputs["dense"])
    return row


def markdown(res: dict) -> str:
    lines = [f"# Square roots at T locations: unfolded against dense ({res['machine']['device']})", "",
             common.machine_line(res["machine"]), "",
             "The exact Fisher's root of N random CIFAR-shaped inputs (the report's default N), float64, "
             f"K = 10·N columns; medians of {res['repeats']} interleaved calls per back-end; the rotation is "
             "`rotated_sq_sum` into the eigenbasis of the layer's KFAC factors; agreement: relative "
             "Frobenius difference of the two results.", ""]
    body = [[r["model"], r["layer"], f"{r['shape'][0]}×{r['shape'][1]}", r["locations"], r["columns"],
             f"{r['dense_bytes'] / 2**20:.0f}", f"{r['unfolded_bytes'] / 2**20:.1f}",
             f"{r['gram_dense_s']:.2f}", f"{r['gram_unfolded_s']:.3f}", f"{r['gram_agreement']:.1e}",
             f"{r['rotation_dense_s']:.2f}", f"{r['rotation_unfolded_s']:.3f}",
             f"{r['rotation_dense_s'] / r['rotation_unfolded_s']:.0f}×", f"{r['rotation_agreement']:.1e}"]
            for r in res["layers"]]
    lines += common.md_table(["model", "layer", "d_out×D", "T", "K", "dense MiB", "unfolded MiB", "Gram dense s",
                              "Gram unfolded s", "agreement", "rotation dense s", "rotation unfolded s", "speed-up",
                              "agreement"], body)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = common.argument_parser(__doc__, threads=0, repeats=3, device=False)
    args = p.parse_args(argv)
    _, info = common.start(args, common.command_line(__file__, argv))
    layers = []
    for model_name, n, names in CASES:
        spec = common.ModelSpec(model_name, model_name, (3, 32, 32), n)
        model = spec.build().eval()
        (x, y), = spec.batches(1)
        stats = extract(model, nn.CrossEntropyLoss(), x, y, fisher="exact", stats=("sqrt", "kfac"),
                        skip_unsupported=True)
        for name in names:
            layers.append(bench_layer(model_name, name, stats[name], args.repeats))
            print(f"  {model_name} {name}: done", flush=True)
        del stats
    res = {"machine": common.finish(info), "repeats": args.repeats, "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "layers": layers}
    common.write_results(args.out, res, markdown(res))


if __name__ == "__main__":
    main()
