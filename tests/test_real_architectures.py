"""Real architectures through curvlab.extract / compare: exact blocks against dense torch.func
references, Kronecker factors against curvlinops, the two engines against each other.

References are built here, independently of both engines: ``jacrev`` of the whole batch output
w.r.t. a block's parameters through ``functional_call`` and ``hessian`` of the loss w.r.t. the
output (so train-mode BatchNorm's coupling is in them), on a copy of the model whose train-mode
BatchNorms keep no running statistics (the same function; torch.func refuses the buffer update).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import curvlab
from curvlab.optim import KFAC
import zoo
from helpers import batch, tiny_cnn, tiny_mlp
from zoo import oracle

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

RTOL = 1e-10
CE = nn.CrossEntropyLoss()


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def block_params(model: nn.Module, stats) -> list[str]:
    """The parameter paths of a block, in its flat order."""
    if stats.kind == "parameter":
        return [stats.name]
    names = dict(model.named_parameters())
    with_bias = stats.layout.bias_column or stats.layout.weight_shape is None  # (a bias shared: not the layer's)
    return [k for k in (f"{stats.name}.weight", *[f"{stats.name}.bias"] * with_bias) if k in names]


def dense_reference(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, names: list[str]) -> tuple[Tensor, Tensor]:
    """``(Jᵀ ∇²L J, ∇L)`` of the parameters ``names`` together, in their flat order."""
    ref = oracle(model)
    params = {k: v.detach() for k, v in ref.named_parameters()}
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def out_fn(flat: Tensor) -> Tensor:
        new = {k: p.reshape(s) for k, p, s in zip(names, torch.split(flat, sizes), shapes)}
        return functional_call(ref, {**params, **new}, (x,))

    flat = torch.cat([params[k].flatten() for k in names])
    out = out_fn(flat).detach()
    jac = jacrev(out_fn)(flat).reshape(out.numel(), -1)
    hess = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    grad = torch.func.grad(lambda f: loss_fn(out_fn(f), y))(flat)
    return jac.T @ hess @ jac, grad


# --- exact blocks, coupled BatchNorm included ------------------------------------------------

@pytest.mark.parametrize(
    "name,mode,engine",
    [("resnet_bn", "train", "autograd"), ("resnet_bn", "eval", "backpack"), ("vit", "train", "autograd"),
     ("vgg_bn", "train", "autograd"), ("tied", "train", "autograd"), ("tied_lm", "train", "autograd"),
     ("tied_bias", "train", "autograd"), ("mobilenet", "train", "autograd"), ("mobilenet", "eval", "autograd"),
     ("unet", "train", "autograd"), ("torch_transformer", "train", "autograd"),
     ("odd_attention", "train", "autograd")],
)
def test_every_block_is_the_dense_exact_block(name, mode, engine) -> None:
    """Train mode: BatchNorm's coupling is in the blocks; eval mode: BackPACK through its graph
    converter (AdaptiveAvgPool2d, residual +=, torch.flatten) on the unmodified ResNet."""
    model, x, y = zoo.make(name, n=3)
    model.train(mode == "train")
    state = copy.deepcopy(model.state_dict())
    stats = curvlab.extract(model, CE, x, y)
    assert stats.engine == engine and bool(stats.engine_reason) == (engine == "autograd")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN buffers restored
    covered = {p for s in stats.values() for p in block_params(model, s)}
    assert covered == {k for k, p in model.named_parameters() if p.requires_grad}  # nothing dropped
    for block, s in stats.items():
        fisher, grad = dense_reference(model, CE, x, y, block_params(model, s))
        assert rel(s.dense_fisher(), fisher) < RTOL, block
        assert rel(s.layout.to_vector(s.grad), grad) < RTOL, block
        assert s.coupled == (name in ("resnet_bn", "vgg_bn", "mobilenet") and mode == "train")


class Idiom(nn.Module):
    """A conv, a flatten and two Linear branches joined as ``forward`` writes them."""

    JOINS = {
        "a + b + 1.0": lambda a, b: a + b + 1.0,
        "sum([a, b])": lambda a, b: sum([a, b]),
        "a.add(b, alpha=0.5)": lambda a, b: a.add(b, alpha=0.5),
        "a + b": lambda a, b: a + b,
    }

    def __init__(self, join: str, flatten_kwarg: bool) -> None:
        super().__init__()
        self.join, self.flatten_kwarg = join, flatten_kwarg
        self.conv, self.act = nn.Conv2d(2, 2, 2), nn.ReLU()
        self.a, self.b, self.head = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        z = self.act(self.conv(x))
        z = torch.flatten(z, start_dim=1) if self.flatten_kwarg else torch.flatten(z, 1)
        return self.head(self.JOINS[self.join](self.a(z), self.b(z)))


@pytest.mark.parametrize("join,flatten_kwarg", [(j, False) for j in Idiom.JOINS] + [("a + b", True)])
def test_a_forward_backpacks_converter_cannot_call_is_extracted_by_the_autograd_engine(join, flatten_kwarg) -> None:
    """BackPACK's converter turns ``+``/``add``/``flatten`` into modules whatever their arguments:
    a float operand, ``sum``'s starting 0, ``alpha=``, ``start_dim=`` made ``engine='auto'`` (the
    default) crash inside BackPACK's forward.  Now those go to the autograd engine, naming the
    call; the tensor-only forms still run on BackPACK; every block is the dense one."""
    torch.manual_seed(0)
    model = Idiom(join, flatten_kwarg).double()
    x, y = torch.randn(3, 2, 3, 3, dtype=torch.float64), torch.tensor([0, 2, 1])
    stats = curvlab.extract(model, CE, x, y)
    backpack = join == "a + b" and not flatten_kwarg
    assert stats.engine == ("backpack" if backpack else "autograd"), stats.engine_reason
    if not backpack:
        assert "called with arguments other than tensors" in stats.engine_reason
    for block, s in stats.items():
        fisher, grad = dense_reference(model, CE, x, y, block_params(model, s))
        assert rel(s.dense_fisher(), fisher) < RTOL, block
        assert rel(s.layout.to_vector(s.grad), grad) < RTOL, block
    assert curvlab.compare(model, CE, x, y, approximations=("kfac",)).attrs["engine"] == stats.engine


class UpsamplingNet(nn.Module):
    """A U-Net's down and up path joined by ``+``: with one ReLU module per use BackPACK's converter
    takes it (its transposed convolution included); with ``torch.relu`` called in each place its
    converter fails (it reads the repeated function as a module path)."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.functional = functional
        self.down, self.act1 = nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU()
        self.up, self.act2 = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), nn.ReLU()
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        act1, act2 = (torch.relu, torch.relu) if self.functional else (self.act1, self.act2)
        return self.head((act2(self.up(act1(self.down(x)))) + x).flatten(1))


