"""Tests for curvlab.models: shapes, BackPACK compatibility (SqrtGGNExact), user-model loading."""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from backpack import backpack, extend
from backpack.custom_module.branching import Parallel, SumModule, _Branch
from backpack.extensions import SqrtGGNExact
from torch import Tensor, nn

from curvlab.app.models import MODELS, build_model, load_user_model, make_model

# Leaf modules BackPACK's SqrtGGNExact has rules for (kept here, independent of curvlab.models).
BACKPACK_LEAVES = (
    nn.Linear, nn.Conv2d, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d,
    nn.Flatten, nn.Dropout, nn.ZeroPad2d, nn.Identity, SumModule,
)  # fmt: skip
CONTAINERS = (nn.Sequential, Parallel, _Branch)

CASES = [
    ("mlp", (1, 28, 28)),
    ("mlp", (64,)),
    ("mlp", (3, 32, 32)),
    ("cnn", (1, 8, 8)),
    ("cnn", (1, 28, 28)),
    ("cnn", (3, 32, 32)),
    ("cnn-bench", (1, 8, 8)),
    ("cnn-bench", (1, 28, 28)),
    ("cnn-bench", (3, 32, 32)),
    ("3c3d", (3, 32, 32)),
    ("3c3d", (1, 28, 28)),
    ("vgg", (3, 32, 32)),
    ("vgg", (1, 28, 28)),
    ("vgg", (1, 8, 8)),
    ("resnet", (3, 32, 32)),
    ("resnet", (1, 28, 28)),
    ("resnet", (1, 8, 8)),
]


#: Built-in architectures written as torchvision/timm write them (not BackPACK-sequential).
ARCHITECTURES = {
    "resnet18": ((3, 32, 32), {"width": 4}, 11_173_962),
    "vgg16-bn": ((3, 32, 32), {"width": 8, "hidden": 64}, 14_990_922),
    "vit-tiny": ((3, 32, 32), {"dim": 12, "depth": 2, "heads": 3}, 5_362_762),
    "mobilenetv2": ((3, 32, 32), {"width": 0.25}, 2_236_682),  # torchvision's mobilenet_v2(num_classes=10)
}


def test_every_model_is_covered() -> None:
    assert MODELS == ("mlp", "cnn", "cnn-bench", "3c3d", "vgg", "resnet", "resnet18", "vgg16-bn", "vit-tiny", "mobilenetv2")
    assert {name for name, _ in CASES} | set(ARCHITECTURES) == set(MODELS)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_architectures_build_at_published_size_and_shrink(name: str) -> None:
    shape, small, published = ARCHITECTURES[name]
    assert sum(p.numel() for p in build_model(name, shape, 10).parameters()) == published
    torch.manual_seed(0)
    model = build_model(name, shape, 7, **small)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    kinds = {type(m) for m in model.modules()}
    if name == "vit-tiny":
        assert nn.LayerNorm in kinds and nn.GELU in kinds and {"cls_token", "pos_embed"} <= set(dict(model.named_parameters(recurse=False)))
    else:
        assert nn.BatchNorm2d in kinds and (nn.AdaptiveAvgPool2d in kinds) == (name != "mobilenetv2")
        assert any(getattr(m, "inplace", False) for m in model.modules())  # written as torchvision writes it
    if name == "mobilenetv2":  # depthwise 3×3 convolutions between 1×1 convolutions
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert sum(m.groups == m.in_channels == m.out_channels > 1 for m in convs) == 17
        assert sum(m.kernel_size == (1, 1) for m in convs) == 34


@pytest.mark.parametrize("name,shape", CASES)
def test_builds_and_output_shape(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, 7)
    assert isinstance(model, nn.Sequential)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    for mod in model.modules():
        assert not getattr(mod, "inplace", False), mod
        children = list(mod.children())
        if children:
            assert isinstance(mod, CONTAINERS), mod
        else:
            assert isinstance(mod, BACKPACK_LEAVES), f"{name}: unsupported leaf {type(mod).__name__}"


