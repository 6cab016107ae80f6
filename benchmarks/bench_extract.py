"""Cost of ``curvlab.extract`` relative to a plain forward+backward, next to BackPACK and curvlinops.

For every model (curvlab's built-ins, :data:`common.MODELS`) the script times, on one mini-batch,

* a plain forward + backward of the model (the unit: every cost is reported as a ratio to it);
* BackPACK's own second-order / first-order passes on an ``extend``-ed deep copy of the model
  (KFAC with one MC sample, KFLR, SqrtGGNExact, SqrtGGNMC with one sample, BatchGrad);
* curvlinops' ``KFACLinearOperator`` (MC Fisher, one sample): construction plus
  ``compute_kronecker_factors()`` (the constructor computes nothing);
* ``curvlab.extract`` with several flavour / statistics combinations.

Measurements are interleaved (:func:`common.measure_interleaved`); a measurement during which
other processes used more than ``--busy-cores`` cores is redone after waiting for a quiet
machine.  The ratio of a row is its median over the median of the plain forward+backward;
``paired`` is the median over repeats of the ratio within one repeat.

Usage::

    python benchmarks/bench_extract.py --device cpu --models mlp,cnn --out benchmarks/results/extract_cpu.json
    python benchmarks/bench_extract.py --device cuda --models mlp,cnn,3c3d,resnet18 --out benchmarks/results/extract_cuda.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import common
from common import ModelSpec, Row

import backpack  # noqa: E402  (after common: the repository on sys.path)
from backpack import extend  # noqa: E402
from backpack.extensions import KFAC, KFLR, BatchGrad, SqrtGGNExact, SqrtGGNMC  # noqa: E402

from curvlab.extract import extract  # noqa: E402

try:
    from curvlinops import KFACLinearOperator
except ImportError:  # pragma: no cover - curvlinops is optional for the benchmark
    KFACLinearOperator = None

CURVLAB_ROWS = [
    ("cv_kfac_mc", "mc", ("kfac",)),
    ("cv_kfac_exact", "exact", ("kfac",)),
    ("cv_tkfac_mc", "mc", ("tkfac",)),
    ("cv_tkfac_exact", "exact", ("tkfac",)),
    ("cv_sqrt_exact", "exact", ("sqrt",)),
    ("cv_all_exact", "exact", ("sqrt", "kfac", "tkfac")),
    ("cv_sqrt_emp", "empirical", ("sqrt",)),
]
COMPARISONS = [("cv_tkfac_mc", "bp_kfac_mc"), ("cv_tkfac_exact", "bp_kflr"), ("cv_kfac_mc", "bp_kfac_mc"),
               ("cv_kfac_exact", "bp_kflr"), ("cv_sqrt_exact", "bp_sqrt_exact"), ("cv_kfac_mc", "cl_kfac_mc")]


def make_rows(spec: ModelSpec, device: torch.device, seed: int) -> tuple[list[Row], dict]:
    """The rows for one model, sharing one mini-batch and one set of weights."""
    model = spec.build(device, seed)
    x, y = spec.batches(1, device)[0]
    loss_fn = nn.CrossEntropyLoss()
    bp_model = backpack_copy(model)
    bp_loss = extend(nn.CrossEntropyLoss())

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def backpack_pass(make_ext: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            bp_model.zero_grad(set_to_none=True)
            loss = bp_loss(bp_model(x), y)
            with backpack.backpack(make_ext()):
                loss.backward()

        return run

    rows = [
        Row("plain", plain, "plain forward+backward"),
        Row("bp_kfac_mc", backpack_pass(lambda: KFAC(mc_samples=1)), "BackPACK KFAC (mc=1)"),
        Row("bp_kflr", backpack_pass(KFLR), "BackPACK KFLR"),
        Row("bp_sqrt_exact", backpack_pass(SqrtGGNExact), "BackPACK SqrtGGNExact"),
        Row("bp_sqrt_mc", backpack_pass(lambda: SqrtGGNMC(mc_samples=1)), "BackPACK SqrtGGNMC (mc=1)"),
        Row("bp_batchgrad", backpack_pass(BatchGrad), "BackPACK BatchGrad"),
    ]
    if KFACLinearOperator is not None:
        params = kronecker_params(model)

        def curvlinops_kfac() -> None:
            op = KFACLinearOperator(model, loss_fn, params, [(x, y)], fisher_type="mc", mc_samples=1,
                                    check_deterministic=False)
            op.compute_kronecker_factors()  # the constructor is lazy

        rows.append(Row("cl_kfac_mc", curvlinops_kfac, "curvlinops KFACLinearOperator (mc=1)"))
    for key, fisher, stats in CURVLAB_ROWS:
        rows.append(Row(key, lambda f=fisher, s=stats: extract(model, loss_fn, x, y, fisher=f, mc_samples=1, stats=s),
                        f"curvlab extract fisher={fisher} stats={','.join(stats)}"))
    unsupported = {}
    for row in list(rows):
        try:  # e.g. BackPACK has no second-order rule for AdaptiveAvgPool2d
            row.fn()
        except NotImplementedError as err:
            unsupported[row.label] = str(err).split(":")[-1].strip()
            rows.remove(row)
        except (torch.OutOfMemoryError, MemoryError) as err:  # ResNet-18's exact square roots at N=128:
            # 57 GB each in BackPACK; curvlab refuses early (MemoryError) what would not fit
            unsupported[row.label] = f"out of {device} memory" + (f" ({err})" if type(err) is MemoryError else "")
            rows.remove(row)
            torch.cuda.empty_cache()
    info = {"num_params": sum(p.numel() for p in model.parameters()), "unsupported": unsupported,
            "check": consistency_check(model, loss_fn, x, y)}
    return rows, info


def backpack_copy(model: nn.Module) -> nn.Module:
    """An extended deep copy (the plain model keeps no hooks), without in-place activations
    (they break extended models) and, for a graph beyond nn.Sequential (ResNet's residual
    additions), through BackPACK's converter."""
    bp_model = copy.deepcopy(model)
    for module in bp_model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return extend(bp_model, use_converter=not isinstance(bp_model, nn.Sequential))


