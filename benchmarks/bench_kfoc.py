"""KFOC's fit on vit-tiny's blocks: Lanczos against alternating power iteration, and the
sandwich products against a batched einsum.

``curvlab.approx.KFOC.fit`` finds the top singular pair of the rearranged block ``R(F)`` with
two sandwich products a step (``Σ_k M_k C M_kᵀ`` and ``Σ_k M_kᵀ B M_k``, float64).  On one block
of the built-in ``vit-tiny`` (its patch embedding, the four Linear layers of transformer block 1,
the head; the exact Fisher of N random CIFAR-shaped inputs, K = 10·N columns, as ``curvlab
report`` measures it), in one process, one thread:

* ``sandwiches``: curvlab's ``DenseSqrt.sandwich_out`` + ``sandwich_in`` (one GEMM over the
  chunk's rows, upper triangle only for a symmetric argument) against the batched einsum they
  replaced (``einsum("kod,de,kpe->op")``, ``einsum("kod,op,kpe->de")``), medians of interleaved
  repeats, and their agreement;
* ``fit``: ``KFOC.fit`` from the KFAC factor (``from_stats``' start) against alternating power
  iteration from the same start with curvlab's sandwiches and the stopping rule curvlab used
  before (``‖ĉ_new − ĉ_old‖_F ≤ 1e-12``): steps, seconds, and the agreement of the two ``C``.

Usage::

    python benchmarks/bench_kfoc.py --out benchmarks/results/kfoc_cpu.json
"""

from __future__ import annotations

import time

import torch
from torch import nn

import common
from common import Row

from curvlab.approx import KFOC  # noqa: E402  (after common: repository on sys.path)
from curvlab.approx.eigh import symmetrize  # noqa: E402
from curvlab.extract import extract  # noqa: E402

LAYERS = ("patch_embed", "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.0", "blocks.1.mlp.2", "head")
POWER_TOL = 1e-12


def einsum_sandwiches(m: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.einsum("kod,de,kpe->op", m, c, m), torch.einsum("kod,op,kpe->de", m, b, m)


def power_iteration(sqrt, start: torch.Tensor, max_iter: int = 2000) -> tuple[torch.Tensor, int]:
    """Alternating power iteration ``B ← R c``, ``c ← Rᵀ B`` (normalised), as KFOC.fit ran it
    before: the unit-norm ``C`` and the steps."""
    c = start / torch.linalg.matrix_norm(start)
    for step in range(1, max_iter + 1):
        b = sqrt.sandwich_out(c)
        c_new = symmetrize(sqrt.sandwich_in(b / torch.linalg.matrix_norm(b)))
        c_new = c_new / torch.linalg.matrix_norm(c_new)
        change = float(torch.linalg.matrix_norm(c_new - c))
        c = c_new
        if change <= POWER_TOL:
            break
    return c, step


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def bench_layer(name: str, stats, repeats: int) -> dict:
    sqrt = stats.sqrt.to(dtype=torch.float64)
    m = sqrt.matrices()
    d_out, d_in = sqrt.shape
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(d_out, d_out, generator=gen, dtype=torch.float64)
    c = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)
    b, c = symmetrize(b @ b.T), symmetrize(c @ c.T)  # PSD, exactly symmetric: KFOC's iterates
    ours = (sqrt.sandwich_out(c), sqrt.sandwich_in(b))
    theirs = einsum_sandwiches(m, b, c)
    rows = [Row("curvlab", lambda: (sqrt.sandwich_out(c), sqrt.sandwich_in(b))),
            Row("einsum", lambda: einsum_sandwiches(m, b, c))]
    for row in rows:
        row.calibrate("cpu", 0.0)
    common.measure_interleaved(rows, repeats, "cpu")

    start = symmetrize(stats.kfac[stats.flavour].A.to(torch.float64))
    t0 = time.perf_counter()
    fit = KFOC.fit(sqrt, init=start, layout=stats.layout)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    c_power, power_steps = power_iteration(sqrt, symmetrize(start))
    t_power = time.perf_counter() - t0
    return {
        "layer": name, "shape": [d_out, d_in], "columns": sqrt.num_columns,
        "sandwiches_s": rows[0].median, "einsum_s": rows[1].median,
        "sandwiches_samples_s": rows[0].samples, "einsum_samples_s": rows[1].samples,
        "sandwich_agreement": max(rel(x, y) for x, y in zip(ours, theirs)),
        "fit_steps": fit.iterations, "fit_s": t_fit, "fit_residual": fit.residual, "converged": fit.converged,
        "power_steps": power_steps, "power_s": t_power,
        "agreement_with_power": rel(fit.C / torch.linalg.matrix_norm(fit.C), c_power),
    }


