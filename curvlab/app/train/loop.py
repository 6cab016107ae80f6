"""The training loop of ``curvlab train``: metrics per epoch, probes every K steps, checkpoints.

Files in ``cfg.out``: ``metrics.nc`` (epoch × metric), ``probe.nc`` (step × layer ×
approximation), ``checkpoint.pt`` (after every epoch; ``resume=True`` continues from it).  All are
written atomically, so a run killed at any point resumes from its last finished epoch; the folder
is checked and locked first (:mod:`curvlab.app.train.run_folder`), and checkpoints are read
without running code (:mod:`curvlab.app.train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from curvlab.app import interrupts, launch
from curvlab.app.augment import augment
from curvlab.app.data import Dataset, batches, epoch_batch_sizes, fixed_batch, load_dataset, subset
from curvlab.app.messages import flag
from curvlab.app.models import make_model
from curvlab.app.models.check import check_model, large_batch_note, measured_batch_size, one_example_fails
from curvlab.app.train import parallel
from curvlab.app.train.checkpoint import check_same_run, load_checkpoint, restore, save_checkpoint
from curvlab.app.train.config import TrainConfig, TrainOptionError, check_batches, curvature_layers, make_optimizer
from curvlab.app.train.probe import Probe, normalises_otherwise_in_eval, saved_probes
from curvlab.app.train.schedule import Schedule
from curvlab.app.train.run_folder import CHECKPOINT, METRICS, PROBE, RunFolder, run_folder
from curvlab.extract.autograd import couples_examples
from curvlab.io import signals_held, write_netcdf
from curvlab.optim import KroneckerOptimizer

#: A run whose loss is non-finite this many steps in a row has diverged: it stops there (every
#: later step would be skipped or produce NaN) and its remaining epochs are recorded as NaN.
DIVERGED_AFTER = 20
#: What a change of rounding does to a run (a resume on other threads or processes): measured on
#: MNIST's CNN under KFAC, 1 against 2 processes with --fisher exact
AMPLIFIED = (", and training amplifies rounding: a Kronecker optimizer's damped inverse grew it to weights 1 % "
             "apart after one epoch of KFAC on MNIST's CNN (float64 factors)")


def _bar(iterable: Iterable, enabled: bool, **kwargs: object) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def load_data(cfg: TrainConfig) -> Dataset:
    """The configured dataset, optionally reduced to a seeded subset."""
    data = load_dataset(cfg.dataset, cfg.data_dir)
    for name, n, have in (("train_size", cfg.train_size, len(data.train_x)), ("test_size", cfg.test_size, len(data.test_x))):
        if n is not None and n > have:
            raise TrainOptionError(f"curvlab train: {name}={n} ({flag(name)}) exceeds the "
                                   f"{name.partition('_')[0]} split of {data.name} ({have} examples)")
    train_n = cfg.train_size or len(data.train_x)
    if cfg.probe_every and cfg.probe_batch_size and cfg.probe_batch_size > train_n:  # (the probe's batch: training examples)
        raise TrainOptionError(f"curvlab train: probe_batch_size={cfg.probe_batch_size} (--probe-batch-size) "
                               f"exceeds the {train_n} training examples"
                               + (" (--train-size)" if cfg.train_size else f" of {data.name}"))
    if cfg.train_size is not None or cfg.test_size is not None:
        data = subset(
            data,
            cfg.train_size or data.train_x.shape[0],
            cfg.test_size or data.test_x.shape[0],
            seed=cfg.seed,
        )
    return data


def _correct(logits: Tensor, y: Tensor) -> float:
    """Correct predictions; NaN when a logit is non-finite (argmax over NaN would say class 0)."""
    if not bool(torch.isfinite(logits).all()):
        return float("nan")
    return float((logits.argmax(1) == y).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Mean loss (``loss_fn``'s, which averages over a batch) and accuracy over ``(x, y)``."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for xb, yb in batches(x, y, max(batch_size, 512), shuffle=False):
        xb, yb = xb.to(device), yb.to(device)
        out = model(xb)
        total_loss += loss_fn(out, yb).item() * len(yb)
        correct += _correct(out, yb)
    model.train(was_training)
    return total_loss / x.shape[0], correct / x.shape[0]


#: CF attributes of metrics.nc's variables: name → (long_name, units).
METRIC_ATTRS: dict[str, tuple[str, str]] = {
    "train_loss": ("mean training loss over the epoch's batches, each before its step (parameters changing "
                   "during the epoch; not an evaluation at the epoch's end)", "1"),
    "train_accuracy": ("training accuracy over the epoch's batches, each before its step", "1"),
    "test_loss": ("mean test loss at the end of the epoch (model in eval mode)", "1"),
    "test_accuracy": ("test accuracy at the end of the epoch (model in eval mode)", "1"),
    "epoch_time": ("wall-clock time of the epoch's training steps (probes and the evaluation excluded)", "s"),
    "wall_clock": ("cumulative epoch_time up to this epoch", "s"),
    "steps": ("optimizer steps taken up to the end of the epoch", "1"),
    "skipped_steps": ("steps of the epoch skipped (non-finite loss, gradient, statistic or update)", "1"),
    "world_size": ("processes the epoch ran on", "1"),
    "lr": ("learning rate of the epoch's last step, first parameter group (--lr-schedule)", "1"),
}


def _metrics_dataset(records: list[dict[str, float]], cfg: TrainConfig, data: Dataset, diverged_at: int | None,
                     world_size: int = 1) -> xr.Dataset:
    keys = [k for k in dict.fromkeys(k for r in records for k in r) if k != "epoch"]

    def column(key: str) -> np.ndarray:
        """A count (steps, processes) as integers where every epoch has one; else floats, a key
        older records lack (checkpoints from before it was recorded) or an epoch after a
        divergence NaN."""
        values = [r.get(key, np.nan) for r in records]
        whole = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)
        return np.array(values, dtype=np.int64 if whole else float)

    ds = xr.Dataset({k: ("epoch", column(k)) for k in keys},
                    coords={"epoch": np.array([r["epoch"] for r in records], dtype=int)})
    for name, (long_name, units) in METRIC_ATTRS.items():
        if name in ds:
            ds[name].attrs.update(long_name=long_name, units=units)
    ds["epoch"].attrs["long_name"] = "epochs completed"
    ds.attrs.update(cfg.as_attrs())
    ds.attrs["data"] = data.description
    ds.attrs["num_train"] = int(data.train_x.shape[0])
    ds.attrs["num_test"] = int(data.test_x.shape[0])
    ds.attrs["world_size"] = world_size  # the latest (resumed) run's; every epoch's: the variable world_size
    if diverged_at is not None:
        ds.attrs["diverged_at_step"] = diverged_at
    return ds


def _epochs_listed(path: Path) -> int | None:
    """How many epochs the metrics file ``path`` lists (``None``: none there, or unreadable)."""
    try:
        with signals_held(), xr.open_dataset(path) as ds:
            return ds.sizes.get("epoch", 0)
    except (OSError, ValueError):
        return None


def _check_one_example_shards(cfg: TrainConfig, data: Dataset, model: nn.Module, ranks: launch.Ranks,
                              device: torch.device) -> None:
    """Refuse, before any step, batches that give a process one example when the model cannot take
    one in train mode (BatchNorm1d): torch's error came at the epoch's last batch, after the
    epoch's steps, and did not say which option made it."""
    n, world = data.train_x.shape[0], ranks.world_size
    sizes = [s for s in epoch_batch_sizes(n, cfg.batch_size) if s >= world]  # (smaller ones are skipped)
    if not any(s // world == 1 for s in sizes):
        return
    why = one_example_fails(model, data.train_x[:1].to(device))
    if why is None:
        return
    which = "every" if cfg.batch_size // world == 1 or cfg.batch_size >= n else "the last"
    over = f" over {world} processes" if world > 1 else ""
    raise ValueError(
        f"curvlab train: {which} batch of an epoch gives a process one example ({n} training examples in "
        f"batches of {cfg.batch_size}{over}), which model {cfg.model!r} cannot take in train mode ({why}); "
        "choose another --batch-size (or --train-size)"
    )


def checked_resume(cfg: TrainConfig, device: torch.device | str) -> tuple[dict, xr.Dataset | None]:
    """The checkpoint of the run in ``cfg.out`` to resume, read and checked: written with the same
    options, and its probes saved (:func:`~curvlab.app.train.probe.saved_probes`; ``None``
    without probes) — also before a command starts its processes, so a refused resume says so
    once."""
    path = cfg.out_dir / CHECKPOINT
    ckpt = load_checkpoint(path, device)
    check_same_run(path, ckpt["config"], cfg.as_attrs())
    if not cfg.probe_every:
        return ckpt, None
    probed = [0, *range(cfg.probe_every, ckpt["step"] + 1, cfg.probe_every)]  # the steps the run has probed
    return ckpt, saved_probes(cfg.out_dir / PROBE, probed)


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Path]:
    """Train ``cfg.model`` on ``cfg.dataset`` with ``cfg.optimizer``; return the written files.

    Each step: ``zero_grad``, forward and backward (inside ``optimizer.track`` for curvlab's
    optimizers, which attaches the BackPACK extension on statistics steps only), ``step``.
    After every ``probe_every`` steps the probe compares the optimizer's current approximation
    with the exact Fisher blocks on a fixed batch.

    ``cfg.out`` must not hold another run unless ``resume`` (continue it) or ``overwrite``
    (replace it); it is locked while the run writes it.

    In a process group of several ranks every rank calls it (:mod:`curvlab.app.train.parallel`);
    rank 0 alone checks and locks the output folder and writes the files.
    """
    ranks = launch.Ranks.current()
    device = parallel.rank_device(launch.resolve_device(cfg.device), ranks)
    with contextlib.ExitStack() as stack:
        folder, error = None, None
        if ranks.is_main:
            try:
                folder = stack.enter_context(run_folder(cfg.out_dir, resume=resume, overwrite=overwrite))
            except (OSError, ValueError) as err:
                error = err
        ranks.raise_together(error)  # the other ranks wait for rank 0's checks (and its last writes)
        return _train(cfg, folder, device, resume, ranks)


