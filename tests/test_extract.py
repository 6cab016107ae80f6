"""Extraction against dense torch.func references, BackPACK and invariants (float64)."""

from __future__ import annotations

import inspect
import itertools
import warnings

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import KFLR, BatchGrad, SqrtGGNExact, SqrtGGNMC
from torch import nn

from curvlab.compare import compare
from curvlab.extract import ExtractionSession, extract, maths
from curvlab.model_blocks import UnsupportedModelError
from helpers import (
    batch,
    dense_empirical,
    dense_ggn,
    dense_grad,
    dense_kfac,
    im2col,
    partial_traces,
    tiny_cnn,
    tiny_decoder,
    tiny_mlp,
)

MODELS = {"mlp": tiny_mlp, "cnn": tiny_cnn, "decoder": tiny_decoder}
LOSSES = {
    "ce-mean": lambda: nn.CrossEntropyLoss(),
    "ce-sum": lambda: nn.CrossEntropyLoss(reduction="sum"),
    "mse-mean": lambda: nn.MSELoss(),
    "mse-sum": lambda: nn.MSELoss(reduction="sum"),
    "bce-mean": lambda: nn.BCEWithLogitsLoss(),
    "bce-sum": lambda: nn.BCEWithLogitsLoss(reduction="sum"),
}
SETTINGS = list(itertools.product(MODELS, LOSSES))
RTOL = 1e-10


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-300)
    assert err < rtol, f"relative error {err:.2e}"


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]


@pytest.mark.filterwarnings("ignore:Using a target size")  # torch's, before the refusal
@pytest.mark.parametrize("engine", ["backpack", "autograd"])
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_cross_entropy_with_class_probabilities_or_another_ignore_index(engine: str, fisher: str) -> None:
    """Class-probability targets (both engines) and a CrossEntropyLoss whose ignore_index no
    target uses (autograd; ``auto`` picks it, BackPACK refuses it by name): the dense blocks."""
    model = tiny_mlp()
    x, labels = batch(model, nn.CrossEntropyLoss(), n=4)
    soft = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=x.dtype), 1)
    reference = dense_ggn if fisher == "exact" else dense_empirical
    # probabilities made in float32 sum to one only within its rounding (here ~5e-8), as a user's
    # are: accepted, and their blocks are the loss's to that precision (BackPACK's exact GGN takes
    # the sum as one, the loss's Hessian scales by it)
    soft32 = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), 1).to(x.dtype)
    assert float((soft32.sum(1) - 1).abs().max()) > 1e-8
    cases = [(nn.CrossEntropyLoss(), soft, engine), (nn.CrossEntropyLoss(), soft32, engine)]
    if engine == "autograd":
        cases += [(nn.CrossEntropyLoss(ignore_index=1, reduction="sum"), torch.where(labels == 1, 0, labels), e)
                  for e in ("autograd", "auto")]
    for loss_fn, y, chosen in cases:
        stats = extract(model, loss_fn, x, y, fisher=fisher, stats=("sqrt",), engine=chosen)
        rtol = 1e-6 if y is soft32 else RTOL
        for name, block in stats.items():
            close(block.dense_fisher(), reference(model, loss_fn, x, y, name), rtol)
            close(block.layout.to_vector(block.grad), dense_grad(model, loss_fn, x, y, name), rtol)
    if engine == "backpack":
        with pytest.raises(UnsupportedModelError, match="ignore_index=1, BackPACK implements the default -100 only"):
            extract(model, nn.CrossEntropyLoss(ignore_index=1), x, labels.clamp(max=0), engine="backpack")
    for bad in (2 * soft, soft - 0.1, soft * (1 - 1e-3)):
        with pytest.raises(ValueError, match="class-probability targets must be non-negative and sum to one"):
            extract(model, nn.CrossEntropyLoss(), x, bad, engine=engine)
    with pytest.raises(ValueError, match=r"targets of shape \(4, 1\) for outputs \(4, 3\)"):
        extract(model, nn.MSELoss(), x, soft[:, :1], engine=engine)


@pytest.mark.parametrize("model_name,loss_name", SETTINGS)
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_block_square_root_and_gradient(model_name: str, loss_name: str, fisher: str) -> None:
    model, loss_fn = MODELS[model_name](), LOSSES[loss_name]()
    x, y = batch(model, loss_fn, n=4)
    stats = extract(model, loss_fn, x, y, fisher=fisher, stats=("sqrt",))
    assert list(stats) == layer_names(model)
    reference = dense_ggn if fisher == "exact" else dense_empirical
    for name, block in stats.items():
        close(block.dense_fisher(), reference(model, loss_fn, x, y, name))
        close(block.layout.to_vector(block.grad), dense_grad(model, loss_fn, x, y, name))
        close(block.sqrt.trace(), block.dense_fisher().trace())


