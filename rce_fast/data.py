"""Datasets as tensors with pixels scaled to [-0.5, 0.5] (the paper's scaling).

Nothing is ever downloaded: every loader reads local files and, when one is missing or
corrupt, raises an error that names the path and the files it expected.
"""
from __future__ import annotations

import gzip
import math
import numbers
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ._args import check_seed, scalar, sklearn_seed
from .streaming import resolve_scale, scale_pixels

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetError(FileNotFoundError, ValueError):
    """A dataset file is missing or corrupt (the message names the path). It is both a
    ``FileNotFoundError`` (as before) and a ``ValueError``, so a corrupt or foreign file
    is caught as the bad input it is."""


def _find(root: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` in root, root/raw or root/MNIST/raw (torchvision's layout)."""
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DatasetError(f"MNIST file {stem}[.gz] not found under {root} (looked in {root}, "
                       f"{root / 'raw'}, {root / 'MNIST' / 'raw'}); expected the four IDX "
                       f"files {sorted(s for pair in MNIST_FILES.values() for s in pair)}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a uint8 array."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"not an unsigned-byte IDX file (magic {data[:4].hex()})")
        dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if body.size != int(np.prod(dims)):
            raise ValueError(f"holds {body.size} values, its header says {dims}")
        return body.reshape(dims)
    except (OSError, ValueError, struct.error, EOFError, zlib.error) as exc:
        raise DatasetError(f"corrupt or unreadable IDX file {path}: {exc}") from exc


def _check_labels(labels: np.ndarray, classes: int, what: str) -> None:
    """DatasetError naming ``what`` when a label is outside [0, classes)."""
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)][0]
        raise DatasetError(f"{what}: label {int(bad)} is outside 0..{classes - 1}")


def load_mnist(root, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from local IDX files: images (N, 1, 28, 28) float32 in [-0.5, 0.5], labels (N,)."""
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    img_stem, lab_stem = MNIST_FILES[split]
    images = read_idx(_find(root, img_stem))
    labels = read_idx(_find(root, lab_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"MNIST {split} files under {root} disagree: images "
                           f"{images.shape}, labels {labels.shape}")
    _check_labels(labels, 10, f"MNIST labels file {_find(root, lab_stem)}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0 - 0.5).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


#: What a CIFAR-10 python batch may build when unpickled: NumPy arrays, dtypes and
#: scalars (the module moved in NumPy 2), and bytes as Python 3 pickles them at protocol
#: 2 (``_codecs.encode``, as torch's weights-only unpickler also allows): nothing that
#: can run code.
_CIFAR_PICKLE_GLOBALS = {(m, name) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                         for name in ("_reconstruct", "scalar")} | \
    {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")} | \
    {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


def _load_cifar_batch(path: Path):
    """Unpickle a CIFAR-10 batch allowing only the NumPy constructors a batch uses: a
    crafted file cannot run code (plain pickle.load would run whatever it names)."""
    import pickle

    class _Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _CIFAR_PICKLE_GLOBALS:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 "
                                         "batch does not hold (refused: it could run code)")

    with open(path, "rb") as f:
        return _Restricted(f, encoding="bytes").load()


def load_cifar10(root, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 from its python batches (``cifar-10-batches-py``, or a folder holding it):
    images (N, 3, 32, 32) float32 in [-0.5, 0.5], labels (N,) in 0..9. The batches are
    unpickled with only NumPy's array constructors allowed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = CIFAR_FILES[:5] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"CIFAR-10 file {path} not found; expected the python batches "
                               f"{CIFAR_FILES} in {folder} (cifar-10-python.tar.gz, unpacked)")
        try:
            batch = _load_cifar_batch(path)
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as exc:  # pickle, key or shape errors: a corrupt file
            raise DatasetError(f"corrupt CIFAR-10 batch {path}: {exc}") from exc
        if len(data) != len(labels):
            raise DatasetError(f"corrupt CIFAR-10 batch {path}: {len(data)} images, "
                               f"{len(labels)} labels")
        _check_labels(labels, 10, f"CIFAR-10 batch {path}")
        xs.append(data)
        ys.append(labels)
    x = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0 - 0.5)
    return x, torch.from_numpy(np.concatenate(ys))


def check_fraction(value, name: str = "test_fraction") -> float:
    """A number in (0, 1): the share of the data held out for testing."""
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1), got {type(value).__name__}")
    if not (0.0 < value < 1.0):  # NaN fails too
        raise ValueError(f"{name} must be in (0, 1), got {value}")
    return float(value)


def load_digits_split(test_fraction: float = 0.3, seed: int = 0):
    """scikit-learn's bundled 8 x 8 digits (the embedded default data set), stratified
    split: (x_train, y_train, x_test, y_test), images (N, 1, 8, 8) in [-0.5, 0.5]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    test_fraction = check_fraction(test_fraction)
    seed = sklearn_seed(check_seed(seed))
    d = load_digits()
    x = d.data.astype(np.float32).reshape(-1, 1, 8, 8) / 16.0 - 0.5
    idx_tr, idx_te = train_test_split(np.arange(len(x)), test_size=test_fraction,
                                      random_state=seed, stratify=d.target)
    t = torch.from_numpy
    return (t(x[idx_tr]), t(d.target[idx_tr].astype(np.int64)), t(x[idx_te]),
            t(d.target[idx_te].astype(np.int64)))


def load_npz(path, test_fraction: float = 0.2, seed: int = 0, scale: str = "auto"):
    """Your own data: an .npz with ``x_train, y_train, x_test, y_test`` or ``images,
    labels`` (split here). Images (N, H, W) or (N, C, H, W) or (N, H, W, C) for C in
    {1, 3}; uint8 (0..255) or floats in [0, 1] or [-0.5, 0.5]; scaled to [-0.5, 0.5]."""
    test_fraction = check_fraction(test_fraction)
    seed = check_seed(seed)
    if scale not in ("auto", "uint8", "unit", "centered"):
        raise ValueError(f"scale must be auto, uint8, unit or centered, got {scale!r}")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data file {path} not found (expected an .npz with x_train, "
                           f"y_train, x_test, y_test or images, labels)")
    try:
        z = np.load(path, allow_pickle=False)
        keys = set(z.files)
    except Exception as exc:
        raise DatasetError(f"corrupt or unreadable .npz {path}: {exc}") from exc
    def member(key):
        try:
            return z[key]
        except Exception as exc:  # pickled objects (refused), a truncated or bad member
            raise DatasetError(f"corrupt or unreadable .npz {path}: member {key!r}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else exc!r}"
                               ) from None

    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        parts = [member(k) for k in ("x_train", "y_train", "x_test", "y_test")]
        names = ("x_train", "x_test")
    elif {"images", "labels"} <= keys:
        x, y = member("images"), member("labels")
        if len(x) != len(y):
            raise DatasetError(f"{path}: images and labels have different lengths")
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(x))
        cut = int(round(len(x) * (1 - test_fraction)))
        parts = [x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]]
        names = ("images, train split", "images, test split")
    else:
        raise DatasetError(f"{path} holds {sorted(keys)}; expected x_train, y_train, x_test, "
                           f"y_test or images, labels")
    out = []
    for i, arr in enumerate(parts):
        if i % 2:  # labels
            arr = np.asarray(arr)
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or \
                    (arr.size and arr.min() < 0):
                raise DatasetError(f"{path}: labels must be a 1-d array of class indices >= 0")
            out.append(torch.from_numpy(arr.astype(np.int64)))
        else:
            out.append(_to_model_images(np.asarray(arr), path, scale, names[i // 2]))
    if len(out[0]) != len(out[1]) or len(out[2]) != len(out[3]):
        raise DatasetError(f"{path}: images and labels have different lengths")
    if len(out[0]) and len(out[2]) and out[0].shape[1:] != out[2].shape[1:]:
        raise DatasetError(f"{path}: train images are {tuple(out[0].shape[1:])} (C, H, W) "
                           f"but test images are {tuple(out[2].shape[1:])}")
    return tuple(out)


def _to_model_images(arr: np.ndarray, path, scale: str, name: str) -> torch.Tensor:
    """Images (N, C, H, W) / (N, H, W, C) / (N, H, W) of integers or floats, in the range
    of ``scale`` (``auto``: picked from this array, as before), as float32 in [-0.5, 0.5];
    DatasetError naming the file and the split otherwise."""
    if arr.dtype.kind not in "biuf" or arr.dtype.fields is not None:
        raise DatasetError(f"{path}: images must hold integers or floats, got {arr.dtype}")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise DatasetError(f"{path}: images must be (N, H, W) or (N, C, H, W) / (N, H, W, C) "
                           f"with C in (1, 3); got {arr.shape}")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (math.inf, -math.inf)
    try:
        scale = resolve_scale(scale, arr.dtype, lo, hi, f"{path} ({name})")
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    x = scale_pixels(arr.astype(np.float32), scale)
    return torch.from_numpy(np.ascontiguousarray(x))


def augment_cifar(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The paper's CIFAR-10 augmentation on a batch: resize to 40 x 40, random 32 x 32
    crop, random horizontal flip (per image, on x's device, seeded by ``generator``)."""
    import torch.nn.functional as F

    b, _, h, w = x.shape
    big = F.interpolate(x, size=(h + 8, w + 8), mode="bilinear", align_corners=False)
    g = generator
    oy = torch.randint(0, 9, (b,), generator=g).to(x.device)
    ox = torch.randint(0, 9, (b,), generator=g).to(x.device)
    flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)[None])              # (B, H)
    cols = (ox[:, None] + torch.arange(w, device=x.device)[None])              # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = big.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]     # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


DATASETS = ("digits", "mnist", "cifar10", "npz")


def load_dataset(name: str, data_dir=None, seed: int = 0):
    """(x_train, y_train, x_test, y_test) for "digits" (embedded), "mnist", "cifar10"
    (from ``data_dir``) or "npz" (``data_dir`` is the .npz file)."""
    if name == "digits":
        return load_digits_split(seed=seed)
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs --data-dir (nothing is downloaded)")
    if name == "mnist":
        return (*load_mnist(data_dir, "train"), *load_mnist(data_dir, "test"))
    if name == "cifar10":
        return (*load_cifar10(data_dir, "train"), *load_cifar10(data_dir, "test"))
    if name == "npz":
        return load_npz(data_dir, seed=seed)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
