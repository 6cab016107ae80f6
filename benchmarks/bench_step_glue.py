"""Where curvlab KFAC's plain step loses to ASDL's on the MLP: the approximation or the glue?

In one process, interleaved, one torch thread, five plain steps on the same model and batches:

* ``sgd`` and ``curvlab-kfac``, ``asdl-kfac`` (the :mod:`peers` steppers of ``bench_optim.py``);
* ``minimal``: curvlab KFAC's own damped inverse matrices (its ``approximations()`` after the
  warm-up, bias column in ``A`` included) applied by hand — forward, backward, ``[∇W ∇b]``,
  ``L⁻¹ (X R⁻¹)``, heavy-ball momentum into a kept buffer, ``W``/``b`` updated — with none of
  the optimizer's glue (block layouts, finiteness checks, param groups, state objects);
* ``lean``: the same update through curvlab's own objects and helpers — ``Block.grad_columns``,
  the approximation's ``inv_mat_mul_columns``, the optimizer's ``momentum_direction`` and
  ``updates_finite``, ``Block.update_targets`` — but without ``KroneckerOptimizer.step``'s bookkeeping
  (schedule, param groups, skip logic, ``torch.optim``'s step wrapper).

``asdl-kfac`` → ``minimal`` is the cost of the bias column in ``A`` (785-wide GEMMs against
ASDL's 784); ``minimal`` → ``lean`` that of curvlab's objects; ``lean`` → ``curvlab-kfac`` that
of the optimizer's step body.

And what follows the backward, timed alone (the zero_grad, forward and backward untimed before
every call, so that the caches are as a step leaves them):

* ``curvlab-kfac: preconditioning`` — ``inv_mat_mul_columns`` of every block's gradient with
  the objects the optimizer inverts (its GEMMs and the Python that calls them);
  ``asdl-kfac: preconditioning`` — ASDL's ``precondition()`` (its GEMMs, written into ``.grad``);
* ``curvlab-kfac: after the backward`` — ``opt.step()`` whole; ``asdl-kfac: after the
  backward`` — ``precondition()`` and ``torch.optim.SGD.step()``.

The difference of the first two is the preconditioning's; that of the last two minus it, the
update's (momentum, the parameters, curvlab's finiteness check and step bookkeeping).

Usage::

    python benchmarks/bench_step_glue.py --models mlp,mlp-1024 --out benchmarks/results/step_glue_cpu.json
"""

from __future__ import annotations

import copy
import itertools
import time
import warnings

import torch
from torch import nn

import common
import peers
from curvlab.model_blocks import model_blocks
from curvlab.optim.update import momentum_direction, updates_finite
from common import Row

PEERS = ("sgd", "curvlab-kfac", "asdl-kfac")


def minimal_step(stepper: peers.Stepper, base: nn.Module, pool, loss_fn: nn.Module):
    """A plain step with ``stepper``'s (curvlab KFAC's) inverse matrices and no optimizer glue."""
    opt = stepper.optimizer
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    approximations = opt.approximations()
    layers = []
    for block in opt.blocks():
        inverse = approximations[block.name].inverse(opt.options.damping, opt.options.damping_strategy)
        layer = modules[block.name]
        buffer = torch.zeros(layer.out_features, layer.in_features + 1)
        layers.append((layer, inverse.left.matrix, inverse.right.matrix, buffer))
    batches = itertools.cycle(pool)
    lr, mu = opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]

    def step() -> None:
        x, y = next(batches)
        for layer, *_ in layers:
            layer.weight.grad = layer.bias.grad = None
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            for layer, g_inv, a_inv, buffer in layers:
                grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
                buffer.mul_(mu).add_(g_inv @ (grad @ a_inv))
                layer.weight.add_(buffer[:, :-1], alpha=-lr)
                layer.bias.add_(buffer[:, -1], alpha=-lr)

    step.model = model  # what it trains (tests/test_entry_points.py: the same update as lean_step's)
    return step


def lean_step(stepper: peers.Stepper, base: nn.Module, pool, loss_fn: nn.Module):
    """A plain step through curvlab's blocks and approximation objects, without the optimizer."""
    opt = stepper.optimizer
    model = copy.deepcopy(base)
    approximations = opt.approximations()
    strategy, damping = opt.options.damping_strategy, opt.options.damping
    blocks = [(b, approximations[b.name]) for b in model_blocks(model).blocks]
    params = [p for b, _ in blocks for p in b.parameters()]
    buffers: dict[str, list[torch.Tensor]] = {}
    batches = itertools.cycle(pool)
    lr, mu = opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]

    def step() -> None:
        x, y = next(batches)
        for p in params:
            p.grad = None
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            updates = []
            for block, approximation in blocks:
                update = approximation.inv_mat_mul_columns(block.grad_columns(), damping, strategy)
                olds = buffers.get(block.name) or [None] * len(update)
                updates.append([momentum_direction(u, True, b, mu)[0] for u, b in zip(update, olds)])
            if not updates_finite([(u, lr) for us in updates for u in us]):
                raise FloatingPointError("lean step: a non-finite update")
            for (block, _), update in zip(blocks, updates):
                buffers[block.name] = update
                for target, part, _ in block.update_targets(update):
                    target.add_(part, alpha=-lr)

    step.model = model
    return step


