"""Built-in models and loading of user models.

* :mod:`.sequential`: ``mlp``, ``cnn``, ``cnn-bench``, ``3c3d``, ``vgg``, ``resnet`` — plain
  ``nn.Sequential`` trees BackPACK runs as they are.
* :mod:`.architectures`: ``resnet18`` (CIFAR stem, BatchNorm), ``vgg16-bn``, ``vit-tiny``,
  ``mobilenetv2`` (depthwise convolutions) —
  written as torchvision/timm write them; curvlab's autograd engine extracts them.
* :mod:`.user`: ``module:function`` specs (``--model my_nets.py:resnet``).
* :mod:`.check`: validate a model against curvlab before any data is loaded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from torch import nn

from curvlab.app.models import architectures, sequential
from curvlab.app.models.user import ModelSpecError, load_user_model

_BUILDERS: dict[str, Callable[..., nn.Module]] = {**sequential.BUILDERS, **architectures.BUILDERS}

MODELS = tuple(_BUILDERS)

#: The model's mode during a measurement (``curvlab report --mode``, ``curvlab train --probe-mode``).
MODES = ("eval", "train")
#: Why a measurement in ``"train"`` mode runs in one process only.
COUPLED_BATCH = ("measures the model's train-mode forward pass on the whole batch (BatchNorm's batch statistics "
                 "couple its examples, Dropout draws its masks); shards on several processes would change it")

__all__ = ["COUPLED_BATCH", "MODELS", "MODES", "ModelSpecError", "build_model", "load_user_model", "make_model",
           "model_options"]


def model_options(name: str) -> tuple[str, ...]:
    """The options (keywords) of the built-in model ``name``, beside its input shape and classes."""
    builder = _BUILDERS[name.strip().lower()]
    return tuple(p for p in inspect.signature(builder).parameters if p not in ("input_shape", "num_classes"))


def option_default(name: str, option: str) -> object:
    """The default of the built-in model ``name``'s ``option`` (its builder's)."""
    return inspect.signature(_BUILDERS[name.strip().lower()]).parameters[option].default


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: object) -> nn.Module:
    """Build a built-in model.

    Args:
        name: one of :data:`MODELS`.
        input_shape: shape of one input, ``(C, H, W)`` for the conv nets; ``mlp`` takes any shape.
        num_classes: number of outputs.
        **kwargs: model options: ``mlp``: ``hidden``; ``cnn``: ``channels``; ``vgg``: ``widths``,
            ``hidden``; ``resnet``: ``widths``, ``blocks_per_stage``; ``resnet18``: ``width``;
            ``vgg16-bn``: ``width``, ``hidden``; ``vit-tiny``: ``patch``, ``dim``, ``depth``,
            ``heads``; ``mobilenetv2``: ``width``.

    Returns:
        A module mapping ``[N, *input_shape]`` to logits ``[N, num_classes]``.

    Raises:
        ValueError: unknown name or option, or an input shape the model cannot take.
    """
    key = name.strip().lower()
    if key not in _BUILDERS:
        raise ModelSpecError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    builder = _BUILDERS[key]
    allowed = list(model_options(key))
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"model {key!r} has no option(s) {unknown}; its options are {allowed or 'none'}")
    if num_classes < 1:
        raise ValueError(f"model {key!r}: num_classes must be >= 1, got {num_classes}")
    return builder(tuple(int(d) for d in input_shape), int(num_classes), **kwargs)


def make_model(name_or_spec: str, input_shape: Sequence[int], num_classes: int, **kwargs: object) -> nn.Module:
    """A built-in model by name, or a user model if the string is a ``module:function`` spec."""
    if ":" in name_or_spec:
        if kwargs:
            raise ModelSpecError(f"model spec {name_or_spec!r}: options {sorted(kwargs)} apply only to built-in models")
        return load_user_model(name_or_spec, input_shape, num_classes)
    return build_model(name_or_spec, input_shape, num_classes, **kwargs)
