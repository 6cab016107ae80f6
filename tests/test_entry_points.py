"""Every entry point on the real-architecture zoo: the optimizers (TEKFAC on a train-mode ResNet,
first-order updates outside the Kronecker layers), the errors for what stays unsupported, and the
command line (model checked before any data is loaded; a user ResNet end to end)."""

from __future__ import annotations

import json
import os
import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import curvlab
import zoo
from curvlab.app.cli import main
from curvlab.app.report import summary_markdown
from curvlab.extract import UnsupportedModelError
from curvlab.extract.autograd import extract_autograd
from curvlab.io import read_netcdf
from curvlab.optim import KFAC, TEKFAC

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
CE = nn.CrossEntropyLoss()


def steps(opt, model: nn.Module, x, y, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        with opt.track(CE):
            CE(model(x), y).backward()
        opt.step()


def test_tekfac_lowers_the_loss_of_a_train_mode_resnet() -> None:
    model, x, y = zoo.make("resnet_bn", n=16)
    opt = TEKFAC(model, lr=0.1, damping=1e-2, stats_interval=1, eigen_interval=5, scale_interval=1,
                 fisher="exact", kl_clip=None)
    assert [b.name for b in opt.blocks()] == [
        "conv1", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.downsample.0", "fc",
    ]
    with torch.no_grad():
        before = CE(model(x), y).item()
    steps(opt, model, x, y, 20)
    with torch.no_grad():
        after = CE(model(x), y).item()
    assert after < 0.1 * before
    assert all(opt.block_states[b.name].curvature.build() is not None for b in opt.blocks())


@pytest.mark.parametrize("name", ["vit", "textcnn", "tied", "functional_mlp", "vgg_bn", "tied_lm", "tied_bias", "mobilenet",
                                  "torch_transformer", "odd_attention"])
def test_parameters_outside_kronecker_layers_get_the_first_order_update(name) -> None:
    """Root-module parameters (cls token, position embedding), norm layers, a decoder tied to the
    embedding, depthwise and grouped convolutions: SGD's update; a module called twice, functional
    layers, an nn.Embedding and torch's attention converted by curvlab.kronecker_attention:
    preconditioned (their statistics by the autograd engine)."""
    model, x, y = zoo.make(name, n=4)
    opt = KFAC(model, lr=0.05, momentum=0.0, damping=1e-2, stats_interval=1, kl_clip=None)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        kronecker = {p for b in opt.blocks() for p in b.parameters()}
    # named, unlike a norm layer's: the tied matrix is often a language model's largest
    # (grouped by why: the tied matrix, its layer's bias, the grouped convolutions)
    head = "parameter(s) have no Kronecker block and get the first-order (SGD) update, as norm layers' affine " \
           "parameters do — "
    named = {"tied_lm": f"KFAC: 2 {head}shared by several modules: ['encoder.weight']; the bias of a layer whose "
                        "weight is frozen (requires_grad=False) or shared: ['decoder.bias']",
             "tied_bias": f"KFAC: 1 {head}shared by several modules: ['a.bias']",
             "vit": f"KFAC: 2 {head}of the model's own modules, used in their own forward (a cls token, a position "
                    "embedding, a weight passed to F.linear or F.conv2d: an nn.Linear or nn.Conv2d module is "
                    "preconditioned): ['cls_token', 'pos_embed']",
             "torch_transformer": f"KFAC: 1 {head}of the model's own modules, used in their own forward (a cls token, "
                                  "a position embedding, a weight passed to F.linear or F.conv2d: an nn.Linear or "
                                  "nn.Conv2d module is preconditioned): ['queries']",
             "odd_attention": f"KFAC: 3 {head}of the model's own modules, used in their own forward (a cls token, "
                              "a position embedding, a weight passed to F.linear or F.conv2d: an nn.Linear or "
                              "nn.Conv2d module is preconditioned): ['attn.qkv_bias', 'attn.bias_k', 'attn.bias_v']",
             "mobilenet": f"KFAC: 3 {head}of modules without a Kronecker structure curvlab preconditions (a grouped or "
                          "depthwise convolution, an LSTM, a weight-normalised layer): ['depthwise.0.weight', "
                          "'grouped.weight', 'grouped.bias']"}
    assert [str(w.message)[:len(named.get(name, ""))] for w in said] == [named.get(name, "")] * (name in named)
    layers = {b.name for b in opt.blocks()}
    embeddings = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad}
    assert embeddings - {"encoder"} <= layers  # (tied_lm's encoder: shared with the decoder)
    steps(opt, model, x, y, 1)  # statistics now exist
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt.zero_grad()
    with opt.track(CE):
        CE(model(x), y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    first_order = [k for k, p in model.named_parameters() if p not in kronecker]
    for k, p in model.named_parameters():
        if p in kronecker:
            assert not torch.allclose(p, before[k] - 0.05 * grads[k]), k  # preconditioned
        else:
            torch.testing.assert_close(p.detach(), before[k] - 0.05 * grads[k], rtol=1e-12, atol=1e-15)
    assert bool(first_order) == (name in ("vit", "vgg_bn", "tied_lm", "tied_bias", "mobilenet", "torch_transformer",
                                          "odd_attention"))


# --- what stays unsupported: clear errors --------------------------------------------------

class RenormEmbedding(nn.Module):
    """``max_norm``: the embedding's forward rewrites rows of its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4, max_norm=1.0)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


def test_unsupported_modules_are_named_or_left_out() -> None:
    x, y = torch.tensor([[0, 5], [1, 2], [3, 3], [4, 0]]), torch.tensor([0, 1, 2, 0])
    model = RenormEmbedding().double()
    pattern = (r"module 'emb' \(Embedding\) uses max_norm, scale_grad_by_freq or sparse gradients, which are "
               r"unsupported\. Pass skip_unsupported=True \(curvlab.extract, curvlab.compare; `curvlab report --skip-unsupported`\)")
    with pytest.raises(UnsupportedModelError, match=pattern):
        curvlab.extract(model, CE, x, y)
    with pytest.raises(UnsupportedModelError, match=pattern):
        curvlab.compare(model, CE, x, y)
    weight = model.emb.weight.detach().clone()
    ds = curvlab.compare(model, CE, x, y, skip_unsupported=True, approximations=("kflr",))
    assert list(ds.layer.values) == ["head"] and ds.attrs["skipped_parameters"] == "emb.weight"
    assert torch.equal(model.emb.weight, weight)  # torch's forward renormalised its rows; put back
    assert not torch.equal(model.emb(x), weight[x])  # (as any forward does)
    assert "- **Parameters left out (unsupported layers, --skip-unsupported):** emb.weight" in summary_markdown(ds)
    opt = TEKFAC(model, lr=0.01, stats_interval=1)
    with pytest.warns(UserWarning, match=r"have no Kronecker block .* left out as unsupported: \['emb.weight'\]"):
        steps(opt, model, x, y, 2)  # the embedding gets the first-order update
    assert [b.name for b in opt.blocks()] == ["head"]
    vit, xv, yv = zoo.make("vit", n=3)
    with pytest.raises(UnsupportedModelError, match=r"engine='backpack' cannot run this model: .*engine='autograd'"):
        curvlab.extract(vit, CE, xv, yv, engine="backpack")


class WeightUsedOutside(nn.Module):
    """``b``'s weight also used functionally: its Kronecker block would miss that use."""

    def __init__(self, tied_embedding: bool) -> None:
        super().__init__()
        self.tied_embedding = tied_embedding
        self.emb, self.a, self.b = nn.Embedding(5, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        if self.tied_embedding:  # GPT-style logits over the vocabulary, per token
            return (torch.tanh(self.a(self.emb(x))) @ self.emb.weight.T).transpose(1, 2)
        h = torch.tanh(self.a(x))
        return self.b(h) + nn.functional.linear(h * h, self.b.weight)


@pytest.mark.parametrize("tied_embedding", [False, True], ids=["functional-linear", "tied-embedding"])
def test_a_weight_used_outside_its_module_is_refused_at_the_loss(tied_embedding: bool) -> None:
    """Its block was silently wrong (relative error 0.5–0.7 against the dense GGN)."""
    model = WeightUsedOutside(tied_embedding).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (4, 6), generator=gen) if tied_embedding else torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 5, (4, 6), generator=gen) if tied_embedding else torch.randint(0, 3, (4,), generator=gen)
    used = "emb.weight \\(Embedding\\) is used 2 times" if tied_embedding else "b.weight \\(Linear\\) is used 2 times"
    for engine in ("autograd", "auto"):
        with pytest.raises(UnsupportedModelError, match=used + r" .* called 1 time\(s\).*decoder.weight = emb.weight"):
            curvlab.extract(model, CE, x, y, engine=engine, skip_unsupported=True)
    if not tied_embedding:
        opt = KFAC(model, lr=0.01, stats_interval=1)
        with pytest.raises(UnsupportedModelError, match=used):
            steps(opt, model, x, y, 1)
        assert opt.steps_done == 0
    # (a layer called twice, whose weight its own calls use twice, is zoo's TiedMLP: measured everywhere)


