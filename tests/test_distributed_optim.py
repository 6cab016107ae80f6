"""Data-parallel KFAC/EKFAC/TKFAC/TEKFAC on 2 and 4 gloo ranks take one process's steps.

Every rank trains on its shard of the same global batches that one process trains on whole, with
``fisher="exact"`` (deterministic statistics), statistics every step, refreshes at steps 0 and 3
and EKFAC/TEKFAC rescalings at steps 1, 2 and 4; the parameters after the five steps must equal
the single process's to :data:`RTOL` (relative, float64), for a ``DistributedDataParallel`` model
and for a plain model (the optimizer then averages the gradients), and be bit-identical on all
ranks.  The models have factors without repeated eigenvalues: where a factor has one (fewer
examples than inputs, or a symmetric padding pattern), EKFAC's and TEKFAC's eigenbasis inside
that eigenspace is the solver's choice, and the next rescaling depends on it — one process and
R ranks, whose factors differ by rounding, then take different, equally valid, steps.

Each spawn costs seconds, so one worker per world size runs all checks and reports back.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import warnings

import pytest
import torch
from torch import nn

from multiprocess import run_ranks

METHODS = ("kfac", "ekfac", "tkfac", "tekfac")
OPTIONS = dict(fisher="exact", stats_interval=1, eigen_interval=3, scale_interval=1, lr=0.1, damping=1e-2, factor_dtype="float64",
               weight_decay=1e-3)
STEPS = 5
#: Relative agreement of the parameters with one process (measured: ≤ 5e-15 after 5 steps).
RTOL = 1e-12


# ----------------------------------------------------------------------------- on the ranks


def _cnn() -> nn.Sequential:
    """Two convolutions without padding (no repeated eigenvalues in the factors) and a linear layer."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Sigmoid(), nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(8, 3)).double()


def _model(name: str) -> nn.Module:
    from helpers import tiny_mlp

    return tiny_mlp() if name == "mlp" else _cnn()


def _loss(name: str) -> nn.Module:
    return {"ce": nn.CrossEntropyLoss(), "ce-padded": nn.CrossEntropyLoss(), "mse-sum": nn.MSELoss(reduction="sum"),
            "bce": nn.BCEWithLogitsLoss()}[name]


def _shard(x, y, sizes, rank):
    lo = sum(sizes[:rank])
    return x[lo : lo + sizes[rank]], y[lo : lo + sizes[rank]]


