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
from curvlab.app.data import NORMALISATION, batches
from curvlab.app.train import TrainConfig, train
from curvlab.app.train.parallel import steps_per_epoch
from curvlab.app.train.schedule import lr_factor
from helpers import torch_threads

TESTS = Path(__file__).resolve().parent


def _matches(x: torch.Tensor, y: torch.Tensor, pad: int, fill: torch.Tensor) -> torch.Tensor:
    """``[(2p+1)², 2, N]``: whether ``y[n]`` is the window at each offset of ``x[n]`` framed by
    ``fill`` (channel by channel), and whether it is that window's mirror — one window at a time
    (all of them at once are gigabytes)."""
    n, c, h, w = x.shape
    framed = torch.stack([F.pad(x[:, i], (pad,) * 4, value=float(fill[i])) for i in range(c)], 1)
    out = []
    for t in range(2 * pad + 1):
        for s in range(2 * pad + 1):
            window = framed[:, :, t:t + h, s:s + w]
            out.append(torch.stack([(window == y).flatten(1).all(-1), (window.flip(-1) == y).flatten(1).all(-1)]))
    return torch.stack(out)


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
    match = _matches(x, y, pad, -mean / std)  # [offsets, flip, N]
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
    assert _matches(x, augment(x, "crop", torch.Generator(), "digits"), 1, torch.zeros(1)).any(1).any(0).all()
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


