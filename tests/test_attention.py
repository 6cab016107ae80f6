"""curvlab.kronecker_attention: torch's nn.MultiheadAttention, its projections as nn.Linear modules.

The converted module is checked against torch's own module (outputs, attention weights and every
gradient, float64), its blocks against the dense references in test_real_architectures
(``torch_transformer``, ``torch_encoder``) and curvlinops; here, what a user of the conversion
meets: torch's Transformer layers, checkpoints in either form, the optimizers, the refusals.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.attention import KroneckerAttention, kronecker_attention
from curvlab.optim import KFAC, TEKFAC

torch.set_num_threads(1)
# torch's module, the reference, warns of the "both" masks' types (a bool and a float mask)
# (and the conversion of a sequence-first module: converted, with a warning that curvlab refuses it)
pytestmark = [pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning"),
              pytest.mark.filterwarnings("ignore:curvlab.kronecker_attention.*is sequence-first:UserWarning")]
E, HEADS, N, L, S = 6, 3, 3, 4, 5


def _inputs(batch_first: bool, batched: bool, kind: str, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    def seq(length: int) -> Tensor:
        shape = ((N, length, E) if batch_first else (length, N, E)) if batched else (length, E)
        return torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)

    q = seq(L)
    if kind == "self":
        return q, q, q
    memory = seq(S)
    return (q, memory, memory) if kind == "shared kv" else (q, memory, seq(S))


def _masks(which: str, kind: str, batched: bool, gen: torch.Generator) -> dict:
    source = L if kind == "self" else S
    heads = (N * HEADS,) if batched else (HEADS,)
    blocked = torch.rand(L, source, generator=gen) < 0.3
    blocked[1] = True  # a row that attends to nothing: NaN in torch's need_weights path, zeros in its fused one
    padding = torch.zeros((N, source) if batched else (source,), dtype=torch.bool)
    padding[..., -1] = True
    if batched:
        padding[1] = True  # an example padded whole
    if which == "none":
        return {}
    if which == "bool":
        return {"attn_mask": blocked}
    if which == "float 3-d":
        return {"attn_mask": torch.randn(*heads, L, source, generator=gen, dtype=torch.float64)}
    if which == "padding":
        return {"key_padding_mask": padding}
    if which == "causal":
        return {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64), "is_causal": True}
    return {"attn_mask": blocked, "key_padding_mask": torch.zeros(padding.shape, dtype=torch.float64).masked_fill(
        padding, -1e4)}  # "both": bool attention mask, float padding mask


CASES = [c for c in itertools.product((True, False), (True, False), ("self", "shared kv", "distinct"),
                                      ("none", "bool", "float 3-d", "padding", "causal", "both"))
         if not (c[3] == "causal" and c[2] != "self")]


@pytest.mark.parametrize("batch_first,batched,kind,masks", CASES)
def test_the_same_function_and_gradients_as_torchs_module(batch_first, batched, kind, masks) -> None:
    gen = torch.Generator().manual_seed(len(str((batch_first, batched, kind, masks))))
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, dtype=torch.float64)
    ours = KroneckerAttention.of(theirs)  # the same parameter tensors
    inputs = _inputs(batch_first, batched, kind, gen)
    kwargs = _masks(masks, kind, batched, gen)
    for need_weights, average in ((True, True), (True, False), (False, True)):
        outs = [m(*inputs, need_weights=need_weights, average_attn_weights=average, **kwargs) for m in (theirs, ours)]
        (a, wa), (b, wb) = outs
        torch.testing.assert_close(b, a, rtol=0, atol=1e-13, equal_nan=True)  # NaN, finite, where torch's are
        assert (wb is None) == (wa is None) == (not need_weights)
        if need_weights:
            torch.testing.assert_close(wb, wa, rtol=0, atol=1e-13, equal_nan=True)
        else:
            assert a.isfinite().all()  # (the test would not see the fused path's zeros otherwise)
        probe = torch.randn(a.shape, generator=gen, dtype=torch.float64)
        wrt = [*dict.fromkeys(inputs), *theirs.parameters()]  # the parameters: the same tensors in both
        grads = [torch.autograd.grad((out * probe).sum(), wrt) for out in (a, b)]
        for ga, gb in zip(*grads):
            torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-12, equal_nan=True)


ODD = [dict(kdim=4, vdim=5), dict(kdim=4), dict(add_bias_kv=True), dict(add_zero_attn=True),
       dict(kdim=4, vdim=5, add_bias_kv=True, add_zero_attn=True, bias=False)]


@pytest.mark.parametrize("options", ODD, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("batch_first", [True, False])
def test_torchs_other_options_the_same_function_and_gradients(options, batch_first) -> None:
    """Keys and values of other widths (separate q, k, v weights: three nn.Linear modules, the
    packed bias the module's own), ``add_bias_kv`` and ``add_zero_attn`` (a key and value appended:
    the masks padded as torch pads them, so no row attends to nothing)."""
    gen = torch.Generator().manual_seed(1)
    theirs = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, dtype=torch.float64, **options)
    ours = KroneckerAttention.of(theirs)
    assert ours._qkv_same_embed_dim == theirs._qkv_same_embed_dim and (ours.kdim, ours.vdim) == (theirs.kdim, theirs.vdim)
    if not theirs._qkv_same_embed_dim:
        assert [ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight] == [
            theirs.q_proj_weight, theirs.k_proj_weight, theirs.v_proj_weight] and ours.in_proj_weight is None
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())  # torch's keys, loaded both ways
    fresh = KroneckerAttention.of(nn.MultiheadAttention(E, HEADS, batch_first=batch_first, dtype=torch.float64, **options))
    fresh.load_state_dict(theirs.state_dict())
    nn.MultiheadAttention(E, HEADS, batch_first=batch_first, dtype=torch.float64, **options).load_state_dict(
        fresh.state_dict())
    assert all(torch.equal(fresh.state_dict()[key], t) for key, t in theirs.state_dict().items())
    lead = (lambda length: (N, length)) if batch_first else (lambda length: (length, N))
    q = torch.randn(*lead(L), E, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(*lead(S), width, generator=gen, dtype=torch.float64) for width in (theirs.kdim, theirs.vdim))
    _, _, _, masks = zip(*(c for c in CASES if c[2] == "distinct"))
    for which in dict.fromkeys(masks):
        kwargs = _masks(which, "distinct", True, gen)
        for need_weights in (True, False):
            (a, wa), (b, wb) = (m(q, k, v, need_weights=need_weights, **kwargs) for m in (theirs, ours))
            torch.testing.assert_close(b, a, rtol=0, atol=1e-13, equal_nan=True)
            if need_weights:
                torch.testing.assert_close(wb, wa, rtol=0, atol=1e-13, equal_nan=True)
            probe = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            grads = [torch.autograd.grad((out * probe).nansum(), list(theirs.parameters())) for out in (a, b)]
            for ga, gb in zip(*grads):
                torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_dropout_in_training_as_torch_draws_it() -> None:
    """torch's need_weights path drops attention weights with one F.dropout call; so does this
    module's: with the same seed, the same output."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(E, HEADS, dropout=0.5, batch_first=True, dtype=torch.float64).train()
    ours = KroneckerAttention.of(theirs)
    x = torch.randn(N, L, E, dtype=torch.float64)
    outs = []
    for m in (theirs, ours):
        torch.manual_seed(7)
        outs.append(m(x, x, x))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-13)
    ours.eval()
    assert not ours.training and torch.equal(ours(x, x, x)[0], ours(x, x, x)[0])  # no dropout in eval