def _train(method, model_name, sizes, *, distributed, wrap="ddp", steps=STEPS, loss="ce", options=None,
           nan_at=None, model=None, opt_state=None, first_step=0, ddp_options=None, micro=False, scaler=None,
           overflow_at=None, empty_at=None):
    """``(model, optimizer)`` after ``steps`` steps on the global batches of seeds ``10 + k``;
    distributed: on this rank's shard of each (``nan_at``: step at which rank 1's input is NaN;
    ``empty_at``: its shard empty);
    ``micro``: each (shard of a) batch as two micro-batches, one ``track`` each, DDP's gradient
    reduction in the last one only (``no_sync``); ``scaler``: a GradScaler scales the loss and
    takes the step (``overflow_at``: step at which rank 1's — one process': its — gradient has an
    inf, as after an overflow)."""
    from curvlab.optim import OPTIMIZERS
    from helpers import batch

    rank = torch.distributed.get_rank() if distributed else 0
    model = _model(model_name) if model is None else model
    loss_fn = _loss(loss)
    ddp = distributed and wrap == "ddp"
    net = nn.parallel.DistributedDataParallel(model, **(ddp_options or {})) if ddp else model
    opt = OPTIMIZERS[method](net, distributed=None if distributed else False, **{**OPTIONS, **(options or {})})
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for k in range(first_step, first_step + steps):
        x, y = batch(model, loss_fn, sum(sizes), seed=10 + k)
        if loss == "ce-padded":  # targets the loss drops, unequally many on each rank
            y = torch.where(torch.arange(len(y)) % 3 == 1, -100, y)
        if distributed:
            x, y = _shard(x, y, sizes, rank)
            if k == nan_at and rank == 1:
                x = x.clone()
                x[0] = float("nan")
            if k == empty_at and rank == 1:
                x, y = x[:0], y[:0]
        opt.zero_grad()
        parts = [(x[:1], y[:1]), (x[1:], y[1:])] if micro else [(x, y)]
        for i, (xb, yb) in enumerate(parts):
            last = i == len(parts) - 1
            with opt.track(loss_fn), (net.no_sync() if ddp and not last else contextlib.nullcontext()):
                scale = 1.0 if loss_fn.reduction == "sum" or not len(x) else len(xb) / len(x)
                loss = scale * loss_fn(net(xb), yb)
                (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
            continue
        if k == overflow_at and rank == int(distributed):
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return model, opt


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@contextlib.contextmanager
def _counting_eigh():
    """Count ``torch.linalg.eigh`` calls (the refreshes' eigen-decompositions)."""
    original, calls = torch.linalg.eigh, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    torch.linalg.eigh = counted
    try:
        yield calls
    finally:
        torch.linalg.eigh = original


def _equal_steps(cases) -> dict:
    """Parameters after :data:`STEPS` steps against one process: ``case → (rel. error, params)``."""
    out = {}
    for model_name, sizes, wraps in cases:
        for method in METHODS:
            for wrap in wraps:
                got, _ = _train(method, model_name, sizes, distributed=True, wrap=wrap)
                ref, _ = _train(method, model_name, sizes, distributed=False)
                out[(model_name, method, wrap)] = (_rel(_flat(got), _flat(ref)), _flat(got))
    got, _ = _train("tekfac", "mlp", cases[0][1], distributed=True, options={"basis": "kfac"})
    ref, _ = _train("tekfac", "mlp", cases[0][1], distributed=False, options={"basis": "kfac"})
    out[("mlp", "tekfac-kfac-basis", "ddp")] = (_rel(_flat(got), _flat(ref)), _flat(got))
    return out


def _eigh_counts(sizes) -> dict:
    """Eigen-decompositions this rank ran for the refreshes, and one process's: EKFAC's and
    TEKFAC's bases, and KFAC's under a damping that needs its eigenbasis (with its default,
    Kronecker damping it has none to compute: two Cholesky factorisations per block)."""
    out = {}
    for method in ("kfac", "kfac-exact-damping", "ekfac", "tekfac"):
        options = {"damping_strategy": "exact"} if method == "kfac-exact-damping" else None
        method = method.split("-")[0]
        with _counting_eigh() as mine:
            _train(method, "cnn", sizes, distributed=True, options=options)
        with _counting_eigh() as single:
            _train(method, "cnn", sizes, distributed=False, options=options)
        out[method if options is None else "kfac-exact-damping"] = (mine[0], single[0])
    return out


def _unequal_shards(sizes) -> dict:
    """After one step on unequal shards (plain model): the statistics and the built
    approximations against one process (the gradients are the mean of the local ones, so the
    parameters are not compared)."""
    out = {}
    for method, loss in [(m, "ce") for m in METHODS] + [("tekfac", "mse-sum"), ("kfac", "bce"), ("kfac", "ce-padded"),
                                                          ("tekfac", "ce-padded")]:
        _, got = _train(method, "mlp", sizes, distributed=True, wrap="plain", steps=1, loss=loss)
        _, ref = _train(method, "mlp", sizes, distributed=False, steps=1, loss=loss)
        errors = []
        for name, state in ref.block_states.items():
            mine = got.block_states[name].curvature
            for key, value in state.curvature.tensors().items():
                if not key.startswith("approximation."):  # running averages
                    errors.append(_rel(mine.tensors()[key], value))
            errors.append(_rel(mine.build().to_dense(), state.curvature.build().to_dense()))
        out[(method, loss)] = max(errors)
    return out


def _non_finite_on_one_rank(sizes) -> dict:
    """Rank 1's input is NaN at step 2, or its shard empty (DDP waited in its all-reduce for the
    backward rank 1's statistics pass skipped: a hang until the timeout; a plain model's gradient
    average mismatched): every rank skips that step, no rank waits."""
    out = {}
    for wrap, case in itertools.product(("ddp", "plain"), ("nan_at", "empty_at")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, opt = _train("tekfac", "mlp", sizes, distributed=True, wrap=wrap, **{case: 2})
        skipped = [w for w in caught if "the step is skipped" in str(w.message)]
        out[wrap, case] = (opt.steps_done, len(skipped), _flat(model))
    # A plain model's gradients are averaged inside step(): torch's ShardedGradScaler all-reduces
    # the overflow flag, so every rank skips the step an overflow on one rank makes it skip (with
    # torch's GradScaler only that rank would skip it, and the ranks fall out of step and hang).
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    runs = [_train("kfac", "mlp", sizes, distributed=distributed, wrap="plain", overflow_at=2,
                   scaler=ShardedGradScaler(device="cpu", init_scale=2.0**10)) for distributed in (True, False)]
    out["scaler"] = (runs[0][1].steps_done, _rel(_flat(runs[0][0]), _flat(runs[1][0])), _flat(runs[0][0]))
    return out


def _mc_seeds_and_resume(sizes, path) -> dict:
    """MC statistics of steps 0 and 1 are those drawn under ``seed + k·R + r``; a DDP run saved
    by rank 0 and resumed on every rank continues bit-identically."""
    import curvlab

    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    options = {"fisher": "mc", "mc_samples": 2, "stats_interval": 1, "stat_decay": 0.0}
    from helpers import batch

    out = {"mc_G": 0.0}
    for k in (0, 1):
        before, _ = _train("kfac", "mlp", sizes, distributed=True, steps=k, options=options)  # θ_k
        _, opt = _train("kfac", "mlp", sizes, distributed=True, steps=k + 1, options=options)
        x, y = _shard(*batch(before, _loss("ce"), sum(sizes), seed=10 + k), sizes, rank)
        local = curvlab.extract(before, _loss("ce"), x, y, fisher="mc", mc_samples=2, stats=("kfac",),
                                seed=0 + k * size + rank)
        for name, stats in local.items():
            g = stats.kfac["mc"].G / size  # equal shards: the global factor is the mean of the local ones
            torch.distributed.all_reduce(g)
            out["mc_G"] = max(out["mc_G"], _rel(opt.block_states[name].curvature.G, g))

    options = {"fisher": "mc", "eigen_interval": 2, "scale_interval": 1}
    full, _ = _train("tekfac", "mlp", sizes, distributed=True, steps=6, options=options)
    half, opt = _train("tekfac", "mlp", sizes, distributed=True, steps=3, options=options)
    if rank == 0:
        torch.save({"model": half.state_dict(), "optimizer": opt.state_dict()}, path)
    torch.distributed.barrier()
    saved = torch.load(path, weights_only=True)
    model = _model("mlp")
    model.load_state_dict(saved["model"])
    resumed, _ = _train("tekfac", "mlp", sizes, distributed=True, steps=3, options=options, model=model,
                        opt_state=saved["optimizer"], first_step=3)
    out["resume_equal"] = torch.equal(_flat(resumed), _flat(full))
    out["saved_blocks"] = sorted(saved["optimizer"]["curvlab"]["blocks"])
    _, single = _train("tekfac", "mlp", sizes, distributed=False, steps=0, options=options,
                       opt_state=saved["optimizer"])
    out["single_loads"] = single.steps_done
    return out


def _disagreeing_options() -> dict:
    """Another damping, another method, or a plain model of another width on rank 1: refused on
    every rank at construction (they diverged silently, hung in their collectives, or aborted in
    gloo's: "collective mismatch", no Python exception); and a DDP model with distributed=False
    (each rank's own statistics: the replicas drifted apart, silently)."""
    from curvlab.optim import KFAC, TKFAC

    rank = torch.distributed.get_rank()
    out = {}
    wider = nn.Sequential(nn.Linear(5, 4 + 2 * rank), nn.Tanh(), nn.Linear(4 + 2 * rank, 3)).double()
    for what, make, model in (("damping", lambda m: KFAC(m, lr=0.1, damping=1e-2 * (1 + rank)), _model("mlp")),
                              ("method", lambda m: (TKFAC if rank else KFAC)(m, lr=0.1), _model("mlp")),
                              ("width", lambda m: KFAC(m, lr=0.1), wider),
                              ("ddp_off", lambda m: KFAC(nn.parallel.DistributedDataParallel(m), distributed=False),
                               _model("mlp"))):
        try:
            make(model)
            out[what] = "accepted"
        except ValueError as err:
            out[what] = str(err)
    return out


def _a_layer_called_on_one_rank_only() -> dict:
    """Rank 0 raised naming the layer it did not call; rank 1 waited in the step's collectives
    until the process group's timeout (then "Connection closed by peer")."""
    from curvlab.optim import KFAC

    rank = torch.distributed.get_rank()

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):
            return self.a(x) + self.b(x) if rank else self.a(x)

    torch.manual_seed(0)
    model, loss_fn = TwoHeads().double(), _loss("ce")
    opt = KFAC(model, fisher="exact", stats_interval=1)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    start = time.perf_counter()
    try:
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
        said = "accepted"
    except Exception as err:  # noqa: BLE001
        said = f"{type(err).__name__}: {err}"
    return {"said": said, "seconds": time.perf_counter() - start}


def _uneven_track_blocks() -> dict:
    """Rank 0 runs two ``track`` blocks (micro-batches) before a statistics step, rank 1 one, or
    none: the ranks' collectives did not line up and both waited until the process group's
    timeout (a DDP model's in its gradient all-reduce).  Now every rank raises, naming where
    each one is — also where rank 0's first block runs under DDP's ``no_sync()``, entered after
    ``track`` (its backward does not all-reduce, rank 1's does)."""
    from curvlab.optim import KFAC

    rank = torch.distributed.get_rank()
    out = {}
    for blocks, wrap in [*itertools.product(((2, 1), (1, 0)), ("plain", "ddp")), ((2, 1), "no_sync")]:
        model, loss_fn = _model("mlp"), _loss("ce")
        model = nn.parallel.DistributedDataParallel(model) if wrap != "plain" else model
        opt = KFAC(model, fisher="exact", stats_interval=1)
        x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank 1's untracked statistics step
                for block in range(blocks[rank]):
                    # DDP's gradient accumulation: every block but the last under no_sync()
                    last = block == blocks[rank] - 1
                    with opt.track(loss_fn), (model.no_sync() if wrap == "no_sync" and not last else contextlib.nullcontext()):
                        loss_fn(model(x), y).backward()
                opt.step()
            said = "accepted"
        except Exception as err:  # noqa: BLE001
            said = f"{type(err).__name__}: {err}"
        out[blocks, wrap] = {"said": said, "seconds": time.perf_counter() - start}
    return out


def _sequence_lengths_per_rank() -> dict:
    """Rank 0 holds sequences of 10 tokens, rank 1 of 2: the reduced input factor is the average
    over all 24 token positions (expand) or all 4 examples' mean tokens (reduce), as one process's
    micro-batches of the two give (weighing the ranks by examples passed every distributed test)."""
    from curvlab.optim import KFAC

    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    xs = [torch.randn(2, 10, 3, dtype=torch.float64), torch.randn(2, 2, 3, dtype=torch.float64)]
    ones = lambda x: torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=torch.float64)], -1)  # noqa: E731
    out = {}
    for kfac_approx in ("expand", "reduce"):
        torch.manual_seed(1)
        model, loss_fn = nn.Linear(3, 4).double(), nn.MSELoss()
        opt = KFAC(model, lr=0.1, stat_decay=0.0, stats_interval=1, fisher="exact", factor_dtype="float64",
                   kfac_approx=kfac_approx)
        x = xs[rank]
        with opt.track(loss_fn):
            loss_fn(model(x), torch.zeros(*x.shape[:2], 4, dtype=torch.float64)).backward()
        opt.step()
        rows = torch.cat([ones(x).reshape(-1, 4) if kfac_approx == "expand" else ones(x).mean(1) for x in xs])
        a = opt.state_dict()["curvlab"]["blocks"][""]["curvature"]["A"]
        out[kfac_approx] = _rel(a, rows.T @ rows / len(rows))
    return out