@pytest.mark.parametrize("functional", [False, True], ids=["modules", "torch.relu"])
def test_a_converted_upsampling_path_is_the_dense_block_and_a_failed_conversion_names_the_call(functional) -> None:
    torch.manual_seed(0)
    model = UpsamplingNet(functional).double()
    x, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 2, 1])
    stats = curvlab.extract(model, CE, x, y)
    assert stats.engine == ("autograd" if functional else "backpack"), stats.engine_reason
    if functional:
        assert stats.engine_reason == ("its forward calls torch.relu more than once, which BackPACK's graph "
                                       "converter cannot convert (a module instance per use, e.g. nn.ReLU(), it can)")
    for block, s in stats.items():
        fisher, grad = dense_reference(model, CE, x, y, block_params(model, s))
        assert rel(s.dense_fisher(), fisher) < RTOL, block
        assert rel(s.layout.to_vector(s.grad), grad) < RTOL, block


def test_the_optimizers_say_why_attentions_out_proj_takes_the_first_order_step() -> None:
    """nn.MultiheadAttention applies its out_proj Linear itself: its weight was listed as "the bias
    of a layer whose weight is frozen or shared", which it is neither."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.att, self.head = nn.Linear(4, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.head(self.att(h, h, h)[0].mean(1))

    with pytest.warns(UserWarning) as said:
        opt = KFAC(Net(), lr=0.1)
        assert [b.name for b in opt.blocks()] == ["inp", "head"]
    told = [str(w.message) for w in said if "no Kronecker block" in str(w.message)]
    assert len(told) == 1 and told[0].endswith(
        "of nn.MultiheadAttention, which applies its projections in torch's functional attention "
        "(curvlab.kronecker_attention(model), before building the optimizer, makes them nn.Linear modules, "
        "preconditioned): "
        "['att.in_proj_weight', 'att.in_proj_bias', 'att.out_proj.weight', 'att.out_proj.bias'] "
        "(see curvlab.model_blocks)"), told
    found = curvlab.extract.model_blocks(opt.model)
    assert found.enclosed == ["att.out_proj.weight", "att.out_proj.bias"] and not found.lone_biases
    assert found.packed == ["att.in_proj_weight", "att.in_proj_bias"] and not found.own


def test_a_weight_the_models_own_module_passes_to_f_linear_takes_the_named_first_order_step() -> None:
    """A parameter of the model's own module applied through ``F.linear``: no Kronecker layer to
    see, so SGD's update — named in the warning (it was silent, for a QA model's 86 % of its
    parameters), with the reason and what would be preconditioned."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.b = nn.Parameter(0.3 * torch.randn(8, 4)), nn.Parameter(torch.zeros(8))
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(torch.tanh(torch.nn.functional.linear(x, self.w, self.b)))

    torch.manual_seed(0)
    model, x, y = Functional(), torch.randn(6, 4), torch.randint(0, 3, (6,))
    with pytest.warns(UserWarning) as said:
        opt = KFAC(model, lr=0.1, momentum=0.0, kl_clip=None, stats_interval=1)
        assert [b.name for b in opt.blocks()] == ["head"]
    told = [str(w.message) for w in said if "no Kronecker block" in str(w.message)]
    assert len(told) == 1 and told[0].endswith(
        "of the model's own modules, used in their own forward (a cls token, a position embedding, a weight passed "
        "to F.linear or F.conv2d: an nn.Linear or nn.Conv2d module is preconditioned): ['w', 'b'] "
        "(see curvlab.model_blocks)"), told
    assert curvlab.extract.model_blocks(model).own == ["w", "b"]
    before = model.w.detach().clone()
    opt.zero_grad()
    with opt.track(CE):
        CE(model(x), y).backward()
    grad = model.w.grad.clone()
    opt.step()
    torch.testing.assert_close(model.w.detach(), before - 0.1 * grad)


