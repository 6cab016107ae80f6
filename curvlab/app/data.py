"""Datasets for curvlab, read from local files only (nothing is ever downloaded).

Four datasets are known (:data:`DATASETS`):

* ``digits``: scikit-learn's 8×8 digits (shipped inside the scikit-learn wheel), pixels / 16.
* ``mnist``, ``fashion-mnist``: the four IDX files of the original release, raw or gzipped.
* ``cifar10``: the JPEG q75 copy of CIFAR-10 (``cifar10_jpeg_{train,test}.tar.gz`` or the
  extracted ``train/`` and ``test/`` folders). It is lossy, so results must be reported as
  "CIFAR-10 (JPEG q75 copy)". Decoded pixels are cached as ``.npz`` files.

:func:`load_dataset` returns a :class:`Dataset` of normalised float32 tensors; anything missing
or malformed raises :class:`DataError` with a message naming the dataset and the paths involved.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import io
import math
import os
import re
import stat
import struct
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from curvlab.io import PathLike, atomic_write


DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")

#: Shape of one input and number of classes of each dataset (what a model is built for; lets
#: the command line check a model before loading any data).
SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""CIFAR-10 class names; their (alphabetical) position is the canonical label id."""

NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    # Train-set statistics of the *decoded JPEG* copy (see its README); JPEG smoothing makes
    # the std slightly lower than the published CIFAR-10 values.
    "cifar10": ((0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)),
}
"""Per-channel ``(mean, std)`` applied to pixels scaled to [0, 1]."""

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package puts the IDX files."""

CIFAR10_DESCRIPTION = "CIFAR-10 (JPEG q75 copy)"

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_SUBDIRS = {"mnist": ("mnist", "MNIST/raw"), "fashion-mnist": ("fashion-mnist", "FashionMNIST/raw")}
_DESCRIPTIONS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
_ALIASES = {"fashionmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "cifar-10": "cifar10"}
_DIGITS_NUM_TEST = 297

# Bump when the cache layout changes, so stale caches are ignored rather than misread.
_CACHE_VERSION = 1
_CIFAR_MEMBER = re.compile(r"^(?:\./)?(train|test)/([^/]+)/(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


class DataError(ValueError):
    """A dataset could not be found or read; the message names the dataset and the paths."""


@dataclass
class Dataset:
    """A train/test split of normalised float32 inputs and int64 labels.

    Attributes:
        name: canonical dataset name (one of :data:`DATASETS`).
        train_x: training inputs, ``[N_train, *input_shape]``, float32, normalised.
        train_y: training labels, ``[N_train]``, int64 in ``[0, num_classes)``.
        test_x: test inputs, ``[N_test, *input_shape]``.
        test_y: test labels, ``[N_test]``.
        num_classes: number of classes.
        input_shape: shape of one input, e.g. ``(1, 28, 28)`` or ``(784,)`` when flattened.
        description: human-readable name to print in reports, e.g. "CIFAR-10 (JPEG q75 copy)".
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    description: str

    def __repr__(self) -> str:
        # The default dataclass repr would print every tensor element.
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_x)}, test={len(self.test_x)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape}, "
            f"description={self.description!r})"
        )


def load_dataset(
    name: str,
    data_dir: PathLike | None = None,
    *,
    flatten: bool = False,
    cache_dir: PathLike | None = None,
) -> Dataset:
    """Load a dataset from local files.

    Args:
        name: one of :data:`DATASETS` (case-insensitive; ``fashion_mnist``/``cifar-10`` work too).
        data_dir: folder holding the files. Required for ``mnist`` and ``cifar10``; ignored for
            ``digits``; defaults to ``/usr/share/datasets/fashion-mnist`` for ``fashion-mnist``.
        flatten: return inputs as ``[N, C·H·W]`` instead of ``[N, C, H, W]``.
        cache_dir: where ``cifar10`` keeps its decoded pixels. Default: ``data_dir/.curvlab_cache``
            if ``data_dir`` is writable, else ``$XDG_CACHE_HOME/curvlab`` (``~/.cache/curvlab``).

    Returns:
        The dataset with normalised float32 inputs and int64 labels.

    Raises:
        ValueError: unknown dataset name.
        DataError: files missing or malformed (the message lists every path looked in).
    """
    key = canonical_name(name)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    check_data_dir(key, data_dir)
    if key == "digits":
        ds = _load_digits()
    elif key in ("mnist", "fashion-mnist"):
        ds = _load_idx_dataset(key, data_dir)
    else:
        ds = _load_cifar10(data_dir, cache_dir)
    return _flattened(ds) if flatten else ds


