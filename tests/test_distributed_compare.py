"""``curvlab.distributed`` on 2 and 4 gloo ranks equals ``curvlab`` on the concatenated batch.

Each spawn of a process group costs seconds, so every rank runs many checks per spawn
(:func:`_equality_worker`) and reports back; a failed check raises in its rank, and the harness
(:mod:`multiprocess`) fails the test with that rank's traceback.  Datasets of all ranks come back
to the parent, which checks that they are identical.

Equality is checked for the ``exact`` and ``empirical`` flavours, on the tiny MLP (factored
roots), CNN (dense roots) and Conv1d net (unfolded roots; on a rank of one example its first
layer's unfolded where the other ranks' are dense), CE and MSE, mean and sum reductions, equal and unequal shards,
for every data variable, to ``1e-10`` relative (see :func:`assert_same_dataset` for the absolute
floors).  The ``kfac`` approximation is built from MC-sampled factors, which each rank samples
with its own seed (``seed + rank``): it is checked to be finite and identical on all ranks, not
equal to the single-process one.  Below the Dataset, every :class:`ShardedSqrt` method and every
reduced statistic is compared with one process directly (:func:`_check_sqrt_and_statistics`).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from torch import nn

from multiprocess import RankError, run_ranks

APPROX = ("kfac", "kflr", "ekfac", "tkfac", "tekfac", "kfoc")
MC_APPROX = ("kfac",)  # built from MC samples whatever the reference flavour
RTOL = 1e-10
#: Relative errors computed as ``√(‖F‖² − ⟨…⟩)/‖F‖`` (a square root of a cancelling difference):
#: where the approximation is exact (e.g. the last layer under MSE, whose block *is* a
#: Kronecker product) their value is rounding noise of size ``√ε ≈ 1e-8`` in one process as in
#: many.  Their squares — what is computed before the square root, normalised by ``‖F‖²`` — are
#: compared instead, to ``RTOL`` absolute.
#: Ratios (relative errors, cosines, overlaps, trace ratios) have the absolute floor ``RTOL``;
#: dimensional quantities (traces, norms, eigenvalues) ``RTOL`` × their largest value in the layer.
DIMENSIONAL = ("exact_trace", "exact_frobenius", "exact_eigenvalues", "approx_eigenvalues",
               "network_exact_eigenvalues", "network_exact_trace")
SQUARED = ("rel_frobenius_error", "projection_error", "network_rel_frobenius_error", "network_blockdiag_error")
OPTIONS = {"damping": 1e-2, "top_k": 3, "seed": 5}

#: Without KFOC, whose Lanczos iteration (two all_reduces a step) dominates the run time on
#: a loaded 2-core machine; its distributed path (sandwich products) does not depend on the flavour.
NO_KFOC = APPROX[:-1]

# (model, loss, reduction, flavour, examples per rank, approximations)
CASES_2 = [
    ("mlp", "ce", "mean", "exact", (3, 3), APPROX),
    ("mlp", "mse", "mean", "empirical", (2, 3), APPROX),
    ("cnn", "ce", "mean", "empirical", (4, 2), APPROX),
    ("cnn", "ce", "sum", "exact", (3, 2), APPROX),
    ("conv1d", "ce", "mean", "exact", (1, 3), NO_KFOC),
]
CASES_4 = [
    ("mlp", "ce", "sum", "empirical", (2, 2, 2, 1), NO_KFOC),
    ("mlp", "ce", "mean", "exact", (2, 2, 2, 2), APPROX),
    ("cnn", "mse", "mean", "exact", (1, 2, 2, 1), APPROX),
    ("cnn", "ce", "mean", "empirical", (3, 2, 1, 3), NO_KFOC),
]
#: run on the sub-group of ranks 1, 2, 3 of the 4-rank world (rank 0 idles)
SUBGROUP_CASE = ("cnn", "ce", "mean", "exact", (2, 2, 1), NO_KFOC)


# ----------------------------------------------------------------------------- helpers (ranks)


def _setting(model: str, loss: str, reduction: str, n: int):
    from torch import nn

    from helpers import batch, tiny_cnn, tiny_conv1d, tiny_mlp

    net = {"mlp": tiny_mlp, "cnn": tiny_cnn, "conv1d": tiny_conv1d}[model]()
    loss_fn = nn.CrossEntropyLoss(reduction=reduction) if loss == "ce" else nn.MSELoss(reduction=reduction)
    x, y = batch(net, loss_fn, n)
    return net, loss_fn, x, y


def _shard(x, y, sizes, rank):
    lo = sum(sizes[:rank])
    return x[lo : lo + sizes[rank]], y[lo : lo + sizes[rank]]


def assert_same_dataset(got, ref, where: str) -> None:
    """Every data variable, coordinate and attribute of ``ref`` in ``got``, to :data:`RTOL`
    relative, with the absolute floors of :data:`DIMENSIONAL` and :data:`SQUARED`."""
    assert set(got.data_vars) == set(ref.data_vars), (where, set(got.data_vars) ^ set(ref.data_vars))
    for name in ("layer", "approximation", "eig", "num_params", "module_type"):
        np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=f"{where}: coord {name}")
    exact = [a for a in ref.approximation.values if a not in MC_APPROX]
    for var in ref.data_vars:
        a, b = got[var], ref[var]
        assert a.dims == b.dims and a.shape == b.shape, (where, var, a.dims, b.dims)
        if "approximation" in b.dims:
            mc_a = a.sel(approximation=list(MC_APPROX)).values
            mc_b = b.sel(approximation=list(MC_APPROX)).values
            assert np.array_equal(np.isnan(mc_a), np.isnan(mc_b)), f"{where}: {var} (kfac) NaN pattern"
            assert np.isfinite(mc_a[~np.isnan(mc_b)]).all(), f"{where}: {var} (kfac) not finite"
            a, b = a.sel(approximation=exact), b.sel(approximation=exact)
        a, b = a.values, b.values
        if var in SQUARED:
            assert np.array_equal(np.isnan(a), np.isnan(b)), f"{where}: {var} NaN pattern differs"
            ok = np.isnan(b) | (np.abs(a**2 - b**2) <= RTOL)
            assert ok.all(), f"{where}: {var}² differs: max |Δ| = {np.nanmax(np.abs(a**2 - b**2)):.3g}"
            continue
        if var not in DIMENSIONAL:
            scale = 1.0
        elif "layer" in ref[var].dims:
            axes = tuple(range(1, b.ndim))
            scale = np.nanmax(np.abs(b), axis=axes, keepdims=True) if axes else np.abs(b)
        else:
            scale = np.nanmax(np.abs(b)) if np.isfinite(b).any() else 0.0
        scale = np.nan_to_num(scale)
        assert np.array_equal(np.isnan(a), np.isnan(b)), f"{where}: {var} NaN pattern differs"
        ok = np.isnan(b) | (np.abs(a - b) <= RTOL * np.abs(b) + RTOL * scale)
        assert ok.all(), (
            f"{where}: {var} differs: max |Δ| = {np.nanmax(np.abs(a - b)):.3g} "
            f"(scale {np.max(scale):.3g})"
        )
    for key, value in ref.attrs.items():
        if key == "created":
            continue
        if isinstance(value, float):
            assert got.attrs[key] == pytest.approx(value, rel=RTOL), (where, key)
        else:
            assert got.attrs[key] == value, (where, key, got.attrs[key], value)


def _close(got, ref, what: str, rtol: float = 1e-12) -> None:
    got, ref = torch.as_tensor(got), torch.as_tensor(ref)
    assert got.shape == ref.shape, (what, tuple(got.shape), tuple(ref.shape))
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert err <= rtol * max(scale, 1e-300), f"{what}: max |Δ| = {err:.3g}, scale {scale:.3g}"


def _check_sqrt_and_statistics(model: str, sizes, group=None) -> int:
    """Every ``ShardedSqrt`` method and every reduced statistic against one process; returns
    the number of blocks checked."""
    import curvlab
    import curvlab.distributed as cd
    from curvlab.distributed import ShardedSqrt, sharded_column_order

    rank = torch.distributed.get_rank(group)
    net, loss_fn, x, y = _setting(model, "ce", "mean", sum(sizes))
    opts = {"stats": ("sqrt", "kfac", "tkfac"), "kfac_flavours": ("exact", "empirical")}
    single = curvlab.extract(net, loss_fn, x, y, **opts)
    gen = torch.Generator().manual_seed(11)

    def orthogonal(n: int) -> torch.Tensor:
        return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]

    bases = {name: (orthogonal(b.layout.shape[0]), orthogonal(b.layout.shape[1])) for name, b in single.items()}
    opts = {**opts, "stats": (*opts["stats"], "kfe"), "eigenbases": bases}
    single = curvlab.extract(net, loss_fn, x, y, **opts)
    xs, ys = _shard(x, y, sizes, rank)
    dist_stats = cd.extract(net, loss_fn, xs, ys, group=group, **opts)

    assert dist_stats.num_examples == sum(sizes) and dist_stats.shards.examples == tuple(sizes)
    _close(dist_stats.loss, single.loss, "loss")
    for name, ref in single.items():
        got = dist_stats[name]
        where = f"{model} block {name}"
        assert got.num_examples == ref.num_examples, where
        _close(got.grad, ref.grad, f"{where} grad")
        for flavour in ("exact", "empirical"):
            _close(got.kfac[flavour].A, ref.kfac[flavour].A, f"{where} A[{flavour}]")
            _close(got.kfac[flavour].G, ref.kfac[flavour].G, f"{where} G[{flavour}]")
        _close(got.tkfac.delta, ref.tkfac.delta, f"{where} δ")
        _close(got.tkfac.delta_phi, ref.tkfac.delta_phi, f"{where} δΦ")
        _close(got.tkfac.delta_psi, ref.tkfac.delta_psi, f"{where} δΨ")
        _close(got.kfe_scaling, ref.kfe_scaling, f"{where} kfe_scaling")

        v, s = got.sqrt, ref.sqrt
        assert isinstance(v, ShardedSqrt), type(v)
        assert v.num_columns == s.num_columns and v.shape == s.shape, where
        perm = sharded_column_order(sizes, s.num_columns // sum(sizes))
        assert sorted(perm.tolist()) == list(range(s.num_columns)), where
        _close(v.gram(), s.gram()[perm][:, perm], f"{where} gram")
        _close(v.column_norms_sq(), s.column_norms_sq()[perm], f"{where} column_norms_sq")
        _close(v.matrices(), s.matrices()[perm], f"{where} matrices")
        _close(v.trace(), s.trace(), f"{where} trace")
        _close(v.gram().square().sum(), s.gram().square().sum(), f"{where} ‖F‖²")
        d_out, d_in = s.shape
        mat = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        _close(v.inner(mat), s.inner(mat)[perm], f"{where} inner")
        w = torch.randn(s.num_columns, generator=gen, dtype=torch.float64)
        w_single = torch.empty_like(w)
        w_single[perm] = w
        _close(v.combine(w), s.combine(w_single), f"{where} combine")
        b_out = torch.randn(d_out, d_out, generator=gen, dtype=torch.float64)
        c_in = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64)
        _close(v.sandwich_in(b_out), s.sandwich_in(b_out), f"{where} sandwich_in")
        _close(v.sandwich_out(c_in), s.sandwich_out(c_in), f"{where} sandwich_out")
        for got_pt, ref_pt, label in zip(v.partial_traces(), s.partial_traces(), ("Tr_out", "Tr_in")):
            _close(got_pt, ref_pt, f"{where} {label}")
        u_out, u_in = orthogonal(d_out), orthogonal(d_in)
        _close(v.rotated_sq_sum(u_out, u_in), s.rotated_sq_sum(u_out, u_in), f"{where} rotated_sq_sum")
        q = torch.linalg.qr(torch.randn(d_in, 2, generator=gen, dtype=torch.float64)).Q
        c_small = torch.randn(2, 2, generator=gen, dtype=torch.float64)
        in_q, s_in_q = v.in_input_basis(q), s.in_input_basis(q)
        assert isinstance(in_q, ShardedSqrt) and in_q.shape == (d_out, 2), where
        _close(in_q.sandwich_out(c_small), s_in_q.sandwich_out(c_small), f"{where} in_input_basis")
        rows = v.input_rows()  # None where a rank's shard keeps no rows (a dense root)
        assert rows is not None or model != "mlp", where
        if rows is not None:
            _close(rows, s.input_rows(), f"{where} input_rows")
        v32 = v.to(dtype=torch.float32)
        assert isinstance(v32, ShardedSqrt) and v32.dtype == torch.float32, where
        _close(v32.trace().double(), s.trace(), f"{where} float32 trace", rtol=1e-5)
    return len(single)


def _check_failures() -> dict[str, str]:
    """Failures on one rank make every rank raise (nobody waits); the group stays usable."""
    import curvlab.distributed as cd

    rank = torch.distributed.get_rank()
    net, loss_fn, x, y = _setting("mlp", "ce", "mean", 4)
    xs, ys = _shard(x, y, (2, 2), rank)
    seen = {}
    # 1. rank 1's local extraction raises (a target out of range)
    bad_y = ys.clone()
    if rank == 1:
        bad_y[0] = 99
    try:
        cd.compare(net, loss_fn, xs, bad_y, approximations=("kflr",), **OPTIONS)
    except Exception as exc:  # noqa: BLE001
        seen["local_error"] = f"{type(exc).__name__}: {exc}"
    # 2. an empty shard on rank 1
    try:
        cd.extract(net, loss_fn, xs[: 2 * (1 - rank)], ys[: 2 * (1 - rank)])
    except Exception as exc:  # noqa: BLE001
        seen["empty_shard"] = f"{type(exc).__name__}: {exc}"
    # 3. parameters that differ between the ranks
    if rank == 1:
        with torch.no_grad():
            net[0].weight[0, 0] += 1e-3
    try:
        cd.extract(net, loss_fn, xs, ys)
    except Exception as exc:  # noqa: BLE001
        seen["parameters"] = f"{type(exc).__name__}: {exc}"
    # 4. options only compare reads that differ between the ranks (they returned different
    # Datasets, or hung)
    for option in ({"damping": 1e-2 * (1 + rank)}, {"top_k": 2 + rank}):
        try:
            cd.compare(net, loss_fn, xs, ys, approximations=("kflr",), **{**OPTIONS, **option})
        except Exception as exc:  # noqa: BLE001
            seen[f"options_{next(iter(option))}"] = f"{type(exc).__name__}: {exc}"
    try:  # the same loss type and reduction, another label smoothing
        cd.compare(net, nn.CrossEntropyLoss(label_smoothing=0.1 * rank), xs, ys, approximations=("kflr",), **OPTIONS)
    except Exception as exc:  # noqa: BLE001
        seen["options_label_smoothing"] = f"{type(exc).__name__}: {exc}"
    # 5. a model of another dtype on rank 1: named as such, not as different parameters
    other = _setting("mlp", "ce", "mean", 4)[0]
    try:
        cd.extract(other.float() if rank == 1 else other, loss_fn, xs.float() if rank == 1 else xs, ys)
    except Exception as exc:  # noqa: BLE001
        seen["dtypes"] = f"{type(exc).__name__}: {exc}"
    # 6. train-mode BatchNorm: every shard normalised by its own batch statistics (the results
    # differed from one process by up to 0.27, without a word)
    torch.manual_seed(0)
    coupled = torch.nn.Sequential(_setting("mlp", "ce", "mean", 4)[0], torch.nn.BatchNorm1d(net(xs).shape[1]))
    for call in ("extract", "compare"):
        try:
            getattr(cd, call)(coupled.double().train(), loss_fn, xs, ys)
        except Exception as exc:  # noqa: BLE001
            seen[f"batchnorm_{call}"] = f"{type(exc).__name__}: {exc}"
    # 7. examples coupled outside any BatchNorm module (a batch mean): found by the extraction
    centred = _BatchMean(_setting("mlp", "ce", "mean", 4)[0])
    try:
        cd.extract(centred, loss_fn, xs, ys)
    except Exception as exc:  # noqa: BLE001
        seen["batch_mean"] = f"{type(exc).__name__}: {exc}"
    # the group still works: every rank went through the same collectives
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    seen["after"] = str(int(t.item()))
    return seen


class _BatchMean(torch.nn.Module):
    """``net``'s output less its batch mean: every example's output depends on the others'."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out - out.mean(0, keepdim=True)