def test_multihead_attention_parameters_are_exact_parameter_blocks() -> None:
    """nn.MultiheadAttention applies its projections functionally: they are parameter blocks."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 4)
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.inp(x)
            return self.head(self.mha(h, h, h, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Net().double()
    x, y = torch.randn(3, 2, 3, dtype=torch.float64), torch.tensor([0, 2, 1])
    stats = curvlab.extract(model, CE, x, y)
    kinds = {k: s.kind for k, s in stats.items()}
    assert kinds == {
        "inp": "kronecker", "mha.in_proj_weight": "parameter", "mha.in_proj_bias": "parameter",
        "mha.out_proj.weight": "parameter", "mha.out_proj.bias": "parameter", "head": "kronecker",
    }
    for block, s in stats.items():
        assert rel(s.dense_fisher(), dense_reference(model, CE, x, y, block_params(model, s))[0]) < RTOL, block


class Unstructured(nn.Module):
    """Torch modules with no Kronecker structure: an LSTM, a GRU, a PReLU, a grouped transposed
    convolution and a bilinear layer, between Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.lstm, self.gru = nn.Linear(3, 4), nn.LSTM(4, 4, batch_first=True), nn.GRU(4, 4, batch_first=True)
        self.act, self.up = nn.PReLU(4), nn.ConvTranspose1d(4, 2, 2, stride=2, groups=2)
        self.bil, self.head = nn.Bilinear(4, 4, 3), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.gru(self.lstm(self.inp(x))[0])[0].transpose(1, 2))  # [N, 4, T]
        return self.bil(h.mean(2), h.amax(2)) + self.head(self.up(h).flatten(1))


