"""The Kronecker statistics' conventions against dense definitions: train-mode BatchNorm's coupling
(and what ignoring it costs), per-token losses (trace preservation), tied weights (calls as shared
positions), and KFAC-reduce.

Per-example layer inputs ``x`` and output gradients ``g = J_zᵀ S_c`` of the batch computation come
from ``jacrev`` w.r.t. a perturbation of each call's output (``test_extract_autograd``'s
references); exact blocks from ``jacrev`` and ``hessian`` of the whole batch
(``test_real_architectures``' reference).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import curvlab
from curvlab.approx import approximate
import zoo
from test_extract_autograd import reference_calls, to_layout, unfold_reference
from test_real_architectures import block_params, dense_reference, rel

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

RTOL = 1e-10
CE = nn.CrossEntropyLoss()


def convention(model: nn.Module, x: Tensor, y: Tensor, name: str, flavour: str = "exact") -> tuple[Tensor, Tensor]:
    """Block ``name``'s per-example inputs ``[N, D(+1), T]`` (bias row appended) and roots
    ``[C, N, d_out, T]``, every call's positions concatenated along ``T``."""
    module = dict(model.named_modules())[name]
    inputs, gs = reference_calls(model, CE, x, y, module, flavour)
    xs = [unfold_reference(module, i) for i in inputs]
    if getattr(module, "bias", None) is not None:
        xs = [torch.cat([v, torch.ones_like(v[:, :1])], 1) for v in xs]
    return torch.cat(xs, 2), torch.cat([to_layout(module, g) for g in gs], 3)


def block_of(x: Tensor, g: Tensor, layout) -> Tensor:
    """``Σ_{c,n} vec(M) vec(M)ᵀ`` with ``M_{c,n} = Σ_t g xᵀ``, flat order."""
    m = layout.to_vector(torch.einsum("cnot,ndt->cnod", g, x).flatten(0, 1))
    return m.T @ m


def partial_traces(dense: Tensor, layout) -> tuple[Tensor, Tensor]:
    perm = layout.permutation()
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    f = dense[inv][:, inv].reshape(*layout.shape, *layout.shape)
    return torch.einsum("odoe->de", f), torch.einsum("odpd->op", f)


def test_batchnorm_coupling_and_what_ignoring_it_costs() -> None:
    """Train-mode BatchNorm: sqrt is the exact coupled block; the Kronecker statistics describe the
    per-example convention block F_conv; compare's coupling_error is ‖F − F_conv‖/‖F‖."""
    model, x, y = zoo.make("resnet_bn", n=4)
    stats = curvlab.extract(model, CE, x, y)
    ds = curvlab.compare(model, CE, x, y, approximations=("kflr", "tkfac"))
    assert ds.attrs["coupled"] == 1
    for name, s in stats.items():
        if s.kind != "kronecker":
            assert ds["coupling_error"].sel(layer=name).isnull()
            continue
        exact, _ = dense_reference(model, CE, x, y, block_params(model, s))
        xr, gr = convention(model, x, y, name)
        conv = block_of(xr, gr, s.layout)
        assert rel(s.convention_sqrt.columns(s.layout).T @ s.convention_sqrt.columns(s.layout), conv) < RTOL
        n, _, t = xr.shape
        assert rel(s.kfac["exact"].A, torch.einsum("ndt,net->de", xr, xr) / (n * t)) < RTOL
        assert rel(s.kfac["exact"].G, torch.einsum("cnot,cnpt->op", gr, gr)) < RTOL
        phi, psi = partial_traces(conv, s.layout)
        assert rel(s.tkfac.delta_phi, phi) < RTOL and rel(s.tkfac.delta_psi, psi) < RTOL
        # the eigenvalue-corrected ones rescale to the block the optimizers invert (F_conv), not F
        for method in ("ekfac", "tekfac"):
            assert approximate(s, method).trace().item() == pytest.approx(conv.trace().item(), rel=1e-10), method
        want = ((exact - conv).norm() / exact.norm()).item()
        # resolved to ~eps of ‖F‖ (P ≤ K + K_c: F − F_c formed), so the exact fc layer gives ~0
        assert ds["coupling_error"].sel(layer=name).item() == pytest.approx(want, rel=1e-10, abs=1e-13)
        assert ds["coupling_trace_ratio"].sel(layer=name).item() == pytest.approx((conv.trace() / exact.trace()).item(), rel=1e-8)
        if name == "fc":  # no BatchNorm downstream: the convention is exact there
            assert want < 1e-8
        else:
            assert want > 1e-3, name


