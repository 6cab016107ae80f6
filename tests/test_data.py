"""Tests for curvlab.data: digits, IDX (MNIST/Fashion-MNIST), CIFAR-10 JPEG copy, batching."""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import curvlab.app.data as data
from curvlab.app.data import (
    CIFAR10_CLASSES,
    DATASETS,
    FASHION_MNIST_SYSTEM_DIR,
    DataError,
    Dataset,
    batches,
    load_dataset,
    read_idx,
    subset,
)

REPO = Path(__file__).resolve().parents[1]
# The real data lives in shared/ beside the repo (CI clones elsewhere with shared/ beside it).
SHARED_DATA_CANDIDATES = [
    *([Path(os.environ["CURVLAB_SHARED_DATA"])] if os.environ.get("CURVLAB_SHARED_DATA") else []),
    REPO.parent / "shared" / "data",
    Path("/work/shared/data"),
]


def shared_data(sub: str) -> Path:
    for base in SHARED_DATA_CANDIDATES:
        if (base / sub).is_dir():
            return base / sub
    pytest.skip(f"real {sub} data not found in any of {SHARED_DATA_CANDIDATES}")


# ----------------------------------------------------------------------------------------- API


def test_dataset_names_and_unknown() -> None:
    assert DATASETS == ("digits", "mnist", "fashion-mnist", "cifar10")
    with pytest.raises(ValueError, match="imagenet.*digits, mnist, fashion-mnist, cifar10"):
        load_dataset("imagenet")


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_no_data_dir_is_an_error(name: str) -> None:
    with pytest.raises(DataError, match=fr"{name}: no data directory given; pass --data-dir \(data_dir= in Python\)"):
        load_dataset(name)


# -------------------------------------------------------------------------------------- digits


def test_digits_shapes_labels_and_determinism() -> None:
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert ds.train_x.shape == (1500, 1, 8, 8) and ds.test_x.shape == (297, 1, 8, 8)
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert ds.train_x.min() >= 0 and ds.train_x.max() <= 1 and ds.train_x.max() == 1
    assert set(ds.train_y.tolist()) == set(range(10)) and set(ds.test_y.tolist()) == set(range(10))
    again = load_dataset("digits", flatten=True)
    assert again.input_shape == (64,) and again.train_x.shape == (1500, 64)
    assert torch.equal(again.train_x, ds.train_x.reshape(1500, 64))
    assert torch.equal(again.test_y, ds.test_y)
    assert "train=1500" in repr(ds)  # short repr, no tensor dump