def test_torch_modules_without_kronecker_structure_are_exact_parameter_blocks() -> None:
    """Every entry point refused these modules ('not supported'; skip_unsupported left them out):
    each tensor is now its exact parameter block, named in ``unstructured``, measured by compare,
    and given the first-order update by the optimizers, which name it once."""
    torch.manual_seed(0)
    model = Unstructured().double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 2, 3, generator=gen, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    found = curvlab.extract.model_blocks(model)
    others = [k for k in dict(model.named_parameters()) if not k.startswith(("inp.", "head."))]
    assert found.unstructured == others and {b.name for b in found.kronecker} == {"inp", "head"}
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        stats = curvlab.extract(model, CE, x, y)
    # torch's notice that Bilinear's batching rule is a loop (right values) reached the user
    assert not [w for w in said if "performance drop" in str(w.message)]
    assert list(stats) == ["inp", *others, "head"] and stats.skipped == []
    for block, s in stats.items():
        fisher, grad = dense_reference(model, CE, x, y, block_params(model, s))
        assert rel(s.dense_fisher(), fisher) < RTOL, block
        assert rel(s.layout.to_vector(s.grad), grad) < RTOL, block
    ds = curvlab.compare(model, CE, x, y, approximations=("kflr", "diagonal"))
    measured = ds.sel(layer=others)
    assert set(measured.block_kind.values) == {"parameter"}
    assert np.isfinite(measured.rel_frobenius_error.sel(approximation="diagonal")).all()
    opt = KFAC(model, lr=0.01, stats_interval=1)
    with pytest.warns(UserWarning) as said:
        for _ in range(2):
            opt.zero_grad()
            with opt.track(CE):
                CE(model(x), y).backward()
            opt.step()
    named = [str(w.message) for w in said if "have no Kronecker block" in str(w.message)]
    assert len(named) == 1 and all(f"'{k}'" in named[0] for k in others), named


@pytest.mark.parametrize("norm", ["parametrizations.weight_norm", "weight_norm"])
def test_a_weight_computed_from_other_tensors_is_no_kronecker_block(norm: str) -> None:
    """A weight-normalised Linear (wav2vec2, HiFi-GAN) had a Kronecker block of its computed
    weight ``g·v/‖v‖``, no trainable tensor: a zero gradient in its weight columns, and blocks for
    ``g`` and ``v`` beside it.  ``g``, ``v`` and the layer's bias are exact parameter blocks now,
    every trainable tensor in exactly one block, and the optimizers name them."""
    torch.manual_seed(0)
    wrap = nn.utils.parametrizations.weight_norm if norm.startswith("param") else nn.utils.weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        model = nn.Sequential(wrap(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 0])
    trainable = [k for k, p in model.named_parameters() if p.requires_grad]
    stats = curvlab.extract(model, CE, x, y)
    assert {p for s in stats.values() for p in block_params(model, s)} == set(trainable)
    assert [k for k, s in stats.items() if s.kind == "kronecker"] == ["2"]
    assert curvlab.extract.model_blocks(model).unstructured == [k for k in trainable if k.startswith("0.")]
    for block, s in stats.items():
        fisher, grad = dense_reference(model, CE, x, y, block_params(model, s))
        assert rel(s.dense_fisher(), fisher) < RTOL, block
        assert rel(s.layout.to_vector(s.grad), grad) < RTOL, block
    with pytest.warns(UserWarning, match="have no Kronecker block"):
        opt = KFAC(model, lr=0.01, stats_interval=1)
        assert [b.name for b in opt.blocks()] == ["2"]


