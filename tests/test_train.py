"""curvlab train: metrics and probe files, checkpoint/resume (also after a real kill)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from curvlab.app.train import TrainConfig, train
from curvlab.app.train.loop import CHECKPOINT, DIVERGED_AFTER
from helpers import torch_threads


def small(tmp: Path, **kw) -> TrainConfig:
    base = dict(model="mlp", dataset="digits", optimizer="tekfac", epochs=2, batch_size=50,
                train_size=300, test_size=100, probe_every=3, probe_batch_size=20,
                out=str(tmp), progress=False, figures=False, model_kwargs={"hidden": (16,)}, stats_interval=2,
                eigen_interval=4, scale_interval=2)
    base.update(kw)
    return TrainConfig(**base)


RECORDING_NET = """
import os, torch
from torch import nn

class Recording(nn.Sequential):
    def forward(self, x):
        if self.training and torch.is_grad_enabled():  # a training step's batch, by its first pixels
            with open(os.environ["CURVLAB_TEST_BATCHES"], "a") as f:
                f.write(" ".join(f"{v:.6f}" for v in x.flatten(1)[:, 20].tolist()) + "\\n")
        return super().forward(x)

def net(input_shape, num_classes):
    return Recording(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, num_classes))
"""


def test_every_epoch_draws_its_own_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each epoch reshuffles the training set (cyclic batches would pass every resume test: they
    are deterministic too); its examples are each seen once."""
    (tmp_path / "recording.py").write_text(RECORDING_NET)
    log = tmp_path / "batches.txt"
    monkeypatch.setenv("CURVLAB_TEST_BATCHES", str(log))
    train(small(tmp_path / "run", model=f"{tmp_path / 'recording.py'}:net", model_kwargs={}, optimizer="kfac",
                epochs=3, train_size=100, probe_every=0))
    lines = log.read_text().splitlines()
    steps = [line for line in lines if len(line.split()) == 50]  # the training batches (2 per epoch)
    assert len(steps) == 6
    epochs = [sorted(" ".join(steps[i:i + 2]).split()) for i in (0, 2, 4)]
    assert epochs[0] == epochs[1] == epochs[2]  # the same examples...
    assert len({" ".join(steps[i:i + 2]) for i in (0, 2, 4)}) == 3  # ...in another order each epoch


def test_writes_metrics_and_probe_time_series(tmp_path: Path) -> None:
    paths = train(small(tmp_path))
    metrics = xr.open_dataset(paths["metrics"]).load()
    assert list(metrics.epoch.values) == [1, 2]
    for var in ("train_loss", "test_loss", "test_accuracy", "wall_clock"):
        assert np.isfinite(metrics[var]).all()
    assert metrics.steps.values[-1] == 12
    # CF: what each number is (the training loss is the epoch's running mean, not an end-of-epoch evaluation)
    assert all(metrics[var].attrs.get("long_name") and metrics[var].attrs.get("units") for var in metrics.data_vars)
    assert metrics.epoch_time.attrs["units"] == "s" and "before its step" in metrics.train_loss.attrs["long_name"]
    probe = xr.open_dataset(paths["probe"]).load()
    assert list(probe.step.values) == [0, 3, 6, 9, 12]
    assert all(var.attrs.get("long_name") for var in probe.variables.values())  # CF: what each one is
    assert set(probe.layer.values) == {"1", "3"}
    assert "tekfac@optimizer" in probe.approximation.values
    own = probe.rel_frobenius_error.sel(approximation="tekfac@optimizer")
    assert np.isnan(own.sel(step=0)).all() and np.isfinite(own.sel(step=12)).all()
    # fresh trace-preserving approximations keep the trace at every probe
    np.testing.assert_allclose(probe.trace_ratio.sel(approximation="tekfac"), 1.0, rtol=1e-5)  # float32 model


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "kfac"])
@pytest.mark.parametrize("probe_every", [3, 100], ids=["probes", "step-0-only"])
def test_other_optimizers_run(tmp_path: Path, optimizer: str, probe_every: int) -> None:
    """Every probe file has the optimizer's own entry first (NaN before its first statistics:
    a run probed at step 0 only has it too), then the probe's approximations in their order."""
    cfg = small(tmp_path, optimizer=optimizer, epochs=1, probe_every=probe_every)
    probe = xr.open_dataset(train(cfg)["probe"]).load()
    own = ["kfac@optimizer"] if optimizer == "kfac" else []
    assert list(probe.approximation.values) == [*own, *cfg.probe_approximations]
    assert probe.attrs["damping_strategies"].split(";")[0].startswith((own or cfg.probe_approximations)[0] + "=")
    if own:
        values = probe.rel_frobenius_error.sel(approximation=own[0])
        assert np.isnan(values.sel(step=0)).all() and (probe_every == 100 or np.isfinite(values.sel(step=6)).all())


