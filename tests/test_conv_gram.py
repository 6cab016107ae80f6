"""A convolution's input Gram from its input (:mod:`curvlab.extract.conv_gram`) against the Gram
of its patches, the patches read off torch.func's Jacobian of the convolution's output with
respect to its weight (independent of any unfolding), in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from curvlab.extract import conv_gram, extract

torch.set_num_threads(1)


def patches(conv: nn.Module, x: Tensor) -> Tensor:
    """Every patch as a row ``[N·T, C·Πk]``: ``∂z[n, 0, t] / ∂W[0]`` of a one-output copy."""
    probe = type(conv)(conv.in_channels, 1, conv.kernel_size, padding=conv.padding, bias=False).double()
    weight = torch.zeros_like(probe.weight)
    jac = jacrev(lambda w: functional_call(probe, {"weight": w}, (x,)))(weight)  # [N, 1, *out, 1, C, *k]
    n = x.shape[0]
    return jac.reshape(n, -1, weight[0].numel()).reshape(-1, weight[0].numel())


CASES = {
    "1d-k5-p2": (lambda: nn.Conv1d(3, 2, 5, padding=2), (4, 3, 11)),
    "1d-k4-same": (lambda: nn.Conv1d(3, 2, 4, padding="same", bias=False), (4, 3, 9)),
    "2d-3x3-p1": (lambda: nn.Conv2d(3, 2, 3, padding=1), (3, 3, 6, 5)),
    # many positions along the first dimension: the input framed along it too (few: sliced)
    "2d-3x3-p1-tall": (lambda: nn.Conv2d(3, 2, 3, padding=1), (2, 3, 40, 6)),
    "2d-3x5-p(1,2)": (lambda: nn.Conv2d(2, 2, (3, 5), padding=(1, 2), bias=False), (3, 2, 7, 6)),
    "2d-valid": (lambda: nn.Conv2d(2, 2, 3), (3, 2, 7, 6)),
    "2d-padding-beyond-taps": (lambda: nn.Conv2d(2, 2, 3, padding=3), (2, 2, 5, 6)),
    "2d-k4-same": (lambda: nn.Conv2d(2, 2, 4, padding="same"), (3, 2, 7, 6)),
    "2d-k2-p1": (lambda: nn.Conv2d(2, 2, 2, padding=1), (3, 2, 5, 5)),
    # a 1×1 image: the first tap row reads only padding (its patch sums are zero)
    "2d-1x1-image": (lambda: nn.Conv2d(2, 2, 3, padding=1), (3, 2, 1, 1)),
    "3d-3-p1": (lambda: nn.Conv3d(2, 2, 3, padding=1), (2, 2, 4, 5, 3)),
}


def case_and_reference(case: str) -> tuple[nn.Module, Tensor, Tensor]:
    """The convolution and input of ``case`` (float64) and the Gram of its patches (with a
    column of ones where it has a bias)."""
    make, shape = CASES[case]
    torch.manual_seed(0)
    conv = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    rows = patches(conv, x)
    if conv.bias is not None:
        rows = torch.cat([rows, torch.ones_like(rows[:, :1])], 1)
    return conv, x, rows.T @ rows


@pytest.mark.usefixtures("routes")
@pytest.mark.parametrize("rows", ["all rows", "a row at a time"])
@pytest.mark.parametrize("case", CASES)
def test_input_gram_equals_the_gram_of_the_patches(case: str, rows: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tap pair's sum over the positions it reads, the border lines a tap leaves out
    included, and the bias row (patch sums, the count) — symmetric; assembled at once or (the
    CPU's route for many channels) a row of blocks at a time."""
    if rows == "a row at a time":
        monkeypatch.setattr(conv_gram, "ASSEMBLED_BYTES", 1)
    conv, x, want = case_and_reference(case)
    got = conv_gram.input_gram(x, conv.kernel_size, conv_gram.padding(conv), ones=conv.bias is not None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, got.T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["2d-3x3-p1", "2d-3x3-p1-tall", "2d-valid", "3d-3-p1"])
def test_cuda_input_gram_equals_the_gram_of_the_patches(case: str) -> None:
    """On a GPU (all rows of blocks at once, the indices on the device) as on the CPU."""
    conv, x, want = case_and_reference(case)
    got = conv_gram.input_gram(x.cuda(), conv.kernel_size, conv_gram.padding(conv), ones=conv.bias is not None)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-12)