def test_a_model_calling_no_layer_names_a_weight_it_uses() -> None:
    """Every layer applied as ``F.linear(x, layer.weight)``: the message names one and the cause."""

    class AllFunctional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(torch.tanh(F.linear(x, self.a.weight, self.a.bias)), self.b.weight, self.b.bias)

    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(UnsupportedModelError, match=r"no layer's hooks ran, yet a.weight reaches it: .*\(F\.linear"):
        curvlab.extract(AllFunctional(), CE, x, y)


class CalledWithoutGradient(nn.Module):
    """``a`` also called under ``torch.no_grad()`` (a monitoring call): its inputs entered ``A``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            self.a(3 * x)
        return self.b(torch.tanh(self.a(x)))


def test_a_layer_called_with_gradients_off_is_refused() -> None:
    model = CalledWithoutGradient().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    for engine in ("autograd", "auto"):
        with pytest.raises(UnsupportedModelError, match=r"a \(Linear\) was called 1 time\(s\) with gradients off"):
            curvlab.extract(model, CE, x, y, engine=engine)


class SecondPassBeforeTheLoss(nn.Module):
    """Two views through the same layers before the loss (a consistency term); only the first
    view's output reaches ``loss_fn``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_call_whose_output_misses_the_loss_is_refused() -> None:
    """Its inputs entered KFAC's ``A`` (trace 30.5 against 6.5 with one pass), without a word."""
    model = SecondPassBeforeTheLoss().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    opt = KFAC(model, lr=0.1, stats_interval=1)
    with pytest.raises(UnsupportedModelError, match=r"a \(Linear\) was called 2 times but loss_fn's output is reached "
                                                    r"through 1 of them: .* call loss_fn before that pass"):
        with opt.track(CE):
            out, other = model(x), model(2 * x)
            (CE(out, y) + (out - other).square().mean()).backward()
    with opt.track(CE):  # the loss first: the second pass is outside the recording
        out = model(x)
        loss = CE(out, y)
        (loss + (out - model(2 * x)).square().mean()).backward()
    opt.step()
    assert opt.steps_done == 1 and set(opt.approximations()) == {"a", "b"}