@pytest.mark.parametrize("model_name,loss_name", SETTINGS)
def test_kfac_factors_and_tkfac_statistics(model_name: str, loss_name: str) -> None:
    model, loss_fn = MODELS[model_name](), LOSSES[loss_name]()
    x, y = batch(model, loss_fn, n=3)
    stats = extract(model, loss_fn, x, y, fisher="exact", stats=("kfac", "tkfac"))
    for index, name in enumerate(stats):
        idx = int(name)
        a, g = dense_kfac(model, loss_fn, x, y, idx)
        close(stats[name].kfac["exact"].A, a)
        close(stats[name].kfac["exact"].G, g)
        dense = dense_ggn(model, loss_fn, x, y, name)
        phi, psi = partial_traces(dense, stats[name].layout)
        tk = stats[name].tkfac
        close(tk.delta_phi, phi)  # δΦ = Σ M_kᵀ M_k
        close(tk.delta_psi, psi)  # δΨ = Σ M_k M_kᵀ
        close(tk.delta, dense.trace())  # δ = tr F


def test_conv_kfc_form_differs_and_matches_definition() -> None:
    """The KFC-style conv TKFAC form: Λ_n = Σ_t ā āᵀ, Γ = (1/T) Σ_t g gᵀ."""
    model, loss_fn = tiny_cnn(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=3)
    exact = extract(model, loss_fn, x, y, stats=("tkfac", "sqrt"))["0"]
    kfc = extract(model, loss_fn, x, y, stats=("tkfac",), tkfac_conv="kfc")["0"]
    assert kfc.tkfac.form == "kfc" and exact.tkfac.form == "exact"
    # reference from explicit unfolded inputs and output-side roots
    from helpers import layer_input_and_output_jacobian
    from torch.func import hessian

    inp, jac, out = layer_input_and_output_jacobian(model, 0, x)
    xs = torch.cat([im2col(inp, model[0]), torch.ones(3, 1, 9, dtype=torch.float64)], 1)  # [N, D, T]
    hess = hessian(lambda o: loss_fn(o, y))(out)
    hn = hess[torch.arange(3), :, torch.arange(3)]
    gamma = torch.einsum("ncot,ncd,ndpt->nop", jac, hn, jac) / 9  # Σ_c Γ_nc per example
    lam = torch.einsum("ndt,net->nde", xs, xs)
    tr_g = torch.einsum("noo->n", gamma)
    tr_l = torch.einsum("ndd->n", lam)
    close(kfc.tkfac.delta, (tr_g * tr_l).sum())
    close(kfc.tkfac.delta_phi, torch.einsum("n,nde->de", tr_g, lam))
    close(kfc.tkfac.delta_psi, torch.einsum("n,nop->op", tr_l, gamma))
    assert (kfc.tkfac.delta - exact.tkfac.delta).abs() > 1e-6  # not trace-preserving here


def test_conv_convention_t_goes_into_a() -> None:
    """Documented conv convention: A averages over N·T locations, G sums over them."""
    model, loss_fn = tiny_cnn(), nn.MSELoss(reduction="sum")
    x, y = batch(model, loss_fn, n=2)
    block = extract(model, loss_fn, x, y, stats=("kfac",))["0"]
    xs = im2col(x, model[0])
    t = xs.shape[-1]
    assert t == 9 and block.num_locations == 9
    close(block.kfac["exact"].A[:-1, :-1], torch.einsum("ndt,net->de", xs, xs) / (2 * t))
    close(block.kfac["exact"].A[-1, -1], torch.tensor(1.0, dtype=torch.float64))


def test_kflr_is_exact_block_for_one_example_linear_layer() -> None:
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=1)
    for name, block in extract(model, loss_fn, x, y, stats=("kfac", "sqrt")).items():
        kf = block.kfac["exact"]
        kron = torch.kron(kf.G.contiguous(), kf.A.contiguous())
        perm = block.layout.permutation()
        close(kron[perm][:, perm], block.dense_fisher())


def test_separate_bias_blocks() -> None:
    model, loss_fn = tiny_cnn(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=3)
    joint = extract(model, loss_fn, x, y, stats=("sqrt",))
    sep = extract(model, loss_fn, x, y, stats=("sqrt", "tkfac"), separate_bias=True)
    assert "0.weight" in sep and "0.bias" in sep
    for name, block in joint.items():
        dense = block.dense_fisher()
        pw = sep[f"{name}.weight"].num_params
        close(sep[f"{name}.weight"].dense_fisher(), dense[:pw, :pw])
        close(sep[f"{name}.bias"].dense_fisher(), dense[pw:, pw:])
        close(sep[f"{name}.bias"].tkfac.delta, dense[pw:, pw:].trace())


