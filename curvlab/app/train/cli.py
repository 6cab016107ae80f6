"""``curvlab train``: argument parsing only; the work is in :mod:`curvlab.app.train.loop`.

The optimizer options are generated from :class:`curvlab.optim.KroneckerOptions` (names, types,
choices, defaults and help texts are defined there once).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from curvlab.app.models import MODELS, MODES
from curvlab.app.allocator import add_malloc_option
from curvlab.app.augment import AUGMENTATIONS, crop_padding
from curvlab.app.data import DATASETS, canonical_name
from curvlab.app.launch import add_nproc_option
from curvlab.app.messages import flag, print_error
from curvlab.app.options import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    LABEL_SMOOTHING_HELP,
    approximations,
    dataset,
    exit_stopped,
    hidden_help,
    hidden_options,
    label_smoothing,
    model,
    nonnegative_int,
    positive_int,
    widths,
)
from curvlab.app.seed import add_seed_option
from curvlab.app.train.config import (FIRST_ORDER, OPTIMIZERS, TrainConfig, TrainOptionError, check_batches,
                                      curvature_layers, default_lr, default_momentum)
from curvlab.app.train.schedule import LR_SCHEDULES
from curvlab.approx import APPROXIMATIONS
from curvlab.optim import KroneckerOptions
from curvlab.optim.options import KL_CLIP_OFF
from curvlab.stats import FLAVOURS

_DEFAULT = TrainConfig()


#: The optimizer options as the command line spells them (one that names another's prefix,
#: --damping of --damping-strategy, is that option, not an abbreviation).
_OPTIONS = {flag(f.name) for f in fields(KroneckerOptions)}

#: The parser's defaults where they are not :class:`KroneckerOptions`' (per optimizer, resolved
#: by :class:`TrainConfig`).
_CLI_DEFAULTS = {"lr": None, "momentum": None}


def _given(args: argparse.Namespace, name: str) -> bool:
    """Whether ``--name`` is on the command line (``args.argv``; an abbreviation too): given at its
    default value, it is given all the same."""
    option = flag(name)
    for token in getattr(args, "argv", ()):
        head = token.split("=", 1)[0]
        if head == option or (head not in _OPTIONS and head.startswith("--") and len(head) > 2 and option.startswith(head)):
            return True
    return False


def add_optimizer_options(group: argparse._ArgumentGroup) -> None:
    """One ``--option`` per field of :class:`~curvlab.optim.KroneckerOptions`."""
    for f in fields(KroneckerOptions):
        meta = dict(f.metadata)
        default = _CLI_DEFAULTS.get(f.name, f.default if f.default is not MISSING else None)
        help_text = meta.pop("help")
        if f.name == "lr":
            help_text += f" (default: {default_lr('sgd')} sgd, {default_lr('adam')} adam, {default_lr('tekfac')} Kronecker optimizers)"
        elif f.name == "momentum":
            help_text += f" (default: {default_momentum('sgd')} sgd, {default_momentum('tekfac')} Kronecker optimizers)"
        elif f.name == "damping":
            help_text += " (default: %(default)s; with sgd/adam and --probe-every: the probe's λ)"
        elif f.name == "kl_clip":
            # a clipped step's length is set by κ alone: lr cancels from lr·ν
            help_text = help_text.replace("None (CLI: 0)", "0")
            help_text += (f" (default: {f.default}); the update is scaled by ν = min(1, √(κ / Σ lr²⟨∇̃, ∇⟩)), so "
                          "on steps it clips, --lr has no effect on their length")
        elif f.name == "damping_strategy":
            pass  # its help names its default (the method's own)
        else:
            help_text += " (default: %(default)s)"
        group.add_argument(flag(f.name), default=default, help=help_text, **meta)


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``curvlab train`` and its options."""
    p = subparsers.add_parser(
        "train",
        help="train a model with SGD, Adam or a Kronecker optimizer, probing the curvature",
        description=(
            "Train a built-in model (or package.module:function / path/to/file.py:function) on a dataset with the chosen optimizer. "
            "Writes metrics.nc (per epoch: train/test loss and accuracy, wall-clock), probe.nc "
            "(with --probe-every K: the comparison of the optimizer's own approximation and "
            "fresh ones against the exact Fisher blocks on a fixed batch, every K steps) and "
            "checkpoint.pt (every epoch; --resume continues from it), and after every epoch the figures "
            "training.png and, with --probe-every, probe.png."
        ),
    )
    d = _DEFAULT
    run = p.add_argument_group("model, data and run")
    run.add_argument("--model", type=model, default=d.model, help=f"built-in model ({', '.join(MODELS)}) or a user model 'package.module:function' / "
                     "'path/to/file.py:function' (default: %(default)s)")
    run.add_argument("--hidden", type=widths, default=None,
                     help=hidden_help())
    run.add_argument("--dataset", type=dataset, default=d.dataset, metavar="{" + ",".join(DATASETS) + "}",
                     help="digits (embedded), mnist, fashion-mnist, cifar10 (default: %(default)s)")
    run.add_argument("--data-dir", default=d.data_dir, help="folder with the dataset's files (needed for mnist and cifar10; "
                     "fashion-mnist defaults to /usr/share/datasets/fashion-mnist; not for digits)")
    run.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS, type=str.lower,
                     help="optimizer, in any case (default: %(default)s)")
    run.add_argument("--epochs", type=positive_int, default=d.epochs, help="epochs to train (default: %(default)s)")
    run.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="mini-batch size (default: %(default)s)")
    run.add_argument("--label-smoothing", type=label_smoothing, default=d.label_smoothing, help=LABEL_SMOOTHING_HELP)
    run.add_argument("--augment", default=d.augment, choices=AUGMENTATIONS,
                     help=f"training-batch augmentation: crop (a random window of the image framed by black, {crop_padding(32)} "
                          "pixels on CIFAR-10 and MNIST, 1 on digits) or crop-flip (also mirrored left to right half the "
                          "time: the CIFAR ResNet recipes'; warned of on digits and MNIST, where a mirrored digit is another glyph); drawn from the seed and the epoch, so a "
                          "resumed run gets the same batches (default: %(default)s)")
    run.add_argument("--lr-schedule", default=d.lr_schedule, choices=LR_SCHEDULES,
                     help="learning-rate schedule over the run's epochs: constant, cosine (annealed towards 0 over "
                          "the steps after the warm-up, as CosineAnnealingLR) or step (×0.1 after ⌈E/2⌉ epochs, ×0.01 "
                          "after ⌈3E/4⌉, E = --epochs); a resume keeps --epochs under cosine and step (default: %(default)s)")
    run.add_argument("--warmup-epochs", type=nonnegative_int, default=d.warmup_epochs,
                     help="ramp the learning rate up linearly to --lr over the steps of this many epochs, then follow "
                          "--lr-schedule (default: %(default)s)")
    run.add_argument("--train-size", type=positive_int, default=d.train_size, help="train on a seeded subset of this many examples (default: all)")
    run.add_argument("--test-size", type=positive_int, default=d.test_size, help="evaluate on a seeded subset of this many examples (default: all)")
    run.add_argument("--device", default=d.device, help="cpu or cuda (default: %(default)s)")
    add_seed_option(run, d.seed, "seeds the model init, the data subsets, the batches, the probe and MC sampling")
    run.add_argument("--out", default=d.out, help="output folder (default: %(default)s)")
    run.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.pt")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in OUT, kept aside until the new run saves its first checkpoint (without it, such a folder is refused)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--no-figures", action="store_true",
                     help="do not redraw training.png (loss, accuracy, learning rate) and, with --probe-every, "
                          "probe.png (the approximations' errors over the steps) after every epoch")
    add_nproc_option(run, "--batch-size is the global batch, split over them (DistributedSampler-like)")
    add_malloc_option(run)
    add_optimizer_options(p.add_argument_group("optimizer (SGD takes lr, momentum, weight decay; Adam lr, weight decay)"))
    probe = p.add_argument_group("curvature probe")
    probe.add_argument("--probe-every", type=nonnegative_int, default=d.probe_every, help="run the curvature comparison every K steps (default: %(default)s, off)")
    probe.add_argument("--probe-batch-size", type=positive_int, default=d.probe_batch_size, help="examples in the fixed probe batch (default: 128, fewer for large models so that the exact square roots fit in 4 GiB, and at most the training examples)")
    probe.add_argument("--probe-fisher", default=d.probe_fisher, choices=FLAVOURS, help="flavour of the probe's reference blocks (default: %(default)s)")
    probe.add_argument("--probe-approximations", type=approximations, default=",".join(d.probe_approximations), help=f"fresh approximations measured at each probe, from {','.join(APPROXIMATIONS)}, or all (default: %(default)s)")
    probe.add_argument("--probe-mode", default=d.probe_mode, choices=MODES, help="the model's mode while probed: eval (BatchNorm's running statistics, no Dropout) or train (the forward pass the optimizer's statistics come from: batch statistics coupling the probe batch's examples, Dropout masks fixed by --seed; the running statistics are put back; one process only) (default: %(default)s)")
    p.set_defaults(handler=run_train)
    return p