def test_digits_are_scikit_learns_read_without_importing_it() -> None:
    """The embedded data set is load_digits()'s, pixel for pixel and label for label, read from its
    file without importing scikit-learn (1.1 s of every run on it)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    ds, bunch = load_dataset("digits"), load_digits()
    x = torch.cat([ds.train_x, ds.test_x]).reshape(-1, 64) * 16
    np.testing.assert_array_equal(x.numpy(), bunch.data.astype(np.float32))
    np.testing.assert_array_equal(torch.cat([ds.train_y, ds.test_y]).numpy(), bunch.target)
    code = "import sys, curvlab.app.data as d; d.load_dataset('digits'); print('sklearn' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


# ---------------------------------------------------------------------------------- real MNIST


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist", shared_data("mnist"))


def test_mnist_real(mnist: Dataset) -> None:
    assert mnist.description == "MNIST" and mnist.input_shape == (1, 28, 28)
    assert mnist.train_x.shape == (60000, 1, 28, 28) and mnist.test_x.shape == (10000, 1, 28, 28)
    assert mnist.train_x.dtype == torch.float32 and mnist.train_y.dtype == torch.int64
    assert mnist.test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert torch.bincount(mnist.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(mnist.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert abs(mnist.train_x.mean().item()) < 1e-3
    assert abs(mnist.train_x.std().item() - 1) < 1e-3
    # Background pixel 0 maps to -mean/std.
    assert mnist.train_x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def test_fashion_mnist_real_from_the_debian_package() -> None:
    """Without a data folder, Fashion-MNIST is read from Debian's ``dataset-fashion-mnist``
    (gzipped IDX files): the dataset's published facts — balanced classes, the first labels
    (ankle boot, pullover, trouser, …) — and its own normalisation constants."""
    if not FASHION_MNIST_SYSTEM_DIR.is_dir():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({FASHION_MNIST_SYSTEM_DIR})")
    ds = load_dataset("fashion-mnist")
    assert ds.description == "Fashion-MNIST" and ds.input_shape == (1, 28, 28)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.test_y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert ds.train_y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert torch.bincount(ds.train_y).tolist() == [6000] * 10 and torch.bincount(ds.test_y).tolist() == [1000] * 10
    assert abs(ds.train_x.mean().item()) < 1e-3 and abs(ds.train_x.std().item() - 1) < 1e-3
    assert ds.train_x.min().item() == pytest.approx(-0.2860 / 0.3530, abs=1e-5)


def test_subset_is_random_and_reproducible(mnist: Dataset) -> None:
    a = subset(mnist, 500, 100, seed=1)
    b = subset(mnist, 500, 100, seed=1)
    assert a.train_x.shape == (500, 1, 28, 28) and a.test_y.shape == (100,)
    assert torch.equal(a.train_y, b.train_y) and torch.equal(a.test_x, b.test_x)
    assert len(set(a.train_y.tolist())) == 10  # random, not a prefix
    assert "subset 500/100" in a.description and a.name == "mnist"
    with pytest.raises(ValueError, match="n_train=70000"):
        subset(mnist, 70000, 10)


# ------------------------------------------------------------------------------ synthetic IDX


def write_idx(path: Path, arr: np.ndarray, *, gz: bool, magic: int | None = None) -> Path:
    magic = 0x800 + arr.ndim if magic is None else magic
    blob = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)
    return path


def write_idx_set(folder: Path, *, gz: bool, n_train: int = 5, n_test: int = 3, side: int = 28) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, arr in arrays.items():
        write_idx(folder / stem, arr, gz=gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name,sub,mean,std", [
    ("mnist", "", 0.1307, 0.3081),
    ("mnist", "mnist", 0.1307, 0.3081),
    ("mnist", "MNIST/raw", 0.1307, 0.3081),
    ("fashion-mnist", "FashionMNIST/raw", 0.2860, 0.3530),
])  # fmt: skip
def test_idx_synthetic(tmp_path: Path, gz: bool, name: str, sub: str, mean: float, std: float) -> None:
    arrays = write_idx_set(tmp_path / sub, gz=gz)
    ds = load_dataset(name, tmp_path)
    assert ds.train_x.shape == (5, 1, 28, 28) and ds.test_x.shape == (3, 1, 28, 28)
    want = (arrays["t10k-images-idx3-ubyte"] / 255.0 - mean) / std
    np.testing.assert_allclose(ds.test_x[:, 0].numpy(), want, atol=1e-5)
    assert ds.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test_y.dtype == torch.int64
    flat = load_dataset(name, tmp_path, flatten=True)
    assert flat.input_shape == (784,) and flat.train_x.shape == (5, 784)


@pytest.mark.parametrize("pixel_mean", [0.13, 0.29])  # MNIST's, Fashion-MNIST's
def test_mnist_and_fashion_mnist_files_are_told_apart(tmp_path: Path, pixel_mean: float) -> None:
    """They share their file names: Fashion-MNIST was trained on MNIST's files (normalised with the
    wrong constants, recorded as Fashion-MNIST) without a word."""
    rng = np.random.default_rng(0)
    images = np.where(rng.random((1000, 28, 28)) < pixel_mean, 255, 0).astype(np.uint8)
    for stem, arr in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", np.arange(1000) % 10),
                      ("t10k-images-idx3-ubyte", images[:3]), ("t10k-labels-idx1-ubyte", np.arange(3))):
        write_idx(tmp_path / stem, arr, gz=False)
    right, wrong = ("mnist", "fashion-mnist") if pixel_mean < 0.2 else ("fashion-mnist", "mnist")
    assert load_dataset(right, tmp_path).train_x.shape == (1000, 1, 28, 28)
    with pytest.raises(DataError, match=f"{wrong}: .*train-images-idx3-ubyte looks like {right}'s .*point --data-dir"):
        load_dataset(wrong, tmp_path)


def test_read_idx_raw_and_gz_agree(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = write_idx(tmp_path / "a" / "x", arr, gz=False)
    gzp = write_idx(tmp_path / "b" / "x", arr, gz=True)
    assert np.array_equal(read_idx(raw, ndim=3), arr) and np.array_equal(read_idx(gzp, ndim=3), arr)
    with pytest.raises(DataError, match="expected 0x00000801"):
        read_idx(raw, ndim=1)


def test_bad_magic_names_the_file(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=True)
    bad = write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=True, magic=0x0D01)
    with pytest.raises(DataError, match="bad IDX magic") as err:
        load_dataset("mnist", tmp_path)
    assert str(bad) in str(err.value) and "0x00000d01" in str(err.value)


def test_truncated_and_mismatched_idx(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="need 2352 bytes of data, file has 2345") as err:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(err.value)
    write_idx_set(tmp_path, gz=False)
    labels = write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=False)
    with pytest.raises(DataError, match="3 images but .* 4 labels") as err:
        load_dataset("mnist", tmp_path)
    assert str(labels) in str(err.value)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(DataError, match="cannot read IDX file"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_a_data_dir_that_does_not_exist_is_named(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=fr"^{name}: data directory {tmp_path / 'nope'} \(--data-dir; data_dir= in Python\) does not exist$"):
        load_dataset(name, tmp_path / "nope")
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_dataset(name, tmp_path / "file")


def test_files_not_found_lists_every_path(tmp_path: Path) -> None:
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(DataError) as err:
        load_dataset("mnist", missing)
    msg = str(err.value)
    assert msg.startswith("mnist: IDX files not found")
    for folder in (missing, missing / "mnist", missing / "MNIST" / "raw"):
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            assert str(folder / stem) in msg and str(folder / f"{stem}.gz") in msg


def test_fashion_mnist_system_install() -> None:
    """Real Fashion-MNIST from Debian's package when installed, else the install hint."""
    if FASHION_MNIST_SYSTEM_DIR.is_dir():
        ds = load_dataset("fashion-mnist")
        assert ds.description == "Fashion-MNIST"
        assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
        assert torch.bincount(ds.train_y).tolist() == [6000] * 10
        assert ds.test_y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
        assert abs(ds.train_x.mean().item()) < 1e-3 and abs(ds.train_x.std().item() - 1) < 1e-3
    else:
        with pytest.raises(DataError) as err:
            load_dataset("fashion-mnist")
        msg = str(err.value)
        assert "apt-get install dataset-fashion-mnist" in msg
        assert str(FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz") in msg


# ----------------------------------------------------------------------------- synthetic CIFAR

#: every class (a split without one is refused), each its own colour
COLOURS = {"airplane": (250, 10, 10), "automobile": (10, 250, 10), "bird": (10, 10, 250), "cat": (250, 250, 10),
           "deer": (250, 10, 250), "dog": (10, 250, 250), "frog": (130, 10, 10), "horse": (10, 130, 10),
           "ship": (10, 10, 130), "truck": (130, 130, 130)}


def jpeg_bytes(colour: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_cifar_tars(root: Path, per_class: int = 2) -> None:
    """Tiny tar.gz files in the real layout, members deliberately out of order."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with tarfile.open(root / f"cifar10_jpeg_{split}.tar.gz", "w:gz") as tf:
            dir_info = tarfile.TarInfo(split)
            dir_info.type = tarfile.DIRTYPE
            tf.addfile(dir_info)
            names = [f"{split}/{cls}/{i:04d}.jpg" for cls in COLOURS for i in range(per_class)]
            for name in reversed(names):
                blob = jpeg_bytes(COLOURS[name.split("/")[1]])
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
            readme = tarfile.TarInfo(f"{split}/README.txt")  # not an image: ignored
            readme.size = 2
            tf.addfile(readme, io.BytesIO(b"hi"))


def denormalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in data.NORMALISATION["cifar10"])
    return (x * std + mean) * 255


def test_cifar_synthetic_tar_labels_pixels_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar_tars(tmp_path / "d")
    cache = tmp_path / "cache"
    ds = load_dataset("cifar10", tmp_path / "d", cache_dir=cache)
    assert ds.description == "CIFAR-10 (JPEG q75 copy)" and ds.input_shape == (3, 32, 32)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.train_x.dtype == torch.float32
    labels = [CIFAR10_CLASSES.index(c) for c in COLOURS for _ in range(2)]
    assert ds.train_y.tolist() == labels == [i for i in range(10) for _ in range(2)] and ds.test_y.tolist() == labels
    pixels = denormalise(ds.train_x).mean(dim=(2, 3))  # per image, per channel
    want = torch.tensor([COLOURS[c] for c in COLOURS for _ in range(2)], dtype=torch.float32)
    assert torch.allclose(pixels, want, atol=3)
    assert len(list(cache.glob("cifar10-jpeg-*.npz"))) == 2 and not list(cache.glob("*.tmp"))

    # Second load must come from the cache: decoding is disabled.
    def no_decode(*args: object) -> None:
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(data, "_decode_cifar", no_decode)
    again = load_dataset("cifar10", tmp_path / "d", cache_dir=cache, flatten=True)
    assert torch.equal(again.train_x, ds.train_x.reshape(20, -1)) and again.input_shape == (3072,)
    # A changed source invalidates its cache entry.
    tar = tmp_path / "d" / "cifar10_jpeg_test.tar.gz"
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_dataset("cifar10", tmp_path / "d", cache_dir=cache)
    monkeypatch.undo()
    (cache / f"cifar10-jpeg-test-{'0' * 16}.npz").write_bytes(b"")  # named as before the source key
    load_dataset("cifar10", tmp_path / "d", cache_dir=cache)  # its new entry replaces the old ones
    assert len(list(cache.glob("cifar10-jpeg-test-*.npz"))) == 1 and len(list(cache.glob("*.npz"))) == 2


def test_cifar_extracted_folders_match_tar(tmp_path: Path) -> None:
    make_cifar_tars(tmp_path / "tars")
    ref = load_dataset("cifar10", tmp_path / "tars", cache_dir=tmp_path / "c1")
    for split in ("train", "test"):
        with tarfile.open(tmp_path / "tars" / f"cifar10_jpeg_{split}.tar.gz") as tf:
            tf.extractall(tmp_path / "dirs" / "cifar10", filter="data")
    ds = load_dataset("cifar10", tmp_path / "dirs", cache_dir=tmp_path / "c2")
    assert torch.equal(ds.train_x, ref.train_x) and torch.equal(ds.test_y, ref.test_y)


def test_cifar_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar_tars(tmp_path / "w", per_class=1)
    load_dataset("cifar10", tmp_path / "w")
    assert len(list((tmp_path / "w" / ".curvlab_cache").glob("*.npz"))) == 2
    # A data folder without write bits (like a shared read-only copy) is left untouched, even as root.
    make_cifar_tars(tmp_path / "ro", per_class=1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "ro").chmod(0o555)
    try:
        assert data.default_cache_dir(tmp_path / "ro") == tmp_path / "xdg" / "curvlab"
        load_dataset("cifar10", tmp_path / "ro")
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert not (tmp_path / "ro" / ".curvlab_cache").exists()
    assert len(list((tmp_path / "xdg" / "curvlab").glob("*.npz"))) == 2


def test_cifar_errors(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()  # a folder without the files: every path looked in is listed
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path / "none")
    for p in ("none/cifar10_jpeg_train.tar.gz", "none/train", "none/cifar10/cifar10_jpeg_test.tar.gz", "none/cifar10/test"):
        assert str(tmp_path / p) in str(err.value)
    make_cifar_tars(tmp_path / "bad", per_class=1)
    (tmp_path / "bad" / "test" / "horsey").mkdir(parents=True)
    (tmp_path / "bad" / "test" / "horsey" / "0000.jpg").write_bytes(jpeg_bytes((1, 2, 3)))
    (tmp_path / "bad" / "cifar10_jpeg_test.tar.gz").unlink()  # fall back to the folder
    with pytest.raises(DataError, match="unknown class folder 'horsey'"):
        load_dataset("cifar10", tmp_path / "bad", cache_dir=tmp_path / "c")
    (tmp_path / "bad" / "test" / "horsey" / "0000.jpg").unlink()
    for cls in COLOURS:
        (tmp_path / "bad" / "test" / cls).mkdir()
        (tmp_path / "bad" / "test" / cls / "0000.jpg").write_bytes(jpeg_bytes((1, 2, 3), size=16 if cls == "cat" else 32))
    with pytest.raises(DataError, match=r"0000.jpg .* is 16x16, expected 32x32"):
        load_dataset("cifar10", tmp_path / "bad", cache_dir=tmp_path / "c")
    # a class missing (an interrupted extraction) or of another size: refused, naming each class's count (QA22)
    for cls in COLOURS:
        (tmp_path / "bad" / "test" / cls / "0000.jpg").write_bytes(jpeg_bytes((1, 2, 3)))
    (tmp_path / "bad" / "test" / "dog" / "0001.jpg").write_bytes(jpeg_bytes((1, 2, 3)))
    with pytest.raises(DataError, match=r"the test split has classes of different sizes or missing \(airplane 1, .*dog 2"):
        load_dataset("cifar10", tmp_path / "bad", cache_dir=tmp_path / "c")
    for name in ("0000.jpg", "0001.jpg"):
        (tmp_path / "bad" / "test" / "dog" / name).unlink()
    with pytest.raises(DataError, match=r"dog 0, .*1000 test images in each of its 10 classes"):
        load_dataset("cifar10", tmp_path / "bad", cache_dir=tmp_path / "c")


# ---------------------------------------------------------------------------------- real CIFAR


def test_cifar_real_test_tar_matches_exact_samples() -> None:
    """Decode the real 10k test tar (~1-2 s) and compare with the 20 bit-exact test PNGs."""
    root = shared_data("cifar10")
    images, labels = data._decode_cifar(root / "cifar10_jpeg_test.tar.gz", "test")
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    exact = sorted((root / "exact_test_samples").glob("cifar10_*_*.png"))
    assert len(exact) == 20
    seen = [0] * 10
    for png in exact:  # test image i is the k-th of its class, i.e. row label*1000 + k here
        label = int(png.stem.split("_")[2])
        row = label * 1000 + seen[label]
        seen[label] += 1
        assert labels[row] == label
        ref = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
        err = np.abs(images[row] - ref).mean()
        other = np.abs(images[row + 1] - ref).mean()
        assert err < 10 and other > 2 * err, (png.name, err, other)  # README: 4.5-8.1 grey levels
    # The train tar: count members without decoding 50k images.
    with tarfile.open(root / "cifar10_jpeg_train.tar.gz") as tf:
        names = [m.name for m in tf if m.isfile()]
    assert len(names) == 50000 and names[0] == "train/airplane/0000.jpg"


# ------------------------------------------------------------------------------------- batches


def test_batches() -> None:
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    plain = list(batches(x, y, 4, shuffle=False))
    assert [len(b[0]) for b in plain] == [4, 4, 2] and torch.equal(torch.cat([b[1] for b in plain]), y)
    s1 = [b[1] for b in batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(5))]
    s2 = [b[1] for b in batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(5))]
    assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert sorted(torch.cat(s1).tolist()) == list(range(10)) and torch.cat(s1).tolist() != list(range(10))
    for bx, by in batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert torch.equal(bx[:, 0].long(), by)  # pairs stay together
    with pytest.raises(ValueError, match="differ in length"):
        batches(x, y[:5], 2, shuffle=False)
    with pytest.raises(ValueError, match="batch_size"):
        batches(x, y, 0, shuffle=False)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 9, 12])
@pytest.mark.parametrize("batch_size", [1, 4, 20])
def test_epoch_batch_sizes_are_those_batches_makes(n: int, batch_size: int) -> None:
    """The sizes the training loop checks and reports before an epoch are the batches' own."""
    from curvlab.app.data import epoch_batch_sizes

    sizes = [len(bx) for bx, _ in batches(torch.zeros(n, 1), torch.zeros(n), batch_size, shuffle=False)]
    assert epoch_batch_sizes(n, batch_size) == (sizes[0], sizes[-1])


def test_data_source_names_the_folder_the_files_come_from(tmp_path: Path) -> None:
    """The report recorded data_dir 'none' for Fashion-MNIST read from its system folder, and a
    --data-dir that digits never reads as if it had been used."""
    from curvlab.app.data import data_source

    write_idx_set(tmp_path / "root" / "MNIST" / "raw", gz=True)
    assert data_source("mnist", tmp_path / "root") == str((tmp_path / "root" / "MNIST" / "raw").resolve())
    assert data_source("digits", None).startswith("embedded")
    assert data_source("digits", "/does/not/exist").endswith("data_dir /does/not/exist not used")