def check_data_dir(name: str, data_dir: PathLike | None) -> None:
    """Raise :class:`DataError` if the files of a dataset read from files are not found: no
    ``data_dir`` where one is needed, one that is not a folder, or one without the files
    (checked before the command starts its processes or any compute; nothing is read)."""
    key = canonical_name(name)
    if key == "digits":
        return
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        what = "is a file, not a folder" if Path(data_dir).expanduser().exists() else "does not exist"
        raise DataError(f"{key}: data directory {data_dir} (--data-dir; data_dir= in Python) {what}")
    if key in _IDX_SUBDIRS:
        _find_idx_files(key, data_dir)
    elif key == "cifar10":
        _find_cifar_sources(data_dir)


def data_source(name: str, data_dir: PathLike | None) -> str:
    """Where :func:`load_dataset` reads ``name`` from, for the record: the folder of the files it
    finds (Fashion-MNIST's system folder when no ``data_dir`` is given), or "embedded" for
    ``digits``, which does not read ``data_dir``."""
    key = canonical_name(name)
    if key == "digits":
        return "embedded (scikit-learn's load_digits)" + ("" if data_dir is None else f"; data_dir {data_dir} not used")
    if key in _IDX_SUBDIRS:
        return str(next(iter(_find_idx_files(key, data_dir).values())).parent.resolve())
    return ", ".join(sorted({str(p.parent.resolve()) for p in _find_cifar_sources(data_dir).values()}))


def canonical_name(name: str) -> str:
    """``name`` as in :data:`DATASETS` (case-insensitive; ``fashion_mnist``/``cifar-10`` work too);
    unknown names come back lower-cased."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def fixed_batch(data: Dataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` training examples drawn without replacement under ``seed`` (the global random
    state untouched): the batch a report measures, or a training run probes."""
    n = len(data.train_x)
    if not 1 <= size <= n:
        raise ValueError(f"batch size {size} must be in [1, {n}] (training examples of {data.name})")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    return data.train_x[idx], data.train_y[idx]


