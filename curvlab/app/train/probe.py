"""Curvature probes during training: the comparison, every K steps, on a fixed batch.

A probe measures, against the exact block on a fixed probe batch,

* the optimizer's own current approximation — the objects its last step inverted, with its
  damping and damping strategy — named ``"<method>@optimizer"`` (the next step inverts them too
  unless it brings statistics that change them: a refresh, or EKFAC's/TEKFAC's rescaling, which
  with the defaults falls on every probe step that is a multiple of 10);
* fresh approximations built from the probe batch itself (``kflr``, ``ekfac``, …), which say
  how good each approximation *could* be for the current network.

Results form a step × layer × approximation (× eig) time series.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from curvlab.app.models import MODES
from curvlab.approx import needed_kfac_flavours
from curvlab.compare.api import describe_loss, measure_extraction
from curvlab.extract import extract
from curvlab.optim import KroneckerOptimizer
from curvlab.optim.update import all_finite
from curvlab.io import read_netcdf, write_netcdf
from curvlab.stats import LayerStats


#: What a probe's ``ng_damping_dominated`` lists.
DAMPING_DOMINATED = "layers whose curvature the damping swamps (λ_max(F) < damping/100): their ng_cosine is near 1 whatever the approximation"


class Probe:
    """Runs the comparison on one fixed batch and keeps the time series.

    Args:
        inputs, targets: the probe batch (fixed for the whole run).
        loss_fn: the training loss.
        fisher: flavour of the reference block.
        approximations: fresh approximations to build from the probe batch.
        damping: λ for optimizers without one of their own (SGD, Adam).
        seed: seeds the probe's MC sampling without touching the training RNG.
        num_eigenvalues: spectrum entries stored per step.
        extractor: the extraction (default :func:`curvlab.extract`); on several ranks
            :func:`curvlab.distributed.extract`, with ``inputs``/``targets`` this rank's shard.
        writes: whether :meth:`save` writes (rank 0 of several writes, the others only measure).
        mode: the model's mode during the measurement: ``"eval"`` (BatchNorm's running statistics,
            no Dropout), or ``"train"``, the forward pass the optimizer collects its statistics on
            (BatchNorm's batch statistics coupling the probe batch's examples, Dropout's masks
            drawn under ``seed``); the running statistics are left as they were.
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        loss_fn: nn.Module,
        *,
        fisher: str = "exact",
        approximations: Sequence[str] = ("kflr", "ekfac", "tkfac", "tekfac"),
        damping: float = 1e-3,
        seed: int = 0,
        num_eigenvalues: int = 64,
        extractor: Callable[..., dict] | None = None,
        writes: bool = True,
        mode: str = "eval",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"curvlab train: probe mode {mode!r}; choose one of {MODES}")
        self.inputs, self.targets, self.loss_fn = inputs, targets, loss_fn
        self.fisher = fisher
        self.approximations = tuple(approximations)
        self.damping = damping
        self.seed = seed
        self.num_eigenvalues = num_eigenvalues
        self.extractor = extract if extractor is None else extractor
        self.writes = writes
        self.mode = mode
        self.records: list[xr.Dataset] = []

    def run(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> xr.Dataset:
        """Probe the current network; the training state (parameters, ``.grad``, RNG) is untouched.

        A network whose output on the probe batch is not finite (a diverging run) has no Fisher:
        that probe is recorded as NaN, as the training loop records the epochs of a diverged run
        (the first probe, of the initial network, raises instead: there is nothing to measure).
        """
        was_training = model.training
        model.train(self.mode == "train")
        # the optimizer's weight-sharing convention, so the fresh approximations beside its own are its kind
        kfac_approx = optimizer.options.kfac_approx if isinstance(optimizer, KroneckerOptimizer) else "expand"
        try:  # (the extraction puts BatchNorm's running statistics back, and draws under the seed)
            stats = self.extractor(
                model,
                self.loss_fn,
                self.inputs,
                self.targets,
                fisher=self.fisher,
                stats=("sqrt", "kfac", "tkfac"),
                kfac_flavours=needed_kfac_flavours(self.approximations, self.fisher),
                seed=self.seed,
                kfac_approx=kfac_approx,
                skip_unsupported=True,
                non_finite="raise" if not self.records else "propagate",  # (the global loss on several ranks)
            )
        finally:
            model.train(was_training)
        if not bool(torch.isfinite(stats.loss)):
            return self._record(self._not_finite(step))
        overflowed = [name for name, layer in stats.items() if not _finite(layer)]
        if overflowed:  # a finite loss, statistics beyond the dtype's range (a diverging run's activations)
            if not self.records:
                raise ValueError(f"curvlab train: the probe of the initial network: the statistics of layers "
                                 f"{overflowed} are not finite (NaN/inf); there is nothing to measure")
            warnings.warn(f"curvlab train: the probe at step {step}: the statistics of layers {overflowed} are not "
                          "finite (values beyond the model's dtype: a diverging run); recorded as NaN",
                          RuntimeWarning, stacklevel=2)
            return self._record(self._not_finite(step))
        damping = self.damping
        current: dict[str, dict] = {}
        own = None
        if isinstance(optimizer, KroneckerOptimizer):
            own = f"{optimizer.method}@optimizer"
            damping = optimizer.damping
            current = {layer: {own: a} for layer, a in optimizer.approximations().items()}
        # the others' strategies: measure's defaults; the optimizer's own, once it has approximations
        strategies = {own: optimizer.damping_strategy} if current else {}
        ds = measure_extraction(stats, self.approximations, damping=damping, damping_strategies=strategies,
                                num_eigenvalues=self.num_eigenvalues, given=current,
                                attrs={"probe_fisher": self.fisher, "probe_seed": self.seed, "probe_mode": self.mode,
                                       "loss": describe_loss(self.loss_fn)})
        if own is not None and own not in ds.approximation.values:
            # before the optimizer's first statistics: its entry is there, as NaN, so every probe
            # has the same approximations in the same order (and resumed runs the same attributes)
            ds = ds.reindex(approximation=[own, *ds.approximation.values])
            ds.attrs["damping_strategies"] = f"{own}={optimizer.damping_strategy};{ds.attrs['damping_strategies']}"
        ds = ds.expand_dims(step=[step])
        ds["step"].attrs["long_name"] = "optimizer steps taken before the probe"
        ds["batch_loss"] = ("step", [stats.loss.item()], {"long_name": "loss on the probe batch"})
        ds.attrs.pop("batch_loss", None)
        # per probe: the series keeps an attribute only where every probe agrees
        ds["ng_unresolved"] = ("step", [ds.attrs.pop("ng_unresolved", "none")],
                               {"long_name": "layers whose exact natural gradient float64 cannot resolve (NaN)"})
        ds["ng_damping_dominated"] = ("step", [ds.attrs.pop("ng_damping_dominated", "none")],
                                      {"long_name": DAMPING_DOMINATED})
        ds.attrs.pop("created", None)  # each probe's own time: the series would keep it only by chance
        return self._record(ds)

    def _record(self, ds: xr.Dataset) -> xr.Dataset:
        self.records.append(ds)
        return ds

    def _not_finite(self, step: int) -> xr.Dataset:
        """The probe of ``step`` as NaN: the last probe's layout, every number NaN (the loss on the
        probe batch included)."""
        last = self.records[-1]
        ds = last.copy(data={name: np.full(var.shape, np.nan) if var.dtype.kind == "f" else var.values
                             for name, var in last.data_vars.items()})
        return ds.assign_coords(step=[step])

    def dataset(self) -> xr.Dataset | None:
        """The time series so far (step × layer × approximation …)."""
        if not self.records:
            return None
        return xr.concat(self.records, dim="step", join="outer", combine_attrs="drop_conflicts",
                         data_vars="all", coords="different", compat="equals")

    def save(self, path: Path) -> None:
        """Write the time series atomically."""
        ds = self.dataset()
        if ds is not None and self.writes:
            write_netcdf(ds, path)

    def restore(self, ds: xr.Dataset) -> None:
        """Resume: keep the saved probes ``ds`` (:func:`saved_probes`: those the checkpoint's run
        has taken)."""
        if "ng_damping_dominated" not in ds:  # probes saved before curvlab recorded it
            ds = ds.assign(ng_damping_dominated=("step", ["unknown"] * ds.sizes["step"], {"long_name": DAMPING_DOMINATED}))
        self.records = [ds.isel(step=[i]) for i in range(ds.sizes["step"])]


def saved_probes(path: Path, steps: Sequence[int]) -> xr.Dataset:
    """The probes of ``steps`` saved in ``path`` (the checkpoint's run took them).

    Raises:
        ValueError: ``path`` is missing or lacks one of ``steps`` — resuming would silently drop
            earlier probes.
    """
    if not path.exists():
        raise ValueError(
            f"curvlab train: cannot resume the probes: {path} is missing (the checkpoint's run "
            f"probed steps {_steps(steps)}); put the file back, or start a new run with --overwrite"
        )
    ds = read_netcdf(path)
    saved = {int(s) for s in ds.step.values}
    missing = [s for s in steps if s not in saved]
    if missing:
        raise ValueError(
            f"curvlab train: cannot resume the probes: {path} lacks steps {_steps(missing)} of the "
            "checkpoint's run; put the right file back, or start a new run with --overwrite"
        )
    return ds.sel(step=list(steps))


def normalises_otherwise_in_eval(model: nn.Module) -> bool:
    """Whether the model's eval mode normalises otherwise than its training does: a BatchNorm
    with running statistics (eval mode reads them; training, and so an optimizer's statistics,
    the batch's).  An eval-mode probe then measures another network's Fisher than the optimizer
    approximates."""
    return any(isinstance(m, _BatchNorm) and m.running_mean is not None for m in model.modules())


def _steps(steps: Sequence[int]) -> str:
    steps = list(steps)
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}, {steps[1]}, …, {steps[-1]}"


def _finite(layer: LayerStats) -> bool:
    """Whether a layer's probe statistics (its exact root, factors, traces) are finite."""
    return all_finite([], 0.0, [], [layer]) and bool(torch.isfinite(layer.sqrt.column_norms_sq()).all())