def test_resume_continues_identically(tmp_path: Path) -> None:
    full = train(small(tmp_path / "full", epochs=3))
    train(small(tmp_path / "split", epochs=1))
    resumed = train(small(tmp_path / "split", epochs=3), resume=True)
    a = torch.load(full["checkpoint"], weights_only=False)
    b = torch.load(resumed["checkpoint"], weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    ma, mb = xr.open_dataset(full["metrics"]).load(), xr.open_dataset(resumed["metrics"]).load()
    np.testing.assert_array_equal(ma.train_loss, mb.train_loss)
    pa, pb = xr.open_dataset(full["probe"]).load(), xr.open_dataset(resumed["probe"]).load()
    np.testing.assert_array_equal(pa.step, pb.step)
    np.testing.assert_array_equal(pa.approximation, pb.approximation)
    assert pa.attrs == pb.attrs
    np.testing.assert_allclose(pa.rel_frobenius_error, pb.rel_frobenius_error, rtol=1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "kfac"])
@pytest.mark.filterwarnings("ignore:KFAC. non-finite loss:RuntimeWarning")
def test_a_diverged_run_stops_and_records_nan(tmp_path: Path, optimizer: str) -> None:
    cfg = small(tmp_path, optimizer=optimizer, lr=1e30, kl_clip=None, damping=1e-8, epochs=4,
                batch_size=10, probe_every=0)
    with pytest.warns(RuntimeWarning, match="diverged"):
        paths = train(cfg)
    metrics = xr.open_dataset(paths["metrics"]).load()
    assert list(metrics.epoch.values) == [1, 2, 3, 4]
    at = int(metrics.attrs["diverged_at_step"])
    assert metrics.steps.values[0] == at + DIVERGED_AFTER < 30  # stopped inside epoch 1 of 30 steps
    # counts are integers (they were floats: 4.0 steps), the epochs never run have no process count
    assert metrics.steps.dtype.kind == metrics.skipped_steps.dtype.kind == "i"
    assert metrics.world_size.values[0] == 1 and np.isnan(metrics.world_size.values[1:]).all()
    for var in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):  # the diverging epoch included
        assert np.isnan(metrics[var].values).all(), var
    with pytest.warns(RuntimeWarning, match="diverged"):  # resuming does not train a diverged model
        resumed = train(small(tmp_path, optimizer=optimizer, lr=1e30, kl_clip=None, damping=1e-8,
                              epochs=6, batch_size=10, probe_every=0), resume=True)
    again = xr.open_dataset(resumed["metrics"]).load()
    assert again.sizes["epoch"] == 6 and int(again.steps.values[-1]) == at + DIVERGED_AFTER


