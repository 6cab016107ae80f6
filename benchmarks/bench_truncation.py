"""What the truncated eigenbasis costs in accuracy, measured by ``curvlab.compare`` against the exact block.

The CNN benchmark's last layer, Linear(8192, 10) (P = 81,930; input factor 8193×8193), on one
batch of ``--n`` random images with the MC Fisher (one sample: K = N columns, so the input
factor has rank N + 1 > the truncation rank, as a running average over many batches would).
Every approximation is built twice from the same statistics — full (float64 eigh of the whole
factor, the analysis default; KFAC and TKFAC measured as their own eigen-decompositions, which
are the same matrices and damped inverses, so that the two 8193×8193 decompositions are done
once) and truncated (the optimizers' route: top ``rank`` eigenpairs by
the randomized range finder plus a flat remainder, computed in float64 here to isolate the
truncation) — and both are measured by :func:`curvlab.compare.measure` against the exact block:
relative Frobenius error, damped natural-gradient cosine and relative error (each with its
default damping, λ = ``--damping``), top-10 subspace overlap, trace ratio.

``--model`` takes another built-in model's last layer and ``--truncate-above`` the width above
which a factor is truncated (a quick run of the whole pipeline in seconds instead of the two
8193-wide float64 decompositions' minutes: ``--model mlp --truncate-above 32 --ranks 16 --n 128
--precision-models mlp``).

Usage::

    python benchmarks/bench_truncation.py --out benchmarks/results/truncation_cpu.json
"""

from __future__ import annotations

import time

import torch
from torch import nn

import common

APPROX = ("kfac", "ekfac", "tkfac", "tekfac")
METRICS = ("rel_frobenius_error", "ng_cosine", "ng_rel_error", "subspace_overlap", "trace_ratio")


def full_approximations(stats) -> dict:
    """The four approximations with full float64 eigenbases, two eigh calls in all: KFAC and
    TKFAC as their own eigen-decompositions (the same matrices and damped inverses as the
    classes KFAC/TKFAC build, whose eigh would be repeated)."""
    from curvlab.approx import EKFAC, TEKFAC, psd_eigh
    from curvlab.approx.spectral import optimal_scaling

    kf, ts, sqrt = stats.kfac[stats.flavour], stats.tkfac, stats.sqrt
    (lam_a, u_a), (lam_g, u_g) = psd_eigh(kf.A.double()), psd_eigh(kf.G.double())
    (mu_phi, u_phi), (mu_psi, u_psi) = psd_eigh(ts.delta_phi.double()), psd_eigh(ts.delta_psi.double())
    delta = ts.delta.double()
    lay = stats.layout
    return {
        "kfac": EKFAC(u_g, u_a, torch.outer(lam_g, lam_a), factor_eigenvalues=(lam_g, lam_a), layout=lay, name="kfac"),
        "ekfac": EKFAC(u_g, u_a, optimal_scaling(sqrt, u_g, u_a), factor_eigenvalues=(lam_g, lam_a), layout=lay),
        "tkfac": TEKFAC(u_psi, u_phi, torch.outer(mu_psi, mu_phi) / delta, delta=delta, psi_eigenvalues=mu_psi / delta,
                        phi_eigenvalues=mu_phi / delta, layout=lay, name="tkfac"),
        "tekfac": TEKFAC(u_psi, u_phi, optimal_scaling(sqrt, u_psi, u_phi), delta=delta, psi_eigenvalues=mu_psi / delta,
                         phi_eigenvalues=mu_phi / delta, layout=lay),
    }


