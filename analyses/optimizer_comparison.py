"""Optimizer comparison: SGD-momentum, Adam, KFAC, EKFAC, TKFAC, TEKFAC.

Each optimizer gets the same tuning budget: eight configurations (eight learning rates for SGD
and Adam; learning rate × damping × KL-clipping threshold for the Kronecker optimizers), one
seed, one epoch; the configuration with the lowest training loss is then run with three seeds.
Results: mean ± std of train/test loss and accuracy against epochs and wall-clock, and the time
to a target test accuracy.

    python analyses/optimizer_comparison.py --setting mnist-mlp            # CPU budget
    python analyses/optimizer_comparison.py --setting cifar10-vgg --budget gpu --device cuda

Writes ``analyses/results/optimizer_comparison_<setting>.nc`` and ``.md`` and
``figures/optimizer_comparison_<setting>.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import xarray as xr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    FIGURES,
    MOMENTUM,
    PALETTE,
    RESULTS,
    RUNS,
    default_data_dir,
    first_reaching,
    grid,
    markdown_table,
    run,
    save,
)

from curvlab.app.train import TrainConfig  # noqa: E402
from curvlab.optim import OPTIMIZERS as KRONECKER  # noqa: E402

OPTIMIZERS = ("sgd", "adam", "kfac", "ekfac", "tkfac", "tekfac")

#: setting → model, dataset, model options, target test accuracy for the time-to-target table.
SETTINGS = {
    "mnist-mlp": dict(model="mlp", dataset="mnist", model_kwargs={"hidden": (128, 64)}, target=0.97),
    "mnist-cnn": dict(model="cnn", dataset="mnist", model_kwargs={}, target=0.98),
    "fashion-cnn": dict(model="cnn", dataset="fashion-mnist", model_kwargs={}, target=0.87),
    "cifar10-vgg": dict(model="vgg", dataset="cifar10", model_kwargs={}, target=0.70),
    "cifar10-resnet": dict(model="resnet", dataset="cifar10", model_kwargs={}, target=0.70),
}

#: budget → tuning run (subset, epochs) and final runs (subset, epochs, seeds).
BUDGETS = {
    # fits the one-hour CPU regeneration (all three CPU settings together)
    "cpu": dict(tune_train=None, tune_epochs=1, train=None, epochs=5, seeds=(0, 1, 2), test=None, batch=128),
    # CIFAR-10 on the CPU: a much reduced budget (5k training images, 2 epochs) — says so in the outputs
    "cpu-reduced": dict(tune_train=2500, tune_epochs=1, train=5000, epochs=2, seeds=(0, 1, 2), test=2000, batch=128),
    "full": dict(tune_train=None, tune_epochs=3, train=None, epochs=20, seeds=(0, 1, 2), test=None, batch=128),
    "gpu": dict(tune_train=None, tune_epochs=5, train=None, epochs=40, seeds=(0, 1, 2), test=None, batch=128),
}

#: Eight configurations per optimizer.  KL clipping caps a Kronecker optimizer's step whatever
#: its learning rate (ν·lr ≤ √(kl_clip / ∇ᵀF̃⁻¹∇)), so its threshold is tuned with lr and damping.
GRIDS = {
    "sgd": {"lr": (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)},
    "adam": {"lr": (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)},
    **{
        k: {"lr": (0.03, 0.1), "damping": (1e-2, 1e-1), "kl_clip": (1e-3, 1e-2)}
        for k in ("kfac", "ekfac", "tkfac", "tekfac")
    },
}
HYPERPARAMETERS = ("lr", "damping", "kl_clip")


def config(setting: str, budget: dict, optimizer: str, hp: dict, seed: int, tuning: bool, args) -> TrainConfig:
    spec = SETTINGS[setting]
    name = "-".join(f"{k}{v:g}" for k, v in hp.items())
    momentum = args.momentum if optimizer in KRONECKER else MOMENTUM  # SGD's stays 0.9
    if momentum != MOMENTUM:
        name = f"momentum{momentum:g}-{name}"
    out = RUNS / "optimizer_comparison" / setting / ("tune" if tuning else "final") / f"{optimizer}-{name}-s{seed}"
    return TrainConfig(
        model=spec["model"],
        dataset=spec["dataset"],
        data_dir=args.data_dir or default_data_dir(spec["dataset"]),
        optimizer=optimizer,
        epochs=budget["tune_epochs"] if tuning else budget["epochs"],
        batch_size=budget["batch"],
        train_size=budget["tune_train"] if tuning else budget["train"],
        test_size=budget["test"],
        seed=seed,
        device=args.device,
        out=str(out),
        progress=False,
        figures=False,  # each run's training.png, redrawn every epoch: this study draws its own figure
        model_kwargs=dict(spec["model_kwargs"]),
        momentum=momentum,
        **hp,
    )


def tune(setting: str, budget: dict, args) -> tuple[dict[str, dict], pd.DataFrame]:
    """Equal budget for every optimizer: the grid point with the lowest final train loss."""
    rows = []
    best: dict[str, dict] = {}
    for opt in OPTIMIZERS:
        for hp in grid(GRIDS[opt]):
            metrics = run(config(setting, budget, opt, hp, 0, True, args))
            loss = float(metrics.train_loss[-1])
            loss = loss if np.isfinite(loss) else np.inf
            rows.append({"optimizer": opt, **hp, "train_loss": loss,
                         "test_accuracy": float(metrics.test_accuracy[-1])})
            print(f"  tune {opt} {hp}: train loss {loss:.4f}", flush=True)
            if opt not in best or loss < best[opt]["loss"]:
                best[opt] = {"hp": hp, "loss": loss}
    columns = ["optimizer", *HYPERPARAMETERS, "train_loss", "test_accuracy"]
    return {k: v["hp"] for k, v in best.items()}, pd.DataFrame(rows, columns=columns)


def final(setting: str, budget: dict, chosen: dict[str, dict], args) -> xr.Dataset:
    runs = []
    for opt in OPTIMIZERS:
        per_seed = [run(config(setting, budget, opt, chosen[opt], s, False, args)) for s in budget["seeds"]]
        ds = xr.concat(per_seed, dim="seed", combine_attrs="drop_conflicts").assign_coords(seed=list(budget["seeds"]))
        # subsets are drawn per seed, so their descriptions differ: keep the common part
        ds.attrs["data"] = per_seed[0].attrs.get("data", "").split(" [subset")[0]
        runs.append(ds.expand_dims(optimizer=[opt]))
    ds = xr.concat(runs, dim="optimizer", combine_attrs="drop_conflicts")
    for key in HYPERPARAMETERS:
        ds[f"chosen_{key}"] = ("optimizer", [chosen[o].get(key, np.nan) for o in OPTIMIZERS])
    return ds


class _Plain(ticker.LogFormatterSciNotation):
    """A log axis's labels where matplotlib puts them (a few minor ones on an axis spanning less
    than two decades), written as plain numbers (0.04, not 4×10⁻²)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def plot(ds: xr.Dataset, setting: str, path: Path) -> None:
    """Train and test loss and accuracy against epochs and wall-clock, mean ± std over seeds."""
    sns.set_theme(style="whitegrid", context="notebook")
    panels = (("train_loss", "train loss"), ("test_loss", "test loss"),
              ("train_accuracy", "train accuracy (%)"), ("test_accuracy", "test accuracy (%)"))
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 13.5), layout="constrained")
    seeds = ds.sizes["seed"]
    names = {}
    for opt in ds.optimizer.values:
        lost = n_diverged(ds.train_loss.sel(optimizer=opt).values[:, -1])
        names[opt] = f"{opt} ({lost} of {seeds} diverged)" if lost else opt
    for row, (var, label) in enumerate(panels):
        for opt in ds.optimizer.values:
            sub = ds.sel(optimizer=opt)
            scale = 100 if var.endswith("accuracy") else 1
            mean, std = scale * sub[var].mean("seed").values, scale * sub[var].std("seed").values
            for col, x in enumerate((sub.epoch.values, sub.wall_clock.mean("seed").values)):
                ax = axes[row, col]
                ax.plot(x, mean, marker="o", ms=4, color=PALETTE[opt], label=names[opt])
                ax.fill_between(x, mean - std, mean + std, color=PALETTE[opt], alpha=0.2, lw=0)
        for col in range(2):
            ax = axes[row, col]
            ax.set_xlabel("epoch" if col == 0 else "training wall-clock (s, mean over seeds)")
            ax.set_ylabel(label)
            low, high = ax.get_ylim()
            if var.endswith("loss") and low > 0 and high / low > 3:  # a narrower range reads better linear
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
                ax.yaxis.set_minor_formatter(_Plain(labelOnlyBase=False, minor_thresholds=(2, 0.4)))
            if col == 0:
                ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, title="optimizer", loc="outside lower center", ncols=len(labels))
    budget = ds.attrs.get("budget", "")
    momentum = float(ds.attrs.get("kronecker_momentum", MOMENTUM))
    fig.suptitle(f"{setting}: {ds.attrs.get('data', '')} — mean ± std (ddof 0) over {seeds} seeds\n"
                 f"momentum: SGD {MOMENTUM:g}, Kronecker optimizers {momentum:g}; y axes zoomed to the data"
                 + (f"\nREDUCED CPU budget ({BUDGETS[budget]['train']} images, {BUDGETS[budget]['epochs']} epochs)"
                    if budget == "cpu-reduced" else ""))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def n_diverged(final: np.ndarray) -> int:
    """How many seeds diverged: a diverged run's metrics are NaN from its diverging epoch on."""
    return int((~np.isfinite(final)).sum())


