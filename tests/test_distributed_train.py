"""``curvlab train`` and ``curvlab report`` on several processes give one process's results.

Two gloo ranks (one spawn, :mod:`multiprocess`) run a TEKFAC training (exact Fisher, probes),
the same training split into one epoch and a resume, and a report; this process then runs them
once more on its own and compares.  The models are float32, so "the same" means to float32
rounding, amplified over the steps (measured: parameters ≤ 3e-6 relative).  The global batch (80
examples) exceeds every layer's input width, so the factors have no repeated eigenvalues beyond
the pixels that are zero in every image (see ``test_distributed_optim``).

The command line: ``curvlab train --nproc 2`` (torchrun underneath) writes the files of a run,
and a rank that raises ends the whole run with its message, long before the process group's
timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from multiprocess import run_ranks

#: float32 training: relative agreement of parameters and metrics with one process
RTOL = 5e-5


def _train_config(out: Path, **kw):
    from curvlab.app.train import TrainConfig

    base = dict(model="mlp", dataset="digits", optimizer="tekfac", epochs=2, batch_size=80, train_size=240,
                test_size=50, probe_every=3, probe_batch_size=20, out=str(out), progress=False, figures=False,
                model_kwargs={"hidden": (16,)}, fisher="exact", stats_interval=2, eigen_interval=4,
                scale_interval=2, augment="crop-flip", warmup_epochs=1)  # the whole batch's draws, on any ranks
    return TrainConfig(**{**base, **kw})


#: batches of 81, 81 and 78 examples: shards of 41 and 40 (the gradient was the mean of the
#: shards' mean gradients, not the batch's: parameters 1.6e-2 apart), then 39 and 39
UNEVEN = dict(batch_size=81, epochs=1, probe_every=0, lr_schedule="cosine")

REPORT = dict(model="mlp", dataset="digits", batch_size=40, train_steps=10, approximations=("kflr", "ekfac", "tkfac", "tekfac"),
              num_eigenvalues=8, top_k=3)


def _no_figure(ds: object, path: Path) -> None:
    """A figure skipped to save time (an empty file: the report's manifest lists every file)."""
    Path(path).touch()


def _no_figures() -> None:
    """The report's figures are tested in one process (test_report); here they only cost time."""
    import curvlab.app.report.figures as figures

    for name in ("plot_spectra", "plot_errors", "plot_network"):
        setattr(figures, name, _no_figure)


def _worker(root: str) -> int:
    from curvlab.app.report.run import run_report
    from curvlab.app.train import train

    _no_figures()
    root_path = Path(root)
    train(_train_config(root_path / "full"))
    train(_train_config(root_path / "split", epochs=1))
    train(_train_config(root_path / "split"), resume=True)
    train(_train_config(root_path / "half", epochs=1))  # resumed in one process by the test
    train(_train_config(root_path / "uneven", **UNEVEN))
    run_report(**REPORT, out_dir=root_path / "report")
    return torch.distributed.get_rank(), _said_of_batchnorm()


def _said_of_batchnorm() -> str:
    """What ``curvlab train`` prints when it wraps a model with and one without BatchNorm."""
    import contextlib
    import io

    from curvlab.app.launch import Ranks
    from curvlab.app.train import parallel

    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        for layers in ((torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)), (torch.nn.Linear(3, 2),)):
            torch.manual_seed(0)
            parallel.data_parallel(torch.nn.Sequential(*layers), Ranks.current(), torch.device("cpu"))
    return said.getvalue()


def _close(a: np.ndarray, b: np.ndarray, what: str, rtol: float = RTOL) -> None:
    if a.dtype.kind not in "fiu":  # names (the probes' unresolved layers): equal
        assert np.array_equal(a, b), f"{what}: {a} != {b}"
        return
    scale = np.nanmax(np.abs(b)) if np.isfinite(b).any() else 1.0
    assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}: NaN pattern differs"
    ok = np.isnan(b) | (np.abs(a - b) <= rtol * np.maximum(np.abs(b), scale))
    assert ok.all(), f"{what}: max |Δ| = {np.nanmax(np.abs(a - b)):.3g} (scale {scale:.3g})"