@pytest.mark.filterwarnings("ignore:curvlab train. sgd diverged:RuntimeWarning")
def test_divergence_is_detected_across_epochs_and_a_resume(tmp_path: Path) -> None:
    """Six steps an epoch, fewer than DIVERGED_AFTER: the non-finite streak carries over epochs."""
    def cfg(out: str, epochs: int) -> TrainConfig:
        return small(tmp_path / out, optimizer="sgd", lr=1e30, epochs=epochs, probe_every=0)

    whole = xr.open_dataset(train(cfg("whole", 6))["metrics"]).load()
    at = int(whole.attrs["diverged_at_step"])
    steps_per_epoch = int(whole.steps.values[0])
    assert steps_per_epoch < DIVERGED_AFTER and int(whole.steps.values[-1]) == at + DIVERGED_AFTER
    # a NaN model has no predictions: its accuracy is NaN, not the share of class 0
    assert np.isnan(whole.train_accuracy.values).all() and np.isnan(whole.test_accuracy.values).all()

    train(cfg("split", 2))  # stops before the streak is long enough, then resumes
    split = xr.open_dataset(train(cfg("split", 6), resume=True)["metrics"]).load()
    assert int(split.attrs["diverged_at_step"]) == at
    np.testing.assert_array_equal(split.steps.values, whole.steps.values)


@pytest.mark.filterwarnings("ignore:curvlab train. sgd diverged:RuntimeWarning")
def test_a_diverging_run_with_probes_records_them_as_nan(tmp_path: Path) -> None:
    """The probe of a network whose output is no longer finite raised (the extraction refuses a
    NaN output), which ended the run before its first checkpoint; it is recorded as NaN and the
    run stops as a diverged run does, the probes before the divergence kept."""
    def cfg(epochs: int) -> TrainConfig:
        return small(tmp_path, optimizer="sgd", lr=1e30, epochs=epochs, batch_size=10, probe_every=3,
                     probe_approximations=("kflr", "tekfac"))

    paths = train(cfg(2))
    metrics = xr.open_dataset(paths["metrics"]).load()
    at = int(metrics.attrs["diverged_at_step"])
    probe = xr.open_dataset(paths["probe"]).load()
    steps = list(range(0, at + DIVERGED_AFTER + 1, 3))
    assert list(probe.step.values) == steps
    assert np.isfinite(probe.batch_loss.sel(step=0)) and np.isfinite(probe.exact_trace.sel(step=0)).all()
    late = probe.sel(step=[s for s in steps if s > at + 1])  # the parameters are NaN from then on
    for var in ("batch_loss", "exact_trace", "rel_frobenius_error", "exact_eigenvalues"):
        assert np.isnan(late[var].values).all(), var
    again = train(cfg(3), resume=True)  # the NaN probes are part of the run
    assert list(xr.open_dataset(again["probe"]).load().step.values) == steps


def test_a_run_on_an_indexed_cpu_device_resumes(tmp_path: Path) -> None:
    """``--device cpu:0`` trains, but its checkpoint was refused on resume as "not a readable
    curvlab checkpoint ... truncated, from another program, or crafted" (torch.load cannot map
    storages to "cpu:0"); it resumes as the same run on "cpu" does."""
    train(small(tmp_path / "indexed", epochs=1, device="cpu:0"))
    resumed = train(small(tmp_path / "indexed", epochs=2, device="cpu"), resume=True)  # cpu:0 is the cpu
    train(small(tmp_path / "plain", epochs=2, device="cpu"))
    metrics = xr.open_dataset(resumed["metrics"]).load()
    plain = xr.open_dataset(tmp_path / "plain" / "metrics.nc").load()
    np.testing.assert_array_equal(metrics.train_loss.values, plain.train_loss.values)
    np.testing.assert_array_equal(metrics.test_loss.values, plain.test_loss.values)


BATCHNORM1D_MODEL = """
from torch import nn
def net(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_classes))
"""


