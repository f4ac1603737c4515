"""Datasets as tensors with pixels scaled to [-0.5, 0.5] (the paper's scaling).

Nothing is ever downloaded: every loader reads local files and, when one is missing or
corrupt, raises an error that names the path and the files it expected.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DatasetError(FileNotFoundError):
    """A dataset file is missing or corrupt (the message names the path)."""


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
    except (OSError, ValueError, struct.error, EOFError) as exc:
        raise DatasetError(f"corrupt or unreadable IDX file {path}: {exc}") from exc


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
    x = torch.from_numpy(images.astype(np.float32) / 255.0 - 0.5).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