def after_backward_rows(curvlab: peers.Stepper, asdl: peers.Stepper) -> list[Row]:
    """Rows timing what follows a plain step's backward (see the module docstring)."""
    opt = curvlab.optimizer
    approximations = opt.approximations()
    damping, strategy = opt.options.damping, opt.options.damping_strategy
    blocks = [(b, approximations[b.name]) for b in opt.blocks()]

    def curvlab_backward() -> None:
        x, y = curvlab._next()
        opt.zero_grad()
        opt.steps_done = 1
        with opt.track(curvlab.loss_fn):
            curvlab.loss_fn(curvlab.model(x), y).backward()

    def asdl_backward() -> None:
        x, y = asdl._next()
        asdl.optimizer.zero_grad()
        asdl.position = 1
        asdl.loss_fn(asdl.model(x), y).backward()

    @torch.no_grad()
    def curvlab_preconditioning() -> None:
        for block, approximation in blocks:
            approximation.inv_mat_mul_columns(block.grad_columns(), damping, strategy)

    def asdl_step() -> None:
        asdl.grad_maker.precondition()
        asdl.optimizer.step()

    return [Row("curvlab-kfac: preconditioning", curvlab_preconditioning, setup=curvlab_backward),
            Row("asdl-kfac: preconditioning", asdl.grad_maker.precondition, setup=asdl_backward),
            Row("curvlab-kfac: after the backward", opt.step, setup=curvlab_backward),
            Row("asdl-kfac: after the backward", asdl_step, setup=asdl_backward)]


def bench_model(spec: common.ModelSpec, args) -> dict:
    base = spec.build(torch.device("cpu"))
    pool = spec.batches(8, torch.device("cpu"))
    loss_fn = nn.CrossEntropyLoss()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steppers = {}
        for name in PEERS:
            steppers[name] = peers.build(name, copy.deepcopy(base), loss_fn, itertools.cycle(pool).__next__, lr=1e-6,
                                         damping=1e-2, stats_interval=10, refresh_interval=100)
            steppers[name].warm_up()
            rows.append(Row(name, lambda s=steppers[name]: s.step_at(1)))
        rows.append(Row("minimal", minimal_step(steppers["curvlab-kfac"], base, pool, loss_fn)))
        rows.append(Row("lean", lean_step(steppers["curvlab-kfac"], base, pool, loss_fn)))
        rows.extend(after_backward_rows(steppers["curvlab-kfac"], steppers["asdl-kfac"]))
        for row in rows:
            row.calibrate("cpu", args.min_time)
        common.measure_interleaved(rows, args.repeats, "cpu")
    sgd = rows[0].median
    return {"model": spec.key, "batch": spec.batch,
            "rows": {r.key: {"median_s": r.median, "per_sgd": r.median / sgd, "all_s": r.samples} for r in rows}}


def markdown(res: dict) -> str:
    lines = ["# curvlab KFAC's plain step: the approximation or the glue? (cpu)", "",
             common.machine_line(res["machine"]), "",
             f"Plain steps (no statistics, no refresh), medians of {res['settings']['repeats']} interleaved repeats; "
             "`minimal` applies curvlab KFAC's own damped inverse matrices (bias column in A) with no optimizer glue; "
             "`lean` the same update through curvlab's blocks and approximation objects, without the optimizer's step body. "
             "The last four rows time only what follows a plain step's backward (zero_grad, forward and backward untimed "
             "before every call): the preconditioning alone (curvlab's `inv_mat_mul_columns` of every block, ASDL's "
             "`precondition()`), and all of it (curvlab's `step()`, ASDL's `precondition()` and SGD's `step()`).",
             ""]
    header = ["step", *(f"{m['model']} (N={m['batch']}) ms" for m in res["models"]),
              *(f"{m['model']} ×SGD" for m in res["models"])]
    body = [[key, *(f"{m['rows'][key]['median_s'] * 1e3:.2f}" for m in res["models"]),
             *(f"{m['rows'][key]['per_sgd']:.2f}" for m in res["models"])] for key in res["models"][0]["rows"]]
    return "\n".join(lines + common.md_table(header, body)) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = common.argument_parser(__doc__, repeats=15, device=False)
    p.add_argument("--models", default="mlp,mlp-1024", help="MLPs of Linear layers only (mlp, mlp-1024; default: %(default)s)")
    p.add_argument("--min-time", type=common.positive_float, default=0.3)
    args = p.parse_args(argv)
    other = [spec.key for spec in common.models(args.models)
             if not all(isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten, nn.Sequential)) for m in spec.build(torch.device("cpu")).modules())]
    if other:  # (its minimal and lean steps precondition Linear layers alone: a conv ended in an AttributeError)
        p.error(f"--models: {other} are not MLPs of Linear layers; this benchmark times those only")
    _, info = common.start(args, common.command_line(__file__, argv))
    peers.import_asdl()
    t0 = time.perf_counter()
    results = [bench_model(spec, args) for spec in common.models(args.models)]
    res = {"machine": common.finish(info), "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "models": results, "seconds": time.perf_counter() - t0}
    common.write_results(args.out, res, markdown(res))


if __name__ == "__main__":
    main()
