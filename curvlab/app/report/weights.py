"""``curvlab report --weights``: the weights a report measures, read and checked before any data.

A path is a ``curvlab train`` run folder (its ``checkpoint.pt``), such a checkpoint, or a file of
``torch.save(model.state_dict(), path)``: what the file holds decides which, whatever its name.
Only tensors and plain data are loaded (``weights_only``); a wrapper's key prefix (DDP's
``module.``) is removed.  A checkpoint of another model or dataset, a file holding something
else, a state dict that does not fit the model and non-finite weights are :class:`ReportError` s
naming the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from curvlab.app.models.user import resolved_spec
from curvlab.app.options import options_attr
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


def read_weights(path: PathLike, model: str, dataset: str, model_kwargs: dict | None = None) -> Weights:
    """The weights at ``path`` for ``model`` (with ``model_kwargs``, ``--hidden``) on ``dataset``,
    checked against the model built on ``dataset``'s shapes (no data is loaded).

    Raises:
        ReportError: no such file; a folder without ``checkpoint.pt``; a file torch cannot read
            (weights only) or that changed while read; a checkpoint of another model or dataset;
            something other than a state dict; NaN or infinite weights; a state dict with missing
            or unexpected keys or wrong shapes (naming the model options a checkpoint was trained
            with where they are not ``model_kwargs``).
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
    loaded = _load(file)  # what it is by its content: a state dict may be called checkpoint.pt too
    if _identity(file) != before:  # a training run replaced it meanwhile: the hash is of another file
        raise ReportError(f"{WHO}: --weights {file} changed while it was read (a training run saving it?); try again")
    diverged, trained_with = None, None
    if _is_checkpoint(loaded):
        config = _checked_config(file, loaded["config"], model, dataset)
        c = {k.removeprefix("config_"): v for k, v in config.items()}
        trained_with = str(c.get("model_kwargs", "")).removeprefix("none") or "none"
        warmup = c.get("warmup_epochs", 0)
        source = (f"curvlab train checkpoint: {c.get('optimizer', '?')} (lr {c.get('lr', '?')}, augment "
                  f"{c.get('augment', 'none')}, lr schedule {c.get('lr_schedule', 'constant')}, warm-up "
                  f"{warmup} epoch{'' if warmup == 1 else 's'}), epoch "
                  f"{loaded['epoch']} of {c.get('epochs', '?')}, step {loaded['step']}")
        state, diverged = loaded["model"], loaded.get("diverged_at")
    else:
        source, state = "state dict", loaded
    _check_state_dict(file, state)
    state, stripped = _without_wrapper_prefix(state)
    if stripped:
        source += f" (its {stripped!r} prefix removed)"
    _check_finite(file, state, diverged)
    _check_fit(file, state, model, dataset, model_kwargs or {}, trained_with)
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


def _load(file: Path) -> object:
    from curvlab.app.train.checkpoint import UnreadableFile, load_plain

    try:
        return load_plain(file, "cpu")
    except (UnreadableFile, OSError) as err:
        raise ReportError(f"{WHO}: --weights {file} is not a file torch can read as weights only ({err}): "
                          "truncated, or not written by torch.save; expected a curvlab train checkpoint or "
                          "torch.save(model.state_dict(), path)") from None


def _is_checkpoint(obj: object) -> bool:
    from curvlab.app.train.checkpoint import REQUIRED

    return isinstance(obj, Mapping) and all(key in obj for key in REQUIRED)


def _checked_config(file: Path, config: object, model: str, dataset: str) -> dict:
    """The checkpoint's configuration, its model and dataset the report's (its model options are
    checked by the shapes they give, :func:`_check_fit`: ``--hidden 128,64`` is mlp's default)."""
    from curvlab.app.data import canonical_name

    if not isinstance(config, dict):
        raise ReportError(f"{WHO}: --weights {file} has no readable configuration")
    differ = [f"{option} {theirs} (this report: {ours})" for option, theirs, ours in (
        ("--model", resolved_spec(str(config.get("config_model"))), resolved_spec(model)),
        ("--dataset", canonical_name(str(config.get("config_dataset"))), canonical_name(dataset)),
    ) if theirs != ours]
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


#: Key prefixes of a model saved through a wrapper: DistributedDataParallel's, torch.compile's.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _without_wrapper_prefix(state: Mapping[str, torch.Tensor]) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """``state`` with the prefix every key has removed where it is a wrapper's (a DDP model's
    ``state_dict()`` instead of its ``module``'s), by torch's own helper; and that prefix."""
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = dict(state)
            consume_prefix_in_state_dict_if_present(state, prefix)
            return state, prefix
    return state, None


def _check_finite(file: Path, state: Mapping[str, torch.Tensor], diverged: int | None) -> None:
    """No NaN or infinity in the weights (a diverged run's): their curvature means nothing."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        why = f"; the run diverged at step {diverged}" if diverged is not None else ""
        raise ReportError(f"{WHO}: --weights {file} holds non-finite values in {_first(bad)}{why}: there is no "
                          "curvature to measure; pass weights from before it diverged")


def _check_fit(file: Path, state: Mapping[str, torch.Tensor], model: str, dataset: str, model_kwargs: dict,
               trained_with: str | None = None) -> None:
    """Every key of the model's state dict, none other, each of its shape — as load_state_dict
    checks, but before the data is loaded, and naming the keys; ``trained_with``: a checkpoint's
    model options, named where they are not the report's."""
    from curvlab.app.data import SHAPES, canonical_name
    from curvlab.app.models import make_model

    input_shape, num_classes = SHAPES[canonical_name(dataset)]
    with torch.random.fork_rng(devices=[]):  # a check: the caller's random state stays as it was
        expected = {k: tuple(v.shape) for k, v in make_model(model, input_shape, num_classes, **model_kwargs).state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} (model: {expected[k]})" for k in expected
              if k in state and tuple(state[k].shape) != expected[k]]
    problems = [f"{label} {_first(keys)}" for label, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if keys]
    if problems:
        ours = options_attr(model_kwargs) or "none"
        advice = "leave --hidden out (the run used the model's default widths)" if trained_with == "none" else "pass its --hidden"
        trained = "with no model options" if trained_with == "none" else f"with the model options {trained_with}"
        hint = (f"; the run was trained {trained} (this report: {ours}): {advice}"
                if trained_with not in (None, ours) else "")
        raise ReportError(f"{WHO}: --weights {file} does not fit --model {model} on {canonical_name(dataset)}: "
                          f"{'; '.join(problems)}{hint}")


def _first(items: list[str]) -> str:
    return ", ".join(items[:SHOWN]) + (f", … ({len(items)} in all)" if len(items) > SHOWN else "")
