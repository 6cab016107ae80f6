"""The autograd extraction engine against dense torch.func references, curvlinops and BackPACK.

References are built here, independently of the engine: ``jacrev`` of the whole batch output
w.r.t. one layer's weight through ``functional_call`` and ``hessian`` of the loss w.r.t. the
whole output (exact blocks, coupled ones included); ``jacrev`` w.r.t. a perturbation of one
layer call's output (the batch-convention roots ``g``); explicit loops for unfolded inputs.
Train-mode BatchNorm runs in the references on a copy without running statistics (same batch
statistics, no in-place buffer update, which torch.func refuses).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import zoo
from zoo import oracle
from curvlab.block import Block
from curvlab.extract import ExtractionSession, extract, maths
from curvlab.extract.autograd import couples_examples, extract_autograd
from curvlab.extract.autograd.layer_io import cat_positions, unfold_input
from helpers import batch, dense_ggn, im2col, patches_by_jacobian, tiny_cnn, tiny_mlp

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

RTOL = 1e-10


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def per_term_losses(loss_fn: nn.Module, out: Tensor, y: Tensor) -> Tensor:
    """Unreduced loss terms, flattened ``[N·T_out]`` (MSE: summed over the last dimension)."""
    val = type(loss_fn)(reduction="none")(out, y)
    return (val.sum(-1) if isinstance(loss_fn, (nn.MSELoss, nn.BCEWithLogitsLoss)) else val).flatten()


def reduction(loss_fn: nn.Module, out: Tensor) -> float:
    if loss_fn.reduction == "sum":
        return 1.0
    return 1.0 / (out[:, 0].numel() if isinstance(loss_fn, nn.CrossEntropyLoss) else out.numel())


def dense_block(model, loss_fn, x, y, name: str, flavour: str) -> Tensor:
    """``Jᵀ ∇²L J`` (exact) or ``R Σ_terms ∇ℓ ∇ℓᵀ`` (empirical) of ``name.weight``, flat order."""
    ref = oracle(model)
    params = {k: v.detach() for k, v in ref.named_parameters()}
    key = f"{name}.weight"

    def out_fn(w: Tensor) -> Tensor:
        return functional_call(ref, {**params, key: w}, (x,))

    out = out_fn(params[key]).detach()
    if flavour == "exact":
        jac = jacrev(out_fn)(params[key]).reshape(out.numel(), -1)
        hess = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
        return jac.T @ hess @ jac
    grads = jacrev(lambda w: per_term_losses(loss_fn, out_fn(w), y))(params[key]).flatten(1)
    return reduction(loss_fn, out) * grads.T @ grads


def block_from_sqrt(layer, m: Tensor) -> Tensor:
    if layer.kind == "embedding":  # matrix form is Wᵀ
        m = m.transpose(1, 2)
    if isinstance(layer.module, nn.modules.conv._ConvTransposeNd):  # matrix form: weight [C_in, C_out, *k] swapped
        m = m.unflatten(2, (layer.module.in_channels, -1)).transpose(1, 2)
    v = m.reshape(m.shape[0], -1)
    return v.T @ v


CASES = [
    ("resnet_bn", nn.CrossEntropyLoss()),
    ("resnet_bn", nn.MSELoss()),
    ("resnet_gn", nn.CrossEntropyLoss(reduction="sum")),
    ("vgg_bn", nn.CrossEntropyLoss()),
    ("vit", nn.CrossEntropyLoss()),
    ("functional_mlp", nn.MSELoss()),
    ("tied", nn.CrossEntropyLoss()),
    ("textcnn", nn.CrossEntropyLoss()),
    ("tagger", nn.CrossEntropyLoss()),
    ("tagger", nn.MSELoss(reduction="sum")),
    ("tagger", nn.BCEWithLogitsLoss()),
    ("unet", nn.MSELoss()),
]


BLOCK_CASES = [*CASES, ("conv3d", nn.CrossEntropyLoss())]


@pytest.mark.parametrize("flavour", ["exact", "empirical"])
@pytest.mark.parametrize("name,loss_fn", BLOCK_CASES, ids=[f"{n}-{type(l).__name__}-{l.reduction}" for n, l in BLOCK_CASES])
def test_exact_block_matches_dense(name, loss_fn, flavour) -> None:
    model, x, y = zoo.make(name, loss_fn=loss_fn)
    result = extract_autograd(model, loss_fn, x, y, flavours=("exact", "empirical"))
    assert result.coupled == name.endswith("_bn")
    torch.testing.assert_close(result.loss, loss_fn(oracle(model)(x), y), rtol=1e-12, atol=0)
    assert result.layers
    for lname, layer in result.layers.items():
        ours = block_from_sqrt(layer, result.sqrt(lname, flavour))
        ref = dense_block(model, loss_fn, x, y, lname, flavour)
        assert rel(ours, ref) < RTOL, (lname, rel(ours, ref))


# --- the batch convention: x and g of every call -----------------------------------------------

def reference_root(loss_fn, out: Tensor, y: Tensor, flavour: str) -> Tensor:
    """``[C_root, *out.shape]``: per term ``√R(diag √p − p √pᵀ)`` (CE), ``√(2R) I`` (MSE),
    ``√R diag √(σ(1 − σ))`` (BCE) or ``∇L/√R``, all terms at once; checked against ``hessian`` of the loss."""
    r = reduction(loss_fn, out)
    if flavour == "empirical":
        return (torch.func.grad(lambda o: loss_fn(o, y))(out) / math.sqrt(r)).unsqueeze(0)
    ce = isinstance(loss_fn, nn.CrossEntropyLoss)
    o = out.movedim(1, -1) if ce else out  # classes last
    c = o.shape[-1]
    if ce:
        p = o.softmax(-1)
        s = torch.diag_embed(p.sqrt()) - p.unsqueeze(-1) * p.sqrt().unsqueeze(-2)  # [..., c, v]
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        s = torch.diag_embed((o.sigmoid() * (1 - o.sigmoid())).sqrt())
    else:
        s = math.sqrt(2.0) * torch.eye(c, dtype=out.dtype).expand(*o.shape, c)
    s = s * math.sqrt(r)
    # the term-separated dense root reproduces the Hessian of the batch loss
    terms = o[..., 0].numel()
    blocks = s.reshape(terms, c, c)
    dense = torch.zeros(terms, c, terms, c, dtype=out.dtype)
    dense[torch.arange(terms), :, torch.arange(terms)] = blocks @ blocks.transpose(1, 2)
    hess = hessian(lambda z: loss_fn(z, y))(out)
    if ce:
        hess = hess.movedim(1, out.dim() - 1).movedim(out.dim() + 1, -1)
    torch.testing.assert_close(dense.reshape(hess.shape), hess, rtol=1e-12, atol=1e-14)
    root = s.movedim(-1, 0)  # [v, N, ..., c]
    return root.movedim(-1, 2) if ce else root


def reference_calls(model, loss_fn, x, y, module: nn.Module, flavour: str):
    """Per call of ``module``: its raw input and ``g_c = J_zᵀ S_c`` by ``jacrev``."""
    ref = oracle(model)
    target = dict(model.named_modules())
    path = next(k for k, v in target.items() if v is module)
    mod = dict(ref.named_modules())[path]
    inputs, shapes = [], []

    def record(m, a, o) -> None:
        inputs.append(a[0].detach())
        shapes.append(o.shape)

    probe = mod.register_forward_hook(record)
    out = ref(x).detach()
    probe.remove()

    def out_fn(deltas):
        it = iter(deltas)
        handle = mod.register_forward_hook(lambda m, a, o: o + next(it))
        try:
            return ref(x)
        finally:
            handle.remove()

    deltas = tuple(torch.zeros(s, dtype=out.dtype) for s in shapes)
    jacs = jacrev(out_fn)(deltas)  # per call [*out, *z]
    root = reference_root(loss_fn, out, y, flavour)
    gs = [torch.tensordot(root, j, dims=out.dim()) for j in jacs]
    return inputs, gs


def unfold_reference(module: nn.Module, inp: Tensor) -> Tensor:
    if isinstance(module, nn.Linear):
        return inp.reshape(inp.shape[0], -1, inp.shape[-1]).transpose(1, 2)
    if isinstance(module, nn.Conv2d):
        return im2col(inp, module)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return patches_by_jacobian(module, inp)
    if isinstance(module, nn.Conv1d):  # explicit patches
        (k,), (s,), (p,), (d,) = module.kernel_size, module.stride, module.padding, module.dilation
        xp = F.pad(inp, (p, p))
        cols = [xp[:, :, i * s : i * s + d * (k - 1) + 1 : d].reshape(inp.shape[0], -1)
                for i in range((xp.shape[2] - d * (k - 1) - 1) // s + 1)]
        return torch.stack(cols, -1)
    return inp.reshape(inp.shape[0], -1)  # Embedding: token ids


def to_layout(module: nn.Module, g: Tensor) -> Tensor:
    """``[C, *z.shape]`` → ``[C, N, d_out, T]`` (channels first for conv, last otherwise)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.modules.conv._ConvTransposeNd)):
        return g.flatten(3)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]).transpose(2, 3)


