"""The refresh of a large Kronecker factor: the CNN benchmark's 8193×8193 input factor (Linear(8192, 10)).

The factor is ``A = XᵀX/N`` of the layer's inputs (with the bias column) over ``--samples``
random images through the CNN's convolutions — the rank of a running average over many batches,
not of one batch.  Timed (one torch thread by default, interleaved repeats, medians):

* curvlab's refresh at the optimizers' defaults (float32, ``truncate_above`` 2048, rank 256,
  2 power iterations): ``KFAC(A, G)`` plus its damped ``"factored"`` inverse; ``EKFAC.from_factors``
  (the basis and the Kronecker eigenvalues; TEKFAC's refresh is the same decomposition);
* ASDL's K-FAC refresh for reference: float32 ``cholesky`` + ``cholesky_inverse`` of ``A + εI``;
* with ``--full``: the full float32 (and, with ``--float64``, float64) ``eigh`` — minutes — and
  the truncated decomposition's accuracy against it (top eigenvalues, the flat remainder, the
  relative Frobenius error of the truncated factor, and of the best one of the same rank).

Target: a refresh of an 8193×8193 factor ≤ 5 s on one CPU thread.

Usage::

    python benchmarks/bench_refresh.py --full --out benchmarks/results/refresh_cpu.json
"""

from __future__ import annotations

import torch
from torch import nn

import common
from common import Row

TARGET_SECONDS = 5.0


def input_factor(samples: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (8193×8193) of the CNN's last layer over ``samples`` random inputs, and a ``G``."""
    spec = common.MODELS["cnn"]
    model = spec.build(device)
    features = nn.Sequential(*list(model)[:-1])
    a = torch.zeros(8193, 8193, device=device)
    with torch.no_grad():
        for (x, _) in spec.batches(max(1, samples // spec.batch), device):
            f = torch.cat([features(x), torch.ones(x.shape[0], 1, device=device)], 1)
            a += f.T @ f
    a /= max(1, samples // spec.batch) * spec.batch
    g = torch.randn(10, 10, generator=torch.Generator().manual_seed(0)).to(device)
    return a, g @ g.T / 10


def main(argv: list[str] | None = None) -> None:
    from curvlab.approx import EKFAC, KFAC
    from curvlab.approx.inverse import damped_inverse_matrix
    from curvlab.optim import KroneckerOptions

    p = common.argument_parser(__doc__)
    p.add_argument("--samples", type=common.positive_int, default=2048)
    p.add_argument("--repeats", type=common.positive_int, default=3)
    p.add_argument("--full", action="store_true", help="also the full float32 eigh (minutes) and the accuracy")
    p.add_argument("--float64", action="store_true", help="with --full: the float64 eigh too")
    args = p.parse_args(argv)
    device, info = common.start(args, common.command_line(__file__, argv))
    a, g = input_factor(args.samples, device)
    policy = KroneckerOptions().eigh_policy()
    shift = 1e-2 ** 0.5 * torch.ones((), device=device)
    rows = [
        Row("kfac", lambda: KFAC(a, g, eigh=policy).inverse(1e-2, "factored"),
            "curvlab KFAC refresh (truncated rank 256 + its factored inverse)"),
        Row("ekfac", lambda: EKFAC.from_factors(a, g, scaling="kronecker", eigh=policy),
            "curvlab EKFAC/TEKFAC refresh (truncated eigenbasis)"),
        Row("cholesky", lambda: damped_inverse_matrix(a, torch.ones((), device=device), shift, None),
            "float32 cholesky + cholesky_inverse (ASDL K-FAC's refresh)"),
    ]
    for row in rows:
        row.calibrate(device, 0.0)
    common.measure_interleaved(rows, args.repeats, device)
    result = {"machine": info, "settings": vars(args), "policy": repr(policy),
              "rows": {r.key: {"label": r.label, "median_s": r.median, "samples_s": r.samples} for r in rows}}
    if args.full:
        result["full"] = full_reference(a, policy, device, args.float64)
    common.finish(info)
    common.write_results(args.out, result, markdown(result))


def full_reference(a: torch.Tensor, policy, device: torch.device, float64: bool) -> dict:
    """The full eigh's time and the truncated decomposition's accuracy against it."""
    from curvlab.approx import factor_eigh

    out: dict = {}
    t = common.timed(lambda: out.setdefault("f32", torch.linalg.eigh(a)), device)
    out["eigh_float32_s"] = t
    if float64:
        a64 = a.double()
        out["eigh_float64_s"] = common.timed(lambda: torch.linalg.eigh(a64), device)
    lam, u = out.pop("f32")
    lam = lam.double().clamp_min(0)
    k = policy.rank
    values, vectors = factor_eigh(a, policy)
    top = values[:-1].double().flip(0)
    exact_top = lam.flip(0)[:k]
    best_rest = (lam.sum() - exact_top.sum()) / (a.shape[0] - k)
    a64 = a.double()

    def truncated_error(v: torch.Tensor, w: torch.Tensor, rest: torch.Tensor) -> float:
        dense = (w * (v - rest)) @ w.T + rest * torch.eye(a.shape[0], dtype=torch.float64, device=device)
        return float((a64 - dense).norm() / a64.norm())

    out.update(
        rank=k,
        top10_rel_error=float(((top[:10] - exact_top[:10]).abs() / exact_top[:10]).max()),
        topk_rel_error=float(((top - exact_top).abs() / exact_top.clamp_min(1e-30)).max()),
        rest=float(values[-1]), best_rest=float(best_rest),
        truncated_rel_frobenius_error=truncated_error(top.flip(0), vectors.double(), values[-1].double()),
        best_rel_frobenius_error=truncated_error(lam[-k:], u[:, -k:].double(), best_rest),
        spectrum_decile=[float(v) for v in lam.flip(0)[:: max(1, a.shape[0] // 10)]],
    )
    return out


def markdown(res: dict) -> str:
    rows = res["rows"]
    lines = [
        "# Refresh of the CNN benchmark's 8193×8193 input factor", "",
        common.machine_line(res["machine"]), "",
        f"A = XᵀX/N over {res['settings']['samples']} random images (inputs of Linear(8192, 10), bias "
        f"column included); optimizer defaults: {res['policy']}. Medians of {res['settings']['repeats']} "
        "interleaved repeats.", "",
    ]
    body = [[r["label"], f"{r['median_s']:.2f}"] for r in rows.values()]
    full = res.get("full")
    if full:
        body.append(["full float32 eigh (one call)", f"{full['eigh_float32_s']:.1f}"])
        if "eigh_float64_s" in full:
            body.append(["full float64 eigh (one call)", f"{full['eigh_float64_s']:.1f}"])
    lines += common.md_table(["refresh", "seconds"], body)
    worst = max(rows["kfac"]["median_s"], rows["ekfac"]["median_s"])
    lines += ["", f"Target: a refresh ≤ {TARGET_SECONDS:.0f} s: curvlab's slowest {worst:.2f} s — "
                  f"**{'met' if worst <= TARGET_SECONDS else 'missed'}**."]
    if full:
        lines += [
            "", f"Accuracy of the rank-{full['rank']} truncation against the full float32 eigh: top-10 "
            f"eigenvalues to {full['top10_rel_error']:.1e} (all {full['rank']}: {full['topk_rel_error']:.1e}); "
            f"flat remainder {full['rest']:.3e} (exact mean of the rest {full['best_rest']:.3e}); "
            f"‖A − Ã‖_F/‖A‖_F = {full['truncated_rel_frobenius_error']:.3e} (best rank-{full['rank']} + flat: "
            f"{full['best_rel_frobenius_error']:.3e}).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
