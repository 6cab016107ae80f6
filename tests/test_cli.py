"""The ``curvlab`` command line: report runs, help, usage errors, the real entry points."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from curvlab.app import cli
from curvlab.app.cli import main
from curvlab.app.options import check_label_smoothing, label_smoothing
from curvlab.app.report import run_report
from curvlab.app.train.config import TrainConfig
from curvlab.io import read_netcdf
from helpers import without_report_figures

REPO = Path(__file__).resolve().parents[1]
REPORT_FILES = ("report.nc", "summary.md", "spectra.png", "errors.png")
# The real data lives in shared/ beside the repo (as in tests/test_data.py).
SHARED_DATA_CANDIDATES = [
    *([Path(os.environ["CURVLAB_SHARED_DATA"])] if os.environ.get("CURVLAB_SHARED_DATA") else []),
    REPO.parent / "shared" / "data",
    Path("/work/shared/data"),
]
FAST = ["--batch-size", "8", "--train-steps", "3", "--num-eigenvalues", "32", "--no-progress"]


def shared_data(sub: str) -> Path:
    for base in SHARED_DATA_CANDIDATES:
        if (base / sub).is_dir():
            return base / sub
    pytest.skip(f"real {sub} data not found in any of {SHARED_DATA_CANDIDATES}")


def _assert_report(out: Path) -> None:
    for name in REPORT_FILES:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name


def test_report_on_digits_writes_all_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["report", *FAST, "--approximations", "kfac,ekfac,kfoc", "--damping-strategy", "kfac=exact",
                 "--seed", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    _assert_report(out)
    for name in REPORT_FILES:
        assert str(out / name) in captured.out
    ds = read_netcdf(out / "report.nc")
    assert list(ds["approximation"].values) == ["kfac", "ekfac", "kfoc"]
    assert ds.attrs["model"] == "mlp" and ds.attrs["dataset"] == "digits"
    assert ds.attrs["batch_size"] == 8 and ds.attrs["num_examples"] == 8
    assert ds.attrs["train_steps"] == 3 and ds.attrs["seed"] == 3
    assert "kfac=exact" in ds.attrs["damping_strategies"]
    assert "scikit-learn digits" in ds.attrs["data"]
    assert "scikit-learn digits" in (out / "summary.md").read_text(encoding="utf-8")


def test_report_variables_say_what_they_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """report.nc's variables had no attributes: each has a CF long_name, the dimensionless ones
    units "1"; the curvature's own (the loss's per parameter²) are unknown, so left out."""
    out = tmp_path / "run"
    assert main(["report", *FAST, "--train-steps", "0", "--approximations", "kfac,tekfac", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    with xr.open_dataset(out / "report.nc", engine="h5netcdf") as ds:
        for name, var in ds.variables.items():
            assert isinstance(var.attrs.get("long_name"), str) and len(var.attrs["long_name"]) > 10, name
        for name in ("trace_ratio", "rel_frobenius_error", "projection_error", "scaling_error", "ng_cosine",
                     "ng_rel_error", "subspace_overlap", "coupling_error", "network_rel_frobenius_error",
                     "network_ng_cosine", "network_ng_rel_error", "network_blockdiag_error"):
            assert ds[name].attrs["units"] == "1", name
        for name in ("exact_trace", "exact_eigenvalues", "approx_eigenvalues", "network_exact_trace"):
            assert "units" not in ds[name].attrs, name
        assert "blocks only" not in ds["network_exact_trace"].attrs["long_name"]  # every block is in it


def test_report_measures_truncated_bases_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """``--truncate-above``: the report measures the truncated eigenbases the optimizers invert
    for wide factors, and says so in report.nc and summary.md.  The MLP on 8 examples: layer 1's
    128-wide G has rank 80 (a worse fit with 8 eigenpairs), layer 3's 129-wide A rank 8 (the
    same fit), layer 5 has no factor wider than 100 (the same numbers)."""
    without_report_figures(monkeypatch)
    runs = {}
    for label, extra in (("full", []), ("truncated", ["--truncate-above", "100", "--truncation-rank", "8"])):
        out = tmp_path / label
        code = main(["report", *FAST, "--train-steps", "0", "--approximations", "kflr,tekfac", *extra, "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        runs[label] = read_netcdf(out / "report.nc")
    full, truncated = runs["full"], runs["truncated"]
    assert full.attrs["factor_eigh"] == "full"
    assert truncated.attrs["factor_eigh"].startswith("truncated above 100 to rank 8")
    assert "truncated above 100 to rank 8" in (tmp_path / "truncated" / "summary.md").read_text(encoding="utf-8")
    assert [str(layer) for layer in full.layer.values] == ["1", "3", "5"]  # 128 × 65, 64 × 129, 10 × 65
    err_full, err_cut = (ds.rel_frobenius_error.sel(layer="1").values for ds in (full, truncated))
    assert (err_cut > err_full + 1e-3).all()
    np.testing.assert_allclose(truncated.rel_frobenius_error.sel(layer="3").values,
                               full.rel_frobenius_error.sel(layer="3").values, rtol=1e-9)
    assert (full.rel_frobenius_error.sel(layer="5").values == truncated.rel_frobenius_error.sel(layer="5").values).all()
    code = main(["report", *FAST, "--truncation-rank", "0", "--out", str(tmp_path / "bad")])
    assert code != 0 and "--truncation-rank" in capsys.readouterr().err


def test_label_smoothing_is_the_loss_measured(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """``--label-smoothing`` (timm's recipes train with 0.1): the loss measured and warmed up
    with.  Its loss-Hessian is cross-entropy's, so the exact Fisher of the same weights is the
    same; the gradient, and with it the natural-gradient metrics, and the empirical Fisher change."""
    without_report_figures(monkeypatch)
    runs = {}
    for eps in ("0", "0.3"):
        for fisher in ("exact", "empirical"):
            out = tmp_path / f"{eps}-{fisher}"
            code = main(["report", *FAST, "--train-steps", "0", "--approximations", "kflr", "--fisher", fisher,
                         "--label-smoothing", eps, "--out", str(out)])
            assert code == 0, capsys.readouterr().err
            runs[eps, fisher] = read_netcdf(out / "report.nc")
    assert runs["0.3", "exact"].attrs["loss"] == "CrossEntropyLoss(reduction=mean, label_smoothing=0.3)"
    assert runs["0", "exact"].attrs["loss"] == "CrossEntropyLoss(reduction=mean)"
    said = (tmp_path / "0.3-exact" / "summary.md").read_text(encoding="utf-8")
    assert "- **Loss (the one measured; training steps before measuring, if any, minimise it):** CrossEntropyLoss(reduction=mean, label_smoothing=0.3)" in said
    np.testing.assert_allclose(runs["0.3", "exact"].exact_trace, runs["0", "exact"].exact_trace, rtol=1e-5)
    assert not np.allclose(runs["0.3", "exact"].ng_cosine, runs["0", "exact"].ng_cosine, rtol=1e-3)
    assert not np.allclose(runs["0.3", "empirical"].exact_trace, runs["0", "empirical"].exact_trace, rtol=1e-2)
    with pytest.raises(ValueError, match=r"curvlab report: label_smoothing=2 must be a number in \[0, 1\]"):
        run_report(label_smoothing=2, out_dir=tmp_path / "bad")
    with pytest.raises(ValueError, match=r"curvlab train: label_smoothing=-1 must be a number in \[0, 1\]"):
        TrainConfig(label_smoothing=-1)


def test_user_model_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = tmp_path / "mymodel.py"
    module.write_text(
        "from torch import nn\n"
        "def make(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, num_classes))\n"
    )
    code = main(["report", *FAST, "--train-steps", "0", "--approximations", "kflr,tkfac",
                 "--model", f"{module}:make", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    ds = read_netcdf(tmp_path / "out" / "report.nc")
    assert list(ds["num_params"].values) == [65 * 12, 13 * 10]
    assert ds.attrs["model"] == f"{module}:make"


def test_summary_counts_the_parameters_the_blocks_cover(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A frozen layer (requires_grad=False) has no block: the summary said "910 parameters" of a
    model whose blocks cover 130."""
    module = tmp_path / "frozen.py"
    module.write_text(
        "from torch import nn\n"
        "def make(input_shape, num_classes):\n"
        "    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, num_classes))\n"
        "    net[1].requires_grad_(False)\n"
        "    return net\n"
    )
    out = tmp_path / "out"
    code = main(["report", *FAST, "--train-steps", "1", "--approximations", "kflr", "--model", f"{module}:make",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    ds = read_netcdf(out / "report.nc")
    assert list(ds["num_params"].values) == [13 * 10]
    assert (ds.attrs["num_trainable_params"], ds.attrs["num_model_params"]) == (13 * 10, 65 * 12 + 13 * 10)
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "(130 trainable parameters; 780 frozen, requires_grad=False, not measured)" in summary


def test_report_refusals_that_a_sweep_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Each was a traceback, a run that failed only after its compute, or an option silently dropped."""
    module = tmp_path / "pair.py"
    module.write_text("from torch import nn\n"
                      "class Pair(nn.Sequential):\n"
                      "    def forward(self, x):\n        return super().forward(x), x\n"
                      "def make(input_shape, num_classes):\n"
                      "    return Pair(nn.Flatten(), nn.Linear(64, num_classes))\n")
    cases = {  # arguments → the error's words
        ("--model", f"{module}:make"): "returns a tuple, not a tensor",  # AttributeError: 'tuple' … 'shape'
        ("--damping-strategy", "kfac=nor,kfac=exact"): "kfac is given two strategies (nor, exact)",  # nor never checked
        ("--truncation-rank", "8"): "--truncation-rank given but not --truncate-above",  # ignored
    }
    for args, said in cases.items():
        assert main(["report", *FAST, *args, "--out", str(tmp_path / "out")]) != 0
        assert said in capsys.readouterr().err, args
    monkeypatch.chdir(tmp_path)  # the current folder cannot be replaced: it failed after the whole run (EBUSY)
    assert main(["report", *FAST, "--out", "."]) != 0
    assert "is the current folder or holds it" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pair.py"]


@pytest.mark.parametrize("nproc", [[], ["--nproc", "2"]], ids=["one-process", "nproc-2"])
def test_engine_backpack_on_a_model_it_cannot_run_fails_before_the_data(tmp_path: Path, nproc: list[str],
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Checked with the model, before the data (a missing folder here) or any training, by the
    function's name (its repr's memory address went into the message)."""
    module = tmp_path / "functional.py"
    module.write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.fc = nn.Linear(784, 10)\n"
        "    def forward(self, x):\n        return self.fc(torch.relu(x.flatten(1)))\n"
    )
    code = main(["report", *FAST, "--model", f"{module}:Net", "--engine", "backpack", "--dataset", "mnist",
                 "--data-dir", str(tmp_path / "no-such-folder"), *nproc, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0
    assert "engine='backpack' cannot run this model: its forward applies call_function 'relu' outside a module" in err
    assert "0x" not in err and "Traceback" not in err and "no-such-folder" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [[], *[[name] for name in cli.SUBCOMMANDS]])
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: curvlab")
    if command == ["report"]:
        for option in ("--model", "--dataset", "--data-dir", "--batch-size", "--fisher", "--mc-samples",
                       "--approximations", "--damping", "--damping-strategy", "--tkfac-conv", "--top-k",
                       "--train-steps", "--device", "--seed", "--out", "--no-progress"):
            assert option in out, option


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "report" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "nope"], "unknown model 'nope'; choose one of mlp"),
        (["--model", "no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--approximations", "kfac,shampoo"], "unknown approximation(s) shampoo"),
        (["--approximations", "all,kfac"], "argument --approximations: 'all,kfac': 'all' stands alone"),
        (["--model", "3c3d"], "argument --model: model '3c3d' needs images of at least 9x9, got 8x8: choose a dataset"),
        (["--damping-strategy", "kfac=magic"], "unknown damping strategy 'magic'"),
        (["--damping", "-1"], "--damping: expected a positive finite number, got '-1'"),
        (["--batch-size", "0"], "--batch-size: expected a positive integer, got '0'"),
        (["--batch-size", "100000"], "batch size 100000 must be in [1, 1500]"),
        (["--fisher", "hessian"], "--fisher: invalid choice: 'hessian'"),
        (["--device", "tpu"], "device 'tpu'"),
        (["--seed", "-1"], "--seed: expected an integer in [0, 4294967295]"),
        (["--seed", str(2**64)], "--seed: expected an integer in [0, 4294967295]"),  # torch: "Overflow when unpacking"
        (["--label-smoothing", "1.5"], "--label-smoothing: expected a number in [0, 1], got '1.5'"),
    ],
)
def test_usage_errors(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["report", *FAST, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.count("error:") == 1
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--optimizer", "adam"], {"lr": 1e-3, "weight_decay": 0.0}),
        (["--optimizer", "adam", "--lr", "0.01", "--weight-decay", "1e-4"], {"lr": 0.01, "weight_decay": 1e-4}),
        (["--optimizer", "sgd", "--momentum", "0"], {"lr": 0.05, "momentum": 0.0}),
        (["--optimizer", "sgd", "--probe-every", "5", "--damping", "0.1"], {"damping": 0.1, "probe_every": 5}),
        (["--optimizer", "TEKFAC", "--damping", "0.1"], {"optimizer": "tekfac", "damping": 0.1}),  # as papers write it
    ],
)
def test_first_order_optimizers_take_their_options(args: list[str], want: dict) -> None:
    """Adam with its defaults (it was refused: --momentum counted as given); the probe's λ under SGD."""
    from curvlab.app.cli import build_parser
    from curvlab.app.train.cli import config_from_args

    parsed = build_parser()[0].parse_args(["train", *args])
    parsed.argv = ["train", *args]
    cfg = config_from_args(parsed)
    assert {k: getattr(cfg, k) for k in want} == want


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizer", "sgd", "--damping", "5", "--basis", "kfac"],
         "--damping, --basis given, which --optimizer sgd does not use (it takes --lr, --momentum, --weight-decay; "
         "--damping is the probe's λ, with --probe-every)"),
        (["--optimizer", "adam", "--momentum", "0.5"], "--momentum given, which --optimizer adam does not use"),
        (["--optimizer", "adam", "--momentum", "0"], "--momentum given, which --optimizer adam does not use"),
        (["--optimizer", "kfac", "--fisher", "exact", "--mc-samples", "3"],
         "--mc-samples given, which --optimizer kfac does not use (--mc-samples: with --fisher mc only"),
        (["--momentum", "1.5"], "--momentum 1.5 must be in [0, 1)"),
        (["--stat-decay", "1"], "--stat-decay 1.0 must be in [0, 1)"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),  # as report says
        (["--probe-every", "-1"], "argument --probe-every: expected an integer >= 0, got '-1'"),
        (["--model", "resnt18"], "argument --model: unknown model 'resnt18'"),
        (["--dataset", "mnits"], "argument --dataset: unknown dataset 'mnits'"),
        (["--model", "3c3d"], "argument --model: model '3c3d' needs images of at least 9x9, got 8x8"),
        (["--probe-approximations", "kfac,ekfc"], "argument --probe-approximations: unknown approximation(s) ekfc"),
        (["--hidden", ""], "argument --hidden: '': expected comma-separated positive integers"),
        (["--seed", "-3"], "--seed: expected an integer in [0, 4294967295]"),
        (["--seed", str(2**64 - 1)], "--seed: expected an integer in [0, 4294967295]"),  # seed + 1 overflowed torch
        (["--label-smoothing", "-0.1"], "argument --label-smoothing: expected a number in [0, 1], got '-0.1'"),
        (["--label-smoothing", "nan"], "argument --label-smoothing: expected a number in [0, 1], got 'nan'"),
    ],
)
def test_train_usage_errors(args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Options that would be ignored or that cannot train are refused before anything runs."""
    out = tmp_path / "out"
    assert main(["train", *args, "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("error:") == 1
    assert not out.exists()


@pytest.mark.parametrize("command", ["report", "train"])
def test_a_model_too_large_to_allocate_is_one_line(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in --hidden (25 TB of weights) ended in torch's allocator traceback."""
    out = tmp_path / "out"
    assert main([command, "--hidden", "99999999999", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "model 'mlp', hidden=(99999999999,) does not fit in memory: " in err
    assert "Traceback" not in err and err.count("error:") == 1 and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_missing_data_names_the_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    code = main(["report", *FAST, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err
    assert "mnist: IDX files not found" in err and f"{tmp_path}/data/train-images-idx3-ubyte" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    """The real process: ``python -m curvlab report`` (relative --out, from another folder)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "curvlab", "report", *FAST, "--approximations", "tkfac", "--out", "rep"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    _assert_report(tmp_path / "rep")
    bad = subprocess.run(
        [sys.executable, "-m", "curvlab", "report", "--dataset", "mnist", "--data-dir", "/nonexistent"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 1 and "/nonexistent" in bad.stderr and "Traceback" not in bad.stderr


def test_console_script(tmp_path: Path) -> None:
    """The ``curvlab`` script that pyproject's ``[project.scripts]`` installs."""
    script = Path(sys.executable).parent / "curvlab"
    if not script.is_file():
        pytest.skip(f"console script not installed at {script} (pip install -e .)")
    proc = subprocess.run([str(script), "report", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--damping-strategy" in proc.stdout
    proc = subprocess.run([str(script), "report", "--model", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr


def test_the_command_line_starts_without_the_compiler_or_the_plotting_libraries() -> None:
    """``curvlab --help`` and a usage error come before any figure or compiled model: importing
    torch._dynamo (1.8 s) or matplotlib and seaborn (1.6 s) at start-up would delay them.  The
    parser itself is built (it imports the commands' option registries: the report's, through its
    package, once imported the figures)."""
    code = ("import contextlib, io, sys, curvlab.app.cli as cli\n"
            "for command in ('report', 'train'):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        cli.main([command, '--help'])\n"
            "print(sorted(m for m in ('torch._dynamo', 'matplotlib', 'seaborn') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_train_and_the_reports_warm_up_never_load_the_compiler(tmp_path: Path) -> None:
    """torch._dynamo (1.2–2.6 s, as long as torch itself) was imported by every ``curvlab train``
    and ``curvlab report``: by ``--malloc auto``'s outline of the model, whose random inits and
    dummy forward ran on the meta device (a convnet's here), by torch.optim (curvlab's optimizers'
    base class, the SGD and Adam baselines, the report's Adam warm-up).  A whole run with SGD and
    the warm-up import it no more; the warm-up's Adam steps and SGD's (momentum, weight decay, a
    state dict loaded back) are torch's to the bit (taken again with the compiler loaded: torch's
    own wrappers).  curvlab's optimizers: test_architecture."""
    code = ("import contextlib, io, sys, torch, curvlab.app.cli as cli\n"
            "from curvlab.app.data import load_dataset\n"
            "from curvlab.app.models import make_model\n"
            "from curvlab.app.report.run import warm_up\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert cli.main(['train', '--dataset', 'digits', '--model', 'cnn', '--optimizer', 'sgd', '--train-size',\n"
            "                     '80', '--test-size', '20', '--batch-size', '40', '--epochs', '1', '--no-progress',\n"
            f"                     '--no-figures', '--out', {str(tmp_path / 'run')!r}]) == 0\n"
            "data = load_dataset('digits')\n"
            "def adam():\n"
            "    torch.manual_seed(0)\n"
            "    model = make_model('mlp', data.input_shape, data.num_classes)\n"
            "    warm_up(model, torch.nn.CrossEntropyLoss(), data, 4, batch_size=16, seed=1, device=torch.device('cpu'))\n"
            "    return torch.cat([p.detach().flatten() for p in model.parameters()])\n"
            "def sgd():\n"
            "    from curvlab.eager import eager_optimizer\n"
            "    torch.manual_seed(0)\n"
            "    model = make_model('mlp', data.input_shape, data.num_classes)\n"
            "    opt = eager_optimizer(torch.optim.SGD)(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)\n"
            "    for x, y in zip(data.train_x[:60].split(20), data.train_y[:60].split(20)):\n"
            "        opt.zero_grad()\n"
            "        torch.nn.functional.cross_entropy(model(x), y).backward()\n"
            "        opt.step()\n"
            "        opt.load_state_dict(opt.state_dict())\n"
            "    return torch.cat([p.detach().flatten() for p in model.parameters()])\n"
            "alone = adam(), sgd()\n"
            "print('torch._dynamo' in sys.modules)\n"
            "import torch._dynamo\n"
            "print(torch.equal(alone[0], adam()) and torch.equal(alone[1], sgd()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True"], proc.stdout


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="sees torch loaded through Linux's /proc")
def test_a_ctrl_c_during_start_up_ends_in_one_line(tmp_path: Path) -> None:
    """SIGINT while ``python -m curvlab`` still imports torch (seconds): one line and status 130,
    as a Ctrl-C during a run gives, not Python's traceback from inside an import."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "curvlab", "report", "--out", str(tmp_path / "rep")], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal gives it
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:  # torch's import has begun
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "curvlab: interrupted\n", err
    assert not (tmp_path / "rep").exists()


def test_report_on_mnist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = shared_data("mnist")
    out = tmp_path / "mnist"
    code = main(["report", *FAST, "--dataset", "mnist", "--data-dir", str(root), "--approximations", "kfac,tkfac",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    _assert_report(out)
    ds = read_netcdf(out / "report.nc")
    assert ds.attrs["data"] == "MNIST" and ds.attrs["num_train_examples"] == 60000
    assert list(ds["num_params"].values) == [785 * 128, 129 * 64, 65 * 10]


def test_label_smoothing_takes_the_closed_interval_and_numbers_only() -> None:
    """torch's CrossEntropyLoss takes ε = 1 (the uniform target); the option, the run's
    configuration and the report's check say [0, 1]."""
    assert label_smoothing("1") == 1.0 and label_smoothing("0") == 0.0
    assert check_label_smoothing("curvlab report", 1) == 1.0
    assert TrainConfig(label_smoothing=1).label_smoothing == 1.0
    for bad in (True, "0.1", float("nan"), None):
        with pytest.raises(ValueError, match=r"curvlab train: label_smoothing=.* must be a number in \[0, 1\]"):
            TrainConfig(label_smoothing=bad)


def test_a_model_file_is_the_file_it_names_where_the_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``--model models/net.py:net`` was compared as text: a resume (or ``--weights``) naming the
    same file by its absolute path was refused, the same text from another folder — another
    file, another model — accepted.  The spec now names the file it resolves to."""
    for folder, act in (("a", "ReLU"), ("b", "Tanh")):
        (tmp_path / folder / "models").mkdir(parents=True)
        (tmp_path / folder / "models" / "net.py").write_text(
            "from torch import nn\n"
            "def net(input_shape, num_classes):\n"
            f"    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.{act}(), nn.Linear(8, num_classes))\n")
    run, args = tmp_path / "run", ["--train-size", "64", "--test-size", "32", "--batch-size", "32", "--no-figures"]
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", "--model", "models/net.py:net", "--epochs", "1", *args, "--out", str(run)]) == 0
    monkeypatch.chdir(tmp_path)
    same = f"{tmp_path / 'a' / 'models' / 'net.py'}:net"
    assert main(["train", "--model", same, "--epochs", "2", *args, "--resume", "--out", str(run)]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path / "b")
    assert main(["train", "--model", "models/net.py:net", "--epochs", "3", *args, "--resume", "--out", str(run)]) == 1
    assert f"--model {same} (now {tmp_path / 'b' / 'models' / 'net.py'}:net)" in capsys.readouterr().err
    assert main(["report", "--model", "models/net.py:net", "--weights", str(run), "--out", str(tmp_path / "rep")]) == 2
    assert f"was trained with --model {same}" in capsys.readouterr().err
