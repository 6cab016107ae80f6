"""curvlab train's recipe options: ``--augment`` (random crop and flip, checked window by window
against a padded copy), ``--lr-schedule`` and ``--warmup-epochs`` (checked step by step against
torch's own schedulers), recorded in the files and resumed bit for bit after a real kill.
(tests/test_faults.py and tests/test_distributed_train.py run with augmentation and warm-up too:
kills at random points, and two ranks against one process.)"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from curvlab.app.augment import augment, crop_padding
from curvlab.app.cli import main
from curvlab.app.data import NORMALISATION
from curvlab.app.train import TrainConfig, train
from curvlab.app.train.schedule import lr_factor
from helpers import torch_threads

TESTS = Path(__file__).resolve().parent


def _windows(x: torch.Tensor, pad: int, fill: torch.Tensor) -> torch.Tensor:
    """``[(2p+1)², 2, N, C, H, W]``: every window of ``x`` framed by ``fill``, and its mirror."""
    n, c, h, w = x.shape
    framed = torch.stack([F.pad(x[:, i], (pad,) * 4, value=float(fill[i])) for i in range(c)], 1)
    out = [framed[:, :, t:t + h, s:s + w] for t in range(2 * pad + 1) for s in range(2 * pad + 1)]
    return torch.stack([torch.stack([o, o.flip(-1)]) for o in out])


@pytest.mark.parametrize("kind", ["crop", "crop-flip"])
def test_each_image_is_one_window_of_the_black_framed_image(kind: str) -> None:
    """CIFAR-sized images: each output is exactly one of the (2·4+1)² windows of the image framed
    by black pixels (−mean/std: un-normalised, 0), mirrored only under crop-flip, the flips about
    half of them and every offset drawn."""
    n, pad = 2000, crop_padding(32)
    assert pad == 4 and crop_padding(28) == 4 and crop_padding(8) == 1
    mean, std = (torch.tensor(v) for v in NORMALISATION["cifar10"])
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = augment(x, kind, torch.Generator().manual_seed(1), "cifar10")
    windows = _windows(x, pad, -mean / std)
    match = (windows == y).flatten(3).all(-1)  # [offsets, flip, N]
    assert (match.flatten(0, 1).sum(0) == 1).all()  # exactly one window each (random pixels: no ties)
    offsets, flips = match.any(1).int().argmax(0), match[:, 1].any(0)
    assert len(offsets.unique()) == (2 * pad + 1) ** 2
    if kind == "crop":
        assert not flips.any()
    else:  # Binomial(2000, ½): 6σ
        assert abs(flips.sum().item() - n / 2) < 6 * math.sqrt(n / 4)
    framed = y * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)  # un-normalised: the frame is black
    border = (offsets == 0) & ~flips  # shifted down and right by 4: the top-left 4 rows and columns are frame
    assert torch.allclose(framed[border][:, :, :pad], torch.zeros(()), atol=1e-6)


def test_augmentation_is_the_generators_and_none_is_the_identity() -> None:
    x = torch.randn(5, 1, 8, 8)
    a, b = (augment(x, "crop-flip", torch.Generator().manual_seed(3), "digits") for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert augment(x, "none", torch.Generator(), "digits") is x
    assert (_windows(x, 1, torch.zeros(1)) == augment(x, "crop", torch.Generator(), "digits")).flatten(3).all(-1).any((0, 1)).all()
    with pytest.raises(ValueError, match=r"--augment crop takes image batches \[N, C, H, W\], not \(5, 64\)"):
        augment(x.flatten(1), "crop", torch.Generator(), "digits")


def _torch_factors(scheduler_cls, steps: int, **kw) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = scheduler_cls(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("epochs,per_epoch", [(5, 7), (4, 1), (1, 3)])
def test_schedules_are_torchs(epochs: int, per_epoch: int) -> None:
    """cosine = CosineAnnealingLR to 0 over the run's steps; step = MultiStepLR ×0.1 at half and
    three quarters of the epochs; the warm-up = LinearLR from 1/W over W steps."""
    total = epochs * per_epoch
    ours = [lr_factor("cosine", per_epoch, epochs)(t) for t in range(total)]
    np.testing.assert_allclose(ours, _torch_factors(torch.optim.lr_scheduler.CosineAnnealingLR, total, T_max=total), atol=1e-12)
    milestones = [math.ceil(epochs / 2) * per_epoch, math.ceil(3 * epochs / 4) * per_epoch]
    ours = [lr_factor("step", per_epoch, epochs)(t) for t in range(total)]
    np.testing.assert_allclose(ours, _torch_factors(torch.optim.lr_scheduler.MultiStepLR, total, milestones=milestones, gamma=0.1),
                               rtol=1e-12)
    warm = per_epoch  # one epoch
    ours = [lr_factor("constant", per_epoch, epochs, warmup_epochs=1)(t) for t in range(total)]
    theirs = _torch_factors(torch.optim.lr_scheduler.LinearLR, total, start_factor=1 / warm, total_iters=warm - 1) \
        if warm > 1 else [1.0] * total
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def _config(out: Path, **kw) -> TrainConfig:
    base = dict(model="mlp", dataset="digits", optimizer="kfac", epochs=3, batch_size=30, train_size=120,
                test_size=40, out=str(out), progress=False, figures=False, model_kwargs={"hidden": (8,)}, stats_interval=1,
                eigen_interval=2, lr=0.2, augment="crop-flip", lr_schedule="cosine", warmup_epochs=1)
    return TrainConfig(**{**base, **kw})


def test_the_recorded_learning_rates_follow_the_schedule(tmp_path: Path) -> None:
    """metrics.nc's lr is each epoch's last step's (4 steps an epoch); the options are recorded;
    augmentation changes the training, not the test set's evaluation of the initial model."""
    metrics = xr.open_dataset(train(_config(tmp_path / "a"))["metrics"]).load()
    factor = lr_factor("cosine", 4, 3, warmup_epochs=1)
    np.testing.assert_allclose(metrics.lr.values, [0.2 * factor(t) for t in (3, 7, 11)], rtol=1e-12)
    assert metrics.lr.values[-1] > 0 and metrics.lr.values[0] < 0.2
    assert (metrics.attrs["config_augment"], metrics.attrs["config_lr_schedule"], metrics.attrs["config_warmup_epochs"]) \
        == ("crop-flip", "cosine", 1)
    plain = xr.open_dataset(train(_config(tmp_path / "b", augment="none", epochs=1, lr_schedule="constant",
                                          warmup_epochs=0))["metrics"]).load()
    shifted = xr.open_dataset(train(_config(tmp_path / "c", epochs=1, lr_schedule="constant", warmup_epochs=0))["metrics"]).load()
    assert plain.lr.values[0] == shifted.lr.values[0] == 0.2
    assert plain.train_loss.values[0] != shifted.train_loss.values[0]


