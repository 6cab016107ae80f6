"""The ``curvlab`` command line (also ``python -m curvlab``).

Subcommands are registered in :data:`SUBCOMMANDS`: name → function that adds the subparser and
sets its handler with ``parser.set_defaults(handler=...)``. A handler takes the parsed
arguments and the subparser (for usage errors) and returns the exit status.

Exit status: 0 on success, 2 for usage errors (bad option values, unknown model, unusable
device), 1 when the run fails for an expected reason (data files missing, a model the
comparison cannot handle), 130 when interrupted (Ctrl-C) and 128 + the signal's number when a
signal stops a ``--nproc`` launcher (SIGTERM: 143), as a shell reports them; the message goes
to stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from curvlab.app import interrupts
from curvlab.app.allocator import add_malloc_option, apply_malloc_option
from curvlab.app.launch import add_nproc_option
from curvlab.app.messages import print_error
from curvlab.app.seed import add_seed_option
from curvlab.app.train.cli import add_train_parser

if TYPE_CHECKING:
    from torch import nn

PROG = "curvlab"

from curvlab.app.options import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_PEER_LOST,
    EXIT_USAGE,
    LABEL_SMOOTHING_HELP,
    approximations,
    damping_strategies,
    dataset,
    exit_stopped,
    hidden_help,
    hidden_options,
    label_smoothing,
    model,
    nonnegative_int,
    positive_float,
    positive_int,
    widths,
)


# ----------------------------------------------------------------------------------- report


def add_report_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``curvlab report``: measure every approximation on one batch, write files and figures."""
    from curvlab.approx import APPROXIMATIONS, DAMPING_STRATEGIES, DEFAULT_DAMPING
    from curvlab.app.data import DATASETS
    from curvlab.app.models import MODELS, MODES
    from curvlab.app.report.run import DEFAULT_TRAIN_STEPS, ReportConfig
    from curvlab.extract.options import ENGINES, KFAC_APPROX, TKFAC_CONV_FORMS
    from curvlab.stats import FLAVOURS

    default = ReportConfig()

    defaults = ", ".join(f"{k}={v}" for k, v in DEFAULT_DAMPING.items())
    parser = subparsers.add_parser(
        "report",
        help="compare every Kronecker approximation with the exact Fisher blocks; write a report",
        description=(
            "Load a dataset, build a model, train it briefly (Adam) or load --weights, then measure how "
            "well each Kronecker approximation matches the exact per-layer Fisher blocks on one batch of "
            "training examples. Writes report.nc (all metrics, netCDF), summary.md (tables), "
            "spectra.png, errors.png, network.png (coupling.png with --mode train on a model whose examples "
            "BatchNorm couples) and manifest.json (the run's id and the files' SHA-256 checksums; what ran is in report.nc's "
            "attributes) into --out."
        ),
    )
    what = parser.add_argument_group("model and data")
    what.add_argument(
        "--model",
        type=model,
        default=default.model,
        help=f"built-in model ({', '.join(MODELS)}) or a user model 'package.module:function' / "
        "'path/to/file.py:function' (called with input_shape= and num_classes= if it takes them) (default: %(default)s)",
    )
    what.add_argument(
        "--dataset",
        type=dataset,
        default=default.dataset,
        metavar="{" + ",".join(DATASETS) + "}",
        help="dataset (local files only; digits ships with scikit-learn) (default: %(default)s)",
    )
    what.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder holding the dataset's files (required for mnist and cifar10; fashion-mnist "
        "defaults to /usr/share/datasets/fashion-mnist; ignored for digits)",
    )
    what.add_argument(
        "--batch-size",
        type=positive_int,
        default=default.batch_size,
        help="training examples N in the measured batch; the cost grows like (N·classes)^3 (N·T·classes for a "
        "per-token loss on T positions) and the memory "
        "like N·classes·parameters (default: 128, fewer for large models so that the exact square roots fit "
        "in 4 GiB, e.g. 9 for resnet18, 4 with --mode train; the whole report of resnet18 peaks at about 4 GiB in "
        "either mode, mobilenetv2's at 6.5: benchmarks/results/report_builtins_cpu.md)",
    )
    what.add_argument("--hidden", type=widths, default=None,
                      help=hidden_help() + ", as curvlab train's")
    what.add_argument(
        "--weights",
        type=Path,
        default=None,
        metavar="PATH",
        help="measure these weights instead of the seeded init: a curvlab train run folder (its checkpoint.pt), "
        "that checkpoint.pt, or a file of torch.save(model.state_dict(), PATH), of the same --model, "
        "--dataset and --hidden; only tensors and plain data are read (weights_only); its path and SHA-256 are recorded",
    )
    what.add_argument(
        "--train-steps",
        type=nonnegative_int,
        default=None,  # resolved by ReportConfig.steps: it depends on --weights
        help=f"Adam steps (mini-batches of {default.train_batch_size}) on the training set before "
        "measuring, so the curvature is not that of a random init; 0 measures the init, or the --weights "
        f"as they are (default: {DEFAULT_TRAIN_STEPS}; 0 with --weights, N trains N steps from them)",
    )
    what.add_argument("--lr", type=positive_float, default=default.lr, help="Adam learning rate of those steps (default: %(default)s)")
    what.add_argument("--label-smoothing", type=label_smoothing, default=default.label_smoothing, help=LABEL_SMOOTHING_HELP)
    add_seed_option(what, default.seed, "seeds the model init, the training, the batch and MC sampling")

    how = parser.add_argument_group("comparison")
    how.add_argument(
        "--fisher",
        choices=FLAVOURS,
        default=default.fisher,
        help="reference block: exact GGN/Fisher, its Monte-Carlo estimate, or the empirical Fisher (default: %(default)s)",
    )
    how.add_argument(
        "--mc-samples",
        type=positive_int,
        default=default.mc_samples,
        help="labels sampled per example for --fisher mc and for KFAC's MC factors (default: %(default)s)",
    )
    how.add_argument(
        "--approximations",
        type=approximations,
        default=default.approximations,
        metavar="LIST",
        help=f"comma-separated approximations to measure, from {', '.join(APPROXIMATIONS)}, or 'all' (default: all)",
    )
    how.add_argument(
        "--damping",
        type=positive_float,
        default=default.damping,
        help="damping λ of the natural-gradient comparison: exact (F+λI)^-1 g vs each approximation's damped inverse (default: %(default)s)",
    )
    how.add_argument(
        "--damping-strategy",
        type=damping_strategies,
        default=None,
        metavar="NAME=STRATEGY,...",
        help=f"how each approximation applies λ, strategies: {', '.join(DAMPING_STRATEGIES)} "
        f"(default: {defaults})",
    )
    how.add_argument(
        "--tkfac-conv",
        choices=TKFAC_CONV_FORMS,
        default=default.tkfac_conv,
        help="conv-layer TKFAC/TEKFAC statistics: exact partial traces or KFC-style (default: %(default)s)",
    )
    how.add_argument(
        "--mode",
        choices=MODES,
        default=default.mode,
        help="the model's mode while measured: eval (BatchNorm running statistics) or train (batch "
        "statistics: exact blocks with the coupling between examples, plus coupling.png) (default: %(default)s)",
    )
    how.add_argument(
        "--engine",
        choices=ENGINES,
        default=default.engine,
        help="extraction engine: backpack, autograd (any differentiable forward), or auto (BackPACK where "
        "it runs the whole model) (default: %(default)s)",
    )
    how.add_argument(
        "--kfac-approx",
        choices=KFAC_APPROX,
        default=default.kfac_approx,
        help="weight-sharing convention of the KFAC factors (convolutions, Linear on [N, T, D]) (default: %(default)s)",
    )
    how.add_argument(
        "--skip-unsupported",
        action="store_true",
        help="leave the parameters of unsupported modules (an nn.Embedding with max_norm, scale_grad_by_freq or sparse) out instead of failing",
    )
    how.add_argument(
        "--truncate-above",
        type=nonnegative_int,
        default=default.truncate_above,
        metavar="D",
        help="measure factors wider than D in the truncated eigenbasis the optimizers invert (the "
        "top --truncation-rank eigenpairs, the rest of the spectrum flat; the optimizers' default: "
        "2048); 0: full bases (default: %(default)s)",
    )
    how.add_argument(
        "--truncation-rank",
        type=positive_int,
        default=default.truncation_rank,
        help="rank of a truncated eigenbasis (default: %(default)s)",
    )
    how.add_argument(
        "--top-k",
        type=positive_int,
        default=default.top_k,
        help="top eigenvectors compared by the subspace-overlap metric (default: %(default)s)",
    )
    how.add_argument(
        "--num-eigenvalues",
        type=positive_int,
        default=default.num_eigenvalues,
        help="largest eigenvalues stored and plotted per layer (default: %(default)s)",
    )

    run = parser.add_argument_group("execution and output")
    run.add_argument(
        "--device",
        default=default.device,
        help="torch device: cpu, cuda or cuda:N; an error if CUDA is not available (default: %(default)s)",
    )
    run.add_argument("--out", type=Path, default=default.out_dir, help="output folder, created if missing (default: %(default)s)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_nproc_option(run, "the measured batch is sharded over them (curvlab.distributed.compare)")
    add_malloc_option(run, default="default")  # a heap that keeps freed memory keeps the peaks: allocator.py
    parser.set_defaults(handler=_cmd_report)
    return parser


def _cmd_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import time

    from curvlab.app.data import DataError
    from curvlab.app.launch import (Ranks, check_batch_split, join_process_group, leave_process_group, relaunch_with_data,
                                    resolve_device, wants_relaunch)
    from curvlab.app.models import COUPLED_BATCH
    from curvlab.app.report.run import ReportConfig, ReportError, run_report

    try:
        model_kwargs = hidden_options("curvlab report", args.model, args.hidden)
    except ValueError as err:
        print_error(parser, err, usage=True)
        return EXIT_USAGE
    unused = sorted(set(args.damping_strategy or {}) - set(args.approximations))
    if unused:
        print_error(parser, f"--damping-strategy names {', '.join(unused)}, which --approximations leaves out "
                            f"({','.join(args.approximations)})", usage=True)
        return EXIT_USAGE
    if args.truncation_rank != ReportConfig.truncation_rank and not args.truncate_above:
        print_error(parser, "--truncation-rank given but not --truncate-above: no factor would be truncated", usage=True)
        return EXIT_USAGE
    untrained = args.train_steps == 0 or (args.train_steps is None and args.weights is not None)
    if untrained and any(t == "--lr" or t.startswith("--lr=") for t in args.argv):
        print_error(parser, "--lr given but no training step runs (--train-steps 0, the default with --weights): "
                            "it would change nothing", usage=True)
        return EXIT_USAGE
    try:
        resolve_device(args.device)
    except ValueError as err:
        print_error(parser, err, usage=True)
        return EXIT_USAGE
    if wants_relaunch(args.nproc):
        if args.mode == "train":
            print_error(parser, f"--mode train {COUPLED_BATCH}: drop --nproc", usage=True)
            return EXIT_USAGE
        try:
            check_batch_split("--batch-size", args.batch_size, args.nproc)
        except ValueError as err:
            print_error(parser, err, usage=True)
            return EXIT_USAGE
        from curvlab.app.models.check import check_model
        from curvlab.app.report.files import check_report_folder
        from curvlab.app.report.weights import read_weights

        def checks() -> None:
            check_model(args.model, args.dataset, skip_unsupported=args.skip_unsupported, engine=args.engine,
                        **model_kwargs)
            check_report_folder(Path(args.out))
            if args.weights is not None:  # once here, not once per process
                read_weights(args.weights, args.model, args.dataset, model_kwargs)

        return relaunch_with_data(args.nproc, args.argv, parser, args.dataset, args.data_dir, checks,
                                  usage_errors=(ReportError,))
    device = join_process_group(args.device)
    start = time.perf_counter()
    try:
        paths = run_report(
            model=args.model,
            model_kwargs=model_kwargs,
            dataset=args.dataset,
            data_dir=args.data_dir,
            weights=args.weights,
            batch_size=args.batch_size,
            fisher=args.fisher,
            mc_samples=args.mc_samples,
            approximations=args.approximations,
            damping=args.damping,
            damping_strategies=args.damping_strategy,
            tkfac_conv=args.tkfac_conv,
            top_k=args.top_k,
            num_eigenvalues=args.num_eigenvalues,
            train_steps=args.train_steps,
            lr=args.lr,
            label_smoothing=args.label_smoothing,
            seed=args.seed,
            device=device,
            out_dir=args.out,
            progress=not args.no_progress,
            mode=args.mode,
            engine=args.engine,
            kfac_approx=args.kfac_approx,
            truncate_above=args.truncate_above,
            truncation_rank=args.truncation_rank,
            skip_unsupported=args.skip_unsupported,
        )
    except ReportError as err:
        print_error(parser, err, usage=True)
        return EXIT_USAGE
    except (DataError, ValueError, OSError) as err:
        print_error(parser, err)
        return EXIT_FAILURE
    is_main = Ranks.current().is_main
    leave_process_group()
    if not is_main:
        return EXIT_OK
    print(f"curvlab report: done in {time.perf_counter() - start:.1f} s; wrote")
    for path in paths.values():
        print(f"  {path}")
    return EXIT_OK


# --------------------------------------------------------------------------------- dispatch

#: Subcommand name → function adding its parser (which sets ``handler``).
SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = {
    "report": add_report_parser,
    "train": add_train_parser,
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the subparsers by name."""
    from curvlab._version import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="curvlab: how good is each Kronecker approximation of the Fisher?",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    subs = {name: add(subparsers) for name, add in SUBCOMMANDS.items()}
    return parser, subs


def _model_outline(args: argparse.Namespace) -> "nn.Module | None":
    """The command's model for ``--malloc auto`` to look into; ``None`` where it cannot be built
    (the command reports that itself).  A built-in model is built on the CPU (0.02–0.2 s; the
    random state left as it was), a user's on the meta device (no memory, no data): there the
    random inits and a dummy forward run meta kernels, whose first use imports torch._dynamo
    (each built-in model 1.4–2.0 s on the meta device)."""
    import torch

    from curvlab.app.data import SHAPES, canonical_name
    from curvlab.app.models import make_model

    try:
        input_shape, num_classes = SHAPES[canonical_name(args.dataset)]
        hidden = {"hidden": args.hidden} if getattr(args, "hidden", None) else {}
        device = "meta" if ":" in args.model else "cpu"  # (a module:function spec, as make_model tells them)
        with torch.random.fork_rng(devices=[]), torch.device(device):
            return make_model(args.model, input_shape, num_classes, **hidden)
    except Exception:  # noqa: BLE001 — an unknown model or dataset, a user model meta cannot build
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (never raises ``SystemExit``)."""
    parser, subs = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc relaunches
    if hasattr(args, "malloc"):  # before the run allocates (every --nproc process parses it too)
        apply_malloc_option(args.malloc, _model_outline(args) if args.malloc == "auto" else None)
    # a warning as one line, as the errors are (not its source file and code line)
    format_warning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        with interrupts.remembered():
            return int(args.handler(args, subs[args.command]))
    except RuntimeError as err:
        from curvlab.app.launch import peer_lost

        said = peer_lost(err)
        if said is None:
            raise
        print(f"{PROG}: rank {os.environ['RANK']} stopped: another rank ended ({said})", file=sys.stderr)
        return EXIT_PEER_LOST
    except KeyboardInterrupt as err:
        name = getattr(err, "signal_name", None)  # a stop by SIGTERM, or a launcher's (curvlab.app.interrupts.Stopped)
        print(f"{PROG} {args.command}: stopped by {name}" if name else f"{PROG} {args.command}: interrupted",
              file=sys.stderr)
        return exit_stopped(name)
    finally:
        warnings.formatwarning = format_warning


def _one_line_warning(message: Warning | str, category: type[Warning], *_args: object, **_kwargs: object) -> str:
    return f"warning: {message}\n"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