def markdown(res: dict) -> str:
    s = res["settings"]
    lines = [f"# KFOC's fit on vit-tiny's blocks ({res['machine']['device']})", "", common.machine_line(res["machine"]), "",
             f"`vit-tiny` (CIFAR-shaped input), the exact Fisher of N = {s['n']} random inputs (K = {s['k']} columns); "
             f"float64. Sandwiches: `sandwich_out` + `sandwich_in` once each, medians of {s['repeats']} interleaved "
             "repeats; agreement: the larger relative Frobenius difference of the two products. Fit: one run each "
             "from the KFAC factor; power iteration stops when ‖ĉ_new − ĉ_old‖_F ≤ 1e-12 (curvlab's rule before "
             "Lanczos), KFOC.fit when its relative residual ≤ 1e-12; agreement: ‖ĉ − ĉ_power‖_F.", ""]
    body = [[r["layer"], f"{r['shape'][0]}×{r['shape'][1]}", f"{r['einsum_s']:.3f}", f"{r['sandwiches_s']:.3f}",
             f"{r['einsum_s'] / r['sandwiches_s']:.2f}×", f"{r['sandwich_agreement']:.1e}",
             r["power_steps"], f"{r['power_s']:.2f}", r["fit_steps"], f"{r['fit_s']:.2f}",
             f"{r['power_s'] / r['fit_s']:.2f}×", f"{r['agreement_with_power']:.1e}"] for r in res["layers"]]
    tot = lambda key: sum(r[key] for r in res["layers"])  # noqa: E731
    body.append(["all", "", f"{tot('einsum_s'):.3f}", f"{tot('sandwiches_s'):.3f}",
                 f"{tot('einsum_s') / tot('sandwiches_s'):.2f}×", "", tot("power_steps"), f"{tot('power_s'):.2f}",
                 tot("fit_steps"), f"{tot('fit_s'):.2f}", f"{tot('power_s') / tot('fit_s'):.2f}×", ""])
    lines += common.md_table(["layer", "d_out×D", "einsum s", "curvlab s", "speed-up", "agreement",
                              "power steps", "power s", "Lanczos steps", "KFOC.fit s", "speed-up", "agreement"], body)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = common.argument_parser(__doc__, repeats=3, device=False)
    p.add_argument("--n", type=common.positive_int, default=20, help="inputs (the report's default batch for vit-tiny)")
    args = p.parse_args(argv)
    _, info = common.start(args, common.command_line(__file__, argv))
    spec = common.ModelSpec("vit-tiny", "vit-tiny", (3, 32, 32), args.n)
    model = spec.build().eval()
    (x, y), = spec.batches(1)
    stats = extract(model, nn.CrossEntropyLoss(), x, y, fisher="exact", stats=("sqrt", "kfac"), skip_unsupported=True)
    layers = []
    for name in LAYERS:
        layers.append(bench_layer(name, stats[name], args.repeats))
        print(f"  {name}: done", flush=True)
    res = {"machine": common.finish(info), "settings": {"n": args.n, "k": stats[LAYERS[0]].sqrt.num_columns,
                                                         "repeats": args.repeats}, "layers": layers}
    common.write_results(args.out, res, markdown(res))


if __name__ == "__main__":
    main()