def ggn_matvec_autograd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, vec: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """G v = Jᵀ H J v for mean cross-entropy, with torch.func (independent of BackPACK)."""
    params = {k: p.detach() for k, p in model.named_parameters()}

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(model, p, (x,))

    out, jv = torch.func.jvp(f, (params,), (vec,))
    prob = out.softmax(-1)
    hjv = (prob * jv - prob * (prob * jv).sum(-1, keepdim=True)) / len(x)
    _, vjp = torch.func.vjp(f, params)
    return vjp(hjv)[0]


# torch's forward-AD (used by the autograd reference) still registers decompositions via torch.jit.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name,shape", CASES)
def test_backpack_sqrt_ggn_exact(name: str, shape: tuple[int, ...]) -> None:
    """BackPACK backpropagates the exact GGN square root through every layer (incl. branches),
    and Sᵀ S v equals the autograd GGN-vector product."""
    torch.manual_seed(0)
    num_classes, n = 5, 2
    plain = build_model(name, shape, num_classes)
    model = extend(copy.deepcopy(plain))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(n, *shape), torch.tensor([1, 3])
    loss = loss_fn(model(x), y)
    with backpack(SqrtGGNExact()):
        loss.backward()
    vec = {k: torch.randn_like(p) for k, p in plain.named_parameters()}
    sv = torch.zeros(num_classes, n)
    for k, p in model.named_parameters():
        assert hasattr(p, "sqrt_ggn_exact"), f"{name}: {k} got no sqrt_ggn_exact"
        assert p.sqrt_ggn_exact.shape == (num_classes, n, *p.shape)
        sv += (p.sqrt_ggn_exact * vec[k]).flatten(2).sum(-1)
    want = ggn_matvec_autograd(plain, x, y, vec)
    for k, p in model.named_parameters():
        got = torch.einsum("cn,cn...->...", sv, p.sqrt_ggn_exact)
        torch.testing.assert_close(got, want[k], rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")


def test_mlp_default_is_benchmark_mlp() -> None:
    model = build_model("mlp", (1, 28, 28), 10)
    dims = [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)]
    assert dims == [(784, 128), (128, 64), (64, 10)]
    assert isinstance(model[0], nn.Flatten)
    small = build_model("mlp", (64,), 10, hidden=(32,))
    assert [(m.in_features, m.out_features) for m in small if isinstance(m, nn.Linear)] == [(64, 32), (32, 10)]


def test_cnn_bench_exact_structure() -> None:
    model = build_model("cnn-bench", (3, 32, 32), 10)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear]
    assert (model[0].in_channels, model[0].out_channels, model[0].kernel_size, model[0].padding) == (3, 16, (3, 3), (1, 1))
    assert (model[2].in_channels, model[2].out_channels, model[2].padding) == (16, 32, (1, 1))
    assert model[4].kernel_size == 2 and model[6].in_features == 32 * 16 * 16
    assert build_model("cnn-bench", (1, 28, 28), 10)[6].in_features == 32 * 14 * 14


def test_3c3d_matches_deepobs() -> None:
    model = build_model("3c3d", (3, 32, 32), 10)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1152, 512), (512, 256), (256, 10)]
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.padding[0]) for c in convs] == [(64, 5, 0), (96, 3, 0), (128, 3, 1)]
    flat = next(i for i, m in enumerate(model) if isinstance(m, nn.Flatten))
    assert model[:flat](torch.zeros(1, 3, 32, 32)).shape == (1, 128, 3, 3)  # 1152 = 128·3·3
    # TF 'SAME' 3x3/2 pooling pads one row/column at the bottom/right only.
    assert [m.padding for m in model if isinstance(m, nn.ZeroPad2d)] == [(0, 1, 0, 1)] * 3
    assert sum(p.numel() for p in model.parameters()) == 895_210  # DeepOBS's count
    assert all(float(m.bias.detach().abs().max()) == 0 for m in convs + linears)


def test_resnet_uses_backpack_branching() -> None:
    model = build_model("resnet", (3, 32, 32), 10)
    blocks = [m for m in model.modules() if isinstance(m, Parallel)]
    shortcuts = [type(list(b.branch.children())[1]) for b in blocks]
    assert shortcuts == [nn.Identity, nn.Conv2d, nn.Conv2d]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    deeper = build_model("resnet", (3, 32, 32), 10, widths=(8, 16), blocks_per_stage=2)
    assert len([m for m in deeper.modules() if isinstance(m, Parallel)]) == 4