class _Tagger(nn.Module):
    """Token ids ``[N, T]`` (0: padding) → Embedding → tanh → Linear → ``[N, C, T]`` logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(9, 4, padding_idx=0), nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids))).transpose(1, 2)


def _embedding_steps() -> dict:
    """An nn.Embedding preconditioned on two ranks (token counts, padding tokens among them, in
    its input factor): one process's steps on the whole batch, for every method."""
    from curvlab.optim import OPTIMIZERS

    rank = torch.distributed.get_rank()
    out = {}
    for method in METHODS:
        params = {}
        for distributed in (True, False):
            torch.manual_seed(0)
            model = _Tagger().double()
            net = nn.parallel.DistributedDataParallel(model) if distributed else model
            opt = OPTIMIZERS[method](net, distributed=None if distributed else False, **OPTIONS)
            assert [b.name for b in opt.blocks()] == ["embed", "head"]
            loss_fn = nn.CrossEntropyLoss()
            for k in range(STEPS):
                gen = torch.Generator().manual_seed(10 + k)
                ids, y = torch.randint(0, 9, (6, 5), generator=gen), torch.randint(0, 3, (6, 5), generator=gen)
                if distributed:
                    ids, y = _shard(ids, y, (3, 3), rank)
                opt.zero_grad()
                with opt.track(loss_fn):
                    loss_fn(net(ids), y).backward()
                opt.step()
            params[distributed] = _flat(model)
        out[method] = _rel(params[True], params[False])
    return out