def kronecker_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the layers curvlinops' KFAC covers (Linear, Conv2d): a BatchNorm's are
    left to other approximations."""
    return [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) for p in m.parameters(recurse=False)
            if p.requires_grad]


def consistency_check(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The compared passes compute the same thing (max relative difference): curvlab's exact
    KFAC factors vs curvlinops' type-2 KFAC (KFC "expand", bias as last input column) on every
    layer, and vs BackPACK's KFLR on the linear layers (BackPACK's conv factors follow another
    convention)."""
    ours = extract(model, loss_fn, x, y, fisher="exact", stats=("kfac",))
    out: dict[str, float] = {}
    if KFACLinearOperator is not None:
        op = KFACLinearOperator(model, loss_fn, kronecker_params(model), [(x, y)], fisher_type="type-2",
                                check_deterministic=False, separate_weight_and_bias=False)
        op.compute_kronecker_factors()
        worst = [0.0, 0.0]
        for name, a_cl in op._input_covariances.items():
            f, g_cl = ours[name].kfac["exact"], op._gradient_covariances[name]
            worst = [max(worst[0], _rel(f.A, a_cl)), max(worst[1], _rel(f.G, g_cl))]
        out.update(curvlinops_type2_A=worst[0], curvlinops_type2_G=worst[1])
    bp_model, bp_loss = backpack_copy(model), extend(nn.CrossEntropyLoss())
    try:
        with backpack.backpack(KFLR()):
            bp_loss(bp_model(x), y).backward()
    except NotImplementedError:  # no KFLR for this model (residual branches)
        return out
    worst = [0.0, 0.0]
    for (name, module), (_, bp_module) in zip(model.named_modules(), bp_model.named_modules()):
        if isinstance(module, nn.Linear) and name in ours:
            g_bp, a_bp = bp_module.weight.kflr
            f = ours[name].kfac["exact"]
            d = a_bp.shape[0]
            worst = [max(worst[0], _rel(f.A[:d, :d], a_bp)), max(worst[1], _rel(f.G, g_bp))]
    out.update(backpack_kflr_linear_A=worst[0], backpack_kflr_linear_G=worst[1])
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device) -> dict:
    rows, info = make_rows(spec, device, args.seed)
    for row in rows:
        t = row.calibrate(device, args.min_time, args.warmup)
        row.calls = min(row.calls, args.max_number)
        if t > args.slow_seconds:
            row.max_samples = args.slow_repeats
            row.note = f"{args.slow_repeats} repeats (single call {t:.2f} s)"
    waited = common.measure_interleaved(rows, args.repeats, device, busy_cores=args.busy_cores,
                                        max_retries=args.max_retries, max_wait=args.max_wait)
    by_key = {r.key: r for r in rows}
    base = by_key["plain"]
    out_rows = [{
        "key": r.key, "label": r.label, "median_ms": r.median * 1e3, "ratio": r.median / base.median,
        "ratio_paired": statistics.median(t / b for t, b in zip(r.samples, base.samples)),
        "repeats": len(r.samples), "calls_per_measurement": r.calls, "times_ms": [t * 1e3 for t in r.samples],
        "note": r.note, "foreign_cores": r.foreign, "retries": r.retries,
    } for r in rows]
    comparisons = {f"{a} / {b}": by_key[a].median / by_key[b].median
                   for a, b in COMPARISONS if a in by_key and b in by_key}
    return {"model": spec.key, "batch_size": spec.batch, "note": spec.note, **info, "rows": out_rows,
            "comparisons": comparisons, "waited_for_quiet_s": waited,
            "retried_measurements": sum(r.retries for r in rows)}


