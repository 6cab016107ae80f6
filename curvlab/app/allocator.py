"""The process's host-memory allocator (the command line's ``--malloc``, the benchmarks' too).

A statistics step of a convolutional network allocates many large temporaries that a plain step
does not (a convolution's unfolded input, its per-sample gradients).  glibc's malloc maps every
allocation above 32 MiB afresh and its pages fault in on first touch: on this project's VM a
302 MB copy took 171 ms into fresh memory and 39 ms into reused memory.  :func:`keep_freed_memory`
makes it reuse what was freed instead — an epoch of ``curvlab train`` on ResNet-18/CIFAR-10
(N = 64, TEKFAC, 6 steps all with statistics, one thread) took 37.8–40.1 s with glibc's default
and 33.9–34.2 s with reuse (three runs each).  A caching allocator (jemalloc, tcmalloc;
PyTorch's CPU performance guide recommends preloading one) avoids the same cost.  The numerics do not change: torch aligns every tensor the same either way.

On a small model it gains nothing and can cost: the heap places the tensors a refresh reallocates
at arbitrary offsets, and the MLP's plain steps of optimizers running the same code differed by
up to 30 % with reuse (4–5 % with glibc's default; ``benchmarks/README.md``).  Hence ``auto``, the
default of ``curvlab train``: reuse for a model with a convolution (whose statistics steps
allocate those temporaries), glibc's default otherwise.  ``curvlab report`` keeps glibc's default:
it allocates its large temporaries once each, in many sizes, and a heap that never returns memory
fragments around them — ResNet-18's report (N = 9) peaked at 20.4 GB with reuse, 11.9 GB without.
"""

from __future__ import annotations

import argparse
import ctypes
import platform

from torch import nn

from curvlab.model_blocks import CONV_LAYERS, TRANSPOSED_CONV_LAYERS

#: ``--malloc`` choices: reuse for a model with a convolution (:func:`reuses_memory`), reuse freed
#: memory (:func:`keep_freed_memory`), or glibc's default.
MALLOC_CHOICES = ("auto", "reuse", "default")


def keep_freed_memory() -> str:
    """Make glibc's malloc serve every allocation from its heap and never return freed memory to
    the system (``mallopt``: no ``mmap``, no trimming; the effect of ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<max>``): the process keeps its peak resident memory.  Returns what was
    set (``"default"`` where there is no glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return "default"
    mallopt = ctypes.CDLL(None).mallopt  # the process's own glibc
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    # -1 is the largest size_t inside glibc: never trim
    if not (mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, -1)):
        return "default"
    return "glibc: no mmap, no trim (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=max)"


def add_malloc_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str = "auto") -> None:
    """``--malloc {auto,reuse,default}``, applied by :func:`apply_malloc_option`."""
    parser.add_argument("--malloc", choices=MALLOC_CHOICES, default=default,
                        help="host memory: reuse (glibc's malloc keeps freed memory for the next "
                             "allocation: a statistics step's large temporaries do not fault in afresh; "
                             "the process keeps its peak memory), default (as the process started), or "
                             "auto: reuse for a model with a convolution (default: %(default)s)")


def reuses_memory(mode: str, model: nn.Module | None) -> bool:
    """Whether ``--malloc mode`` reuses freed memory for ``model`` (``None``: not built); ``auto``:
    where it has a convolution curvlab preconditions (``CONV_LAYERS``, transposed ones too: the
    patches of both are the statistics' large temporaries)."""
    if mode == "auto":
        convolutions = (*CONV_LAYERS, *TRANSPOSED_CONV_LAYERS)
        return model is not None and any(isinstance(m, convolutions) for m in model.modules())
    return mode == "reuse"


def apply_malloc_option(mode: str, model: nn.Module | None = None) -> str:
    """Apply ``--malloc mode`` for ``model``; returns what the allocator does."""
    return keep_freed_memory() if reuses_memory(mode, model) else "default"