def mean_std(values: np.ndarray) -> str:
    """``mean ± std`` over seeds; seeds that diverged (NaN) are left out and counted, not hidden."""
    lost = n_diverged(values)
    if lost == values.size:
        return f"diverged ({lost} of {lost} seeds)"
    finite = values[np.isfinite(values)]
    text = f"{finite.mean():.4f} ± {finite.std():.4f}"
    return text + (f" ({lost} of {values.size} seeds diverged)" if lost else "")


def summary(ds: xr.Dataset, tuning: pd.DataFrame, setting: str, budget_name: str) -> str:
    target = SETTINGS[setting]["target"]
    lines = [f"# Optimizer comparison: {setting} ({budget_name} budget)", "",
             f"Data: {ds.attrs.get('data', '')}. Seeds: {[int(s) for s in ds.seed.values]}. "
             f"Target test accuracy for time-to-target: {target:.2f}. Heavy-ball momentum: SGD {MOMENTUM:g}, "
             f"the Kronecker optimizers {ds.attrs.get('kronecker_momentum', MOMENTUM):g}. Final values: mean ± "
             "standard deviation over the seeds (population, ddof = 0, as the figure's bands).", "",
             "| optimizer | lr | damping | KL clip | final train loss | final test loss | final test accuracy "
             "| epochs to target | seconds to target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for opt in ds.optimizer.values:
        sub = ds.sel(optimizer=opt)
        acc = sub.test_accuracy.mean("seed").values
        wall = sub.wall_clock.mean("seed").values
        lines.append(
            f"| {opt} | {float(sub.chosen_lr):g} | {float(sub.chosen_damping):g} | {float(sub.chosen_kl_clip):g} | "
            f"{mean_std(sub.train_loss[:, -1].values)} | {mean_std(sub.test_loss[:, -1].values)} | "
            f"{mean_std(sub.test_accuracy[:, -1].values)} | "
            f"{first_reaching(acc, sub.epoch.values, target):g} | {first_reaching(acc, wall, target):.1f} |"
        )
    lines += ["", "Tuning runs (seed 0, one epoch; selection by the epoch's mean training loss; "
              "nan: not a hyperparameter of that optimizer; inf: diverged):", "",
              markdown_table(tuning), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=SETTINGS, default="mnist-mlp")
    parser.add_argument("--budget", choices=BUDGETS, default="cpu")
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: ../shared/data/<dataset> when present)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure from analyses/results")
    parser.add_argument("--momentum", type=float, default=MOMENTUM,
                        help="the Kronecker optimizers' heavy-ball momentum (default: %(default)s, the committed "
                             "results'; other values write optimizer_comparison_<setting>_momentum<value>.*)")
    args = parser.parse_args(argv)
    name = f"optimizer_comparison_{args.setting}" + ("" if args.momentum == MOMENTUM else f"_momentum{args.momentum:g}")
    FIGURES.mkdir(exist_ok=True)  # also for --replot on a clone without figures/
    if args.replot:  # the figure and the table, from the results file
        ds = xr.open_dataset(RESULTS / f"{name}.nc").load()
        tuning = ds[[v for v in ds.data_vars if v.startswith("tuning_")]].to_dataframe().reset_index(drop=True)
        (RESULTS / f"{name}.md").write_text(summary(ds, tuning.rename(columns=lambda c: c[len("tuning_"):]),
                                                    args.setting, ds.attrs.get("budget", args.budget)))
        plot(ds, args.setting, FIGURES / f"{name}.png")
        return 0
    budget = BUDGETS[args.budget]
    t0 = time.time()
    chosen, tuning = tune(args.setting, budget, args)
    ds = final(args.setting, budget, chosen, args)
    ds.attrs.update({"setting": args.setting, "budget": args.budget, "kronecker_momentum": args.momentum,
                     "selection": "lowest mean training loss over the tuning epoch, seed 0",
                     "budget_details": str(budget), "grids": str(GRIDS)})
    # the tuning runs behind the choice, one row per configuration
    tuned = tuning.rename(columns=lambda c: f"tuning_{c}").to_xarray().rename(index="tuning_run")
    ds = ds.merge(tuned.drop_vars("tuning_run"))
    save(ds, name)
    (RESULTS / f"{name}.md").write_text(summary(ds, tuning, args.setting, args.budget))
    plot(ds, args.setting, FIGURES / f"{name}.png")
    print(f"{name}: done in {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