@pytest.mark.parametrize("separate_bias", [False, True])
def test_session_gradient_is_a_copy_of_grad(separate_bias: bool) -> None:
    """A session's ``grad`` is the gradient when it was read, whether it joins a bias column or
    is one parameter's: changing ``.grad`` afterwards leaves it as it was."""
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=4)
    with ExtractionSession(model, loss_fn, stats=("kfac",), separate_bias=separate_bias) as session:
        loss_fn(model(x), y).backward()
    stats = session.results()
    kept = {name: s.grad.clone() for name, s in stats.items()}
    for p in model.parameters():
        p.grad.add_(1.0)
    for name, s in stats.items():
        assert torch.equal(s.grad, kept[name]), name
    weight = stats["0.weight" if separate_bias else "0"].grad[:, : model[0].in_features]
    close(weight, model[0].weight.grad - 1.0)


def _session_run(engine: str, body) -> str:
    """The error message of ``body(model, loss_fn, x, y)`` run in a session of ``engine``, and
    then ``results()``; the model (BackPACK can run it) is left without gradients."""
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=6)
    with pytest.raises(RuntimeError) as err:
        with ExtractionSession(model, loss_fn, stats=("kfac",), engine=engine) as session:
            body(model, loss_fn, x, y)
        session.results()
    return str(err.value)


@pytest.mark.parametrize("engine", ["backpack", "autograd"])
def test_session_refuses_what_is_not_one_pass(engine: str) -> None:
    """Both engines refuse, by the same rule: a second loss (micro-batches — BackPACK kept the
    last one's statistics beside the sum of both gradients), a loss the session does not see
    (BackPACK failed in its own assertion), and no backward pass (the autograd engine returned
    statistics with no gradient)."""

    def micro_batches(model, loss_fn, x, y):
        loss_fn(model(x[:3]), y[:3]).backward()
        loss_fn(model(x[3:]), y[3:]).backward()

    def other_loss(model, loss_fn, x, y):
        nn.functional.cross_entropy(model(x), y).backward()

    def no_backward(model, loss_fn, x, y):
        loss_fn(model(x), y)

    assert "loss_fn was called twice" in _session_run(engine, micro_batches)
    assert "loss_fn was not called" in _session_run(engine, other_loss)
    assert "no backward pass went through the loss" in _session_run(engine, no_backward)


@pytest.mark.parametrize("engine", ["backpack", "autograd"])
@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_session_statistics_ignore_a_scaled_backward(engine: str, fisher: str) -> None:
    """A backward from c·loss (a GradScaler; a micro-batch's weight in gradient accumulation)
    gives the statistics of the loss itself, without BackPACK's warning: BackPACK's empirical
    Fisher was scaled by c²."""
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=6)
    results = []
    for c in (1.0, 1024.0, 0.375):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with ExtractionSession(model, loss_fn, engine=engine, fisher=fisher, stats=("sqrt", "kfac", "tkfac"),
                                   seed=3) as session:
                (c * loss_fn(model(x), y)).backward()
        results.append(session.results()["2"])
        model.zero_grad()
    for r in results[1:]:
        close(r.sqrt.gram(), results[0].sqrt.gram())
        close(r.kfac[fisher].G, results[0].kfac[fisher].G)
        close(r.tkfac.delta, results[0].tkfac.delta)


@pytest.mark.parametrize("engine", ["backpack", "autograd"])
def test_a_session_used_again_gives_each_block_its_own_statistics(engine: str) -> None:
    """A session entered a second time: the autograd engine kept the first block's recording and
    refused the second block's one loss as "called twice", while BackPACK's gave the second
    block's statistics; both give each block's own now, those of extract() on its batch (the
    dense reference), and a block inside a running one is refused."""
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    batches = [batch(model, loss_fn, n=5, seed=s) for s in (1, 2)]
    session = ExtractionSession(model, loss_fn, engine=engine)
    for x, y in batches:
        model.zero_grad()
        with session:
            loss_fn(model(x), y).backward()
        got = session.results()
        for layer in ("0", "2"):
            close(got[layer].dense_fisher(), dense_ggn(model, loss_fn, x, y, layer))
            close(got[layer].layout.to_vector(got[layer].grad), dense_grad(model, loss_fn, x, y, layer))
    with session, pytest.raises(RuntimeError, match="already running"):
        with session:
            pass


