"""Training-time data augmentation of image batches, in torch (no torchvision): the random crop
and horizontal flip of the CIFAR ResNet recipes.

``"crop"``: every image is framed by ``pad`` pixels of black and a window of its own size cut at
a random offset (torchvision's ``RandomCrop(size, padding=pad)`` before ``Normalize``, so the frame
is black, not the mean colour); ``"crop-flip"`` also mirrors each image left to right with
probability ½ (``RandomHorizontalFlip``) — for natural images, not for digits.  ``pad`` is an
eighth of the image side, rounded: 4 on CIFAR-10's and MNIST's images, 1 on the 8×8 digits.

The draws come from the generator the caller passes (``curvlab train``: the epoch's, after its
shuffle), so an epoch's batches are the same in every run, resumed or not, whatever the number of
processes the batch is then split over.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvlab.app.data import NORMALISATION

#: ``--augment`` choices.
AUGMENTATIONS = ("none", "crop", "crop-flip")


def crop_padding(side: int) -> int:
    """Pixels of frame for images ``side`` wide: an eighth of the side, at least 1."""
    return max(1, round(side / 8))


def black(dataset: str, channels: int) -> Tensor:
    """``[C, 1, 1]``: a black pixel of ``dataset``'s normalised inputs (0 where they are not
    normalised: digits)."""
    if dataset not in NORMALISATION:
        return torch.zeros(channels, 1, 1)
    mean, std = (torch.tensor(v) for v in NORMALISATION[dataset])
    return (-mean / std).view(-1, 1, 1).expand(channels, 1, 1)


def augment(x: Tensor, kind: str, generator: torch.Generator, dataset: str) -> Tensor:
    """``x`` (``[N, C, H, W]``, on the CPU) augmented by ``kind`` (one of :data:`AUGMENTATIONS`);
    ``x`` itself for ``"none"``."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"curvlab train: augment={kind!r}; choose one of {AUGMENTATIONS}")
    if kind == "none":
        return x
    if x.dim() != 4:
        raise ValueError(f"curvlab train: --augment {kind} takes image batches [N, C, H, W], not {tuple(x.shape)}")
    n, c, h, w = x.shape
    pad = crop_padding(min(h, w))
    framed = black(dataset, c).to(x.dtype).expand(c, h + 2 * pad, w + 2 * pad).repeat(n, 1, 1, 1)
    framed[:, :, pad:pad + h, pad:pad + w] = x
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    cols = torch.arange(w)
    if kind == "crop-flip":
        flip = torch.rand(n, generator=generator) < 0.5
        cols = torch.where(flip[:, None], cols.flip(0), cols)  # [N, W]: each image's columns in order
    rows = top[:, None] + torch.arange(h)  # [N, H]
    cols = left[:, None] + cols
    index = torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None]
    return framed[index[0], index[1], rows[:, None, :, None], cols[:, None, None, :]]