def _different_layers_on_a_plain_step() -> dict:
    """A plain model whose ranks call different layers on a step without statistics: the
    gradients present on each rank were averaged in list order (rank 1's ``b`` into rank 0's
    ``a``: the ranks' parameters drifted apart, by 0.064, without a word), or mismatched in size
    (gloo aborted).  Now every parameter has its slot, absent ones add zero, as DDP's
    ``find_unused_parameters`` does — checked against DDP on the same steps."""
    from curvlab.optim import KFAC

    rank = torch.distributed.get_rank()

    class Branches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.out = nn.Linear(5, 4), nn.Linear(5, 4), nn.Linear(4, 3)

        def forward(self, x, use=("a", "b")):
            return self.out(sum(torch.tanh(getattr(self, name)(x)) for name in use))

    out = {}
    for wrap in ("plain", "ddp"):
        torch.manual_seed(0)
        net = Branches().double()
        model = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True) if wrap == "ddp" else net
        opt = KFAC(model, fisher="exact", stats_interval=2, factor_dtype="float64")
        loss_fn = _loss("ce")
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            x, y = torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen)
            use = (("a",), ("b",))[rank] if step == 1 else ("a", "b")  # step 1: no statistics
            opt.zero_grad()
            with opt.track(loss_fn):
                loss_fn(model(x, use), y).backward()
            opt.step()
        out[wrap] = _flat(net)
    return out


