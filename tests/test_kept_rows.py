"""Statistics handed over as their rows (``GramRows``): a wide layer from a small batch, or a
layer whose rows BLAS ``syrk`` adds into the running average.

The extraction hands over a factor with fewer samples than its width as its rows; the optimizers
keep those rows until a refresh (or until they fill half the matrix) and fold them in then.  A
factor from at least as many rows as its width, where ``syrk`` takes them, is added into the
average's upper triangle at once, the lower one restored when a refresh reads it.  What they
invert must be the running average of the dense statistics, and a checkpoint taken while rows
are kept, or while a lower triangle is stale, must resume bit-identically.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlab.approx import KFAC as KFACApprox
from curvlab.approx import TKFAC as TKFACApprox
from curvlab.extract import extract
from curvlab.gram import GramRows, syrk_accumulates
from curvlab.optim import EKFAC, KFAC, TEKFAC, TKFAC
from helpers import batches, tiny_mlp, train

D_IN = 63  # layer "0": 64 wide with the bias column (curvlab.gram.KEEP_ROWS_MIN_WIDTH), from 8 rows a batch
ALL = [KFAC, EKFAC, TKFAC, TEKFAC]
IDS = [c.__name__ for c in ALL]


def wide_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return batches(n, size=8, shape=(D_IN,), seed=3)


def wide_conv(seed: int = 0) -> nn.Sequential:
    """Layer "0": a convolution 289 wide with its bias (32 channels, 3×3) over 2×2 locations: ``A``
    from 24 rows a batch of 6, kept in the ``[D, N·T]`` memory of the autograd engine's patches."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(32, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(16, 3)).double()


def many_rows_conv(seed: int = 0) -> nn.Sequential:
    """Layer "0" 289 wide as in :func:`wide_conv`, over 8×8 locations: ``A`` from 384 rows."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(32, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(256, 3)).double()


# a wide layer kept as rows — a Linear layer's (row-major) or a convolution's (stored along R):
# the model (by seed) and its batches; "…-many": as many rows as columns at least, which syrk adds
# in (layer "0" of the MLP 301 wide with its bias, its rows 304 apart, from 320 rows); "mlp-half":
# the same layer from 40 rows a batch, kept and folded 160 rows at a time (≥ half its width: syrk
# adds them in from a copy scaled by their weights)
WIDE = {
    "mlp": (lambda seed=0: tiny_mlp(seed, d_in=D_IN), wide_batches),
    "conv": (wide_conv, lambda n: batches(n, size=6, shape=(32, 2, 2), seed=3)),
    "mlp-many": (lambda seed=0: tiny_mlp(seed, d_in=300), lambda n: batches(n, size=320, shape=(300,), seed=3)),
    "mlp-half": (lambda seed=0: tiny_mlp(seed, d_in=300), lambda n: batches(n, size=40, shape=(300,), seed=3)),
    "conv-many": (many_rows_conv, lambda n: batches(n, size=6, shape=(32, 8, 8), seed=3)),
}


def test_extraction_hands_over_narrow_batches_as_rows() -> None:
    """With ``gram_rows=True`` the wide statistics of a small batch are rows whose matrix is the
    default extraction's; the others are matrices, as without it."""
    model, loss_fn = tiny_mlp(0, d_in=D_IN), nn.CrossEntropyLoss()
    x, y = wide_batches(1)[0]
    dense = extract(model, loss_fn, x, y, fisher="exact", stats=("kfac", "tkfac"))
    rows = extract(model, loss_fn, x, y, fisher="exact", stats=("kfac", "tkfac"), gram_rows=True)
    wide = rows["0"]
    assert isinstance(wide.kfac["exact"].A, GramRows) and isinstance(wide.tkfac.delta_phi, GramRows)
    pairs = ((wide.kfac["exact"].A, dense["0"].kfac["exact"].A), (wide.tkfac.delta_phi, dense["0"].tkfac.delta_phi))
    for got, want in pairs:
        assert got.shape == want.shape
        torch.testing.assert_close(got.dense(), want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.trace(), want.trace(), rtol=1e-12, atol=1e-14)
    # as many rows as columns at least: rows where syrk adds them in (an MLP's layer 301 wide)
    many = extract(tiny_mlp(0, d_in=300), loss_fn, *WIDE["mlp-many"][1](1)[0], fisher="exact", stats=("kfac",),
                   gram_rows=True)["0"].kfac["exact"].A
    if torch.backends.mkl.is_available():
        assert isinstance(many, GramRows) and many.rows.shape == (320, 301) and syrk_accumulates(many.rows)
    else:  # no syrk: the matrix
        assert isinstance(many, torch.Tensor)
    # 24 rows (3 classes × 8) for the 4-wide G and δΨ, 8 for layer "2"'s 5-wide A: matrices
    pairs = ((wide.kfac["exact"].G, dense["0"].kfac["exact"].G), (rows["2"].kfac["exact"].A, dense["2"].kfac["exact"].A))
    for got, want in pairs:
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # fewer rows than columns, but narrower than KEEP_ROWS_MIN_WIDTH: the matrix (2 rows, 5 wide)
    few = extract(tiny_mlp(0), loss_fn, *batches(1, size=2, shape=(5,), seed=3)[0], fisher="exact", stats=("kfac",),
                  gram_rows=True)["2"].kfac["exact"].A
    assert isinstance(few, torch.Tensor) and few.shape == (5, 5)