def config_from_args(args: argparse.Namespace, check_unused: bool = True) -> TrainConfig:
    """The :class:`TrainConfig` the parsed options describe (refusing an option the run does not
    use, unless not ``check_unused``)."""
    model_kwargs = hidden_options("curvlab train", args.model, args.hidden)
    probe_approx = args.probe_approximations
    probe_options = [option for option, given in (
        ("--probe-batch-size", args.probe_batch_size is not None),
        ("--probe-fisher", args.probe_fisher != _DEFAULT.probe_fisher),
        ("--probe-approximations", probe_approx != _DEFAULT.probe_approximations),
        ("--probe-mode", args.probe_mode != _DEFAULT.probe_mode),
    ) if given]
    if probe_options and not args.probe_every:
        raise ValueError(f"curvlab train: {', '.join(probe_options)} given but not --probe-every: no probe would run")
    if args.data_dir is not None and canonical_name(args.dataset) == "digits":  # (a resume would compare it)
        raise ValueError("curvlab train: --data-dir given, which --dataset digits does not read (scikit-learn's "
                         "load_digits is embedded)")
    options = {f.name: getattr(args, f.name) for f in fields(KroneckerOptions)}
    # given: on the command line, or (args built otherwise) away from the parser's default
    given = [f.name for f in fields(KroneckerOptions)
             if _given(args, f.name) or options[f.name] != _CLI_DEFAULTS.get(f.name, f.default)]
    options["kl_clip"] = options["kl_clip"] or None  # 0 disables clipping
    try:
        cfg = _config(args, options, model_kwargs, probe_approx)
    except ValueError as err:  # the fields' names as the options' (--stat-decay 1.0 …)
        raise ValueError(_as_options(str(err))) from None
    if cfg.lr == 0:
        raise ValueError("curvlab train: --lr 0 would leave the weights as they are (every update is lr times a "
                         "direction); give a positive --lr")
    unused = cfg.unused_options() if check_unused else set()
    ignored = [flag(name) for name in given if name in unused]
    if ignored:
        why = ""
        if cfg.optimizer in FIRST_ORDER:
            takes = [*FIRST_ORDER[cfg.optimizer], *(("damping",) if cfg.probe_every else ())]
            why = f" (it takes {', '.join(flag(n) for n in takes)}"
            why += "; --damping is the probe's λ, with --probe-every)" if "damping" in given else ")"
        elif "mc_samples" in unused and "mc_samples" in given:
            why = f" (--mc-samples: with --fisher mc only, not --fisher {cfg.fisher})"
        raise ValueError(f"curvlab train: {', '.join(ignored)} given, which --optimizer {cfg.optimizer} does not use{why}")
    return cfg


