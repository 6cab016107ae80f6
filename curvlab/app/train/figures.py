"""Figures of a training run, redrawn after every epoch (what a long run shows while it trains):

* ``training.png`` (from metrics.nc): training and test loss and accuracy per epoch, and the
  learning rate of each epoch's last step;
* ``probe.png`` (from probe.nc, with ``--probe-every``): the whole network's approximation errors
  over the training steps — relative Frobenius error (the exact block-diagonal floor dashed),
  natural-gradient misalignment, trace ratio — and, per Kronecker layer, the relative Frobenius
  error of the optimizer's own approximation (the probe's first, without one).

The report's style, colours and names (:mod:`curvlab.app.report.figures`, :mod:`curvlab.app.palette`).
"""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.colors import LogNorm
from matplotlib.ticker import MaxNLocator
from matplotlib.figure import Figure

from curvlab.app.palette import colour, label, ordered
from curvlab.app.report.figures import FLAVOURS, NETWORK_PANELS, WIDTH_IN, _log_if_wide, _metric, _save, kronecker_layers, style
from curvlab.app.train.run_folder import METRICS, PROBE, PROBE_FIGURE, TRAINING_FIGURE
from curvlab.io import PathLike, signals_held

def redraw(folder: Path, setting: str) -> list[Path]:
    """:data:`~curvlab.app.train.run_folder.TRAINING_FIGURE` from ``folder``'s metrics.nc and :data:`~curvlab.app.train.run_folder.PROBE_FIGURE` from its probe.nc
    (where the run probes); a figure that cannot be drawn is a warning naming it, not the end of
    the run (its files are saved already)."""
    drawn = []
    for source, figure, plot in ((METRICS, TRAINING_FIGURE, plot_training), (PROBE, PROBE_FIGURE, plot_probe)):
        if not (folder / source).is_file():
            continue
        try:
            with signals_held(), xr.open_dataset(folder / source) as ds:
                ds = ds.load()
            if source == METRICS and "diverged_at_step" in ds.attrs:  # both figures say so: gaps, not values
                setting = f"{setting} — DIVERGED at step {ds.attrs['diverged_at_step']} (what is not finite is not drawn)"
            drawn.append(plot(ds, folder / figure, setting))
        except Exception as err:  # noqa: BLE001 — whatever matplotlib raises, the trained epochs stand
            warnings.warn(f"curvlab train: {folder / figure} not drawn ({type(err).__name__}: {err}); "
                          f"{source} is complete", RuntimeWarning, stacklevel=2)
    return drawn


#: Characters a line of a figure's title holds at its width.
TITLE_WIDTH = 95
#: Most layers the probe's per-layer panel names on its axis (evenly spread beyond).
MAX_LAYER_TICKS = 16  # (24 of 8 pt overlapped on MobileNetV2's 36 layers)


def plot_training(ds: xr.Dataset, path: PathLike, setting: str) -> Path:
    """Loss, accuracy (train and test) and the learning rate against the epochs of ``ds``
    (metrics.nc); ``setting`` heads the figure."""
    epochs = ds["epoch"].values
    panels = [("loss", ("train_loss", "test_loss")), ("accuracy", ("train_accuracy", "test_accuracy"))]
    if "lr" in ds and np.isfinite(ds["lr"].values).any():
        panels.append(("learning rate (last step)", ("lr",)))
    with style():
        fig = Figure(figsize=(WIDTH_IN, 3.2), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False).ravel()
        for ax, (ylabel, names) in zip(axes, panels):
            for name in names:
                split = name.split("_")[0]  # train, test (or lr)
                ax.plot(epochs, ds[name].values, marker="o", ms=4, ls="--" if split == "test" else "-",
                        color=colour("kfac") if split == "test" else "0.15", label=split if len(names) > 1 else None)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(ylabel)
            if len(names) > 1:
                ax.legend(frameon=False)
            if ylabel == "loss":
                _log_if_wide(ax, ds[list(names)].to_array().values)
        fig.suptitle(textwrap.fill(f"Training — {setting}", TITLE_WIDTH))
        return _save(fig, path)


def plot_probe(ds: xr.Dataset, path: PathLike, setting: str) -> Path:
    """The probe's whole-network errors over the steps of ``ds`` (probe.nc), one line per
    approximation, and its per-layer errors of one approximation as a step × layer map."""
    steps = ds["step"].values
    names = ordered([str(a) for a in ds["approximation"].values])
    own = next((n for n in names if n.endswith("@optimizer")), names[0])
    panels = [p for p in NETWORK_PANELS if (p[0][2:] if p[0].startswith("1-") else p[0]) in ds]
    layers = kronecker_layers(ds)
    with style():
        fig = Figure(figsize=(WIDTH_IN, 3.2 + (3.4 if layers.sizes["layer"] else 0)), layout="constrained")
        grid = fig.add_gridspec(2 if layers.sizes["layer"] else 1, max(len(panels), 1))
        for k, (key, ylabel, title) in enumerate(panels):
            ax = fig.add_subplot(grid[0, k])
            values = _metric(ds, key)
            for name in names:
                ax.plot(steps, values.sel(approximation=name).values, marker="o", ms=3, color=colour(name),
                        label=label(name))
            if key == "network_rel_frobenius_error" and "network_blockdiag_error" in ds:
                ax.plot(steps, ds["network_blockdiag_error"].values, color="0.25", ls="--", lw=1.2,
                        label="F's own block diagonal (the floor)")
            elif key == "network_trace_ratio":
                ax.axhline(1.0, color="0.25", ls="--", lw=1.0)
            # on every panel: an eval-mode probe of a BatchNorm network's own approximation at 4e4
            # flattened every other line onto zero
            _log_if_wide(ax, values.values)
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("training step")
        if panels:
            handles, labels = fig.axes[0].get_legend_handles_labels()
            fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), frameon=False)
        if layers.sizes["layer"]:
            ax = fig.add_subplot(grid[1, :])
            errors = layers["rel_frobenius_error"].sel(approximation=own).transpose("layer", "step").values
            positive = errors[np.isfinite(errors) & (errors > 0)]
            norm = LogNorm(positive.min(), positive.max()) if positive.size and positive.max() > positive.min() else None
            mesh = ax.pcolormesh(np.arange(len(steps) + 1), np.arange(errors.shape[0] + 1),
                                 np.ma.masked_invalid(errors), norm=norm, cmap="viridis", shading="flat")
            fig.colorbar(mesh, ax=ax, label="relative Frobenius error")
            ax.invert_yaxis()  # the first layer on top
            shown = np.unique(np.linspace(0, errors.shape[0] - 1, min(errors.shape[0], MAX_LAYER_TICKS)).round().astype(int))
            ax.set_yticks(shown + 0.5, [str(layers["layer"].values[i]) for i in shown], fontsize=8)
            ticks = np.arange(0, len(steps), math.ceil(len(steps) / 10))  # evenly: 11 probes had one label dropped
            ax.set_xticks(ticks + 0.5, [str(steps[i]) for i in ticks])
            ax.set_xlabel("training step (blank: not measured yet, or not finite)")
            ax.set_title(f"Per layer: {label(own)}, relative Frobenius error")
            ax.grid(False)
        against = FLAVOURS.get(str(ds.attrs.get("flavour")), "Fisher")
        mode = ds.attrs.get("probe_mode")
        batch = f"a fixed batch, {mode}-mode forward" if mode else "a fixed batch"
        fig.suptitle(textwrap.fill(f"Probe: approximations vs the {against} on {batch} — {setting}", TITLE_WIDTH))
        return _save(fig, path)

