"""``curvlab report --weights``: the report measures given weights (a ``curvlab train`` run, its
checkpoint, or a plain state dict), records which, and refuses bad files before any data.

The measured numbers are checked against what the test computes itself: the same model built and
loaded with torch, evaluated on the batch the report draws (``fixed_batch``), and the exact GGN
block of the last layer from dense autograd (tests/helpers.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import xarray as xr
from torch import nn

from curvlab.app import launch
from curvlab.app.cli import main
from curvlab.app.data import fixed_batch, load_dataset
from curvlab.app.models import make_model
from curvlab.app.report import ReportConfig
from curvlab.app.report import run as report_run
from curvlab.app.report.run import ReportError, warm_up
from curvlab.app.report.weights import read_weights
from curvlab.app.train import TrainConfig, train
from curvlab.app.train import checkpoint as train_checkpoint
from curvlab.io import read_netcdf
from helpers import dense_ggn, without_report_figures

N = 8  # examples in the measured batch
SEED = 0
REPORT = ["report", "--batch-size", str(N), "--approximations", "kflr", "--num-eigenvalues", "16", "--no-progress"]
TRAIN = ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--train-size", "64", "--test-size", "32",
         "--batch-size", "16", "--optimizer", "sgd", "--no-progress", "--no-figures"]


def _report(out: Path, *extra: str, capsys: pytest.CaptureFixture[str] | None = None) -> xr.Dataset:
    code = main([*REPORT, *extra, "--out", str(out)])
    err = capsys.readouterr().err if capsys is not None else ""
    assert code == 0, err
    return read_netcdf(out / "report.nc")


@pytest.fixture(scope="module", autouse=True)
def _no_figures():  # noqa: ANN202 (a generator fixture)
    """These reports are read for their numbers and records: their figures left empty."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        without_report_figures(monkeypatch)
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def run(work: Path) -> Path:
    """A tiny ``curvlab train`` run (4 SGD steps): its folder."""
    folder = work / "run"
    assert main([*TRAIN, "--out", str(folder)]) == 0
    assert (folder / "checkpoint.pt").is_file()
    return folder


@pytest.fixture(scope="module")
def init_report(work: Path) -> Path:
    """A report of the seeded initialisation (no --weights, no training): its folder."""
    out = work / "init"
    assert main([*REPORT, "--train-steps", "0", "--out", str(out)]) == 0
    return out


