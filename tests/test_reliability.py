"""Reliability of the library on bad input: a clear error naming the cause, or a correct
number — never a silently wrong one (one test per defect found by trying curvlab as a careless
user would; the command line and run folders are in tests/test_run_safety.py)."""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from torch import nn

import curvlab
from curvlab.optim import EKFAC, KFAC, TEKFAC, TKFAC, KroneckerOptions
from helpers import dense_ggn, tiny_mlp, to_matrix_order

ALL_OPTIMIZERS = (KFAC, EKFAC, TKFAC, TEKFAC)


def batch(n: int = 16, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tiny_mlp(seed), torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


# ------------------------------------------------- 2. ignored targets: dropped as the loss drops them


ENGINES = ("backpack", "autograd")


def _ignored_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model, x, y = batch(16)
    y[::3] = -100  # padding: 6 of 16 targets
    return model, x, y


def _layer_fn(model: nn.Module, layer: str):
    """``(out_fn(flat, inputs), flat)``: the model output as a function of ``layer``'s ``[W b]``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = [k for k in params if k.startswith(layer + ".")]
    sizes = [params[k].numel() for k in names]

    def out_fn(flat, inputs):
        new = {k: p.reshape(params[k].shape) for k, p in zip(names, torch.split(flat, sizes))}
        return torch.func.functional_call(model, {**params, **new}, (inputs,))

    return out_fn, torch.cat([params[k].flatten() for k in names])


def _dense_ggn_and_grad(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: str = "0"):
    """``(GGN, gradient)`` of ``layer``'s ``[W b]`` from torch.func on the loss itself."""
    out_fn, flat = _layer_fn(model, layer)
    out = out_fn(flat, x).detach()
    jac = torch.func.jacrev(out_fn)(flat, x).reshape(out.numel(), -1)
    hess = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    return jac.T @ hess @ jac, torch.func.grad(lambda f: loss_fn(out_fn(f, x), y))(flat)


def _dense_empirical(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``R Σ ∇ℓ_n ∇ℓ_nᵀ`` of the first layer over the examples the loss counts, ``R = 1/count``."""
    out_fn, flat = _layer_fn(model, "0")
    kept = [n for n in range(len(y)) if y[n] != loss_fn.ignore_index]
    per = torch.stack([torch.func.grad(lambda f: loss_fn(out_fn(f, x[n:n + 1]), y[n:n + 1]))(flat) for n in kept])
    return per.T @ per / len(kept)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_targets_equal_to_ignore_index_drop_their_terms_as_the_loss_does(fisher: str, engine: str) -> None:
    """torch's loss drops a target equal to ignore_index (padding) and averages over the others:
    so do the blocks, on both engines — against dense torch.func references of the loss itself
    (the MC Fisher against the GGN, 4000 draws).  Counting the dropped examples, as curvlab once
    would have, is 10 % off the GGN here."""
    model, x, y = _ignored_batch()
    loss_fn = nn.CrossEntropyLoss()
    ggn, grad = _dense_ggn_and_grad(model, loss_fn, x, y)
    torch.manual_seed(0)
    stats = curvlab.extract(model, loss_fn, x, y, fisher=fisher, engine=engine, mc_samples=4000 if fisher == "mc" else 1)
    block = stats["0"]
    assert block.engine == engine
    torch.testing.assert_close(block.layout.to_vector(block.grad), grad, rtol=1e-10, atol=1e-14)
    if fisher == "mc":
        rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
        assert rel(block.dense_fisher(), ggn) < 0.03
        counted_all, _ = _dense_ggn_and_grad(model, loss_fn, x, y.clamp_min(0))
        assert rel(counted_all, ggn) > 0.1
    else:
        want = ggn if fisher == "exact" else _dense_empirical(model, loss_fn, x, y)
        torch.testing.assert_close(block.dense_fisher(), want, rtol=1e-10, atol=1e-14)
    measured = curvlab.compare(model, loss_fn, x, y, fisher="exact", approximations=("kfac",), engine=engine)
    np.testing.assert_allclose(float(measured["exact_trace"].sel(layer="0")), float(ggn.trace()), rtol=1e-10)


def test_padded_positions_of_a_sequence_drop_their_terms() -> None:
    """Per-position cross-entropy on ``[N, C, T]`` logits with padded positions (``T_out = 4`` terms
    an example, 5 of 12 dropped): the GGN block and the gradient of the loss itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 1), nn.Tanh(), nn.Conv1d(4, 3, 1)).double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    y = torch.tensor([[0, 2, -100, -100], [1, -100, 2, 0], [-100, 1, 1, -100]])
    loss_fn = nn.CrossEntropyLoss()
    stats = curvlab.extract(model, loss_fn, x, y, fisher="exact")
    for layer in ("0", "2"):
        ggn, grad = _dense_ggn_and_grad(model, loss_fn, x, y, layer)
        block = stats[layer]
        torch.testing.assert_close(block.dense_fisher(), ggn, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(block.layout.to_vector(block.grad), grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_batch_whose_every_target_is_ignored_is_refused(engine: str) -> None:
    """Its mean loss is NaN (no term counted); a sum is zero, and so is its curvature."""
    model, x, y = batch(6)
    with pytest.raises(ValueError, match="all 6 targets equal ignore_index=-100"):
        curvlab.extract(model, nn.CrossEntropyLoss(), x, torch.full_like(y, -100), engine=engine)
    stats = curvlab.extract(model, nn.CrossEntropyLoss(reduction="sum"), x, torch.full_like(y, -100), engine=engine)
    assert all(not s.dense_fisher().any() for s in stats.values())


@pytest.mark.parametrize("cls", ALL_OPTIMIZERS, ids=lambda c: c.__name__)
def test_optimizers_invert_the_blocks_of_the_targets_the_loss_counts(cls) -> None:
    """Statistics steps with padding targets (exact Fisher, no averaging): KFAC's and TKFAC's
    approximations are KFLR's and TKFAC's of curvlab.extract's blocks of the same batch (what the
    report measures); EKFAC's and TEKFAC's eigenvalues are the exact block's ``diag(QᵀFQ)`` in
    their basis — and neither is what counting the padding gives."""
    model, x, y = _ignored_batch()
    loss_fn = nn.CrossEntropyLoss()
    stats = curvlab.extract(model, loss_fn, x, y, fisher="exact", stats=("kfac", "tkfac", "sqrt"))
    padded = curvlab.extract(model, loss_fn, x, y.clamp_min(0), fisher="exact", stats=("kfac", "tkfac", "sqrt"))
    # lr 0: the model stays; EKFAC and TEKFAC rescale on the step after a refresh
    opt = cls(model, lr=0.0, fisher="exact", stat_decay=0.0, stats_interval=1, eigen_interval=2, scale_interval=1,
              factor_dtype="float64")
    for _ in range(2):
        opt.zero_grad()
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
        opt.step()
    for block, approx in opt.approximations().items():
        if cls in (KFAC, TKFAC):
            name = "kflr" if cls is KFAC else "tkfac"
            want = curvlab.approx.approximate(stats[block], name).to_dense()
            torch.testing.assert_close(approx.to_dense(), want, rtol=1e-9, atol=1e-13)
            assert not torch.allclose(curvlab.approx.approximate(padded[block], name).to_dense(), want, rtol=1e-3)
        else:
            want = approx.optimal_scaling(stats[block].sqrt)
            torch.testing.assert_close(approx.eigenvalues(), want, rtol=1e-9, atol=1e-13)
            assert not torch.allclose(approx.optimal_scaling(padded[block].sqrt), want, rtol=1e-3)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fisher", ["exact", "empirical"])
def test_label_smoothing_is_the_dense_curvature_of_the_smoothed_loss(fisher: str, engine: str) -> None:
    """Label smoothing (timm's recipes use 0.1) was refused.  Its targets sum to one, so the
    GGN is cross-entropy's; the gradient, and with it the empirical Fisher, is the smoothed
    loss's.  Both against dense torch.func references of the smoothed loss itself."""
    model, x, y = batch(12)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = [k for k in params if k.startswith("0.")]  # the first layer, [W b]
    sizes = [params[k].numel() for k in names]

    def out_fn(flat, inputs=x):
        new = {k: p.reshape(params[k].shape) for k, p in zip(names, torch.split(flat, sizes))}
        return torch.func.functional_call(model, {**params, **new}, (inputs,))

    flat = torch.cat([params[k].flatten() for k in names])
    grad = torch.func.grad(lambda f: loss_fn(out_fn(f), y))(flat)
    if fisher == "exact":
        out = out_fn(flat).detach()
        jac = torch.func.jacrev(out_fn)(flat).reshape(out.numel(), -1)
        hess = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
        dense = jac.T @ hess @ jac
    else:  # R Σ_n ∇ℓ_n ∇ℓ_nᵀ with L = R Σ ℓ_n, R = 1/N
        per = torch.stack([torch.func.grad(lambda f: loss_fn(out_fn(f, x[n:n + 1]), y[n:n + 1]))(flat)
                           for n in range(len(y))])
        dense = per.T @ per / len(y)
    stats = curvlab.extract(model, loss_fn, x, y, fisher=fisher, engine=engine)["0"]
    torch.testing.assert_close(stats.dense_fisher(), dense, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(stats.layout.to_vector(stats.grad), grad, rtol=1e-10, atol=1e-14)
    assert stats.engine == engine


# --------------------------------------------------------- 3. non-finite hyper-parameters


@pytest.mark.parametrize("name", ["lr", "damping", "momentum", "kl_clip", "weight_decay"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_hyper_parameters_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        KroneckerOptions(**{name: value})
    with pytest.raises(ValueError, match=name):
        TEKFAC(tiny_mlp(0), **{name: value})


def test_a_one_element_tensor_lr_is_taken_as_torchs_optimizers_take_it() -> None:
    """``KFAC(model, lr=torch.tensor(0.05))`` was refused ("must be a non-negative finite
    number"), though torch.optim.SGD takes it and so did a group's lr set later."""
    opt = KFAC(tiny_mlp(0), lr=torch.tensor(0.05), momentum=torch.tensor(0.5, dtype=torch.float64))
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]) == (float(torch.tensor(0.05)), 0.5)
    with pytest.raises(ValueError, match=r"lr=-1.0 must be a non-negative finite number"):
        KFAC(tiny_mlp(0), lr=torch.tensor(-1.0))


def test_zero_damping_is_refused() -> None:
    """damping = 0 turned a small batch's step NaN (rank-deficient factors): refused, also later."""
    with pytest.raises(ValueError, match="damping=0"):
        KFAC(tiny_mlp(0), damping=0)
    opt = KFAC(tiny_mlp(0))
    with pytest.raises(ValueError, match="damping"):
        opt.damping = 0.0


def test_a_model_on_the_meta_device_is_named() -> None:
    """Parameters without values (``torch.device("meta")``): every entry point failed deep inside
    torch ("Tensor.item() cannot be called on meta tensors"), the optimizers at the first step."""
    model, x, y = batch()
    model.to("meta")
    for call in (lambda: curvlab.extract(model, nn.CrossEntropyLoss(), x, y),
                 lambda: curvlab.compare(model, nn.CrossEntropyLoss(), x, y),
                 lambda: KFAC(model)):
        with pytest.raises(ValueError, match="parameter '0.weight' is on the meta device"):
            call()


def test_a_lazy_module_not_yet_called_is_named() -> None:
    """``nn.LazyLinear`` before its first forward: the optimizers took it and the first
    ``opt.track`` failed inside torch ("Can't access the shape of an uninitialized parameter …
    usually happens in load_state_dict"); after one forward it trains."""
    torch.manual_seed(0)
    model, loss_fn = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3)), nn.CrossEntropyLoss()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    for call in (lambda: curvlab.extract(model, loss_fn, x, y), lambda: curvlab.compare(model, loss_fn, x, y),
                 lambda: KFAC(model)):
        with pytest.raises(ValueError, match="parameter '0.weight' is not initialised yet .* run one forward pass"):
            call()
    model(x)
    opt = KFAC(model, lr=0.1, stats_interval=1)
    before = model[0].weight.detach().clone()
    opt.zero_grad()
    with opt.track(loss_fn):
        loss_fn(model(x), y).backward()
    opt.step()
    assert [b.name for b in opt.blocks()] == ["0", "2"] and not torch.equal(model[0].weight, before)


@pytest.mark.parametrize("name,value", [("lr", math.nan), ("momentum", math.inf), ("lr", -1.0),
                                        ("maximize", True), ("nesterov", True), ("dampening", 0.1)])
def test_a_param_group_set_to_a_bad_value_is_refused_at_step(name: str, value: float) -> None:
    """A group is a plain dict (a user or a scheduler may set anything): checked at every step."""
    model, x, y = batch(8)
    loss_fn = nn.CrossEntropyLoss()
    opt = TKFAC(model, lr=0.1, stats_interval=1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0][name] = value
    opt.zero_grad()
    with opt.track(loss_fn):
        loss_fn(model(x), y).backward()
    with pytest.raises(ValueError, match=f"param group 0: {name}="):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_bad_param_group_is_refused_when_given() -> None:
    """As torch's optimizers refuse it: at construction and in add_param_group, not at the first
    step."""
    model, _, _ = batch(8)
    first, *rest = list(model.children())
    rest_params = [p for m in rest for p in m.parameters()]
    with pytest.raises(ValueError, match="TEKFAC: param group 1: lr=-1.0"):
        TEKFAC(model, [{"params": first.parameters()}, {"params": rest_params, "lr": -1.0}])
    opt = TEKFAC(model, list(first.parameters()))
    with pytest.raises(ValueError, match="param group 1: momentum=nan"):
        opt.add_param_group({"params": rest_params, "momentum": float("nan")})
    with pytest.raises(ValueError, match="param group 1: maximize=True is an option of torch.optim.SGD"):
        opt.add_param_group({"params": rest_params, "maximize": True})  # it was ignored: the loss went up
    assert len(opt.param_groups) == 1  # a refused group is not kept (it was: the same parameters could not be added again)
    opt.add_param_group({"params": rest_params, "maximize": False, "nesterov": False, "dampening": 0})


@pytest.mark.parametrize("name,value", [("damping", 0.0), ("damping", 1e6), ("stats_interval", 1), ("kl_clip", None)])
def test_an_optimizer_wide_option_in_a_param_group_is_refused_not_ignored(name: str, value: object) -> None:
    """``damping`` in a param group (0 included, which the README said was refused) was accepted
    and ignored: the steps were bit-identical to the optimizer's own damping (QA16)."""
    model, x, y = batch(8)
    first, *rest = list(model.children())
    rest_params = [p for m in rest for p in m.parameters()]
    said = rf"KFAC: param group 1 sets \['{name}'\]: one value for all blocks, an option of the optimizer"
    with pytest.raises(ValueError, match=said):
        KFAC(model, [{"params": first.parameters()}, {"params": rest_params, name: value}])
    opt = KFAC(model, lr=0.1, stats_interval=1)
    opt.param_groups[0][name] = value  # as a scheduler would: refused at the step, nothing moved
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn = nn.CrossEntropyLoss()
    opt.zero_grad()
    with opt.track(loss_fn):
        loss_fn(model(x), y).backward()
    with pytest.raises(ValueError, match=said.replace("group 1", "group 0")):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("overflow", ["lr", "preconditioner"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC, TKFAC, TEKFAC], ids=lambda c: c.__name__)
def test_a_non_finite_update_is_skipped_at_its_own_step(cls, overflow: str) -> None:
    """An update that overflows float32 is never applied, the momentum buffers keep their
    values, and the warning names this step: ``lr``, a finite learning rate times the update
    overflows; ``preconditioner``, a finite gradient whose preconditioned update itself
    overflows (lr ≤ 1) on a plain step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    settings = dict(stats_interval=1) if overflow == "lr" else dict(stats_interval=10, damping=1e-3)
    opt = cls(model, lr=0.1, momentum=0.9, kl_clip=None, **settings)
    for _ in range(2):
        opt.zero_grad()
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    momenta = {k: s.momentum.clone() for k, s in opt.block_states.items()}
    if overflow == "lr":
        opt.param_groups[0]["lr"] = 1e38  # finite, but lr · update overflows
    opt.zero_grad()
    with opt.track(loss_fn):
        (loss_fn(model(x), y) * (1e38 if overflow == "preconditioner" else 1.0)).backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="non-finite update .* at step 2"):
        opt.step()
    assert opt.steps_done == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(s.momentum, momenta[k]) for k, s in opt.block_states.items())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("cls", [KFAC, EKFAC, TKFAC, TEKFAC], ids=lambda c: c.__name__)
def test_a_plain_step_whose_update_overflows_with_its_product_is_skipped(cls) -> None:
    """A gradient of 1e19 in every entry under a damping that swamps the factors (``d ≈ g``,
    every ``d_i g_i`` positive and finite): ``⟨d, g⟩`` overflows float32 to +inf, not NaN, and
    ``‖d‖`` overflows too.  The step is skipped as non-finite — where the blocks' updates are
    checked through their ``⟨d, g⟩`` (KFAC/TKFAC's dense inverses), a product of +inf counts."""
    torch.manual_seed(0)
    model, loss_fn = nn.Linear(5, 3), nn.CrossEntropyLoss()
    x, y = 1e-3 * torch.randn(8, 5), torch.randint(0, 3, (8,))
    opt = cls(model, lr=0.1, momentum=0.0, damping=1.0, kl_clip=None, stats_interval=10, eigen_interval=100,
              scale_interval=10)
    opt.zero_grad()
    with opt.track(loss_fn):
        loss_fn(model(x), y).backward()
    opt.step()  # the statistics and their inverse
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    for p in model.parameters():
        p.grad.fill_(1e19)
    with pytest.warns(RuntimeWarning, match="non-finite update"):
        opt.step()
    assert opt.steps_done == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


@pytest.mark.parametrize("where", ["block", "block-bias", "first-order"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC, TKFAC, TEKFAC], ids=lambda c: c.__name__)
def test_a_non_finite_gradient_on_a_plain_step_is_skipped(cls, where: str) -> None:
    """On a plain step (no statistics, no refresh) the gradients of the blocks are checked through
    their preconditioned updates: one NaN or ±inf entry of a block's weight or bias gradient, or
    of a first-order parameter's (LayerNorm), skips the step; nothing changes, and training goes
    on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    opt = cls(model, lr=0.1, momentum=0.9, stats_interval=10, eigen_interval=100, scale_interval=10)

    def step(poison: bool = False) -> None:
        opt.zero_grad()
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
        if poison:
            grad = {"block": model[3].weight.grad, "block-bias": model[0].bias.grad,
                    "first-order": model[1].weight.grad}[where]
            grad.view(-1)[1] = float("nan") if where == "block" else -float("inf")
        opt.step()

    for _ in range(2):
        step()
    params = [p.detach().clone() for p in model.parameters()]
    momenta = {k: s.momentum.clone() for k, s in opt.block_states.items()}
    first_order = opt.state[model[1].weight]["momentum_buffer"].clone()
    with pytest.warns(RuntimeWarning, match="non-finite .* at step 2"):
        step(poison=True)
    assert opt.steps_done == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(s.momentum, momenta[k]) for k, s in opt.block_states.items())
    assert torch.equal(opt.state[model[1].weight]["momentum_buffer"], first_order)
    step()
    assert opt.steps_done == 3 and all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ----------------------------------------------------------------- 7. messages that name the cause


def test_empty_batch_is_named() -> None:
    model, x, y = batch(4)
    with pytest.raises(ValueError, match="empty batch"):
        curvlab.extract(model, nn.CrossEntropyLoss(), x[:0], y[:0])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_non_finite_inputs_are_named(fisher: str, engine: str) -> None:
    model, x, y = batch(6)
    x[2, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite values .* in 1 of 6 examples"):
        curvlab.extract(model, nn.CrossEntropyLoss(), x, y, fisher=fisher, engine=engine)
    with pytest.raises(ValueError, match="non-finite"):
        curvlab.compare(model, nn.CrossEntropyLoss(), x, y, fisher=fisher, approximations=("kfac",), engine=engine)
    with pytest.raises(ValueError, match="non-finite"):
        curvlab.extract(model, nn.MSELoss(), x, torch.randn(6, 3, dtype=torch.float64), fisher=fisher, engine=engine)
    targets = torch.randn(6, 3, dtype=torch.float64)
    targets[0, 0] = math.inf
    with pytest.raises(ValueError, match="targets have non-finite values"):
        curvlab.extract(model, nn.MSELoss(), x.nan_to_num(), targets, fisher=fisher, engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_non_finite_outputs_propagate_when_asked(engine: str) -> None:
    """``non_finite="propagate"`` (the optimizers' statistics pass): the backward completes and
    every statistic of the batch is NaN, from both engines."""
    model, x, y = batch(6)
    x[2, 1] = math.nan
    stats = curvlab.extract(model, nn.CrossEntropyLoss(), x, y, fisher="mc", engine=engine, non_finite="propagate",
                            stats=("kfac", "tkfac"))
    assert stats and all(s.engine == engine for s in stats.values())
    for s in stats.values():
        assert torch.isnan(s.kfac["mc"].G).all() and torch.isnan(s.tkfac.delta_phi).any()


@pytest.mark.parametrize("engine", ENGINES)
def test_propagating_non_finite_outputs_still_checks_the_targets(engine: str) -> None:
    """A non-finite output taken with ``non_finite="propagate"`` leaves the targets' checks in
    place: a batch of ignored targets only is refused, as with finite outputs (one check, for
    both engines)."""
    model, x, y = batch(6)
    x[2, 1] = math.nan
    y[:] = -100
    with pytest.raises(ValueError, match="all 6 targets equal ignore_index=-100"):
        curvlab.extract(model, nn.CrossEntropyLoss(), x, y, fisher="mc", engine=engine, non_finite="propagate")


@pytest.mark.parametrize("kwargs,message", [
    ({"damping": math.nan}, "damping=nan"), ({"damping": 0.0}, "damping=0.0"), ({"top_k": 0}, "top_k=0"),
    ({"num_eigenvalues": 0}, "num_eigenvalues=0"), ({"approximations": "kfac"}, "collection of names"),
    ({"approximations": ("kfac", "nope")}, "unknown approximation 'nope'"),
    # a typo'd or unmeasured damping strategy fell back to the default silently
    ({"damping_strategies": {"tekfc": "nor"}}, r"\(damping_strategies\): unknown approximation 'tekfc'"),
    ({"approximations": ("kfac",), "damping_strategies": {"ekfac": "exact"}},
     r"damping_strategies names ekfac, which approximations leaves out \(kfac\)"),
])
def test_bad_comparison_settings_are_named(kwargs: dict, message: str) -> None:
    model, x, y = batch(6)
    with pytest.raises(ValueError, match=message):
        curvlab.compare(model, nn.CrossEntropyLoss(), x, y, **kwargs)


def test_approximate_takes_one_block_or_a_whole_extraction() -> None:
    model, x, y = batch(6)
    stats = curvlab.extract(model, nn.CrossEntropyLoss(), x, y)
    whole = curvlab.approximate(stats, "kflr")
    assert set(whole) == {"0", "2"}
    assert torch.equal(whole["0"].to_dense(), curvlab.approximate(stats["0"], "kflr").to_dense())
    with pytest.raises(TypeError, match="LayerStats"):
        curvlab.approximate(torch.ones(3), "kflr")
    with pytest.raises(ValueError, match="unknown approximation 'kfc'"):
        curvlab.approximate(stats, "kfc")


def test_a_zero_fisher_block_is_explained() -> None:
    """A dead layer (its ReLU never fires): F = 0 for the layer below it, metrics NaN — with a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert float(dense_ggn(model, nn.CrossEntropyLoss(), x, y, "0").detach().abs().max()) == 0.0
    with pytest.warns(RuntimeWarning, match="layer '0' is zero .*dead layer"):
        ds = curvlab.compare(model, nn.CrossEntropyLoss(), x, y, approximations=("kfac",))
    assert np.isnan(ds.rel_frobenius_error.sel(layer="0")).all()


def test_bad_eigenbases_and_batches_are_named() -> None:
    """A basis for a block the model lacks was ignored; one of the wrong size failed inside a
    matrix product; a list or an array as the batch failed on ``.to``."""
    model, x, y = batch(6)  # blocks "0" (4 × 6) and "2" (3 × 5)
    eye = torch.eye
    for bases, message in [
        ({"zz": (eye(4), eye(6))}, "eigenbases names 'zz', which is not a Kronecker block of the model \\(they are: 0, 2\\)"),
        ({"0": (eye(3), eye(6))}, r"eigenbases\['0'\]: U_out has shape \(3, 3\); the block is 4 × 6, so U_out must be \[4, k ≤ 4\]"),
        ({"0": eye(4)}, r"eigenbases\['0'\] must be a pair of matrices"),
    ]:
        with pytest.raises(ValueError, match=message):
            curvlab.extract(model, nn.CrossEntropyLoss(), x, y, stats=("kfe",), eigenbases=bases)
    truncated = {"0": (eye(4, 2, dtype=torch.float64), eye(6, 3, dtype=torch.float64))}
    assert curvlab.extract(model, nn.CrossEntropyLoss(), x, y, stats=("kfe",), eigenbases=truncated)["0"].kfe_scaling.shape == (3, 4)
    for args, message in [((x, y.tolist()), "targets must be one torch.Tensor .* got list$"),
                          ((x.numpy(), y), "inputs must be one torch.Tensor .* got ndarray"),
                          (((x, x), y), r"got tuple; for several inputs .* curvlab.extract.ExtractionSession")]:
        with pytest.raises(TypeError, match=message):
            curvlab.extract(model, nn.CrossEntropyLoss(), *args)
    with pytest.raises(ValueError, match="curvlab.extract: inputs on the 'meta' device hold no data"):
        curvlab.extract(model, nn.CrossEntropyLoss(), x.to("meta"), y)


def test_blocks_print_as_one_line_each() -> None:
    """The README's ``model_blocks(resnet).parameters`` printed every parameter's values."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    printed = repr(curvlab.extract.model_blocks(model).blocks)
    assert printed == ("[Block('0', kronecker, Linear, 4×4), Block('1.weight', parameter, LayerNorm, 4×1), "
                       "Block('1.bias', parameter, LayerNorm, 4×1), Block('2', kronecker, Linear, 2×5)]")


def test_option_objects_check_every_field_and_take_numpy_scalars() -> None:
    """A sweep of the option objects: ``separate_bias="False"`` acted as True, ``EighPolicy``
    took NaN (silently no truncation) and failed later on wrong types without naming the field,
    numpy integers were refused by some fields and taken by others, and ``compare`` checked
    its damping strategies only after the whole extraction."""
    from curvlab.approx import EighPolicy
    from curvlab.extract import ExtractOptions

    for bad in (dict(separate_bias="False"), dict(skip_unsupported=None), dict(gram_rows=1)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.* must be True or False"):
            ExtractOptions(**bad)
    for bad in (dict(truncate_above=float("nan")), dict(rank=True), dict(rank=2.5), dict(seed="abc"),
                dict(dtype="float64"), dict(dtype=torch.float16)):
        with pytest.raises(ValueError, match=f"EighPolicy: {next(iter(bad))}="):
            EighPolicy(**bad)
    policy = EighPolicy(truncate_above=np.int64(64), rank=np.int64(8))
    assert (policy.truncate_above, policy.rank) == (64, 8) and type(policy.rank) is int
    assert ExtractOptions(mc_samples=np.int64(3), skip_unsupported=np.bool_(True)).mc_samples == 3
    options = KroneckerOptions(lr=np.float32(0.5), stats_interval=np.int64(5), truncation_rank=np.int64(64))
    assert (type(options.lr), type(options.stats_interval), options.stats_interval) == (float, int, 5)
    with pytest.raises(ValueError, match="stats_interval=np.True_ must be a positive int"):
        KroneckerOptions(stats_interval=np.bool_(True))

    calls = []

    def extractor(*args, **kwargs):
        calls.append(1)
        return curvlab.extract(*args, **kwargs)

    model, x, y = batch(8)
    for strategy in ("Exact", None):
        with pytest.raises(ValueError, match=r"damping_strategies\['kfac'\]: unknown damping strategy"):
            curvlab.compare(model, nn.CrossEntropyLoss(), x, y, approximations=("kfac",),
                            damping_strategies={"kfac": strategy}, extractor=extractor)
    assert not calls
    with pytest.raises(ValueError, match="approximations=\\(\\) names none"):  # an empty dataset came back
        curvlab.compare(model, nn.CrossEntropyLoss(), x, y, approximations=(), extractor=extractor)
    with pytest.raises(ValueError, match="kfac_flavours=\\(\\) names no flavour"):  # "not extracted" later
        ExtractOptions(stats=("kfac",), kfac_flavours=())
    block = curvlab.extract(model, nn.CrossEntropyLoss(), x, y)["0"]
    for bad in (True, "1e-3", None):  # True was taken as 1.0; the others failed inside math
        with pytest.raises(ValueError, match="damping must be a positive finite number"):
            curvlab.approximate(block, "kflr").inv_mat_mul(block.grad, bad)


# -------------------------------------------------------------- low-precision networks


@pytest.mark.parametrize("name", ["ekfac", "tekfac"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rescaling_of_a_low_precision_network(name: str, dtype: torch.dtype) -> None:
    """EKFAC's and TEKFAC's ``s*`` built from a bfloat16/float16 network's statistics, against the
    float64 ``diag(Qᵀ F Q)`` of the same (rounded) network in the object's own eigenbasis: to the
    dtype's precision.  The roots' test for input directions no input reaches used the dtype's
    ``ε²``, 25 % of the largest energy in bfloat16: ``s*`` was 0 in 36 of the strided
    convolution's 37 input directions (error 0.73)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.Tanh(),
                        nn.Flatten(), nn.Linear(27, 5)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 2, 8, 8, generator=gen).to(dtype), torch.randint(0, 5, (16,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    stats = curvlab.extract(net, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"))
    net64 = net.double()  # the same weights, exactly
    for layer in ("0", "2"):
        approx = curvlab.approximate(stats[layer], name)
        u_out, u_in = (u.double() for u in approx.eigenbasis())
        d_out, d_in = stats[layer].layout.shape
        dense = to_matrix_order(dense_ggn(net64, loss_fn, x.double(), y, layer).detach(), stats[layer].layout)
        q = torch.kron(u_out.contiguous(), u_in.contiguous())
        ref = torch.diagonal(q.T @ dense.reshape(d_out * d_in, -1) @ q).reshape(d_out, d_in)
        got = approx.eigenvalues().double()
        assert float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) < 2e-2, layer  # measured ≤ 3e-3


def test_backpack_under_autocast_names_the_cause() -> None:
    """A forward under bfloat16 autocast with the backward outside it (the AMP pattern): BackPACK
    failed deep in its own code ("expected scalar type Float but found BFloat16"); the error now
    names the layer, autocast and the engine that runs it."""
    model = tiny_mlp(0).float()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    for engine in ("backpack", "autograd"):
        opt = KFAC(model, engine=engine, stats_interval=1)
        with pytest.raises(ValueError, match=r"layer '0' \(Linear\) computed in bfloat16 from float32 weights "
                           r"\(torch.autocast\).*use engine='autograd'") if engine == "backpack" else nullcontext():
            with opt.track(loss_fn):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_fn(model(x), y)
                loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_extract_under_autocast_gives_float32_statistics() -> None:
    """``curvlab.extract`` called inside ``torch.autocast``: the forward and backward are the
    caller's (bfloat16), the statistics are formed in float32 — they came back in bfloat16 (the
    first layer's A, exact in float32, off by 2e-3) — and ``engine="auto"`` takes the autograd
    engine, under which BackPACK's extensions would compute them in bfloat16."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.Tanh(),
                        nn.Flatten(), nn.Linear(27, 5))
    x, y = torch.randn(16, 2, 8, 8), torch.randint(0, 5, (16,))
    loss_fn = nn.CrossEntropyLoss()
    ref = curvlab.extract(net, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"), engine="autograd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = curvlab.extract(net, loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"))
        with pytest.raises(ValueError, match="engine='backpack' cannot run this model: torch.autocast is on"):
            curvlab.extract(net, loss_fn, x, y, engine="backpack")
    assert got.engine == "autograd" and "torch.autocast" in got.engine_reason
    for layer in ("0", "2", "5"):
        s, r = got[layer], ref[layer]
        assert {s.kfac["exact"].A.dtype, s.kfac["exact"].G.dtype, s.tkfac.delta_phi.dtype, s.sqrt.dtype} == {torch.float32}
        for a, b in ((s.kfac["exact"].G, r.kfac["exact"].G), (s.tkfac.delta_phi, r.tkfac.delta_phi)):
            assert float((a - b).norm() / b.norm()) < 3e-2, layer  # the bfloat16 forward's precision
    first = got["0"].kfac["exact"].A, ref["0"].kfac["exact"].A  # the float32 inputs themselves
    assert float((first[0] - first[1]).norm() / first[1].norm()) < 1e-6


def test_the_extraction_counts_the_examples_its_blocks_count() -> None:
    """A model that reshapes its ``[3, 2, D]`` input into six examples: ``Extraction.num_examples``
    said 3 (the input's leading dimension), its blocks and compare 6."""

    class Pairs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x.reshape(-1, 4))

    x, y = torch.randn(3, 2, 4), torch.randint(0, 3, (6,))
    stats = curvlab.extract(Pairs(), nn.CrossEntropyLoss(), x, y)
    assert stats.num_examples == stats["a"].num_examples == 6
    assert curvlab.compare(Pairs(), nn.CrossEntropyLoss(), x, y).attrs["num_examples"] == 6


@pytest.mark.parametrize("engine", ["autograd", "backpack"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])  # (a sum's loss is 0, not NaN)
def test_an_empty_batch_runs_its_backward_and_skips_the_step(reduction: str, engine: str) -> None:
    """The statistics pass raised at the loss call on an empty batch, so the backward never ran:
    under DDP the other ranks then waited in its gradient all-reduce until the timeout (QA19);
    BackPACK's raised in the backward (under "sum", whose loss is finite, that error propagated)."""
    model, loss_fn = tiny_mlp(0), nn.CrossEntropyLoss(reduction=reduction)
    opt = KFAC(model, lr=0.1, stats_interval=1, engine=engine)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(0, 5, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="KFAC: an empty batch; the next step\\(\\) will be skipped"):
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())  # the backward ran
    with pytest.warns(RuntimeWarning, match="the step is skipped"):
        opt.step()
    assert opt.steps_done == 0 and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with opt.track(loss_fn):  # the next batch's statistics are its own
        loss_fn(model(x), y).backward()
    opt.step()
    assert opt.steps_done == 1


def test_a_process_torchrun_started_without_a_process_group_is_warned(monkeypatch) -> None:
    """WORLD_SIZE=2 (torchrun's environment) and no init_process_group: each rank trained on its
    own shard alone, without a word (QA19)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match=r"KFAC: WORLD_SIZE=2 but torch.distributed is not initialised, so this "
                                         r"process trains on its own data alone"):
        KFAC(tiny_mlp(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KFAC(tiny_mlp(0), distributed=False)  # meant
