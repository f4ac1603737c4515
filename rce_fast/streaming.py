"""Read image arrays larger than memory, a block of rows at a time.

:func:`open_array` opens a ``.npy`` (memory-mapped), an ``.npz`` (an uncompressed
member is memory-mapped in place inside the zip file; a compressed one is decompressed
as a stream, block by block) or a ``.pt`` file (``torch.load(mmap=True,
weights_only=True)``: the tensor's storage is memory-mapped). ``read(start, stop)``
returns rows ``[start, stop)`` as a NumPy array, so memory holds one block at a time.

:func:`to_model_images` turns such a block into model inputs in [-0.5, 0.5] with the
same layout and scaling rules as ``rce_fast.data`` (N, H, W) / (N, C, H, W) /
(N, H, W, C); uint8 0..255, floats in [0, 1] or already centred. :func:`resolve_scale`
picks the range (``auto``) and refuses pixels outside the one picked or given.
"""
from __future__ import annotations

import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

#: Keys tried, in order, when a file holds several arrays and no key is given.
DEFAULT_KEYS = ("x_adv", "images", "x", "inputs", "x_test")


def _header(f):
    """(shape, fortran_order, dtype) of the .npy header at f's position."""
    from numpy.lib import format as npy
    version = npy.read_magic(f)
    if version == (1, 0):
        return npy.read_array_header_1_0(f)
    if version == (2, 0):
        return npy.read_array_header_2_0(f)
    return npy._read_array_header(f, version)  # 3.0 (utf-8 field names): no public reader


def _pick(keys: list[str], key: str | None, path: Path) -> str:
    if key is not None:
        if key not in keys:
            raise ValueError(f"{path} has no array {key!r}; it holds {sorted(keys)}")
        return key
    for k in DEFAULT_KEYS:
        if k in keys:
            return k
    if len(keys) == 1:
        return keys[0]
    raise ValueError(f"{path} holds {sorted(keys)}; say which array to read with --key "
                     f"(tried {list(DEFAULT_KEYS)})")


