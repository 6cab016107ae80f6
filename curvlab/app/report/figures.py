"""Figures of a comparison dataset: spectra, per-layer errors, whole-network errors.

One style for all figures (:func:`style`), one colour per approximation in every figure
(:mod:`curvlab.app.palette`), sized to stay legible at README width (~900 px).  Figures are drawn
on :class:`matplotlib.figure.Figure` objects rendered by Agg, so nothing touches pyplot's global
state or needs a display.
"""

from __future__ import annotations

import contextlib
import math
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from curvlab.app.palette import colour, label, ordered
from curvlab.io import PathLike, atomic_write


DPI = 150
WIDTH_IN = 9.0  # 1350 px at DPI: crisp when a README scales it to ~900 px

#: Eigenvalues below this fraction of a panel's largest are plotted as numerical zeros (dropped).
ZERO_TOLERANCE = 1e-10

#: What a value that was not measured (NaN, e.g. KFOC above its size limit) shows: the word in
#: its bar slot or in its spectra panel.
MISSING = "n/a"
#: What the title of a figure with such a value adds.
MISSING_NOTE = f"; {MISSING}: not measured, or undefined (a zero F)"

FLAVOURS = {"exact": "exact Fisher (GGN)", "mc": "MC Fisher", "empirical": "empirical Fisher"}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The one style of curvlab's figures (seaborn whitegrid, 'notebook' sizes), scoped."""
    rc = {
        "axes.titlesize": 11,
        "axes.labelsize": 10.5,
        "xtick.labelsize": 9.5,
        "ytick.labelsize": 9.5,
        "legend.fontsize": 10,
        "legend.title_fontsize": 10,
        "figure.titlesize": 12.5,
        "axes.titleweight": "normal",
        "figure.dpi": DPI,
        "savefig.dpi": DPI,
    }
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", rc=rc), matplotlib.rc_context(rc):
        yield


def _title(ds: xr.Dataset, what: str) -> str:
    """``what — model on data, flavour (N=…)`` from the dataset's attributes."""
    model = ds.attrs.get("model")
    data = ds.attrs.get("data")
    flavour = FLAVOURS.get(str(ds.attrs.get("flavour")), ds.attrs.get("flavour"))
    setting = " on ".join(str(p) for p in (model, data) if p)
    weights = ds.attrs.get("weights", "none")  # what tells such runs' figures from the defaults'
    details = ", ".join(
        str(p)
        for p in (flavour, f"N={ds.attrs['num_examples']}" if "num_examples" in ds.attrs else None,
                  "train mode" if ds.attrs.get("model_mode") == "train" else None,
                  f"weights {'/'.join(Path(str(weights)).parts[-2:])}" if weights != "none" else None)
        if p
    )
    parts = [p for p in (setting, details) if p]
    line = what + (" — " + "; ".join(parts) if parts else "")
    if len(line) <= 95:
        return line
    # too long for one line: the figure's subject on top, the setting below, each broken between
    # its "; "-separated parts where it is itself too long
    return "\n".join(_packed(p.split("; "), 95) for p in (what, "; ".join(parts)) if p)