def test_a_train_mode_spectral_norm_is_measured_at_the_weight_of_one_forward_pass() -> None:
    """A train-mode ``spectral_norm`` (GAN discriminators) runs a power-iteration step at every
    read of its weight: curvlab read it twice before its forward pass, so every block and
    gradient was that of the weight two steps on (the head's block 3.8e-3 off, silently).  Now
    the blocks are those of torch's own training forward pass, and the optimizer's
    statistics pass leaves the power iteration where that one forward pass does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4)), nn.Tanh(),
                          nn.Linear(4, 3)).double().train()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 0])
    once = copy.deepcopy(model)
    once(x)  # torch's training forward: one power-iteration step; then its weight, fixed
    once.eval()
    stats = curvlab.extract(model, CE, x, y)
    assert [k for k, s in stats.items() if s.kind == "kronecker"] == ["2"]
    for block, s in stats.items():
        fisher, grad = dense_reference(once, CE, x, y, block_params(once, s))
        assert rel(s.dense_fisher(), fisher) < RTOL, block
        assert rel(s.layout.to_vector(s.grad), grad) < RTOL, block
    opt = KFAC(model, lr=0.01, stats_interval=1)
    with pytest.warns(UserWarning, match="have no Kronecker block"), opt.track(CE):
        CE(model(x), y).backward()
    for name, buffer in once.state_dict().items():
        assert torch.equal(model.state_dict()[name], buffer), name


def dense_empirical_reference(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, names: list[str]) -> Tensor:
    """``R Σ_n ∇ℓ_n ∇ℓ_nᵀ`` of the parameters ``names`` (``L = R Σ ℓ_n``; CE's mean: ``R = 1/N``)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes, sizes = [params[k].shape for k in names], [params[k].numel() for k in names]
    per_example = type(loss_fn)(reduction="none")

    def losses(flat: Tensor) -> Tensor:
        new = {k: p.reshape(s) for k, p, s in zip(names, torch.split(flat, sizes), shapes)}
        return per_example(functional_call(model, {**params, **new}, (x,)), y)

    grads = jacrev(losses)(torch.cat([params[k].flatten() for k in names]))  # [N, P]
    return grads.T @ grads / x.shape[0]


class NormTwice(nn.Module):
    """A grouped convolution called once, a BatchNorm called twice (its blocks: the generic route)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bn(torch.tanh(self.bn(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("name", ["mobilenet", "resnet_bn", "vgg_bn", "mlp_bn1d", "norm_twice", "resnet_gn", "vit"])
def test_norm_layer_and_grouped_convolution_blocks_equal_the_dense_blocks(name: str) -> None:
    """A norm layer's (an eval-mode BatchNorm, GroupNorm, LayerNorm) and a grouped convolution's
    parameter blocks come from the gradients at the module's output, one vjp per root column for
    every example at once (the generic route: one per column and example, 43 s → 11–16 s for
    MobileNetV2 at N = 16); exact and empirical blocks against the dense references, by the
    autograd engine (ResNet-GN and the ViT measured in eval mode: the same blocks as in train
    mode, neither couples its examples)."""
    if name == "mlp_bn1d":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
        model.train()(torch.randn(8, 3, dtype=torch.float64))  # running statistics of their own
        x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1])
    elif name == "norm_twice":
        torch.manual_seed(0)
        model = NormTwice().double()
        x, y = torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1])
    else:
        model, x, y = zoo.make(name, n=4)
    model.eval()
    for fisher in ("exact", "empirical"):  # (MC's draws with it: the root the Kronecker statistics share)
        stats = curvlab.extract(model, CE, x, y, engine="autograd", fisher=fisher, kfac_flavours=("exact", "mc"))
        assert stats.engine == "autograd" and not any(s.coupled for s in stats.values())
        checked = 0
        for block, s in stats.items():
            if s.kind != "parameter":
                continue
            names = block_params(model, s)
            want = dense_reference(model, CE, x, y, names)[0] if fisher == "exact" else \
                dense_empirical_reference(model, CE, x, y, names)
            assert rel(s.dense_fisher(), want) < RTOL, (fisher, block)
            checked += 1
        assert checked == len(curvlab.extract.model_blocks(model).parameters)


class HeldParameters(nn.Module):
    """A ViT's idiom: a token and a position table held by the model's own class, then ``tail``,
    which may make one example alone compute something else than its row of the batch."""

    TAILS = {
        "none": lambda h, x: h,
        "batch size": lambda h, x: h * (1 + 0.1 * x.shape[0]),  # no coupling a vjp sees
        "input mean": lambda h, x: h * (1 + x.mean()),  # the input's, before every layer
    }

    def __init__(self, tail: str = "none", dropout: float = 0.0) -> None:
        super().__init__()
        self.tail, self.drop = tail, nn.Dropout(dropout)
        self.token, self.pos = nn.Parameter(0.5 * torch.randn(1, 1, 4)), nn.Parameter(0.5 * torch.randn(1, 3, 4))
        self.mix, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # [N, 2, 4]
        h = torch.cat((self.token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos
        h = self.head(self.drop(torch.tanh(self.mix(h))).mean(1))
        return self.TAILS[self.tail](h, x)


@pytest.mark.parametrize("tail", list(HeldParameters.TAILS))
def test_parameters_held_by_the_model_are_the_dense_blocks(tail: str) -> None:
    """Their per-example roots come from the model run on one example at a time where that
    reproduces the batch's rows, from the generic route where it does not (the batch size or the
    input mean in the forward): the same exact and empirical blocks either way."""
    torch.manual_seed(0)
    model = HeldParameters(tail).double()
    x, y = torch.randn(5, 2, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    for fisher in ("exact", "empirical"):
        stats = curvlab.extract(model, CE, x, y, engine="autograd", fisher=fisher)
        assert not any(s.coupled for s in stats.values())
        for block in ("token", "pos"):
            want = dense_reference(model, CE, x, y, [block])[0] if fisher == "exact" else \
                dense_empirical_reference(model, CE, x, y, [block])
            assert rel(stats[block].dense_fisher(), want) < RTOL, (fisher, block)


def test_parameters_held_by_a_model_with_active_dropout_are_measured_under_its_one_mask() -> None:
    """A rerun draws other dropout masks than the batch's forward: the generic route measures the
    forward that ran — the per-example gradients of the same seed's forward, taken by autograd."""
    torch.manual_seed(0)
    model = HeldParameters(dropout=0.5).double().train()
    x, y = torch.randn(6, 2, 4, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0, 2])
    torch.manual_seed(3)
    stats = curvlab.extract(model, CE, x, y, engine="autograd", fisher="empirical")
    torch.manual_seed(3)
    losses = nn.CrossEntropyLoss(reduction="none")(model(x), y)
    for block in ("token", "pos"):
        p = dict(model.named_parameters())[block]
        grads = torch.stack([torch.autograd.grad(losses[n], p, retain_graph=True)[0].flatten() for n in range(6)])
        assert rel(stats[block].dense_fisher(), grads.T @ grads / 6) < RTOL, block