def subset(dataset: Dataset, n_train: int, n_test: int, *, seed: int = 0) -> Dataset:
    """A random (seeded, so reproducible) subset for quick runs.

    Random rather than the first ``n`` examples because some sets (CIFAR-10 here) are stored
    sorted by class, so a prefix would hold a single class.
    """
    for what, n, have in (("n_train", n_train, len(dataset.train_x)), ("n_test", n_test, len(dataset.test_x))):
        if not 0 < n <= have:
            raise ValueError(f"{what}={n} must be in [1, {have}] for dataset {dataset.name!r}")
    gen = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(dataset.train_x), generator=gen)[:n_train]
    te = torch.randperm(len(dataset.test_x), generator=gen)[:n_test]
    return replace(
        dataset,
        train_x=dataset.train_x[tr],
        train_y=dataset.train_y[tr],
        test_x=dataset.test_x[te],
        test_y=dataset.test_y[te],
        description=f"{dataset.description} [subset {n_train}/{n_test}, seed {seed}]",
    )


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate over ``(x, y)`` mini-batches; the last batch may be smaller.

    Args:
        x: inputs ``[N, ...]``.
        y: targets ``[N, ...]``.
        batch_size: examples per batch (≥ 1).
        shuffle: draw a fresh random order (from ``generator``) for this pass.
        generator: random source for the shuffle; ``None`` uses torch's global one.
    """
    # Validate now rather than at the first next(), so mistakes surface at the call site.
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(len(x), generator=generator) if shuffle else None
    return _batch_iter(x, y, batch_size, order)


def epoch_batch_sizes(n: int, batch_size: int) -> tuple[int, int]:
    """The examples :func:`batches` puts in every batch of a pass over ``n`` examples but the last,
    and in the last one."""
    if n <= batch_size:
        return n, n
    return batch_size, n % batch_size or batch_size


def _batch_iter(x: Tensor, y: Tensor, batch_size: int, order: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(x), batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]


# --------------------------------------------------------------------------------------- digits


def _digits_file() -> Path | None:
    """The file scikit-learn's ``load_digits`` reads (``sklearn/datasets/data/digits.csv.gz``: 8×8
    pixels and the label a row), found without importing scikit-learn, whose import (scipy.stats
    with it) took 1.1 s of every run on the embedded data."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _load_digits() -> Dataset:
    path = _digits_file()
    if path is not None:  # read as load_digits reads it: np.loadtxt of the decompressed rows
        with gzip.open(path, "rt") as fh:
            rows = np.loadtxt(fh, delimiter=",")
        pixels, labels = rows[:, :-1], rows[:, -1].astype(np.int64)
    else:  # another layout of scikit-learn's files: its own loader
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels, labels = bunch.data, bunch.target
    x = torch.tensor(pixels, dtype=torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    y = torch.tensor(labels, dtype=torch.int64)
    # A fixed split (the last 297 images are the test set) needs no RNG, so it can never drift.
    n_tr = len(x) - _DIGITS_NUM_TEST
    return Dataset(
        name="digits",
        train_x=x[:n_tr].contiguous(),
        train_y=y[:n_tr].contiguous(),
        test_x=x[n_tr:].contiguous(),
        test_y=y[n_tr:].contiguous(),
        num_classes=10,
        input_shape=(1, 8, 8),
        description="scikit-learn digits (8x8, pixels/16)",
    )


# ------------------------------------------------------------------------------ MNIST-like IDX


def read_idx(path: PathLike, ndim: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (raw or gzip-compressed) into a uint8 array.

    Args:
        path: the file; gzip is recognised by its magic bytes, not its name.
        ndim: expected number of dimensions (3 for images: magic 0x803, 1 for labels: 0x801).

    Raises:
        DataError: unreadable file, wrong magic, or a payload that disagrees with the header.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            gzipped = fh.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError; a bit flip: zlib.error
        raise DataError(f"cannot read IDX file {path} (corrupt or truncated?): {err}") from err
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    want = f"0x{0x800 + ndim:08x}" if ndim is not None else "0x000008NN"
    if magic is None or data[:3] != b"\x00\x00\x08" or data[3] == 0 or (ndim is not None and data[3] != ndim):
        got = "a file shorter than 4 bytes" if magic is None else f"0x{magic:08x}"
        raise DataError(f"bad IDX magic in {path}: expected {want} (unsigned bytes), got {got}")
    rank = data[3]
    header = 4 + 4 * rank
    if len(data) < header:
        raise DataError(f"truncated IDX header in {path}")
    dims = struct.unpack(f">{rank}I", data[4:header])
    expected = math.prod(dims)
    if len(data) - header != expected:
        raise DataError(
            f"IDX file {path}: header dims {dims} need {expected} bytes of data, "
            f"file has {len(data) - header}"
        )
    # copy(): frombuffer gives a read-only view of `data`, which torch.from_numpy warns about.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx_files(name: str, data_dir: PathLike | None) -> dict[str, Path]:
    """Locate the four IDX files of ``name``; all four must sit in one folder."""
    if data_dir is None:
        if name != "fashion-mnist":
            raise DataError(
                f"{name}: no data directory given; pass --data-dir (data_dir= in Python), the folder holding "
                f"{', '.join(s + '(.gz)' for s in _IDX_FILES.values())}"
            )
        dirs = [FASHION_MNIST_SYSTEM_DIR]
    else:
        root = Path(data_dir).expanduser()
        dirs = [root] + [root / sub for sub in _IDX_SUBDIRS[name]]
    looked: list[Path] = []
    for d in dirs:
        found: dict[str, Path] = {}
        for key, stem in _IDX_FILES.items():
            for cand in (d / stem, d / f"{stem}.gz"):  # raw first: no decompression needed
                looked.append(cand)
                if cand.is_file():
                    found[key] = cand
                    break
        if len(found) == len(_IDX_FILES):
            return found
    given = "" if data_dir is None else f" under --data-dir {data_dir}"
    msg = f"{name}: IDX files not found{given} (all four must be in one folder). Looked in:\n" + "\n".join(
        f"  {p}" for p in looked
    )
    if data_dir is None:
        msg += (
            f"\nInstall Debian's package with `apt-get install dataset-fashion-mnist` (it puts the "
            f"files in {FASHION_MNIST_SYSTEM_DIR}/), or pass --data-dir (data_dir= in Python), a folder holding them."
        )
    raise DataError(msg)


def _load_idx_pair(name: str, images: Path, labels: Path) -> tuple[Tensor, Tensor]:
    x = read_idx(images, ndim=3)
    y = read_idx(labels, ndim=1)
    if len(x) != len(y):
        raise DataError(f"{name}: {images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if len(y) and int(y.max()) >= 10:
        raise DataError(f"{name}: {labels} has label {int(y.max())}, expected 0..9")
    _check_idx_content(name, images, x)
    mean, std = NORMALISATION[name]
    xt = torch.from_numpy(x).unsqueeze(1).float().div_(255.0).sub_(mean[0]).div_(std[0])
    return xt, torch.from_numpy(y.astype(np.int64))


def _check_idx_content(name: str, images: Path, x: np.ndarray) -> None:
    """MNIST and Fashion-MNIST share their file names: refuse images whose pixel mean is nearer
    the other set's (0.131 against 0.286; 1000 images or more, a set's own stays within 0.01)."""
    if len(x) < 1000:
        return
    other = "fashion-mnist" if name == "mnist" else "mnist"
    mean = float(x[:10000].mean()) / 255.0
    own, theirs = NORMALISATION[name][0][0], NORMALISATION[other][0][0]
    if abs(mean - theirs) < abs(mean - own):
        raise DataError(
            f"{name}: {images} looks like {other}'s (pixel mean {mean:.3f}; {name}'s is {own:.3f}, {other}'s "
            f"{theirs:.3f}): the two share their file names; point --data-dir at {name}'s files"
        )


def _load_idx_dataset(name: str, data_dir: PathLike | None) -> Dataset:
    files = _find_idx_files(name, data_dir)
    train_x, train_y = _load_idx_pair(name, files["train_images"], files["train_labels"])
    test_x, test_y = _load_idx_pair(name, files["test_images"], files["test_labels"])
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{name}: train images are {tuple(train_x.shape[2:])}, test images {tuple(test_x.shape[2:])}")
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=10,
        input_shape=tuple(train_x.shape[1:]),
        description=_DESCRIPTIONS[name],
    )


# ------------------------------------------------------------------------------------ CIFAR-10


def _find_cifar_sources(data_dir: PathLike | None) -> dict[str, Path]:
    """Per split, the tar.gz or extracted folder to read (tar first, then folder)."""
    if data_dir is None:
        raise DataError(
            "cifar10: no data directory given; pass --data-dir (data_dir= in Python), the folder holding "
            "cifar10_jpeg_train.tar.gz and cifar10_jpeg_test.tar.gz (or extracted train/ and test/)"
        )
    root = Path(data_dir).expanduser()
    looked: list[Path] = []
    sources: dict[str, Path] = {}
    for split in ("train", "test"):
        for base in (root, root / "cifar10"):
            tar, folder = base / f"cifar10_jpeg_{split}.tar.gz", base / split
            looked += [tar, folder]
            if tar.is_file():
                sources[split] = tar
                break
            if folder.is_dir():
                sources[split] = folder
                break
    if len(sources) < 2:
        raise DataError(
            f"cifar10: JPEG copy not found under --data-dir {data_dir} (need "
            "cifar10_jpeg_{train,test}.tar.gz or folders train/<class>/NNNN.jpg and test/<class>/NNNN.jpg). "
            "Looked in:\n"
            + "\n".join(f"  {p}" for p in looked)
        )
    return sources


def _cifar_label(source: Path, member: str, class_name: str) -> int:
    if class_name not in CIFAR10_CLASSES:
        raise DataError(f"cifar10: {source}: {member} is in unknown class folder {class_name!r}; expected one of {CIFAR10_CLASSES}")
    return CIFAR10_CLASSES.index(class_name)


def _read_cifar_encoded(source: Path, split: str) -> list[tuple[int, int, str, bytes]]:
    """(label, index, name, encoded bytes) of every image of ``split`` in ``source``."""
    items: list[tuple[int, int, str, bytes]] = []
    if source.is_dir():
        for path in source.glob("*/*"):
            m = _CIFAR_MEMBER.match(f"{split}/{path.parent.name}/{path.name}")
            if m and path.is_file():
                items.append((_cifar_label(source, str(path), m[2]), int(m[3]), str(path), path.read_bytes()))
    else:
        try:
            # One sequential pass: random access into a .tar.gz would re-decompress from the start.
            with tarfile.open(source, "r:*") as tf:
                for info in tf:
                    m = _CIFAR_MEMBER.match(info.name)
                    if not (info.isfile() and m and m[1] == split):
                        continue
                    fh = tf.extractfile(info)
                    assert fh is not None  # regular file
                    items.append((_cifar_label(source, info.name, m[2]), int(m[3]), info.name, fh.read()))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise DataError(f"cifar10: cannot read {source} (corrupt or truncated?): {err}") from err
    if not items:
        raise DataError(f"cifar10: no {split}/<class>/NNNN.jpg images found in {source}")
    _check_balanced(source, split, [label for label, *_ in items])
    items.sort(key=lambda t: (t[0], t[1], t[2]))  # class, then file index: a fixed order
    return items


def _check_balanced(source: Path, split: str, labels: list[int]) -> None:
    """Refuse a split with a class missing or classes of different sizes (an interrupted
    extraction or a partial copy would otherwise train and measure on what is left, silently);
    a smaller balanced subset is taken."""
    counts = [labels.count(i) for i in range(len(CIFAR10_CLASSES))]
    if min(counts) == 0 or len(set(counts)) > 1:
        found = ", ".join(f"{name} {count}" for name, count in zip(CIFAR10_CLASSES, counts))
        full = {"train": 5000, "test": 1000}[split]
        raise DataError(
            f"cifar10: {source}: the {split} split has classes of different sizes or missing ({found}); CIFAR-10 "
            f"has {full} {split} images in each of its 10 classes — an interrupted extraction or a partial copy? "
            "(a smaller subset with as many images in every class is taken)"
        )


def _decode_cifar(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image of ``split``: uint8 ``[N, 32, 32, 3]`` and uint8 labels ``[N]``."""
    from PIL import Image

    items = _read_cifar_encoded(source, split)
    images = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
    for i, (_, _, name, blob) in enumerate(items):
        try:
            with Image.open(io.BytesIO(blob)) as img:
                rgb = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # PIL: OSError mostly, rarer ones for odd headers
            raise DataError(f"cifar10: cannot decode {name} in {source}: {err}") from err
        if rgb.size != (32, 32):
            raise DataError(f"cifar10: {name} in {source} is {rgb.size[0]}x{rgb.size[1]}, expected 32x32")
        images[i] = np.asarray(rgb)
    labels = np.array([t[0] for t in items], dtype=np.uint8)
    return images, labels


def _dir_is_writable(path: Path) -> bool:
    """Whether we may create files in ``path``.

    ``os.access`` alone is not enough: root passes every permission check, and a data folder
    laid out without write bits (e.g. a shared read-only copy) must not get a cache inside it.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return os.access(path, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def default_cache_dir(data_dir: PathLike) -> Path:
    """``data_dir/.curvlab_cache`` if usable, else ``$XDG_CACHE_HOME/curvlab`` (``~/.cache/curvlab``)."""
    local = Path(data_dir).expanduser() / ".curvlab_cache"
    if (local.is_dir() and _dir_is_writable(local)) or (not local.exists() and _dir_is_writable(local.parent)):
        return local
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "curvlab"


def _source_fingerprint(source: Path) -> str:
    """Short hash that changes when the source tar/folder changes, so stale caches are not used."""
    if source.is_file():
        st = source.stat()
        ident = f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    else:
        stats = [p.stat() for p in source.glob("*/*") if p.is_file()]
        ident = (
            f"{source.resolve()}|{len(stats)}|{sum(s.st_size for s in stats)}|"
            f"{max((s.st_mtime_ns for s in stats), default=0)}"
        )
    return hashlib.sha256(f"v{_CACHE_VERSION}|{ident}".encode()).hexdigest()[:16]


def _load_cached(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path) as npz:
            images, labels = npz["images"], npz["labels"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        warnings.warn(f"cifar10: ignoring unreadable cache {path}: {err}", stacklevel=3)
        return None
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or labels.shape != (len(images),):
        warnings.warn(f"cifar10: ignoring malformed cache {path}", stacklevel=3)
        return None
    return images, labels


def _save_cache(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write atomically (temp file + rename) so a crash or a parallel run never leaves half a file."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, images=images, labels=labels)

    try:
        atomic_write(path, write)
    except OSError as err:  # the cache only saves time; failing to write it is not fatal
        warnings.warn(f"cifar10: could not write cache {path}: {err}", stacklevel=3)


def _cifar_split(source: Path, split: str, cache_dir: Path) -> tuple[Tensor, Tensor]:
    # one entry per source path: a new version of the source replaces its old entry (each ~180 MB)
    of_source = f"cifar10-jpeg-{split}-{hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]}-"
    cache = cache_dir / f"{of_source}{_source_fingerprint(source)}.npz"
    cached = _load_cached(cache)
    if cached is None:
        cached = _decode_cifar(source, split)
        _save_cache(cache, *cached)
        # and entries named as before (no source key), which it never reads
        legacy = re.compile(rf"cifar10-jpeg-{split}-[0-9a-f]{{16}}\.npz")
        for stale in cache_dir.glob(f"cifar10-jpeg-{split}-*.npz"):
            if stale != cache and (stale.name.startswith(of_source) or legacy.fullmatch(stale.name)):
                with contextlib.suppress(OSError):
                    stale.unlink()
    images, labels = cached
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALISATION["cifar10"])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std)
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def _load_cifar10(data_dir: PathLike | None, cache_dir: PathLike | None) -> Dataset:
    sources = _find_cifar_sources(data_dir)
    assert data_dir is not None  # checked by _find_cifar_sources
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(data_dir)
    train_x, train_y = _cifar_split(sources["train"], "train", cdir)
    test_x, test_y = _cifar_split(sources["test"], "test", cdir)
    return Dataset(
        name="cifar10",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=10,
        input_shape=(3, 32, 32),
        description=CIFAR10_DESCRIPTION,
    )


def _flattened(ds: Dataset) -> Dataset:
    return replace(
        ds,
        train_x=ds.train_x.reshape(len(ds.train_x), -1),
        test_x=ds.test_x.reshape(len(ds.test_x), -1),
        input_shape=(math.prod(ds.input_shape),),
    )
