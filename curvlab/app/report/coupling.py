"""The figure of what ignoring train-mode BatchNorm's coupling costs (``coupling.png``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure

from curvlab.app.palette import colour, label
from curvlab.app.report.figures import _REL_FRO, WIDTH_IN, _layer_label, _save, _title, kronecker_layers, style
from curvlab.io import PathLike


def plot_coupling(ds: xr.Dataset, path: PathLike) -> Path:
    """Per Kronecker layer: how far the block the Kronecker statistics describe (per-example
    quantities, the coupling between examples ignored) is from the exact coupled block — its
    relative Frobenius distance and its trace ratio — next to KFLR's and TEKFAC's errors."""
    ds = kronecker_layers(ds)
    n_layers = ds.sizes["layer"]
    labels = [_layer_label(ds, i, "inline") for i in range(n_layers)]
    present = [a for a in ("kflr", "tekfac") if a in ds["approximation"].values]
    series = {"convention block": ds["coupling_error"].values}
    series.update({label(a): ds["rel_frobenius_error"].sel(approximation=a).values for a in present})
    colours = {"convention block": "0.3", **{label(a): colour(a) for a in present}}
    with style():
        fig = Figure(figsize=(WIDTH_IN, 6.4), layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True)
        frame = pd.DataFrame(
            [{"layer": labels[i], "what": k, "value": float(v[i])} for k, v in series.items() for i in range(n_layers)]
        )
        sns.barplot(data=frame, x="layer", y="value", hue="what", order=labels, palette=colours, ax=top,
                    saturation=1.0, edgecolor="white", linewidth=0.5)
        top.set_ylabel(_REL_FRO)
        top.set_title("Distance from the exact (coupled) block")
        top.legend(title="", frameon=False, ncols=len(series), loc="upper left")
        highest = frame["value"].max()
        if highest > 0:  # room above the bars for the legend (it covered the highest one)
            top.set_ylim(0, 1.35 * highest)
        top.set_xlabel("")
        ratio = pd.DataFrame({"layer": labels, "value": ds["coupling_trace_ratio"].values})
        sns.barplot(data=ratio, x="layer", y="value", order=labels, color="0.3", ax=bottom, saturation=1.0)
        bottom.axhline(1.0, color="0.25", ls="--", lw=1.2)
        bottom.set_ylabel(r"tr $F_{conv}$ / tr $F$")
        bottom.set_title("Trace of the convention block (coupling ignored) over the exact trace")
        bottom.set_xlabel("layer")
        bottom.tick_params(axis="x", labelsize=8.5, labelrotation=90)
        fig.suptitle(_title(ds, "What ignoring the BatchNorm coupling costs"))
        return _save(fig, path)