def _resume_refusal(args: argparse.Namespace) -> ValueError | None:
    """With ``--resume``, the refusal of the run in ``--out`` (written with other options, or no
    checkpoint of curvlab's), which comes before a refused option: resuming a TEKFAC run with
    ``--optimizer kfac`` and its ``--scale-interval`` was refused for the option KFAC does not use,
    a detour before the message that explains both."""
    if not args.resume or args.overwrite:
        return None
    from curvlab.app.train.checkpoint import CheckpointError
    from curvlab.app.train.loop import checked_resume
    from curvlab.app.train.run_folder import CHECKPOINT

    try:
        cfg = config_from_args(args, check_unused=False)
        if (cfg.out_dir / CHECKPOINT).is_file():  # (none there: the refused option's message stands)
            checked_resume(cfg, "cpu")
    except CheckpointError as err:
        return err
    except ValueError:  # a refused value: its own message stands
        pass
    return None


def _stopped(signal_name: str, out: Path) -> int:
    """Say in one line that the run was stopped and what it leaves in ``out`` (how to go on);
    return the exit status."""
    from curvlab.app.train.run_folder import CHECKPOINT, RUN_FILES

    if (out / CHECKPOINT).is_file():
        left = f"resume with the same command and --resume (--out {out})"  # (other options are refused)
    elif any((out / name).exists() for name in RUN_FILES):
        left = f"no epoch had finished: nothing to resume in {out} (start again with --overwrite)"
    else:
        left = "no epoch had finished: nothing to resume (run the command again to start over)"
    print(f"curvlab train: stopped by {signal_name}; {left}", file=sys.stderr, flush=True)
    return exit_stopped(signal_name)


