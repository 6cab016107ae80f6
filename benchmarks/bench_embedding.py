"""Optimizer steps of a small language model — an ``nn.Embedding`` preconditioned, a per-token loss
on ``[N·T, V]`` rows — side by side in one process: SGD, curvlab's KFAC/EKFAC/TKFAC/TEKFAC and
ASDL's K-FAC (:mod:`peers`; ASDL's EKFAC has no eigenbasis for ``nn.Embedding`` and refuses the
model), equal intervals and damping, interleaved repeats.

The model: ``Embedding(V, E)`` → tanh → ``Linear(E, E)`` → tanh → ``Linear(E, V)``, token ids
``[N, T]`` and next ids.  Plain, statistics and refresh steps, each as a multiple of an SGD
step, and the amortised step ``(1 refresh + 9 statistics + 90 plain)/100``.  ``--before`` adds
curvlab's EKFAC and TEKFAC with the two routes of git 2026-12-06 turned off — the gathers of the
embedding's permutation basis (:mod:`curvlab.basis`) and the one-position samples of the head
(:func:`curvlab.extract.maths.one_position_samples`) — as they ran before (slow: a statistics
step takes tens of seconds, so those rows get one sample)::

    .venv/bin/python benchmarks/bench_embedding.py --before --out benchmarks/results/embedding_cpu.json
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterator

import torch
from torch import nn

import common
import peers

import curvlab.basis
import curvlab.extract.maths


class LanguageModel(nn.Module):
    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.net = nn.Sequential(nn.Embedding(vocab, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                 nn.Linear(width, vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids).reshape(-1, self.vocab)  # [N·T, V]: a term per token


@contextlib.contextmanager
def routes_before() -> Iterator[None]:
    """The permutation basis rotated by GEMMs and the head's samples at every position."""
    width, one_position = curvlab.basis.PERMUTATION_MIN_WIDTH, curvlab.extract.maths.one_position_samples
    curvlab.basis.PERMUTATION_MIN_WIDTH = 2**62
    curvlab.extract.maths.one_position_samples = lambda x, g: None
    try:
        yield
    finally:
        curvlab.basis.PERMUTATION_MIN_WIDTH, curvlab.extract.maths.one_position_samples = width, one_position


def main() -> None:
    parser = common.argument_parser(__doc__, repeats=5)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--n", type=int, default=16, help="sequences in a batch")
    parser.add_argument("--t", type=int, default=64, help="tokens in a sequence")
    parser.add_argument("--peers", default="sgd,curvlab-kfac,curvlab-ekfac,curvlab-tkfac,curvlab-tekfac,asdl-kfac")
    parser.add_argument("--before", action="store_true", help="add EKFAC and TEKFAC as they ran before")
    parser.add_argument("--plain-calls", type=int, default=5, help="plain steps timed per sample (median)")
    args = parser.parse_args()
    device, info = common.start(args, common.command_line(__file__))
    peers.import_asdl()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.n, args.t + 1), generator=gen)
    batch = (ids[:, :-1].to(device), ids[:, 1:].reshape(-1).to(device))
    options = dict(lr=1e-6, damping=1e-2, stats_interval=10, refresh_interval=100, momentum=0.9, kl_clip=None)
    names = args.peers.split(",") + (["curvlab-ekfac-before", "curvlab-tekfac-before"] if args.before else [])
    steppers = {}
    for name in names:
        torch.manual_seed(0)
        model = LanguageModel(args.vocab, args.width).to(device)
        with routes_before() if name.endswith("-before") else contextlib.nullcontext():
            steppers[name] = peers.build(name.removesuffix("-before"), model, nn.CrossEntropyLoss(), batch, **options)
            steppers[name].warm_up()
    kinds = ("plain", "stats", "refresh")
    samples: dict[str, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in names}
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            stepper = steppers[name]
            slow = name.endswith("-before") and r > 0
            with routes_before() if name.endswith("-before") else contextlib.nullcontext():
                for kind in kinds:
                    if stepper.kind(stepper.positions[kind]) != kind or (slow and kind != "plain"):
                        continue  # first-order peers: plain steps only
                    calls = args.plain_calls if kind == "plain" else 1
                    times = []
                    for _ in range(calls):
                        common.sync(device)
                        start = time.perf_counter()
                        stepper.step_at(stepper.positions[kind])
                        common.sync(device)
                        times.append(time.perf_counter() - start)
                    samples[name][kind].append(statistics.median(times))
        print(f"  repeat {r + 1}/{args.repeats}", flush=True)
    info = common.finish(info)
    medians = {n: {k: statistics.median(v) for k, v in kinds_.items() if v} for n, kinds_ in samples.items()}
    sgd = medians["sgd"]["plain"]
    rows = []
    for name in names:
        m = medians[name]
        plain, stats, refresh = m["plain"], m.get("stats", m["plain"]), m.get("refresh", m["plain"])
        amortised = (refresh + 9 * stats + 90 * plain) / 100
        rows.append([name, f"{plain * 1e3:.1f}", f"{stats * 1e3:.0f}", f"{refresh * 1e3:.0f}",
                     f"**{amortised / sgd:.2f}**", f"{plain / sgd:.2f}", f"{stats / sgd:.1f}", f"{refresh / sgd:.1f}",
                     str(len(samples[name]["stats"]) or "–")])
    md = [
        f"# Optimizer steps of a small language model ({device})", "",
        common.machine_line(info), "",
        f"`Embedding({args.vocab}, {args.width})` → tanh → `Linear({args.width}, {args.width})` → tanh → "
        f"`Linear({args.width}, {args.vocab})`, N = {args.n} sequences of T = {args.t} tokens, cross-entropy on "
        f"`[N·T, V]` rows (a term per token); statistics every 10 steps, refresh every 100, damping 1e-2, "
        f"momentum 0.9, MC Fisher (one sample per term); medians of {args.repeats} interleaved repeats "
        f"(a plain step: the median of {args.plain_calls} calls). Amortised = (1 refresh + 9 statistics + "
        f"90 plain)/100, as a multiple of an SGD step. `-before`: the rows of git 2026-12-06 before the "
        f"embedding's permutation basis was gathered and the head's one-position samples were taken "
        f"(one statistics and refresh sample).", "",
        *common.md_table(["peer", "plain ms", "stats ms", "refresh ms", "amortised ×SGD", "plain ×SGD",
                          "stats ×SGD", "refresh ×SGD", "stats samples"], rows),
    ]
    common.write_results(args.out, {"machine": info, "args": vars(args), "samples": samples, "medians": medians},
                         "\n".join(md))


if __name__ == "__main__":
    main()
