"""Faults in real processes: kills at seeded random points (inside the write phase too), a full
disk (a real small tmpfs where this machine allows one, else ENOSPC injected into the writes),
two runs into one folder at once.  After each, the output folder holds one consistent run or
the command said clearly why not, and ``--resume`` continues with nothing lost but the
interrupted epoch — probes included (the README's guarantees).

Faults are injected by tests/fault_driver.py, which wraps ``os`` functions in the child process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from curvlab.app.cli import main
from curvlab.app.interrupts import Stopped
from curvlab.app.train import TrainConfig, train
from helpers import torch_threads

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DRIVER = TESTS / "fault_driver.py"
SEED = 20240611  # the kill points are drawn from this seed: reproducible
TIMEOUT = 300

REPORT = ["--batch-size", "6", "--train-steps", "0", "--num-eigenvalues", "8", "--approximations", "kflr,tkfac",
          "--no-progress"]
TRAIN = ["--hidden", "8", "--train-size", "120", "--test-size", "40", "--batch-size", "30", "--epochs", "3",
         "--probe-every", "2", "--probe-batch-size", "8", "--probe-approximations", "tkfac",
         "--stats-interval", "1", "--eigen-interval", "2", "--scale-interval", "1", "--no-progress",
         "--augment", "crop-flip", "--warmup-epochs", "1", "--no-figures"]


#: Bit-identical results need the same number of threads (BLAS splits its sums by thread): the
#: runs in other processes use one, and so does this process in these tests.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


def run_driver(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), *args], capture_output=True, text=True, timeout=TIMEOUT, env=ENV)


def kill_points(n: int, low: int, high: int, salt: str) -> list[int]:
    return random.Random(f"{SEED}-{salt}").sample(range(low, high), n)


# ------------------------------------------------------------------------------ report


def report_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_one_consistent_report(folder: Path) -> str:
    """Every file the manifest lists, with its hash, and nothing else; returns the run id."""
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest["files"], "manifest.json"])
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    ds = xr.open_dataset(folder / "report.nc").load()
    assert ds.attrs["run_id"] == manifest["run_id"]
    assert manifest["run_id"] in (folder / "summary.md").read_text()
    return manifest["run_id"]


@pytest.fixture(scope="module")
def first_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "first"
    assert main(["report", *REPORT, "--seed", "1", "--out", str(out)]) == 0
    return out


# 18 events write the six files into the staging folder, 4 publish it (19: fsync, 20: the
# exchange, 21: fsync, 22: removal of the previous report): a kill among the writes, one there
@pytest.mark.parametrize("point", kill_points(1, 1, 19, "report") + kill_points(1, 19, 23, "publish"))
def test_report_killed_in_its_write_phase_keeps_one_consistent_report(point: int, first_report: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(first_report, out)
    before = report_state(out)
    proc = run_driver("kill-at", str(point), "--", "report", *REPORT, "--seed", "2", "--out", str(out))
    assert proc.returncode in (-signal.SIGKILL, 0), proc.stderr
    run_id = assert_one_consistent_report(out)
    if proc.returncode == -signal.SIGKILL and report_state(out) != before:
        assert run_id != assert_one_consistent_report(first_report)  # the new report, complete
    elif proc.returncode == -signal.SIGKILL:
        assert report_state(out) == before  # the previous report, untouched
    # a later report into the folder cleans up whatever the killed one left beside it
    if [p.name for p in tmp_path.iterdir()] != ["out"]:
        assert main(["report", *REPORT, "--out", str(out)]) == 0
        assert_one_consistent_report(out)
        assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_report_interrupted_or_out_of_disk_keeps_the_previous_report(first_report: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import curvlab.app.report.figures as figures
    from fault_driver import enospc_patches

    out = tmp_path / "out"
    shutil.copytree(first_report, out)
    before = report_state(out)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    def stopped(*_args, **_kwargs):
        raise Stopped("SIGTERM")

    capsys.readouterr()
    for stop, status, said in ((interrupted, 130, "interrupted"), (stopped, 143, "stopped by SIGTERM")):
        monkeypatch.setattr(figures, "plot_errors", stop)  # a Ctrl-C or a scheduler's stop inside the write phase
        assert main(["report", *REPORT, "--seed", "2", "--out", str(out)]) == status
        assert capsys.readouterr().err.splitlines()[-1] == f"curvlab report: {said}"
        assert report_state(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]
    monkeypatch.undo()
    for obj, name, value in enospc_patches("errors.png"):  # the disk fills while a figure is saved
        monkeypatch.setattr(obj, name, value)
    assert main(["report", *REPORT, "--seed", "2", "--out", str(out)]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"[Errno 28] No space left on device (the report in {out} is unchanged): '{out / 'errors.png'}'" in err, err
    assert report_state(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_two_reports_at_once_leave_one_of_them(tmp_path: Path) -> None:
    out = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-m", "curvlab", "report", *REPORT, "--seed", "3", "--out", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    assert main(["report", *REPORT, "--seed", "4", "--out", str(out)]) == 0
    _, err = other.communicate(timeout=TIMEOUT)
    assert other.returncode == 0, err
    assert_one_consistent_report(out)
    assert xr.open_dataset(out / "report.nc").attrs["seed"] in (3, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------------------- train


def config(out: Path, **kw) -> TrainConfig:
    base = dict(model="mlp", dataset="digits", optimizer="tekfac", epochs=3, batch_size=30, train_size=120,
                test_size=40, probe_every=2, probe_batch_size=8, probe_approximations=("tkfac",), out=str(out),
                progress=False, figures=False, model_kwargs={"hidden": (8,)}, stats_interval=1, eigen_interval=2,
                scale_interval=1, augment="crop-flip", warmup_epochs=1)  # (their draws and clock resume too)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "reference"
    train(config(out))
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical metrics (but wall-clock), final model, optimizer state and probes."""
    ma, mb = xr.open_dataset(a / "metrics.nc").load(), xr.open_dataset(b / "metrics.nc").load()
    for name in ma.data_vars:
        if name not in ("epoch_time", "wall_clock"):
            np.testing.assert_array_equal(ma[name].values, mb[name].values, err_msg=name)
    ca, cb = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (a, b))
    for key, value in ca["model"].items():
        assert torch.equal(value, cb["model"][key]), key
    assert ca["step"] == cb["step"] and ca["epoch"] == cb["epoch"]
    pa, pb = xr.open_dataset(a / "probe.nc").load(), xr.open_dataset(b / "probe.nc").load()
    np.testing.assert_array_equal(pa.step.values, pb.step.values)
    for name in pa.data_vars:
        np.testing.assert_array_equal(pa[name].values, pb[name].values, err_msg=name)