def test_session_counts_one_loss_with_the_empirical_root() -> None:
    """The autograd engine's empirical root calls the loss inside the user's call: one loss."""
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=4)
    with ExtractionSession(model, loss_fn, fisher="empirical", stats=("sqrt",), engine="autograd") as session:
        loss_fn(model(x), y).backward()
    close(session.results()["0"].sqrt.gram(), extract(model, loss_fn, x, y, fisher="empirical",
                                                        stats=("sqrt",), engine="backpack")["0"].sqrt.gram())


@pytest.mark.filterwarnings("ignore:The Kronecker factors stored in the weight parameters of transpose")
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "decoder"])
def test_matches_backpack_extensions(model_name: str) -> None:
    """Same roots as BackPACK's SqrtGGNExact/SqrtGGNMC (same seed), BatchGrad and KFLR (the
    decoder without output_padding: BackPACK's own transposed-convolution weight quantities
    unfold without it, and fail on it)."""
    model, loss_fn = MODELS[model_name](), nn.CrossEntropyLoss()
    if model_name == "decoder":
        model[0].output_padding = (0, 0)  # → 3×5×5, then 2×7×7
        model[4] = nn.Linear(98, 3).double()
    x, y = batch(model, loss_fn, n=4)
    exact = extract(model, loss_fn, x, y, stats=("sqrt", "kfac"))
    mc = extract(model, loss_fn, x, y, fisher="mc", mc_samples=3, stats=("sqrt",), seed=7)
    emp = extract(model, loss_fn, x, y, fisher="empirical", stats=("sqrt",))

    ext_model, ext_loss = extend(tiny_copy(model)), extend(nn.CrossEntropyLoss())
    torch.manual_seed(7)
    with backpack(SqrtGGNExact(), SqrtGGNMC(mc_samples=3), BatchGrad(), KFLR()):
        ext_loss(ext_model(x), y).backward()
    for name in exact:
        w = dict(ext_model.named_modules())[name].weight
        wb = [p for p in (w, dict(ext_model.named_modules())[name].bias) if p is not None]
        for ours, field in ((exact[name], "sqrt_ggn_exact"), (mc[name], "sqrt_ggn_mc")):
            theirs = torch.cat([getattr(p, field).flatten(2) for p in wb], 2)
            close(ours.sqrt.columns(ours.layout), theirs.flatten(0, 1))
        # BatchGrad holds ∇ℓ_n / N; ours is √R ∇ℓ_n with R = 1/N.
        bg = torch.cat([p.grad_batch.flatten(1) for p in wb], 1)
        close(emp[name].sqrt.columns(emp[name].layout), bg * x.shape[0] ** 0.5)
        if isinstance(dict(model.named_modules())[name], nn.Linear):
            g_bp, a_bp = w.kflr
            close(exact[name].kfac["exact"].G, g_bp)
            close(exact[name].kfac["exact"].A[:-1, :-1], a_bp)


def tiny_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("engine", ["backpack", "autograd"])
def test_bce_roots_match_backpacks_where_it_has_them(engine: str) -> None:
    """BackPACK's BCEWithLogitsLoss roots exist for one output per example and 0/1 targets: the
    same exact root and, under one seed, the same Monte-Carlo draws (σ − Binomial(σ))."""
    torch.manual_seed(0)
    model, loss_fn = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double(), nn.BCEWithLogitsLoss()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (6, 1)).double()
    exact = extract(model, loss_fn, x, y, stats=("sqrt",), engine=engine)
    mc = extract(model, loss_fn, x, y, fisher="mc", mc_samples=5, stats=("sqrt",), seed=7, engine=engine)
    ext_model, ext_loss = extend(tiny_copy(model)), extend(nn.BCEWithLogitsLoss())
    torch.manual_seed(7)
    with backpack(SqrtGGNExact(), SqrtGGNMC(mc_samples=5)):
        ext_loss(ext_model(x), y).backward()
    for name in exact:
        w, b = dict(ext_model.named_modules())[name].weight, dict(ext_model.named_modules())[name].bias
        for ours, field in ((exact[name], "sqrt_ggn_exact"), (mc[name], "sqrt_ggn_mc")):
            theirs = torch.cat([getattr(w, field).flatten(2), getattr(b, field).flatten(2)], 2)
            close(ours.sqrt.columns(ours.layout), theirs.flatten(0, 1))