@pytest.mark.parametrize("name,loss_fn", CASES, ids=[f"{n}-{type(l).__name__}-{l.reduction}" for n, l in CASES])
def test_inputs_roots_and_kfac_factors_match_dense(name, loss_fn) -> None:
    model, x, y = zoo.make(name, loss_fn=loss_fn)
    result = extract_autograd(model, loss_fn, x, y, flavours=("exact", "empirical"), sqrt=False)
    for layer in result.layers.values():
        assert layer.sqrt is None
        for flavour in ("exact", "empirical"):
            inputs, gs = reference_calls(model, loss_fn, x, y, layer.module, flavour)
            assert len(layer.calls) == len(inputs) >= 1
            for call, inp, g_ref in zip(layer.calls, inputs, gs):
                x_ref = unfold_reference(layer.module, inp)
                g_ref = to_layout(layer.module, g_ref)
                g = result.g(call, flavour)
                assert torch.equal(call.x, x_ref) if layer.kind == "embedding" else rel(call.x, x_ref) < RTOL
                assert g.shape == g_ref.shape and rel(g, g_ref) < RTOL, (layer.name, flavour)
                dense_x = layer.dense_inputs(call)
                ref_x = F.one_hot(x_ref, layer.shape[1]).transpose(1, 2).double() if layer.kind == "embedding" else x_ref
                if layer.kind == "embedding" and layer.module.padding_idx is not None:
                    ref_x = ref_x * (x_ref != layer.module.padding_idx).unsqueeze(1)
                n, _, t = ref_x.shape
                kf = maths.kfac_factors(dense_x, g)
                assert rel(kf.A, torch.einsum("ndt,net->de", ref_x, ref_x) / (n * t)) < RTOL
                assert rel(kf.G, torch.einsum("cnot,cnpt->op", g_ref, g_ref)) < RTOL