def _train(cfg: TrainConfig, folder: RunFolder | None, device: torch.device, resume: bool,
           ranks: launch.Ranks) -> dict[str, Path]:
    """The run; ``folder``: rank 0's (the other ranks write nothing)."""
    out = cfg.out_dir if folder is None else folder.path
    # Saturating softmaxes push float32 curvature statistics into subnormal numbers, which are
    # ~10× slower on CPUs; flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    # before loading data: a model curvlab cannot handle fails in a second (unsupported layers
    # only lose their curvature: the optimizers give them the first-order update)
    check_model(cfg.model, cfg.dataset, skip_unsupported=True, layer_uses=curvature_layers(cfg), **cfg.model_kwargs)
    check_batches(cfg, ranks.world_size)
    ckpt_path = out / CHECKPOINT
    ckpt, saved = checked_resume(cfg, device) if resume else (None, None)  # read and checked before any work
    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg.model, data.input_shape, data.num_classes, **cfg.model_kwargs).to(device)
    _check_one_example_shards(cfg, data, model, ranks, device)
    parallel.say_skipped_batch(data.train_x.shape[0], cfg.batch_size, ranks)
    net = parallel.data_parallel(model, ranks, device)  # what the training steps run
    parallel.reseed(cfg.seed, ranks)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    if not ranks.is_main:  # the same model and optimizer on every rank: rank 0 names those parameters
        warnings.filterwarnings("ignore", r".*have no Kronecker block", UserWarning)
    optimizer = make_optimizer(cfg, net)
    kronecker = isinstance(optimizer, KroneckerOptimizer)
    schedule = Schedule(optimizer, cfg.lr_schedule, cfg.epochs, cfg.warmup_epochs)
    steps_per_epoch = parallel.steps_per_epoch(len(data.train_x), cfg.batch_size, ranks.world_size)
    if cfg.batch_size > len(data.train_x) and ranks.is_main:  # (as a DataLoader would: one smaller batch)
        print(f"curvlab train: --batch-size {cfg.batch_size} exceeds the {len(data.train_x)} training examples: "
              "every step takes them all", file=sys.stderr)

    probe = None
    if cfg.probe_every:
        # by default at most the training examples there are (a --train-size below 128)
        size = cfg.probe_batch_size or min(len(data.train_x),
                                           measured_batch_size(model, data.num_classes, coupled=cfg.probe_mode == "train"))
        note = large_batch_note(model, data.num_classes, size, coupled=cfg.probe_mode == "train",
                                option="--probe-batch-size")
        if note and ranks.is_main:
            print(f"curvlab train: {note}", file=sys.stderr)
        if cfg.probe_mode == "train" and size < 2 and couples_examples(model):
            raise ValueError(f"curvlab train: probe_batch_size={size} (--probe-batch-size) with probe_mode='train' "
                             "(--probe-mode train): BatchNorm's batch statistics need at least 2 examples")
        probe_x, probe_y = ranks.shard(*fixed_batch(data, size, cfg.seed + 1))
        probe = Probe(
            probe_x.to(device),
            probe_y.to(device),
            loss_fn,
            extractor=parallel.extractor(ranks),
            writes=ranks.is_main,
            fisher=cfg.probe_fisher,
            approximations=cfg.probe_approximations,
            damping=cfg.damping,
            seed=cfg.seed,
            mode=cfg.probe_mode,
        )
        if ranks.is_main and kronecker and cfg.probe_mode == "eval" and normalises_otherwise_in_eval(model):
            print(f"curvlab train: the probe measures the model in eval mode (--probe-mode eval), where its "
                  f"BatchNorm normalises by running statistics; the optimizer's statistics come from its train-mode "
                  f"forward pass (batch statistics), so {optimizer.method}@optimizer is measured against another "
                  f"Fisher than the one it approximates (far off early in training, while the running statistics "
                  f"settle); --probe-mode train measures that one (one process)", file=sys.stderr)

    records: list[dict[str, float]] = []
    start_epoch, step, wall = 0, 0, 0.0
    diverged_at: int | None = None
    # non-finite losses or skipped steps in a row, across epochs: a run may diverge over an epoch boundary
    streak = 0
    if ckpt is not None:
        restore(ckpt_path, ckpt, model, optimizer, device)
        parallel.restore_rng(ckpt, ranks, device)
        start_epoch, step, wall, records = ckpt["epoch"], ckpt["step"], ckpt["wall_clock"], ckpt["records"]
        diverged_at, streak = ckpt.get("diverged_at"), ckpt.get("streak", 0)
        if probe is not None:
            probe.restore(saved)
        if ranks.is_main and _epochs_listed(out / METRICS) != len(records):  # ended between the two files
            write_netcdf(_metrics_dataset(records, cfg, data, diverged_at, ranks.world_size), out / METRICS)
        threads = ckpt.get("torch_threads")
        if threads not in (None, torch.get_num_threads()) and ranks.is_main:
            print(f"curvlab train: {out} was trained on {threads} torch thread(s), this run has "
                  f"{torch.get_num_threads()}: BLAS splits its sums by thread, so the resumed run rounds "
                  f"otherwise than an uninterrupted one{AMPLIFIED} (set OMP_NUM_THREADS as the run had it for a "
                  "bit-identical resume)", file=sys.stderr)
        last_world = records[-1].get("world_size") if records else None
        if last_world not in (None, ranks.world_size) and ranks.is_main:
            mc = cfg.fisher == "mc" and "fisher" not in cfg.unused_options()
            print(f"curvlab train: {out} was trained on {last_world} process(es), this run has "
                  f"{ranks.world_size}: " + ("each process draws the MC labels of its own share of a batch "
                                             "(--fisher mc), so the resumed run draws other labels than an "
                                             "uninterrupted one, and " if mc else "")
                  + f"each process sums its own share, so it rounds otherwise{AMPLIFIED}", file=sys.stderr)
        if start_epoch >= cfg.epochs and ranks.is_main:
            print(f"curvlab train: {out} holds {start_epoch} epoch(s) already: nothing to train for "
                  f"--epochs {cfg.epochs} (pass a larger --epochs to continue)", file=sys.stderr)

    if folder is not None:  # every check passed: a run being replaced goes now
        folder.replace_previous()
    if probe is not None and step == 0:
        # a sign of life: the first probe can take minutes (exact blocks of a large model) before any epoch line
        started = time.perf_counter()
        if ranks.is_main:
            print("curvlab train: probing step 0", file=sys.stderr, flush=True)
        probe.run(0, model, optimizer)
        probe.save(out / PROBE)
        if ranks.is_main:
            every = f"{cfg.probe_every} step{'s' * (cfg.probe_every > 1)}"
            print(f"curvlab train: probe of step 0 done in {time.perf_counter() - started:.1f} s (again every {every}, "
                  "outside the epochs' training time)", file=sys.stderr, flush=True)

    for epoch in range(start_epoch, cfg.epochs):
        if diverged_at is not None:
            break
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        t0 = time.perf_counter()
        loss_sum, correct, seen, skipped, index = 0.0, 0.0, 0, 0, 0
        last_lr = optimizer.param_groups[0]["lr"]
        n_batches = -(-data.train_x.shape[0] // cfg.batch_size)
        loader = batches(data.train_x, data.train_y, cfg.batch_size, shuffle=True, generator=gen)
        for xb, yb in _bar(loader, cfg.progress and ranks.is_main, total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False):
            if xb.shape[0] < ranks.world_size:
                continue  # a trailing batch too small to give every rank an example
            xb = augment(xb, cfg.augment, gen, data.name)  # (the whole batch: the same draws on any number of ranks)
            whole = xb.shape[0]
            xb, yb = ranks.shard(xb.to(device), yb.to(device))
            # DDP averages the ranks' gradients of their shards' mean losses: each weighs by its
            # share of the batch, so that unequal shards give the whole batch's mean gradient too
            weight = ranks.world_size * xb.shape[0] / whole
            optimizer.zero_grad()
            schedule.set(epoch, index, steps_per_epoch)
            index += 1
            tracking = optimizer.track(loss_fn) if kronecker else contextlib.nullcontext()
            with tracking:
                output = net(xb)
                loss = loss_fn(output, yb)
                (loss if weight == 1 else loss * weight).backward()
            done = optimizer.steps_done if kronecker else None
            last_lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            interrupts.check()  # a Ctrl-C Python discarded (in a weakref callback) stops the run here
            # a Kronecker optimizer skips a step (non-finite gradient, statistic or update) by
            # not counting it; every rank agrees (the skip decision is shared, the losses summed)
            taken = done is None or optimizer.steps_done > done
            batch_loss, batch_correct, batch_seen, finite = parallel.step_totals(
                ranks, loss.detach(), _correct(output.detach(), yb), xb.shape[0], device)
            finite = finite and taken
            skipped += not finite
            streak = 0 if finite else streak + 1
            step += 1
            loss_sum += batch_loss
            correct += batch_correct
            seen += batch_seen
            if probe is not None and step % cfg.probe_every == 0:
                t_probe = time.perf_counter()
                probe.run(step, model, optimizer)
                probe.save(out / PROBE)
                t0 += time.perf_counter() - t_probe  # probing is not training time
            if streak >= DIVERGED_AFTER:
                diverged_at = step - streak
                break
        epoch_time = time.perf_counter() - t0
        wall += epoch_time
        test_loss, test_acc = parallel.evaluate_sharded(evaluate, ranks, model, loss_fn, data.test_x, data.test_y,
                                                        cfg.batch_size, device)
        records.append(
            {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(seen, 1),
                "train_accuracy": correct / max(seen, 1),
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "epoch_time": epoch_time,
                "wall_clock": wall,
                "steps": step,
                "skipped_steps": skipped,
                "world_size": ranks.world_size,  # a resume may change it
                "lr": last_lr,
            }
        )
        rank_rng, rank_cuda_rng = parallel.rng_states(ranks, device)
        if not ranks.is_main:
            continue  # rank 0 writes the files and prints
        save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "rank_rng": rank_rng,
                "rank_cuda_rng": rank_cuda_rng,
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "epoch": epoch + 1,
                "step": step,
                "wall_clock": wall,
                "records": records,
                "diverged_at": diverged_at,
                "streak": streak,
                "config": cfg.as_attrs(),
                "torch_threads": torch.get_num_threads(),  # a resume on other threads sums otherwise
            },
        )
        # after the checkpoint: metrics.nc never lists an epoch whose weights were not saved (a
        # resume rewrites it from the checkpoint where it failed or was killed in between)
        write_netcdf(_metrics_dataset(records, cfg, data, diverged_at, ranks.world_size), out / METRICS)
        if folder is not None:
            folder.commit()  # a run it replaces is gone for good now
        if cfg.figures:
            from curvlab.app.train import figures  # matplotlib and seaborn: 1.6 s of the CLI's start

            figures.redraw(out, f"{cfg.optimizer}, {cfg.model} on {data.description}")
        # a line an epoch, with or without the progress bars (what a batch job's log keeps)
        print(
            f"epoch {epoch + 1}: train loss {records[-1]['train_loss']:.4f}, "
            f"test loss {test_loss:.4f}, test accuracy {test_acc:.4f}, {epoch_time:.1f} s of training steps",
            flush=True,
        )
        interrupts.check()  # one lost while the files were written
    if diverged_at is not None:
        warnings.warn(
            f"curvlab train: {cfg.optimizer} diverged (non-finite loss from step {diverged_at} on); "
            f"the run stopped and its remaining epochs are recorded as NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        nan = float("nan")
        records += [
            {**{k: nan for k in records[-1]}, "epoch": e + 1, "steps": step, "skipped_steps": 0}
            for e in range(len(records), cfg.epochs)
        ]
        if ranks.is_main:
            write_netcdf(_metrics_dataset(records, cfg, data, diverged_at, ranks.world_size), out / METRICS)
    paths = {"metrics": out / METRICS, "checkpoint": ckpt_path}
    if probe is not None:
        paths["probe"] = out / PROBE
    return paths