def test_a_killed_cosine_run_resumes_bit_identically(tmp_path: Path) -> None:
    """SIGKILL at a seeded write of epoch 2 or 3 (6 write events an epoch), then --resume: the
    uninterrupted run's metrics and model, bit for bit — the augmentation draws and the
    schedule's position come back with the checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = tmp_path / "killed"
    point = random.Random(20261205).randint(7, 17)
    args = ["train", "--hidden", "8", "--train-size", "120", "--test-size", "40", "--batch-size", "30", "--epochs", "3",
            "--optimizer", "kfac", "--stats-interval", "1", "--eigen-interval", "2", "--lr", "0.2", "--augment",
            "crop-flip", "--lr-schedule", "cosine", "--warmup-epochs", "1", "--no-progress", "--no-figures", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(TESTS / "fault_driver.py"), "kill-at", str(point), "--", *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with torch_threads(1):
        resumed = train(_config(out), resume=True)
        full = train(_config(tmp_path / "full"))
    a, b = (torch.load(p["checkpoint"], weights_only=True) for p in (full, resumed))
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    ma, mb = (xr.open_dataset(p["metrics"]).load() for p in (full, resumed))
    for var in ("train_loss", "test_loss", "lr"):
        np.testing.assert_array_equal(ma[var].values, mb[var].values, err_msg=var)


def test_a_resume_keeps_the_epochs_a_schedule_spans(tmp_path: Path, capsys) -> None:
    """Under cosine the number of epochs fixes every step's rate: a resume with another --epochs
    is refused, naming both; under a constant rate (warm-up included) it continues."""
    common = ["train", "--hidden", "8", "--train-size", "60", "--test-size", "20", "--batch-size", "30",
              "--optimizer", "sgd", "--no-progress", "--warmup-epochs", "1"]
    out = tmp_path / "cosine"
    assert main([*common, "--epochs", "1", "--lr-schedule", "cosine", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*common, "--epochs", "2", "--lr-schedule", "cosine", "--out", str(out), "--resume"]) == 1
    assert "--epochs 1 (now 2; --lr-schedule cosine spans them)" in capsys.readouterr().err
    out = tmp_path / "constant"
    assert main([*common, "--epochs", "1", "--out", str(out)]) == 0
    assert main([*common, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    assert xr.open_dataset(out / "metrics.nc").sizes["epoch"] == 2


@pytest.mark.parametrize("args,said", [
    (["--augment", "rotate"], "argument --augment: invalid choice: 'rotate'"),
    (["--lr-schedule", "linear"], "argument --lr-schedule: invalid choice: 'linear'"),
    (["--warmup-epochs", "4", "--epochs", "3"], "--warmup-epochs 4 exceeds --epochs 3"),
    (["--warmup-epochs", "-1"], "argument --warmup-epochs"),
])
def test_bad_recipe_options_exit_2_naming_them(args: list[str], said: str, tmp_path: Path, capsys) -> None:
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