def _encoder(depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=8, dropout=0.0, batch_first=True, dtype=torch.float64)
    return nn.Sequential(nn.Linear(2, E, dtype=torch.float64), nn.TransformerEncoder(layer, depth, enable_nested_tensor=False))


def test_torch_transformer_layers_compute_the_same_in_training_and_in_their_inference_fast_path() -> None:
    """torch's TransformerEncoderLayer reads the attention's attributes and, in eval mode without
    gradients, runs its fused kernel on ``in_proj_weight`` and ``out_proj``: the converted model
    gives the same outputs either way (a padding mask included), and the same gradients."""
    x = torch.randn(N, L, 2, dtype=torch.float64)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[0, -2:] = True
    model = _encoder()
    converted = kronecker_attention(copy.deepcopy(model))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in converted.modules())
    for train in (True, False):
        model.train(train), converted.train(train)
        for mask in (None, padding):
            with torch.set_grad_enabled(train):
                a, b = model[1](model[0](x), src_key_padding_mask=mask), converted[1](converted[0](x), src_key_padding_mask=mask)
            if mask is not None and not train:  # the fast path's nested tensors leave padded rows at 0
                keep = ~padding
                a, b = a[keep], b[keep]
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    model.train(), converted.train()
    grads = [torch.autograd.grad(m(x).square().sum(), list(m.parameters())) for m in (model, converted)]
    for ga, gb in zip(*grads):
        torch.testing.assert_close(gb, ga, rtol=0, atol=1e-12)