def _ddp_options_and_micro_batches(sizes) -> dict:
    """DDP's static_graph refused; find_unused_parameters taking the autograd engine (BackPACK
    refused there); micro-batches with DDP's no_sync and with a plain model against one process
    on the global batch; MC micro-batches of one step drawing independently."""
    from curvlab.optim import KFAC

    out = {}
    for what, ddp_options, engine in (("static_graph", {"static_graph": True}, "auto"),
                                      ("backpack_unused", {"find_unused_parameters": True}, "backpack")):
        try:
            KFAC(nn.parallel.DistributedDataParallel(_model("mlp"), **ddp_options), engine=engine)
            out[what] = "accepted"
        except ValueError as err:
            out[what] = str(err)
    ref, _ = _train("kfac", "mlp", sizes, distributed=False, steps=2, options={"engine": "auto"})
    got, _ = _train("kfac", "mlp", sizes, distributed=True, steps=2, options={"engine": "auto"},
                    ddp_options={"find_unused_parameters": True})
    out["find_unused"] = _rel(_flat(got), _flat(ref))
    for method in METHODS:
        ref, _ = _train(method, "mlp", sizes, distributed=False, steps=4)
        for wrap in ("ddp", "plain"):
            got, _ = _train(method, "mlp", sizes, distributed=True, wrap=wrap, steps=4, micro=True)
            out[("micro", method, wrap)] = _rel(_flat(got), _flat(ref))
    g = []
    for copies in (1, 2):  # the same examples once, and twice as two micro-batches
        model = _model("mlp")
        opt = KFAC(model, fisher="mc", factor_dtype="float64", stat_decay=0.0, stats_interval=1)
        from helpers import batch

        loss_fn = _loss("ce")
        x, y = batch(model, loss_fn, 4, seed=3)
        opt.zero_grad()
        for _ in range(copies):
            with opt.track(loss_fn):
                (loss_fn(model(x), y) / copies).backward()
        opt.step()
        g.append(opt.block_states["2"].curvature.G)
    out["mc_micro_independent"] = _rel(g[1], g[0])
    return out