class RowsOfTerms(nn.Module):
    """``[N, C, T]`` logits as ``[N·T, C]`` rows: curvlinops' form of a per-token loss."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        return out.movedim(1, -1).reshape(-1, out.shape[1])


@pytest.mark.parametrize("name", ["resnet_bn", "vgg_bn", "vit", "tagger"])
def test_kfac_convention_matches_curvlinops(name) -> None:
    """kfac-pytorch/ASDL/curvlinops convention, also with train-mode BatchNorm coupling and with
    T loss terms per example (curvlinops' ``num_per_example_loss_terms``, inferred as T)."""
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops is a dev dependency (pip install -e .[dev])")
    loss_fn = nn.CrossEntropyLoss()
    model, x, y = zoo.make(name, loss_fn=loss_fn)
    result = extract_autograd(model, loss_fn, x, y, flavours=("exact", "empirical"), sqrt=False)
    layers = {n: m for n, m in result.layers.items() if m.kind != "embedding"}  # not in curvlinops
    params = [p for m in layers.values() for p in m.module.parameters()]
    wrapped, prefix, rows = (RowsOfTerms(model), "inner.", y.reshape(-1)) if y.dim() > 1 else (model, "", y)
    for flavour, fisher_type in (("exact", "type-2"), ("empirical", "empirical")):
        op = curvlinops.KFACLinearOperator(
            wrapped, loss_fn, params, [(x, rows)], fisher_type=fisher_type, kfac_approx="expand",
            separate_weight_and_bias=True, check_deterministic=False,
        )
        op.compute_kronecker_factors()
        for lname, layer in layers.items():
            (call,) = layer.calls
            kf = maths.kfac_factors(call.x, result.g(call, flavour))
            assert rel(kf.A, op._input_covariances[prefix + lname]) < RTOL
            assert rel(kf.G, op._gradient_covariances[prefix + lname]) < RTOL


# --- agreement with BackPACK (curvlab.extract) where it runs -----------------------------------

@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_cnn])
@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")], ids=["ce", "mse"])
@pytest.mark.parametrize("fisher", ["exact", "mc"])
def test_statistics_agree_with_backpack(make_model, loss_fn, fisher) -> None:
    model = make_model()
    x, y = batch(model, loss_fn, n=4)
    flavours = (fisher, *[f for f in ("exact", "mc", "empirical") if f != fisher])
    theirs = extract(model, loss_fn, x, y, fisher=fisher, mc_samples=3, kfac_flavours=flavours,
                     stats=("sqrt", "kfac", "tkfac"), seed=11)
    ours = extract_autograd(model, loss_fn, x, y, flavours=flavours, mc_samples=3, seed=11)
    assert set(ours.layers) == set(theirs)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-12, atol=0)
    for name, layer in ours.layers.items():
        (call,) = layer.calls
        xb = torch.cat([call.x, torch.ones_like(call.x[:, :1])], 1)  # BackPACK's block has the bias
        block = theirs[name]
        g = ours.g(call, fisher)
        assert rel(maths.square_root(xb, g).matrices(), block.sqrt.matrices()) < RTOL
        tk = maths.tkfac_exact(xb, g)
        assert rel(tk.delta_phi, block.tkfac.delta_phi) < RTOL and rel(tk.delta_psi, block.tkfac.delta_psi) < RTOL
        for f in flavours:
            kf = maths.kfac_factors(xb, ours.g(call, f))
            assert rel(kf.A, block.kfac[f].A) < RTOL and rel(kf.G, block.kfac[f].G) < RTOL, (name, f)