def _expected(state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Loss on the report's batch and tr F of the last layer ("5") of an mlp holding ``state``,
    computed here: the model built and loaded with torch, the exact GGN block by dense autograd."""
    data = load_dataset("digits")
    x, y = fixed_batch(data, N, SEED)
    model = make_model("mlp", data.input_shape, data.num_classes)
    model.load_state_dict(state)
    model = model.double().eval()
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        loss = loss_fn(model(x.double()), y).item()
    trace = torch.trace(dense_ggn(model, loss_fn, x.double(), y, "5")).item()
    return loss, trace


def _assert_measures(ds: xr.Dataset, state: dict[str, torch.Tensor]) -> None:
    loss, trace = _expected(state)
    assert ds.attrs["batch_loss"] == pytest.approx(loss, rel=1e-5)
    assert float(ds["exact_trace"].sel(layer="5")) == pytest.approx(trace, rel=1e-4)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------ measuring


def test_report_measures_a_train_run(run: Path, init_report: Path, work: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The run folder and its checkpoint.pt: the report measures the checkpoint's weights (the
    loss on the batch and the last layer's tr F computed here from them), not the init."""
    state = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    by_folder = _report(work / "by-folder", "--weights", str(run), capsys=capsys)
    _assert_measures(by_folder, state)
    by_file = _report(work / "by-file", "--weights", str(run / "checkpoint.pt"), capsys=capsys)
    assert by_file.attrs["batch_loss"] == by_folder.attrs["batch_loss"]
    assert by_folder.attrs["train_steps"] == 0 and by_folder.attrs["train_optimizer"] == "none"  # nothing trained

    init = read_netcdf(init_report / "report.nc")
    assert abs(init.attrs["batch_loss"] - by_folder.attrs["batch_loss"]) > 1e-3
    assert abs(float(init["exact_trace"].sel(layer="5")) - float(by_folder["exact_trace"].sel(layer="5"))) > 1e-3
    assert init.attrs["weights"] == "none"  # and the init's summary has no weights line
    assert "Weights measured" not in (init_report / "summary.md").read_text(encoding="utf-8")


def test_report_measures_a_state_dict_file(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file of torch.save(model.state_dict()) written by the user's own code."""
    torch.manual_seed(7)  # weights other than the report's seeded init
    model = make_model("mlp", (1, 8, 8), 10)
    path = work / "mine.pt"
    torch.save(model.state_dict(), path)
    ds = _report(work / "plain", "--weights", str(path), capsys=capsys)
    _assert_measures(ds, model.state_dict())
    assert ds.attrs["weights_source"] == "state dict"


def test_what_a_file_holds_decides_how_it_is_read(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A state dict saved as checkpoint.pt is a state dict; one of a DistributedDataParallel (or
    torch.compile'd) model, every key prefixed, measures the model it wraps."""
    torch.manual_seed(11)
    model = make_model("mlp", (1, 8, 8), 10)
    named = work / "named" / "checkpoint.pt"
    named.parent.mkdir()
    torch.save(model.state_dict(), named)
    ds = _report(work / "named-report", "--weights", str(named.parent), capsys=capsys)
    _assert_measures(ds, model.state_dict())
    assert ds.attrs["weights_source"] == "state dict"
    for prefix in ("module.", "_orig_mod."):
        wrapped = work / f"wrapped-{prefix}pt"
        torch.save({prefix + k: v for k, v in model.state_dict().items()}, wrapped)
        ds = _report(work / f"wrapped-{prefix}report", "--weights", str(wrapped), capsys=capsys)
        _assert_measures(ds, model.state_dict())
        assert ds.attrs["weights_source"] == f"state dict (its {prefix!r} prefix removed)"


def test_a_run_with_hidden_widths_is_reported_with_them(bad_files: dict, work: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """--hidden as curvlab train's: the run trained with --hidden 32 reports with it (refused
    without: the "other model options" case)."""
    path = bad_files["other model options"][0]
    ds = _report(work / "hidden-report", "--hidden", "32", "--weights", str(path), capsys=capsys)
    assert ds.attrs["model_options"] == "hidden=(32,)" and int(ds.attrs["num_trainable_params"]) == 64 * 32 + 32 + 32 * 10 + 10
    assert "- **Model options:** hidden=(32,)" in (work / "hidden-report" / "summary.md").read_text(encoding="utf-8")
    assert main([*REPORT, "--model", "cnn", "--hidden", "32", "--out", str(work / "cnn-hidden")]) == 2
    assert "--hidden applies to the built-in models mlp, vgg, vgg16-bn, not cnn" in capsys.readouterr().err
    (work / "net.py").write_text("from torch import nn\n\ndef net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    assert main([*REPORT, "--model", f"{work / 'net.py'}:net", "--hidden", "8", "--out", str(work / "user-hidden")]) == 2
    assert "--hidden applies to the built-in models mlp, vgg, vgg16-bn, not a module:function" in capsys.readouterr().err


def test_train_steps_from_the_weights(run: Path, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An explicit --train-steps 3 trains 3 Adam steps from the weights: not the weights as
    they are, not 3 steps from the init, and what 3 warm-up steps from them give."""
    weights = ["--weights", str(run)]
    at = _report(work / "at", *weights, "--train-steps", "0", capsys=capsys)
    after = _report(work / "after", *weights, "--train-steps", "3", capsys=capsys)
    from_init = _report(work / "from-init", "--train-steps", "3", capsys=capsys)
    assert after.attrs["train_steps"] == 3 and after.attrs["train_optimizer"] == "Adam(lr=0.001)"
    assert abs(after.attrs["batch_loss"] - at.attrs["batch_loss"]) > 1e-4
    assert abs(after.attrs["batch_loss"] - from_init.attrs["batch_loss"]) > 1e-4

    # the same 3 steps (the report's warm-up: its batches and Adam) from the checkpoint's weights
    data = load_dataset("digits")
    model = make_model("mlp", data.input_shape, data.num_classes)
    model.load_state_dict(torch.load(run / "checkpoint.pt", weights_only=True)["model"])
    warm_up(model, nn.CrossEntropyLoss(), data, 3, seed=SEED, device=torch.device("cpu"))
    _assert_measures(after, model.state_dict())
    assert "then 3 Adam steps" in (work / "after" / "summary.md").read_text(encoding="utf-8")


def test_weights_are_recorded(run: Path, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """report.nc: the checkpoint's resolved path and SHA-256 (hashlib's of the file); summary.md:
    one line saying which weights were measured."""
    ckpt = (run / "checkpoint.pt").resolve()
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    out = work / "recorded"
    ds = _report(out, "--weights", str(run), capsys=capsys)
    assert ds.attrs["weights"] == str(ckpt)
    assert ds.attrs["weights_sha256"] == sha
    source = ("curvlab train checkpoint: sgd (lr 0.05, augment none, lr schedule constant, warm-up 0 epochs), "
              "epoch 1 of 1, step 4")
    assert ds.attrs["weights_source"] == source
    lines = [line for line in (out / "summary.md").read_text(encoding="utf-8").splitlines() if "Weights" in line]
    assert lines == [f"- **Weights measured:** {ckpt} (sha256 {sha}; {source}), as loaded (no training steps)"]


def test_config_default_train_steps() -> None:
    """ReportConfig: 200 Adam steps from the init, none from weights, unless given."""
    assert ReportConfig().steps() == 200
    assert ReportConfig(weights="w.pt").steps() == 0
    assert ReportConfig(weights="w.pt", train_steps=5).steps() == 5
    assert ReportConfig(train_steps=0).steps() == 0


def test_help_describes_weights(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--weights PATH" in text and "torch.save(model.state_dict(), PATH)" in text
    assert "(default: 200; 0 with --weights" in text


# ------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def bad_files(work: Path, run: Path) -> dict[str, tuple[Path, list[str], str]]:
    """Case → (the file the message must name, the extra options, a phrase of the message)."""
    text = work / "notes.txt"
    text.write_text("not weights\n")
    wrong = make_model("mlp", (1, 8, 8), 10).state_dict()
    wrong["3.weight"] = torch.zeros(64, 7)
    torch.save(wrong, work / "wrong-shape.pt")
    torch.save([torch.zeros(3)], work / "a-list.pt")
    hidden = work / "run-hidden"
    assert main([*TRAIN, "--hidden", "32", "--out", str(hidden)]) == 0
    nan = make_model("mlp", (1, 8, 8), 10).state_dict()
    nan["3.weight"][0, 0] = float("nan")
    torch.save(nan, work / "diverged.pt")
    ckpt = run / "checkpoint.pt"
    return {
        "missing": (work / "nope.pt", [], "does not exist"),
        "text": (text, [], "is not a file torch can read as weights only (UnpicklingError: not a file torch.save writes"),
        "not a state dict": (work / "a-list.pt", [], "is not a state dict"),
        "wrong shape": (work / "wrong-shape.pt", [], "wrong shapes 3.weight (64, 7) (model: (64, 128))"),
        "other model options": (hidden / "checkpoint.pt", ["--weights", str(hidden)], "hidden=(32,)"),
        "other model": (ckpt, ["--model", "cnn"], "--model mlp (this report: cnn)"),
        "non-finite": (work / "diverged.pt", [], "holds non-finite values in 3.weight"),
    }


CASES = ["missing", "text", "not a state dict", "wrong shape", "other model options", "other model", "non-finite"]


@pytest.mark.parametrize("case", CASES)
def test_bad_weights_are_refused_before_any_data(case: str, bad_files: dict, init_report: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A usage error (2) naming the file and the problem, before the data is loaded; the report
    already in --out is left as it was, byte for byte."""
    path, extra, phrase = bad_files[case]
    options = extra if "--weights" in extra else [*extra, "--weights", str(path)]

    def no_data(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the data was loaded")

    monkeypatch.setattr(report_run, "load_dataset", no_data)
    before = _snapshot(init_report)
    capsys.readouterr()
    code = main([*REPORT, *options, "--out", str(init_report)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"curvlab report: error: --weights {path}" in err and phrase in err, err
    assert _snapshot(init_report) == before


def test_bad_weights_fail_before_nproc_starts(bad_files: dict, init_report: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Under --nproc 2 the weights are checked once, before any process starts, as a usage error."""
    def no_launch(*_args: object, **_kwargs: object) -> int:
        raise AssertionError("the processes were started")

    monkeypatch.setattr(launch, "relaunch", no_launch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # not a launched rank: this process would start them
    path, _, phrase = bad_files["wrong shape"]
    before = _snapshot(init_report)
    capsys.readouterr()
    code = main([*REPORT, "--nproc", "2", "--weights", str(path), "--out", str(init_report)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count(f"curvlab report: error: --weights {path}") == 1 and phrase in err, err
    assert _snapshot(init_report) == before


# ----------------------------------------------------------------- from mutation testing


def _sgd_config(out: Path, **kw) -> TrainConfig:
    """4 steps an epoch (120 examples in batches of 30), SGD, no figures."""
    base = dict(model="mlp", dataset="digits", optimizer="sgd", epochs=3, batch_size=30, train_size=120,
                test_size=40, out=str(out), progress=False, figures=False, model_kwargs={"hidden": (8,)}, lr=0.2)
    return TrainConfig(**{**base, **kw})


def _state(seed: int = 3, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return make_model("mlp", (1, 8, 8), 10, **kwargs).state_dict()


USER_MODEL = """
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat, self.module, self.head = nn.Flatten(), nn.Linear(64, 10), nn.Linear(10, 10)

    def forward(self, x):
        return self.head(self.module(self.flat(x)))


def build():
    return Net()
"""


def test_a_model_with_a_submodule_called_module_keeps_its_keys(tmp_path: Path) -> None:
    """Only a prefix every key has is a wrapper's: a model whose own submodule is called
    ``module`` (some keys ``module.…``, others not) is read as it is, not stripped."""
    (tmp_path / "net.py").write_text(USER_MODEL)
    spec = f"{tmp_path / 'net.py'}:build"
    state = make_model(spec, (1, 8, 8), 10).state_dict()
    assert any(k.startswith("module.") for k in state) and not all(k.startswith("module.") for k in state)
    torch.save(state, tmp_path / "w.pt")
    weights = read_weights(tmp_path / "w.pt", spec, "digits")
    assert weights.source == "state dict" and list(weights.state_dict) == list(state)


def test_infinite_weights_are_refused_as_nan_ones(tmp_path: Path) -> None:
    state = _state()
    key = next(iter(state))
    state[key].view(-1)[0] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    with pytest.raises(ReportError, match=rf"holds non-finite values in {key}"):
        read_weights(tmp_path / "inf.pt", "mlp", "digits")


def test_a_diverged_runs_checkpoint_names_the_step_it_diverged_at(tmp_path: Path) -> None:
    """The run's own record of the step (metrics.nc's diverged_at_step) is in the refusal."""
    with pytest.warns(RuntimeWarning, match="diverged"):
        paths = train(_sgd_config(tmp_path / "run", lr=1e30, batch_size=4, epochs=1))
    with xr.open_dataset(paths["metrics"]) as ds:
        step = int(ds.attrs["diverged_at_step"])
    with pytest.raises(ReportError, match=rf"non-finite values in .*; the run diverged at step {step}:"):
        read_weights(tmp_path / "run", "mlp", "digits", {"hidden": (8,)})


def test_the_hash_is_of_the_whole_file(tmp_path: Path) -> None:
    """hashlib's SHA-256 of every byte of a state dict larger than any read buffer (several MiB)."""
    state = _state(hidden=(12000,))
    path = tmp_path / "wide.pt"
    torch.save(state, path)
    assert path.stat().st_size > 2 * 2**20
    weights = read_weights(path, "mlp", "digits", {"hidden": (12000,)})
    assert weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_file_replaced_while_it_is_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hash would be another file's: a training run saving it meanwhile is a refusal, not a
    record of the wrong checksum."""
    path = tmp_path / "w.pt"
    torch.save(_state(), path)
    plain = train_checkpoint.load_plain

    def load_then_replace(file, device):
        out = plain(file, device)
        torch.save(_state(seed=4), str(file) + ".new")
        os.replace(str(file) + ".new", file)  # as an atomic save does
        return out

    monkeypatch.setattr(train_checkpoint, "load_plain", load_then_replace)
    with pytest.raises(ReportError, match="changed while it was read"):
        read_weights(path, "mlp", "digits")


@pytest.mark.parametrize("case", ["unexpected", "missing"])
def test_keys_the_model_does_not_have_or_lacks_are_refused_naming_them(case: str, tmp_path: Path) -> None:
    state = _state()
    if case == "unexpected":
        state["extra.weight"] = torch.zeros(2)
        name = "extra.weight"
    else:
        name = list(state)[-1]
        del state[name]
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(ReportError, match=rf"{case} keys {name}"):
        read_weights(tmp_path / "w.pt", "mlp", "digits")


def test_a_relative_path_is_recorded_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    torch.save(_state(), tmp_path / "sub" / "w.pt")
    monkeypatch.chdir(tmp_path / "sub")
    weights = read_weights("../sub/w.pt", "mlp", "digits")
    assert weights.attrs()["weights"] == str((tmp_path / "sub" / "w.pt").resolve())
    assert Path(weights.attrs()["weights"]).is_absolute()


def test_model_options_are_compared_by_the_model_they_build(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run trained with mlp's default widths spelled out (--hidden 128,64) reports without
    --hidden, as the same model; a model with one hidden layer (vgg's classifier) takes one width
    in both commands, and several are refused naming it."""
    spelled = work / "run-default-widths"
    assert main([*TRAIN, "--hidden", "128,64", "--out", str(spelled)]) == 0
    _report(work / "default-widths-report", "--weights", str(spelled), capsys=capsys)
    vgg = work / "run-vgg"
    assert main([*TRAIN, "--model", "vgg", "--hidden", "16", "--out", str(vgg)]) == 0
    ds = _report(work / "vgg-report", "--model", "vgg", "--hidden", "16", "--weights", str(vgg), capsys=capsys)
    assert ds.attrs["model_options"] == "hidden=16"
    for command in (TRAIN, REPORT):
        assert main([*command, "--model", "vgg", "--hidden", "16,8", "--out", str(work / "vgg-two")]) == 2
        assert "--hidden 16,8: vgg has one hidden layer (its classifier's): give one width" in capsys.readouterr().err


def test_a_run_of_the_default_widths_reported_with_other_widths_says_to_leave_hidden_out(
        run: Path, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The run used mlp's default widths: there is no --hidden of it to pass."""
    assert main([*REPORT, "--hidden", "32", "--weights", str(run), "--out", str(work / "other-widths")]) == 2
    assert ("the run was trained with no model options (this report: hidden=(32,)): leave --hidden out "
            "(the run used the model's default widths)") in capsys.readouterr().err