def test_the_same_parameter_tensors_and_the_same_state_dict() -> None:
    """The conversion moves no parameter: param groups built before stay valid, and checkpoints
    load both ways with nn.MultiheadAttention's keys."""
    model = _encoder()
    before = {id(p) for p in model.parameters()}
    keys = list(model.state_dict())
    kronecker_attention(model)
    assert {id(p) for p in model.parameters()} == before
    saved = model.state_dict()
    assert sorted(saved) == sorted(keys) and "1.layers.0.self_attn.in_proj_weight" in saved
    plain = _encoder()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    plain.load_state_dict(model.state_dict())  # converted → torch's module
    x = torch.randn(N, L, 2, dtype=torch.float64)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-12)
    fresh = kronecker_attention(_encoder())
    fresh.load_state_dict(plain.state_dict())  # torch's module → converted
    torch.testing.assert_close(fresh(x), plain(x), rtol=0, atol=1e-12)
    fresh.load_state_dict({k.replace("in_proj_", "in_proj."): v for k, v in plain.state_dict().items()})
    with pytest.raises(RuntimeError, match=r'Missing key.*"1.layers.0.self_attn.in_proj_bias"'):
        fresh.load_state_dict({k: v for k, v in plain.state_dict().items() if "in_proj_bias" not in k})
    kept = fresh.load_state_dict({k: v for k, v in plain.state_dict().items() if "0.self_attn.in_proj_w" not in k},
                                 strict=False)
    assert kept.missing_keys == ["1.layers.0.self_attn.in_proj_weight"]  # as state_dict() names it


def test_a_module_used_twice_stays_one_module() -> None:
    attention = nn.MultiheadAttention(E, HEADS, batch_first=True)
    model = nn.ModuleDict({"a": attention, "b": attention})
    kronecker_attention(model)
    assert model["a"] is model["b"] and isinstance(model["a"], KroneckerAttention)
    assert isinstance(kronecker_attention(nn.MultiheadAttention(E, HEADS, batch_first=True)), KroneckerAttention)


def test_a_sequence_first_attention_is_converted_with_a_warning_that_curvlab_will_refuse_it() -> None:
    model = nn.Sequential(nn.Linear(E, E))
    model.add_module("att", nn.MultiheadAttention(E, HEADS))
    with pytest.warns(UserWarning, match=r"module 'att' \(MultiheadAttention\) is sequence-first \(batch_first=False\)"
                                         ".*build it with batch_first=True"):
        kronecker_attention(model)
    assert isinstance(model.att, KroneckerAttention)


class _Mine(nn.MultiheadAttention):
    pass