def test_two_ranks_train_and_report_as_one_process(tmp_path: Path) -> None:
    from curvlab.app.report.run import run_report
    from curvlab.app.train import train

    (rank0, said), (rank1, quiet) = run_ranks(_worker, 2, str(tmp_path / "ranks"), timeout=240)
    assert (rank0, rank1, quiet) == (0, 1, "")  # rank 0 says it, once: BatchNorm's shards take other steps
    assert said.count("\n") == 1 and said.startswith("curvlab train: the model's BatchNorm normalises each process's shard")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks
    try:
        single = train(_train_config(tmp_path / "single"))
        resumed = train(_train_config(tmp_path / "ranks" / "half"), resume=True)  # 2 ranks' epoch, then 1
        uneven = train(_train_config(tmp_path / "uneven", **UNEVEN))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("curvlab.app.report.figures.plot_spectra", _no_figure)
            patch.setattr("curvlab.app.report.figures.plot_errors", _no_figure)
            patch.setattr("curvlab.app.report.figures.plot_network", _no_figure)
            run_report(**REPORT, out_dir=tmp_path / "single_report")
    finally:
        torch.set_num_threads(threads)

    ranks = tmp_path / "ranks"
    a = torch.load(uneven["checkpoint"], weights_only=False)["model"]
    b = torch.load(ranks / "uneven" / "checkpoint.pt", weights_only=False)["model"]
    for key in a:
        _close(b[key].numpy(), a[key].numpy(), f"unequal shards: parameter {key}")
    a = torch.load(single["checkpoint"], weights_only=False)
    b = torch.load(ranks / "full" / "checkpoint.pt", weights_only=False)
    for key in a["model"]:
        _close(b["model"][key].numpy(), a["model"][key].numpy(), f"parameter {key}")
    assert sorted(b["optimizer"]["curvlab"]["blocks"]) == sorted(a["optimizer"]["curvlab"]["blocks"]) == ["1", "3"]
    assert len(b["rank_rng"]) == 2 and b["step"] == a["step"] == 6

    ma, mb = (xr.open_dataset(p / "metrics.nc").load() for p in (tmp_path / "single", ranks / "full"))
    assert mb.attrs["world_size"] == 2 and ma.attrs["world_size"] == 1
    for var in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "steps", "skipped_steps"):
        _close(mb[var].values, ma[var].values, f"metrics {var}")
    pa, pb = (xr.open_dataset(p / "probe.nc").load() for p in (tmp_path / "single", ranks / "full"))
    assert list(pb.step.values) == list(pa.step.values) == [0, 3, 6]
    assert set(pb.data_vars) == set(pa.data_vars)
    for var in pa.data_vars:
        _close(pb[var].values, pa[var].values, f"probe {var}", rtol=1e-4)

    # one epoch on two ranks, resumed in one process: the single-process steps still
    d = torch.load(resumed["checkpoint"], weights_only=False)
    assert d["step"] == 6
    for key in a["model"]:
        _close(d["model"][key].numpy(), a["model"][key].numpy(), f"resumed on one rank: parameter {key}")
    mr = xr.open_dataset(ranks / "half" / "metrics.nc").load()
    assert list(mr.world_size.values) == [2, 1]
    _close(mr.test_loss.values, ma.test_loss.values, "resumed on one rank: test loss")

    # one epoch, then a resume on both ranks: the uninterrupted run, bit for bit
    c = torch.load(ranks / "split" / "checkpoint.pt", weights_only=False)
    for key in b["model"]:
        assert torch.equal(b["model"][key], c["model"][key]), key
    ms = xr.open_dataset(ranks / "split" / "metrics.nc").load()
    np.testing.assert_array_equal(ms.train_loss, mb.train_loss)

    ra, rb = (xr.open_dataset(p / "report.nc").load() for p in (tmp_path / "single_report", ranks / "report"))
    assert rb.attrs["world_size"] == 2 and rb.attrs["shard_examples"] == "20,20"
    assert set(rb.data_vars) == set(ra.data_vars)
    for var in ra.data_vars:
        _close(rb[var].values, ra[var].values, f"report {var}", rtol=1e-4)
    summary = (ranks / "report" / "summary.md").read_text(encoding="utf-8")
    assert "- **Processes (the batch split over them):** 2 (gloo; examples per process 20,20; MC samples drawn with seed + rank" in summary