def test_per_token_loss_keeps_the_trace() -> None:
    """Per-token CE on [N, C, T]: TKFAC's δ and EKFAC's/TEKFAC's Σ s* equal tr F (the statistics
    use one root per loss term), unlike the block of the all-terms per-example roots."""
    model, ids, y = zoo.make("tagger", n=3)
    stats = curvlab.extract(model, CE, ids, y)
    assert all(s.terms_per_example == ids.shape[1] for s in stats.values())
    differs = 0
    for name, s in stats.items():
        exact, _ = dense_reference(model, CE, ids, y, block_params(model, s))
        assert rel(s.dense_fisher(), exact) < RTOL, name
        if s.kind != "kronecker":
            continue
        trace = exact.trace()
        assert s.tkfac.delta.item() == pytest.approx(trace.item(), rel=1e-10)
        for method in ("ekfac", "tekfac"):
            assert approximate(s, method).trace().item() == pytest.approx(trace.item(), rel=1e-10), (name, method)
        if name != "embedding":
            xr, gr = convention(model, ids, y, name)
            differs += abs(block_of(xr, gr, s.layout).trace() / trace - 1) > 0.05
    assert differs  # the all-terms convention would not have kept it


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_tied_weights_calls_are_shared_positions(kfac_approx) -> None:
    model, x, y = zoo.make("tied", n=4)
    stats = curvlab.extract(model, CE, x, y, kfac_approx=kfac_approx, tkfac_conv="kfc")
    s = stats["shared"]
    assert s.num_locations == 2  # two calls
    assert rel(s.dense_fisher(), dense_reference(model, CE, x, y, ["shared.weight", "shared.bias"])[0]) < RTOL
    xr, gr = convention(model, x, y, "shared")
    if kfac_approx == "reduce":
        xr, gr = xr.mean(2, keepdim=True), gr.sum(3, keepdim=True)
    n, _, t = xr.shape
    assert rel(s.kfac["exact"].A, torch.einsum("ndt,net->de", xr, xr) / (n * t)) < RTOL
    assert rel(s.kfac["exact"].G, torch.einsum("cnot,cnpt->op", gr, gr)) < RTOL
    if kfac_approx == "reduce":  # TKFAC's KFC form: the partial traces of the pooled samples
        phi, psi = partial_traces(block_of(xr, gr, s.layout), s.layout)
        assert rel(s.tkfac.delta_phi, phi) < RTOL and rel(s.tkfac.delta_psi, psi) < RTOL


def test_tied_weights_under_coupling_are_the_dense_block() -> None:
    """A module called twice in a train-mode BatchNorm network: its exact root sums the calls'
    coupled contributions (kept per call at the outputs where the batch's locations are fewer
    than the width, as here: 4 examples × 2 calls against 13 columns)."""
    torch.manual_seed(0)

    class TiedBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.shared = nn.Linear(3, 12), nn.Linear(12, 12)
            self.bn, self.out = nn.BatchNorm1d(12), nn.Linear(12, 5)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.bn(self.shared(torch.tanh(self.inp(x)))))
            return self.out(torch.tanh(self.shared(h)))

    model = TiedBN().double().train()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 5, (4,))
    stats = curvlab.extract(model, CE, x, y)
    assert stats["shared"].coupled and stats["shared"].num_locations == 2
    for name, s in stats.items():
        assert rel(s.dense_fisher(), dense_reference(model, CE, x, y, block_params(model, s))[0]) < RTOL, name


def test_a_float32_models_eigen_corrected_scaling_is_formed_in_float64() -> None:
    """Under train-mode BatchNorm EKFAC's and TEKFAC's s* come from the per-example root, which
    compare left in the model's float32 (the exact root it converts): on a layer after the
    BatchNorm their scaling error read 7e-8, four times the per-example block's own distance from
    F (the coupling error), where it is below it (QA20)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4)).train()
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    ds = curvlab.compare(model, nn.CrossEntropyLoss(), x, y, approximations=("ekfac", "tekfac"))
    after = ds.sel(layer="3")
    assert float(after.coupling_error) < 1e-7
    assert (after.scaling_error <= after.coupling_error).all(), (after.scaling_error.values, float(after.coupling_error))
