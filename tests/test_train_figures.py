"""curvlab train's figures: training.png and probe.png, redrawn after every epoch from the run's
own files (what a long run shows while it trains), left out with ``--no-figures``; a figure
that cannot be drawn is a warning, never the end of a run."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.figure
import matplotlib.image
import numpy as np
import pytest
import xarray as xr
from matplotlib.collections import QuadMesh

from curvlab.app.cli import main
from curvlab.app.train import TrainConfig, train
from curvlab.app.train.figures import plot_probe, plot_training, redraw


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


# ----------------------------------------------------------------- from mutation testing


def _sgd_config(out: Path, **kw) -> TrainConfig:
    """4 steps an epoch (120 examples in batches of 30), SGD, no figures."""
    base = dict(model="mlp", dataset="digits", optimizer="sgd", epochs=3, batch_size=30, train_size=120,
                test_size=40, out=str(out), progress=False, figures=False, model_kwargs={"hidden": (8,)}, lr=0.2)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> list[matplotlib.figure.Figure]:
    """Every matplotlib Figure saved while the test runs (what the PNG shows, as data)."""
    saved: list[matplotlib.figure.Figure] = []
    original = matplotlib.figure.Figure.savefig

    def record(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    return saved


def test_the_per_layer_map_shows_the_optimizers_own_approximation(tmp_path: Path, saved_figures) -> None:
    out = tmp_path / "run"
    train(_sgd_config(out, optimizer="tekfac", epochs=1, batch_size=50, train_size=200, test_size=50, probe_every=2,
                  probe_batch_size=16, stats_interval=1, eigen_interval=2, scale_interval=1))
    ds = xr.open_dataset(out / "probe.nc").load()
    own = [str(a) for a in ds["approximation"].values if str(a).endswith("@optimizer")]
    assert own == ["tekfac@optimizer"]
    plot_probe(ds, tmp_path / "probe.png", "setting")
    size = ds.sizes["layer"] * ds.sizes["step"]  # the map's cells (the colour bar is a QuadMesh too)
    meshes = [c for ax in saved_figures[-1].axes for c in ax.collections
              if isinstance(c, QuadMesh) and c.get_array().size == size]
    assert len(meshes) == 1
    shown = np.ma.filled(meshes[0].get_array(), np.nan).reshape(ds.sizes["layer"], ds.sizes["step"])
    expected = ds["rel_frobenius_error"].sel(approximation=own[0]).transpose("layer", "step").values
    np.testing.assert_allclose(shown, expected, rtol=1e-6)
    others = [a for a in ds["approximation"].values if str(a) != own[0]]
    for other in others:  # a map of another approximation would differ
        values = ds["rel_frobenius_error"].sel(approximation=other).transpose("layer", "step").values
        assert not np.allclose(np.nan_to_num(values), np.nan_to_num(shown))
    # 11 probes: the step labels evenly spaced (one was dropped, its column looking unprobed; QA22)
    eleven = ds.isel(step=np.arange(11) % ds.sizes["step"]).assign_coords(step=np.arange(11) * 25)
    plot_probe(eleven, tmp_path / "probe11.png", "setting")
    (heatmap,) = [ax for ax in saved_figures[-1].axes if any(isinstance(c, QuadMesh) for c in ax.collections)
                  and ax.get_xlabel().startswith("training step")]
    labels = [int(t.get_text()) for t in heatmap.get_xticklabels()]
    assert labels[0] == 0 and len(set(np.diff(labels))) == 1 and 250 - labels[-1] < np.diff(labels)[0], labels
    # the optimizer's own error and trace ratio 1e4 times the others' (an eval-mode BatchNorm probe):
    # those panels on a log scale, the others' lines not flattened onto zero (QA27)
    wide = ds.copy(deep=True)
    for var in ("network_rel_frobenius_error", "network_trace_ratio"):
        wide[var].loc[{"approximation": own[0]}] = 4e4
    plot_probe(wide, tmp_path / "wide.png", "setting")
    scales = {ax.get_title(): ax.get_yscale() for ax in saved_figures[-1].axes if ax.get_xlabel() == "training step"}
    assert scales["Relative Frobenius error"] == scales["Trace ratio (1 is exact)"] == "log", scales


def test_an_unprobed_run_draws_its_figures_without_a_warning(tmp_path: Path) -> None:
    train(_sgd_config(tmp_path / "run", epochs=1))  # no probe.nc
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = redraw(tmp_path / "run", "setting")
    assert [p.name for p in drawn] == ["training.png"]


def test_the_learning_rate_panel_is_drawn_when_earlier_epochs_lack_it(tmp_path: Path, saved_figures) -> None:
    """A run resumed from a checkpoint older than the lr record: its first epochs' lr are NaN,
    the later ones are drawn."""
    ds = xr.open_dataset(train(_sgd_config(tmp_path / "run", epochs=2))["metrics"]).load()
    ds["lr"].values[0] = np.nan
    plot_training(ds, tmp_path / "t.png", "setting")
    assert "learning rate (last step)" in [ax.get_ylabel() for ax in saved_figures[-1].axes]


def test_the_figures_say_what_the_probe_measured_against_and_where_a_run_diverged(tmp_path: Path, saved_figures) -> None:
    """probe.png said "vs the exact Fisher" whatever --probe-fisher and --probe-mode were, and a
    diverged run's figures showed empty panels and blank probes as "not measured yet" (QA12)."""
    out = tmp_path / "run"
    train(_sgd_config(out, epochs=2, batch_size=10, probe_every=6, probe_batch_size=8, probe_fisher="mc",
                      probe_mode="train", probe_approximations=("kfac",), lr=1e30))
    metrics = xr.open_dataset(out / "metrics.nc").load()
    assert "diverged_at_step" in metrics.attrs  # (lr 1e30: the losses are not finite)
    redraw(out, "setting")
    training, probe = (fig._suptitle.get_text().replace("\n", " ") for fig in saved_figures[-2:])
    assert f"DIVERGED at step {metrics.attrs['diverged_at_step']}" in training
    assert f"DIVERGED at step {metrics.attrs['diverged_at_step']}" in probe
    assert "vs the MC Fisher on a fixed batch, train-mode forward" in probe