@pytest.mark.parametrize("hook", ["forward", "forward pre"])
def test_a_users_forward_hook_on_a_layer_is_part_of_the_block(hook: str) -> None:
    """A hook rescaling a layer's output (the recording took the gradient at the hooked output:
    the block came out 1/4 of the exact one), or a pre-hook rescaling the next layer's input:
    BackPACK never sees them (it failed inside its extension)."""
    model = CalledWithoutGradient().double()  # a, b; its no_grad call aside: a plain MLP forward
    model.forward = lambda x: model.b(torch.tanh(model.a(x)))
    if hook == "forward":
        model.a.register_forward_hook(lambda module, args, out: 2 * out)
    else:
        model.b.register_forward_pre_hook(lambda module, args: (3 * args[0],))
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    params = dict(model.named_parameters())

    def logits(w, bias):
        return torch.func.functional_call(model, {**params, "a.weight": w, "a.bias": bias}, (x,))

    jac = torch.cat([j.reshape(12, -1) for j in torch.func.jacrev(logits, argnums=(0, 1))(params["a.weight"], params["a.bias"])], 1)
    hess = torch.func.hessian(lambda o: CE(o, y))(logits(params["a.weight"], params["a.bias"]).detach()).reshape(12, 12)
    want = jac.T @ hess @ jac
    for engine in ("autograd", "auto"):
        got = curvlab.extract(model, CE, x, y, engine=engine)
        assert got.engine == "autograd" and (engine == "autograd" or "forward hooks or forward pre-hooks of its own"
                                             in got.engine_reason)
        torch.testing.assert_close(got["a"].dense_fisher(), want, rtol=1e-10, atol=1e-14)


class Tempered(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) / 2.0


class Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self[0](x)
        return self[2](h + self[1](h))


