"""``curvlab report --weights``: the weights a report measures, read and checked before any data.

A path is a ``curvlab train`` run folder (its ``checkpoint.pt``), such a ``checkpoint.pt``
(read by :func:`curvlab.app.train.checkpoint.load_checkpoint`), or a file of
``torch.save(model.state_dict(), path)``.  Only tensors and plain data are loaded
(``weights_only``).  A checkpoint of another model or dataset, a file holding something else and
a state dict that does not fit the model are :class:`ReportError` s naming the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from curvlab.app.report.run import ReportError
from curvlab.io import PathLike

WHO = "curvlab report"
#: Keys listed per kind of mismatch in an error.
SHOWN = 3


@dataclass(frozen=True)
class Weights:
    """Weights read for a report: the file (resolved), its SHA-256, what it is, the state dict."""

    path: Path
    sha256: str
    source: str
    state_dict: Mapping[str, torch.Tensor]

    def attrs(self) -> dict[str, str]:
        """report.nc's record of them."""
        return {"weights": str(self.path), "weights_sha256": self.sha256, "weights_source": self.source}


#: report.nc's attributes without ``--weights``.
NO_WEIGHTS = {"weights": "none", "weights_sha256": "none", "weights_source": "none"}


def read_weights(path: PathLike, model: str, dataset: str) -> Weights:
    """The weights at ``path`` for ``model`` on ``dataset``, checked against the model built on
    ``dataset``'s shapes (no data is loaded).

    Raises:
        ReportError: no such file; a folder without ``checkpoint.pt``; a file torch cannot read
            (weights only); a checkpoint of another model, dataset or model options; something
            other than a state dict; a state dict with missing or unexpected keys or wrong shapes.
    """
    from curvlab.app.train.run_folder import CHECKPOINT

    given = Path(path).expanduser()
    file = given / CHECKPOINT if given.is_dir() else given
    if not file.is_file():
        if given.is_dir():
            what = f"{given} is a folder without {CHECKPOINT} (not a curvlab train run)"
        else:
            what = f"{given} is not a file" if given.exists() else f"{given} does not exist"
        raise ReportError(f"{WHO}: --weights {what}")
    file = file.resolve()
    try:
        before = _identity(file)
        sha256 = _sha256(file)
    except OSError as err:
        raise ReportError(f"{WHO}: --weights {file} cannot be read ({err.strerror or err})") from None
    loaded = _load_checkpoint(file) if file.name == CHECKPOINT else _load(file)
    if _identity(file) != before:  # a training run replaced it meanwhile: the hash is of another file
        raise ReportError(f"{WHO}: --weights {file} changed while it was read (a training run saving it?); try again")
    if _is_checkpoint(loaded):  # a checkpoint.pt, or one copied under another name
        config = _checked_config(file, loaded["config"], model, dataset)
        source = (f"curvlab train checkpoint: {config.get('config_optimizer', '?')}, epoch {loaded['epoch']}, "
                  f"step {loaded['step']}")
        state = loaded["model"]
    else:
        source, state = "state dict", loaded
    _check_state_dict(file, state)
    _check_fit(file, state, model, dataset)
    return Weights(file, sha256, source, state)


def _identity(file: Path) -> tuple[int, int, int]:
    st = file.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_checkpoint(file: Path) -> dict:
    from curvlab.app.train.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(file, torch.device("cpu"))
    except CheckpointError as err:  # its messages name curvlab train, which is not what runs
        raise ReportError(f"{WHO}: --weights {str(err).removeprefix('curvlab train: ')}") from None


def _load(file: Path) -> object:
    from curvlab.app.train.checkpoint import UnreadableFile, load_plain

    try:
        return load_plain(file, "cpu")
    except (UnreadableFile, OSError) as err:
        raise ReportError(f"{WHO}: --weights {file} is not a file torch can read as weights only ({err}); "
                          "expected a curvlab train checkpoint or torch.save(model.state_dict(), path)") from None


def _is_checkpoint(obj: object) -> bool:
    from curvlab.app.train.checkpoint import REQUIRED

    return isinstance(obj, Mapping) and all(key in obj for key in REQUIRED)


def _checked_config(file: Path, config: object, model: str, dataset: str) -> dict:
    """The checkpoint's configuration, its model, dataset and model options the report's."""
    from curvlab.app.data import canonical_name

    if not isinstance(config, dict):
        raise ReportError(f"{WHO}: --weights {file} has no readable configuration")
    differ = [f"{option} {theirs} (this report: {ours})" for option, theirs, ours in (
        ("--model", config.get("config_model"), model),
        ("--dataset", canonical_name(str(config.get("config_dataset"))), canonical_name(dataset)),
    ) if theirs != ours]
    options = config.get("config_model_kwargs", "")
    if options not in ("", "none"):  # the report builds its models with their default options
        differ.append(f"the model options {options} (this report: the defaults; it has no --hidden)")
    if differ:
        raise ReportError(f"{WHO}: --weights {file} was trained with {'; '.join(differ)}; report with "
                          "the run's --model and --dataset, or pass weights of this model")
    return config


def _check_state_dict(file: Path, state: object) -> None:
    if isinstance(state, Mapping) and state:
        bad = next(((k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is None:
            return
        what = f"a dict whose entry {bad[0]!r} is not a tensor but of type {type(bad[1]).__name__}"
    else:
        what = "an empty dict" if isinstance(state, Mapping) else f"an object of type {type(state).__name__}"
    raise ReportError(f"{WHO}: --weights {file} is not a state dict: it holds {what} (expected "
                      "torch.save(model.state_dict(), path): the model's parameter and buffer names → tensors)")


def _check_fit(file: Path, state: Mapping[str, torch.Tensor], model: str, dataset: str) -> None:
    """Every key of the model's state dict, none other, each of its shape — as load_state_dict
    checks, but before the data is loaded, and naming the keys."""
    from curvlab.app.data import SHAPES, canonical_name
    from curvlab.app.models import make_model

    input_shape, num_classes = SHAPES[canonical_name(dataset)]
    with torch.random.fork_rng(devices=[]):  # a check: the caller's random state stays as it was
        expected = {k: tuple(v.shape) for k, v in make_model(model, input_shape, num_classes).state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (model: {expected[k]})" for k in expected
              if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"{label} {_first(keys)}" for label, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if keys]
    if problems:
        raise ReportError(f"{WHO}: --weights {file} does not fit --model {model} on {canonical_name(dataset)}: "
                          f"{'; '.join(problems)}")


def _first(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f", … ({len(items)} in all)" if len(items) > SHOWN else "")