def test_mc_is_unbiased_for_the_exact_block() -> None:
    """Coupled (train-mode BN) and multi-term (tagger) models: many samples → the exact block;
    one sample is far from it (so the comparison can fail)."""
    loss_fn = nn.CrossEntropyLoss()
    for name in ("vgg_bn", "tagger"):
        model, x, y = zoo.make(name, loss_fn=loss_fn)
        for samples, low, high in ((400, 0.0, 0.1), (1, 0.2, math.inf)):
            result = extract_autograd(model, loss_fn, x, y, flavours=("exact", "mc"), mc_samples=samples, seed=0)
            for lname, layer in result.layers.items():
                exact = block_from_sqrt(layer, result.sqrt(lname, "exact"))
                mc = block_from_sqrt(layer, result.sqrt(lname, "mc"))
                assert low < rel(mc, exact) < high, (name, lname, samples, rel(mc, exact))


# --- structure: tied weights, coupling, chunking, embeddings, sequences -------------------------

def test_tied_weights_sum_over_calls() -> None:
    loss_fn = nn.CrossEntropyLoss()
    model, x, y = zoo.make("tied", loss_fn=loss_fn)
    result = extract_autograd(model, loss_fn, x, y, sqrt=True)
    layer = result.layers["shared"]
    assert len(layer.calls) == 2 and all(len(result.layers[n].calls) == 1 for n in ("inp", "out"))
    per_call = [torch.einsum("cnot,ndt->cnod", c.g, c.x).flatten(0, 1) for c in layer.calls]
    torch.testing.assert_close(layer.sqrt, per_call[0] + per_call[1], rtol=1e-13, atol=1e-15)
    ref = dense_block(model, loss_fn, x, y, "shared", "exact")
    assert rel(block_from_sqrt(layer, layer.sqrt), ref) < RTOL
    for m in per_call:  # neither use alone is the block
        assert rel(block_from_sqrt(layer, m), ref) > 1e-2


def test_coupling_detection_and_its_effect() -> None:
    loss_fn = nn.CrossEntropyLoss()
    model, x, y = zoo.make("resnet_bn", loss_fn=loss_fn)
    assert couples_examples(model) and not couples_examples(zoo.make("resnet_gn")[0])
    assert not couples_examples(copy.deepcopy(model).eval())
    stateless_eval = oracle(model).eval()  # no running statistics: batch statistics in eval too
    assert couples_examples(stateless_eval)
    result = extract_autograd(model, loss_fn, x, y)
    # ignoring the coupling (M from the per-example g) misses the block by far before a BN
    for lname, layer in result.layers.items():
        ref = dense_block(model, loss_fn, x, y, lname, "exact")
        assert rel(block_from_sqrt(layer, layer.square_root()), ref) < RTOL
        (call,) = layer.calls
        # fewer locations in the batch than the layer's width: the roots at its output are kept,
        # smaller than the M_k they contract to
        narrow = x.shape[0] * call.g.shape[-1] < layer.matrix_shape[1]
        assert (layer.sqrt is None) == narrow == (call.coupled_roots is not None), lname
        if narrow:
            assert call.coupled_roots.numel() < layer.square_root().numel()
        uncoupled = block_from_sqrt(layer, torch.einsum("cnot,ndt->cnod", call.g, call.x).flatten(0, 1))
        if layer.kind == "conv":  # every conv feeds a BatchNorm
            assert rel(uncoupled, ref) > 1e-3, lname
        else:  # the head sees no coupling downstream
            assert rel(uncoupled, ref) < RTOL
    # forcing the coupled route on an uncoupled model changes nothing but the cost
    model, x, y = zoo.make("vit", loss_fn=loss_fn)
    plain = extract_autograd(model, loss_fn, x, y, sqrt=True, coupled=False)  # no probing vjp
    forced = extract_autograd(model, loss_fn, x, y, coupled=True)
    assert forced.num_vjps == plain.num_vjps * (1 + x.shape[0])
    for lname in plain.layers:
        a, b = plain.layers[lname].sqrt, forced.layers[lname].square_root()
        assert rel(b, a) < 1e-12


