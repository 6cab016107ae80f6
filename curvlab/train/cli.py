"""``curvlab train``: argument parsing only; the work is in :mod:`curvlab.train.loop`."""

from __future__ import annotations

import argparse
import sys

from curvlab.approx import APPROXIMATIONS, DAMPING_STRATEGIES
from curvlab.train.config import OPTIMIZERS, TrainConfig


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``curvlab train`` and its options."""
    p = subparsers.add_parser(
        "train",
        help="train a model with SGD, Adam or a Kronecker optimizer, probing the curvature",
        description=(
            "Train a built-in model (or module:function) on a dataset with the chosen optimizer. "
            "Writes metrics.nc (per epoch: train/test loss and accuracy, wall-clock), probe.nc "
            "(with --probe-every K: the comparison of the optimizer's own approximation and "
            "fresh ones against the exact Fisher blocks on a fixed batch, every K steps) and "
            "checkpoint.pt (every epoch; --resume continues from it)."
        ),
    )
    p.add_argument("--model", default="mlp", help="built-in model (mlp, cnn, cnn-bench, 3c3d, vgg, resnet) or module:function (default: mlp)")
    p.add_argument("--hidden", default=None, help="MLP hidden widths, comma-separated (e.g. 128,64)")
    p.add_argument("--dataset", default="digits", help="digits (embedded), mnist, fashion-mnist, cifar10 (default: digits)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files (needed for mnist and cifar10)")
    p.add_argument("--optimizer", default="tekfac", choices=OPTIMIZERS, help="optimizer (default: tekfac)")
    p.add_argument("--epochs", type=int, default=10, help="epochs to train (default: 10)")
    p.add_argument("--batch-size", type=int, default=128, help="mini-batch size (default: 128)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 0.05 sgd, 1e-3 adam, 0.1 Kronecker optimizers)")
    p.add_argument("--momentum", type=float, default=0.9, help="momentum of SGD and the Kronecker optimizers (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (default: 0)")
    p.add_argument("--damping", type=float, default=1e-3, help="damping λ of the Kronecker optimizers and of the probe (default: 1e-3)")
    p.add_argument("--damping-strategy", default=None, choices=DAMPING_STRATEGIES, help="damping strategy (default: the method's own, see curvlab.approx.DEFAULT_DAMPING)")
    p.add_argument("--stats-interval", type=int, default=10, help="steps between curvature statistics (default: 10)")
    p.add_argument("--eigen-interval", type=int, default=100, help="steps between eigen-decompositions (default: 100)")
    p.add_argument("--scale-interval", type=int, default=10, help="steps between EKFAC/TEKFAC rescalings (default: 10)")
    p.add_argument("--kl-clip", type=float, default=1e-3, help="KL clipping threshold; 0 disables (default: 1e-3)")
    p.add_argument("--fisher", default="mc", choices=("mc", "exact", "empirical"), help="Fisher flavour of the optimizer's statistics (default: mc)")
    p.add_argument("--basis", default="trace", choices=("trace", "kfac"), help="TEKFAC eigenbasis: trace-weighted (default) or KFAC's (ablation)")
    p.add_argument("--probe-every", type=int, default=0, help="run the curvature comparison every K steps (default: 0, off)")
    p.add_argument("--probe-batch-size", type=int, default=128, help="examples in the fixed probe batch (default: 128)")
    p.add_argument("--probe-fisher", default="exact", choices=("exact", "mc", "empirical"), help="flavour of the probe's reference blocks (default: exact)")
    p.add_argument("--probe-approximations", default="kflr,ekfac,tkfac,tekfac", help=f"fresh approximations measured at each probe, from {','.join(APPROXIMATIONS)}")
    p.add_argument("--train-size", type=int, default=None, help="train on a seeded subset of this many examples")
    p.add_argument("--test-size", type=int, default=None, help="evaluate on a seeded subset of this many examples")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_train)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed options describe."""
    model_kwargs = {}
    if args.hidden:
        model_kwargs["hidden"] = tuple(int(h) for h in args.hidden.split(","))
    probe_approx = tuple(a.strip().lower() for a in args.probe_approximations.split(",") if a.strip())
    for name in probe_approx:
        if name not in APPROXIMATIONS:
            raise ValueError(f"curvlab train: --probe-approximations has {name!r}; choose from {','.join(APPROXIMATIONS)}")
    return TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        optimizer=args.optimizer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        damping=args.damping,
        damping_strategy=args.damping_strategy,
        stats_interval=args.stats_interval,
        eigen_interval=args.eigen_interval,
        scale_interval=args.scale_interval,
        kl_clip=args.kl_clip or None,
        fisher=args.fisher,
        basis=args.basis,
        seed=args.seed,
        device=args.device,
        out=args.out,
        probe_every=args.probe_every,
        probe_batch_size=args.probe_batch_size,
        probe_fisher=args.probe_fisher,
        probe_approximations=probe_approx,
        train_size=args.train_size,
        test_size=args.test_size,
        progress=not args.no_progress,
        model_kwargs=model_kwargs,
    )


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``curvlab train``; returns the exit status (2: bad options, 1: the run failed)."""
    from curvlab.data import DataError
    from curvlab.train.loop import train

    try:
        cfg = config_from_args(args)
        if cfg.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError("curvlab train: --device cuda but no CUDA device is available")
    except ValueError as err:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        paths = train(cfg, resume=args.resume)
    except (DataError, ValueError, OSError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