def test_a_batch_of_one_example_a_batchnorm_cannot_take_is_refused_before_training(tmp_path: Path) -> None:
    """301 examples in batches of 50: the epoch's last batch has one example, which BatchNorm1d
    refuses in train mode; torch's error ended the run at that batch, after the epoch's steps and
    before its checkpoint.  It is refused before any step, naming the option; a model that takes
    one example (BatchNorm2d over 8×8 pixels) trains, and so does 302 examples."""
    (tmp_path / "nets.py").write_text(BATCHNORM1D_MODEL)
    spec = f"{tmp_path / 'nets.py'}:net"
    with pytest.raises(ValueError, match=r"the last batch of an epoch gives a process one example \(301 training "
                                         r"examples in batches of 50\).*choose another --batch-size"):
        train(small(tmp_path / "one", model=spec, model_kwargs={}, train_size=301, probe_every=0))
    assert not (tmp_path / "one").exists() or not any((tmp_path / "one").iterdir())
    with pytest.raises(ValueError, match="every batch of an epoch gives a process one example"):
        train(small(tmp_path / "ones", model=spec, model_kwargs={}, batch_size=1, probe_every=0))
    metrics = xr.open_dataset(train(small(tmp_path / "two", model=spec, model_kwargs={}, train_size=302,
                                          probe_every=0, epochs=1))["metrics"]).load()
    assert int(metrics.steps.values[-1]) == 7
    train(small(tmp_path / "cnn", model="cnn", model_kwargs={}, train_size=301, probe_every=0, epochs=1))


LSTM_MODEL = """
from torch import nn
class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.rnn, self.out = nn.LSTM(8, 6, batch_first=True), nn.Linear(6, num_classes)
    def forward(self, x):
        h, _ = self.rnn(x.reshape(x.shape[0], 8, 8))
        return self.out(h[:, -1])
def net(num_classes):
    return Net(num_classes)
"""


def test_the_probe_measures_an_lstm_as_parameter_blocks(tmp_path: Path) -> None:
    """An LSTM's parameters were left out of the probe (and refused by the report): each is now
    an exact parameter block, measured at every probe; the optimizer updates it first order."""
    (tmp_path / "nets.py").write_text(LSTM_MODEL)
    paths = train(small(tmp_path / "run", model=f"{tmp_path / 'nets.py'}:net", model_kwargs={}, epochs=1))
    probe = xr.open_dataset(paths["probe"]).load()
    lstm = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"]
    assert list(probe.layer.values) == [*lstm, "out"] and probe.attrs["skipped_parameters"] == "none"
    assert list(probe.block_kind.values) == ["parameter"] * 4 + ["kronecker"]
    assert (probe.exact_trace.sel(layer=lstm) > 0).all() and "'rnn.weight_ih_l0' (LSTM)" in probe.attrs["engine_reason"]


def test_label_smoothing_is_the_loss_trained_and_probed(tmp_path: Path) -> None:
    """The same seed with and without smoothing: the same first probe's exact Fisher (its
    loss-Hessian is cross-entropy's), other losses and steps; a resume must keep it."""
    runs = {eps: train(small(tmp_path / str(eps), label_smoothing=eps, epochs=1)) for eps in (0.0, 0.2)}
    probes = {eps: xr.open_dataset(p["probe"]).load() for eps, p in runs.items()}
    metrics = {eps: xr.open_dataset(p["metrics"]).load() for eps, p in runs.items()}
    assert probes[0.2].attrs["loss"] == "CrossEntropyLoss(reduction=mean, label_smoothing=0.2)"
    first = {eps: p.isel(step=0) for eps, p in probes.items()}
    np.testing.assert_allclose(first[0.2].exact_trace, first[0.0].exact_trace, rtol=1e-5)
    assert abs(float(first[0.2].batch_loss - first[0.0].batch_loss)) > 1e-3
    assert abs(float(metrics[0.2].train_loss[0] - metrics[0.0].train_loss[0])) > 1e-3
    with pytest.raises(ValueError, match=r"--label-smoothing 0\.2 \(now 0\.0\)"):
        train(small(tmp_path / "0.2", epochs=2), resume=True)