def test_build_model_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'lenet'; choose one of mlp, cnn, cnn-bench, 3c3d, vgg, resnet, resnet18, vgg16-bn, vit-tiny, mobilenetv2"):
        build_model("lenet", (1, 28, 28), 10)
    with pytest.raises(ValueError, match=r"model 'cnn' needs image inputs of shape \(C, H, W\), got \(784,\)"):
        build_model("cnn", (784,), 10)
    with pytest.raises(ValueError, match=r"model 'mlp' has no option\(s\) \['widths'\]; its options are \['hidden'\]"):
        build_model("mlp", (64,), 10, widths=(3,))
    with pytest.raises(ValueError, match="at least 8x8"):
        build_model("vgg", (3, 4, 4), 10)
    assert isinstance(build_model("VGG", (3, 32, 32), 10, widths=(8, 8), hidden=16), nn.Sequential)


# --------------------------------------------------------------------------------- user models

USER_FILE = textwrap.dedent(
    """
    from torch import nn

    def full(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(__import__("math").prod(input_shape)), num_classes))

    def classes_only(num_classes, hidden=4):
        return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def no_args():
        return nn.Linear(3, 2)

    def kw(**kwargs):
        return nn.Linear(kwargs["input_shape"][0], kwargs["num_classes"])

    class Factory:
        @staticmethod
        def build(num_classes):
            return nn.Linear(1, num_classes)

    def not_a_model():
        return 42

    instance = nn.Linear(5, 5)
    value = 3
    """
)


@pytest.fixture()
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(USER_FILE)
    return path


def test_load_user_model_from_file(user_file: Path) -> None:
    m = load_user_model(f"{user_file}:full", (1, 4, 4), 6)
    assert m(torch.randn(2, 1, 4, 4)).shape == (2, 6)
    assert load_user_model(f"{user_file}:classes_only", (3,), 9)[-1].out_features == 9
    assert isinstance(load_user_model(f"{user_file}:no_args", (3,), 2), nn.Linear)
    assert load_user_model(f"{user_file}:kw", (7,), 4).weight.shape == (4, 7)
    assert load_user_model(f"{user_file}:Factory.build", (1,), 8).out_features == 8
    assert load_user_model(f"{user_file}:instance", (5,), 5).in_features == 5
    assert make_model(f"{user_file}:full", (2,), 3)(torch.randn(1, 2)).shape == (1, 3)
    assert isinstance(make_model("mlp", (2,), 3, hidden=(4,)), nn.Sequential)


def test_load_user_model_from_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "curvlab_test_userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_FILE)
    monkeypatch.chdir(tmp_path)  # found via the current directory, like `python -m`
    monkeypatch.delitem(sys.modules, "curvlab_test_userpkg", raising=False)
    m = load_user_model("curvlab_test_userpkg.nets:full", (3,), 2)
    assert m(torch.randn(4, 3)).shape == (4, 2)
    assert str(tmp_path) not in sys.path


def test_load_user_model_errors(user_file: Path) -> None:
    cases = {
        "my_models_py_without_colon": "expected 'package.module:function'",
        f"{user_file}:": "expected 'package.module:function'",
        f"{user_file.parent / 'missing.py'}:full": "file .*missing.py not found",
        f"{user_file}:nope": "has no attribute 'nope'",
        f"{user_file}:value": "'value' is a int, not a callable",
        f"{user_file}:not_a_model": r"not_a_model\(\) returned int, not a torch.nn.Module",
        "curvlab_no_such_module_xyz:net": "cannot import module 'curvlab_no_such_module_xyz'",
    }
    # errors in the user's own code: the error and where it was raised, not a traceback
    broken = user_file.parent / "broken.py"
    broken.write_text("from torch import nn\n\ndef net(num_classes):\n    raise RuntimeError('no such layer')\n")
    (user_file.parent / "needs.py").write_text("def net(depth, num_classes):\n    pass\n")
    (user_file.parent / "syntax.py").write_text("def net(:\n    pass\n")
    (user_file.parent / "imports.py").write_text("import curvlab_no_such_module_xyz\n")
    cases.update({
        f"{broken}:net": rf"net\(\) raised RuntimeError: no such layer \(at {broken}:4\)",
        # a function that needs more than curvlab passes: its signature, not a line of curvlab's
        f"{user_file.parent / 'needs.py'}:net": r"net cannot be called as net\(num_classes=2\): .*'depth'; curvlab passes",
        f"{user_file.parent / 'syntax.py'}:net": r"importing .*syntax.py raised SyntaxError: .*line 1",
        f"{user_file.parent / 'imports.py'}:net": r"importing .*imports.py raised ModuleNotFoundError: .*curvlab_no_such",
    })
    for spec, pattern in cases.items():
        with pytest.raises(ValueError, match=pattern) as err:
            load_user_model(spec, (3,), 2)
        assert f"model spec {spec!r}" in str(err.value)
    with pytest.raises(ValueError, match="apply only to built-in models"):
        make_model(f"{user_file}:full", (3,), 2, hidden=(3,))


