"""Reliability defects found by trying curvlab as a careless user would: one test each.

Training runs here are tiny (digits, a 8-unit MLP, a few steps); the faults that need a real
process (kills, two runs at once, a full disk) are in tests/test_faults.py.
"""

from __future__ import annotations

import gzip
import math
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
from torch import nn

import curvlab
from curvlab.app.cli import main
from curvlab.app.data import DataError, read_idx
from curvlab.app.train import TrainConfig, train
from curvlab.optim import EKFAC, KFAC, TEKFAC, TKFAC, KroneckerOptions
from helpers import dense_ggn, tiny_mlp

REPO = Path(__file__).resolve().parents[1]
FAST_TRAIN = ["--hidden", "8", "--train-size", "120", "--test-size", "40", "--batch-size", "40",
              "--epochs", "1", "--no-progress"]


def small(out: Path | str, **kw) -> TrainConfig:
    base = dict(model="mlp", dataset="digits", optimizer="tekfac", epochs=1, batch_size=40, train_size=120,
                test_size=40, probe_every=0, probe_batch_size=8, out=str(out), progress=False,
                model_kwargs={"hidden": (8,)}, stats_interval=1, eigen_interval=2, scale_interval=1)
    base.update(kw)
    return TrainConfig(**base)


def batch(n: int = 16, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tiny_mlp(seed), torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


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


# -------------------------------------------------------------- 2. ignored targets refused


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_cross_entropy_ignore_index_is_refused(fisher: str) -> None:
    """torch's loss drops ignored examples and averages over the rest; a Fisher that counts them
    would be wrong (trace 1.339 vs 1.470 on main), so they are refused, as class weights and
    label smoothing are."""
    model, x, y = batch(16)
    y[:8] = -100
    with pytest.raises(ValueError, match="8 of 16 targets equal ignore_index=-100"):
        curvlab.extract(model, nn.CrossEntropyLoss(), x, y, fisher=fisher)
    with pytest.raises(ValueError, match="ignore_index"):
        curvlab.compare(model, nn.CrossEntropyLoss(), x, y, fisher=fisher, approximations=("kfac",))
    for loss in (nn.CrossEntropyLoss(label_smoothing=0.1), nn.CrossEntropyLoss(weight=torch.ones(3, dtype=torch.float64))):
        with pytest.raises(ValueError, match="label smoothing"):
            curvlab.extract(model, loss, x, y.clamp_min(0))


@pytest.mark.parametrize("cls", [KFAC, TEKFAC], ids=["KFAC", "TEKFAC"])
def test_optimizer_refuses_ignored_targets(cls) -> None:
    model, x, y = batch(16)
    y[3] = -100
    loss_fn = nn.CrossEntropyLoss()
    opt = cls(model, lr=0.1)
    with pytest.raises(ValueError, match="ignore_index"), opt.track(loss_fn):
        loss_fn(model(x), y).backward()


# --------------------------------------------------------- 3. non-finite hyper-parameters


@pytest.mark.parametrize("name", ["lr", "damping", "momentum", "kl_clip", "weight_decay"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_hyper_parameters_are_refused(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        KroneckerOptions(**{name: value})
    with pytest.raises(ValueError, match=name):
        TEKFAC(tiny_mlp(0), **{name: value})


def test_zero_damping_is_refused() -> None:
    """damping = 0 turned a small batch's step NaN (rank-deficient factors): refused, also later."""
    with pytest.raises(ValueError, match="damping=0"):
        KFAC(tiny_mlp(0), damping=0)
    opt = KFAC(tiny_mlp(0))
    with pytest.raises(ValueError, match="damping"):
        opt.damping = 0.0


@pytest.mark.parametrize("name,value", [("lr", math.nan), ("momentum", math.inf), ("lr", -1.0)])
def test_a_param_group_set_to_a_bad_value_is_refused_at_step(name: str, value: float) -> None:
    """A group is a plain dict (a user or a scheduler may set anything): checked at every step."""
    model, x, y = batch(8)
    loss_fn = nn.CrossEntropyLoss()
    opt = TKFAC(model, lr=0.1, stats_interval=1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0][name] = value
    opt.zero_grad()
    with opt.track(loss_fn):
        loss_fn(model(x), y).backward()
    with pytest.raises(ValueError, match=f"param group 0: {name}="):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("cls", [KFAC, EKFAC, TKFAC, TEKFAC], ids=lambda c: c.__name__)
def test_a_non_finite_update_is_skipped_at_its_own_step(cls) -> None:
    """An update that overflows float32 is never applied; the warning names this step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    opt = cls(model, lr=0.1, momentum=0.9, kl_clip=None, stats_interval=1)
    for _ in range(2):
        opt.zero_grad()
        with opt.track(loss_fn):
            loss_fn(model(x), y).backward()
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    momenta = {k: s.momentum.clone() for k, s in opt.block_states.items()}
    opt.param_groups[0]["lr"] = 1e38  # finite, but lr · update overflows
    opt.zero_grad()
    with opt.track(loss_fn):
        loss_fn(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite update .* at step 2"):
        opt.step()
    assert opt.steps_done == 2
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(s.momentum, momenta[k]) for k, s in opt.block_states.items())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("args", [["--damping", "0"], ["--lr", "nan"], ["--damping", "inf"], ["--momentum", "nan"],
                                  ["--kl-clip", "nan"]])
def test_cli_refuses_non_finite_or_zero_hyper_parameters(args: list[str], tmp_path: Path, capsys) -> None:
    assert main(["train", *FAST_TRAIN, *args, "--out", str(tmp_path / "o")]) == 2
    assert args[0][2:].replace("-", "_") in capsys.readouterr().err
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


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path: Path) -> None:
    from curvlab.app.outdir import LOCK_NAME, FolderLock, OutputFolderError

    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out, "test"):
        with pytest.raises(OutputFolderError, match=f"in use by another curvlab run \\(pid {os.getpid()}"):
            train(small(out))
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
    (["--device", "tpu"], "invalid device 'tpu'"), (["--train-size", "0"], "train_size=0"),
    (["--test-size", "0"], "test_size=0"),
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


# ----------------------------------------------------------------- 7. messages that name the cause


def test_empty_batch_is_named() -> None:
    model, x, y = batch(4)
    with pytest.raises(ValueError, match="empty batch"):
        curvlab.extract(model, nn.CrossEntropyLoss(), x[:0], y[:0])


@pytest.mark.parametrize("fisher", ["exact", "mc", "empirical"])
def test_non_finite_inputs_are_named(fisher: str) -> None:
    model, x, y = batch(6)
    x[2, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite values .* in 1 of 6 examples"):
        curvlab.extract(model, nn.CrossEntropyLoss(), x, y, fisher=fisher)
    with pytest.raises(ValueError, match="non-finite"):
        curvlab.compare(model, nn.CrossEntropyLoss(), x, y, fisher=fisher, approximations=("kfac",))
    with pytest.raises(ValueError, match="non-finite"):
        curvlab.extract(model, nn.MSELoss(), x, torch.randn(6, 3, dtype=torch.float64), fisher=fisher)
    targets = torch.randn(6, 3, dtype=torch.float64)
    targets[0, 0] = math.inf
    with pytest.raises(ValueError, match="targets have non-finite values"):
        curvlab.extract(model, nn.MSELoss(), x.nan_to_num(), targets, fisher=fisher)


@pytest.mark.parametrize("kwargs,message", [
    ({"damping": math.nan}, "damping=nan"), ({"damping": 0.0}, "damping=0.0"), ({"top_k": 0}, "top_k=0"),
    ({"num_eigenvalues": 0}, "num_eigenvalues=0"), ({"approximations": "kfac"}, "collection of names"),
    ({"approximations": ("kfac", "nope")}, "unknown approximation 'nope'"),
])
def test_bad_comparison_settings_are_named(kwargs: dict, message: str) -> None:
    model, x, y = batch(6)
    with pytest.raises(ValueError, match=message):
        curvlab.compare(model, nn.CrossEntropyLoss(), x, y, **kwargs)


def test_probe_approximations_must_be_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="collection of names"):
        small(tmp_path, probe_every=1, probe_approximations="kfac")
    with pytest.raises(ValueError, match="unknown approximation 'kfc'"):
        small(tmp_path, probe_every=1, probe_approximations=("kfc",))


def test_approximate_takes_one_block_or_a_whole_extraction() -> None:
    model, x, y = batch(6)
    stats = curvlab.extract(model, nn.CrossEntropyLoss(), x, y)
    whole = curvlab.approximate(stats, "kflr")
    assert set(whole) == {"0", "2"}
    assert torch.equal(whole["0"].to_dense(), curvlab.approximate(stats["0"], "kflr").to_dense())
    with pytest.raises(TypeError, match="LayerStats"):
        curvlab.approximate(torch.ones(3), "kflr")
    with pytest.raises(ValueError, match="unknown approximation 'kfc'"):
        curvlab.approximate(stats, "kfc")


def test_a_zero_fisher_block_is_explained() -> None:
    """A dead layer (its ReLU never fires): F = 0 for the layer below it, metrics NaN — with a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert float(dense_ggn(model, nn.CrossEntropyLoss(), x, y, "0").abs().max()) == 0.0
    with pytest.warns(RuntimeWarning, match="layer '0' is zero .*dead layer"):
        ds = curvlab.compare(model, nn.CrossEntropyLoss(), x, y, approximations=("kfac",))
    assert np.isnan(ds.rel_frobenius_error.sel(layer="0")).all()

