"""Tiny models and dense autograd (torch.func) references shared by the tests.

Nothing here uses BackPACK or curvlab's extraction maths: these are the independent oracles.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from curvlab.block import BlockLayout


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_mlp(seed: int = 0, d_in: int = 5, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 4), nn.Tanh(), nn.Linear(4, classes)).double()


def tiny_cnn(seed: int = 0, classes: int = 3) -> nn.Sequential:
    """Input [N, 2, 6, 6]; stride, padding and dilation all exercised."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),  # → 3×3×3
        nn.Sigmoid(),
        nn.Conv2d(3, 2, 2, stride=1, padding=1, dilation=2),  # → 2×3×3
        nn.Flatten(),
        nn.Linear(18, classes),
    ).double()


def tiny_conv1d(seed: int = 0, classes: int = 3) -> nn.Sequential:
    """Input [N, 10, 7]; the exact roots (CE, 3 classes) of the first convolution kept unfolded
    (:class:`curvlab.sqrt.UnfoldedSqrt`) for one example and as matrices for more, of the
    second unfolded for any batch."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(10, 2, 3, bias=False),  # → 2×5
        nn.Sigmoid(),
        nn.Conv1d(2, 8, 3, stride=2),  # → 8×2
        nn.Flatten(),
        nn.Linear(16, classes),
    ).double()


def batches(n: int = 6, size: int = 32, shape: tuple[int, ...] = (2, 6, 6), seed: int = 5) -> list[tuple[Tensor, Tensor]]:
    """``n`` float64 batches of ``size`` inputs of ``shape`` with labels of 3 classes."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (size,), generator=gen))
            for _ in range(n)]


def train(opt, model: nn.Module, data) -> None:
    """One curvlab optimizer step per batch, the forward and backward inside ``opt.track``."""
    loss_fn = nn.CrossEntropyLoss()
    for x, y in data:
        opt.zero_grad()
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
        opt.step()


def reload_through_file(opt, model: nn.Module, make_model, make_opt, path) -> tuple[nn.Module, object]:
    """A fresh ``make_model()`` and ``make_opt(model)`` loaded from a weights-only checkpoint of
    ``(opt, model)`` written to ``path``: what a resumed run starts from."""
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    model2 = make_model()
    model2.load_state_dict(saved["model"])
    opt2 = make_opt(model2)
    opt2.load_state_dict(saved["opt"])
    return model2, opt2


