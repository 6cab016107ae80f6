"""The optimizer-comparison study end to end on a tiny budget (digits), outputs redirected."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

ANALYSES = Path(__file__).resolve().parent.parent / "analyses"


@pytest.fixture
def comparison(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ANALYSES))
    common = importlib.import_module("common")
    oc = importlib.import_module("optimizer_comparison")
    for module in (common, oc):
        monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
        monkeypatch.setattr(module, "FIGURES", tmp_path / "figures")
        monkeypatch.setattr(module, "RUNS", tmp_path / "runs")
    monkeypatch.setitem(oc.SETTINGS, "digits-mlp", dict(model="mlp", dataset="digits", model_kwargs={"hidden": (16,)}, target=0.5))
    monkeypatch.setitem(oc.BUDGETS, "tiny", dict(tune_train=300, tune_epochs=1, train=400, epochs=2, seeds=(0, 1), test=200, batch=50))
    grids = {
        "sgd": {"lr": (0.1, 1e30)},  # the second one diverges and must not be chosen
        "adam": {"lr": (1e-3, 1e-2)},
        **{k: {"lr": (0.1,), "damping": (1e-1,), "kl_clip": (1e-3, 1e-2)} for k in ("kfac", "ekfac", "tkfac", "tekfac")},
    }
    monkeypatch.setattr(oc, "GRIDS", grids)
    yield oc, tmp_path
    sys.modules.pop("optimizer_comparison", None)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_optimizer_comparison_end_to_end(comparison, monkeypatch: pytest.MonkeyPatch) -> None:
    oc, tmp = comparison
    assert oc.main(["--setting", "digits-mlp", "--budget", "tiny"]) == 0
    ds = xr.open_dataset(tmp / "results" / "optimizer_comparison_digits-mlp.nc").load()
    assert list(ds.optimizer.values) == list(oc.OPTIMIZERS) and ds.sizes["seed"] == 2 and ds.sizes["epoch"] == 2
    assert np.isfinite(ds.train_loss).all() and np.isfinite(ds.wall_clock).all()
    # every grid point was tried once, and the choice is the tuning run with the lowest loss
    assert ds.sizes["tuning_run"] == sum(len(oc.grid(g)) for g in oc.GRIDS.values())
    for opt in oc.OPTIMIZERS:
        runs = ds.tuning_optimizer.values == opt
        best = int(np.argmin(ds.tuning_train_loss.values[runs]))
        for key in oc.HYPERPARAMETERS:
            np.testing.assert_equal(float(ds[f"chosen_{key}"].sel(optimizer=opt)), ds[f"tuning_{key}"].values[runs][best])
    assert np.isinf(ds.tuning_train_loss.values[(ds.tuning_optimizer.values == "sgd") & (ds.tuning_lr.values > 1)]).all()
    assert float(ds.chosen_lr.sel(optimizer="sgd")) == 0.1
    assert np.isnan(float(ds.chosen_kl_clip.sel(optimizer="adam")))
    assert (tmp / "figures" / "optimizer_comparison_digits-mlp.png").stat().st_size > 10_000
    summary = (tmp / "results" / "optimizer_comparison_digits-mlp.md").read_text()
    assert "| tekfac |" in summary and "KL clip" in summary and "(population, ddof = 0" in summary
    # --replot writes the same table again from the results file alone
    (tmp / "results" / "optimizer_comparison_digits-mlp.md").unlink()
    assert oc.main(["--setting", "digits-mlp", "--budget", "tiny", "--replot"]) == 0
    assert (tmp / "results" / "optimizer_comparison_digits-mlp.md").read_text() == summary
    # run again, every finished run is reused (an interrupted study continues), and the result says its commit
    common = sys.modules["common"]

    def train(cfg):
        raise AssertionError(f"trained {cfg.out} again")

    monkeypatch.setattr(common, "train", train)
    assert oc.main(["--setting", "digits-mlp", "--budget", "tiny"]) == 0
    again = xr.open_dataset(tmp / "results" / "optimizer_comparison_digits-mlp.nc").load()
    assert again.attrs["analysis_git_commit"] and again.attrs["analysis_created"] >= ds.attrs["analysis_created"]
    assert again.drop_vars("wall_clock", errors="ignore").equals(ds.drop_vars("wall_clock", errors="ignore"))


def test_summary_counts_diverged_seeds_instead_of_hiding_them(comparison) -> None:
    oc, _ = comparison
    assert oc.mean_std(np.array([1.0, 3.0])) == "2.0000 ± 1.0000"
    assert oc.mean_std(np.array([1.0, np.nan, 3.0])) == "2.0000 ± 1.0000 (1 of 3 seeds diverged)"
    assert oc.mean_std(np.array([np.nan, np.nan])) == "diverged (2 of 2 seeds)"


@pytest.mark.parametrize("data_dir", [None, "elsewhere/mnist"])
def test_approximation_quality_trains_on_the_data_it_is_given(data_dir: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--data-dir`` gave TrainConfig ``dataset`` twice (a TypeError before any training)."""
    monkeypatch.syspath_prepend(str(ANALYSES))
    aq = importlib.import_module("approximation_quality")
    seen = []

    def run(cfg):  # the configuration the study trains with (or reuses), and no training
        seen.append(cfg)
        raise KeyboardInterrupt

    monkeypatch.setattr(aq, "run", run)
    with pytest.raises(KeyboardInterrupt):
        aq.main(["--setting", "mnist-mlp", *(["--data-dir", data_dir] if data_dir else [])])
    assert seen[0].dataset == "mnist" and seen[0].model == "mlp"
    assert Path(seen[0].data_dir).resolve() == Path(data_dir or aq.default_data_dir("mnist")).resolve()


def test_the_ablation_at_another_budget_keeps_the_committed_results(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A 1-epoch run on 1000 examples overwrote tekfac_ablation.{nc,md,png}, which the README quotes,
    and its 8 steps left the probes (every 100) empty: another budget writes under its own name, and
    one with no probe after step 0 is refused before training."""
    monkeypatch.syspath_prepend(str(ANALYSES))
    ablation = importlib.import_module("tekfac_ablation")
    assert ablation.name_of(3, 12000) == "tekfac_ablation" and ablation.name_of(1, 20000) == "tekfac_ablation_1ep20000"
    trained = []

    def run(cfg):  # the folder the study trains into, and no training
        trained.append(cfg.out_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(ablation, "run", run)
    with pytest.raises(SystemExit):
        ablation.main(["--epochs", "1", "--train-size", "1000"])
    assert "give 8 steps, fewer than the 100 between probes" in capsys.readouterr().err and not trained
    with pytest.raises(KeyboardInterrupt):
        ablation.main(["--epochs", "1", "--train-size", "20000"])
    assert trained[0].parent.name == "tekfac_ablation_1ep20000"