def test_taken_where_cheaper_and_only_for_what_it_computes() -> None:
    """Stride 1, dilation 1, zero padding, several taps, and measurably cheaper than the patches'
    Gram: ResNet-18's 3×3 layers at 32×32–4×4 (and 2×2), not the other kinds."""
    conv = lambda c, **kw: nn.Conv2d(c, c, 3, padding=1, **kw)
    assert conv_gram.applies(conv(64), (128, 64, 32, 32))
    assert conv_gram.applies(conv(512), (128, 512, 4, 4))
    assert conv_gram.applies(conv(512), (128, 512, 2, 2))
    assert not conv_gram.applies(conv(3), (64, 3, 32, 32))  # too small to be worth it
    for other in (conv(64, stride=2), conv(64, dilation=2), conv(64, padding_mode="reflect"), conv(64, groups=2),
                  nn.Conv2d(64, 64, 1)):
        assert not conv_gram.applies(other, (128, 64, 32, 32))
    # 13 shifts of the input framed by two zeros after every line, or (where that reads 10 % fewer
    # columns) along the first dimension only the positions with a partner: 4×4, shifts by 0, 1, 2
    # rows (3, 5, 5 shifts along the other dimension) read 4, 3, 2 rows of 4 + 2 columns
    by_shifts, by_patches = conv_gram.flops(conv(64), (128, 64, 32, 32))
    assert by_shifts == 13 * 2 * 64 * 64 * 128 * 34 * 34 and by_patches == 576 * 577 * 128 * 32 * 32
    by_shifts, _ = conv_gram.flops(conv(512), (128, 512, 4, 4))
    assert by_shifts == 2 * 512 * 512 * 128 * (3 * 4 + 5 * 3 + 5 * 2) * 6


def test_the_extraction_takes_it_for_kfac() -> None:
    """KFAC's ``A`` from the autograd engine on a convolution the shifts apply to equals the
    patches' Gram over ``N·T``, with the bias in the block and apart."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 32 * 32, 3)).double()
    x, y = torch.randn(8, 16, 32, 32, dtype=torch.float64), torch.randint(0, 3, (8,))
    assert conv_gram.applies(conv, x.shape)
    rows = patches(conv, x)
    full = torch.cat([rows, torch.ones_like(rows[:, :1])], 1)
    together = extract(model, nn.CrossEntropyLoss(), x, y, engine="autograd", stats=("kfac",))
    apart = extract(model, nn.CrossEntropyLoss(), x, y, engine="autograd", stats=("kfac",), separate_bias=True)
    torch.testing.assert_close(together["0"].kfac["exact"].A, full.T @ full / len(rows), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(apart["0.weight"].kfac["exact"].A, rows.T @ rows / len(rows), rtol=1e-12, atol=1e-12)


#: ops that launch nothing on a device (views, metadata)
VIEWS = {"aten::view", "aten::select", "aten::slice", "aten::narrow", "aten::transpose", "aten::t",
         "aten::numpy_T", "aten::permute", "aten::as_strided", "aten::expand", "aten::reshape",
         "aten::alias", "aten::mT", "aten::unsqueeze", "aten::_reshape_alias", "aten::empty",
         "aten::empty_strided", "aten::resize_", "aten::unbind"}


@pytest.mark.parametrize("taps", [3, 5])
def test_its_ops_grow_with_the_shifts_not_the_tap_pairs(taps: int) -> None:
    """On a device each op is a kernel launch, and a tensor built from host values a copy that
    waits: a repeated call issues about one op per shift (⌈(2k − 1)²/2⌉ of them) plus a few,
    not one or more per tap pair ((k²)² of them), and builds nothing from host values."""
    from torch.profiler import ProfilerActivity, profile

    conv = nn.Conv2d(8, 8, taps, padding=1)
    x = torch.randn(4, 8, 12, 12)
    args = (x, conv.kernel_size, conv_gram.padding(conv), True)
    conv_gram.input_gram(*args)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        conv_gram.input_gram(*args)
    top = [e.name for e in prof.events()
           if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    launching = [name for name in top if name not in VIEWS]
    shifts = -(-(2 * taps - 1) ** 2 // 2)
    assert len(launching) <= shifts + 40 < taps**4, sorted(launching)
    assert "aten::lift_fresh" not in top and "aten::_to_copy" not in top