def batch(model: nn.Module, loss_fn: nn.Module, n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Random inputs of the right shape and targets for ``loss_fn``."""
    gen = torch.Generator().manual_seed(seed)
    first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)))
    if isinstance(first, nn.Linear):
        shape = (n, first.in_features)
    elif isinstance(first, nn.ConvTranspose2d):
        shape = (n, first.in_channels, 3, 3)
    else:
        shape = (n, first.in_channels, 7) if isinstance(first, nn.Conv1d) else (n, first.in_channels, 6, 6)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    classes = model[-1].out_features
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        y = torch.randint(0, classes, (n,), generator=gen)
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):  # probabilities, some of them labels 0 and 1
        y = torch.rand(n, classes, generator=gen, dtype=torch.float64)
        y[: n // 2] = y[: n // 2].round()
    else:
        y = torch.randn(n, classes, generator=gen, dtype=torch.float64)
    return x, y


def layer_params(model: nn.Module, layer: str) -> dict[str, Tensor]:
    return {k: v for k, v in model.named_parameters() if k.rsplit(".", 1)[0] == layer}


def _flat_fn(model: nn.Module, layer: str, x: Tensor):
    params = layer_params(model, layer)
    names = list(params)
    sizes = [params[k].numel() for k in names]
    shapes = [params[k].shape for k in names]

    def out(flat: Tensor) -> Tensor:
        parts = torch.split(flat, sizes)
        new = {k: p.reshape(s) for k, p, s in zip(names, parts, shapes)}
        return functional_call(model, new, (x,))

    flat0 = torch.cat([params[k].detach().flatten() for k in names])
    return out, flat0


def reduction_factor(loss_fn: nn.Module, out: Tensor) -> float:
    if loss_fn.reduction == "sum":
        return 1.0
    return 1.0 / (out.shape[0] if isinstance(loss_fn, nn.CrossEntropyLoss) else out.numel())


def dense_ggn(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, layer: str) -> Tensor:
    """Exact GGN block ``Σ J_nᵀ ∇²L J_n`` of ``layer``, flat order ``[weight, bias]``."""
    out_fn, flat = _flat_fn(model, layer, x)
    out = out_fn(flat).detach()
    jac = jacrev(out_fn)(flat).reshape(out.numel(), -1)  # [N·C, P] (any output shape)
    hess = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    return jac.T @ hess @ jac


def dense_empirical(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, layer: str) -> Tensor:
    """Empirical Fisher block ``R Σ_n ∇ℓ_n ∇ℓ_nᵀ`` (L = R Σ ℓ_n)."""
    out_fn, flat = _flat_fn(model, layer, x)
    per = type(loss_fn)(reduction="none")

    def losses(p: Tensor) -> Tensor:
        val = per(out_fn(p), y)
        return val.reshape(val.shape[0], -1).sum(1)

    grads = jacrev(losses)(flat)  # [N, P]
    r = reduction_factor(loss_fn, out_fn(flat))
    return r * grads.T @ grads


def dense_grad(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, layer: str) -> Tensor:
    out_fn, flat = _flat_fn(model, layer, x)
    return torch.func.grad(lambda p: loss_fn(out_fn(p), y))(flat)


def to_matrix_order(dense: Tensor, layout: BlockLayout) -> Tensor:
    """Re-index a P×P block from flat parameter order to matrix-form order, as [d_out, D, d_out, D]."""
    perm = layout.permutation()
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    d_out, d_in = layout.shape
    return dense[inv][:, inv].reshape(d_out, d_in, d_out, d_in)


def partial_traces(dense: Tensor, layout: BlockLayout) -> tuple[Tensor, Tensor]:
    """``(Tr_out F, Tr_in F)``: TKFAC's δΦ and δΨ by definition."""
    f = to_matrix_order(dense, layout)
    return torch.einsum("odoe->de", f), torch.einsum("odpd->op", f)


def tiny_decoder(seed: int = 0, classes: int = 3) -> nn.Sequential:
    """Input [N, 2, 3, 3]; transposed convolutions (a U-Net's upsampling, a DCGAN generator) with
    stride, padding, output_padding and dilation."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),  # → 3×6×6
        nn.Sigmoid(),
        nn.ConvTranspose2d(3, 2, 2, dilation=2, bias=False),  # → 2×8×8
        nn.Flatten(),
        nn.Linear(128, classes),
    ).double()


def patches_by_jacobian(layer: nn.Module, x: Tensor) -> Tensor:
    """A (transposed) convolution's patches ``[N, D, T]`` by their definition: the derivative of
    output channel 0 at location ``t`` with respect to row 0 of the weight's matrix form
    (``weight.flatten(1)``; transposed: ``weight.transpose(0, 1).flatten(1)``)."""
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    w = layer.weight.detach()

    def out0(row: Tensor) -> Tensor:
        full = w.transpose(0, 1).flatten(1).clone() if transposed else w.flatten(1).clone()
        full[0] = row
        if transposed:
            weight = full.reshape(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1)
        else:
            weight = full.reshape(w.shape)
        return functional_call(layer, {"weight": weight}, (x,))[:, 0].flatten(1)  # [N, T]

    row = (w.transpose(0, 1) if transposed else w).flatten(1)[0]
    return jacrev(out0)(row).transpose(1, 2)  # [N, T, D] → [N, D, T]


def im2col(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Unfolded conv input ``[N, C_in·kh·kw, T]`` by explicit loops (independent of F.unfold)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    xp = nn.functional.pad(x, (pw, pw, ph, ph))
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = []
    for i in range(h_out):
        for j in range(w_out):
            patch = xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            cols.append(patch.reshape(x.shape[0], -1))
    return torch.stack(cols, -1)


def layer_input_and_output_jacobian(
    model: nn.Sequential, index: int, x: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Input of ``model[index]``, the Jacobian of the network output w.r.t. that layer's output
    (per example, ``[N, C, d_out, T]``), and the network output."""
    head, tail = model[:index], model[index + 1 :]
    inp = head(x).detach()
    z = model[index](inp).detach()
    jac = jacrev(tail)(z)  # [N, C, N, *z.shape[1:]]
    n = z.shape[0]
    jac = jac[torch.arange(n), :, torch.arange(n)]  # [N, C, *z.shape[1:]]
    return inp, jac.reshape(n, jac.shape[1], z.shape[1], -1), tail(z).detach()


def dense_kfac(model: nn.Sequential, loss_fn: nn.Module, x: Tensor, y: Tensor, index: int) -> tuple[Tensor, Tensor]:
    """KFAC factors by definition (KFC expand, bias as ones column): ``A = 1/(NT) Σ ā āᵀ``,
    ``G = Σ_{n,t} J_{z,nt}ᵀ ∇²L J_{z,nt}``."""
    layer = model[index]
    inp, jac, out = layer_input_and_output_jacobian(model, index, x)
    if isinstance(layer, nn.Conv2d):
        xs = im2col(inp, layer)
    elif isinstance(layer, nn.ConvTranspose2d):
        xs = patches_by_jacobian(layer, inp)
    else:
        xs = inp.unsqueeze(-1)
    n, _, t = xs.shape
    if layer.bias is not None:
        xs = torch.cat([xs, torch.ones(n, 1, t, dtype=xs.dtype)], 1)
    a = torch.einsum("ndt,net->de", xs, xs) / (n * t)
    hess = hessian(lambda o: loss_fn(o, y))(out)  # [N, C, N, C]
    hess_n = hess[torch.arange(n), :, torch.arange(n)]  # [N, C, C]
    g = torch.einsum("ncot,ncd,ndpt->op", jac, hess_n, jac)
    return a, g


def dense_ggn_full(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, layers: list[str]) -> Tensor:
    """Exact GGN over all parameters of ``layers`` together (cross-layer blocks included)."""
    params = {k: v for k, v in model.named_parameters() if k.rsplit(".", 1)[0] in layers}
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def out_fn(flat: Tensor) -> Tensor:
        new = {k: p.reshape(params[k].shape) for k, p in zip(names, torch.split(flat, sizes))}
        return functional_call(model, new, (x,))

    flat = torch.cat([params[k].detach().flatten() for k in names])
    jac = jacrev(out_fn)(flat)
    hess = hessian(lambda o: loss_fn(o, y))(out_fn(flat).detach())
    return torch.einsum("ncp,ncmd,mdq->pq", jac, hess, jac)


def without_report_figures(monkeypatch) -> None:  # noqa: ANN001
    """Reports written with empty figure files (their manifest hashes what is there): for tests of
    what report.nc and summary.md hold, a third of whose time drawing took."""
    from pathlib import Path

    import curvlab.app.report.figures as figures

    for name in ("plot_spectra", "plot_errors", "plot_network"):
        monkeypatch.setattr(figures, name, lambda ds, path: Path(path).write_bytes(b""))
