"""``OUT/checkpoint.pt`` of ``curvlab train``: written atomically, read without running code.

* Saving serialises in memory first and writes the bytes with :func:`curvlab.io.atomic_write`
  (temporary file, fsync, rename): the previous checkpoint stays until the new one is complete,
  and a full disk is an ``OSError`` ``[Errno 28]`` naming the path (``torch.save`` straight to
  a file would say only "file write failed").
* Loading uses ``torch.load(weights_only=True)``: a crafted file cannot execute code, and a
  truncated, random or foreign file is a :class:`CheckpointError` naming it.
* :func:`check_same_run` compares the run's configuration with the one the checkpoint was
  written with: paths are compared resolved; the number of epochs (unless the learning-rate
  schedule spans them), the progress bars, the figures and the spelling of the output folder may change.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from curvlab.app.messages import flag
from curvlab.app.models.user import resolved_spec
from curvlab.app.train.config import NOT_USED, TrainConfig
from curvlab.app.train.schedule import SPANNING_EPOCHS
from curvlab.io import atomic_write

#: Entries every checkpoint of ``curvlab train`` has.
REQUIRED = ("model", "optimizer", "rng", "epoch", "step", "wall_clock", "records", "config")
#: Configuration entries a resumed run may change.  The output folder is where the checkpoint
#: was found, so it is the run's folder however it is spelled (or if it was moved).
MAY_CHANGE = {"config_epochs", "config_progress", "config_figures", "config_out"}
#: Entries that are paths: compared resolved (``data``, ``./data`` and ``data/`` are one folder).
PATHS = ("config_data_dir",)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or belongs to another run."""


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (raises ``OSError`` naming ``path``)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


class UnreadableFile(ValueError):
    """torch cannot read a file as tensors and plain data; the message is why, in one line
    (``ExceptionType: first line``)."""


def load_plain(path: Path, device: torch.device | str) -> Any:
    """``torch.load(path, weights_only=True)`` onto ``device``: a crafted file cannot execute
    code.  Raises :class:`UnreadableFile` for a truncated, random or foreign file (not for a
    missing one: ``FileNotFoundError``)."""
    # torch.load cannot map storages to an indexed CPU device ("cpu:0": "don't know how to restore
    # data location"), which would blame the file: the CPU is the CPU
    where = torch.device("cpu") if torch.device(device).type == "cpu" else device
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle come before our one line
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=where, weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError, KeyError,
            AttributeError, TypeError, IndexError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not _torch_format(path):  # a text or random file: torch's words would be about unpickling
            first = "not a file torch.save writes (neither its zip archive nor a pickle)"
        elif "weights_only" in str(err) or "Weights only" in str(err):  # not torch's advice to load it unsafely
            first = "it holds something other than tensors and plain data"
        raise UnreadableFile(f"{type(err).__name__}: {first}") from None


def _torch_format(path: Path) -> bool:
    """Whether ``path`` starts as ``torch.save`` writes: a zip archive, or (before torch 1.6) a pickle."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return True  # unreadable now: torch's own words
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """The checkpoint at ``path``, tensors on ``device``; only tensors and plain data are read."""
    try:
        ckpt = load_plain(path, device)
    except UnreadableFile as err:
        raise CheckpointError(
            f"curvlab train: {path} is not a readable curvlab checkpoint ({err}); "
            "it may be truncated, from another program, or crafted — only tensors and plain data are loaded"
        ) from None
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"curvlab train: {path} is not a curvlab train checkpoint (missing {', '.join(missing)})")
    # random states are CPU byte tensors whatever the device (torch.set_rng_state refuses others),
    # and map_location moved them with the rest
    for key in ("rng", "cuda_rng"):
        if isinstance(ckpt.get(key), torch.Tensor):
            ckpt[key] = ckpt[key].cpu()
    for key in ("rank_rng", "rank_cuda_rng"):
        if isinstance(ckpt.get(key), list):
            ckpt[key] = [s.cpu() if isinstance(s, torch.Tensor) else s for s in ckpt[key]]
    return ckpt


def _comparable(config: dict[str, object]) -> dict[str, object]:
    out = dict(config)
    for key in PATHS:
        if out.get(key, "none") != "none":
            out[key] = str(Path(str(out[key])).expanduser().resolve())
    if out.get("config_model") is not None:  # a model file as the path it names (older runs kept the text)
        out["config_model"] = resolved_spec(str(out["config_model"]))
    if str(out.get("config_device", "")).startswith("cpu"):  # cpu:0 is the cpu
        out["config_device"] = "cpu"
    return out


def check_same_run(path: Path, saved: dict[str, object], current: dict[str, object]) -> None:
    """Raise :class:`CheckpointError` if ``saved`` (the checkpoint's configuration) and
    ``current`` differ in more than :data:`MAY_CHANGE`."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"curvlab train: {path} has no readable configuration")
    # an option newer than the checkpoint: the run took its default (a run without --augment did not augment)
    saved = {**{k: v for k, v in TrainConfig().as_attrs().items() if k not in saved}, **saved}
    a, b = _comparable(saved), _comparable(current)
    # an option the run does not use (older checkpoints record its value) changes nothing
    changed = sorted(k for k in a if k not in MAY_CHANGE and a[k] != b.get(k)
                     and not any(str(v).startswith(NOT_USED) for v in (a[k], b.get(k))))
    if a.get("config_lr_schedule") in SPANNING_EPOCHS and a.get("config_epochs") != b.get("config_epochs"):
        changed.append("config_epochs")  # the schedule's shape is fixed by them
    if changed:
        said = "; ".join(f"{_option_name(k)} {_shown(k, a[k])} (now {_shown(k, b.get(k, 'not set'))}"
                         + (f"; --lr-schedule {a['config_lr_schedule']} spans them)" if k == "config_epochs" else ")")
                         for k in changed)
        raise CheckpointError(
            f"curvlab train: {path} was written with other options: {said}; resume with those, or "
            "choose another --out"
        )


def _shown(key: str, value: object) -> object:
    """A recorded value as the message shows it (no model options: the model's defaults)."""
    return "the model's defaults" if key == "config_model_kwargs" and value in ("", "{}") else value


def _option_name(key: str) -> str:
    """A configuration attribute (``config_stat_decay``) as the command line spells it (``--stat-decay``)."""
    name = key.removeprefix("config_")
    return "the model options (--hidden)" if name == "model_kwargs" else flag(name)


def restore(path: Path, ckpt: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Load the model, the optimizer and the random state of ``ckpt`` (read from ``path``)."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        said = " ".join(lines[:3]) if lines else type(err).__name__  # load_state_dict's detail follows its first line
        raise CheckpointError(f"curvlab train: {path} does not fit this model and optimizer ({said})") from None
    if ckpt.get("cuda_rng") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