def test_the_default_probe_batch_takes_at_most_the_training_examples(tmp_path: Path) -> None:
    """--train-size 40 with the default probe batch (128) failed with "batch size 128 must be in
    [1, 40]", naming no option; the default takes the 40 there are."""
    paths = train(small(tmp_path, train_size=40, batch_size=20, probe_every=1, probe_batch_size=None, epochs=1))
    assert xr.open_dataset(paths["probe"]).attrs["num_examples"] == 40


def test_a_resume_on_another_thread_count_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's bit-identical resume needs the run's thread count (BLAS splits its sums by
    thread); a resume on another one ran without a word."""
    with torch_threads(1):
        train(small(tmp_path, epochs=1, probe_every=0))
    with torch_threads(2):
        train(small(tmp_path, epochs=2, probe_every=0), resume=True)
    assert "was trained on 1 torch thread(s), this run has 2" in capsys.readouterr().err
    with torch_threads(2):
        train(small(tmp_path, epochs=3, probe_every=0), resume=True)
    assert "torch thread" not in capsys.readouterr().err


def test_resume_refuses_other_configuration(tmp_path: Path) -> None:
    train(small(tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"written with other options: --lr 0\.1 \(now 0\.5\); resume with those"):
        train(small(tmp_path, epochs=2, lr=0.5), resume=True)
    train(small(tmp_path / "defaults", epochs=1, probe_every=0, model_kwargs={}))  # (a QA: "(--hidden)  (now …")
    with pytest.raises(ValueError, match=r"the model options \(--hidden\) the model's defaults \(now hidden=\(16,\)\)"):
        train(small(tmp_path / "defaults", epochs=2, probe_every=0), resume=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(small(tmp_path / "empty"), resume=True)
    # the model file changed under the same spec: the message says where the weights do not fit
    nets = tmp_path / "nets.py"
    nets.write_text("from torch import nn\ndef net(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))\n")
    spec = dict(model=f"{nets}:net", model_kwargs={}, epochs=1, optimizer="sgd", probe_every=0, probe_batch_size=None)
    train(small(tmp_path / "edited", **spec))
    nets.write_text(nets.read_text().replace("8", "12"))
    with pytest.raises(ValueError, match=r"does not fit this model and optimizer \(Error\(s\) in loading state_dict .* size mismatch for 1\.weight"):
        train(small(tmp_path / "edited", **{**spec, "epochs": 2}), resume=True)


def test_a_resume_with_another_optimizer_says_so_before_the_options_it_leaves_unused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Resuming a TEKFAC run with --optimizer kfac and the command's other options was refused for
    --scale-interval, which KFAC does not use: a detour before the message that explains it."""
    from curvlab.app.cli import main

    args = ["train", "--dataset", "digits", "--hidden", "8", "--batch-size", "50", "--train-size", "100",
            "--test-size", "50", "--scale-interval", "5", "--no-progress", "--no-figures", "--out", str(tmp_path / "run")]
    assert main([*args, "--optimizer", "tekfac", "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*args, "--optimizer", "kfac", "--epochs", "2", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "written with other options: --optimizer tekfac (now kfac)" in err and "does not use" not in err, err
    # without --resume the option the optimizer leaves unused is the error, as before
    assert main([*args, "--optimizer", "kfac", "--epochs", "2", "--overwrite"]) == 2
    assert "--scale-interval given, which --optimizer kfac does not use" in capsys.readouterr().err


def test_cli_resumes_after_being_killed(tmp_path: Path) -> None:
    """A real SIGKILL during training; --resume finishes with the uninterrupted result (without
    the figures, which other tests redraw, as three runs here redrawing them took a minute)."""
    args = [sys.executable, "-m", "curvlab", "train", "--dataset", "digits", "--hidden", "16",
            "--optimizer", "tekfac", "--batch-size", "20", "--train-size", "600", "--test-size", "100",
            "--probe-every", "25", "--probe-batch-size", "20", "--no-progress", "--no-figures"]
    ref = subprocess.run(args + ["--epochs", "2", "--out", str(tmp_path / "ref")], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--epochs", "2", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (out / CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(args + ["--epochs", "2", "--out", str(out), "--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    a = xr.open_dataset(tmp_path / "ref" / "metrics.nc").load()
    b = xr.open_dataset(out / "metrics.nc").load()
    np.testing.assert_array_equal(a.train_loss, b.train_loss)
    np.testing.assert_array_equal(a.test_accuracy, b.test_accuracy)


def test_a_sigterm_stops_a_one_process_run_as_a_ctrl_c_does(tmp_path: Path) -> None:
    """A batch scheduler's SIGTERM (scancel, a time limit) ended a one-process run silently, exit
    status 143 and its lock left behind; now it says how to go on, as a Ctrl-C does, and the run
    resumes from its last epoch."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "curvlab", "train", "--dataset", "digits", "--hidden", "8", "--optimizer", "kfac",
            "--batch-size", "50", "--train-size", "200", "--test-size", "50", "--no-progress", "--no-figures",
            "--out", str(out)]
    proc = subprocess.Popen(args + ["--epochs", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / CHECKPOINT).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == f"curvlab train: stopped by SIGTERM; resume with the same command and --resume (--out {out})", err
    assert not (out / ".curvlab.lock").exists()
    done = torch.load(out / CHECKPOINT, weights_only=True)["epoch"]  # (metrics.nc follows it: maybe not yet)
    resumed = subprocess.run(args + ["--epochs", str(done + 1), "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert xr.open_dataset(out / "metrics.nc").sizes["epoch"] == done + 1


def test_a_sigterm_is_caught_where_sigint_is_ignored() -> None:
    """A run started with ``&`` by a script inherits SIGINT ignored; its SIGTERM handler was not
    installed either, so a scheduler's stop ended it silently, its lock left behind (QA16)."""
    from curvlab.app import interrupts

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.remembered():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # left as the parent set it
            assert signal.getsignal(signal.SIGTERM) is interrupts.raise_interrupt
            with pytest.raises(interrupts.Stopped):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_train_mode_probe_measures_the_train_mode_forward_and_changes_nothing() -> None:
    """The eval-mode probe compares the optimizer's statistics, collected in train mode, with the
    Fisher of the eval-mode network (BatchNorm's running statistics): misleading early on.  In
    train mode it measures what ``curvlab.compare`` measures of the train-mode network, with the
    same Dropout masks every time, and leaves the model (running statistics, mode) and the
    random state as they were."""
    import copy

    from torch import nn

    import curvlab
    from curvlab.app.train.probe import Probe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3),
                          nn.Linear(4 * 6 * 6, 5)).double().eval()
    x, y = torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (12,))
    loss_fn, opt = nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()

    def probe(mode: str) -> xr.Dataset:
        return Probe(x, y, loss_fn, approximations=("kflr", "tekfac"), seed=3, mode=mode).run(0, model, opt)

    measured = probe("train")
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # BatchNorm's running statistics and count put back
    reference = curvlab.compare(copy.deepcopy(model).train(), loss_fn, x, y, approximations=("kflr", "tekfac"),
                                seed=3, num_eigenvalues=64)
    for var in ("rel_frobenius_error", "ng_cosine", "trace_ratio"):
        got = measured[var].isel(step=0).sel(layer=["0", "5"])
        np.testing.assert_allclose(got.values, reference[var].sel(layer=["0", "5"], approximation=got.approximation).values,
                                   rtol=1e-10, err_msg=var)
    xr.testing.assert_identical(probe("train"), measured)  # the same masks every probe
    eval_error = probe("eval").rel_frobenius_error.sel(layer="0").values
    assert np.abs(eval_error - measured.rel_frobenius_error.isel(step=0).sel(layer="0").values).max() > 1e-3