@pytest.mark.parametrize("make,said", [
    (lambda: _Mine(E, HEADS), "is a subclass of nn.MultiheadAttention"),
    (lambda: _hooked(nn.MultiheadAttention(E, HEADS)), r"has hooks of its own \(_forward_hooks\)"),
    (lambda: _saved_hook(nn.MultiheadAttention(E, HEADS)), r"has hooks of its own \(_state_dict_pre_hooks\)"),
    (lambda: _parametrized(nn.MultiheadAttention(E, HEADS)),
     r"has a parametrization \(torch.nn.utils.parametrize, weight_norm\) of \['in_proj_weight'\].*convert first"),
])
def test_what_cannot_be_converted_is_refused_by_path_and_nothing_changes(make, said) -> None:
    model = nn.Sequential(nn.Linear(E, E))
    model.add_module("plain", nn.MultiheadAttention(E, HEADS))
    model.add_module("odd", make())
    with pytest.raises(ValueError, match=rf"curvlab.kronecker_attention: module 'odd' \(\w+\) {said}"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (sequence-first)
            kronecker_attention(model)
    assert type(model.plain) is nn.MultiheadAttention  # the convertible one left as it was too


def _hooked(module: nn.Module) -> nn.Module:
    module.register_forward_hook(lambda *args: None)
    return module


def _saved_hook(module: nn.Module) -> nn.Module:
    module.register_state_dict_pre_hook(lambda *args: None)
    return module


def _parametrized(module: nn.Module) -> nn.Module:
    torch.nn.utils.parametrize.register_parametrization(module, "in_proj_weight", nn.Identity())
    return module


def test_bad_masks_and_inputs_are_named() -> None:
    ours = KroneckerAttention.of(nn.MultiheadAttention(E, HEADS, batch_first=True))
    x = torch.randn(N, L, E)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 3\); expected \(4, 4\) or \(9, 4, 4\)"):
        ours(x, x, x, attn_mask=torch.zeros(L, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key_padding_mask of shape \(4, 4\); expected \(3, 4\)"):
        ours(x, x, x, key_padding_mask=torch.zeros(L, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask of dtype torch.int64; only bool and floating"):
        ours(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key of shape \(3, 4, 5\)"):
        ours(x, torch.randn(N, L, 5), x)
    with pytest.raises(RuntimeError, match="is_causal=True needs attn_mask"):
        ours(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match=r"key_padding_mask of shape \(4,\); expected \(3, 4\)"):
        ours(x, x, x, key_padding_mask=torch.zeros(L, dtype=torch.bool))  # one sequence's mask, a batch's query
    for key, value in ((x[:1], x[:1]), (x, x[:, :2])):  # another batch size; key and value of other lengths
        with pytest.raises(ValueError, match="key and value need one length and the query's batch size"):
            ours(x, key, value)


class _Classifier(nn.Module):
    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.embed = _encoder(depth)
        self.head = nn.Linear(E, 3, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x).mean(1))


def test_the_optimizers_precondition_the_converted_projections() -> None:
    """Unconverted, the attention's four tensors take the first-order step, and the warning names
    the conversion; converted, they are Kronecker blocks of KFAC and TEKFAC, whose step is the
    dense damped natural gradient (test_optim checks that of a Linear on [N, T, D]) and which
    train the model."""
    with pytest.warns(UserWarning, match=r"curvlab.kronecker_attention\(model\), before building the optimizer, makes them nn.Linear"):
        KFAC(_Classifier(), lr=0.1).blocks()
    model = kronecker_attention(_Classifier())
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, L, 2, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    for make in (KFAC, TEKFAC):
        net = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no first-order warning: only norm layers take that step
            opt = make(net, lr=0.1, damping=1e-2, stats_interval=1, scale_interval=1, eigen_interval=5)
            names = [b.name for b in opt.blocks()]
        assert {f"embed.1.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("in_proj", "out_proj")} <= set(names)
        first = None
        for _ in range(15):
            opt.zero_grad()
            with opt.track(loss_fn):
                loss = loss_fn(net(x), y)
                loss.backward()
            opt.step()
            first = loss.item() if first is None else first
        assert loss.item() < 0.8 * first, (make.__name__, first, loss.item())


def test_the_report_measures_the_projections_as_kronecker_blocks() -> None:
    """curvlab.compare on a converted torch Transformer: the attention projections get every
    approximation's metrics, as the timm-style ViT's qkv/proj do."""
    model = kronecker_attention(_Classifier(depth=1))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, L, 2, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    ds = curvlab.compare(model, nn.CrossEntropyLoss(), x, y, approximations=("kfac", "tekfac"))
    kinds = dict(zip(ds["layer"].values.tolist(), ds["block_kind"].values.tolist()))
    assert kinds["embed.1.layers.0.self_attn.in_proj"] == kinds["embed.1.layers.0.self_attn.out_proj"] == "kronecker"
    assert not any("in_proj_" in name for name in kinds)
    err = ds["rel_frobenius_error"].sel(layer="embed.1.layers.0.self_attn.in_proj")
    assert bool(((err > 0) & (err < 2)).all())


def test_the_report_summary_points_an_unconverted_attention_to_the_conversion() -> None:
    from curvlab.app.report import summary_markdown

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, L, 2, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    said = "`curvlab.kronecker_attention(model)` (in the function `--model` names) makes them `nn.Linear` modules"
    for convert in (False, True):
        model = kronecker_attention(_Classifier(depth=1)) if convert else _Classifier(depth=1)
        ds = curvlab.compare(model, nn.CrossEntropyLoss(), x, y, approximations=("kfac",))
        assert (said in summary_markdown(ds)) == (not convert)