def _worker(cases, eigh_sizes, unequal, extra_sizes=None, path=None) -> dict:
    out = {"equal": _equal_steps(cases), "eigh": _eigh_counts(eigh_sizes), "unequal": _unequal_shards(unequal)}
    if extra_sizes is not None:
        out["non_finite"] = _non_finite_on_one_rank(extra_sizes)
        out["mc"] = _mc_seeds_and_resume(extra_sizes, path)
        out["disagree"] = _disagreeing_options()
        out["ddp"] = _ddp_options_and_micro_batches(extra_sizes)
        out["uncalled"] = _a_layer_called_on_one_rank_only()
        out["branches"] = _different_layers_on_a_plain_step()
        out["uneven"] = _uneven_track_blocks()
        out["lengths"] = _sequence_lengths_per_rank()
        out["embedding"] = _embedding_steps()
    return out


# ----------------------------------------------------------------------------- checks


def _check_common(results, world_size: int) -> None:
    first = results[0]
    for case, (err, params) in first["equal"].items():
        assert err <= RTOL, f"{case}: parameters differ from one process by {err:.3g} (relative)"
        for rank, other in enumerate(results[1:], start=1):
            assert torch.equal(other["equal"][case][1], params), f"{case}: rank {rank}'s parameters differ from rank 0's"
    assert [r["eigh"]["kfac"] for r in results] == [(0, 0)] * len(results)  # Cholesky only
    for method in ("kfac-exact-damping", "ekfac", "tekfac"):
        counts = [r["eigh"][method][0] for r in results]
        single = first["eigh"][method][1]
        assert sum(counts) == single, (method, counts, single)  # each decomposition once, somewhere
        assert max(counts) < single, (method, counts, single)   # and spread: no rank does them all
    for case, err in first["unequal"].items():
        assert err <= 1e-12, f"unequal shards {case}: statistics differ from one process by {err:.3g}"