def test_a_probe_of_statistics_beyond_float32_is_recorded_as_nan() -> None:
    """A diverging run whose loss is still finite: its activations' squares overflow float32 in
    the probe's factors, and the probe raised ("a 65×65 factor to eigen-decompose has non-finite
    entries") at the end of an epoch, which was lost with its checkpoint (QA25).  It is recorded as
    NaN, naming the layers; of the initial network, refused naming them."""
    from torch import nn

    from curvlab.app.train.probe import Probe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss_fn, opt = nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), lr=0.1)
    probe = Probe(x, y, loss_fn, approximations=("kflr", "ekfac"))
    assert np.isfinite(probe.run(0, model, opt).rel_frobenius_error.values).all()
    with torch.no_grad():
        model[0].weight.mul_(1e22)  # the second layer's inputs ~1e22: their squares overflow float32
        assert torch.isfinite(loss_fn(model(x), y))
    with pytest.warns(RuntimeWarning, match=r"the probe at step 8: the statistics of layers \['2'\] are not finite"):
        diverged = probe.run(8, model, opt)
    assert np.isnan(diverged.rel_frobenius_error.values).all() and diverged.step.values.tolist() == [8]
    with pytest.raises(ValueError, match=r"the probe of the initial network: the statistics of layers \['2'\]"):
        Probe(x, y, loss_fn, approximations=("kflr",)).run(0, model, opt)