def _equality_worker(cases, sqrt_models, subgroup_case=None, failures=False, mc=False):
    """On every rank: the distributed results against one process on the whole batch."""
    import curvlab
    import curvlab.distributed as cd

    rank, size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out: dict[str, object] = {"datasets": [], "timings": {}}
    start = time.perf_counter()
    for model, loss, reduction, flavour, sizes, approx in cases:
        net, loss_fn, x, y = _setting(model, loss, reduction, sum(sizes))
        xs, ys = _shard(x, y, sizes, rank)
        got = cd.compare(net, loss_fn, xs, ys, fisher=flavour, approximations=approx, **OPTIONS)
        ref = curvlab.compare(net, loss_fn, x, y, fisher=flavour, approximations=approx, **OPTIONS)
        where = f"rank {rank}: {model}/{loss}-{reduction}/{flavour}/shards {sizes}"
        assert_same_dataset(got, ref, where)
        assert got.attrs["world_size"] == size and got.attrs["shard_examples"] == ",".join(map(str, sizes))
        assert got.attrs["backend"] == "gloo" and got.attrs["mc_seeds"] == "seed + rank"
        got.attrs.pop("created")
        out["datasets"].append(got)
    if mc:  # MC flavour: runs, is identical on every rank (checked by the parent), not compared
        net, loss_fn, x, y = _setting("mlp", "ce", "mean", 2 * size)
        xs, ys = _shard(x, y, (2,) * size, rank)
        ds = cd.compare(net, loss_fn, xs, ys, fisher="mc", mc_samples=2, approximations=APPROX, **OPTIONS)
        ds.attrs.pop("created")
        out["datasets"].append(ds)
    out["timings"]["compare"] = time.perf_counter() - start

    start = time.perf_counter()
    out["sqrt_blocks"] = sum(_check_sqrt_and_statistics(model, CASES_SQRT_SIZES[size]) for model in sqrt_models)
    out["timings"]["sqrt"] = time.perf_counter() - start

    if subgroup_case is not None:
        members = list(range(1, size))
        group = torch.distributed.new_group(members)  # every rank takes part in creating it
        if rank in members:
            model, loss, reduction, flavour, sizes, approx = subgroup_case
            net, loss_fn, x, y = _setting(model, loss, reduction, sum(sizes))
            sub_rank = torch.distributed.get_rank(group)
            xs, ys = _shard(x, y, sizes, sub_rank)
            opts = {"fisher": flavour, "approximations": approx, **OPTIONS}
            got = cd.compare(net, loss_fn, xs, ys, group=group, **opts)
            ref = curvlab.compare(net, loss_fn, x, y, **opts)
            assert_same_dataset(got, ref, f"rank {rank} (sub-group rank {sub_rank}): {subgroup_case}")
            assert got.attrs["world_size"] == len(members)
            out["subgroup_blocks"] = _check_sqrt_and_statistics("cnn", sizes, group=group)
        torch.distributed.barrier()
    if failures:
        out["failures"] = _check_failures()
    return out