class _BatchCentred(nn.Module):
    """Examples coupled outside any BatchNorm module: a batch mean, or ``F.batch_norm``."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.a, self.b, self.functional = nn.Linear(5, 4), nn.Linear(4, 3), functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = F.batch_norm(h, None, None, training=True) if self.functional else h - h.mean(0, keepdim=True)
        return self.b(torch.tanh(h))


@pytest.mark.parametrize("functional", [False, True])
def test_coupling_outside_batchnorm_modules_is_found(functional: bool) -> None:
    """No module shows this coupling: one probing vjp finds it, and the exact roots include it."""
    torch.manual_seed(0)
    model, loss_fn = _BatchCentred(functional).double(), nn.CrossEntropyLoss()
    x, y = torch.randn(5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    assert not couples_examples(model)
    result = extract_autograd(model, loss_fn, x, y)
    assert result.coupled
    for lname, layer in result.layers.items():
        assert rel(block_from_sqrt(layer, layer.square_root()), dense_block(model, loss_fn, x, y, lname, "exact")) < RTOL
    assert not extract_autograd(nn.Sequential(nn.Linear(5, 3)).double(), loss_fn, x, y).coupled


def test_sequence_first_layer_inputs_are_refused() -> None:
    """A layer fed ``[T, N, D]`` (batch_first=False) is refused, also where ``T = N`` hides it."""

    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, T, 4]
            return self.head(self.mix(x.transpose(0, 1)).mean(0))

    loss_fn = nn.CrossEntropyLoss()
    for t, match in ((2, "leading dimension 2, not the batch size 3.*sequence-first"), (3, "'mix' sees the batch on dimension 1")):
        x, y = torch.randn(3, t, 4), torch.randint(0, 3, (3,))
        with pytest.raises(ValueError, match=match):
            extract_autograd(SequenceFirst(), loss_fn, x, y)


@pytest.mark.usefixtures("routes")
def test_chunking_changes_nothing() -> None:
    loss_fn = nn.CrossEntropyLoss()
    model, x, y = zoo.make("resnet_bn", loss_fn=loss_fn)
    state = copy.deepcopy(model.state_dict())
    big = extract_autograd(model, loss_fn, x, y, flavours=("exact", "empirical"))
    model.load_state_dict(state)
    small = extract_autograd(model, loss_fn, x, y, flavours=("exact", "empirical"), max_bytes=1)
    model.load_state_dict(state)
    looped = extract_autograd(model, loss_fn, x, y, flavours=("exact", "empirical"), vectorize=False)
    assert big.num_vjps == small.num_vjps == looped.num_vjps == 4 + 4 * x.shape[0]
    assert small.columns_per_chunk == 1 and big.columns_per_chunk >= big.num_vjps
    for other in (small, looped):
        for lname in big.layers:
            torch.testing.assert_close(other.layers[lname].sqrt, big.layers[lname].sqrt, rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(other.layers[lname].calls[0].g, big.layers[lname].calls[0].g, rtol=1e-13, atol=1e-15)


def test_embedding_representation_and_sequence_scale() -> None:
    loss_fn = nn.CrossEntropyLoss()
    model, ids, y = zoo.make("textcnn", loss_fn=loss_fn)
    ids[0, 0] = 0  # a padding token
    result = extract_autograd(model, loss_fn, ids, y)
    layer = result.layers["embedding"]
    (call,) = layer.calls
    assert call.x.dtype == torch.int64 and torch.equal(call.x, ids)
    assert layer.shape == (3, 6) and layer.square_root().shape == (3 * ids.shape[0], 3, 6)
    dense = layer.dense_inputs(call)
    assert dense.shape == (ids.shape[0], 6, 5) and dense[0, :, 0].abs().sum() == 0
    assert torch.equal(dense.sum((1, 2)), (ids != 0).sum(1).double())
    assert layer.square_root()[:, :, 0].abs().max() == 0  # the padding row gets nothing
    # per-token CE on [N, C, T]: T loss terms per example, R = 1/(N·T)
    model, ids, y = zoo.make("tagger", loss_fn=loss_fn)
    result = extract_autograd(model, loss_fn, ids, y, flavours=("exact", "empirical"))
    n, t = ids.shape
    assert result.terms_per_example == t and result.reduction_factor == pytest.approx(1 / (n * t))
    assert result.segments == {"exact": slice(0, 3), "empirical": slice(3, 4)}
    assert result.sqrt_segments == {"exact": slice(0, 3 * t * n), "empirical": slice(3 * t * n, 4 * t * n)}
    assert not result.layers["head"].factorable
    with pytest.raises(ValueError, match="sqrt=True"):
        extract_autograd(model, loss_fn, ids, y, sqrt=False).layers["head"].square_root()


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2),
        nn.Conv1d(2, 3, 2, padding="same", padding_mode="reflect"),
        nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
        nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(0, 1, 1), dilation=(2, 1, 1)),
        nn.Conv3d(2, 3, 3, padding="same", padding_mode="replicate"),
    ],
    ids=["1d", "1d-same-reflect", "2d", "2d-circular", "3d", "3d-same-replicate"],
)
def test_unfolded_inputs_reproduce_the_convolution(conv) -> None:
    conv = conv.double()
    nd = len(conv.kernel_size)
    inp = torch.randn(2, 2, *([5] * nd), dtype=torch.float64)
    x = unfold_input(conv, inp)  # [N, D, T]
    out = torch.einsum("od,ndt->not", conv.weight.flatten(1), x) + conv.bias[:, None]
    torch.testing.assert_close(out, conv(inp).flatten(2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", [nn.Conv2d(3, 4, 3, padding=1), nn.Linear(5, 4)], ids=["conv", "linear"])
def test_bias_row_and_several_calls_keep_the_unfolded_values(layer) -> None:
    """``Block.inputs`` (the row of ones of the bias column) and ``cat_positions`` (a layer
    called twice) against ``torch.cat`` of the values, in the memory layout ``unfold_input``
    gives each layer type (convolutions' ``[D, N, T]``, Linear's ``[N, T, D]``)."""
    layer = layer.double()
    shape = (2, 3, 4, 5) if isinstance(layer, nn.Conv2d) else (2, 6, 5)
    xs = [unfold_input(layer, torch.randn(*shape, dtype=torch.float64)) for _ in range(2)]
    (block,) = Block.of_layer("layer", layer)
    for x in xs:
        want = torch.cat([x, torch.ones(x.shape[0], 1, x.shape[2], dtype=x.dtype)], 1)
        torch.testing.assert_close(block.inputs(x), want, rtol=0, atol=0)
    torch.testing.assert_close(cat_positions(xs), torch.cat(xs, 2), rtol=0, atol=0)
    g = torch.randn(1, 2, 4, 2 * xs[0].shape[2], dtype=torch.float64)
    factors = maths.kfac_factors(block.inputs(cat_positions(xs)), g)
    xf = torch.cat([torch.cat(xs, 2), torch.ones(2, 1, 2 * xs[0].shape[2], dtype=torch.float64)], 1)
    torch.testing.assert_close(factors.A, torch.einsum("ndt,net->de", xf, xf) / (2 * xf.shape[2]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(factors.G, torch.einsum("cnot,cnpt->op", g, g), rtol=1e-12, atol=1e-12)



def test_bias_row_is_ones_whatever_memory_follows_the_patches() -> None:
    """``Block.inputs`` of a convolution's patches reads no memory after them as its row of ones
    unless it holds ones: the first planes of a larger ``[D', N, T]`` tensor (random values
    after them, then ones after them) give the same ``[x; 1]`` as a fresh ``torch.cat``."""
    (block,) = Block.of_layer("conv", nn.Conv2d(2, 3, 2).double())
    for after in (torch.randn, torch.ones):
        planes = torch.randn(9, 3, 5, dtype=torch.float64)
        planes[8] = after(3, 5, dtype=torch.float64)
        x = planes[:8].permute(1, 0, 2)  # [N, D, T] view of [D, N, T] memory, D = 2·2·2
        want = torch.cat([x, torch.ones(3, 1, 5, dtype=torch.float64)], 1)
        torch.testing.assert_close(block.inputs(x), want, rtol=0, atol=0)

def test_model_left_untouched_and_errors() -> None:
    loss_fn = nn.CrossEntropyLoss()
    model, x, y = zoo.make("vit", loss_fn=loss_fn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extract_autograd(model, loss_fn, x, y, flavours=("mc",), seed=1)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="flavours"):
        extract_autograd(model, loss_fn, x, y, flavours=("fisher",))
    with pytest.raises(ValueError, match="grouped"):
        extract_autograd(nn.Conv1d(2, 2, 1, groups=2), nn.MSELoss(), torch.randn(1, 2, 3), torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match="unsupported"):
        extract_autograd(model, nn.NLLLoss(), x, y)

    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: Tensor) -> Tensor:
            out = self.fc(x)
            x.mul_(2.0)  # the recorded input changes after the call
            return out + x

    with pytest.raises(ValueError, match="modified in place"):
        extract_autograd(InPlace().double(), nn.MSELoss(), torch.randn(2, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="leading dimension"):
        flat = nn.Sequential(nn.Flatten(0, 1), nn.Linear(2, 2), nn.Unflatten(0, (2, 3)), nn.Flatten(1))
        extract_autograd(flat.double(), nn.MSELoss(), torch.randn(2, 3, 2, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64))


@pytest.mark.parametrize("stats", [("kfac",), ("tkfac",), ("sqrt",)])
def test_an_input_changed_after_the_backward_is_refused(stats: tuple[str, ...]) -> None:
    """The inputs are kept by reference and unfolded when the statistics are formed (after the
    user's backward): one modified in place in between is refused, naming the layer, and the same
    pass without the change gives the statistics of the inputs as called."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 16, 4)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    want = extract_autograd(model, loss_fn, x, y, flavours=("exact",))
    for change in (True, False):
        inp = x.clone()
        with ExtractionSession(model, loss_fn, engine="autograd", fisher="exact", stats=stats) as session:
            loss_fn(model(inp), y).backward()
            if change:
                inp.mul_(2.0)
        if change:
            with pytest.raises(ValueError, match="input of '0' was modified in place"):
                session.results()
            continue
        got = session.results()["0"]
        # the inputs as called, unfolded here with a row of ones, and the engine's own roots g
        xu = torch.cat([F.unfold(x, 3, padding=1), torch.ones(5, 1, 16, dtype=torch.float64)], 1)  # [N, D, T]
        m = torch.einsum("cnot,ndt->cnod", want["0"].calls[0].g, xu).flatten(0, 1)  # [K, d_out, D]
        if "kfac" in stats:
            a = xu.transpose(1, 2).reshape(-1, 19)
            torch.testing.assert_close(got.kfac["exact"].A, a.T @ a / 80, rtol=1e-12, atol=1e-12)
        if "tkfac" in stats:
            torch.testing.assert_close(got.tkfac.delta_phi, torch.einsum("kod,koe->de", m, m), rtol=1e-10, atol=1e-12)
        if "sqrt" in stats:
            torch.testing.assert_close(got.sqrt.matrices(), m, rtol=1e-10, atol=1e-12)


CONV_CASES = {  # D ≥ 64 weight columns at T ≥ 1024 output locations
    "2d-bias": (lambda: nn.Conv2d(29, 2, 3, padding=1), (29, 32, 32), False),
    "2d-narrow": (lambda: nn.Conv2d(8, 2, 3, padding=1), (8, 32, 32), False),  # D = 72 + the bias
    "2d-bias-apart": (lambda: nn.Conv2d(29, 2, 3, padding=1), (29, 32, 32), True),
    "2d-strided-dilated-reflect": (
        lambda: nn.Conv2d(29, 2, 3, stride=2, padding=2, dilation=2, padding_mode="reflect", bias=False), (29, 66, 66), False),
    "1d": (lambda: nn.Conv1d(52, 2, 5, padding=2), (52, 1024), False),
    "3d": (lambda: nn.Conv3d(10, 2, 3, padding=1), (10, 11, 11, 11), False),
}


@pytest.mark.usefixtures("routes")
@pytest.mark.parametrize("outputs", [4, 1])
@pytest.mark.parametrize("stats", [("tkfac", "kfe"), ("tkfac",), ("sqrt",), ("kfac", "kfe")])
@pytest.mark.parametrize("case", CONV_CASES)
def test_convolution_statistics_with_many_locations_match_the_patches(case: str, stats: tuple[str, ...],
                                                                       outputs: int) -> None:
    """A convolution with ≥ 1024 output locations and ≥ 64 weight columns, whose per-sample
    products the autograd engine forms without unfolding its input (on the CPU): every statistic equals the dense sums over
    ``M_k = Σ_t g_k x_kᵀ`` from the patches (the engine's roots ``g``; the bias as a row of ones),
    in one block or with the bias apart, for every padding, stride and dimension — with several
    root columns (4 classes) and with one (a single regression output)."""
    make, shape, separate_bias = CONV_CASES[case]
    torch.manual_seed(0)
    conv = make()
    with torch.no_grad():
        d_out, spatial = conv(torch.zeros(1, *shape)).shape[1], conv(torch.zeros(1, *shape)).shape[2:]
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(d_out * math.prod(spatial), outputs)).double()
    loss_fn = nn.CrossEntropyLoss() if outputs > 1 else nn.MSELoss()
    x = torch.randn(2, *shape, dtype=torch.float64)
    y = torch.randint(0, outputs, (2,)) if outputs > 1 else torch.randn(2, 1, dtype=torch.float64)
    g = extract_autograd(model, loss_fn, x, y, flavours=("exact",))["0"].calls[0].g  # [C, N, d_out, T]
    patches = unfold_input(model[0], x)
    full = torch.cat([patches, torch.ones_like(patches[:, :1])], 1) if conv.bias is not None else patches
    parts = {"0": full} if not separate_bias else {"0.weight": patches, "0.bias": full[:, -1:]}
    gen = torch.Generator().manual_seed(1)
    orthogonal = lambda n: torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    bases = {name: (orthogonal(d_out), orthogonal(xs.shape[1])) for name, xs in parts.items()}
    got = extract(model, loss_fn, x, y, engine="autograd", stats=stats, separate_bias=separate_bias,
                  eigenbases=bases if "kfe" in stats else {})
    for name, xs in parts.items():
        m = torch.einsum("cnot,ndt->cnod", g, xs).flatten(0, 1)  # [K, d_out, D]
        block = got[name]
        if "tkfac" in stats:
            torch.testing.assert_close(block.tkfac.delta_phi, torch.einsum("kod,koe->de", m, m), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(block.tkfac.delta_psi, torch.einsum("kod,kpd->op", m, m), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(block.tkfac.delta, m.square().sum(), rtol=1e-10, atol=1e-12)
        if "kfe" in stats:
            u_out, u_in = bases[name]
            want = (u_out.T @ m @ u_in).square().sum(0)
            torch.testing.assert_close(block.kfe_scaling, want, rtol=1e-10, atol=1e-12)
        if "sqrt" in stats:
            torch.testing.assert_close(block.sqrt.matrices(), m, rtol=1e-10, atol=1e-12)
        if "kfac" in stats:
            rows = xs.transpose(1, 2).reshape(-1, xs.shape[1])
            torch.testing.assert_close(block.kfac["exact"].A, rows.T @ rows / rows.shape[0], rtol=1e-10, atol=1e-12)


class _Autocast(nn.Module):
    """A forward run entirely under bfloat16 autocast: bfloat16 layer inputs (after the first),
    outputs and output gradients, float32 weights."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x)


def test_autocast_forward_gives_float32_statistics_of_the_network() -> None:
    """Under autocast the statistics are the float32 weights' (they failed in a dtype mismatch,
    and with a BatchNorm in torch's vmap of its backward), and describe the network to bfloat16's
    precision: the exact blocks and KFAC factors against the float64 network's."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    stats = extract(_Autocast(net), loss_fn, x, y, stats=("sqrt", "kfac", "tkfac"), engine="autograd")
    ref64 = copy.deepcopy(net).double()
    ref = extract(ref64, loss_fn, x.double(), y, stats=("kfac",))
    for name, layer in (("net.0", "0"), ("net.4", "4")):
        s = stats[name]
        assert {s.sqrt.dtype, s.kfac["exact"].A.dtype, s.kfac["exact"].G.dtype, s.tkfac.delta.dtype} == {torch.float32}
        assert rel(s.dense_fisher().double(), dense_ggn(ref64, loss_fn, x.double(), y, layer)) < 5e-2
        for factor in ("A", "G"):
            assert rel(getattr(s.kfac["exact"], factor).double(), getattr(ref[layer].kfac["exact"], factor)) < 5e-2
    coupled = extract(_Autocast(net.train()), loss_fn, x, y, stats=("sqrt",), engine="autograd")  # per-example route
    assert {s.sqrt.dtype for s in coupled.values()} == {torch.float32}, {n: s.sqrt.dtype for n, s in coupled.items()}


def test_autocast_convolutions_read_their_bfloat16_inputs_as_float32() -> None:
    """Convolutions fed bfloat16 activations under autocast, on every route that reads the kept
    input: the patches without a bias, ``A`` by shifted products of the image (``conv_gram``) and
    EKFAC's per-sample rescaling by torch's weight-gradient kernel (``D`` ≥ 256, ``T`` ≥ 1024).
    The inputs are cast when read: the statistics are float32 and the float64 network's to
    bfloat16's precision."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(32, 8, 3, padding=1), nn.ReLU(),  # D = 289, T = 1024
        nn.Conv2d(8, 4, 3, stride=2, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 15 * 15, 5),
    )
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    ref64 = copy.deepcopy(net).double()
    ref = extract(ref64, loss_fn, x.double(), y, stats=("kfac",))
    bases = {name: tuple(torch.linalg.eigh(f)[1] for f in (ref[name].kfac["exact"].G, ref[name].kfac["exact"].A))
             for name in ("2", "4")}
    ref = extract(ref64, loss_fn, x.double(), y, stats=("kfac", "kfe"), eigenbases=bases)
    stats = extract(_Autocast(net), loss_fn, x, y, stats=("kfac", "kfe"), engine="autograd",
                    eigenbases={f"net.{name}": tuple(u.float() for u in b) for name, b in bases.items()})
    for name in ("2", "4"):
        s, r = stats[f"net.{name}"], ref[name]
        assert {s.kfac["exact"].A.dtype, s.kfe_scaling.dtype} == {torch.float32}
        assert rel(s.kfac["exact"].A.double(), r.kfac["exact"].A) < 2e-2
        assert rel(s.kfe_scaling.double(), r.kfe_scaling) < 5e-2


class _ReadsItsGradient(torch.autograd.Function):
    """The identity, whose backward reads a value into Python (as a gradient check would):
    torch.func.vmap cannot batch it, a loop over the columns can."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        assert torch.isfinite(g).all().item()
        return g


class _Checked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(_ReadsItsGradient.apply(torch.tanh(self.a(x))))


def test_small_cpu_chunks_loop_over_their_columns_and_larger_ones_vmap() -> None:
    """On the CPU a chunk of at most 4 columns loops over its vjps (vmap's batching rules cost
    more than they save there); 5 columns and more are vmapped.  Seen through a backward vmap
    cannot batch: vmapped, it warns and falls back to the loop; looped from the start, no warning.
    ``vectorize=False`` loops whatever the chunk."""
    torch.manual_seed(0)
    model = _Checked().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])

    def run(max_bytes: int, vectorize: bool = True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = extract_autograd(model, nn.CrossEntropyLoss(), x, y, flavours=("exact", "empirical"), max_bytes=max_bytes,
                                   vectorize=vectorize)
        return out, [str(w.message) for w in caught if "vmap cannot batch" in str(w.message)]

    def smallest(columns: int) -> int:  # the smallest bound giving chunks of `columns` columns
        lo, hi = 1, 2**24
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if run(mid, vectorize=False)[0].columns_per_chunk < columns else (lo, mid)
        return lo

    reference, said = run(2**24, vectorize=False)
    assert said == [] and reference.num_vjps >= 5
    for columns, vmapped in ((4, False), (5, True)):
        got, said = run(smallest(columns))
        assert got.columns_per_chunk == columns and bool(said) == vmapped, (columns, said)
        for name in reference.layers:
            torch.testing.assert_close(got.layers[name].sqrt, reference.layers[name].sqrt, rtol=1e-13, atol=1e-15)