def test_the_probe_measures_with_the_optimizers_weight_sharing_convention() -> None:
    """An optimizer under kfac_approx='reduce' was probed beside fresh approximations built under
    'expand', and probe.nc said expand (QA25)."""
    from torch import nn

    import curvlab
    from curvlab.app.train.probe import Probe
    from curvlab.optim import EKFAC

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    x, y = torch.randn(24, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (24,))
    loss_fn = nn.CrossEntropyLoss()
    opt = EKFAC(model, lr=0.01, kfac_approx="reduce")
    probed = Probe(x, y, loss_fn, approximations=("kflr",), seed=3).run(0, model, opt)
    reference = curvlab.compare(model, loss_fn, x, y, approximations=("kflr",), seed=3, kfac_approx="reduce")
    assert probed.attrs["kfac_approx"] == "reduce"
    np.testing.assert_allclose(probed.rel_frobenius_error.sel(approximation="kflr").isel(step=0).values,
                               reference.rel_frobenius_error.sel(approximation="kflr").values, rtol=1e-10)


@pytest.mark.parametrize("optimizer,unused,used", [
    ("sgd", ("damping_strategy", "stats_interval", "kl_clip", "factor_dtype"), ("lr", "momentum", "weight_decay", "damping")),
    ("adam", ("momentum", "eigen_interval", "basis"), ("lr", "weight_decay")),
    ("kfac", ("scale_interval", "basis"), ("damping", "stats_interval", "kl_clip", "mc_samples")),
    ("tekfac", ("mc_samples",), ("scale_interval", "basis", "fisher")),
])
def test_the_files_mark_the_options_a_run_does_not_use(tmp_path: Path, optimizer: str, unused, used) -> None:
    """metrics.nc recorded KFAC's damping strategy, intervals and clipping for an SGD run as if
    they applied (the damping does: the probe's λ); an old checkpoint with those values resumes."""
    cfg = small(tmp_path, optimizer=optimizer, epochs=1, fisher="exact" if optimizer == "tekfac" else "mc")
    paths = train(cfg)
    attrs = xr.open_dataset(paths["metrics"]).attrs
    assert all(attrs[f"config_{k}"] == f"not used by {optimizer}" for k in unused)
    assert all(not str(attrs[f"config_{k}"]).startswith("not used") for k in used)
    ckpt = torch.load(paths["checkpoint"], weights_only=False)
    for k in unused:  # as older checkpoints recorded them: the values of the defaults
        ckpt["config"][f"config_{k}"] = str(getattr(cfg.optimizer_options(), k))
    torch.save(ckpt, paths["checkpoint"])
    resumed = train(dataclasses.replace(cfg, epochs=2), resume=True)
    assert xr.open_dataset(resumed["metrics"]).sizes["epoch"] == 2


