"""curvlab train's figures: training.png and probe.png, redrawn after every epoch from the run's
own files (what a long run shows while it trains), left out with ``--no-figures``; a figure
that cannot be drawn is a warning, never the end of a run."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import xarray as xr

from curvlab.app.cli import main
from curvlab.app.train import TrainConfig, train
from curvlab.app.train.figures import plot_probe, plot_training


def _config(out: Path, **kw) -> TrainConfig:
    base = dict(model="mlp", dataset="digits", optimizer="tekfac", epochs=1, batch_size=50, train_size=200,
                test_size=50, probe_every=2, probe_batch_size=16, out=str(out), progress=False,
                model_kwargs={"hidden": (8,)}, stats_interval=1, eigen_interval=2, scale_interval=1,
                lr_schedule="constant")
    return TrainConfig(**{**base, **kw})


def _image(path: Path) -> np.ndarray:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 1000  # a drawn figure, README width
    return image


def test_the_figures_are_redrawn_after_every_epoch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_config(out))
    first = {name: (out / name).read_bytes() for name in ("training.png", "probe.png")}
    for name in first:
        _image(out / name)
    train(_config(out, epochs=2), resume=True)  # the second epoch: both redrawn with its points
    for name, before in first.items():
        assert (out / name).read_bytes() != before, name
    drawn = (out / "probe.png").read_bytes()
    train(_config(out, epochs=3, figures=False), resume=True)
    assert (out / "probe.png").read_bytes() == drawn  # left as they were
    assert xr.open_dataset(out / "metrics.nc").sizes["epoch"] == 3


def test_no_figures_and_no_probe_figure_without_probes(tmp_path: Path) -> None:
    assert main(["train", "--hidden", "8", "--train-size", "100", "--test-size", "20", "--epochs", "1",
                 "--no-progress", "--no-figures", "--out", str(tmp_path / "none")]) == 0
    assert not list((tmp_path / "none").glob("*.png"))
    train(_config(tmp_path / "unprobed", probe_every=0, optimizer="sgd"))
    assert sorted(p.name for p in (tmp_path / "unprobed").glob("*.png")) == ["training.png"]


def test_a_figure_that_fails_warns_and_the_run_goes_on(tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise ValueError("no axes")

    monkeypatch.setattr("curvlab.app.train.figures.plot_probe", broken)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match=r"probe\.png not drawn \(ValueError: no axes\); probe\.nc is complete"):
        paths = train(_config(out, epochs=2))
    assert xr.open_dataset(paths["metrics"]).sizes["epoch"] == 2 and paths["checkpoint"].is_file()
    assert (out / "training.png").is_file() and not (out / "probe.png").exists()


def test_the_probe_figure_takes_any_probe(tmp_path: Path) -> None:
    """Step 0 only (the optimizer's own entry all NaN), an SGD run's probe (no optimizer's entry),
    parameter blocks only (no whole-network entries, no per-layer map), a single epoch's training
    curve: each draws."""
    out = tmp_path / "run"
    train(_config(out, probe_every=100))  # step 0 only
    ds = xr.open_dataset(out / "probe.nc").load()
    assert ds.sizes["step"] == 1 and np.isnan(ds.rel_frobenius_error.sel(approximation="tekfac@optimizer")).all()
    _image(plot_probe(ds, tmp_path / "step0.png", "step 0"))
    train(_config(tmp_path / "sgd", optimizer="sgd"))
    _image(plot_probe(xr.open_dataset(tmp_path / "sgd" / "probe.nc").load(), tmp_path / "sgd.png", "sgd"))
    params = ds.isel(layer=[0]).assign_coords(block_kind=("layer", ["parameter"]))
    params = params.drop_vars([v for v in params.data_vars if str(v).startswith("network_")])
    _image(plot_probe(params, tmp_path / "params.png", "parameter blocks"))
    _image(plot_training(xr.open_dataset(out / "metrics.nc").load(), tmp_path / "one.png", "one epoch"))
