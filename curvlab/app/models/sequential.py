"""The BackPACK-compatible built-in models (mlp, cnn, cnn-bench, 3c3d, vgg, resnet).

Every one is a plain ``nn.Sequential`` tree of modules that BackPACK can backpropagate
second-order information through (Linear, Conv2d, ReLU, MaxPool2d, AvgPool2d, ZeroPad2d, Flatten,
Identity, and BackPACK's ``Parallel``/``SumModule`` for residual branches). Hence:

* no functional ops in ``forward`` (BackPACK only sees modules);
* ``nn.ReLU()`` never ``inplace=True`` (in-place ops break BackPACK's stored inputs/outputs);
* no BatchNorm (it couples the examples of a batch, so per-example curvature is ill-defined).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from backpack.custom_module.branching import Parallel
from torch import nn

from curvlab.app.models.user import ModelSpecError

# ------------------------------------------------------------------------------------- builders


def _mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] = (128, 64)) -> nn.Sequential:
    """Flatten, then ``Linear → ReLU`` per hidden width, then a final Linear (784-128-64-10)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(input_shape: tuple[int, ...], num_classes: int, channels: Sequence[int] = (16, 32)) -> nn.Sequential:
    """Small CNN: per width ``Conv3x3(same) → ReLU → MaxPool2``, then Flatten → Linear."""
    c, _, _ = image_shape("cnn", input_shape, min_side=2 ** len(channels))
    layers: list[nn.Module] = []
    for ch in channels:
        layers += [nn.Conv2d(c, int(ch), 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = int(ch)
    flat = _flat_size(nn.Sequential(*layers), input_shape)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, num_classes))


def _cnn_bench(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """The benchmark CNN: conv16 → ReLU → conv32 → ReLU → MaxPool2 → Flatten → Linear."""
    c, h, w = image_shape("cnn-bench", input_shape, min_side=2)
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (h // 2) * (w // 2), num_classes),
    )


def _3c3d(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """DeepOBS ``cifar10_3c3d``: 3 conv + 3 dense layers (1152-512-256 dense part on 3×32×32).

    DeepOBS (TensorFlow) uses ``valid`` padding for conv1/conv2, ``same`` for conv3, and
    3×3/stride-2 max-pools with ``same`` padding. TF's ``same`` pads asymmetrically (extra row
    and column at the bottom/right), which we reproduce exactly with ``ZeroPad2d``: zeros equal
    TF's ``-inf`` pool padding here because every pool follows a ReLU (inputs ≥ 0). Weights are
    Xavier-initialised (conv: normal, dense: uniform) and biases zero, as in DeepOBS.
    """
    c, h, w = image_shape("3c3d", input_shape, min_side=9)
    layers: list[nn.Module] = []
    for c_out, k, same in ((64, 5, False), (96, 3, False), (128, 3, True)):
        pad = (k - 1) // 2 if same else 0
        layers += [nn.Conv2d(c, c_out, k, padding=pad), nn.ReLU()]
        h, w = h + 2 * pad - k + 1, w + 2 * pad - k + 1
        pad_w, pad_h = _tf_same_pad(w, 3, 2), _tf_same_pad(h, 3, 2)
        if any(pad_w + pad_h):
            layers.append(nn.ZeroPad2d(pad_w + pad_h))  # (left, right, top, bottom)
        layers.append(nn.MaxPool2d(3, stride=2))
        h, w, c = math.ceil(h / 2), math.ceil(w / 2), c_out
    model = nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(c * h * w, 512),
        nn.ReLU(),
        nn.Linear(512, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.xavier_normal_(mod.weight)
            nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            nn.init.zeros_(mod.bias)
    return model


def _vgg(
    input_shape: tuple[int, ...],
    num_classes: int,
    widths: Sequence[int] = (32, 64, 128),
    hidden: int = 256,
) -> nn.Sequential:
    """Small VGG: per width ``(Conv3x3 → ReLU) × 2 → MaxPool2``, then Linear → ReLU → Linear."""
    c, h, w = image_shape("vgg", input_shape, min_side=2 ** len(widths))
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(c, int(width), 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(int(width), int(width), 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        c = int(width)
    flat = _flat_size(nn.Sequential(*layers), input_shape)
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(flat, int(hidden)),
        nn.ReLU(),
        nn.Linear(int(hidden), num_classes),
    )


def _residual_block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    """``ReLU(conv(ReLU(conv(x))) + shortcut(x))`` as BackPACK ``Parallel`` (sums its branches)."""
    body = nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
        nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
    )
    shortcut: nn.Module = (
        nn.Identity() if c_in == c_out and stride == 1 else nn.Conv2d(c_in, c_out, 1, stride=stride)
    )
    return [Parallel(body, shortcut), nn.ReLU()]


def _resnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    widths: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
) -> nn.Sequential:
    """Small ResNet without BatchNorm: conv stem, residual stages (stride 2 between stages),
    global average pool, Linear."""
    c, h, w = image_shape("resnet", input_shape, min_side=2 ** (len(widths) - 1))
    if blocks_per_stage < 1:
        raise ValueError(f"model 'resnet': blocks_per_stage must be >= 1, got {blocks_per_stage}")
    layers: list[nn.Module] = [nn.Conv2d(c, int(widths[0]), 3, padding=1), nn.ReLU()]
    c = int(widths[0])
    for stage, width in enumerate(widths):
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            layers += _residual_block(c, int(width), stride)
            c = int(width)
    _, fh, fw = _out_shape(nn.Sequential(*layers), input_shape)
    # A fixed-size AvgPool2d is global pooling here; BackPACK supports it (adaptive pools less so).
    return nn.Sequential(*layers, nn.AvgPool2d((fh, fw)), nn.Flatten(), nn.Linear(c, num_classes))


BUILDERS: dict[str, Callable[..., nn.Sequential]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "cnn-bench": _cnn_bench,
    "3c3d": _3c3d,
    "vgg": _vgg,
    "resnet": _resnet,
}


# -------------------------------------------------------------------------------------- helpers


def image_shape(model: str, input_shape: tuple[int, ...], min_side: int) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model {model!r} needs image inputs of shape (C, H, W), got {input_shape}; "
            "load the dataset without flatten=True"
        )
    c, h, w = input_shape
    if min(h, w) < min_side:  # a usage error: the --model and --dataset given do not go together
        raise ModelSpecError(f"model {model!r} needs images of at least {min_side}x{min_side}, got {h}x{w}: "
                             "choose a dataset of larger images (--dataset) or another model")
    return c, h, w


def _out_shape(module: nn.Module, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Output shape (without batch dim) of ``module`` on one dummy input: robust to any layer mix."""
    with torch.no_grad():
        return tuple(module(torch.zeros(1, *input_shape)).shape[1:])


def _flat_size(module: nn.Module, input_shape: Sequence[int]) -> int:
    return math.prod(_out_shape(module, input_shape))


def _tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``padding='SAME'`` amounts (before, after) along one axis."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