#: shard sizes of the root-level checks, by world size (unequal on purpose)
CASES_SQRT_SIZES = {2: (2, 3), 4: (2, 1, 3, 2)}


def _assert_identical_across_ranks(results) -> None:
    first = results[0]["datasets"]
    for rank, res in enumerate(results[1:], start=1):
        for i, (a, b) in enumerate(zip(res["datasets"], first)):
            a.attrs.pop("created", None), b.attrs.pop("created", None)
            assert a.identical(b), f"dataset {i} of rank {rank} differs from rank 0's"


# ----------------------------------------------------------------------------- tests


def test_two_ranks_equal_one_process() -> None:
    results = run_ranks(_equality_worker, 2, CASES_2, ("mlp", "cnn", "conv1d"), failures=True, mc=True)
    _assert_identical_across_ranks(results)
    assert all(r["sqrt_blocks"] == 8 for r in results)
    first, second = (r["failures"] for r in results)
    # the rank whose extraction failed raises its own error, the other names it
    assert "IndexError" in second["local_error"] or "out of bounds" in second["local_error"], second
    assert first["local_error"].startswith("RankFailedError") and "rank 1" in first["local_error"], first
    assert "empty shard" in second["empty_shard"] and "rank 1" in first["empty_shard"], (first, second)
    assert first["parameters"] == second["parameters"], (first, second)
    assert "parameters differ" in first["parameters"], first
    assert first["dtypes"] == second["dtypes"] and "parameters' dtypes differ between ranks" in first["dtypes"]
    for key in ("options_damping", "options_top_k", "options_label_smoothing"):
        assert first[key] == second[key] and "the ranks disagree on the options" in first[key], (first, second)
        # naming what differs
        assert f"first difference: {'loss' if key.endswith('smoothing') else 'options.' + key[8:]}: " in first[key], first[key]
    for call in ("extract", "compare"):
        said = first[f"batchnorm_{call}"]
        assert said == second[f"batchnorm_{call}"] and "BatchNorm normalising with batch statistics" in said, said
    assert first["batch_mean"] == second["batch_mean"] and "forward couples the examples" in first["batch_mean"]
    assert first["after"] == second["after"] == "2"


