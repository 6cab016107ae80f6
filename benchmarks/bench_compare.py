"""Cost of the matrix-free comparison against a dense P×P computation of the same metrics.

Two measurements (CPU by default; ``--device cuda`` runs unchanged on a GPU):

1. *Both can run*: the first Linear block (P parameters) of the built-in MLP ``d_in-d_out-C``
   (ReLU; it was a Tanh MLP defined here before 2026-11-30), N examples (exact Fisher, K = N·C).  The matrix-free ``curvlab.compare.measure()`` (Gram matrix of the square root,
   Woodbury, rotated squares; the approximations built in it, as ``curvlab.compare`` builds
   them: ``LayerApproximations``) against the dense route: F = V Vᵀ (P × P), eigvalsh(F), K̂ =
   to_dense(), ‖F − K̂‖_F, diag(Qᵀ F Q), a dense damped solve.  Both give the same numbers
   (checked and reported).
2. *Largest layer that fits*: a Linear layer of about 10⁶ parameters, matrix-free only (its dense
   block would need 8·P² bytes = terabytes).

Usage::

    python benchmarks/bench_compare.py --out benchmarks/results/compare_cpu.json
    python benchmarks/bench_compare.py --device cuda --out benchmarks/results/compare_cuda.json
"""

from __future__ import annotations

import resource
import statistics

import torch
from torch import nn

import common

from curvlab.approx import DEFAULT_DAMPING, approximate  # noqa: E402  (after common: repository on sys.path)
from curvlab.compare import LayerApproximations, measure  # noqa: E402
from curvlab.compare.api import _in_float64  # noqa: E402
from curvlab.extract import extract  # noqa: E402

APPROX = ("kflr", "ekfac", "tkfac", "tekfac")


def median_timed(fn, device, repeats: int) -> tuple[float, list[float], object]:
    """Median seconds of ``repeats`` calls, every call's seconds, and the last call's result."""
    out: list[object] = [None]

    def call() -> None:
        out[0] = fn()

    samples = [common.timed(call, device) for _ in range(repeats)]
    return statistics.median(samples), samples, out[0]


def block_stats(d_in: int, d_out: int, n: int, classes: int, device: torch.device):
    """The statistics of the first layer (block "0") of the built-in MLP d_in-d_out-classes."""
    spec = common.ModelSpec("mlp", "mlp", (d_in,), n, options=(("hidden", (d_out,)),), classes=classes)
    model = spec.build(device)
    x, y = spec.batches(1, device)[0]
    stats = extract(model, nn.CrossEntropyLoss(), x, y, stats=("sqrt", "kfac", "tkfac"))
    return {"0": stats["1"]}  # the built-in MLP starts with a Flatten


def matrix_free(stats, damping: float):
    approx = {"0": LayerApproximations(stats["0"], APPROX)}  # built as curvlab.compare builds them
    return measure(stats, approx, damping=damping, damping_strategies=DEFAULT_DAMPING, num_eigenvalues=256, top_k=10)


def dense(stats, damping: float) -> dict[str, dict[str, float]]:
    # the statistics in float64 first, as the matrix-free route takes them (LayerApproximations):
    # F formed from the float32 root, and the approximations built in float32, differed from it
    # by float32 rounding (~1e-6), which the table then reported as the two routes' difference
    block = _in_float64(stats["0"])
    f = block.dense_fisher()
    evals = torch.linalg.eigvalsh(f)
    g = block.layout.to_vector(block.grad)
    exact_ng = torch.linalg.solve(f + damping * torch.eye(f.shape[0], dtype=f.dtype, device=f.device), g)
    out = {"_spectrum_top": {"value": evals[-1].item()}}
    for a in APPROX:
        approx = approximate(block, a)
        k_hat = approx.to_dense()
        ng = block.layout.to_vector(approx.inv_mat_mul(block.grad, damping, DEFAULT_DAMPING[a]))
        out[a] = {
            "rel_frobenius_error": ((f - k_hat).norm() / f.norm()).item(),
            "trace_ratio": (k_hat.trace() / f.trace()).item(),
            "ng_cosine": torch.nn.functional.cosine_similarity(ng, exact_ng, dim=0).item(),
        }
    return out


def main() -> None:
    p = common.argument_parser(__doc__, threads=None)
    p.add_argument("--repeats", type=common.positive_int, default=3)
    p.add_argument("--small", type=common.int_list(2), default="64,48", help="d_in,d_out of the block both routes run (P = (d_in+1)·d_out)")
    p.add_argument("--large", type=common.int_list(2), default="980,1024", help="d_in,d_out of the largest block (matrix-free only)")
    p.add_argument("--n", type=common.positive_int, default=64)
    p.add_argument("--classes", type=common.positive_int, default=10)
    p.add_argument("--damping", type=common.positive_float, default=1e-3)
    args = p.parse_args()
    device, machine = common.start(args, common.command_line(__file__))
    rows = []

    d_in, d_out = args.small
    stats = block_stats(d_in, d_out, args.n, args.classes, device)
    t_free, free_samples, ds = median_timed(lambda: matrix_free(stats, args.damping), device, args.repeats)
    t_dense, dense_samples, ref = median_timed(lambda: dense(stats, args.damping), device, args.repeats)
    worst = max(abs(ds[m].sel(layer="0", approximation=a).item() - ref[a][m]) / max(abs(ref[a][m]), 1e-12)
                for a in APPROX for m in ("rel_frobenius_error", "trace_ratio", "ng_cosine"))
    rows.append({"case": "both", "P": stats["0"].num_params, "K": stats["0"].sqrt.num_columns,
                 "matrix_free_s": t_free, "dense_s": t_dense, "speedup": t_dense / t_free,
                 "max_rel_difference": worst, "matrix_free_samples_s": free_samples, "dense_samples_s": dense_samples})

    d_in, d_out = args.large
    stats = block_stats(d_in, d_out, args.n, args.classes, device)
    t_free, _, _ = median_timed(lambda: matrix_free(stats, args.damping), device, 1)
    p_large = stats["0"].num_params
    rows.append({"case": "largest", "P": p_large, "K": stats["0"].sqrt.num_columns, "matrix_free_s": t_free,
                 "dense_s": None, "dense_bytes_needed": 8 * p_large**2,
                 "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})

    common.finish(machine)
    lines = [f"# curvlab.compare: matrix-free vs dense ({args.device})", "", common.machine_line(machine), "",
             f"N = {args.n}, C = {args.classes} (exact Fisher, K = N·C), approximations {', '.join(APPROX)}, "
             f"damping {args.damping:g}; medians of {args.repeats} repeats.", ""]
    body = []
    for r in rows:
        dense_s = f"{r['dense_s']:.2f}" if r["dense_s"] is not None else f"— (needs {r['dense_bytes_needed'] / 2**40:.1f} TiB)"
        ratio = f"{r['speedup']:.1f}×" if r.get("speedup") else "—"
        diff = f"{r['max_rel_difference']:.1e}" if "max_rel_difference" in r else "—"
        body.append([r["case"], f"{r['P']:,}", r["K"], f"{r['matrix_free_s']:.2f}", dense_s, ratio, diff])
    lines += common.md_table(["case", "P", "K", "matrix-free (s)", "dense (s)", "dense / matrix-free",
                              "max rel. difference"], body)
    if "max_rss_gib" in rows[-1]:
        lines.append(f"\nPeak resident memory of the whole run: {rows[-1]['max_rss_gib']:.2f} GiB.")
    settings = {k: v for k, v in vars(args).items() if k != "out"}  # (the run's options, recorded with it)
    common.write_results(args.out, {"machine": machine, "settings": settings, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