def _packed(parts: list[str], width: int) -> str:
    """``parts`` joined by ``"; "``, on lines of at most ``width`` characters where they fit."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += "; " + part
        else:
            lines.append(part)
    return ";\n".join(textwrap.fill(line, width=width) for line in lines)


def _wrap_name(name: str, width: int) -> str:
    """``name`` on lines of at most ``width`` characters, broken after its dots (or
    underscores), a part longer than a line cut where it must be."""
    parts = [p for p in re.split(r"(?<=[._])", name) if p]
    lines: list[str] = []
    for part in parts:
        while len(part) > width:
            if lines and len(lines[-1]) < width:
                room = width - len(lines[-1])
                lines[-1], part = lines[-1] + part[:room], part[room:]
            else:
                lines.append(part[:width])
                part = part[width:]
        if lines and len(lines[-1]) + len(part) <= width:
            lines[-1] += part
        elif part:
            lines.append(part)
    return "\n".join(lines)


def _layer_label(ds: xr.Dataset, i: int, style: str = "inline", width: int | None = None) -> str:
    """``name (Type, P=…)`` (``inline``), the same on two lines (``two``), or one item a line
    (``stacked``); ``width``: the name wrapped to lines of at most that many characters."""
    layer = str(ds["layer"].values[i])
    if width is not None:
        layer = _wrap_name(layer, width)
    kind = str(ds["module_type"].values[i]) if "module_type" in ds.coords else ""
    params = f"P={int(ds['num_params'].values[i]):,}" if "num_params" in ds.coords else ""
    if style == "stacked":
        return "\n".join(p for p in (layer, kind, params) if p)
    extra = ", ".join(p for p in (kind, params) if p)
    sep = "\n" if style == "two" else " "
    return f"{layer}{sep}({extra})" if extra else layer


#: Most layers a spectra figure shows (evenly spread over the model when it has more).
MAX_SPECTRA_PANELS = 12


def kronecker_layers(ds: xr.Dataset, limit: int | None = None) -> xr.Dataset:
    """The Kronecker blocks of ``ds`` (parameter blocks have only the diagonal approximation),
    at most ``limit`` of them, evenly spread, first and last included."""
    if "block_kind" in ds.coords and (ds["block_kind"] == "kronecker").any():
        ds = ds.isel(layer=np.flatnonzero(ds["block_kind"].values == "kronecker"))
    n = ds.sizes["layer"]
    if limit is not None and n > limit:
        ds = ds.isel(layer=np.unique(np.linspace(0, n - 1, limit).round().astype(int)))
    return ds


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    fmt = path.suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI, facecolor="white"))


def _grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _laid_out(fig: Figure):  # noqa: ANN202
    """Lay ``fig`` out (constrained layout runs at draw time) and return its renderer, so that
    where its texts fall is known."""
    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def legend_below(fig: Figure, handles: list) -> None:
    """The figure's legend under its panels, in as few rows as fit its width (in one row, the
    eight entries of every approximation ran past both edges of the canvas)."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    for rows in range(1, len(handles) + 1):  # rows of equal length: 4 + 4, not 7 + 1
        ncols = math.ceil(len(handles) / rows)
        legend = fig.legend(handles=handles, loc="outside lower center", ncols=ncols, frameon=False)
        if ncols == 1 or legend.get_window_extent(renderer).width <= 0.98 * fig.bbox.width:
            return
        legend.remove()


def _make_room(ax, box, highest: float, renderer, pad_px: float = 4.0) -> None:  # noqa: ANN001
    """Raise the top of ``ax``'s y axis so that values up to ``highest`` stay below ``box`` (a
    text or legend placed in axes coordinates at the top of the panel): it then covers no data,
    whatever the data are."""
    patch = box.get_bbox_patch() if hasattr(box, "get_bbox_patch") else None
    extent = (patch or box).get_window_extent(renderer)
    panel = ax.get_window_extent(renderer)
    below = (extent.y0 - pad_px - panel.y0) / panel.height  # axes fraction left under the box
    if not (np.isfinite(highest) and highest > 0 and 0 < below < 1):
        return
    log = ax.get_yscale() == "log"
    lo, hi = ax.get_ylim()
    f = np.log10 if log else (lambda v: v)
    top = f(lo) + (f(highest) - f(lo)) / below
    if top > f(hi):
        ax.set_ylim(lo, 10.0**top if log else top)


# ------------------------------------------------------------------------------------ spectra