def test_four_ranks_equal_one_process_and_sub_group() -> None:
    results = run_ranks(_equality_worker, 4, CASES_4, ("mlp", "cnn", "conv1d"), subgroup_case=SUBGROUP_CASE)
    _assert_identical_across_ranks(results)
    assert all(r["sqrt_blocks"] == 8 for r in results)
    assert "subgroup_blocks" not in results[0]
    assert all(r["subgroup_blocks"] == 3 for r in results[1:])


# --- the harness itself: a failing, crashing or hanging rank fails the run, never hangs it


def _raise_on_rank_one() -> None:
    if torch.distributed.get_rank() == 1:
        raise ValueError("rank one fails on purpose")
    torch.distributed.barrier()  # rank 0 waits for rank 1 forever (the group's timeout is 60 s)


def _crash_on_rank_one() -> None:
    if torch.distributed.get_rank() == 1:
        os._exit(3)
    torch.distributed.barrier()


def _hang_on_rank_zero() -> int:
    if torch.distributed.get_rank() == 0:
        time.sleep(600)
    return 1


def test_raising_rank_fails_the_run_with_its_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(RankError, match="rank one fails on purpose") as info:
        run_ranks(_raise_on_rank_one, 2, timeout=60)
    assert info.value.rank == 1
    assert "Traceback" in str(info.value) and "_raise_on_rank_one" in str(info.value)
    assert time.monotonic() - start < 30  # well before the process group's own timeout