@pytest.mark.parametrize("loss_fn", [nn.BCEWithLogitsLoss(), nn.MSELoss(reduction="sum")], ids=["bce", "mse"])
def test_one_output_per_example(loss_fn) -> None:
    """A binary classifier's [N] logits (or a regression's [N] outputs) with [N] targets: one
    term of one output per example, on the autograd engine ('auto' falls back to it: BackPACK's
    losses take [N, C])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(0)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    for fisher, reference in (("exact", dense_ggn), ("empirical", dense_empirical)):
        stats = extract(model, loss_fn, x, y, fisher=fisher, stats=("sqrt", "kfac"))
        assert stats.engine == "autograd" and "BackPACK's losses take [N, C]" in stats.engine_reason
        for name in ("0", "2"):
            close(stats[name].dense_fisher(), reference(model, loss_fn, x, y, name))


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.BCEWithLogitsLoss()], ids=["ce", "bce"])
def test_mc_converges_to_exact(loss_fn) -> None:
    model = tiny_mlp()
    x, y = batch(model, loss_fn, n=4)
    exact = extract(model, loss_fn, x, y, stats=("sqrt",))
    mc = extract(model, loss_fn, x, y, fisher="mc", mc_samples=4000, stats=("sqrt", "kfac"), seed=0)
    for name in exact:
        err = (mc[name].dense_fisher() - exact[name].dense_fisher()).norm() / exact[name].dense_fisher().norm()
        assert err < 0.1, f"{name}: MC Fisher off by {err:.3f}"
    few = extract(model, loss_fn, x, y, fisher="mc", mc_samples=1, stats=("sqrt",), seed=0)
    err_few = (few["2"].dense_fisher() - exact["2"].dense_fisher()).norm() / exact["2"].dense_fisher().norm()
    assert err_few > 0.1  # one sample is noticeably noisy: the test can fail


def test_stacked_flavours_share_one_pass() -> None:
    """KFAC (mc) and KFLR (exact) factors from one backward; mc factors as a separate run."""
    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=5)
    both = extract(model, loss_fn, x, y, stats=("kfac", "sqrt"), kfac_flavours=("exact", "mc"), seed=3)
    only_mc = extract(model, loss_fn, x, y, fisher="mc", stats=("kfac",), seed=3)
    only_exact = extract(model, loss_fn, x, y, stats=("kfac",))
    for name in both:
        close(both[name].kfac["exact"].G, only_exact[name].kfac["exact"].G)
        close(both[name].kfac["mc"].G, only_mc[name].kfac["mc"].G)
        assert both[name].sqrt.num_columns == 5 * 3  # the reference root is the exact one


def test_kfe_scaling_equals_rotated_square_root() -> None:
    model, loss_fn = tiny_cnn(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=3)
    base = extract(model, loss_fn, x, y, stats=("kfac", "sqrt"))
    bases = {}
    for name, block in base.items():
        bases[name] = (torch.linalg.eigh(block.kfac["exact"].G)[1], torch.linalg.eigh(block.kfac["exact"].A)[1])
    kfe = extract(model, loss_fn, x, y, stats=("kfe",), eigenbases=bases)
    for name, block in base.items():
        u_out, u_in = bases[name]
        q = torch.kron(u_out.contiguous(), u_in.contiguous())
        m = block.sqrt.matrices().flatten(1)  # matrix-form order
        expected = torch.diagonal(q.T @ (m.T @ m) @ q).reshape(block.layout.shape)
        close(kfe[name].kfe_scaling, expected)
        close(block.sqrt.rotated_sq_sum(u_out, u_in), expected)



@pytest.mark.parametrize("truncated", [False, True], ids=["full", "truncated"])
def test_tekfac_statistics_from_one_pass_match_dense_and_separate(truncated: bool) -> None:
    """TEKFAC's statistics step asks for ``("tkfac", "kfe")`` together, which forms each per-sample
    gradient once for both where a convolution has many locations (64 here): δΦ, δΨ, δ and the
    rescaling equal the dense sums over the exact per-sample matrices (full bases) and what
    each statistic gives extracted alone (a truncated input basis too: its complement entry)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(5, 2, 10, 10, dtype=torch.float64), torch.randint(0, 4, (5,))
    base = extract(model, loss_fn, x, y, stats=("kfac", "sqrt"))
    bases = {}
    for name, block in base.items():
        u_out, u_in = (torch.linalg.eigh(f)[1] for f in (block.kfac["exact"].G, block.kfac["exact"].A))
        bases[name] = (u_out, u_in[:, -5:] if truncated else u_in)
    # the convolution takes the shared pass (one MC column, 5 examples, 3 × 18, 64 locations)
    assert maths.shares_per_sample_products(1, 5, 3, 18, 64, 3, bases["0"][1].shape[1])
    both = extract(model, loss_fn, x, y, stats=("tkfac", "kfe"), eigenbases=bases)
    alone = extract(model, loss_fn, x, y, stats=("tkfac",))
    scaling = extract(model, loss_fn, x, y, stats=("kfe",), eigenbases=bases)
    for name, block in base.items():
        m = block.sqrt.matrices()  # [K, d_out, D]
        ts = both[name].tkfac
        close(ts.delta_phi, torch.einsum("kod,koe->de", m, m))
        close(ts.delta_psi, torch.einsum("kod,kpd->op", m, m))
        close(ts.delta, m.square().sum())
        close(ts.delta_phi, alone[name].tkfac.delta_phi)
        close(both[name].kfe_scaling, scaling[name].kfe_scaling)
        if not truncated:
            u_out, u_in = bases[name]
            close(both[name].kfe_scaling, torch.einsum("op,kod,de->kpe", u_out, m, u_in).square().sum(0))