def _factors(schedule: str, epochs: int, per_epoch: int, warmup: int = 0) -> list[float]:
    return [lr_factor(schedule, epochs, warmup, t // per_epoch, t % per_epoch, per_epoch) for t in range(epochs * per_epoch)]


@pytest.mark.parametrize("epochs,per_epoch", [(5, 7), (4, 1), (1, 3), (8, 2)])
def test_schedules_are_torchs(epochs: int, per_epoch: int) -> None:
    """cosine = CosineAnnealingLR over the run's steps; step = MultiStepLR ×0.1 at half and three
    quarters of the epochs (rounded up); a warm-up = LinearLR from 1/W over W steps, then cosine
    over the rest (SequentialLR), or the step decays at their epochs."""
    total, lr = epochs * per_epoch, torch.optim.lr_scheduler
    np.testing.assert_allclose(_factors("cosine", epochs, per_epoch),
                               _torch_factors(lr.CosineAnnealingLR, total, T_max=total), atol=1e-12)
    milestones = [math.ceil(epochs / 2) * per_epoch, math.ceil(3 * epochs / 4) * per_epoch]
    np.testing.assert_allclose(_factors("step", epochs, per_epoch),
                               _torch_factors(lr.MultiStepLR, total, milestones=milestones, gamma=0.1), rtol=1e-12)
    warm = per_epoch  # one epoch
    ramp = _torch_factors(lr.LinearLR, warm, start_factor=1 / warm, total_iters=warm - 1) if warm > 1 else [1.0]
    np.testing.assert_allclose(_factors("constant", epochs, per_epoch, warmup=1), ramp + [1.0] * (total - warm), rtol=1e-12)
    if epochs > 1:
        def sequential(opt, **_):
            return lr.SequentialLR(opt, [lr.LinearLR(opt, start_factor=1 / warm, total_iters=max(warm - 1, 1)),
                                         lr.CosineAnnealingLR(opt, T_max=total - warm)], milestones=[warm])
        np.testing.assert_allclose(_factors("cosine", epochs, per_epoch, warmup=1), _torch_factors(sequential, total),
                                   atol=1e-12)
        np.testing.assert_allclose(_factors("step", epochs, per_epoch, warmup=1)[warm:], _factors("step", epochs, per_epoch)[warm:])


def test_an_epochs_rates_do_not_depend_on_the_steps_of_others() -> None:
    """The clock is the progress in epochs: an epoch of 4 steps after epochs of 5 (a resume on more
    processes skipping a trailing batch) starts at cos(π e/E) and its rates fall within the epoch."""
    for epoch in range(4):
        for steps in (4, 5):
            assert lr_factor("cosine", 4, 0, epoch, 0, steps) == pytest.approx(0.5 * (1 + math.cos(math.pi * epoch / 4)))
            assert lr_factor("step", 4, 0, epoch, steps - 1, steps) == [1.0, 1.0, 0.1, 0.01][epoch]
    with pytest.raises(ValueError, match="an epoch of 0 steps"):
        lr_factor("cosine", 2, 0, 0, 0, 0)


def _config(out: Path, **kw) -> TrainConfig:
    base = dict(model="mlp", dataset="digits", optimizer="kfac", epochs=3, batch_size=30, train_size=120,
                test_size=40, out=str(out), progress=False, figures=False, model_kwargs={"hidden": (8,)}, stats_interval=1,
                eigen_interval=2, lr=0.2, augment="crop-flip", lr_schedule="cosine", warmup_epochs=1)
    return TrainConfig(**{**base, **kw})


def test_the_recorded_learning_rates_follow_the_schedule(tmp_path: Path) -> None:
    """metrics.nc's lr is each epoch's last step's (4 steps an epoch); the options are recorded;
    augmentation changes the training, not the test set's evaluation of the initial model."""
    metrics = xr.open_dataset(train(_config(tmp_path / "a"))["metrics"]).load()
    np.testing.assert_allclose(metrics.lr.values, [0.2 * lr_factor("cosine", 3, 1, e, 3, 4) for e in range(3)], rtol=1e-12)
    assert metrics.lr.values[0] == 0.2  # the warm-up's last step reaches the base rate
    assert 0 < metrics.lr.values[-1] < metrics.lr.values[1] < 0.2
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
              "--optimizer", "sgd", "--no-progress", "--no-figures", "--warmup-epochs", "1"]
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


def test_a_checkpoint_older_than_the_options_took_their_defaults(tmp_path: Path, capsys) -> None:
    """A checkpoint written before --augment, --lr-schedule, --warmup-epochs and --figures existed:
    its run took their defaults, so a resume with another augmentation or schedule is refused as
    any other changed option, and one without them continues."""
    common = ["train", "--hidden", "8", "--train-size", "60", "--test-size", "20", "--batch-size", "30",
              "--optimizer", "sgd", "--no-progress", "--no-figures", "--out", str(tmp_path / "old")]
    assert main([*common, "--epochs", "1"]) == 0
    path = tmp_path / "old" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    for key in ("config_augment", "config_lr_schedule", "config_warmup_epochs", "config_figures"):
        del ckpt["config"][key]
    torch.save(ckpt, path)
    capsys.readouterr()
    assert main([*common, "--epochs", "2", "--resume", "--augment", "crop-flip", "--lr-schedule", "cosine"]) == 1
    assert "--augment none (now crop-flip); --lr-schedule constant (now cosine)" in capsys.readouterr().err
    assert main([*common, "--epochs", "2", "--resume"]) == 0


# ------------------------------------------------------- from mutation testing: schedules, augmentation


def _sgd_config(out: Path, **kw) -> TrainConfig:
    """4 steps an epoch (120 examples in batches of 30), SGD, no figures."""
    base = dict(model="mlp", dataset="digits", optimizer="sgd", epochs=3, batch_size=30, train_size=120,
                test_size=40, out=str(out), progress=False, figures=False, model_kwargs={"hidden": (8,)}, lr=0.2)
    return TrainConfig(**{**base, **kw})


def _lr(out_or_paths) -> np.ndarray:
    path = out_or_paths["metrics"] if isinstance(out_or_paths, dict) else Path(out_or_paths) / "metrics.nc"
    with xr.open_dataset(path) as ds:
        return ds["lr"].values.copy()


def test_a_warm_up_under_a_constant_schedule_ramps_the_rate(tmp_path: Path) -> None:
    """--lr-schedule constant --warmup-epochs 2: the rate still ramps (torch's LinearLR from
    1/(W·steps) over the W·steps warm-up steps), so epoch 1 ends half way up, then stays at --lr.
    (The warm-up was dropped when the schedule is constant: the recorded rates were all --lr.)"""
    per_epoch, warm, epochs = 4, 2, 3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / (warm * per_epoch), total_iters=warm * per_epoch - 1)
    rates = []
    for _ in range(epochs * per_epoch):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lr = _lr(train(_sgd_config(tmp_path / "run", lr_schedule="constant", warmup_epochs=warm, epochs=epochs)))
    np.testing.assert_allclose(lr, [rates[(e + 1) * per_epoch - 1] for e in range(epochs)], rtol=1e-12)
    assert lr[0] < lr[1] == lr[2] == pytest.approx(0.2)