def test_crashing_rank_fails_the_run() -> None:
    with pytest.raises(RankError, match="exited with code 3") as info:
        run_ranks(_crash_on_rank_one, 2, timeout=60)
    assert info.value.rank == 1


def test_hanging_rank_times_out() -> None:
    """(15 s: time for both ranks to start and join the group on a loaded machine, where 6 s
    ended during the ranks' start-up, with a rank's broken connection reported instead.)"""
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0\b"):  # rank 1 too if it is slow to start
        run_ranks(_hang_on_rank_zero, 2, timeout=15)
    assert time.monotonic() - start < 40


# --- in this process: no spawn needed


def test_one_rank_group_and_missing_group(tmp_path) -> None:
    """Without a process group: a clear error; a group of one: exactly one process's result."""
    import torch.distributed as dist

    import curvlab
    import curvlab.distributed as cd

    net, loss_fn, x, y = _setting("cnn", "ce", "mean", 4)
    opts = {"approximations": NO_KFOC, **OPTIONS}
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        cd.compare(net, loss_fn, x, y, **opts)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        got = cd.compare(net, loss_fn, x, y, **opts)
    finally:
        dist.destroy_process_group()
    ref = curvlab.compare(net, loss_fn, x, y, **opts)
    assert_same_dataset(got, ref, "one rank")
    assert got.attrs["world_size"] == 1


def _extract_with_label_smoothing_of_rank() -> str:
    import curvlab.distributed as cd
    from helpers import batch, tiny_mlp

    rank = torch.distributed.get_rank()
    net = tiny_mlp()
    x, y = batch(net, nn.CrossEntropyLoss(), 4)
    try:
        cd.extract(net, nn.CrossEntropyLoss(label_smoothing=0.1 * rank), x[2 * rank: 2 * rank + 2], y[2 * rank: 2 * rank + 2])
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_distributed_extract_refuses_ranks_whose_label_smoothing_differs() -> None:
    """The same loss type and reduction, another label smoothing: a different gradient and
    empirical Fisher on each rank; curvlab.distributed.compare refused it, extract summed them."""
    said = run_ranks(_extract_with_label_smoothing_of_rank, 2)
    assert said[0] == said[1] and "the ranks disagree on the loss" in said[0], said