def test_top_level_api_is_callable_and_packages_importable() -> None:
    import curvlab
    import curvlab.compare.metrics  # noqa: F401  (the sub-packages stay importable)
    import curvlab.extract.maths  # noqa: F401

    model, loss_fn = tiny_mlp(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=2)
    via_package = curvlab.extract(model, loss_fn, x, y, stats=("kfac",))
    direct = extract(model, loss_fn, x, y, stats=("kfac",))
    close(via_package["0"].kfac["exact"].A, direct["0"].kfac["exact"].A)
    for package, func in ((curvlab.extract, extract), (curvlab.compare, compare)):  # as notebooks show a call
        assert inspect.signature(package) == inspect.signature(func) and "model" in inspect.signature(package).parameters


# (C, N, d_out, D, T); the last with N·T, D ≥ 256: δΦ's symmetric product in panels
@pytest.mark.parametrize("shape", [(2, 3, 4, 6, 5), (3, 2, 7, 2, 9), (1, 4, 3, 300, 80)])
def test_both_conv_partial_trace_routes_match_per_sample_gradients(shape) -> None:
    """The Gram-over-locations and the chunked route give Σ M_kᵀM_k and Σ M_kM_kᵀ exactly."""
    c, n, d_out, d_in, t = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, t, generator=gen, dtype=torch.float64)
    g = torch.randn(c, n, d_out, t, generator=gen, dtype=torch.float64)
    m = maths.per_sample_gradients(x, g)
    phi_ref, psi_ref = torch.einsum("kod,koe->de", m, m), torch.einsum("kod,kpd->op", m, m)
    for route in (maths.partial_traces_by_gram, maths.partial_traces_by_chunks):
        phi, psi = route(x, g)
        close(phi, phi_ref)
        close(psi, psi_ref)
    close(maths.tkfac_exact(x, g).delta, m.square().sum())


