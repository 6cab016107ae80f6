"""Runs that a careless user interrupts, repeats or misconfigures: checkpoints, output folders,
resumes and the command line's errors (one test per defect found; library input in
tests/test_reliability.py).  Training runs here are tiny (digits, an 8-unit MLP, a few steps);
the faults that need a process of their own (kills, two runs at once, a full disk) are in
tests/test_faults.py.
"""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from curvlab.app.cli import main
from curvlab.app.data import DataError, read_idx
from curvlab.app.train import TrainConfig, train
from curvlab.app.train.config import check_batches

FAST_TRAIN = ["--hidden", "8", "--train-size", "120", "--test-size", "40", "--batch-size", "40",
              "--epochs", "1", "--no-progress", "--no-figures"]  # (test_train_figures draws them)


def small(out: Path | str, **kw) -> TrainConfig:
    base = dict(model="mlp", dataset="digits", optimizer="tekfac", epochs=1, batch_size=40, train_size=120,
                test_size=40, probe_every=0, probe_batch_size=8, out=str(out), progress=False, figures=False,
                model_kwargs={"hidden": (8,)}, stats_interval=1, eigen_interval=2, scale_interval=1)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------ 1. checkpoints never run code


class _Payload:
    """Pickles as a call of os.system: what a crafted checkpoint would do on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_runs_code_from_the_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    torch.save({"model": _Payload(marker), "config": {}}, out / "checkpoint.pt")
    assert pickle.loads(pickle.dumps(_Payload(marker))) == 0 and marker.exists()  # the payload works
    marker.unlink()
    code = main(["train", *FAST_TRAIN, "--out", str(out), "--resume"])
    assert code == 1 and not marker.exists()
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "Traceback" not in err
    # nor does it pass on torch's advice to load it with weights_only=False
    assert "weights_only" not in err and "tensors and plain data" in err


# --------------------------------------------------------- 3. non-finite hyper-parameters on the command line


@pytest.mark.parametrize("args", [["--damping", "0"], ["--lr", "nan"], ["--damping", "inf"], ["--momentum", "nan"],
                                  ["--kl-clip", "nan"]])
def test_cli_refuses_non_finite_or_zero_hyper_parameters(args: list[str], tmp_path: Path, capsys) -> None:
    assert main(["train", *FAST_TRAIN, *args, "--out", str(tmp_path / "o")]) == 2
    assert f"error: {args[0]} {args[1]}" in capsys.readouterr().err  # named as on the command line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------- 4. lost or mixed output


def test_train_refuses_an_existing_run_unless_resume_or_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", *FAST_TRAIN, "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert main(["train", *FAST_TRAIN, "--seed", "1", "--out", str(out)]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main(["train", *FAST_TRAIN, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["config_seed"] == 1
    assert not (out / ".curvlab.lock").exists()


def test_overwrite_loses_nothing_when_the_new_run_fails_its_checks(tmp_path: Path, capsys) -> None:
    """--overwrite removed the previous run's files before the new run's model and data were
    checked: a typo in --data-dir wiped a finished run."""
    out = tmp_path / "run"
    assert main(["train", *FAST_TRAIN, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad_data = ["--dataset", "mnist", "--data-dir", str(tmp_path / "no-such-folder")]
    assert main(["train", *FAST_TRAIN, *bad_data, "--out", str(out), "--overwrite"]) != 0
    assert "mnist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


STOPPING_MODEL = '''
import os
from torch import nn


class Stops(nn.Sequential):
    calls = 0

    def forward(self, x):
        Stops.calls += 1
        if Stops.calls == 3:  # in the first epoch, after the step-0 probe wrote probe.nc
            if os.environ.get("CURVLAB_TEST_STOP") == "kill":
                os._exit(9)  # as SIGKILL: no cleanup runs
            raise KeyboardInterrupt
        return super().forward(x)


def build(input_shape, num_classes):
    return Stops(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, num_classes))
'''


@pytest.mark.parametrize("how", ["interrupted", "killed"])
def test_overwrite_loses_nothing_when_the_new_run_stops_before_its_first_checkpoint(
        tmp_path: Path, how: str, capsys) -> None:
    """The replaced run stays until the new one has a checkpoint: a run stopped in its first
    epoch (Ctrl-C) puts it back; one killed leaves it set aside, and the next run puts it back."""
    out = tmp_path / "run"
    assert main(["train", *FAST_TRAIN, "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "stops.py").write_text(STOPPING_MODEL)
    new_run = ["train", *FAST_TRAIN[2:], "--model", f"{tmp_path / 'stops.py'}:build", "--probe-every", "1",
               "--probe-batch-size", "8", "--out", str(out), "--overwrite"]
    if how == "interrupted":
        assert main(new_run) == 130
    else:
        env = {**os.environ, "CURVLAB_TEST_STOP": "kill"}
        done = subprocess.run([sys.executable, "-m", "curvlab", *new_run], capture_output=True, text=True, env=env,
                              timeout=120)
        assert done.returncode == 9, done.stderr[-2000:]
        assert (out / ".curvlab-replaced" / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]
        assert main(["train", *FAST_TRAIN, "--out", str(out), "--resume"]) == 0  # puts it back, then resumes it
        assert "put back the run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # a new run that saves its checkpoint replaces it for good
    assert main(["train", *FAST_TRAIN, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["config_seed"] == 1


def test_a_failed_run_leaves_no_folder_behind(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    bad_data = ["--dataset", "mnist", "--data-dir", str(tmp_path / "no-such-folder")]
    assert main(["train", *FAST_TRAIN, *bad_data, "--out", str(out)]) != 0
    assert not out.exists()


def _tiny_mnist(folder: Path, n: int = 150) -> None:
    """IDX files of ``n`` random 28×28 images per split, named as MNIST's."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        header = b"\x00\x00\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
        (folder / f"{split}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + n.to_bytes(4, "big") + labels.tobytes())


def test_resume_from_another_directory_finds_the_same_data(tmp_path: Path, monkeypatch) -> None:
    """The checkpoint kept --data-dir as typed and the resume resolved it against its own working
    directory: the same folder named from elsewhere was refused (and another one with the same
    relative name would have been accepted)."""
    _tiny_mnist(tmp_path / "data" / "mnist")
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "run"
    args = ["train", *FAST_TRAIN, "--dataset", "mnist", "--optimizer", "sgd", "--out", str(out)]
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--data-dir", "data/mnist"]) == 0
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main([*args, "--data-dir", "../data/mnist", "--epochs", "2", "--resume"]) == 0
    _tiny_mnist(tmp_path / "elsewhere" / "data" / "mnist")  # another folder, the first spelling
    assert main([*args, "--data-dir", "data/mnist", "--epochs", "3", "--resume"]) == 1


@pytest.mark.parametrize("command", ["train", "report"])
@pytest.mark.parametrize("count", ["0", "-1"])
def test_nproc_below_one_is_refused(command: str, count: str, tmp_path: Path, capsys) -> None:
    assert main([command, "--nproc", count, "--out", str(tmp_path / "o")]) == 2
    assert f"argument --nproc: must be at least 1, got {count}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,said", [
    (["--optimizer", "kfac", "--scale-interval", "3"], "--scale-interval given, which --optimizer kfac does not use"),
    (["--optimizer", "tkfac", "--basis", "kfac"], "--basis given, which --optimizer tkfac does not use"),
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum given, which --optimizer adam does not use"),  # its default
    (["--optimizer", "adam", "--mom", "0.9"], "--momentum given"),  # abbreviated, as argparse takes it
    (["--optimizer", "adam", "--damping", "0.1"], "--damping given, which"),  # not --damping-strategy
])
def test_an_option_the_optimizer_does_not_use_is_refused(args: list[str], said: str, tmp_path: Path, capsys) -> None:
    """Accepted and ignored: --scale-interval by KFAC/TKFAC (and recorded, so a resume without it
    was refused), --momentum 0.9 by Adam (the default's value passed as given)."""
    assert main(["train", *FAST_TRAIN, *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the usage lines)
    assert said in err and "--damping-strategy" not in err and not (tmp_path / "o").exists()


def test_a_train_mode_probe_of_one_example_through_batchnorm_names_the_option(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "bn.py"
    spec.write_text("from torch import nn\n"
                    "def build(input_shape, num_classes):\n"
                    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))\n")
    assert main(["train", *FAST_TRAIN[2:], "--model", f"{spec}:build", "--probe-every", "1", "--probe-batch-size", "1",
                 "--probe-mode", "train", "--out", str(tmp_path / "o")]) == 1
    assert "probe_batch_size=1 (--probe-batch-size) with probe_mode='train'" in capsys.readouterr().err


@pytest.mark.parametrize("args, said", [
    (["--optimizer", "kfac"], True),  # eval mode reads BatchNorm's running statistics, training the batch's
    (["--optimizer", "kfac", "--probe-mode", "train"], False),  # the Fisher the optimizer approximates
    (["--optimizer", "sgd"], False),  # no optimizer's approximation probed
])
def test_an_eval_mode_probe_of_a_batchnorm_model_says_what_the_optimizer_is_measured_against(
        args: list[str], said: bool, tmp_path: Path, capsys) -> None:
    """Measured on ResNet-18 on digits, KFAC, step 2: kfac@optimizer's relative Frobenius error
    78–9 811 per layer in eval mode, 0.82–1.56 in train mode (`curvlab train`, probe batch 8)."""
    spec = tmp_path / "bn.py"
    spec.write_text("from torch import nn\n"
                    "def build(input_shape, num_classes):\n"
                    "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))\n")
    assert main(["train", *FAST_TRAIN[2:], "--model", f"{spec}:build", "--probe-every", "1", "--probe-batch-size", "4",
                 *args, "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert ("kfac@optimizer is measured against another Fisher than the one it approximates" in err) == said
    assert xr.open_dataset(tmp_path / "o" / "probe.nc").attrs["probe_mode"] == ("train" if "train" in args else "eval")


def test_an_eval_mode_probe_without_batchnorm_says_nothing_of_it(tmp_path: Path, capsys) -> None:
    assert main(["train", *FAST_TRAIN, "--optimizer", "kfac", "--probe-every", "1", "--probe-batch-size", "4",
                 "--out", str(tmp_path / "o")]) == 0
    assert "measured against another Fisher" not in capsys.readouterr().err


@pytest.mark.parametrize("args", [
    ["train", "--probe-batch-size", "8"],  # no --probe-every: the probe never runs
    ["train", "--probe-fisher", "mc"],
    ["train", "--probe-approximations", "kfac"],
    ["train", "--probe-mode", "train"],
    ["report", "--approximations", "kfac", "--damping-strategy", "tekfac=nor"],  # tekfac not measured
])
def test_an_option_that_would_be_ignored_is_refused(args: list[str], tmp_path: Path, capsys) -> None:
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert ("--probe-every" in err) if args[0] == "train" else ("--damping-strategy names tekfac" in err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("command", ["train", "report"])
def test_a_model_file_that_builds_nothing_is_a_usage_error_naming_model(command: str, nproc: int, tmp_path: Path,
                                                                        capfd) -> None:
    """``train`` exited 1 where ``report`` exited 2, and neither named --model (an unknown
    built-in name says "argument --model:", exit 2)."""
    spec = f"{tmp_path / 'nofile.py'}:net"
    assert main([command, "--nproc", str(nproc), "--model", spec, "--out", str(tmp_path / "o")]) == 2
    out, err = capfd.readouterr()
    assert err.strip().endswith(f"curvlab {command}: error: argument --model: model spec {spec!r}: file "
                                f"{tmp_path / 'nofile.py'} not found")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["train", "report"])
def test_a_missing_data_dir_is_reported_before_the_processes_start(command: str, tmp_path: Path, capfd) -> None:
    """With --nproc 2 every rank reported it, and torchrun its own traceback: 95 lines."""
    missing = tmp_path / "no-such-folder"
    assert main([command, "--nproc", "2", "--dataset", "mnist", "--data-dir", str(missing),
                 "--out", str(tmp_path / "o")]) == 1
    out, err = capfd.readouterr()
    assert err.strip() == f"curvlab {command}: error: mnist: data directory {missing} (--data-dir; data_dir= in Python) does not exist"
    assert main([command, "--nproc", "2", "--dataset", "mnist", "--out", str(tmp_path / "o")]) == 1  # none given
    out, err = capfd.readouterr()
    assert err.strip().startswith(f"curvlab {command}: error: mnist: no data directory given; pass --data-dir")
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["train", "report"])
def test_an_output_folder_of_something_else_is_reported_before_the_processes_start(command: str, tmp_path: Path,
                                                                                   capfd) -> None:
    """A folder holding a run (train: without --resume/--overwrite) or another command's files:
    every rank reported it, and torchrun its own traceback (47–64 lines)."""
    run = tmp_path / "run"
    assert main(["train", *FAST_TRAIN, "--out", str(run)]) == 0
    capfd.readouterr()
    args = FAST_TRAIN if command == "train" else ["--train-steps", "0", "--batch-size", "8", "--no-progress"]
    assert main([command, "--nproc", "2", *args, "--out", str(run)]) == 1
    out, err = capfd.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (f"{run} already holds a run" if command == "train" else "holds files that are not part of a curvlab report") in err


def test_a_train_mode_probe_on_several_processes_is_refused_before_they_start(tmp_path: Path, capfd) -> None:
    """Shards of the probe batch would each normalise by their own batch statistics."""
    assert main(["train", "--nproc", "2", *FAST_TRAIN, "--probe-every", "2", "--probe-mode", "train",
                 "--out", str(tmp_path / "o")]) == 2
    err = capfd.readouterr().err
    assert "--probe-mode train measures the model's train-mode forward pass on the whole batch" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="probe_mode='train' measures"):
        check_batches(small(tmp_path, probe_every=2, probe_mode="train"), 2)
    check_batches(small(tmp_path, probe_every=2, probe_mode="train"), 1)


@pytest.mark.parametrize("command", ["train", "report"])
def test_a_folder_in_use_or_a_resume_without_a_run_is_reported_before_the_processes_start(
        command: str, tmp_path: Path, capfd) -> None:
    """Every rank reported it, with torchrun's traceback: 61 lines."""
    from curvlab.app.outdir import FolderLock

    out = tmp_path / "busy"
    out.mkdir()
    args = FAST_TRAIN if command == "train" else ["--train-steps", "0", "--batch-size", "8", "--no-progress"]
    with FolderLock(out, "test"):
        assert main([command, "--nproc", "2", *args, "--out", str(out)]) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"{out} is in use by another curvlab run (pid {os.getpid()}" in err, err
    if command == "train":
        missing = tmp_path / "never-ran"
        assert main(["train", "--nproc", "2", *FAST_TRAIN, "--resume", "--out", str(missing)]) == 1
        err = capfd.readouterr().err
        assert err.strip() == f"curvlab train: error: --resume given but {missing / 'checkpoint.pt'} does not exist"
        assert not missing.exists()


def test_train_refuses_a_folder_holding_a_report(tmp_path: Path, capsys) -> None:
    """The run's files went in beside the report: its manifest no longer described the folder,
    and the report could not be written there again."""
    report = tmp_path / "rep"
    assert main(["report", "--train-steps", "0", "--batch-size", "8", "--approximations", "kflr", "--no-progress",
                 "--out", str(report)]) == 0
    before = sorted(p.name for p in report.iterdir())
    for extra in ([], ["--overwrite"]):
        assert main(["train", *FAST_TRAIN, *extra, "--out", str(report)]) == 1
        assert f"{report} holds a curvlab report (report.nc" in capsys.readouterr().err
    assert sorted(p.name for p in report.iterdir()) == before


def test_a_subset_larger_than_the_data_names_the_option(tmp_path: Path, capsys) -> None:
    args = ["train", *FAST_TRAIN, "--out", str(tmp_path / "o")]
    args[args.index("--train-size") + 1] = "100000"
    assert main(args) == 2  # a usage error, as report's --batch-size beyond the data
    assert "train_size=100000 (--train-size) exceeds the train split of digits (1500 examples)" in capsys.readouterr().err


def test_a_probe_batch_larger_than_the_training_set_names_the_option(tmp_path: Path, capsys) -> None:
    """It was cut to the training set's size silently (probe.nc said so, nothing else)."""
    args = ["train", *FAST_TRAIN, "--probe-every", "1", "--probe-batch-size", "121", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "probe_batch_size=121 (--probe-batch-size) exceeds the 120 training examples (--train-size)" in capsys.readouterr().err


def test_an_error_names_the_command_once(tmp_path: Path, capsys) -> None:
    assert main(["train", *FAST_TRAIN, "--probe-approximations", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("curvlab train: error: argument --probe-approximations: unknown approximation(s) nope")
    assert err.count("curvlab") == 1


def test_a_resume_with_nothing_left_to_train_says_so(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", *FAST_TRAIN, "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", *FAST_TRAIN, "--out", str(out), "--resume"]) == 0
    assert "holds 1 epoch(s) already: nothing to train" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path: Path) -> None:
    from curvlab.app.outdir import LOCK_NAME, FolderLock, OutputFolderError

    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out, "test"):
        with pytest.raises(OutputFolderError, match=f"in use by another curvlab run \\(pid {os.getpid()}"):
            train(small(out))
        # a report too (a training holds its folder before its first files)
        assert main(["report", "--batch-size", "8", "--train-steps", "0", "--no-progress", "--out", str(out)]) != 0
        assert list(out.iterdir()) == [out / LOCK_NAME]
    assert not (out / "checkpoint.pt").exists()
    (out / LOCK_NAME).write_text("999999\n")  # left by a killed run: nobody holds it
    assert train(small(out))["checkpoint"].exists()


def test_resume_refuses_a_missing_probe_file(tmp_path: Path) -> None:
    train(small(tmp_path, probe_every=2))
    (tmp_path / "probe.nc").unlink()
    with pytest.raises(ValueError, match="probe.nc is missing"):
        train(small(tmp_path, probe_every=2, epochs=2), resume=True)


def test_probes_are_bit_identical_after_a_resume(tmp_path: Path) -> None:
    """ARPACK's default start vector came from a generator whose state carried over from call to
    call, so a resumed run's probes differed from the uninterrupted run's in the last bits."""
    kw = dict(probe_every=2, batch_size=30)
    full = train(small(tmp_path / "full", epochs=2, **kw))
    train(small(tmp_path / "split", epochs=1, **kw))
    split = train(small(tmp_path / "split", epochs=2, **kw), resume=True)
    a, b = xr.open_dataset(full["probe"]).load(), xr.open_dataset(split["probe"]).load()
    assert a.sizes["step"] == 5 and a.sizes["layer"] == 2
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


# -------------------------------------------------------- 5. one folder, spelled differently


@pytest.mark.parametrize("spelling", ["./rs", "rs/", "ABS"])
def test_resume_accepts_the_folder_spelled_differently(spelling: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    train(small("rs"))
    again = str(tmp_path / "rs") if spelling == "ABS" else spelling
    paths = train(small(again, epochs=2), resume=True)
    assert torch.load(paths["checkpoint"], weights_only=True)["epoch"] == 2


# ------------------------------------------------------- 6. clean errors instead of tracebacks


def test_bit_flipped_gz_idx_file_is_a_data_error(tmp_path: Path) -> None:
    payload = bytes([0, 0, 8, 1]) + (1000).to_bytes(4, "big") + bytes(range(256)) * 4
    blob = bytearray(gzip.compress(payload[:1008], mtime=0))
    blob[80] ^= 0x10  # inside the deflate stream: zlib's own error, not gzip's CRC check
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(blob))
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=str(path)):
        read_idx(path, ndim=1)


def _checkpoints(tmp: Path) -> dict[str, bytes]:
    good = tmp / "good.pt"
    torch.save({"epoch": 1, "model": {"w": torch.ones(2)}}, good)  # a foreign (non-curvlab) checkpoint
    data = good.read_bytes()
    return {
        "truncated": data[: len(data) // 2],
        "random": np.random.default_rng(0).bytes(4096),
        "empty": b"",
        "foreign": data,
        "pickle": pickle.dumps({"model": 1}),
    }


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "foreign", "pickle"])
def test_unreadable_checkpoints_are_a_clean_error(kind: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(_checkpoints(tmp_path)[kind])
    assert main(["train", *FAST_TRAIN, "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert str(out / "checkpoint.pt") in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--hidden", "0"], "--hidden"), (["--hidden", "-3"], "--hidden"), (["--hidden", "8,x"], "--hidden"),
    (["--device", "tpu"], "invalid device 'tpu'"), (["--train-size", "0"], "argument --train-size: expected a positive integer, got '0'"),
    (["--test-size", "0"], "argument --test-size: expected a positive integer, got '0'"),
    # digits is embedded: a --data-dir would be recorded and compared on resume, and read by nothing
    (["--data-dir", "/nonexistent"], "--data-dir given, which --dataset digits does not read"),
    (["--lr", "0"], "--lr 0 would leave the weights as they are"),
])
def test_bad_train_options_are_usage_errors(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["train", *FAST_TRAIN, *args, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def _no_data(*_args, **_kwargs):
    raise AssertionError("the data was loaded before the output folder was checked")


@pytest.mark.parametrize("command", ["train", "report"])
def test_an_output_folder_that_is_a_file_is_reported_before_any_compute(command: str, tmp_path: Path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    monkeypatch.setattr("curvlab.app.data.load_dataset", _no_data)
    monkeypatch.setattr(f"curvlab.app.{'train.loop' if command == 'train' else 'report.run'}.load_dataset", _no_data)
    args = FAST_TRAIN if command == "train" else ["--train-steps", "0", "--no-progress"]
    for out in (blocker, blocker / "sub"):
        assert main([command, *args, "--out", str(out)]) == 1
        assert f"output folder {out}" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


def test_a_read_only_output_folder_is_reported_before_any_compute(tmp_path: Path) -> None:
    """A real read-only folder: by permissions, or (root writes anywhere) a read-only bind mount
    in a private mount namespace; the commands run in a process of their own."""
    out = tmp_path / "ro"
    out.mkdir()
    script = ("import sys, curvlab.app.data as d\n"
              "d.load_dataset = lambda *a, **k: sys.exit('data loaded before the folder check')\n"
              "from curvlab.app.cli import main\n"
              "sys.exit(main(sys.argv[1:]))")
    commands = []
    for command, extra in (("train", FAST_TRAIN), ("report", ["--no-progress"])):
        commands.append([sys.executable, "-c", script, command, *extra, "--out", str(out / "sub")])
    if os.geteuid() != 0:
        out.chmod(0o555)
        wrap = lambda cmd: cmd  # noqa: E731
    else:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {out} {out} && mount -o remount,bind,ro {out}"],
                               capture_output=True, timeout=30)
        if probe.returncode != 0:
            pytest.skip(f"running as root and no read-only bind mount possible: {probe.stderr.decode()[:200]}")
        wrap = lambda cmd: ["unshare", "-m", "sh", "-c",  # noqa: E731
                            f'mount --bind {out} {out} && mount -o remount,bind,ro {out} && exec "$@"', "sh", *cmd]
    try:
        for cmd in commands:
            proc = subprocess.run(wrap(cmd), capture_output=True, text=True, timeout=180, cwd=tmp_path)
            assert proc.returncode == 1, proc.stderr
            assert f"output folder {out / 'sub'} cannot be created in {out}" in proc.stderr, proc.stderr
    finally:
        out.chmod(0o755)


def test_probe_approximations_must_be_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="collection of names"):
        small(tmp_path, probe_every=1, probe_approximations="kfac")
    with pytest.raises(ValueError, match="unknown approximation 'kfc'"):
        small(tmp_path, probe_every=1, probe_approximations=("kfc",))


TIED_MODEL = '''
import torch
from torch import nn


class Tied(nn.Module):
    """fc's weight also used outside its call: its Kronecker block would miss that use."""

    def __init__(self, num_classes):
        super().__init__()
        self.fc, self.out = nn.Linear(64, 64), nn.Linear(64, num_classes)

    def forward(self, x):
        h = torch.tanh(self.fc(x.flatten(1)))
        return self.out(h + nn.functional.linear(h, self.fc.weight))


def build(input_shape=(1, 8, 8), num_classes=10):
    return Tied(num_classes)
'''


def test_a_layer_used_outside_its_calls_is_refused_before_any_work(tmp_path: Path, capfd) -> None:
    """It was refused at the first statistics step: after --overwrite had removed the previous
    run, after the report's pre-training, and by every rank of --nproc 2."""
    (tmp_path / "tied.py").write_text(TIED_MODEL)
    spec = f"{tmp_path / 'tied.py'}:build"
    run = tmp_path / "run"
    assert main(["train", "--model", spec, "--optimizer", "sgd", *FAST_TRAIN[2:], "--out", str(run)]) == 0
    kept = sorted(p.name for p in run.iterdir())
    capfd.readouterr()
    refused = "fc.weight (Linear) is used 2 times in the forward pass but its module is called 1 time(s)"
    for args in (["train", "--optimizer", "tekfac", "--overwrite", "--out", str(run)],
                 ["train", "--optimizer", "tekfac", "--nproc", "2", "--out", str(tmp_path / "t2")],
                 ["report", "--train-steps", "200", "--out", str(tmp_path / "r")],
                 ["report", "--nproc", "2", "--out", str(tmp_path / "r2")]):
        assert main([args[0], "--model", spec, *args[1:]]) == 1
        err = capfd.readouterr().err
        assert err.count(refused) == 1 and "Traceback" not in err and "train step" not in err
    assert sorted(p.name for p in run.iterdir()) == kept
    assert not any((tmp_path / name).exists() for name in ("t2", "r", "r2"))


def test_report_mode_train_with_several_processes_is_refused_before_they_start(tmp_path: Path, capfd) -> None:
    assert main(["report", "--mode", "train", "--nproc", "2", "--out", str(tmp_path / "o")]) == 2
    err = capfd.readouterr().err
    assert err.count("--mode train measures the model's train-mode forward pass on the whole batch") == 1 and "Traceback" not in err


@pytest.mark.parametrize("args", [["--train-steps", "0"], ["--weights", "run"]], ids=["no-steps", "weights"])
def test_a_report_learning_rate_without_training_steps_is_a_usage_error(args: list[str], tmp_path: Path, capsys) -> None:
    """--lr is the rate of the Adam steps before measuring: with none (--train-steps 0, the default
    with --weights) it would change nothing."""
    assert main(["report", *args, "--lr", "0.5", "--out", str(tmp_path / "r")]) == 2
    assert "--lr given but no training step runs" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_run_whose_checkpoint_is_gone_is_named_for_what_the_folder_holds(tmp_path: Path, capsys) -> None:
    """A finished run whose checkpoint.pt was deleted: the error names the files there and both
    ways they come without a checkpoint (not only a run killed before its first epoch ended)."""
    out = tmp_path / "run"
    assert main(["train", *FAST_TRAIN, "--optimizer", "sgd", "--out", str(out)]) == 0
    (out / "checkpoint.pt").unlink()
    assert main(["train", *FAST_TRAIN, "--optimizer", "sgd", "--out", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert f"--resume given but {out / 'checkpoint.pt'} does not exist (the folder holds metrics.nc but no checkpoint" in err
    assert "or a checkpoint moved or deleted; start again with --overwrite" in err


def test_a_batch_larger_than_the_training_set_is_said(tmp_path: Path, capsys) -> None:
    """Every step then takes the whole training set (a DataLoader's one smaller batch), said once."""
    args = list(FAST_TRAIN)
    args[args.index("--batch-size") + 1], args[args.index("--train-size") + 1] = "100", "60"
    assert main(["train", *args, "--optimizer", "sgd", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err.count("--batch-size 100 exceeds the 60 training examples: every step takes them all") == 1


def test_a_signal_during_a_netcdf_write_or_read_arrives_after_it() -> None:
    """A SIGTERM inside h5netcdf's File constructor left a half-built file object, whose __del__
    printed "Exception ignored … AttributeError" after `curvlab train: stopped by SIGTERM` (a CI
    run under load): the signal is held over the file's open, write and close, and delivered
    after them, the file complete."""
    import signal

    import numpy as np
    import xarray as xr

    from curvlab.io import read_netcdf, signals_held, write_netcdf

    got = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert got == []  # held
        assert got == [signal.SIGTERM]  # delivered as the block ends
    finally:
        signal.signal(signal.SIGTERM, previous)
    ds = xr.Dataset({"v": ("x", np.arange(3.0))})

    class Stop(Exception):
        pass

    def stop(signum, frame):
        raise Stop

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        import tempfile
        from pathlib import Path

        path = Path(tempfile.mkdtemp()) / "m.nc"
        with pytest.raises(Stop):
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                write_netcdf(ds, path)  # (its own hold nested inside: still held until the outer ends)
        assert read_netcdf(path).equals(ds)
    finally:
        signal.signal(signal.SIGTERM, previous)