def _as_options(message: str) -> str:
    """``name=value`` of a training option in ``message`` as the command line spells it, ``--name value``."""
    names = {f.name for f in fields(TrainConfig)}
    message = message.replace(KL_CLIP_OFF, " (0 disables it)")  # as the command line takes it
    return re.sub(r"\b([a-z_]+)=", lambda m: f"{flag(m.group(1))} " if m.group(1) in names else m.group(0), message)


def _config(args: argparse.Namespace, options: dict, model_kwargs: dict, probe_approx: tuple[str, ...]) -> TrainConfig:
    return TrainConfig(
        **options,
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        optimizer=args.optimizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        label_smoothing=args.label_smoothing,
        augment=args.augment,
        lr_schedule=args.lr_schedule,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
        device=args.device,
        out=args.out,
        probe_every=args.probe_every,
        probe_batch_size=args.probe_batch_size,
        probe_fisher=args.probe_fisher,
        probe_approximations=probe_approx,
        probe_mode=args.probe_mode,
        train_size=args.train_size,
        test_size=args.test_size,
        progress=not args.no_progress,
        figures=not args.no_figures,
        model_kwargs=model_kwargs,
    )


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``curvlab train``; returns the exit status (2: bad options, 1: the run failed)."""
    from curvlab.app.data import DataError
    from curvlab.app.launch import (Ranks, Stopped, join_process_group, leave_process_group, relaunch_with_data,
                                    resolve_device, wants_relaunch)
    from curvlab.app.models import ModelSpecError
    from curvlab.app.train.loop import checked_resume, load_data, train

    try:
        cfg = config_from_args(args)
        resolve_device(cfg.device)
        if args.resume and args.overwrite:
            raise ValueError("curvlab train: --resume and --overwrite exclude each other")
    except ValueError as err:
        refused = _resume_refusal(args)
        if refused is not None:
            print_error(parser, refused)
            return EXIT_FAILURE
        print_error(parser, err, usage=True)
        return EXIT_USAGE
    if wants_relaunch(args.nproc):
        try:
            check_batches(cfg, args.nproc, options=True)
        except ValueError as err:
            print_error(parser, err, usage=True)
            return EXIT_USAGE
        from curvlab.app.models.check import check_model
        from curvlab.app.train.run_folder import check_run_folder

        def checks() -> None:
            check_model(cfg.model, cfg.dataset, skip_unsupported=True, layer_uses=curvature_layers(cfg),
                        **cfg.model_kwargs)
            check_run_folder(cfg.out_dir, resume=args.resume, overwrite=args.overwrite)
            if args.resume:  # once here, not once per process
                checked_resume(cfg, "cpu")
            if cfg.train_size or cfg.test_size or cfg.probe_every:  # the subsets' sizes, against the data's
                load_data(cfg)

        try:
            return relaunch_with_data(args.nproc, args.argv, parser, cfg.dataset, cfg.data_dir, checks,
                                      usage_errors=(TrainOptionError,))
        except Stopped as err:  # one line, not torchrun's tracebacks (dropped by relaunch)
            return _stopped(err.signal_name, cfg.out_dir)
    join_process_group(cfg.device)  # with --device cuda: "cuda" is this rank's own GPU from here on
    try:
        paths = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt as err:  # one process: the same line as the launcher's (a rank's is the launcher's)
        if Ranks.current().distributed:
            raise
        return _stopped(getattr(err, "signal_name", None) or "SIGINT", cfg.out_dir)
    except ModelSpecError as err:  # a usage error, as report's and as an unknown built-in name's
        print_error(parser, f"argument --model: {err}", usage=True)
        return EXIT_USAGE
    except TrainOptionError as err:
        print_error(parser, err, usage=True)
        return EXIT_USAGE
    except (DataError, ValueError, OSError) as err:
        print_error(parser, err)
        return EXIT_FAILURE
    is_main = Ranks.current().is_main
    leave_process_group()
    if not is_main:
        return EXIT_OK
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return EXIT_OK
