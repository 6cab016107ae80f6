"""Property-based checks on random small networks: a clear curvlab error or a finite, correct
result — never a wrong number, a hang or a raw traceback.

Hypothesis draws networks (depth, widths, Linear/Conv2d with stride, padding and dilation,
activations, bias or not), batch sizes from 1, losses and reductions, dtypes (float64 for the
exact checks, float32 and bfloat16 for finiteness).  The references are dense torch.func
computations (tests/helpers.py), in float64:

* extract: the square root's block is the dense GGN, KFAC's factors are their definition, and
  ``tr`` of TKFAC, EKFAC and TEKFAC is ``tr F``;
* compare: every metric of a nonzero block is finite and trace-preserving ones have ratio 1; a
  zero block is explained by a warning;
* every optimizer: one step is ``θ − lr (K + λI)⁻¹ g`` with ``K`` its approximation built from
  the dense definitions; in low precision the steps stay finite or are skipped with a warning.

The examples are derandomized (a fixed seed, no example database), so CI runs the same ones
every time; ``max_examples`` keeps the whole file under two minutes on two cores.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import curvlab
from curvlab.optim import EKFAC, KFAC, TEKFAC, TKFAC
from helpers import dense_ggn, dense_grad, dense_kfac, partial_traces, torch_threads

PROFILE = dict(derandomize=True, database=None, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Identity)
OPTIMIZERS = (KFAC, EKFAC, TKFAC, TEKFAC)
#: Messages of curvlab's own errors start with the component that raised them.
CLEAR = re.compile(r"^(curvlab[ .:]|approximate|KFAC|EKFAC|TKFAC|TEKFAC|LayerStats)")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest, and two processes on two cores do not fight."""
    with torch_threads(1):
        yield


@dataclass(frozen=True)
class Net:
    """A drawn network: its layers as constructor arguments, the input shape, the outputs."""

    layers: tuple[tuple, ...]
    input_shape: tuple[int, ...]
    outputs: int

    def build(self, dtype: torch.dtype, seed: int) -> nn.Sequential:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            modules: list[nn.Module] = []
            for kind, *args in self.layers:
                if kind == "conv":
                    c_in, c_out, k, s, p, d, bias = args
                    modules.append(nn.Conv2d(c_in, c_out, k, stride=s, padding=p, dilation=d, bias=bias))
                elif kind == "linear":
                    modules.append(nn.Linear(*args[:2], bias=args[2]))
                elif kind == "flatten":
                    modules.append(nn.Flatten())
                else:
                    modules.append(args[0]())
            return nn.Sequential(*modules).to(dtype)


@st.composite
def nets(draw: st.DrawFn) -> Net:
    layers: list[tuple] = []
    if draw(st.booleans()):  # convolutions first
        c, h, w = draw(st.integers(1, 2)), draw(st.integers(2, 5)), draw(st.integers(2, 5))
        shape: tuple[int, ...] = (c, h, w)
        for _ in range(draw(st.integers(1, 2))):
            k, s, p, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1)), draw(st.integers(1, 2))
            h_out, w_out = ((size + 2 * p - d * (k - 1) - 1) // s + 1 for size in (h, w))
            if min(h_out, w_out) < 1:
                k, d, h_out, w_out = 1, 1, (h + 2 * p - 1) // s + 1, (w + 2 * p - 1) // s + 1
            c_out = draw(st.integers(1, 3))
            layers += [("conv", c, c_out, k, s, p, d, draw(st.booleans())), ("act", draw(st.sampled_from(ACTIVATIONS)))]
            c, h, w = c_out, h_out, w_out
        layers.append(("flatten",))
        width = c * h * w
    else:
        width = draw(st.integers(1, 4))
        shape = (width,)
    for _ in range(draw(st.integers(0, 2))):
        new = draw(st.integers(1, 4))
        layers += [("linear", width, new, draw(st.booleans())), ("act", draw(st.sampled_from(ACTIVATIONS)))]
        width = new
    outputs = draw(st.integers(1, 3))
    layers.append(("linear", width, outputs, draw(st.booleans())))
    return Net(tuple(layers), shape, outputs)


@st.composite
def problems(draw: st.DrawFn, reductions: tuple[str, ...] = ("mean", "sum")) -> tuple:
    """(net, loss_fn, N, seed)."""
    net = draw(nets())
    loss = nn.CrossEntropyLoss if draw(st.booleans()) else nn.MSELoss
    return net, loss(reduction=draw(st.sampled_from(reductions))), draw(st.integers(1, 4)), draw(st.integers(0, 2**16))


def batch(net: Net, loss_fn: nn.Module, n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *net.input_shape, generator=gen, dtype=torch.float64).to(dtype)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return x, torch.randint(0, net.outputs, (n,), generator=gen)
    return x, torch.randn(n, net.outputs, generator=gen, dtype=torch.float64).to(dtype)


def layer_indices(model: nn.Sequential) -> list[int]:
    return [i for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv2d))]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-7) -> None:
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-12, msg=lambda m: f"{what}: {m}")