class ArraySource:
    """Rows of one array on disk: ``shape``, ``dtype``, ``len()``, ``read(start, stop)``."""

    shape: tuple
    dtype: np.dtype

    def __len__(self) -> int:
        return int(self.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _Mapped(ArraySource):
    def __init__(self, array, description: str) -> None:
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.description = description

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.array(self.array[start:stop])


class _ZipStream(ArraySource):
    """A compressed .npz member, decompressed forward only (re-opened to go back)."""

    def __init__(self, path: Path, member: str) -> None:
        self.path, self.member = path, member
        self.zip = zipfile.ZipFile(path)
        self._open()
        self.description = f"{path}:{member} (compressed, streamed)"

    def _corrupt(self, exc: Exception) -> ValueError:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else \
            type(exc).__name__
        return ValueError(f"{self.path}: {self.member} is corrupt ({first})")

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the member; a damaged one (bad CRC, bad deflate data, a
        cut file) is a ValueError naming it, wherever in the stream the damage is."""
        try:
            return self.stream.read(size)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise self._corrupt(exc) from None

    def _open(self) -> None:
        try:
            self.stream = self.zip.open(self.member)
            shape, fortran, dtype = _header(self.stream)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise self._corrupt(exc) from None
        if fortran and len(shape) > 1:
            raise ValueError(f"{self.path}: {self.member} is stored in Fortran order and "
                             "compressed: it cannot be read by rows; save it with np.savez "
                             "(uncompressed) or in C order")
        if dtype.hasobject:
            raise ValueError(f"{self.path}: {self.member} holds Python objects")
        self.shape, self.dtype, self.pos = tuple(shape), dtype, 0
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def _skip(self, rows: int) -> None:
        left = rows * self.row_bytes
        while left:
            got = len(self._read(min(left, 1 << 24)))
            if not got:
                raise ValueError(f"{self.path}: {self.member} ends early")
            left -= got

    def read(self, start: int, stop: int) -> np.ndarray:
        if start < self.pos:
            self.stream.close()
            self._open()
        self._skip(start - self.pos)
        n = stop - start
        data = self._read(n * self.row_bytes)
        if len(data) != n * self.row_bytes:
            raise ValueError(f"{self.path}: {self.member} ends early")
        self.pos = stop
        return np.frombuffer(data, dtype=self.dtype).reshape((n,) + self.shape[1:]).copy()

    def close(self) -> None:
        self.stream.close()
        self.zip.close()


def _npz_member(path: Path, key: str | None) -> ArraySource:
    with zipfile.ZipFile(path) as zf:
        names = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
        member = names[_pick(list(names), key, path)]
        info = zf.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED:
        return _ZipStream(path, member)
    with open(path, "rb") as f:  # the member's bytes sit in the file: map them in place
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: corrupt zip entry for {member}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        shape, fortran, dtype = _header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {member} holds Python objects")
    array = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(shape),
                      order="F" if fortran else "C")
    return _Mapped(array, f"{path}:{member} (memory-mapped)")


def _check_pixels(source: ArraySource, path: Path) -> ArraySource:
    if source.dtype.kind not in "biuf" or source.dtype.fields is not None:
        source.close()
        raise ValueError(f"{path}: images must hold integers or floats, got "
                         f"{source.dtype}")
    return source


def open_array(path, key: str | None = None) -> ArraySource:
    """Open the array of images in ``path`` (.npy, .npz or .pt) for block reading.

    ``key`` names the array in an .npz or in a dict saved in a .pt; by default the
    first of :data:`DEFAULT_KEYS` present (``x_adv`` first: the files of ``rce-fast
    attack`` open as they are), or the only array.
    """
    from ._io import check_readable, safe_torch_load

    path = Path(path)
    if not path.is_file() and not path.is_dir():
        raise FileNotFoundError(f"input file {path} not found")
    check_readable(path, "images: .npy, .npz or .pt")  # a folder, an empty file
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return _check_pixels(_Mapped(array, f"{path} (memory-mapped)"), path)
        if suffix == ".npz":
            return _check_pixels(_npz_member(path, key), path)
        if suffix in (".pt", ".pth"):
            obj = safe_torch_load(path, "images (a tensor, or a dict of tensors)", mmap=True)
            if isinstance(obj, dict):
                tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
                obj = obj[_pick(tensors, key, path)]
            elif key is not None:
                raise ValueError(f"{path} holds one tensor, not a dict: drop --key")
            if not isinstance(obj, torch.Tensor):
                raise ValueError(f"{path} holds no tensor of images")
            if obj.dtype == torch.bfloat16:
                raise ValueError(f"{path}: bfloat16 images are not supported; save float32")
            # a tensor saved while it required grad is still just pixels
            return _check_pixels(_Mapped(obj.detach().numpy(), f"{path} (memory-mapped)"),
                                 path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # numpy's and zipfile's errors do not name the file
        text = str(exc).strip()
        if isinstance(exc, ValueError) and str(path) in text:
            raise
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise ValueError(f"cannot read {path}: {first}") from None
    raise ValueError(f"input file {path} must be .npy, .npz or .pt, got {suffix!r}")


def check_layout(shape: tuple, path) -> tuple[int, bool]:
    """(channels, channels_last) of an image array of ``shape``; ValueError otherwise."""
    if len(shape) == 3:
        return 1, False
    if len(shape) == 4 and shape[1] in (1, 3):
        return shape[1], False
    if len(shape) == 4 and shape[-1] in (1, 3):
        return shape[-1], True
    raise ValueError(f"{path}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C) with "
                     f"C in (1, 3); got shape {tuple(shape)}")


#: Bytes of raw rows one block of :func:`scan_range` reads (memory holds one block).
SCAN_BYTES = 64 << 20


def scan_range(source: ArraySource, start: int, stop: int, block: int | None = None):
    """(min, max) over rows [start, stop) read block by block; ValueError on NaN / inf.
    ``block``: rows per read; by default as many as fit in :data:`SCAN_BYTES`, so memory
    stays bounded whatever the size of a row."""
    if block is None:
        row_bytes = int(np.prod(source.shape[1:], dtype=np.int64)) * source.dtype.itemsize
        block = max(1, SCAN_BYTES // max(1, row_bytes))
    lo, hi = np.inf, -np.inf
    for i in range(start, stop, block):
        chunk = source.read(i, min(stop, i + block))
        if chunk.dtype.kind == "f" and not np.isfinite(chunk).all():
            bad = i + int(np.argwhere(~np.isfinite(chunk.reshape(len(chunk), -1)))[0][0])
            raise ValueError(f"the input holds NaN or inf values (row {bad})")
        if chunk.size:
            lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
    return lo, hi


#: The pixel range of each scale, and how far past it a value may lie (a share of its
#: width: float rounding of images normalised elsewhere, such as 1.0000001 in [0, 1]).
SCALE_RANGES = {"uint8": (0.0, 255.0), "unit": (0.0, 1.0), "centered": (-0.5, 0.5)}
SCALE_SLACK = 1e-3


def choose_scale(dtype: np.dtype, lo: float, hi: float) -> str:
    """The ``auto`` rule: uint8 (0..255) for uint8 data or values past [0, 1] (plus
    :data:`SCALE_SLACK`), else centred ([-0.5, 0.5]) when a value is negative, else unit
    ([0, 1]); negative values within the slack of 0 with values past 0.5 are rounding of
    a [0, 1] image (they cannot be centred), so unit."""
    if dtype == np.uint8 or hi > 1.0 + SCALE_SLACK:
        return "uint8"
    if lo < 0 and not (lo >= -SCALE_SLACK and hi > 0.5 + SCALE_SLACK):
        return "centered"
    return "unit"


def resolve_scale(scale: str, dtype: np.dtype, lo: float, hi: float, where: str) -> str:
    """``scale`` (``auto`` resolved by :func:`choose_scale`) after checking that the pixels,
    from ``lo`` to ``hi``, lie in its range: a ValueError naming ``where`` otherwise (a
    [-1, 1] or a 12-bit image would be scored as something it is not)."""
    if scale != "auto" and scale not in SCALE_RANGES:
        raise ValueError(f"scale must be auto, uint8, unit or centered, got {scale!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        if lo > hi:  # no pixel at all (min over nothing)
            return scale if scale != "auto" else choose_scale(np.dtype(dtype), 0.0, 0.0)
        raise ValueError(f"{where}: the images hold NaN or inf values")
    chosen = choose_scale(np.dtype(dtype), lo, hi) if scale == "auto" else scale
    low, high = SCALE_RANGES[chosen]
    slack = SCALE_SLACK * (high - low)
    if lo < low - slack or hi > high + slack:
        how = "auto-detected " if scale == "auto" else ""
        raise ValueError(
            f"{where}: pixels range from {lo:g} to {hi:g}, outside the {how}{chosen} range "
            f"[{low:g}, {high:g}]; supported: uint8 0..255, unit [0, 1], centered "
            f"[-0.5, 0.5] (convert the images, or pass the scale that fits)")
    return chosen


def to_model_images(block: np.ndarray, scale: str, channels_last: bool) -> torch.Tensor:
    """A block of raw rows as float32 model inputs (B, C, H, W) in the model's range."""
    x = block.astype(np.float32, copy=False)
    if x.ndim == 3:
        x = x[:, None]
    elif channels_last:
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(scale_pixels(x, scale), dtype=np.float32))


def scale_pixels(x: np.ndarray, scale: str) -> np.ndarray:
    """float32 pixels of ``scale`` (uint8, unit or centered; checked by
    :func:`resolve_scale`) mapped to [-0.5, 0.5], the rounding slack clipped off."""
    if scale == "uint8":
        x = x / np.float32(255.0) - np.float32(0.5)
    elif scale == "unit":
        x = x - np.float32(0.5)
    elif scale != "centered":
        raise ValueError(f"scale must be auto, uint8, unit or centered, got {scale!r}")
    return np.clip(x, -0.5, 0.5)