# --- MobileNetV2 as torchvision builds it, with the CIFAR strides

#: torchvision's inverted_residual_setting (t, c, n, s) — ImageNet's; the CIFAR variant's second
#: stage keeps stride 1, as its stem does.
TORCHVISION_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def test_mobilenetv2_has_the_cifar_strides_and_torchvisions_residuals() -> None:
    """32×32 inputs end at 4×4 (a stride-1 stem and second stage, strides 2 on stages 3, 4, 6, on
    their first block only); ``x + conv(x)`` exactly in the 10 stride-1 blocks whose channels stay."""
    torch.manual_seed(0)
    model = build_model("mobilenetv2", (3, 32, 32), 10).eval()
    blocks = [m for m in model.modules() if hasattr(m, "use_res_connect")]
    seen: list[tuple[Tensor, Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out))) for m in blocks]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.features(x).shape == (2, 1280, 4, 4)
        for h in hooks:
            h.remove()
        sizes = [inp.shape[-1] for inp, _ in seen] + [seen[-1][1].shape[-1]]
        assert sizes == [32] * 4 + [16] * 3 + [8] * 7 + [4] * 4  # a block's input side, then the last output's
        residual = 0
        for m, (inp, out) in zip(blocks, seen):
            branch = m.conv(inp)
            if branch.shape == inp.shape:
                residual += 1
                torch.testing.assert_close(out, inp + branch)
            else:
                torch.testing.assert_close(out, branch)
    assert residual == 10


@pytest.mark.parametrize("width", [0.5, 0.75])
def test_mobilenetv2_width_rounds_channels_as_torchvision_does(width: float) -> None:
    """``width`` is torchvision's ``width_mult``: channels rounded to multiples of 8, never more than
    10% down (0.75 · 24 = 18 → 24, not 16), the last 1×1 convolution 1280 wide for widths below 1."""
    model = build_model("mobilenetv2", (3, 32, 32), 10, width=width).eval()
    outs: list[int] = []
    hooks = [m.register_forward_hook(lambda m, inp, out: outs.append(out.shape[1]))
             for m in model.modules() if hasattr(m, "use_res_connect")]
    with torch.no_grad():
        last = model.features(torch.randn(1, 3, 32, 32)).shape[1]
    for h in hooks:
        h.remove()
    assert outs == [make_divisible(c * width) for _, c, n, _ in TORCHVISION_SETTING for _ in range(n)]
    assert last == 1280


@pytest.mark.parametrize("name", ["vgg16-bn", "mobilenetv2", "resnet18"])
def test_real_architectures_start_from_torchvisions_initialisation(name: str) -> None:
    """Their docstrings say torchvision's; VGG-16-BN and MobileNetV2 kept torch's defaults (QA27):
    convolutions He-normal by their outputs, BatchNorm the identity, VGG's and MobileNetV2's Linear
    N(0, 0.01²), biases zero."""
    torch.manual_seed(0)
    model = build_model(name, (3, 32, 32), 10)
    for path, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 2000:  # enough draws to test the spread
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]  # (torch's, a depthwise conv's too)
            assert float(m.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.1), path
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any(), path
        if isinstance(m, nn.Linear) and name != "resnet18":
            assert float(m.weight.detach().std()) == pytest.approx(0.01, rel=0.1) and not m.bias.any(), path