def plot_spectra(ds: xr.Dataset, path: PathLike) -> Path:
    """One panel per layer: the exact eigenvalues and each approximation's, largest first.

    Log y-scale; NaN padding and eigenvalues below :data:`ZERO_TOLERANCE` times the panel's
    largest (zeros beyond a block's rank, up to round-off) are dropped.  Kronecker blocks only,
    at most :data:`MAX_SPECTRA_PANELS` of them.
    """
    total = ds.sizes["layer"]
    ds = kronecker_layers(ds, MAX_SPECTRA_PANELS)
    layers = list(ds["layer"].values)
    names = ordered([str(a) for a in ds["approximation"].values])
    rows, cols = _grid(len(layers))
    limits = _limits(ds)
    drawn: set[str] = set()
    notes = []  # (panel, its note, the panel's largest value)
    with style():
        fig = Figure(figsize=(WIDTH_IN, 0.6 + 2.7 * rows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for i, ax in enumerate(axes):
            if i >= len(layers):
                ax.set_visible(False)
                continue
            exact = np.asarray(ds["exact_eigenvalues"].isel(layer=i).values, dtype=float)
            spectra = {"exact": exact}
            for name in names:
                vals = ds["approx_eigenvalues"].isel(layer=i).sel(approximation=name).values
                spectra[name] = np.asarray(vals, dtype=float)
            finite = np.concatenate([v[np.isfinite(v)] for v in spectra.values()])
            top = finite.max() if finite.size else np.nan
            # Eigenvalues below top·1e-10 are numerical zeros (beyond the block's rank): dropped,
            # so a rank-deficient spectrum ends where its rank does.
            cutoff = top * ZERO_TOLERANCE if top > 0 else 0.0
            shown = {
                name: _plot_spectrum(ax, v, name, cutoff, lw=2.6 if name == "exact" else 1.4,
                                     zorder=3 if name == "exact" else 2)
                for name, v in spectra.items()
            }
            drawn.update(name for name, v in shown.items() if v.size)
            ax.set_yscale("log")
            values = np.concatenate(list(shown.values()))
            if values.size:
                ax.set_ylim(values.min() / 2, values.max() * 2)
            # a line that is missing because it was not measured says so where it would be
            absent = [n for n in names if not np.isfinite(spectra[n]).any()]
            if absent:
                params = int(ds["num_params"].values[i]) if "num_params" in ds.coords else None
                text = "\n".join(_not_measured(n, params, limits) for n in absent)
                note = ax.text(0.98, 0.96, text, transform=ax.transAxes, ha="right", va="top", fontsize=8.5,
                               color="0.25", bbox={"boxstyle": "round,pad=0.25", "facecolor": "white",
                                                   "edgecolor": "0.7"}, zorder=5)
                notes.append((ax, note, values.max() if values.size else np.nan))
            ax.set_title(_spectrum_title(ds, i, cols))
            if i + cols >= len(layers):  # bottom panel of its column
                ax.set_xlabel("eigenvalue index (largest first)")
            if i % cols == 0:
                ax.set_ylabel("eigenvalue")
        # the legend lists only what some panel draws
        reference = f"F ({FLAVOURS.get(str(ds.attrs.get('flavour')), 'exact Fisher (GGN)')})"
        handles = [Line2D([], [], color=colour("exact"), lw=2.6, label=reference)]
        handles += [Line2D([], [], color=colour(n), lw=1.6, label=label(n)) for n in names if n in drawn]
        legend_below(fig, handles)
        subset = f" ({len(layers)} of {total} blocks)" if len(layers) < total else ""
        fig.suptitle(_title(ds, "Eigenvalues per layer" + subset + MISSING_NOTE * bool(notes)))
        if notes:
            renderer = _laid_out(fig)
            for ax, note, highest in notes:
                _make_room(ax, note, highest, renderer)
        return _save(fig, path)


def _limits(ds: xr.Dataset) -> dict[str, int]:
    """Approximation → the most parameters of a block it is measured on, from the comparison's
    ``measured_up_to`` attribute (``"kfoc: P ≤ 131072"``)."""
    limits = {}
    for part in str(ds.attrs.get("measured_up_to", "")).split(";"):
        name, sep, bound = part.partition(": P ≤ ")
        if sep and bound.strip().isdigit():
            limits[name.strip()] = int(bound)
    return limits


def _not_measured(name: str, params: int | None, limits: dict[str, int]) -> str:
    """``KFOC: n/a (P > 131,072)``, the reason where the block is above the approximation's limit."""
    limit = limits.get(name)
    why = f" (P > {limit:,})" if limit is not None and params is not None and params > limit else ""
    return f"{label(name)}: {MISSING}{why}"


def _spectrum_title(ds: xr.Dataset, i: int, cols: int) -> str:
    """A panel's title: ``name (Type, P=…)`` on one line where it fits the panel's width, else the
    name (wrapped) above ``(Type, P=…)``."""
    fits = _chars(WIDTH_IN / cols, 11)
    one = _layer_label(ds, i)
    return one if len(one) <= fits else _layer_label(ds, i, "two", width=fits)


def _chars(inches: float, fontsize: float) -> int:
    """About how many characters of text at ``fontsize`` points fit in ``inches`` (an average
    glyph of DejaVu Sans is ~0.6 em wide)."""
    return max(6, int(inches * 72 / (0.6 * fontsize)))


def _plot_spectrum(ax, values: np.ndarray, name: str, cutoff: float, lw: float, zorder: int) -> np.ndarray:  # noqa: ANN001
    """Plot the finite eigenvalues above ``cutoff`` (> 0) against their 1-based index; returns them."""
    keep = np.isfinite(values) & (values > cutoff)
    if keep.any():
        idx = np.arange(1, len(values) + 1)[keep]
        ax.plot(idx, values[keep], color=colour(name), lw=lw, label=label(name), zorder=zorder)
    return values[keep]


# ------------------------------------------------------------------------------------- errors

_REL_FRO = r"$\|F - \hat{F}\|_F\,/\,\|F\|_F$"
# the damped natural gradients; two lines, as one it ran past a stacked panel's 2.4 in
_NG_MIS = "$1 - \\cos\\angle$\n$(\\hat{F}_\\lambda^{-1}g,\\ F_\\lambda^{-1}g)$"

#: Panels of :func:`plot_errors`: (how to compute it, y-axis label, panel title).
ERROR_PANELS: tuple[tuple[str, str, str], ...] = (
    ("rel_frobenius_error", _REL_FRO, "Relative Frobenius error"),
    ("projection_error", r"relative to $\|F\|_F$", "Projection error (eigenbasis)"),
    ("scaling_error", r"relative to $\|F\|_F$", "Scaling error (eigenvalues)"),
    ("1-ng_cosine", _NG_MIS, "Natural-gradient misalignment"),
)


def _metric(ds: xr.Dataset, key: str) -> xr.DataArray:
    if key.startswith("1-"):  # a cosine's rounding past 1 (1 + 2e-16) is no negative misalignment
        return (1.0 - ds[key[2:]]).clip(min=0.0)
    return ds[key]


def _bars(ax, frame: pd.DataFrame, x: str, order: list[str], names: list[str]) -> bool:  # noqa: ANN001
    """Bars of ``frame["value"]`` by ``x`` (hue: approximation); a value that is not finite gets
    :data:`MISSING` written in its slot, which would otherwise be empty, as a value of 0 is on a
    linear scale. Returns whether any was missing."""
    sns.barplot(
        data=frame,
        x=x,
        y="value",
        hue="approximation",
        order=order,
        hue_order=[label(n) for n in names],
        palette={label(n): colour(n) for n in names},
        ax=ax,
        legend=False,
        saturation=1.0,
        edgecolor="white",
        linewidth=0.5,
    )
    hues = [label(n) for n in names]
    dodge = not frame[x].equals(frame["approximation"])  # hue is x itself: one bar per slot
    missing = frame[~np.isfinite(frame["value"].to_numpy(dtype=float))]
    for _, row in missing.iterrows():
        pos = float(order.index(row[x]))
        if dodge:  # seaborn's dodged bars: the slot's 0.8 split evenly over the hues
            pos += -0.4 + (hues.index(row["approximation"]) + 0.5) * 0.8 / len(hues)
        ax.text(pos, 0.02, MISSING, transform=ax.get_xaxis_transform(), rotation=90, ha="center", va="bottom",
                fontsize=7 if dodge else 8.5, color="0.35")
    return not missing.empty


def _zero_note(frame: pd.DataFrame, names: list[str]) -> str:
    """The approximations whose every bar in the panel is exactly 0 (EKFAC's, TEKFAC's and the
    diagonal's scaling error, by construction): bars of no height, which on a log axis vanish as
    a missing one would, named under the title."""
    value = frame.set_index("approximation")["value"]
    zero = [label(n) for n in names if label(n) in value.index and bool((value.loc[[label(n)]] == 0).all())]
    return f"\n(0 for {', '.join(zero)})" if zero else ""


def _log_if_wide(ax, values: np.ndarray) -> None:  # noqa: ANN001
    """Log y-scale when the positive values span more than two decades."""
    pos = values[np.isfinite(values) & (values > 0)]
    if pos.size and pos.max() / pos.min() > 100:
        ax.set_yscale("log")
        ax.set_ylim(pos.min() / 2, pos.max() * 2)


def plot_errors(ds: xr.Dataset, path: PathLike) -> Path:
    """Grouped bars per layer (hue: approximation) of the relative Frobenius, projection and
    scaling errors and of ``1 − ng_cosine``; one panel per metric. Lower is better everywhere.
    Kronecker blocks only (a parameter block's only approximation is its diagonal: the title
    says how many are left to summary.md)."""
    left_out = ds.sizes["layer"]
    ds = kronecker_layers(ds)
    left_out -= ds.sizes["layer"]
    names = ordered([str(a) for a in ds["approximation"].values])
    n_layers = ds.sizes["layer"]
    many = n_layers > 3
    label_style = "stacked" if n_layers <= 10 else "inline"
    panels = [p for p in ERROR_PANELS if (p[0][2:] if p[0].startswith("1-") else p[0]) in ds]
    rows, cols = (len(panels), 1) if many else _grid(len(panels), 2)
    # stacked labels sit side by side under their slots: names wrapped to a slot's width
    # (the panel's, less ~0.9 in for the y axis, over the layers)
    slot = _chars((WIDTH_IN / cols - 0.9) / n_layers, 8.5) if label_style == "stacked" else None
    layer_labels = [_layer_label(ds, i, label_style, width=slot) for i in range(n_layers)]
    height = (2.4 if many else 3.0) * rows + (1.2 if many else 0.8)
    with style():
        fig = Figure(figsize=(WIDTH_IN, height), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, sharex=many)).ravel()
        missing = False
        for k, (ax, (key, ylabel, title)) in enumerate(zip(axes, panels)):
            values = _metric(ds, key).transpose("layer", "approximation")
            frame = pd.DataFrame(
                [
                    {"layer": layer_labels[i], "approximation": label(a), "value": float(values.sel(approximation=a).values[i])}
                    for i in range(n_layers)
                    for a in names
                ]
            )
            missing |= _bars(ax, frame, "layer", layer_labels, names)
            _log_if_wide(ax, frame["value"].to_numpy())
            ax.set_title(title + _zero_note(frame, names))
            ax.set_ylabel(ylabel)
            bottom = not many or k == len(panels) - 1
            ax.set_xlabel("layer" if bottom else "")
            if bottom:
                ax.tick_params(axis="x", labelsize=8.5, labelrotation=90 if label_style == "inline" else 0)
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        legend_below(fig, [Patch(color=colour(n), label=label(n)) for n in names])
        what = "Per-layer errors (lower is better)"
        if left_out:
            what += f"; {left_out} parameter block{'s' * (left_out > 1)} (diagonal only) in summary.md"
        what += MISSING_NOTE * missing
        fig.suptitle(_title(ds, what))
        return _save(fig, path)


# ------------------------------------------------------------------------------------ network

NETWORK_PANELS: tuple[tuple[str, str, str], ...] = (
    ("network_rel_frobenius_error", _REL_FRO, "Relative Frobenius error"),
    ("1-network_ng_cosine", _NG_MIS, "Natural-gradient misalignment"),
    ("network_trace_ratio", r"tr $\hat{F}$ / tr $F$", "Trace ratio (1 is exact)"),
)


def plot_network(ds: xr.Dataset, path: PathLike) -> Path:
    """Whole-network bars per approximation: Frobenius error against the full Fisher (with the
    exact block-diagonal floor marked), natural-gradient misalignment, trace ratio."""
    names = ordered([str(a) for a in ds["approximation"].values])
    panels = [p for p in NETWORK_PANELS if (p[0][2:] if p[0].startswith("1-") else p[0]) in ds]
    with style():
        fig = Figure(figsize=(WIDTH_IN, 3.6), layout="constrained")
        axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)).ravel()
        missing = False
        floors = []  # (panel, the floor's legend, the panel's largest value)
        for ax, (key, ylabel, title) in zip(axes, panels):
            values = _metric(ds, key)
            frame = pd.DataFrame(
                {"approximation": [label(a) for a in names], "value": [float(values.sel(approximation=a)) for a in names]}
            )
            frame["x"] = frame["approximation"]
            missing |= _bars(ax, frame, "x", [label(a) for a in names], names)
            if key == "network_rel_frobenius_error" and "network_blockdiag_error" in ds:
                floor = float(ds["network_blockdiag_error"])
                ax.axhline(floor, color="0.25", ls="--", lw=1.2)
                # a legend at the top of the panel, above the bars (see _make_room), not a label by
                # the line: at the floor's height there are bars
                floor_key = ax.legend(handles=[Line2D([], [], color="0.25", ls="--", lw=1.2)],
                                      labels=["floor: F's own\nblock diagonal"], loc="upper right", fontsize=8.5,
                                      handlelength=2.0, borderaxespad=0.4, framealpha=1.0, edgecolor="0.7")
                floor_key.set_zorder(5)
                floors.append((ax, floor_key, np.nanmax(np.append(frame["value"].to_numpy(dtype=float), floor))))
            elif key == "network_trace_ratio":
                ax.axhline(1.0, color="0.25", ls="--", lw=1.2)
            else:
                _log_if_wide(ax, frame["value"].to_numpy())
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("")
            ax.tick_params(axis="x", labelrotation=45)
        whole = "Whole network" if ds.attrs.get("network_blocks") != "kronecker" else "Whole network (its Kronecker layers)"
        fig.suptitle(_title(ds, whole + MISSING_NOTE * missing))
        if floors:
            renderer = _laid_out(fig)
            for ax, floor_key, highest in floors:
                _make_room(ax, floor_key, highest, renderer)
        return _save(fig, path)
