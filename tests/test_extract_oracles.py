"""Agreement with curvlinops (independent implementation) on KFAC factors and the GGN block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.approx import KFAC
from curvlab.extract import extract
from helpers import batch, tiny_cnn, tiny_mlp

curvlinops = pytest.importorskip("curvlinops", reason="curvlinops is a dev dependency (pip install -e .[dev])")


@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_cnn])
@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum"), nn.BCEWithLogitsLoss()])
def test_kfac_factors_match_curvlinops(make_model, loss_fn) -> None:
    model = make_model()
    x, y = batch(model, loss_fn, n=4)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        y = y.round()  # (curvlinops takes labels 0 and 1 only)
    params = [p for p in model.parameters()]
    op = curvlinops.KFACLinearOperator(
        model, loss_fn, params, [(x, y)], fisher_type="type-2", kfac_approx="expand",
        separate_weight_and_bias=False, check_deterministic=False,
    )
    dense = op @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    ours = extract(model, loss_fn, x, y, stats=("kfac",))
    start = 0
    for block in ours.values():
        p = block.num_params
        kfac = KFAC(block.kfac["exact"].A, block.kfac["exact"].G, layout=block.layout)
        torch.testing.assert_close(kfac.to_dense(), dense[start : start + p, start : start + p], rtol=1e-10, atol=1e-12)
        start += p
    assert start == dense.shape[0]


@pytest.mark.parametrize("make_model", [tiny_mlp, tiny_cnn])
def test_exact_block_matches_curvlinops_ggn(make_model) -> None:
    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    x, y = batch(model, loss_fn, n=4)
    params = [p for p in model.parameters()]
    ggn = curvlinops.GGNLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False)
    dense = ggn @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    ours = extract(model, loss_fn, x, y, stats=("sqrt",))
    start = 0
    for name, block in ours.items():
        p = block.num_params
        torch.testing.assert_close(block.dense_fisher(), dense[start : start + p, start : start + p], rtol=1e-10, atol=1e-12)
        start += p
    assert start == dense.shape[0]