def test_the_probes_name_the_layers_whose_natural_gradient_is_unresolved(tmp_path: Path) -> None:
    """At a damping far below ‖F‖·ε₆₄ the exact natural gradient is NaN; which layers, per probe,
    was an attribute that the series dropped as soon as two probes disagreed."""
    with pytest.warns(RuntimeWarning, match="beyond float64's reach"):
        paths = train(small(tmp_path, optimizer="sgd", epochs=1, damping=1e-14, probe_every=3,
                            probe_approximations=("kfac",)))
    probe = xr.open_dataset(paths["probe"]).load()
    named = [str(v) for v in probe.ng_unresolved.values]
    assert len(named) == probe.sizes["step"] and all(v != "none" for v in named)
    for step, layers in zip(probe.step.values, named):
        cos = probe.ng_cosine.sel(step=step, approximation="kfac")
        assert set(layers.split(",")) == {str(l) for l in cos.layer.values[np.isnan(cos.values)]}


class _DiscardsAnInterrupt:
    """Ctrl-C arriving inside a ``__del__`` (as inside h5py's weakref callbacks while metrics.nc
    is written): Python prints "Exception ignored in …" and drops the KeyboardInterrupt."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):  # the handler runs here, inside __del__
            pass


@pytest.fixture
def sigint_from_a_terminal() -> Iterator[None]:
    """SIGINT raising ``KeyboardInterrupt``, as a terminal's Ctrl-C does, for the test: pytest started
    in the background by a script (``pytest &``, as a CI job may be) inherits SIGINT ignored, which a
    run rightly leaves ignored (:func:`test_a_sigterm_is_caught_where_sigint_is_ignored`)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.usefixtures("sigint_from_a_terminal")
def test_a_ctrl_c_python_discards_still_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """9 of 12 Ctrl-Cs sent to a small run were lost in its file writes and it trained on; now
    the one discarded while the first epoch's metrics.nc is written stops the run after that
    epoch's files, with the exit status of an interrupt — and the run resumes from them."""
    import curvlab.app.train.loop as loop
    from curvlab.app.cli import main

    write = loop.write_netcdf

    def interrupted_write(*args, **kwargs):
        _DiscardsAnInterrupt()  # collected at once: its __del__ takes the signal
        return write(*args, **kwargs)

    monkeypatch.setattr(loop, "write_netcdf", interrupted_write)
    args = ["train", "--dataset", "digits", "--hidden", "8", "--optimizer", "kfac", "--batch-size", "50",
            "--train-size", "200", "--test-size", "50", "--epochs", "3", "--no-progress", "--no-figures",
            "--out", str(tmp_path / "run")]
    assert main(args) == 130
    assert capsys.readouterr().err.endswith(f"curvlab train: stopped by SIGINT; resume with the same command and --resume (--out {tmp_path / 'run'})\n")
    assert xr.open_dataset(tmp_path / "run" / "metrics.nc").sizes["epoch"] == 1
    monkeypatch.setattr(loop, "write_netcdf", write)
    assert main([*args, "--resume"]) == 0
    assert xr.open_dataset(tmp_path / "run" / "metrics.nc").sizes["epoch"] == 3


def test_a_negative_kl_clip_says_what_the_command_line_takes(capsys: pytest.CaptureFixture[str]) -> None:
    """It said "(None disables it)", which cannot be typed; the command line's 0 does (QA16)."""
    from curvlab.app.cli import main

    assert main(["train", "--kl-clip", "-1", "--epochs", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().endswith("--kl-clip -1.0 must be a positive finite number (0 disables it)")