@pytest.mark.usefixtures("routes")
@pytest.mark.parametrize("wide", WIDE)
@pytest.mark.parametrize("cls", ALL, ids=IDS)
def test_what_is_inverted_is_the_running_average_of_the_dense_statistics(cls, wide: str) -> None:
    """lr = 0 (the batches' statistics fixed), statistics every step, a refresh every 6: the
    rows of layer "0" are kept between refreshes and folded when they fill half its width (the
    MLP's at the fourth batch: 32 rows ≥ 64/2) and at each refresh.  After the refresh at step 12
    every block inverts the Kronecker object of the running averages of the dense statistics,
    computed here from ``extract`` in float64."""
    build, make_batches = WIDE[wide]
    data, decay = make_batches(13), 0.8
    model, loss_fn = build(), nn.CrossEntropyLoss()
    opt = cls(model, lr=0.0, stat_decay=decay, stats_interval=1, eigen_interval=6, scale_interval=1,
              fisher="exact", factor_dtype="float64")  # float64 rows as they lie: syrk takes them
    train(opt, model, data)
    averages: dict[str, dict[str, torch.Tensor]] = {}
    for x, y in data:
        for name, s in extract(model, loss_fn, x, y, fisher="exact", stats=("kfac", "tkfac")).items():
            kf, tk = s.kfac["exact"], s.tkfac
            new = dict(A=kf.A, G=kf.G, delta=tk.delta, phi=tk.delta_phi, psi=tk.delta_psi)
            old = averages.get(name)
            averages[name] = new if old is None else {k: decay * old[k] + (1 - decay) * new[k] for k in new}
    for name, approx in opt.approximations().items():
        avg = averages[name]
        if cls in (KFAC, EKFAC):
            want = KFACApprox(avg["A"], avg["G"], layout=approx.layout).to_dense()
        else:
            want = TKFACApprox(avg["delta"], avg["phi"], avg["psi"], layout=approx.layout).to_dense()
        torch.testing.assert_close(approx.to_dense(), want, rtol=1e-9, atol=1e-12, msg=f"{cls.__name__} {name}")


# the convolution's kept rows are A's (TKFAC's δΦ of a convolution is a Gram over locations)
RESUMED = [(cls, wide) for cls in ALL for wide in ("mlp", "mlp-many")] + [
    (cls, wide) for cls in (KFAC, EKFAC) for wide in ("conv", "conv-many")]


@pytest.mark.parametrize("cls, wide", RESUMED, ids=[f"{c.__name__}-{w}" for c, w in RESUMED])
def test_a_checkpoint_with_kept_rows_resumes_bit_identically(cls, wide: str, tmp_path) -> None:
    """Saved after a refresh and two statistics steps (rows kept, or added into an upper
    triangle), through a weights-only file: the resumed optimizer's next steps, refresh included,
    are bit-identical."""
    options = dict(lr=0.05, stats_interval=1, eigen_interval=5, scale_interval=1, fisher="exact",
                   factor_dtype="float64" if wide.endswith("-many") else "float32")  # float64 rows: syrk
    build, make_batches = WIDE[wide]
    data = make_batches(9)
    model = build()
    opt = cls(model, **options)
    train(opt, model, data[:3])
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    kept = [k for k in saved["opt"]["curvlab"]["blocks"]["0"]["curvature"] if "pending." in k]
    assert bool(kept) != wide.endswith("-many")  # layer "0"'s rows of the batches since the refresh
    # the wide running averages (not the built objects) are saved whole
    averages = {k: v for k, v in saved["opt"]["curvlab"]["blocks"]["0"]["curvature"].items()
                if k.split(".")[-1] in ("A", "delta_phi") and "approximation." not in k}
    assert averages and all(torch.equal(v, v.T) for v in averages.values())
    model2 = build(4)
    model2.load_state_dict(saved["model"])
    opt2 = cls(model2, **options)
    opt2.load_state_dict(saved["opt"])
    train(opt, model, data[3:])
    train(opt2, model2, data[3:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    for name, approx in opt.approximations().items():
        assert torch.equal(approx.to_dense(), opt2.approximations()[name].to_dense())
