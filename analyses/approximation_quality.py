"""Approximation quality during training with TEKFAC.

Trains with TEKFAC and probes every K steps on a fixed batch: per layer, the relative Frobenius,
projection and scaling errors and the natural-gradient cosine of each approximation — TEKFAC's
own running approximation (what it inverts) and fresh ones from the probe batch — against the
exact Fisher block; spectra at the start, middle and end.

    python analyses/approximation_quality.py --setting mnist-mlp

Writes ``analyses/results/approximation_quality_<setting>.nc`` and
``figures/approximation_quality_<setting>.png`` / ``..._spectra.png``.
"""

from __future__ import annotations

import argparse
import textwrap
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import xarray as xr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIGURES, MOMENTUM, RESULTS, RUNS, default_data_dir, run, save  # noqa: E402

from curvlab.app.palette import colour  # noqa: E402
from curvlab.app.train import TrainConfig  # noqa: E402

SETTINGS = {
    "mnist-mlp": dict(model="mlp", dataset="mnist", model_kwargs={"hidden": (128, 64)}, epochs=2, train_size=None,
                      probe_every=40),
    "mnist-cnn": dict(model="cnn", dataset="mnist", model_kwargs={}, epochs=1, train_size=None, probe_every=20),
}

METRICS = {
    "rel_frobenius_error": "rel. Frobenius error",
    "projection_error": "projection error",
    "scaling_error": "scaling error",
    "ng_cosine": "natural-gradient cosine",
}

def colours(names) -> dict:  # noqa: ANN001
    """curvlab's one palette (``exact F`` black), for the names present."""
    return {"exact F": colour("exact"), **{n: colour(n) for n in names}}


def plot_metrics(ds: xr.Dataset, title: str, path: Path) -> None:
    df = ds[list(METRICS)].to_dataframe().reset_index()
    df = df.melt(id_vars=["step", "layer", "approximation"], value_vars=list(METRICS), var_name="metric")
    df["metric"] = df["metric"].map(METRICS)
    sns.set_theme(style="whitegrid", context="notebook")
    # TKFAC dashed: TEKFAC keeps its basis, so their projection errors coincide
    dashes = {a: (4, 2) if a == "tkfac" else "" for a in df["approximation"].unique()}
    grid = sns.relplot(df, x="step", y="value", hue="approximation", style="approximation", dashes=dashes,
                       col="layer", row="metric", kind="line", palette=colours(df["approximation"].unique()),
                       height=2.3, aspect=1.45, facet_kws={"sharey": "row"})
    # metrics as the first column's y labels, not rotated margin titles (whose length spread the rows apart)
    last = grid.axes.shape[0] - 1
    for (row, col), ax in np.ndenumerate(grid.axes):
        ax.set_title(f"layer {grid.col_names[col]}" if row == 0 else "")
        ax.set_ylabel(grid.row_names[row] if col == 0 else "")
        ax.set_xlabel("training step" if row == last else "")
    lines = textwrap.wrap(title, 120)
    grid.figure.suptitle("\n".join(lines), y=1.0 + 0.025 * len(lines))
    grid.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(grid.figure)


def plot_spectra(ds: xr.Dataset, title: str, path: Path) -> None:
    steps = ds.step.values
    picks = {"start": steps[0], "middle": steps[len(steps) // 2], "end": steps[-1]}
    rows = []
    for label, step in picks.items():
        sub = ds.sel(step=step)
        for layer in ds.layer.values:
            exact = sub.exact_eigenvalues.sel(layer=layer).values
            rows += [dict(when=f"{label} (step {step})", layer=layer, source="exact F", index=i, eigenvalue=v)
                     for i, v in enumerate(exact) if np.isfinite(v) and v > 0]
            for approx in ("tekfac@optimizer", "tekfac", "kflr"):
                if approx in sub.approximation.values:
                    vals = sub.approx_eigenvalues.sel(layer=layer, approximation=approx).values
                    rows += [dict(when=f"{label} (step {step})", layer=layer, source=approx, index=i, eigenvalue=v)
                             for i, v in enumerate(vals) if np.isfinite(v) and v > 0]
    import pandas as pd

    df = pd.DataFrame(rows)
    sns.set_theme(style="whitegrid", context="notebook")
    grid = sns.relplot(df, x="index", y="eigenvalue", hue="source", col="when", row="layer", kind="line",
                       palette=colours(df["source"].unique()), height=2.4, aspect=1.4,
                       facet_kws={"sharey": "row", "margin_titles": True})
    grid.set(yscale="log")
    grid.set_titles(row_template="layer {row_name}", col_template="{col_name}")
    grid.set_axis_labels(f"eigenvalue index (the top {ds.sizes['eig']}, largest first)", "eigenvalue")
    grid.figure.suptitle(textwrap.fill(title, 100), y=1.05)
    grid.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(grid.figure)


def plot_all(ds: xr.Dataset, setting: str, name: str) -> None:
    title = (f"{setting}: approximations vs the exact Fisher on a fixed batch while training with TEKFAC "
             f"(tekfac@optimizer = what TEKFAC inverts); one seed; lr {ds.attrs['lr']}, damping "
             f"{ds.attrs['damping']}, KL clipping {ds.attrs['kl_clip']}, momentum {ds.attrs['momentum']}")
    FIGURES.mkdir(exist_ok=True)
    plot_metrics(ds, title, FIGURES / f"{name}.png")
    plot_spectra(ds, f"{setting}: spectra during TEKFAC training", FIGURES / f"{name}_spectra.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=SETTINGS, default="mnist-mlp")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", action="store_true", help="only redraw the figures from analyses/results")
    args = parser.parse_args(argv)
    spec = dict(SETTINGS[args.setting])
    name = f"approximation_quality_{args.setting}"
    if args.replot:
        plot_all(xr.open_dataset(RESULTS / f"{name}.nc").load(), args.setting, name)
        return 0
    t0 = time.time()
    dataset = spec.pop("dataset")  # (popped whether or not --data-dir is given: passed twice, a TypeError)
    cfg = TrainConfig(
        model=spec.pop("model"),
        dataset=dataset,
        data_dir=args.data_dir or default_data_dir(dataset),
        optimizer="tekfac",
        probe_approximations=("kfac", "kflr", "ekfac", "tkfac", "tekfac"),
        probe_batch_size=128,
        momentum=MOMENTUM,
        test_size=2000,
        seed=args.seed,
        device=args.device,
        out=str(RUNS / "approximation_quality" / args.setting),
        progress=False,
        **spec,
    )
    run(cfg)  # (a finished run of this configuration is reused)
    ds = xr.open_dataset(cfg.out_dir / "probe.nc").load()
    ds.attrs.update({"setting": args.setting, "optimizer": "tekfac", "lr": cfg.lr, "damping": cfg.damping,
                     "momentum": cfg.momentum, "kl_clip": cfg.kl_clip})
    save(ds, name)
    plot_all(ds, args.setting, name)
    print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