def test_a_resume_keeps_the_epochs_the_step_schedule_spans(tmp_path: Path, capsys) -> None:
    """--lr-schedule step places its decays at fractions of --epochs: a resume with other epochs
    is refused as cosine's is."""
    common = ["train", "--hidden", "8", "--train-size", "60", "--test-size", "20", "--batch-size", "30",
              "--optimizer", "sgd", "--no-progress", "--no-figures", "--lr-schedule", "step", "--out", str(tmp_path / "step")]
    assert main([*common, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main([*common, "--epochs", "4", "--resume"]) == 1
    assert "--epochs 1 (now 4; --lr-schedule step spans them)" in capsys.readouterr().err
    # the checkpoint's schedule spans its epochs, whatever this resume asks for
    assert main([*common, "--epochs", "4", "--resume", "--lr-schedule", "constant"]) == 1
    err = capsys.readouterr().err
    assert "--lr-schedule step (now constant)" in err and "--epochs 1 (now 4; --lr-schedule step spans them)" in err


@pytest.mark.parametrize("num_train,batch,world", [(61, 30, 2), (60, 30, 2), (64, 30, 4), (65, 16, 2), (7, 30, 2), (31, 10, 1)])
def test_steps_per_epoch_counts_the_batches_every_rank_trains(num_train: int, batch: int, world: int) -> None:
    """The schedule's steps an epoch are the batches the loop trains: those with at least one
    example per rank (a trailing batch of fewer is skipped)."""
    x = torch.zeros(num_train, 1)
    trained = sum(1 for xb, _ in batches(x, x[:, 0], batch, shuffle=False) if xb.shape[0] >= world)
    assert steps_per_epoch(num_train, batch, world) == trained


def test_an_epochs_rates_after_a_resume_do_not_depend_on_earlier_epochs_steps(tmp_path: Path) -> None:
    """A checkpoint whose first epoch took one step more than this run's epochs (one process took
    a trailing batch that more ranks skip): the resumed epoch's rates are the uninterrupted run's
    (the clock is the progress in epochs, not the step count)."""
    full = _sgd_config(tmp_path / "full", lr_schedule="cosine", epochs=2)
    with torch_threads(1):
        reference = _lr(train(full))
        train(_sgd_config(tmp_path / "resumed", lr_schedule="cosine", epochs=1, warmup_epochs=0))
    # the same run, its first epoch 5 steps long, recorded as a 2-epoch cosine run
    path = tmp_path / "resumed" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["step"] += 1
    ckpt["config"]["config_epochs"] = 2
    torch.save(ckpt, path)
    with torch_threads(1):
        resumed = _lr(train(_sgd_config(tmp_path / "resumed", lr_schedule="cosine", epochs=2), resume=True))
    assert resumed[1] == pytest.approx(reference[1], rel=1e-12)


def test_images_narrower_than_8_pixels_are_still_cropped() -> None:
    """A frame of at least one pixel: 3×3 images are windows of the 1-pixel black frame, and not
    all of them the centred one."""
    x = torch.rand(200, 1, 3, 3, generator=torch.Generator().manual_seed(0)) + 1
    y = augment(x, "crop", torch.Generator().manual_seed(1), "digits")
    framed = F.pad(x, (1, 1, 1, 1))
    windows = torch.stack([framed[..., t:t + 3, s:s + 3] for t in range(3) for s in range(3)])
    match = (windows == y).flatten(2).all(-1)  # [9, N]
    assert (match.sum(0) == 1).all() and len(match.int().argmax(0).unique()) == 9


@pytest.mark.parametrize("dataset,warned", [("digits", True), ("MNIST", True), ("fashion-mnist", False), ("cifar10", False)])
def test_crop_flip_on_digits_is_warned_of(dataset: str, warned: bool) -> None:
    """A mirrored digit is another glyph: crop-flip on digits or MNIST says so (the help did, and
    the run went on silently); on natural images it is the recipe's."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrainConfig(dataset=dataset, augment="crop-flip")
        TrainConfig(dataset=dataset, augment="crop")
    said = [str(w.message) for w in caught if "crop-flip" in str(w.message)]
    assert len(said) == int(warned), said
