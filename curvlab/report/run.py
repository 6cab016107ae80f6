"""One report end to end: data → model (briefly trained) → :func:`curvlab.compare.compare` → files."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

import torch
from torch import nn

from curvlab.data import Dataset, load_dataset

PathLike = Union[str, os.PathLike]

DEFAULT_BATCH_SIZE = 128
DEFAULT_TRAIN_STEPS = 200
DEFAULT_TRAIN_BATCH_SIZE = 128
DEFAULT_LR = 1e-3
DEFAULT_OUT = Path("runs/report")

#: Files of a report, by key of :func:`run_report`'s result.
REPORT_FILES = {
    "report": "report.nc",
    "summary": "summary.md",
    "spectra": "spectra.png",
    "errors": "errors.png",
    "network": "network.png",
}


class ReportError(ValueError):
    """A report cannot run as configured (unknown model, unusable device, batch too large, ...)."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, checked to be usable here.

    Raises:
        ReportError: malformed name, or CUDA/MPS asked for but not available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ReportError(f"invalid device {device!r}: {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ReportError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ReportError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ReportError(f"device {device!r} requested but MPS is not available")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ReportError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def build(model_name_or_spec: str, data: Dataset, seed: int) -> nn.Module:
    """The model (built-in name or ``module:function``), initialised under ``seed`` without
    touching the global random state."""
    from curvlab.models import make_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return make_model(model_name_or_spec, data.input_shape, data.num_classes)
        except ValueError as err:
            raise ReportError(str(err)) from None


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Dataset,
    steps: int,
    *,
    batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    device: torch.device | None = None,
    progress: bool = False,
) -> float | None:
    """``steps`` Adam steps on random training mini-batches (seeded); returns the last loss.

    Only so that the curvature measured is not that of a random initialisation.
    """
    if steps <= 0:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.train_x)
    batch_size = min(batch_size, n)
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train", unit="step", leave=False)
    loss = None
    order = torch.randperm(n, generator=gen)
    pos = 0
    try:
        for _ in range(steps):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
    opt.zero_grad(set_to_none=True)
    return None if loss is None else float(loss.item())


def measurement_batch(data: Dataset, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` training examples drawn without replacement under ``seed``."""
    n = len(data.train_x)
    if not 1 <= batch_size <= n:
        raise ReportError(f"batch size {batch_size} must be in [1, {n}] (training examples of {data.name})")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:batch_size]
    return data.train_x[idx], data.train_y[idx]


def run_report(
    model_name_or_spec: str = "mlp",
    dataset: str = "digits",
    data_dir: PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    fisher: str = "exact",
    approximations: Iterable[str] | None = None,
    damping: float = 1e-3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    out_dir: PathLike = DEFAULT_OUT,
    mc_samples: int = 1,
    tkfac_conv: str = "exact",
    top_k: int = 10,
    progress: bool = False,
    *,
    damping_strategies: Mapping[str, str] | None = None,
    num_eigenvalues: int = 256,
    train_steps: int = DEFAULT_TRAIN_STEPS,
    train_batch_size: int = DEFAULT_TRAIN_BATCH_SIZE,
    lr: float = DEFAULT_LR,
) -> dict[str, Path]:
    """Measure every approximation on one batch of a (briefly trained) model and write a report.

    Steps: load ``dataset`` (local files only); build the model under ``seed``; train it for
    ``train_steps`` Adam steps (learning rate ``lr``, mini-batches of ``train_batch_size``) so
    the curvature is not that of a random init; draw ``batch_size`` training examples (seeded);
    run :func:`curvlab.compare.compare` with cross-entropy loss (mean); write ``report.nc``,
    ``summary.md``, ``spectra.png``, ``errors.png`` and ``network.png`` into ``out_dir``.

    Returns:
        ``{"report", "summary", "spectra", "errors", "network"}`` → written path.

    Raises:
        curvlab.data.DataError: data files missing or malformed (the message lists the paths).
        ReportError: unknown model, unusable device, batch larger than the training set.
        ValueError: other bad settings (unknown approximation, flavour, damping strategy, ...).
    """
    from curvlab.approx import APPROXIMATIONS
    from curvlab.compare import compare
    from curvlab.report.figures import plot_errors, plot_network, plot_spectra
    from curvlab.report.files import write_netcdf, write_summary

    dev = resolve_device(device)
    names = list(APPROXIMATIONS if approximations is None else approximations)
    start = time.perf_counter()
    data = load_dataset(dataset, data_dir)
    model = build(model_name_or_spec, data, seed).to(dev)
    loss_fn = nn.CrossEntropyLoss()
    x, y = measurement_batch(data, batch_size, seed)
    train_loss = train(
        model, loss_fn, data, train_steps, batch_size=train_batch_size, lr=lr, seed=seed, device=dev, progress=progress
    )
    model.eval()
    attrs = {
        "model": model_name_or_spec,
        "model_class": type(model).__name__,
        "num_model_params": sum(p.numel() for p in model.parameters()),
        "dataset": data.name,
        "data": data.description,
        "data_dir": "none" if data_dir is None else str(data_dir),
        "num_train_examples": len(data.train_x),
        "batch_size": batch_size,
        "batch_selection": f"torch.randperm(num_train_examples, seed={seed})[:batch_size]",
        "train_steps": train_steps,
        "train_optimizer": f"Adam(lr={lr})" if train_steps > 0 else "none",
        "train_batch_size": min(train_batch_size, len(data.train_x)) if train_steps > 0 else 0,
        "train_loss": "none" if train_loss is None else train_loss,
        "seed": seed,
        "device": str(dev),
    }
    ds = compare(
        model,
        loss_fn,
        x.to(dev),
        y.to(dev),
        approximations=names,
        fisher=fisher,
        mc_samples=mc_samples,
        damping=damping,
        damping_strategies=damping_strategies,
        top_k=top_k,
        num_eigenvalues=num_eigenvalues,
        tkfac_conv=tkfac_conv,
        seed=seed,
        attrs=attrs,
        progress=progress,
    )
    ds.attrs["elapsed_seconds"] = round(time.perf_counter() - start, 3)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / name for key, name in REPORT_FILES.items()}
    write_netcdf(ds, paths["report"])
    plot_spectra(ds, paths["spectra"])
    plot_errors(ds, paths["errors"])
    plot_network(ds, paths["network"])
    figures = {
        "Eigenvalues per layer": REPORT_FILES["spectra"],
        "Per-layer errors": REPORT_FILES["errors"],
        "Whole network": REPORT_FILES["network"],
    }
    write_summary(ds, paths["summary"], figures=figures)
    return paths