def test_two_ranks_take_one_process_steps(tmp_path) -> None:
    cases = [("mlp", (4, 4), ("ddp", "plain")), ("cnn", (6, 6), ("ddp", "plain"))]
    results = run_ranks(_worker, 2, cases, (6, 6), (3, 5), extra_sizes=(4, 4), path=str(tmp_path / "opt.pt"))
    _check_common(results, 2)
    for wrap in itertools.product(("ddp", "plain"), ("nan_at", "empty_at")):
        steps = [r["non_finite"][wrap][0] for r in results]
        assert steps == [STEPS - 1] * 2, (wrap, steps)  # step 2 skipped on both ranks
        assert all(r["non_finite"][wrap][1] == 1 for r in results), wrap  # warned on each
        assert torch.equal(results[0]["non_finite"][wrap][2], results[1]["non_finite"][wrap][2]), wrap
        assert torch.isfinite(results[0]["non_finite"][wrap][2]).all(), wrap
    assert [r["non_finite"]["scaler"][0] for r in results] == [STEPS - 1] * 2  # the overflow's step skipped on both
    assert results[0]["non_finite"]["scaler"][1] <= RTOL  # one process skipping it
    assert torch.equal(results[0]["non_finite"]["scaler"][2], results[1]["non_finite"]["scaler"][2])
    mc = results[0]["mc"]
    assert mc["mc_G"] <= 1e-12, mc
    assert all(r["mc"]["resume_equal"] for r in results)
    assert mc["saved_blocks"] == ["0", "2"]  # the names one process uses (DDP unwrapped)
    assert mc["single_loads"] == 3
    for r in results:
        for what in ("damping", "method", "width"):
            assert "the ranks disagree on the method, its options or the model's parameters" in r["disagree"][what], (what, r["disagree"])
        assert r["disagree"]["damping"].endswith("first difference: options.damping: 0.01 on rank 0, 0.02 on rank 1")
        assert r["disagree"]["method"].endswith("first difference: method: 'kfac' on rank 0, 'tkfac' on rank 1")
        assert r["disagree"]["width"].endswith("first difference: parameters[0]: ('0.weight', (4, 5), True) on rank 0, "
                                               "('0.weight', (6, 5), True) on rank 1")
        assert "distributed=False on a DistributedDataParallel model of 2 ranks" in r["disagree"]["ddp_off"], r["disagree"]
    ddp = results[0]["ddp"]
    assert "static_graph=True) is not supported" in ddp["static_graph"], ddp
    assert "cannot run through DistributedDataParallel(find_unused_parameters=True)" in ddp["backpack_unused"], ddp
    assert ddp["find_unused"] <= RTOL, ddp
    for key, err in ddp.items():
        if key[0] == "micro":
            assert err <= RTOL, (key, err)  # micro-batches accumulate into the global batch's step
    assert ddp["mc_micro_independent"] > 1e-3, ddp  # (the same seed gave 0)
    own, other = (r["uncalled"] for r in results)
    assert own["said"].startswith("ValueError: curvlab.extract: layer 'b' (Linear) was not called"), own
    assert other["said"].startswith("RankFailedError: curvlab.optim: the statistics pass: failed on rank 0: "
                                    "ValueError: curvlab.extract: layer 'b'"), other
    assert other["seconds"] < 10, other  # not the process group's timeout
    for blocks, wrap, r in itertools.product(((2, 1), (1, 0)), ("plain", "ddp"), results):
        # a DDP model's ranks meet before the extra block, which never reaches DDP's all-reduce
        point = "start" if wrap == "ddp" else "end"
        after = "1 track block)" if blocks == (2, 1) else "0 track blocks)"
        points = f"rank 0: {point} of track block {blocks[0]} of step 0; rank 1: step() of step 0 after {after}"
        said = r["uneven"][blocks, wrap]["said"]
        assert said.startswith("RuntimeError: curvlab.optim: the ranks are out of step (" + points), (blocks, wrap, said)
        assert r["uneven"][blocks, wrap]["seconds"] < 10, r["uneven"]  # not the process group's timeout
    for r in results:
        said = r["uneven"][(2, 1), "no_sync"]
        assert said["said"].startswith("RuntimeError: curvlab.optim: the ranks are out of step: track block 1 of step 0 "
                                       "runs under DistributedDataParallel's no_sync() on rank(s) 0 only"), said
        assert said["seconds"] < 10, said
    for r in results:
        assert max(r["lengths"].values()) <= 1e-12, r["lengths"]
        assert max(r["embedding"].values()) <= RTOL, r["embedding"]
    plain, ddp = (torch.stack([r["branches"][wrap] for r in results]) for wrap in ("plain", "ddp"))
    assert torch.equal(plain[0], plain[1])  # the ranks in step
    assert _rel(plain[0], ddp[0]) <= RTOL  # as DDP averages them