def _cli(*args: str, timeout: float, one_core: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CURVLAB_DIST_TIMEOUT": "120"}
    return subprocess.run([sys.executable, "-m", "curvlab", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=(lambda: os.sched_setaffinity(0, {0})) if one_core else None)


def test_cli_nproc_runs_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = _cli("train", "--nproc", "2", "--dataset", "digits", "--hidden", "16", "--train-size", "160",
                "--test-size", "40", "--batch-size", "40", "--epochs", "1", "--probe-every", "2",
                "--probe-batch-size", "10", "--no-progress", "--no-figures", "--out", str(out), timeout=240,
                one_core=hasattr(os, "sched_setaffinity"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("metrics:") == 1  # rank 0 reports the files
    if hasattr(os, "sched_setaffinity"):  # two processes on the one core it may use: said
        assert "--nproc 2 starts more processes than the 1 CPU core this command may use" in done.stderr
    metrics = xr.open_dataset(out / "metrics.nc").load()
    assert metrics.attrs["world_size"] == 2 and int(metrics.steps[-1]) == 4
    assert np.isfinite(metrics.train_loss).all()
    assert list(xr.open_dataset(out / "probe.nc").step.values) == [0, 2, 4]
    # a resume with other options is refused once, before the processes start (it was refused by
    # each rank, then torchrun's traceback: 43 lines)
    done = _cli("train", "--nproc", "2", "--dataset", "digits", "--hidden", "16", "--train-size", "160",
                "--test-size", "40", "--batch-size", "40", "--epochs", "2", "--probe-every", "2",
                "--probe-batch-size", "10", "--label-smoothing", "0.1", "--no-progress", "--out", str(out),
                "--resume", timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("was written with other options: --label-smoothing 0.0 (now 0.1)") == 1, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    # resumed on one process: each epoch keeps the ranks it ran on
    done = _cli("train", "--dataset", "digits", "--hidden", "16", "--train-size", "160", "--test-size", "40",
                "--batch-size", "40", "--epochs", "2", "--probe-every", "2", "--probe-batch-size", "10",
                "--no-progress", "--no-figures", "--out", str(out), "--resume", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = xr.open_dataset(out / "metrics.nc").load()
    assert metrics.world_size.values.tolist() == [2, 1] and metrics.attrs["world_size"] == 1
    # (the default --fisher mc: each rank drew the labels of its shard, so one process draws others)
    assert "was trained on 2 process(es), this run has 1: each process draws the MC labels" in done.stderr


def test_two_ranks_name_the_first_order_parameters_once(tmp_path: Path) -> None:
    """Every rank builds the same optimizer: rank 0 alone names the parameters without a Kronecker
    block (each rank did, as many times as there were ranks)."""
    nets = tmp_path / "nets.py"
    nets.write_text("from torch import nn\n"
                    "class Net(nn.Module):\n"
                    "    def __init__(self, num_classes):\n"
                    "        super().__init__()\n"
                    "        self.rnn, self.out = nn.LSTM(8, 6, batch_first=True), nn.Linear(6, num_classes)\n"
                    "    def forward(self, x):\n"
                    "        return self.out(self.rnn(x.reshape(x.shape[0], 8, 8))[0][:, -1])\n")
    done = _cli("train", "--nproc", "2", "--model", f"{nets}:Net", "--train-size", "80", "--test-size", "40",
                "--batch-size", "40", "--epochs", "1", "--no-progress", "--no-figures", "--out", str(tmp_path / "run"),
                timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("have no Kronecker block") == 1, done.stderr


@pytest.mark.parametrize("args", [("train", "--batch-size", "1"), ("train", "--probe-every", "1", "--probe-batch-size", "1"),
                                  ("train", "--train-size", "1", "--lr-schedule", "cosine"), ("report", "--batch-size", "1")],
                         ids=["train", "probe", "train-size", "report"])
def test_a_batch_smaller_than_the_processes_is_refused_before_they_start(tmp_path: Path, args, capsys) -> None:
    """Every batch skipped (train: zero steps, exit 0) or an empty shard's traceback on a rank;
    refused in the launching process itself (so run in this one)."""
    from curvlab.app.cli import main

    assert main([*args, "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    option = next(o for o in ("--probe-batch-size", "--train-size", "--batch-size") if o in args)
    assert f"error: {option} 1 is smaller than the 2 processes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_subset_larger_than_the_data_is_refused_before_the_processes_start(tmp_path: Path, capsys) -> None:
    from curvlab.app.cli import main

    assert main(["train", "--nproc", "2", "--train-size", "100000", "--out", str(tmp_path / "run")]) == 2
    assert "error: train_size=100000 (--train-size) exceeds the train split of digits" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux's /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through Linux's /proc")
@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGKILL, True),
                                        (signal.SIGKILL, False)],
                         ids=["SIGTERM-launcher", "SIGINT-group", "SIGKILL-group", "SIGKILL-launcher"])
def test_stopping_the_launcher_stops_the_ranks(tmp_path: Path, sig: signal.Signals, group: bool) -> None:
    """``kill <pid>`` of ``curvlab train --nproc 2`` (a scheduler's stop): the ranks, in sessions
    of their own, stop too; a terminal's Ctrl-C, which signals the launcher and torchrun at once
    (their process group), ends with the same one line (torchrun's traceback for the signal it
    got itself was printed); and ``kill -KILL -- -<pgid>``, which ends the launcher and torchrun at
    once, and ``kill -9 <pid>``, which ends the launcher alone (in both, torchrun or the ranks went
    on training, holding the folder's lock and writing into it)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CURVLAB_DIST_TIMEOUT": "120"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "curvlab", "train", "--nproc", "2", "--dataset", "digits", "--hidden", "16",
         "--train-size", "160", "--test-size", "40", "--batch-size", "40", "--epochs", "1000", "--no-progress",
         "--no-figures", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=group,
        # SIGINT as a terminal gives it: a test runner started in the background of a
        # non-interactive shell ignores SIGINT, and a child inherits that (the launcher then
        # trained on to the end and exited 0)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    below: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while not (out / "metrics.nc").exists():  # the ranks have trained an epoch
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        below = _descendants(launcher.pid)
        assert len(below) >= 3  # torchrun and its two workers
        (os.killpg if group else os.kill)(launcher.pid, sig)
        if sig == signal.SIGKILL:
            assert launcher.wait(timeout=90) == -signal.SIGKILL
        else:
            assert launcher.wait(timeout=90) == 128 + sig  # as a shell reports a process the signal ended
            # one line after the torchrun command, not torchrun's tracebacks and its shutdown's log
            said = launcher.stderr.read().strip().splitlines()
            assert said[0].startswith("curvlab: -m torch.distributed.run") and len(said) == 2, said
            assert said[1] == f"curvlab train: stopped by {sig.name}; resume with the same command and --resume (--out {out})"
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in below if _alive(pid)]
    finally:  # whatever failed, nothing is left running
        for pid in [launcher.pid, *below]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()


FAILING_MODEL = '''
import os
from torch import nn


class Fails(nn.Sequential):
    calls = 0

    def forward(self, x):
        Fails.calls += 1
        if Fails.calls == 3 and os.environ.get("RANK") == "1":
            raise ValueError("rank one gives up at its third forward")
        return super().forward(x)


def build(input_shape, num_classes):
    return Fails(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))
'''


def test_a_failing_rank_ends_the_run_with_its_message(tmp_path: Path) -> None:
    spec = tmp_path / "failing.py"
    spec.write_text(FAILING_MODEL)
    start = time.monotonic()
    done = _cli("train", "--nproc", "2", "--model", f"{spec}:build", "--dataset", "digits", "--train-size", "160",
                "--test-size", "40", "--batch-size", "40", "--epochs", "1", "--no-progress", "--no-figures",
                "--out", str(tmp_path / "run"), timeout=240)
    assert done.returncode != 0
    assert "rank one gives up at its third forward" in done.stderr, done.stderr[-3000:]
    # then one line naming the rank, not torchrun's traceback, failure table and log lines, nor
    # rank 0's traceback where its collective failed first
    said = done.stderr.strip().splitlines()
    assert said[-1].startswith("curvlab: rank 1 (pid ") and said[-1].endswith(
        "exited with status 1; torchrun stopped the other ranks"), said
    assert len(said) <= 4, said  # the command, rank 1's error, perhaps rank 0's line, torchrun's
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr
    assert time.monotonic() - start < 100  # torchrun stopped rank 0, well before its 120 s timeout


@pytest.mark.parametrize("n,world", [(10, 3), (7, 2), (2, 4)])
def test_shards_split_a_batch_in_rank_order(n: int, world: int) -> None:
    from curvlab.app.launch import shard

    parts = [shard(n, r, world) for r in range(world)]
    assert [p.start for p in parts] == [sum(q.stop - q.start for q in parts[:r]) for r in range(world)]
    assert sum(p.stop - p.start for p in parts) == n
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_nproc_is_left_out_of_the_relaunched_command() -> None:
    from curvlab.app.launch import without_nproc

    assert without_nproc(["train", "--nproc", "2", "--epochs", "1"]) == ["train", "--epochs", "1"]
    assert without_nproc(["report", "--nproc=4", "--no-progress"]) == ["report", "--no-progress"]
    assert without_nproc(["train", "--npr", "3", "--no-progress"]) == ["train", "--no-progress"]


def _rank_random_states(fake_cuda: bool) -> tuple[bool, bool]:
    """A checkpoint's random states gathered and restored as ``curvlab train`` does (rank 0's
    CUDA state first, as ``restore`` sets it, then this rank's): whether the next CPU and device
    draws are those the rank would have taken without the interruption.  ``fake_cuda``: the
    device's generator is a stand-in, per rank, behind ``torch.cuda``'s two functions."""
    from curvlab.app.launch import Ranks
    from curvlab.app.train import parallel

    ranks = Ranks.current()
    device = torch.device("cuda")
    if fake_cuda:  # a generator of this process for "the device's"
        gen = torch.Generator()
        torch.cuda.get_rng_state = lambda device=None: gen.get_state()
        torch.cuda.set_rng_state = lambda state, device=None: gen.set_state(state)
        draw = lambda: torch.rand(4, generator=gen)  # noqa: E731
    else:
        draw = lambda: torch.rand(4, device=device).cpu()  # noqa: E731
    torch.manual_seed(3)
    parallel.reseed(3, ranks)  # rank 1 draws from seed 4, on the device too
    if fake_cuda:
        gen.manual_seed(3 + ranks.rank)
    cpu_states, cuda_states = parallel.rng_states(ranks, device)
    expected = torch.rand(4), draw()
    torch.rand(7), draw()  # the run goes on
    torch.cuda.set_rng_state(cuda_states[0], device)
    parallel.restore_rng({"rng": cpu_states[0], "rank_rng": cpu_states, "rank_cuda_rng": cuda_states}, ranks, device)
    return torch.equal(torch.rand(4), expected[0]), torch.equal(draw(), expected[1])


def test_two_ranks_resume_their_own_device_random_states() -> None:
    """Each rank's CUDA random state is saved and restored, not rank 0's on every rank (a resumed
    multi-GPU run with Dropout drew rank 0's masks on every rank)."""
    assert run_ranks(_rank_random_states, 2, True, timeout=120) == [(True, True), (True, True)]


def test_each_rank_trains_on_its_own_gpu_whatever_index_device_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device cuda:0`` under torchrun put every rank on GPU 0 (nccl refuses two ranks on one
    GPU); each rank takes the GPU ``join_process_group`` made current, as ``curvlab report`` does."""
    from curvlab.app.launch import Ranks
    from curvlab.app.train.parallel import rank_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # rank 1's cuda:LOCAL_RANK
    for given in ("cuda:0", "cuda"):
        assert rank_device(torch.device(given), Ranks(1, 2)) == torch.device("cuda:1")
    assert rank_device(torch.device("cuda:0"), Ranks(0, 1)) == torch.device("cuda:0")  # one process: as given
    assert rank_device(torch.device("cpu"), Ranks(1, 2)) == torch.device("cpu")


@pytest.mark.parametrize("num_train,batch,said", [(129, 64, True), (130, 64, False), (128, 64, False), (1, 64, True)])
def test_a_skipped_trailing_batch_is_said(num_train: int, batch: int, said: bool, capsys) -> None:
    """Every rank skips a trailing batch with fewer examples than ranks (129 examples in batches
    of 64 on 2 processes: 2 steps an epoch where one process takes 3); that went unsaid."""
    from curvlab.app.launch import Ranks
    from curvlab.app.train.parallel import say_skipped_batch

    say_skipped_batch(num_train, batch, Ranks(0, 2))
    err = capsys.readouterr().err
    assert ("is skipped" in err) == said and (not said or f"({num_train % batch or num_train} of {num_train}" in err)
    say_skipped_batch(num_train, batch, Ranks(1, 2))  # rank 0 alone speaks
    assert capsys.readouterr().err == ""