class Twice(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[2](self[1](self[0](self[1](self[0](x)))))


class Scaled(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(2.0 * x)


@pytest.mark.parametrize("kind", [Tempered, Residual, Twice, Scaled], ids=lambda k: k.__name__)
def test_a_sequential_with_a_forward_of_its_own_is_not_a_plain_chain(kind: type) -> None:
    """nn.Sequential subclasses overriding forward (a temperature, a residual, a layer called
    twice) were taken for plain chains and run on BackPACK, which failed inside its extension:
    their forward is traced as any module's (the residual and the scaled input still run on
    BackPACK, converted)."""
    torch.manual_seed(0)
    model = kind(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    params = dict(model.named_parameters())
    got = curvlab.extract(model, CE, x, y)
    assert got.engine == ("backpack" if kind in (Residual, Scaled) else "autograd")
    for name in ("0", "2"):
        def logits(w, bias, name=name):
            return torch.func.functional_call(model, {**params, f"{name}.weight": w, f"{name}.bias": bias}, (x,))

        w, bias = params[f"{name}.weight"], params[f"{name}.bias"]
        jac = torch.cat([j.reshape(15, -1) for j in torch.func.jacrev(logits, argnums=(0, 1))(w, bias)], 1)
        hess = torch.func.hessian(lambda o: CE(o, y))(logits(w, bias).detach()).reshape(15, 15)
        torch.testing.assert_close(got[name].dense_fisher(), jac.T @ hess @ jac, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_refused_naming_it(reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint

    model = CalledWithoutGradient()
    model.forward = lambda x: model.b(checkpoint(lambda h: torch.tanh(model.a(h)), x, use_reentrant=reentrant))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises((RuntimeError, UnsupportedModelError), match=r"torch.utils.checkpoint"):
        curvlab.extract(model, CE, x, y, engine="autograd")


# --- the command line -------------------------------------------------------------------------

USER_MODELS = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    from torch import nn
    import zoo

    def tiny_resnet(input_shape, num_classes):
        return zoo.TinyResNet(num_classes=num_classes, width=2, in_channels=input_shape[0])

    def renorm(num_classes):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = nn.Embedding(256, 4, max_norm=1.0)
                self.head = nn.Linear(4, num_classes)
            def forward(self, x):
                return self.head(self.emb((x * 255).long().flatten(1)).mean(1))
        return Net()
    """
)


@pytest.fixture()
def user_models(tmp_path: Path) -> Path:
    path = tmp_path / "nets.py"
    path.write_text(USER_MODELS.format(tests=str(Path(__file__).parent)))
    return path


@pytest.mark.parametrize("command", ["report", "train"])
def test_unsupported_model_fails_before_any_data_is_loaded(command, user_models, tmp_path, capsys) -> None:
    missing = tmp_path / "no-such-data"
    args = [command, "--model", f"{user_models}:renorm", "--dataset", "mnist", "--data-dir", str(missing),
            "--out", str(tmp_path / "out"), "--no-progress"]
    if command == "train":
        args[1:3] = ["--model", f"{user_models}:tiny_resnet"]  # the optimizer accepts any model ...
        assert main(args) == 1 and "mnist" in capsys.readouterr().err  # ... so the data error comes
        args[1:3] = ["--model", f"{user_models}:missing_function"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert ("'emb' (Embedding) uses max_norm" in err and "error: curvlab:" not in err) if command == "report" else ("has no attribute 'missing_function'" in err)
    said = err[err.index("error:"):]  # (the usage before it lists the datasets)
    assert "mnist" not in said.lower().replace(str(missing).lower(), "")  # nothing about the data


def test_report_and_train_on_a_user_resnet_in_train_mode(user_models, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    code = main(["report", "--model", f"{user_models}:tiny_resnet", "--mode", "train", "--batch-size", "6",
                 "--train-steps", "2", "--num-eigenvalues", "16", "--approximations", "kflr,tekfac,diagonal",
                 "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    ds = read_netcdf(out / "report.nc")
    assert ds.attrs["engine"] == "autograd" and ds.attrs["coupled"] == 1 and ds.attrs["model_mode"] == "train"
    assert (out / "coupling.png").stat().st_size > 0
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "autograd (BackPACK cannot run this model: a BatchNorm" in summary and "coupling error" in summary
    # its whole-network entries leave the BatchNorm blocks out, and say so (tr F read as the network's)
    assert "Over the Kronecker layers' blocks only" in summary and "tr F (the Kronecker layers):" in summary
    kron = [l for l, k in zip(ds.layer.values, ds.block_kind.values) if k == "kronecker"]
    assert len(kron) < ds.sizes["layer"]
    assert float(ds.network_exact_trace) == pytest.approx(float(ds.exact_trace.sel(layer=kron).sum()), rel=1e-6)
    # and each whole-network variable says so itself, read on its own
    assert all("Kronecker layers' blocks only" in ds[v].attrs["long_name"] for v in ds.data_vars if v.startswith("network_"))
    code = main(["train", "--model", f"{user_models}:tiny_resnet", "--optimizer", "tekfac", "--epochs", "1",
                 "--batch-size", "32", "--train-size", "96", "--test-size", "32", "--probe-every", "2",
                 "--probe-batch-size", "8", "--stats-interval", "1", "--no-progress", "--no-figures",
                 "--out", str(tmp_path / "train")])
    assert code == 0, capsys.readouterr().err
    probe = read_netcdf(tmp_path / "train" / "probe.nc")
    assert "tekfac@optimizer" in probe.approximation.values and "bn1.weight" in probe.layer.values


def test_default_measured_batch_fits_the_square_roots_in_memory() -> None:
    from curvlab.app.models import build_model
    from curvlab.app.models.check import SQRT_BUDGET_BYTES, measured_batch_size

    resnet = build_model("resnet18", (3, 32, 32), 10)  # 11.2 M float32 parameters
    per_example = 10 * sum(p.numel() for p in resnet.parameters()) * 4
    assert measured_batch_size(resnet, 10, coupled=False) == SQRT_BUDGET_BYTES // per_example == 9
    assert measured_batch_size(resnet, 10, coupled=True) == 4  # exact and convention roots
    assert measured_batch_size(build_model("mlp", (1, 28, 28), 10), 10, coupled=False) == 128


def test_a_measured_batch_above_the_default_is_sized_for_the_user() -> None:
    """An explicit report batch or probe batch above the default gets a note of what its square
    roots may take at most (a bound: K·P numbers, twice where examples are coupled)."""
    from curvlab.app.models import build_model
    from curvlab.app.models.check import large_batch_note

    resnet = build_model("resnet18", (3, 32, 32), 10)
    per_example = 10 * sum(p.numel() for p in resnet.parameters()) * 4
    assert large_batch_note(resnet, 10, 4, coupled=True, option="--probe-batch-size") is None
    note = large_batch_note(resnet, 10, 8, coupled=True, option="--probe-batch-size")
    assert note.startswith("--probe-batch-size 8:") and f"{8 * 2 * per_example / 2**30:.1f} GiB" in note
    assert "default, 4," in note
    assert large_batch_note(resnet, 10, 9, coupled=False, option="--batch-size") is None
    assert f"{16 * per_example / 2**30:.1f} GiB" in large_batch_note(resnet, 10, 16, coupled=False, option="--batch-size")
    mlp = build_model("mlp", (1, 8, 8), 10)  # above the default of 128 examples, far within the budget
    assert large_batch_note(mlp, 10, 1000, coupled=False, option="--batch-size") is None


# --------------------------------------------------------------------------------------------
# benchmarks/ as tools: bad options and a machine without a GPU are clear errors
# --------------------------------------------------------------------------------------------

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


#: (script, arguments, the option its refusal names)
BAD_OPTIONS = [
    ("bench_compare.py", ["--small", "64"], "--small"),         # was: ValueError unpacking "64"
    ("bench_compare.py", ["--repeats", "0"], "--repeats"),      # was: StatisticsError, no median
    ("bench_truncation.py", ["--ranks", "x"], "--ranks"),       # was: ValueError in int()
    ("bench_distributed.py", ["--methods", "foo"], "--methods"),  # was: KeyError in every rank
    ("bench_distributed.py", ["--worlds", "0"], "--worlds"),    # was: FileNotFoundError of rank0.json
    ("bench_kfoc.py", ["--n", "0"], "--n"),                     # was: an empty batch deep in extract
    ("profile_steps.py", ["--steps", "stats=0"], "--steps"),
    ("profile_steps.py", ["--peers", "lbfgs"], "--peers"),
    ("bench_stats_blocks.py", ["--methods", "kfac"], "--methods"),
    ("bench_optim.py", ["--stats-interval", "30", "--refresh-interval", "20"], "--refresh-interval"),  # was: -1 statistics steps
    ("bench_optim.py", ["--peers", "nosuch"], "--peers"),  # was: a traceback
    ("bench_optim.py", ["--batch-size", "0"], "--batch-size"),  # was: ignored
    ("bench_step_glue.py", ["--models", "cnn"], "--models"),  # was: an AttributeError after 18 s
    ("bench_compare.py", ["--threads", "-1"], "--threads"),  # was: torch's RuntimeError
]

#: Runs each script as ``python script args`` would, one after another in one process (a
#: process each cost ~4 s of start-up); prints each one's exit code and stderr as JSON.
_RUN_SCRIPTS = """
import contextlib, io, json, os, runpy, sys
results = []
for script, args in json.loads(sys.argv[1]):
    sys.path.insert(0, os.path.dirname(script))  # as python puts a script's folder first
    sys.argv, err, code = [script, *args], io.StringIO(), None
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_benchmark_options_are_refused_before_anything_runs(tmp_path) -> None:
    import subprocess
    import sys

    outs = [tmp_path / f"{i}.json" for i in range(len(BAD_OPTIONS))]
    cases = [(str(BENCHMARKS / script), [*args, "--out", str(out)]) for (script, args, _), out in zip(BAD_OPTIONS, outs)]
    run = subprocess.run([sys.executable, "-c", _RUN_SCRIPTS, json.dumps(cases)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr  # (an exception other than SystemExit: a traceback here)
    for (script, args, option), (code, err), out in zip(BAD_OPTIONS, json.loads(run.stdout.splitlines()[-1]), outs):
        assert code == 2, (script, args, err)
        assert f"argument {option}" in err or f"{option}:" in err, (script, err)
        assert "Traceback" not in err and not out.exists(), script


def test_gpu_suite_without_a_cuda_python_says_so(tmp_path) -> None:
    """SKIP_INSTALL=1 without .venv-gpu, or with an interpreter that has no CUDA torch: a
    'gpu_suite:' line and exit 2 (it was a Python traceback and exit 2, or bash's 'No such file')."""
    import shutil
    import subprocess

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(BENCHMARKS / "gpu_suite.sh", tmp_path / "benchmarks" / "gpu_suite.sh")
    env = {"PATH": "/usr/bin:/bin", "SKIP_INSTALL": "1"}

    def suite() -> subprocess.CompletedProcess:
        return subprocess.run([bash, str(tmp_path / "benchmarks" / "gpu_suite.sh")], capture_output=True,
                              text=True, timeout=60, env=env, cwd=tmp_path)

    run = suite()
    assert run.returncode == 2 and "gpu_suite: .venv-gpu/bin/python not found" in run.stdout, run.stdout + run.stderr
    fake = tmp_path / ".venv-gpu" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    run = suite()
    assert run.returncode == 2 and "cannot import torch with CUDA" in run.stdout, run.stdout + run.stderr
    assert "ModuleNotFoundError" not in run.stderr
    assert not (tmp_path / "benchmarks" / "results").exists()  # nothing made before the checks pass
    # an unknown option (a typo, --help) is a usage line, not the whole suite on a GPU machine
    run = subprocess.run([bash, str(tmp_path / "benchmarks" / "gpu_suite.sh"), "--help"], capture_output=True,
                         text=True, timeout=60, env=env, cwd=tmp_path)
    assert run.returncode == 2 and run.stdout.startswith("usage: bash benchmarks/gpu_suite.sh"), run.stdout


def gpu_suite_commands() -> list[tuple[str, list[str]]]:
    """Every ``$py benchmarks/<script>.py <arguments>`` of gpu_suite.sh (continued lines joined),
    as (script, arguments)."""
    import shlex

    text = (BENCHMARKS / "gpu_suite.sh").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or "$py benchmarks/" not in line:
            continue
        words = shlex.split(line.split("$py benchmarks/", 1)[1])
        commands.append((words[0], words[1:]))
    return commands


def test_gpu_suite_runs_every_benchmark_with_options_it_takes(tmp_path) -> None:
    """The suite runs only where a GPU is lent, rarely: a benchmark option renamed since, or a
    model or peer name it no longer knows, would spend that run on a usage error.  Here each of
    its benchmark commands, as written, gets as far as the device check (everything it validates
    before needing CUDA passes), and its test selection collects tests."""
    import subprocess
    import sys

    commands = gpu_suite_commands()
    assert {script for script, _ in commands} >= {"bench_extract.py", "bench_compare.py", "bench_optim.py",
                                                  "profile_steps.py"}, commands
    commands = [(str(BENCHMARKS / script), [a.replace("$results", str(tmp_path)) for a in arguments])
                for script, arguments in commands]
    for script, arguments in commands:
        assert "--device" in arguments and arguments[arguments.index("--device") + 1] == "cuda", (script, arguments)
    run = subprocess.run([sys.executable, "-c", _RUN_SCRIPTS, json.dumps(commands)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    for (script, arguments), (code, err) in zip(commands, json.loads(run.stdout.splitlines()[-1]), strict=True):
        said = code if isinstance(code, str) else err  # (SystemExit's message: what python prints at exit)
        assert code not in (0, None) and said.strip().endswith("--device cuda but CUDA is not available"), (
            script, arguments, err[-2000:])
    assert not any(tmp_path.iterdir())  # nothing measured, nothing written
    selection = re.search(r"pytest (.*?) tests", (BENCHMARKS / "gpu_suite.sh").read_text()).group(1).split()
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-n", "0", *selection, "tests"],
                         capture_output=True, text=True, timeout=300, cwd=BENCHMARKS.parent)
    collected = [line for line in run.stdout.splitlines() if "::" in line]
    assert run.returncode == 0 and len(collected) >= 5 and all("cuda" in line.lower() for line in collected), run.stdout[-2000:]


def test_bench_compare_routes_agree_in_float64_and_write_only_where_told(tmp_path) -> None:
    """The dense route took F from the float32 root and float32-built approximations: the table's
    'max rel. difference' between the two routes read ~1e-6, float32 rounding, not a difference of
    the routes.  And the script alone wrote benchmarks/results/compare_cpu.json (under the current
    folder, also with --device cuda) without --out, where every other benchmark only prints."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_compare.py"), "--small", "12,8", "--large", "13,9",
                          "--n", "6", "--classes", "4", "--repeats", "1"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    row = next(line for line in run.stdout.splitlines() if line.startswith("| both |"))
    assert float(row.strip("| ").split("|")[-1]) < 1e-7, row
    assert not any(tmp_path.rglob("*.json")) and not any(tmp_path.rglob("*.md"))


def test_profile_steps_counts_each_kinds_host_reads(tmp_path) -> None:
    """profile_steps.py, the GPU suite's profile, on the CPU: every kind of step of each peer
    profiled, written as JSON and Markdown; its host reads are those the steps make — none in an
    SGD step, one in a plain curvlab step (the update's finiteness check), more in a statistics
    step (its input checks)."""
    import subprocess
    import sys

    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "profile_steps.py"), "--models", "mlp", "--batch-size", "16",
                          "--peers", "sgd,curvlab-kfac", "--steps", "plain=2,stats=1,refresh=1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (model,) = json.loads(out.read_text())["models"]
    sgd, kfac = model["peers"]["sgd"]["kinds"], model["peers"]["curvlab-kfac"]["kinds"]
    assert set(sgd) == {"plain"} and set(kfac) == {"plain", "stats", "refresh"}
    assert sgd["plain"]["host_reads"] == 0 and kfac["plain"]["host_reads"] == 1
    assert kfac["stats"]["host_reads"] > 1 and kfac["stats"]["aten_ops"] > kfac["plain"]["aten_ops"] > sgd["plain"]["aten_ops"]
    assert all(r["device_busy_ms"] is None and r["wall_ms"] > 0 and r["top"] for r in [*sgd.values(), *kfac.values()])
    assert "| curvlab-kfac | stats |" in out.with_suffix(".md").read_text()
    # a GPU's routes on the CPU: its six damped factor inverses by cholesky_ex, whose success is
    # read on the host (at least once a factor), not by MKL's in-place inverse, which reads none
    gpu = tmp_path / "profile_gpu.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "profile_steps.py"), "--models", "mlp", "--batch-size", "16",
                          "--peers", "curvlab-kfac", "--steps", "plain=1,stats=1,refresh=1", "--as-on-gpu",
                          "--out", str(gpu)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    (model,) = json.loads(gpu.read_text())["models"]
    on_gpu = model["peers"]["curvlab-kfac"]["kinds"]
    assert on_gpu["plain"]["host_reads"] == 1 and on_gpu["stats"]["host_reads"] == kfac["stats"]["host_reads"]
    if torch.backends.mkl.is_available():  # (without it the CPU's routes read them too)
        assert on_gpu["refresh"]["host_reads"] >= kfac["refresh"]["host_reads"] + 6
    assert "A GPU's routes, taken on the CPU" in gpu.with_suffix(".md").read_text()


def test_bench_stats_blocks_records_every_convolution(tmp_path) -> None:
    """bench_stats_blocks.py times the statistic of every convolution of a real statistics step
    (the CNN benchmark's two) next to its bare kernels, and writes them."""
    import subprocess
    import sys

    out = tmp_path / "blocks.json"
    run = subprocess.run([sys.executable, str(BENCHMARKS / "bench_stats_blocks.py"), "--model", "cnn", "--methods", "tekfac",
                          "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())["methods"]["tekfac"]
    assert [(r["d_out"], r["D"], r["T"]) for r in rows] == [(16, 3 * 9 + 1, 1024), (32, 16 * 9 + 1, 1024)]
    assert all(r["real_s"] > 0 and r["kernels_s"] > 0 and (r["k_out"], r["k_in"]) == (r["d_out"], r["D"]) for r in rows)


def test_bench_step_glue_minimal_and_lean_steps_apply_the_same_update() -> None:
    """bench_step_glue.py times curvlab KFAC's update by hand (``minimal``: its damped inverse
    matrices, no optimizer objects) and through curvlab's blocks and approximations (``lean``),
    the same update both: after one step from the same model and batch their parameters agree,
    and moved.  (Its ``lean`` row had called a method renamed since, unnoticed: this exercises
    both without ASDL, which the script's other rows need.)  In a process of its own: the
    benchmark's ``common`` is not the analyses'."""
    import subprocess
    import sys

    script = textwrap.dedent("""
        import copy
        import torch
        from torch import nn
        import bench_step_glue as glue
        import common
        import peers

        spec = common.MODELS["mlp"]
        base, pool, loss_fn = spec.build(), spec.batches(2), nn.CrossEntropyLoss()
        k = iter(range(10**6))
        stepper = peers.build("curvlab-kfac", copy.deepcopy(base), loss_fn, lambda: pool[next(k) % 2], lr=0.1,
                              damping=1e-2, stats_interval=10, refresh_interval=100)
        stepper.warm_up()
        steps = [glue.minimal_step(stepper, base, pool, loss_fn), glue.lean_step(stepper, base, pool, loss_fn)]
        for step in steps:
            step()
        minimal, lean = (dict(step.model.named_parameters()) for step in steps)
        for name, before in base.named_parameters():
            assert not torch.equal(minimal[name], before), name
            torch.testing.assert_close(lean[name], minimal[name], rtol=1e-5, atol=1e-7)
        print("checked")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "checked", run.stderr


def test_bench_optim_trace_kernels_compute_tkfacs_partial_traces() -> None:
    """The "traces" row, the kernels-timed floor of TKFAC's statistics step, takes the exact
    partial traces themselves: its convolution routes (Gram matrices over locations, and every
    M_k formed) give the extraction's δΦ, δΨ in float64 (contiguous [N, T, D] inputs and
    [N, d_out, T] roots at the start of the buffer, as its docstring says).  In a process of its
    own: the benchmark's ``common`` is not the analyses'."""
    import subprocess
    import sys

    script = textwrap.dedent("""
        import torch
        import bench_optim
        from curvlab.extract.maths import partial_trace_costs, tkfac_exact

        n, routes = 6, set()
        for d_out, d, t in [(4, 9, 3), (8, 300, 2), (3, 260, 40)]:
            buffer = torch.randn(n * t * (d + d_out), dtype=torch.float64, generator=torch.Generator().manual_seed(t))
            (phi, psi), = bench_optim.traces_fn([(d_out, d, t)], n, buffer, pushes=9)()
            x, g = buffer[:n * t * d].view(n, t, d), buffer[n * t * d:].view(n, d_out, t)
            ref = tkfac_exact(x.mT, g.unsqueeze(0))
            torch.testing.assert_close(phi, ref.delta_phi, rtol=1e-12, atol=1e-9)
            torch.testing.assert_close(psi, ref.delta_psi, rtol=1e-12, atol=1e-9)
            gram_cost, chunk_cost = partial_trace_costs(1, n, d_out, d, t)
            routes.add(gram_cost < chunk_cost)
        assert routes == {True, False}, routes  # both routes checked
        print("checked")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "checked", run.stderr


def test_bench_optim_counts_the_refresh_of_a_truncated_factor_as_the_optimizers_run_it() -> None:
    """The schedule's floor counts a refresh's randomized eigh of a factor above truncate_above
    (``bench_optim.refresh_flops``) as the GEMM flops the optimizers' own decomposition of such a
    factor runs (``factor_eigh`` under ``KroneckerOptions().eigh_policy()``, counted by torch's
    FlopCounterMode), and no fold where the statistics' rows come to half the width or more.  In
    a process of its own: the benchmark's ``common`` is not the analyses'."""
    import subprocess
    import sys

    script = textwrap.dedent("""
        import torch
        from torch.utils.flop_counter import FlopCounterMode
        import bench_optim
        from curvlab.approx.eigh import factor_eigh
        from curvlab.optim.options import KroneckerOptions

        policy = KroneckerOptions().eigh_policy()
        n = policy.truncate_above + 1
        x = torch.randn(n // 2, n, generator=torch.Generator().manual_seed(0))
        factor = x.mT @ x / x.shape[0]
        with FlopCounterMode(display=False) as counted:
            values, vectors = factor_eigh(factor, policy)
        assert vectors.shape == (n, policy.rank), vectors.shape  # truncated
        # one output, 4 rows a batch: never kept as rows (folded_at_refresh), never truncated
        flops = bench_optim.refresh_flops([(4, n, 1)], 128, pushes=9)
        assert counted.get_total_flops() == flops, (counted.get_total_flops(), flops)
        # rows kept until the refresh: the Gram of the 9 statistics steps' batches and its own
        folded = bench_optim.refresh_flops([(4, 300, 1)], 8, pushes=9)
        assert folded == 10 * 8 * 300 * 301, folded
        print("checked")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "checked", run.stderr


def test_bench_optim_stopped_mid_model_keeps_its_finished_repeats(tmp_path) -> None:
    """A run stopped during a model (the GPU suite's time limit stopped ResNet-18's first GPU
    run after its first repeat and kept nothing of it) leaves that model's repeats done so far
    in the results, marked cut short, and whole files (each replaced at once).  The stop is
    raised right after the first repeat, where a time limit may fall.  In a process of its own:
    the benchmark's ``common`` is not the analyses'."""
    import subprocess
    import sys

    out = tmp_path / "optim.json"
    script = textwrap.dedent(f"""
        import common, bench_optim

        measure = common.measure_interleaved
        def stopped_after_one(rows, repeats, device, progress, **kw):
            def then_stop(r):
                progress(r)
                raise KeyboardInterrupt
            return measure(rows, repeats, device, progress=then_stop, **kw)
        common.measure_interleaved = stopped_after_one
        try:
            bench_optim.main(["--models", "mlp", "--peers", "curvlab-kfac", "--batch-size", "8", "--repeats", "3",
                              "--min-time", "0.001", "--replay-seconds", "0", "--out", {str(out)!r}])
        except KeyboardInterrupt:
            print("stopped")
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "stopped", run.stderr
    (model,) = json.loads(out.read_text())["models"]
    assert model["model"] == "mlp" and model["repeats"] == 1 and model["cut"] == "1 of 3 repeats", model.get("cut")
    assert model["peers"]["curvlab-kfac"]["amortised/sgd"] > 0
    md = out.with_suffix(".md").read_text()
    assert "**Cut short**: medians of the 1 of 3 repeats" in md and "| mlp (cut short) |" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optim.json", "optim.md"]  # no .part left


class Positions(nn.Module):
    """A token and a position embedding whose positions are ``pos_shape``: ``T`` (nanoGPT's
    ``wpe(arange(T))``), ``1T`` (GPT-2's ``[None]``) or ``NT`` (called on the batch); with
    ``coupled``, a train-mode BatchNorm over the features and a Dropout."""

    def __init__(self, pos_shape: str, coupled: bool = False) -> None:
        super().__init__()
        self.pos_shape = pos_shape
        self.wte, self.wpe, self.head = nn.Embedding(7, 4), nn.Embedding(8, 4), nn.Linear(4, 7)
        self.norm = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.3)) if coupled else nn.Identity()

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])
        pos = {"T": pos, "1T": pos[None], "NT": pos.expand(ids.shape[0], -1)}[self.pos_shape]
        h = self.norm((self.wte(ids) + self.wpe(pos)).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(h)).transpose(1, 2)


def test_a_layer_called_on_one_input_broadcast_over_the_batch_says_how_to_call_it() -> None:
    """GPT-2's position embedding ``wpe(arange(T)[None])`` and nanoGPT's ``wpe(arange(T))`` (their
    output broadcast over the examples): the refusal spoke of sequence-first tensors and reshapes,
    neither of which applied."""
    ids = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^curvlab \(autograd engine\): 'wpe' saw an input with leading dimension 1 while the loss has 3 "
                                         r"examples: .*broadcast.*wpe\(pos.expand\(N, -1\)\)"):
        curvlab.extract(Positions("1T"), CE, ids, ids)
    with pytest.raises(ValueError, match=r"^curvlab \(autograd engine\): 'wpe' saw an input with leading dimension 5, not the batch size 3: "
                                         r".*broadcast over the batch .*wpe\(torch.arange\(T\)\).*wpe\(pos.expand\(N, -1\)\)"):
        curvlab.compare(Positions("T"), CE, ids, ids)
    assert curvlab.extract(Positions("NT"), CE, ids, ids)["wpe"].kind == "kronecker"  # as advised


@pytest.mark.parametrize("coupled", [False, True], ids=["uncoupled", "batchnorm"])
def test_a_broadcast_layer_is_refused_also_on_a_batch_of_exactly_its_length(coupled: bool) -> None:
    """With ``N = T`` the broadcast position embedding's leading dimension is the batch size and the
    probing vjp saw coupled examples: its Kronecker statistics took the positions for examples
    (``G`` off by 3× its size), silently.  Refused as for any other ``N``, in every entry point
    that measures it; called on the batch it is measured, and the check's extra forward pass
    leaves the model's running statistics and the global RNG as one training forward pass does."""
    ids = torch.randint(0, 7, (5, 5), generator=torch.Generator().manual_seed(0))
    message = r"^curvlab \(autograd engine\): 'wpe' saw an input with leading dimension 5, the batch size, but still 5 .*6 examples.*wpe\(pos.expand\(N, -1\)\)"
    with pytest.raises(ValueError, match=message):
        curvlab.extract(Positions("T", coupled), CE, ids, ids, stats=("kfac",))
    with pytest.raises(ValueError, match=message):
        curvlab.compare(Positions("T", coupled), CE, ids, ids, approximations=("kfac",))
    with pytest.raises(ValueError, match=message):
        extract_autograd(Positions("T", coupled), CE, ids, ids)

    torch.manual_seed(0)
    model, plain = Positions("NT", coupled), Positions("NT", coupled)
    plain.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    result = extract_autograd(model, CE, ids, ids)  # as one training forward pass, it says
    after = torch.get_rng_state()
    torch.manual_seed(1)
    torch.testing.assert_close(result.output, plain(ids).detach(), rtol=1e-6, atol=1e-6)  # the same Dropout mask
    assert torch.equal(after, torch.get_rng_state())
    for name, buffer in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], buffer), name
    assert result.coupled == coupled
    stats = curvlab.extract(model, CE, ids, ids, stats=("kfac",))
    assert stats["wpe"].kind == "kronecker" and stats["wpe"].engine == "autograd"