def test_four_ranks_take_one_process_steps() -> None:
    cases = [("mlp", (2, 2, 2, 2), ("ddp",)), ("cnn", (3, 3, 3, 3), ("plain",))]
    results = run_ranks(_worker, 4, cases, (3, 3, 3, 3), (1, 2, 3, 2))
    _check_common(results, 4)


# ----------------------------------------------------------------------------- in this process


def test_greedy_assignment_is_kaisas_rule() -> None:
    from curvlab.optim.assignment import assign_greedy, balance

    costs = [2.0, 10.0, 7.0, 5.0, 3.0]
    owners = assign_greedy(costs, 2)
    # largest first, each to the least-loaded rank: 10 → 0, 7 → 1, 5 → 1 (7 < 10), 3 → 0 (10 < 12),
    # 2 → 1 (12 < 13)
    assert owners == [1, 0, 1, 1, 0]
    assert balance(costs, owners, 2) == {0: 13.0, 1: 14.0}
    assert assign_greedy([4.0, 4.0], 2) == [0, 1]  # ties: the lower index to the lower rank
    assert assign_greedy(costs, 1) == [0] * 5
    assert sorted(assign_greedy([1.0, 1.0, 1.0], 4)) == [0, 1, 2]  # never two items on one rank while another idles
    with pytest.raises(ValueError, match="world_size"):
        assign_greedy(costs, 0)


def test_decomposition_moves_between_equal_approximations() -> None:
    """What a refresh broadcasts: a KFAC/TKFAC's cached eigh, adopted without recomputing."""
    from curvlab.approx import EKFAC, KFAC

    gen = torch.Generator().manual_seed(0)
    a, g = (torch.randn(n, 2 * n, generator=gen, dtype=torch.float64) for n in (4, 3))
    kfac = KFAC(a @ a.T, g @ g.T)
    assert kfac.decomposition() == {}  # nothing computed yet
    u_out, u_in = kfac.eigenbasis()
    copy = KFAC.from_tensors(kfac.tensors())
    with _counting_eigh() as calls:
        copy.adopt_decomposition(kfac.decomposition())
        assert torch.equal(copy.eigenbasis()[0], u_out) and torch.equal(copy.eigenbasis()[1], u_in)
        assert torch.equal(copy.eigenvalues(), kfac.eigenvalues())
    assert calls[0] == 0
    with pytest.raises(ValueError, match="decomposition"):
        copy.adopt_decomposition({"u_left": u_out})
    ekfac = EKFAC.from_factors(a @ a.T, g @ g.T, scaling="kronecker")
    assert ekfac.decomposition() == {}  # its tensors are its eigenbasis
    with pytest.raises(ValueError, match="caches no decomposition"):
        ekfac.adopt_decomposition({"u": u_out})


def test_distributed_argument(tmp_path) -> None:
    """Without a group: off by default, an error when required; a group of one rank: one process,
    and a DDP model is unwrapped (block names and results as without it)."""
    import torch.distributed as dist

    from curvlab.optim import TEKFAC
    from helpers import tiny_mlp

    assert not dist.is_initialized()
    assert TEKFAC(tiny_mlp()).blocks()  # no process group: a single process
    with pytest.raises(RuntimeError, match="init_process_group"):
        TEKFAC(tiny_mlp(), distributed=True)
    with pytest.raises(TypeError, match="distributed="):
        TEKFAC(tiny_mlp(), distributed="yes")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        got, opt = _train("tekfac", "mlp", (8,), distributed=True)
        assert [b.name for b in opt.blocks()] == ["0", "2"]
    finally:
        dist.destroy_process_group()
    ref, _ = _train("tekfac", "mlp", (8,), distributed=False)
    assert torch.equal(_flat(got), _flat(ref))