class SequenceFirstNorm(nn.Module):
    """A LayerNorm on a sequence-first ``[T, N, D]`` tensor, between batch-first layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.ln, self.head = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(self.inp(x).transpose(0, 1)).transpose(0, 1)
        return self.head(torch.tanh(h).mean(1))


def test_a_norm_layer_that_sees_the_batch_elsewhere_takes_the_generic_route() -> None:
    """Its rows are positions, not examples: the local route would read them as examples."""
    torch.manual_seed(0)
    model = SequenceFirstNorm().double()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    stats = curvlab.extract(model, CE, x, y)
    for block in ("ln.weight", "ln.bias"):
        assert rel(stats[block].dense_fisher(), dense_reference(model, CE, x, y, [block])[0]) < RTOL, block


# --- the two engines, one result -----------------------------------------------------------

def _models():
    resnet, x, y = zoo.make("resnet_bn", n=3)
    vgg, xv, yv = zoo.make("vgg_bn", n=3)
    mlp, cnn = tiny_mlp(), tiny_cnn()
    return {
        "mlp": (mlp, *batch(mlp, CE, n=4)),
        "cnn": (cnn, *batch(cnn, CE, n=4)),
        "resnet-eval": (resnet.eval(), x, y),  # BackPACK through its graph converter
        "vgg-eval": (vgg.eval(), xv, yv),
    }


def random_bases(stats) -> dict[str, tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(5)
    q = lambda n: torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]  # noqa: E731
    return {k: (q(s.layout.shape[0]), q(s.layout.shape[1])) for k, s in stats.items() if s.kind == "kronecker"}


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet-eval", "vgg-eval"])
def test_engines_agree(name, kfac_approx) -> None:
    model, x, y = _models()[name]
    opts = dict(fisher="mc", mc_samples=2, kfac_flavours=("exact", "mc", "empirical"), seed=3, kfac_approx=kfac_approx)
    probe = curvlab.extract(model, CE, x, y, **opts)
    tkfac = "kfc" if kfac_approx == "reduce" else "exact"
    full = dict(opts, stats=("sqrt", "kfac", "tkfac", "kfe"), eigenbases=random_bases(probe), tkfac_conv=tkfac)
    bp = curvlab.extract(model, CE, x, y, engine="backpack", **full)
    ag = curvlab.extract(model, CE, x, y, engine="autograd", **full)
    assert (bp.engine, ag.engine) == ("backpack", "autograd") and list(bp) == list(ag)
    for block in bp:
        a, b = bp[block], ag[block]
        assert (a.kind, a.layout, a.num_locations) == (b.kind, b.layout, b.num_locations)
        assert rel(a.sqrt.matrices(), b.sqrt.matrices()) < RTOL and rel(a.grad, b.grad) < RTOL, block
        if a.kind == "parameter":
            continue
        for f in ("exact", "mc", "empirical"):
            assert rel(a.kfac[f].A, b.kfac[f].A) < RTOL and rel(a.kfac[f].G, b.kfac[f].G) < RTOL, (block, f)
        for field in ("delta", "delta_phi", "delta_psi"):
            assert rel(getattr(a.tkfac, field), getattr(b.tkfac, field)) < RTOL, (block, field)
        assert rel(a.kfe_scaling, b.kfe_scaling) < RTOL, block


# --- Kronecker factors: the convention of curvlinops, expand and reduce ---------------------

@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["resnet_bn", "vit", "torch_encoder"])
def test_kronecker_factors_match_curvlinops(name, kfac_approx) -> None:
    curvlinops = pytest.importorskip("curvlinops", reason="curvlinops is a dev dependency (pip install -e .[dev])")
    model, x, y = zoo.make(name, n=3)
    ref = oracle(model)  # curvlinops refuses train-mode BatchNorm with running statistics
    modules = dict(ref.named_modules())
    for flavour, fisher_type in (("exact", "type-2"), ("empirical", "empirical")):
        stats = curvlab.extract(model, CE, x, y, fisher=flavour, stats=("kfac",), kfac_approx=kfac_approx)
        assert all(s.kfac_approx == kfac_approx for s in stats.values())
        params = [p for n in stats for p in modules[n].parameters()]
        op = curvlinops.KFACLinearOperator(
            ref, CE, params, [(x, y)], fisher_type=fisher_type, kfac_approx=kfac_approx,
            separate_weight_and_bias=False, check_deterministic=False,
        )
        op.compute_kronecker_factors()
        for block, s in stats.items():
            assert rel(s.kfac[flavour].A, op._input_covariances[block]) < RTOL, (block, flavour)
            assert rel(s.kfac[flavour].G, op._gradient_covariances[block]) < RTOL, (block, flavour)


def test_a_grouped_convolution_with_fewer_groups_than_channels_is_an_exact_parameter_block() -> None:
    """ResNeXt's grouped convolution (groups < in_channels): no Kronecker block, each tensor its
    exact parameter block.  The zoo's grouped convolution has groups == in_channels, so a check
    for depthwise convolutions only (``groups == in_channels``) passed every test."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 9, 3)).double()
    x, y = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 0])
    found = curvlab.extract.model_blocks(model)
    assert found.unstructured == ["0.weight", "0.bias"] and [b.name for b in found.kronecker] == ["3"]
    stats = curvlab.extract(model, CE, x, y)
    assert {k: s.kind for k, s in stats.items()} == {"0.weight": "parameter", "0.bias": "parameter", "3": "kronecker"}
    for name in ("0.weight", "0.bias"):
        assert rel(stats[name].dense_fisher(), dense_reference(model, CE, x, y, [name])[0]) < RTOL, name