def clear_error(err: BaseException) -> bool:
    return isinstance(err, (ValueError, TypeError)) and bool(CLEAR.match(str(err)))


# ------------------------------------------------------------------------------ extract


@settings(max_examples=25, **PROFILE)
@given(problems(reductions=("mean", "sum", "none")))
def test_extract_is_exact_or_refuses(problem: tuple) -> None:
    net, loss_fn, n, seed = problem
    model = net.build(torch.float64, seed)
    x, y = batch(net, loss_fn, n, seed, torch.float64)
    try:
        stats = curvlab.extract(model, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"))
    except Exception as err:
        assert clear_error(err) and loss_fn.reduction == "none", repr(err)
        return
    assert loss_fn.reduction != "none"
    for index in layer_indices(model):
        name, block = str(index), stats[str(index)]
        dense = dense_ggn(model, loss_fn, x, y, name)
        assert_close(block.dense_fisher(), dense, f"F of layer {name}")
        a, g = dense_kfac(model, loss_fn, x, y, index)
        assert_close(block.kfac["exact"].A, a, f"A of layer {name}")
        assert_close(block.kfac["exact"].G, g, f"G of layer {name}")
        trace = dense.trace()
        assert_close(block.tkfac.delta, trace, f"δ of layer {name}")
        for approx in ("tkfac", "ekfac", "tekfac"):
            assert_close(curvlab.approximate(block, approx).trace(), trace, f"tr {approx} of layer {name}")


@settings(max_examples=25, **PROFILE)
@given(problems(), st.sampled_from(["mc", "empirical"]), st.sampled_from([torch.float32, torch.float64]))
def test_extract_of_every_flavour_is_finite(problem: tuple, fisher: str, dtype: torch.dtype) -> None:
    net, loss_fn, n, seed = problem
    model = net.build(dtype, seed)
    x, y = batch(net, loss_fn, n, seed, dtype)
    stats = curvlab.extract(model, loss_fn, x, y, fisher=fisher, stats=("sqrt", "kfac", "tkfac"), seed=seed)
    for name, block in stats.items():
        for tensor in (block.sqrt.gram(), block.kfac[fisher].A, block.kfac[fisher].G, block.tkfac.delta_phi, block.grad):
            assert bool(torch.isfinite(tensor).all()), name


# ------------------------------------------------------------------------------ compare


@settings(max_examples=20, **PROFILE)
@given(problems(), st.integers(1, 3), st.sampled_from([1e-3, 1e-1]))
def test_compare_is_finite_or_says_why_not(problem: tuple, top_k: int, damping: float) -> None:
    net, loss_fn, n, seed = problem
    model = net.build(torch.float64, seed)
    x, y = batch(net, loss_fn, n, seed, torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = curvlab.compare(model, loss_fn, x, y, approximations=("kflr", "ekfac", "tkfac", "tekfac", "kfoc"),
                             top_k=top_k, num_eigenvalues=8, damping=damping)
    explained = {m.group(1) for w in caught for m in [re.search(r"layer '([^']+)' is zero", str(w.message))] if m}
    for layer in ds.layer.values:
        row = ds.sel(layer=layer)
        if float(row.exact_trace) == 0:
            assert str(layer) in explained  # F = 0: the relative metrics are NaN, and a warning says why
            continue
        for var in ("trace_ratio", "rel_frobenius_error", "projection_error", "scaling_error", "ng_cosine", "subspace_overlap"):
            assert bool(torch.isfinite(torch.as_tensor(row[var].values)).all()), (layer, var)
        for approx in ("ekfac", "tkfac", "tekfac"):
            assert abs(float(row.trace_ratio.sel(approximation=approx)) - 1) < 1e-8, (layer, approx)


# ------------------------------------------------------------------------------ optimizers

#: One step is the damped natural gradient of the batch's own approximation.
EXACT = dict(fisher="exact", stat_decay=0.0, stats_interval=1, eigen_interval=1, scale_interval=1,
             momentum=0.0, weight_decay=0.0, kl_clip=None, damping_strategy="exact", factor_dtype="float64")


def kronecker_reference(cls: type, model: nn.Sequential, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        index: int, layout) -> torch.Tensor:
    """The method's ``K`` of the first step, in matrix order, from dense definitions: ``G ⊗ A``
    for KFAC and EKFAC (whose first scaling is the Kronecker one), ``δΨ ⊗ δΦ / δ`` for TKFAC and
    TEKFAC (``K = 0`` where ``δ = 0``)."""
    if cls in (KFAC, EKFAC):
        a, g = dense_kfac(model, loss_fn, x, y, index)
        return torch.kron(g.contiguous(), a.contiguous())
    phi, psi = partial_traces(dense_ggn(model, loss_fn, x, y, str(index)), layout)
    delta = phi.trace()
    if delta == 0:
        return torch.zeros(layout.num_params, layout.num_params, dtype=torch.float64)
    return torch.kron(psi.contiguous(), phi.contiguous()) / delta


@pytest.mark.filterwarnings("ignore:.*is a multiple of eigen_interval:UserWarning")  # one step: a refresh
@settings(max_examples=12, **PROFILE)
@given(problems(), st.sampled_from([1e-3, 1e-1, 1.0]))
def test_one_step_of_every_optimizer_is_the_damped_natural_gradient(problem: tuple, damping: float) -> None:
    net, loss_fn, n, seed = problem
    lr = 0.1
    for cls in OPTIMIZERS:
        model = net.build(torch.float64, seed)
        x, y = batch(net, loss_fn, n, seed, torch.float64)
        opt = cls(model, lr=lr, damping=damping, **EXACT)
        expected = {}
        for block in opt.blocks():
            index, layout = int(block.name), block.layout
            k = kronecker_reference(cls, model, loss_fn, x, y, index, layout)
            g = layout.to_matrix(dense_grad(model, loss_fn, x, y, block.name)).flatten()
            step = torch.linalg.solve(k + damping * torch.eye(len(g), dtype=torch.float64), g)
            expected[block.name] = block.param_matrix().detach().flatten() - lr * step
        opt.zero_grad()
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
        opt.step()
        assert opt.steps_done == 1
        for block in opt.blocks():
            got = block.param_matrix().detach().flatten()
            before = expected[block.name]
            assert_close(got, before, f"{cls.__name__} step of layer {block.name}", rtol=1e-6)


@settings(max_examples=12, **PROFILE)
@given(problems(), st.sampled_from([torch.bfloat16, torch.float32]), st.sampled_from(OPTIMIZERS))
def test_low_precision_steps_stay_finite_or_are_skipped(problem: tuple, dtype: torch.dtype, cls: type) -> None:
    net, loss_fn, n, seed = problem
    model = net.build(dtype, seed)
    x, y = batch(net, loss_fn, n, seed, dtype)
    opt = cls(model, lr=0.1, stats_interval=1, eigen_interval=2, scale_interval=1)
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with opt.track(loss_fn):
                loss_fn(model(x), y).backward()
            done = opt.steps_done
            opt.step()
        if opt.steps_done == done:  # skipped: said so, nothing changed
            assert any("skipped" in str(w.message) for w in caught)
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_hypothesis_draws_every_layer_kind() -> None:
    """The strategy reaches convolutions with stride, padding and dilation, and a batch of one."""
    seen: set[str] = set()

    @settings(max_examples=60, **PROFILE)
    @given(problems())
    def collect(problem: tuple) -> None:
        net, _, n, _ = problem
        for kind, *args in net.layers:
            if kind == "conv":
                seen.update(f"conv-{what}" for what, value in zip(("k", "stride", "padding", "dilation"), args[2:6]) if value > 1 or (what == "padding" and value > 0))
            seen.add(kind)
        seen.add(f"n={n}")

    collect()
    assert {"conv", "linear", "conv-stride", "conv-padding", "conv-dilation", "n=1"} <= seen
