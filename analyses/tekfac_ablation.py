"""TEKFAC ablation: what the reconstruction's choices change.

TEKFAC's damping and the basis it rescales in are reconstructions ([R] in the README).  This
trains TEKFAC with every damping strategy (``nor``, ``exact``, ``trace-relative``, ``factored``)
in both bases (the trace-weighted eigenbasis of δΦ, δΨ — TEKFAC — and KFAC's eigenbasis — which
makes it EKFAC with that damping), for two damping values and two seeds, and probes the
optimizer's own approximation against the exact Fisher as it trains.

    python analyses/tekfac_ablation.py

Writes ``analyses/results/tekfac_ablation.nc``/``.md`` and ``figures/tekfac_ablation.png`` (another
``--epochs``/``--train-size``: ``tekfac_ablation_<epochs>ep<examples>.*``, beside the committed ones).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib import ticker  # noqa: E402
import xarray as xr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FIGURES, MOMENTUM, RESULTS, RUNS, default_data_dir, markdown_table, run, save  # noqa: E402

from curvlab.app.train import TrainConfig  # noqa: E402

STRATEGIES = ("nor", "exact", "trace-relative", "factored")
BASES = ("trace", "kfac")
DAMPINGS = (1e-3, 1e-2)
SEEDS = (0, 1)
EPOCHS, TRAIN_SIZE, BATCH, PROBE_EVERY = 3, 12000, 128, 100  # the committed results' budget


def name_of(epochs: int, train_size: int) -> str:
    """The results' name: the committed budget's, or one that says its own (never overwriting them)."""
    return "tekfac_ablation" + ("" if (epochs, train_size) == (EPOCHS, TRAIN_SIZE) else f"_{epochs}ep{train_size}")


def config(strategy: str, basis: str, damping: float, seed: int, args) -> TrainConfig:
    return TrainConfig(
        model="mlp",
        dataset="mnist",
        data_dir=args.data_dir or default_data_dir("mnist"),
        model_kwargs={"hidden": (128, 64)},
        optimizer="tekfac",
        damping_strategy=strategy,
        basis=basis,
        damping=damping,
        lr=0.1,
        momentum=MOMENTUM,
        epochs=args.epochs,
        batch_size=BATCH,
        train_size=args.train_size,
        test_size=5000,
        probe_every=PROBE_EVERY,
        probe_batch_size=128,
        probe_approximations=("tekfac",),
        seed=seed,
        device=args.device,
        figures=False,  # each run's training.png and probe.png, redrawn every epoch: this study draws its own
        out=str(RUNS / name_of(args.epochs, args.train_size) / f"{strategy}-{basis}-{damping:g}-s{seed}"),
        progress=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=EPOCHS,
                        help="epochs (default: %(default)s; another budget writes tekfac_ablation_<epochs>ep<examples>.*)")
    parser.add_argument("--train-size", type=int, default=TRAIN_SIZE, help="training examples (default: %(default)s)")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from analyses/results")
    args = parser.parse_args(argv)
    name = name_of(args.epochs, args.train_size)
    if args.replot:
        plot(xr.open_dataset(RESULTS / f"{name}.nc").load(), name)
        return 0
    steps = args.epochs * math.ceil(args.train_size / BATCH)
    if steps < PROBE_EVERY:  # the probe columns and the NG cosine panel would hold nothing
        parser.error(f"--epochs {args.epochs} on --train-size {args.train_size} give {steps} steps, fewer than the "
                     f"{PROBE_EVERY} between probes: the optimizer's approximation would never be probed after step 0 "
                     "(before its first statistics)")
    t0 = time.time()
    runs = []
    for strategy in STRATEGIES:
        for basis in BASES:
            for damping in DAMPINGS:
                for seed in SEEDS:
                    cfg = config(strategy, basis, damping, seed, args)
                    metrics = run(cfg)
                    probe = xr.open_dataset(cfg.out_dir / "probe.nc").load()
                    own = probe.sel(approximation="tekfac@optimizer").isel(step=slice(1, None))
                    # over every probe and layer, a NaN kept: a run with a dead layer (its exact block zero,
                    # the cosine undefined) averaged over its other layers was placed among the working ones
                    metrics["probe_rel_frobenius_error"] = own.rel_frobenius_error.mean(("step", "layer"), skipna=False)
                    metrics["probe_ng_cosine"] = own.ng_cosine.mean(("step", "layer"), skipna=False)
                    runs.append(metrics.expand_dims(strategy=[strategy], basis=[basis], damping=[damping], seed=[seed]))
                    print(f"  {strategy} {basis} λ={damping:g} seed {seed}: "
                          f"train loss {float(metrics.train_loss[-1]):.4f}", flush=True)
    ds = xr.combine_by_coords(runs, combine_attrs="drop_conflicts")
    ds.attrs.update({"analysis": "TEKFAC ablation (damping strategy × basis)", "lr": 0.1,
                     "epochs": args.epochs, "train_size": args.train_size, "momentum": MOMENTUM})
    save(ds, name)

    final = ds.isel(epoch=-1)
    columns = ["train_loss", "test_accuracy", "probe_rel_frobenius_error", "probe_ng_cosine"]
    df = final[columns].mean("seed", skipna=False).to_dataframe().reset_index()[["strategy", "basis", "damping", *columns]]
    (RESULTS / f"{name}.md").write_text(
        "# TEKFAC ablation (MNIST MLP, mean over seeds "
        f"{list(SEEDS)}; {args.epochs} epoch{'s' * (args.epochs != 1)} on {args.train_size} examples)\n\n"
        "basis `trace` = TEKFAC (eigenbasis of δΦ, δΨ); `kfac` = KFAC's eigenbasis (EKFAC with that damping). "
        "probe columns: the optimizer's own approximation vs the exact Fisher on a fixed batch, "
        "averaged over the probes after step 0 and the layers; NaN (inf for the error) where a seed's run had a "
        "dead layer at a probe (its exact block zero: the cosine undefined).\n\n" + markdown_table(df) + "\n")
    plot(ds, name)
    print(f"tekfac_ablation: done in {time.time() - t0:.0f} s", flush=True)
    return 0


def plot(ds: xr.Dataset, name: str = "tekfac_ablation") -> None:
    """The last epoch per damping strategy and variant (basis, λ): every seed as a point, their
    mean as a bar-free marker (a bar's baseline on a log axis, or a zoomed one, is arbitrary)."""
    final = ds.isel(epoch=-1)
    seeds = final.sizes["seed"]
    np.random.seed(0)  # seaborn's jitter draws from numpy's global generator: the same figure every time
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), layout="constrained")
    shown = ["train_loss", "test_accuracy", "probe_ng_cosine"]
    # the dashes are the table's means: none where a seed has none (a dead layer), not the other seed's value
    long, means = (frame[shown].to_dataframe().reset_index()
                   for frame in (final, final.mean("seed", skipna=False)))
    for df in (long, means):
        df["test_accuracy"] *= 100
        df["variant"] = df["basis"] + " basis, λ=" + df["damping"].map(lambda d: f"{d:g}")
    for ax, var, label in zip(axes, ("train_loss", "test_accuracy", "probe_ng_cosine"),
                              ("final train loss (log scale)", "final test accuracy (%)",
                               "NG cosine of its approximation\n(mean over probes and layers;\nnone drawn: a dead layer)")):
        sns.stripplot(long, x="strategy", y=var, hue="variant", dodge=True, alpha=0.5, ax=ax, legend=False)
        sns.pointplot(means, x="strategy", y=var, hue="variant", dodge=0.53, errorbar=None, linestyle="none",
                      markers="_", markersize=14, ax=ax, legend=ax is axes[-1])
        ax.set_xlabel("damping strategy")
        ax.set_ylabel(label)
        if var == "train_loss":  # labelled at 1, 2, 5 of each decade: the working runs lie within one
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.0, 1.0), title="")
    fig.suptitle(f"TEKFAC ablation on MNIST MLP ({ds.attrs.get('epochs')} epochs, {ds.attrs.get('train_size')} "
                 f"examples, lr {ds.attrs.get('lr')}, momentum {ds.attrs.get('momentum', MOMENTUM)})\neach of "
                 f"{seeds} seeds a dot, their mean a dash; y axes zoomed to the data")
    FIGURES.mkdir(exist_ok=True)
    fig.savefig(FIGURES / f"{name}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