@pytest.mark.parametrize("rows, d", [(300, 260), (256, 1000), (1000, 531)])
def test_symmetric_product_is_the_product_its_operands_give(rows: int, d: int, routes: str) -> None:
    """``symmetric_product(a, b)`` equals ``aᵀb`` for operands whose product is symmetric (a
    Gram, and ``Σ_n X_nᵀ O_n X_n`` with symmetric ``O_n``), including widths its panels do not
    divide; on the CPU (by panels) its lower triangle mirrors the upper one outside the diagonal
    panels (elsewhere one GEMM, symmetric up to rounding)."""
    from curvlab.gram import symmetric_product

    gen = torch.Generator().manual_seed(2)
    a = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    blocks = torch.randn(rows // 4, 4, 4, generator=gen, dtype=torch.float64)
    o = blocks @ blocks.mT  # symmetric 4 × 4 blocks
    b = (o @ a[: rows // 4 * 4].reshape(-1, 4, d)).reshape(-1, d)
    for left, right in ((a, a), (a[: rows // 4 * 4], b), (a.T.contiguous().T, a)):
        got = symmetric_product(left, right)
        close(got, left.T @ right)
        if routes != "as on a GPU":
            assert torch.equal(got.triu(128), got.T.triu(128))


@pytest.mark.usefixtures("routes")
@pytest.mark.parametrize("rows, d", [(5, 9), (9, 5), (12, 785), (800, 785), (16, 32), (300, 64), (70, 145)])
def test_gram_is_the_weighted_sum_of_outer_products(rows: int, d: int) -> None:
    """``gram`` against its definition, with and without weights and scale, on contiguous rows
    on rows that leave room beside them (as ``Block.inputs`` does; here filled with NaN, which
    must not reach the result) and on rows stored along R, over the widths it pads and those it
    does not."""
    from curvlab.gram import gram

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    w = torch.rand(rows, generator=gen, dtype=torch.float64)
    roomy = torch.full((rows, d + (-d % 16) + 16), float("nan"), dtype=torch.float64)
    roomy[:, :d] = x
    for rows_in in (x, roomy[:, :d], x.T.contiguous().T):  # the last: stored along R (conv patches)
        for scale, weights in ((1.0, None), (0.25, None), (0.25, w)):
            want = scale * torch.einsum("r,ri,rj->ij", torch.ones(rows, dtype=torch.float64) if weights is None else weights, x, x)
            got = gram(rows_in, scale, weights)
            assert got.shape == (d, d)
            close(got, want)


def test_syrk_is_there_where_torch_links_mkl() -> None:
    """``curvlab.mkl.syrk`` (BLAS ``syrk`` through the MKL in torch's CPU build) is found wherever
    torch reports MKL and computes ``scale · aᵀa`` in float32 and float64 (against float64 ``mm``)
    for rows stored along R and row-major rows; ``syrk_`` adds ``α aᵀa`` into ``β out`` on the
    upper triangle without reading or writing the lower one; other layouts are refused by name."""
    from curvlab import mkl

    assert mkl.available("syrk", torch.float32) == mkl.available("syrk", torch.float64) == torch.backends.mkl.is_available()
    if not torch.backends.mkl.is_available():
        return
    gen = torch.Generator().manual_seed(4)
    for dtype, rtol in ((torch.float64, RTOL), (torch.float32, 1e-6)):
        along_r = torch.randn(150, 3000, generator=gen, dtype=dtype)[:, 1000:].mT  # [2000, 150], ld 3000
        row_major = torch.randn(2000, 160, generator=gen, dtype=dtype)[:, 5:155]  # ld 160
        for a in (along_r, row_major):
            want = a.double().mT @ a.double()
            got = mkl.syrk(a, 0.3)
            assert got.dtype == dtype and torch.equal(got, got.T)
            close(got.double(), 0.3 * want, rtol)
            before = torch.randn(150, 150, generator=gen, dtype=dtype)
            out = before.clone()
            mkl.syrk_(out, a, 0.3, 0.5)
            upper = torch.ones(150, 150, dtype=torch.bool).triu()
            close(out.double()[upper], (0.3 * want + 0.5 * before.double())[upper], rtol)
            assert torch.equal(out[~upper], before[~upper])
    with pytest.raises(ValueError, match="syrk: needs"):
        mkl.syrk(torch.randn(300, 128)[:, ::2])  # neither rows nor columns contiguous


@pytest.mark.usefixtures("routes")
def test_kfac_factors_of_a_wide_convolution_match_dense() -> None:
    """A convolution whose patches are 73 wide (8 channels, 3×3, bias), more than ``gram`` needs
    to form ``A`` by ``syrk`` from the autograd engine's ``[D, N·T]`` patches, by both engines
    against the dense KFAC factors."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(144, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=3)
    a, g = dense_kfac(model, loss_fn, x, y, 0)
    for engine in ("backpack", "autograd"):
        factors = extract(model, loss_fn, x, y, fisher="exact", stats=("kfac",), engine=engine)["0"].kfac["exact"]
        close(factors.A, a)
        close(factors.G, g)


@pytest.mark.usefixtures("routes")
@pytest.mark.parametrize("rows, d, ld", [(7, 20, 20), (300, 260, 260), (256, 785, 785), (1024, 785, 800), (900, 96, 0)])
def test_add_gram_takes_rows_into_a_symmetric_average(rows: int, d: int, ld: int) -> None:
    """``add_gram_`` (a running average taking in rows) against ``β X + Σ w x xᵀ`` in float64, in
    place on the upper triangle, with the lower one restored by ``mirror_upper_``: widths updated
    in one product, in panels (≥ 256), and by ``syrk`` (row-major rows at leading dimension 800,
    rows stored along R: ``ld`` 0), with per-row weights and with one weight for all."""
    from curvlab.gram import add_gram_
    from curvlab.mkl import mirror_upper_

    gen = torch.Generator().manual_seed(2)
    memory = torch.randn(d, rows, generator=gen, dtype=torch.float64).mT if ld == 0 else \
        torch.randn(rows, ld, generator=gen, dtype=torch.float64)
    x = memory[:, :d]
    b = torch.randn(d, d, generator=gen, dtype=torch.float64)
    for w in (torch.rand(rows, generator=gen, dtype=torch.float64), torch.full((rows,), 0.3, dtype=torch.float64)):
        average = b @ b.T
        want = 0.75 * average + torch.einsum("r,ri,rj->ij", w, x, x)
        got = add_gram_(average, x, w, 0.75)
        assert got.data_ptr() == average.data_ptr()
        close(mirror_upper_(got), want)


@pytest.mark.parametrize("engine", ["backpack", "autograd"])
@pytest.mark.parametrize("residual", [False, True], ids=["sequential", "residual"])
def test_a_compiled_model_is_extracted_as_the_model_it_compiled(engine: str, residual: bool) -> None:
    """``torch.compile``'s wrapper forwards attribute writes to the model: BackPACK's conversion
    of a shallow copy of it replaced the user's model's submodules (it had no parameters left);
    the autograd engine's vmap cannot run a compiled backward."""
    model, loss_fn = tiny_cnn(), nn.CrossEntropyLoss()
    if residual:
        model = ResidualCNN(model)
    x, y = batch(tiny_cnn(), loss_fn, n=4)
    params = list(model.parameters())
    compiled = torch.compile(model, backend="eager")
    stats = extract(compiled, loss_fn, x, y, engine=engine, stats=("sqrt",))
    assert list(model.parameters()) == params
    names = [n.rsplit(".", 1)[0] for n, p in model.named_parameters() if n.endswith("weight")]
    assert list(stats) == names
    for name in names:
        close(stats[name].dense_fisher(), dense_ggn(model, loss_fn, x, y, name))
    close(model(x), (ResidualCNN(tiny_cnn()) if residual else tiny_cnn())(x))  # still the model it was


class ResidualCNN(nn.Module):
    """``tiny_cnn`` with ``h + h`` after its first layer: a forward that is not a chain of
    modules (BackPACK runs it through its converter)."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        h = self.body[1](self.body[0](x))
        return self.body[4](self.body[3](self.body[2](h + h)))


def test_an_embeddings_token_ids_give_every_statistic_of_its_one_hot_inputs() -> None:
    """nn.Embedding's inputs kept as token ids, a padding token among them: the Gram (the
    diagonal of token counts), every M_k, both partial-trace routes and the KFE rescaling (with a
    truncated output side: every M_k formed) equal those of the one-hot inputs."""
    from curvlab.extract.autograd.layer_io import EmbeddingInputs

    gen = torch.Generator().manual_seed(5)
    embedding = nn.Embedding(9, 4, padding_idx=2).double()
    ids = torch.randint(0, 9, (3, 5), generator=gen)
    ids[0, 1] = ids[2, 4] = 2
    lazy = EmbeddingInputs(embedding, ids)
    onehot = torch.nn.functional.one_hot(ids, 9).transpose(1, 2).double() * (ids != 2).unsqueeze(1)
    g = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    assert lazy.shape == onehot.shape
    close(maths.input_gram(lazy, 1 / 15), maths.input_gram(onehot, 1 / 15))
    close(maths.per_sample_gradients(lazy, g), maths.per_sample_gradients(onehot, g))
    for route in (maths.partial_traces_by_gram, maths.partial_traces_by_chunks):
        for got, want in zip(route(lazy, g), route(onehot, g)):
            close(got, want)
    u_out = torch.linalg.qr(torch.randn(4, 2, generator=gen, dtype=torch.float64))[0]
    u_in = torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64))[0]
    close(maths.kfe_scaling(lazy, g, u_out, u_in), maths.kfe_scaling(onehot, g, u_out, u_in))


def test_backpack_engine_and_another_librarys_backward_hooks_on_one_model() -> None:
    """torch keeps a module's kind of backward hook after the hooks are removed: BackPACK's
    engine left its modules refusing a library's (non-full) backward hooks — ASDL raised on a
    model curvlab had measured — and a library's removed hooks made the BackPACK engine raise
    torch's bare error (QA24).  A live one of those hooks makes engine='auto' take the autograd
    engine, naming the module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    ref = extract(model, nn.CrossEntropyLoss(), x, y, engine="autograd", stats=("kfac",))["2"].kfac["exact"].G
    assert extract(model, nn.CrossEntropyLoss(), x, y, engine="backpack", stats=("kfac",)).engine == "backpack"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of register_backward_hook
        model[2].register_backward_hook(lambda *a: None).remove()  # after curvlab's: taken
        live = model[2].register_backward_hook(lambda *a: None)
    stats = extract(model, nn.CrossEntropyLoss(), x, y, stats=("kfac",))
    assert stats.engine == "autograd" and "module '2' has a backward hook registered by register_backward_hook" \
        in stats.engine_reason
    live.remove()  # its kind stays on the module: the BackPACK engine still runs, and leaves it
    stats = extract(model, nn.CrossEntropyLoss(), x, y, engine="backpack", stats=("kfac",))
    torch.testing.assert_close(stats["2"].kfac["exact"].G, ref, rtol=1e-12, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model[0].register_backward_hook(lambda *a: None).remove()
