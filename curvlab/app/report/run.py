"""One report end to end: data → model (given weights, or briefly trained) → :func:`curvlab.compare`
→ files.

The output folder and the weights (:mod:`curvlab.app.report.weights`) are checked before any
compute; the folder is replaced as a whole at the end (:mod:`curvlab.app.report.files`).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from curvlab._options import check_int
from curvlab.app.launch import resolve_device
from curvlab.app.data import Dataset, data_source, fixed_batch, load_dataset
from curvlab.app.models import COUPLED_BATCH, MODES
from curvlab.app.options import check_label_smoothing, options_attr
from curvlab.app.report.files import REPORT_FILES, check_report_folder, write_report
from curvlab.approx import APPROXIMATIONS, EighPolicy
from curvlab.eager import eager_optimizer
from curvlab.io import PathLike
from curvlab.model_blocks import model_blocks


#: Adam steps before measuring a seeded initialisation (so its curvature is not a random init's).
DEFAULT_TRAIN_STEPS = 200


@dataclass
class ReportConfig:
    """Everything one ``curvlab report`` run does (the command line's options, with its defaults).

    Attributes:
        model: built-in model name or ``module:function`` spec.
        model_kwargs: its options (``{"hidden": (128, 64)}``: ``--hidden``), as ``curvlab train``'s.
        dataset, data_dir: the data (local files only).
        batch_size: training examples N in the measured batch (``None``: 128, or fewer for a
            large model so that the exact square roots fit in 4 GiB,
            :func:`curvlab.app.models.check.measured_batch_size`).
        fisher, mc_samples: the reference flavour (and MC samples for it and KFAC's factors).
        approximations: names from :data:`curvlab.approx.APPROXIMATIONS`.
        damping, damping_strategies: λ of the natural-gradient comparison and each
            approximation's strategy (default: the optimizers' defaults).
        tkfac_conv, top_k, num_eigenvalues: as for :func:`curvlab.compare`.
        weights: a ``curvlab train`` run folder, its ``checkpoint.pt``, or a file of
            ``torch.save(model.state_dict(), path)``: the weights measured, in place of the
            seeded initialisation (``None``); checked before any data is loaded
            (:func:`curvlab.app.report.weights.read_weights`).
        train_steps, train_batch_size, lr: the Adam steps before measuring, from the
            initialisation or the ``weights`` (0: those are measured; ``None``:
            :data:`DEFAULT_TRAIN_STEPS` from the initialisation, 0 from ``weights``).
        label_smoothing: cross-entropy's label smoothing ε ∈ [0, 1], of the warm-up's loss and
            the measured one.
        seed: seeds the model, the warm-up, the batch and the MC sampling.
        device, out_dir, progress: where it runs and writes.
        mode: the model's mode while measured: ``"eval"`` (BatchNorm uses its running
            statistics) or ``"train"`` (batch statistics: the exact blocks include the coupling
            between examples, and ``coupling.png`` shows what the Kronecker statistics, which
            ignore it, miss).
        engine, kfac_approx, skip_unsupported: as for :func:`curvlab.compare`.
        truncate_above, truncation_rank: factors wider than ``truncate_above`` are measured in
            the truncated eigenbasis the optimizers invert (``truncation_rank`` eigenpairs and a
            flat remainder; :class:`curvlab.optim.KroneckerOptions` has the same two options,
            2048 and 256 by default); 0: full bases.
    """

    model: str = "mlp"
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "digits"
    data_dir: PathLike | None = None
    weights: PathLike | None = None
    batch_size: int | None = None
    fisher: str = "exact"
    mc_samples: int = 1
    approximations: tuple[str, ...] = APPROXIMATIONS
    damping: float = 1e-3
    damping_strategies: Mapping[str, str] | None = None
    tkfac_conv: str = "exact"
    top_k: int = 10
    num_eigenvalues: int = 256
    train_steps: int | None = None
    train_batch_size: int = 128
    lr: float = 1e-3
    label_smoothing: float = 0.0
    seed: int = 0
    device: str | torch.device = "cpu"
    out_dir: PathLike = Path("runs/report")
    progress: bool = False
    mode: str = "eval"
    engine: str = "auto"
    kfac_approx: str = "expand"
    skip_unsupported: bool = False
    truncate_above: int = 0
    truncation_rank: int = 256

    def factor_eigh(self) -> EighPolicy | None:
        """The :class:`~curvlab.approx.EighPolicy` of ``truncate_above``/``truncation_rank``
        (``None``: full bases).

        Raises:
            ReportError: either is not an int, or negative (the rank: not positive)."""
        try:
            for name, least in (("truncate_above", 0), ("truncation_rank", 1)):
                check_int("curvlab report", name, getattr(self, name), least)
        except ValueError as err:
            raise ReportError(str(err)) from None
        return EighPolicy(truncate_above=self.truncate_above, rank=self.truncation_rank) if self.truncate_above else None

    def steps(self) -> int:
        """The Adam steps before measuring: ``train_steps``, by default
        :data:`DEFAULT_TRAIN_STEPS` from the initialisation and none from given ``weights``
        (those are what the user wants measured).

        Raises:
            ReportError: ``train_steps`` is not an int, or negative."""
        if self.train_steps is None:
            return DEFAULT_TRAIN_STEPS if self.weights is None else 0
        try:
            return check_int("curvlab report", "train_steps", self.train_steps, 0)
        except ValueError as err:
            raise ReportError(str(err)) from None


class ReportError(ValueError):
    """A report cannot run as configured (unknown model, unusable device, batch too large, ...)."""


def build(model_name_or_spec: str, data: Dataset, seed: int, **model_kwargs: object) -> nn.Module:
    """The model (built-in name or ``module:function``), initialised under ``seed`` without
    touching the global random state."""
    from curvlab.app.models import make_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return make_model(model_name_or_spec, data.input_shape, data.num_classes, **model_kwargs)
        except ValueError as err:
            raise ReportError(str(err)) from None


def _check_model(cfg: ReportConfig) -> None:
    """The model against curvlab, before any data: unknown models are usage errors
    (:class:`ReportError`), unsupported ones plain ``ValueError`` s naming the module."""
    from curvlab.app.models import ModelSpecError
    from curvlab.app.models.check import check_model

    try:
        check_model(cfg.model, cfg.dataset, skip_unsupported=cfg.skip_unsupported, engine=cfg.engine,
                    coupled=cfg.mode == "train", **cfg.model_kwargs)
    except ModelSpecError as err:
        raise ReportError(f"argument --model: {err}") from None


def warm_up(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Dataset,
    steps: int,
    *,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | None = None,
    progress: bool = False,
) -> float | None:
    """``steps`` Adam steps on random training mini-batches (seeded); returns the last loss.

    Only so that the curvature measured is not that of a random initialisation.  The model's
    own random draws (Dropout's masks) come from torch's random state seeded with ``seed`` for
    these steps (and restored after them): the warm-up, so the report, is reproducible.
    """
    if steps <= 0:
        return None
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        torch.manual_seed(seed + 2)
        return _warm_up(model, loss_fn, data, steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
                        progress=progress)


def _warm_up(model: nn.Module, loss_fn: nn.Module, data: Dataset, steps: int, *, batch_size: int, lr: float,
             seed: int, device: torch.device | None, progress: bool) -> float | None:
    gen = torch.Generator().manual_seed(seed + 1)
    opt = eager_optimizer(torch.optim.Adam)(model.parameters(), lr=lr)  # (torch's, no torch._dynamo)
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
        for step in range(steps):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if not bool(torch.isfinite(loss)):  # stop here: every later step would train on NaN
                raise ReportError(
                    f"curvlab report: the loss is {float(loss)} at Adam step {step + 1} of {steps} (lr {lr:g}), before "
                    "anything was measured; check the model, or lower --lr or --train-steps"
                )
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


#: curvlab 0.1's positional parameters of :func:`run_report` (deprecated).
_LEGACY_POSITIONAL = (
    "model", "dataset", "data_dir", "batch_size", "fisher", "approximations", "damping", "device", "seed",
    "out_dir", "mc_samples", "tkfac_conv", "top_k", "progress",
)


def run_report(config: ReportConfig | str | None = None, *legacy: object, **overrides: object) -> dict[str, Path]:
    """Measure every approximation on one batch of a (briefly trained) model and write a report.

    Steps: read and check the ``weights`` if given; load the dataset (local files only); build
    the model under ``seed`` and load the ``weights`` into it; warm it up for ``train_steps``
    Adam steps (by default 200 from the initialisation, so the curvature is not that of a random
    init, and none from ``weights``); draw
    ``batch_size`` training examples (seeded); run :func:`curvlab.compare` with cross-entropy
    loss (mean); write ``report.nc``, ``summary.md``, ``spectra.png``, ``errors.png`` and
    ``network.png`` into ``out_dir``.

    In a process group of several ranks (``torchrun``, ``curvlab report --nproc``) every rank
    runs this with rank 0's warmed-up model, the batch is sharded over the ranks
    (:func:`curvlab.distributed.compare`: the same Dataset, to rounding, as one process) and
    rank 0 writes the files (the other ranks return the same paths without writing).

    Args:
        config: a :class:`ReportConfig`; keyword arguments (its fields) override it.

    Returns:
        ``{"report", "summary", "spectra", "errors", "network", "manifest"}`` → written path.

    Raises:
        curvlab.app.data.DataError: data files missing or malformed (the message lists the paths).
        ReportError: unknown model, unusable device, batch larger than the training set;
            ``weights`` missing, unreadable, of another model or not fitting it (before the data
            is loaded).
        curvlab.app.outdir.OutputFolderError: ``out_dir`` is a file, not writable, or holds
            files that are not a report (checked before any compute).
        OSError: writing failed (a full disk: ``[Errno 28]``, naming the file); the previous
            report in ``out_dir`` is unchanged.
        ValueError: other bad settings (unknown approximation, flavour, damping strategy, ...).
    """
    from curvlab.app.launch import Ranks, broadcast_module, check_batch_split
    from curvlab.app.models.check import large_batch_note, measured_batch_size, one_example_fails
    from curvlab.app.report.weights import NO_WEIGHTS, read_weights
    from curvlab.compare import compare
    from curvlab.compare.api import check_comparison
    from curvlab.distributed import compare as sharded_compare

    if isinstance(config, str):  # curvlab 0.1: run_report(model, dataset, data_dir, ...)
        warnings.warn(
            "run_report with positional arguments is deprecated since curvlab 0.2; pass a ReportConfig "
            "or keyword arguments",
            DeprecationWarning,
            stacklevel=2,
        )
        overrides = {**dict(zip(_LEGACY_POSITIONAL, (config, *legacy))), **overrides}
        config = None
    elif legacy:
        raise TypeError("run_report takes a ReportConfig and keyword arguments only")
    if overrides.get("approximations") is None:
        overrides.pop("approximations", None)
    cfg = ReportConfig(**{**asdict(config or ReportConfig()), **overrides})
    if cfg.mode not in MODES:
        raise ReportError(f"mode={cfg.mode!r}; choose one of {MODES}")
    try:
        check_label_smoothing("curvlab report", cfg.label_smoothing)
    except ValueError as err:
        raise ReportError(str(err)) from None
    eigh = cfg.factor_eigh()
    train_steps = cfg.steps()
    # the comparison's settings before the data, the warm-up and the extraction (minutes on a
    # ResNet-18), not after them
    check_comparison(cfg.approximations, damping=cfg.damping, damping_strategies=cfg.damping_strategies,
                     top_k=cfg.top_k, num_eigenvalues=cfg.num_eigenvalues, eigh=eigh)
    try:
        check_batch_split("batch_size", cfg.batch_size, Ranks.current().world_size)
    except ValueError as err:
        raise ReportError(str(err)) from None
    try:
        dev = resolve_device(cfg.device)
    except ValueError as err:
        raise ReportError(str(err)) from None
    out = check_report_folder(Path(cfg.out_dir))
    start = time.perf_counter()
    _check_model(cfg)  # before loading data or training: an unsupported model fails in a second
    weights = None if cfg.weights is None else read_weights(cfg.weights, cfg.model, cfg.dataset, cfg.model_kwargs)
    data = load_dataset(cfg.dataset, cfg.data_dir)
    model = build(cfg.model, data, cfg.seed, **cfg.model_kwargs).to(dev)
    if weights is not None:
        model.load_state_dict(weights.state_dict)  # checked to fit by read_weights
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    batch_size = cfg.batch_size or measured_batch_size(model, data.num_classes, coupled=cfg.mode == "train")
    try:  # first: a batch larger than the data is refused
        x, y = fixed_batch(data, batch_size, cfg.seed)
    except ValueError as err:
        raise ReportError(str(err)) from None
    note = large_batch_note(model, data.num_classes, batch_size, coupled=cfg.mode == "train", option="--batch-size")
    if note:
        print(f"curvlab report: {note}", file=sys.stderr)
    if cfg.mode == "train" and batch_size == 1:  # before the warm-up, not after it
        why = one_example_fails(model, x.to(dev))
        if why is not None:
            raise ReportError(f"--mode train with --batch-size 1: model {cfg.model!r} cannot take one example in "
                              f"train mode ({why}); measure at least 2 examples")
    ranks = Ranks.current()
    began = time.perf_counter()
    train_loss = warm_up(
        model, loss_fn, data, train_steps, batch_size=cfg.train_batch_size, lr=cfg.lr, seed=cfg.seed,
        device=dev, progress=cfg.progress,
    )
    if train_steps and ranks.is_main:  # a batch job's log says where the time goes, bars or not
        print(f"curvlab report: {train_steps} Adam steps in {time.perf_counter() - began:.1f} s (loss {train_loss:.4f})",
              file=sys.stderr, flush=True)
    broadcast_module(model)  # several ranks: rank 0's warm-up for all, whatever rounding did elsewhere
    model.train(cfg.mode == "train")
    attrs = {
        "model": cfg.model,
        "model_options": options_attr(cfg.model_kwargs) or "none",
        "model_class": type(model).__name__,
        "num_model_params": sum(p.numel() for p in model.parameters()),
        # the blocks cover these (less any --skip-unsupported leaves out); frozen ones are not measured
        "num_trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dataset": data.name,
        "data": data.description,
        "data_dir": data_source(cfg.dataset, cfg.data_dir),
        "num_train_examples": len(data.train_x),
        "batch_size": batch_size,
        "batch_size_choice": "given" if cfg.batch_size else "default: 128 or fewer, square roots within 4 GiB",
        "batch_selection": f"torch.randperm(num_train_examples, seed={cfg.seed})[:batch_size]",
        **(NO_WEIGHTS if weights is None else weights.attrs()),
        "train_steps": train_steps,
        "train_optimizer": f"Adam(lr={cfg.lr})" if train_steps > 0 else "none",
        "train_batch_size": min(cfg.train_batch_size, len(data.train_x)) if train_steps > 0 else 0,
        "train_loss": "none" if train_loss is None else train_loss,
        "seed": cfg.seed,
        "device": str(dev),
        "model_mode": cfg.mode,
    }
    # the dataset (CIFAR-10: 0.7 GB of float32 pixels) is not needed past the batch, the warm-up
    # and the attributes: not kept through the comparison, where the peak is
    del data
    if ranks.distributed:
        if cfg.mode == "train":
            raise ReportError(f"mode='train' {COUPLED_BATCH}: run it in one process")
        x, y = ranks.shard(x, y)
    if ranks.is_main:
        blocks = model_blocks(model, skip_unsupported=cfg.skip_unsupported).blocks
        print(f"curvlab report: measuring {len(blocks)} blocks on {batch_size} examples ({cfg.fisher} Fisher, "
              f"{', '.join(cfg.approximations)})", file=sys.stderr, flush=True)
    ds = (sharded_compare if ranks.distributed else compare)(
        model,
        loss_fn,
        x.to(dev),
        y.to(dev),
        approximations=cfg.approximations,
        fisher=cfg.fisher,
        mc_samples=cfg.mc_samples,
        damping=cfg.damping,
        damping_strategies=cfg.damping_strategies,
        top_k=cfg.top_k,
        num_eigenvalues=cfg.num_eigenvalues,
        tkfac_conv=cfg.tkfac_conv,
        seed=cfg.seed,
        attrs=attrs,
        progress=cfg.progress,
        engine=cfg.engine,
        kfac_approx=cfg.kfac_approx,
        skip_unsupported=cfg.skip_unsupported,
        eigh=eigh,
    )
    ds.attrs["elapsed_seconds"] = round(time.perf_counter() - start, 3)

    if not ranks.is_main:
        return {key: out / name for key, name in REPORT_FILES.items()}
    return write_report(ds, out)
