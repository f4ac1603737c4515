"""Loaders against synthetic files in the exact formats, and real MNIST when present."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from rce_fast import data
from tests.conftest import MNIST_DIR


def _write_idx(path, arr, gz):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim,
                                                                  *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    # closed explicitly: since Python 3.12 an unclosed GzipFile may never flush its buffer
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_idx(tmp_path, gz, layout):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28))
    labs = rng.integers(0, 10, 7)
    suffix = ".gz" if gz else ""
    _write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", imgs, gz)
    _write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labs, gz)
    x, y = data.load_mnist(tmp_path, "test")
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0], torch.tensor(imgs / 255.0 - 0.5, dtype=torch.float32))
    assert y.tolist() == labs.tolist()
    with pytest.raises(data.DatasetError, match="train-images-idx3-ubyte"):
        data.load_mnist(tmp_path, "train")


def test_mnist_corrupt_and_bad_split(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00")
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3), False)
    with pytest.raises(data.DatasetError, match=str(tmp_path / "t10k-images-idx3-ubyte")):
        data.load_mnist(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        data.load_mnist(tmp_path, "val")


@pytest.mark.mnist
def test_mnist_damaged_gzip_and_labels_out_of_range(tmp_path):
    imgs = np.random.default_rng(4).integers(0, 256, (300, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs, True)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(300) % 10, True)
    assert data.load_mnist(tmp_path, "test")[1].max() == 9
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.r_[np.arange(299) % 10, 200], True)
    with pytest.raises(data.DatasetError, match="t10k-labels.*label 200 is outside 0..9"):
        data.load_mnist(tmp_path, "test")
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[200:400] = bytes(b ^ 0xFF for b in raw[200:400])  # deflate data, not the header
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DatasetError, match="t10k-images-idx3-ubyte.gz"):
        data.load_mnist(tmp_path, "test")


def test_real_mnist_when_present():
    if not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST not present in ../shared/data/mnist")
    x, y = data.load_mnist(MNIST_DIR, "test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert x.min() == -0.5 and x.max() == 0.5
    assert torch.bincount(y).tolist()[:3] == [980, 1135, 1032]


def test_cifar10_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in data.CIFAR_FILES:
        batch = {b"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8),
                 b"labels": list(rng.integers(0, 10, 4))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    x, y = data.load_cifar10(tmp_path, "train")
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    xt, _ = data.load_cifar10(folder, "test")
    assert xt.shape == (4, 3, 32, 32) and -0.5 <= xt.min() and xt.max() <= 0.5
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(data.DatasetError, match="data_batch_2: label 10 is outside 0..9"):
        data.load_cifar10(tmp_path, "train")
    marker = tmp_path / "ran"

    class Crafted:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Crafted()}))
    with pytest.raises(data.DatasetError, match="data_batch_2.*io.open|data_batch_2.*open"):
        data.load_cifar10(tmp_path, "train")
    assert not marker.exists()  # refused before anything it names could run
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    (folder / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(data.DatasetError, match="data_batch_3"):
        data.load_cifar10(tmp_path, "train")
    (folder / "test_batch").unlink()
    with pytest.raises(data.DatasetError, match="test_batch"):
        data.load_cifar10(tmp_path, "test")


def test_npz_layouts_and_errors(tmp_path):
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (50, 12, 12, 3)).astype(np.uint8)
    labels = rng.integers(0, 4, 50)
    np.savez(tmp_path / "a.npz", images=imgs, labels=labels)
    x_tr, y_tr, x_te, y_te = data.load_npz(tmp_path / "a.npz", test_fraction=0.2)
    assert x_tr.shape == (40, 3, 12, 12) and x_te.shape == (10, 3, 12, 12)
    assert x_tr.min() >= -0.5 and x_tr.max() <= 0.5
    unit = rng.random((6, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "b.npz", x_train=unit, y_train=np.arange(6), x_test=unit[:2],
             y_test=np.arange(2))
    x_tr, _, _, _ = data.load_npz(tmp_path / "b.npz")
    torch.testing.assert_close(x_tr[:, 0], torch.from_numpy(unit - 0.5))
    np.savez(tmp_path / "c.npz", foo=unit)
    with pytest.raises(data.DatasetError, match="expected x_train"):
        data.load_npz(tmp_path / "c.npz")
    with pytest.raises(data.DatasetError, match="not found"):
        data.load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "s.npz", x_train=unit, y_train=np.arange(6),
             x_test=rng.random((2, 7, 7)).astype(np.float32), y_test=np.arange(2))
    with pytest.raises(data.DatasetError, match="train images are \\(1, 5, 5\\).*\\(1, 7, 7\\)"):
        data.load_npz(tmp_path / "s.npz")
    np.savez(tmp_path / "d.npz", images=unit, labels=np.full(6, -1))
    with pytest.raises(data.DatasetError, match="labels"):
        data.load_npz(tmp_path / "d.npz")


def test_npz_pixels_outside_their_range_are_refused(tmp_path):
    """The scale rule of `rce-fast detect` (rce_fast.streaming.resolve_scale): pixels that
    fit none of uint8 0..255, [0, 1], [-0.5, 0.5] are refused, naming the file and the
    split, not silently scaled; float rounding just past a range is clipped, not refused."""
    rng = np.random.default_rng(3)
    unit = rng.random((8, 6, 6)).astype(np.float32)
    labels = np.arange(8) % 2

    def load(x_test, scale="auto"):
        np.savez(tmp_path / "e.npz", x_train=unit, y_train=labels, x_test=x_test,
                 y_test=labels[:len(x_test)])
        return data.load_npz(tmp_path / "e.npz", scale=scale)
    with pytest.raises(data.DatasetError, match="x_test.*outside the auto-detected centered"):
        load(unit * 2 - 1)                        # [-1, 1]
    with pytest.raises(data.DatasetError, match="outside the auto-detected uint8"):
        load((unit * 4095).astype(np.uint16))     # 12-bit
    with pytest.raises(data.DatasetError, match="outside the centered range"):
        load(unit, scale="centered")
    with pytest.raises(data.DatasetError, match="integers or floats, got complex64"):
        load(unit.astype(np.complex64))
    bad = unit.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(data.DatasetError, match="e.npz \\(x_test\\): the images hold NaN"):
        load(bad)
    edge = unit.copy()
    edge[0, 0, 0], edge[0, 0, 1] = 1.0000001, -1e-7   # rounding of a [0, 1] image
    _, _, x_te, _ = load(edge, scale="unit")
    assert x_te.max() == 0.5 and x_te.min() == -0.5
    _, _, x_auto, _ = load(edge)                       # auto: [0, 1], not uint8 or centred
    assert torch.equal(x_auto, x_te)
    np.savez(tmp_path / "f.npz", images=unit * 2 - 1, labels=labels)
    with pytest.raises(data.DatasetError, match="f.npz \\(images, train split\\)"):
        data.load_npz(tmp_path / "f.npz")


def test_digits_and_dataset_dispatch():
    x_tr, y_tr, x_te, y_te = data.load_dataset("digits")
    assert x_tr.shape[1:] == (1, 8, 8) and len(x_tr) + len(x_te) == 1797
    assert x_tr.min() >= -0.5 and x_tr.max() <= 0.5 and set(y_te.tolist()) == set(range(10))
    with pytest.raises(ValueError, match="--data-dir"):
        data.load_dataset("mnist")
    with pytest.raises(ValueError, match="dataset must be"):
        data.load_dataset("imagenet", "x")


def test_digits_split_takes_every_seed_deterministically():
    """Seeds past scikit-learn's 2**32 - 1 get a derived 32-bit random_state."""
    a = data.load_digits_split(seed=2 ** 40)
    b = data.load_digits_split(seed=2 ** 40)
    c = data.load_digits_split(seed=0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1])
    assert data.load_digits_split(seed=2 ** 63 - 2)[0].shape == a[0].shape


def test_cifar_augmentation_is_crop_of_resized_and_flip():
    x = torch.rand(16, 3, 32, 32) - 0.5
    a = data.augment_cifar(x, torch.Generator().manual_seed(0))
    b = data.augment_cifar(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    big = torch.nn.functional.interpolate(x, size=40, mode="bilinear", align_corners=False)
    for i in range(16):
        found = False
        for oy in range(9):
            for ox in range(9):
                crop = big[i, :, oy:oy + 32, ox:ox + 32]
                if torch.equal(a[i], crop) or torch.equal(a[i], crop.flip(-1)):
                    found = True
        assert found, f"image {i} is not a (flipped) crop of the 40x40 resize"