def test_train_killed_twice_resumes_bit_identically(reference_run: Path, tmp_path: Path) -> None:
    """A SIGKILL at a seeded point among the run's file writes (probe, metrics, checkpoint), then
    --resume killed again at a seeded random time; the last --resume matches the uninterrupted
    run bit for bit: metrics, model, probes."""
    out = tmp_path / "killed"
    # 15 write events in epoch 1 (3 probes, metrics, checkpoint: 3 each), then 12 an epoch
    point = kill_points(1, 16, 40, "train")[0]
    proc = run_driver("kill-at", str(point), "--", "train", *TRAIN, "--out", str(out))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] in (1, 2, 3)

    start = (out / "probe.nc").stat().st_mtime_ns
    resumed = subprocess.Popen([sys.executable, "-m", "curvlab", "train", *TRAIN, "--out", str(out), "--resume"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + TIMEOUT
    while (out / "probe.nc").stat().st_mtime_ns == start and time.time() < deadline and resumed.poll() is None:
        time.sleep(0.01)  # until the resumed run trains (its first probe is written) or ends
    time.sleep(random.Random(SEED).uniform(0.0, 0.5))
    resumed.send_signal(signal.SIGKILL)
    resumed.wait(timeout=30)
    train(config(out), resume=True)
    assert_same_run(reference_run, out)


def test_two_trainings_into_one_folder_at_once(reference_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "shared"
    proc = subprocess.Popen([sys.executable, "-m", "curvlab", "train", *TRAIN, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + TIMEOUT
    while not (out / ".curvlab.lock").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    assert main(["train", *TRAIN, "--seed", "5", "--out", str(out)]) == 1  # refused: in use
    assert main(["train", *TRAIN, "--seed", "5", "--out", str(out), "--overwrite"]) == 1  # even so
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert_same_run(reference_run, out)  # the first run, unmixed


# --------------------------------------------------------------------------- full disk


def _tmpfs_command(mount: Path, size: str) -> list[str] | None:
    """A command prefix that runs its arguments with a private tmpfs of ``size`` on ``mount``,
    or None where this machine allows none (no root, no user namespaces)."""
    script = f'mount -t tmpfs -o size={size} tmpfs "{mount}" && exec "$@"'
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        if shutil.which(prefix[0]) is None:
            return None
        probe = subprocess.run([*prefix, "sh", "-c", script, "sh", "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [*prefix, "sh", "-c", script, "sh"]
    return None


def test_train_on_a_full_disk_keeps_its_files_and_resumes(reference_run: Path, tmp_path: Path) -> None:
    """A real full disk: the run continues on a small private tmpfs with 48 KiB left, less than
    epoch 2's files need.  The error names [Errno 28] and the file, epoch 1's checkpoint stays,
    every file is complete, and --resume (with space again) finishes the run.  Where this machine
    allows no tmpfs, test_checkpoint_out_of_disk_keeps_the_previous_one injects the error."""
    mount = tmp_path / "disk"
    mount.mkdir()
    tmpfs = _tmpfs_command(mount, "400k")
    if tmpfs is None:
        pytest.skip("no private tmpfs here (needs root or user namespaces); ENOSPC is injected instead")
    out = tmp_path / "run"
    assert main(["train", *TRAIN, "--epochs", "1", "--out", str(out)]) == 0
    saved = report_state(out)
    script = (
        f'cp -a "{out}" "{mount}/run" && '
        f'python3 -c "import shutil; free=shutil.disk_usage(\'{mount}\').free; '
        f'open(\'{mount}/filler\',\'wb\').write(bytes(max(free - 48*1024, 0)))" && '
        f'{sys.executable} -m curvlab train {" ".join(TRAIN)} --out "{mount}/run" --resume; '
        f'echo "exit=$?" >&2; rm "{mount}/filler"; cp -a "{mount}/run" "{tmp_path}/after"'
    )
    proc = subprocess.run([*tmpfs, "sh", "-c", script], capture_output=True, text=True, timeout=TIMEOUT,
                          env=ENV)
    assert "exit=1" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert f"[Errno 28] No space left on device: '{mount}/run/" in proc.stderr, proc.stderr
    after = tmp_path / "after"
    assert (after / "checkpoint.pt").read_bytes() == saved["checkpoint.pt"]
    assert sorted(p.name for p in after.iterdir()) == sorted(saved)  # nothing half-written beside them
    for name in ("metrics.nc", "probe.nc"):  # as before, or replaced by a complete newer version
        xr.open_dataset(after / name).load()
    assert xr.open_dataset(after / "metrics.nc").sizes["epoch"] == 1  # no epoch the checkpoint lacks
    train(config(after), resume=True)
    assert_same_run(reference_run, after)


@pytest.mark.parametrize("full", ["checkpoint.pt", "metrics.nc"])
def test_a_file_out_of_disk_keeps_the_previous_one(full: str, reference_run: Path, tmp_path: Path, monkeypatch,
                                                     capsys) -> None:
    """The writes of checkpoint.pt, or of metrics.nc, fail as on a full disk (whatever this
    machine allows): the error names [Errno 28] and the file, the previous file stays,
    metrics.nc never lists an epoch whose checkpoint is missing (it did when the checkpoint's
    write failed: it was written first), a resume lists the checkpoint's epochs (also with none
    left to train), and --resume finishes the run."""
    from fault_driver import enospc_patches

    out = tmp_path / "run"
    assert main(["train", *TRAIN, "--epochs", "1", "--out", str(out)]) == 0
    saved = (out / full).read_bytes()
    for obj, name, value in enospc_patches(full):
        monkeypatch.setattr(obj, name, value)
    capsys.readouterr()
    assert main(["train", *TRAIN, "--out", str(out), "--resume"]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert f"[Errno 28] No space left on device: '{out / full}'" in err, err
    assert (out / full).read_bytes() == saved
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    saved_epochs = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert saved_epochs == (1 if full == "checkpoint.pt" else 2)
    assert xr.open_dataset(out / "metrics.nc").sizes["epoch"] == 1
    assert main(["train", *TRAIN, "--out", str(out), "--resume", "--epochs", str(saved_epochs)]) == 0
    assert xr.open_dataset(out / "metrics.nc").sizes["epoch"] == saved_epochs
    train(config(out), resume=True)
    assert_same_run(reference_run, out)