def _busy(model: dict, busy_cores: float) -> str:
    """How many kept measurements saw more than ``busy_cores`` other cores (within the allowance)."""
    seen = [f for row in model["rows"] for f in (row.get("foreign_cores") or []) if f is not None]
    return f"{sum(f > busy_cores for f in seen)} of {len(seen)} kept above it"


def markdown(result: dict) -> str:
    models, st = result["models"], result["settings"]
    lines = [
        f"# curvlab.extract benchmark ({result['machine']['device_name']}, {result['machine']['device']})", "",
        common.machine_line(result["machine"]), "",
        f"Repeats {st['repeats']} (interleaved), at least {st['min_time']} s per measurement; measurements "
        f"during which other processes used > {st['busy_cores']} cores, beyond an allowance of 20 ms of CPU time "
        "(/proc/stat's resolution, which a measurement of ~20 ms cannot exceed), were redone after waiting for a "
        "quiet machine (" + "; ".join(f"{r['model']}: {r['retried_measurements']} redone, waited "
                                      f"{r['waited_for_quiet_s']:.0f} s, {_busy(r, st['busy_cores'])}" for r in models)
        + "). Models: "
        + "; ".join(f"{r['model']} (N={r['batch_size']}): {r['note']}" for r in models) + ".", "",
        "ratio = median time / median plain forward+backward; paired = median over repeats of the ratio "
        "within a repeat; ms = median time per call.", "",
    ]
    header = ["row", *(f"{r['model']} (N={r['batch_size']}) {c}" for r in models for c in ("ratio", "paired", "ms"))]
    body = []
    labels = list(dict.fromkeys(x["label"] for r in models for x in r["rows"]))
    for label in labels:
        cells = [label]
        for r in models:
            x = next((x for x in r["rows"] if x["label"] == label), None)
            cells += (["–"] * 3 if x is None else
                      [f"{x['ratio']:.2f}" + ("*" if x["note"] else ""), f"{x['ratio_paired']:.2f}", f"{x['median_ms']:.2f}"])
        body.append(cells)
    lines += common.md_table(header, body)
    lines += ["", "Same-flavour comparisons (ratio of median times; target for TKFAC ≤ 1.0):", ""]
    keys = list(models[0]["comparisons"])
    lines += common.md_table(["comparison", *(r["model"] for r in models)],
                             [[k, *(f"{r['comparisons'].get(k, float('nan')):.2f}" for r in models)] for k in keys])
    lines += ["", "Consistency (max relative Frobenius difference of curvlab's exact KFAC factors vs curvlinops "
                  "type-2 KFAC, all layers, and vs BackPACK KFLR, linear layers): "
              + "; ".join(f"{r['model']}: " + ", ".join(f"{k} {v:.1e}" for k, v in r["check"].items()) for r in models)]
    notes = [f"{r['model']} / {x['label']}: {x['note']}" for r in models for x in r["rows"] if x["note"]]
    notes += [f"{r['model']} / {label}: not supported by BackPACK ({why})"
              for r in models for label, why in r.get("unsupported", {}).items()]
    if notes:
        lines += ["", "\\* " + "; ".join(notes)]
    lines += ["", "Models come from curvlab.app.models since 2026-11-30 (the 3c3d row now uses DeepOBS' TF "
                  "'same' padding, ZeroPad2d before 3×3/2 pools, where this script's own copy padded every pool "
                  "by 1; the MLP gained a leading Flatten, which costs nothing)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = common.argument_parser(__doc__, threads=None)
    p.add_argument("--models", default="mlp,cnn", help="comma list of " + ", ".join(common.MODELS))
    p.add_argument("--repeats", type=common.positive_int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-time", type=float, default=0.02, help="fast rows run several calls per measurement")
    p.add_argument("--max-number", type=int, default=50, help="at most this many calls per measurement")
    p.add_argument("--slow-seconds", type=float, default=2.0, help="rows slower than this run --slow-repeats")
    p.add_argument("--slow-repeats", type=common.positive_int, default=3)
    p.add_argument("--busy-cores", type=float, default=0.1, help="redo measurements disturbed by other processes")
    p.add_argument("--max-retries", type=int, default=3)
    p.add_argument("--max-wait", type=float, default=120.0, help="seconds per model to wait for a quiet machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=common.positive_int, default=None, help="override every model's batch size (smoke tests)")
    args = p.parse_args(argv)
    device, info = common.start(args, common.command_line(__file__, argv))
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    result = {"machine": info, "settings": vars(args), "reference": REFERENCE, "models": []}
    started = time.perf_counter()
    for spec in common.models(args.models):
        if args.batch_size is not None:
            spec = dataclasses.replace(spec, batch=args.batch_size)
        t0 = time.perf_counter()
        res = run_model(spec, args, device)
        res["wall_s"] = time.perf_counter() - t0
        result["models"].append(res)
        print(f"[{spec.key}] done in {res['wall_s']:.1f} s", file=sys.stderr, flush=True)
        result["total_wall_s"] = time.perf_counter() - started
        common.finish(info)  # written after every model: a run stopped later keeps the models it finished
        common.write_results(args.out, result, markdown(result), quiet=True)
    print(markdown(result))
    return result


#: Ratios measured earlier (for comparison; see benchmarks/README.md).
REFERENCE = {
    "cpu (this 2-core machine)": {
        "mlp": {"bp_kfac_mc": 6.1, "bp_kflr": 7.9, "bp_sqrt_exact": 231, "cl_kfac_mc": 4.1},
        "cnn": {"bp_kfac_mc": 12.9, "bp_kflr": 18.2, "bp_sqrt_exact": 29.5, "cl_kfac_mc": 8.9},
    },
    "H200, 3c3d N=128 (the script's own 3c3d copy, pool padding 1)": {
        "3c3d": {"bp_kfac_mc": 4.9, "bp_kflr": 5.6, "bp_sqrt_exact": 14.3, "bp_batchgrad": 3.0, "cl_kfac_mc": 3.0},
    },
}


if __name__ == "__main__":
    main()