def precision(key: str, n: int, damping: float, device: torch.device) -> dict:
    """The optimizers' float32 route against float64 on the same model, batch and MC labels:
    relative difference of each approximation's damped natural gradient of every block."""
    import dataclasses

    from curvlab.approx import DEFAULT_DAMPING, approximate
    from curvlab.extract import extract
    from curvlab.optim import KroneckerOptions

    spec = dataclasses.replace(common.MODELS[key], batch=n)
    policy32 = KroneckerOptions().eigh_policy()
    policy64 = dataclasses.replace(policy32, dtype=torch.float64)
    x, y = spec.batches(1, device)[0]
    out: dict[str, dict[str, float]] = {}
    runs = {}
    for dtype, policy in ((torch.float32, policy32), (torch.float64, policy64)):
        model = spec.build(device).to(dtype)
        stats = extract(model, nn.CrossEntropyLoss(), x.to(dtype), y, fisher="mc", stats=("sqrt", "kfac", "tkfac"), seed=0)
        runs[dtype] = {block: {name: approximate(s, name, eigh=policy).inv_mat_mul(s.grad, damping, DEFAULT_DAMPING[name])
                               for name in APPROX} for block, s in stats.items()}
    for block, ng64 in runs[torch.float64].items():
        out[block] = {name: float((runs[torch.float32][block][name].double() - ng).norm() / ng.norm())
                      for name, ng in ng64.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    from curvlab.approx import DEFAULT_DAMPING, EighPolicy, approximate
    from curvlab.compare import measure
    from curvlab.extract import extract

    p = common.argument_parser(__doc__, threads=None)
    p.add_argument("--n", type=common.positive_int, default=1024)
    p.add_argument("--ranks", type=common.int_list(), default="256", help="comma list of truncation ranks")
    p.add_argument("--damping", type=common.positive_float, default=1e-2)
    p.add_argument("--precision-models", default="mlp,cnn", help="models of the float32-vs-float64 table")
    p.add_argument("--model", default="cnn", help="built-in model whose last layer is measured")
    p.add_argument("--truncate-above", type=common.positive_int, default=2048,
                   help="factors wider than this are truncated (the optimizers' default: 2048)")
    args = p.parse_args(argv)
    # (unknown models: a one-line error before anything runs)
    precision_models, measured = common.models(args.precision_models), common.models(args.model)
    if len(measured) != 1:
        p.error(f"--model: one model, got {args.model!r}")
    spec = measured[0]
    device, info = common.start(args, common.command_line(__file__, argv))
    precision_table = {spec.key: precision(spec.key, spec.batch, args.damping, device) for spec in precision_models}
    model = spec.build(device)
    pool = spec.batches(max(1, args.n // spec.batch), device)
    x, y = torch.cat([b[0] for b in pool]), torch.cat([b[1] for b in pool])
    stats = extract(model, nn.CrossEntropyLoss(), x, y, fisher="mc", stats=("sqrt", "kfac", "tkfac"), seed=0)
    layer = [name for name in stats][-1]
    block = {layer: stats[layer]}
    ranks = args.ranks
    objects, strategies, built = {}, {}, {}
    t = time.perf_counter()
    full = full_approximations(stats[layer])
    for name in APPROX:
        objects[name] = full[name]
        built[name] = (time.perf_counter() - t) / len(APPROX)
        strategies[name] = DEFAULT_DAMPING[name]
        for r in ranks:
            key = f"{name} rank {r}"
            t = time.perf_counter()
            objects[key] = approximate(stats[layer], name, eigh=EighPolicy(truncate_above=args.truncate_above, rank=r))
            built[key] = time.perf_counter() - t
            strategies[key] = DEFAULT_DAMPING[name]
    ds = measure(block, {layer: objects}, damping=args.damping, damping_strategies=strategies, top_k=10)
    table = {key: {m: float(ds[m].sel(layer=layer, approximation=key)) for m in METRICS} | {"build_s": built[key]}
             for key in objects}
    result = {"machine": common.finish(info), "settings": vars(args), "layer": layer,
              "shape": list(stats[layer].layout.shape), "metrics": table, "precision": precision_table}
    common.write_results(args.out, result, markdown(result, ranks))


def markdown(res: dict, ranks: list[int]) -> str:
    s = res["settings"]
    lines = [
        "# Truncated eigenbasis: accuracy against the exact block (curvlab.compare)", "",
        common.machine_line(res["machine"]), "",
        f"{s.get('model', 'cnn')} benchmark, layer {res['layer']} (d_out × D = {res['shape'][0]} × {res['shape'][1]}), "
        f"truncated above {s.get('truncate_above', 2048)}, MC Fisher "
        f"(1 sample) of one batch of {s['n']} random images; damping {s['damping']} with each "
        "approximation's default strategy. Full: float64 eigh of every factor; truncated: top-k "
        "eigenpairs (randomized range finder, 2 power iterations) + flat remainder, in float64.", "",
    ]
    body = []
    for key, m in res["metrics"].items():
        body.append([key, *(f"{m[k]:.4f}" for k in METRICS), f"{m['build_s']:.1f}"])
    lines += common.md_table(["approximation", *METRICS, "build s"], body)
    lines += ["", "Extra error of the truncation (truncated − full):", ""]
    body = []
    for name in APPROX:
        for r in ranks:
            t, f = res["metrics"][f"{name} rank {r}"], res["metrics"][name]
            body.append([f"{name} rank {r}", *(f"{t[k] - f[k]:+.2e}" for k in METRICS)])
    lines += common.md_table(["approximation", *METRICS], body)
    lines += ["", "## float32 vs float64", "",
              "The optimizers' default route (float32 model, statistics, decompositions and inverses; "
              "truncation above 2048) against the same in float64 (same weights, batch and MC labels): "
              "‖∇̃₃₂ − ∇̃₆₄‖/‖∇̃₆₄‖ of each block's damped natural gradient (damping as above).", ""]
    body = [[f"{key} {block}", *(f"{v[name]:.1e}" for name in APPROX)]
            for key, blocks in res.get("precision", {}).items() for block, v in blocks.items()]
    lines += common.md_table(["model block", *APPROX], body)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
