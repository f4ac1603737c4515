"""Reading and writing the package's files safely.

* Loading never runs code from a file: ``torch.load(weights_only=True)`` (tensors and
  plain Python values only), ``numpy.load(allow_pickle=False)``.
* A missing, empty, truncated, corrupt or foreign file gives ONE error naming the path
  and what was expected (``FileNotFoundError`` when it does not exist, ``ValueError``
  otherwise), never a raw KeyError / EOFError / zip-reader error.
* Writes are atomic: a temporary file in the same folder, flushed, then renamed over the
  target; it is removed if anything fails, so no ``.tmp`` is ever left behind.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterable


def check_readable(path, what: str) -> Path:
    """The path as a Path; FileNotFoundError / ValueError naming it when it cannot be read."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file (expected {what})")
    if p.is_dir():
        raise ValueError(f"{p}: is a directory (expected {what})")
    if not os.access(p, os.R_OK):
        raise ValueError(f"{p}: not readable (expected {what})")
    if p.stat().st_size == 0:
        raise ValueError(f"{p}: empty file (expected {what})")
    return p


def safe_torch_load(path, what: str, map_location="cpu", mmap: bool = False):
    """``torch.load`` with ``weights_only=True`` and one clear error naming the path."""
    import torch
    p = check_readable(path, what)
    try:
        try:
            return torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not (mmap and "mmap" in str(exc)):
                raise
            # a legacy (non-zip) torch file cannot be memory-mapped: read it whole
            return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip errors, pickle errors, unsupported globals, truncation
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds Python objects other than tensors and plain values"
        raise ValueError(f"{p}: cannot be read as {what} ({reason[:200]})") from None


def require_keys(state, keys: Iterable[str], source, what: str) -> dict:
    """``state`` as a dict holding every key; ValueError naming ``source`` otherwise."""
    if not isinstance(state, dict):
        raise ValueError(f"{source}: not {what} (it holds a {type(state).__name__}, "
                         "expected a dict)")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{source}: not {what} (missing {', '.join(missing)})")
    return state


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp)`` on a temporary file in the same folder,
    flushed to disk, then renamed over ``path``: readers see the old file or the new one,
    never a part. The temporary file is removed if anything fails (signals included)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path) -> None:
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_writable(path, what: str = "output") -> Path:
    """Fail BEFORE any work when ``path`` (a file to be written) cannot be created: a
    parent that is a file, a directory where the file should be, a read-only folder.
    Missing parent folders are fine (they are created on write). Returns the Path."""
    p = Path(path)
    if p.exists() and p.is_dir():
        raise ValueError(f"{p}: is a directory (the {what} file goes here)")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{p}: cannot be created, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{p}: cannot be created, {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{p}: exists and is not writable")
    return p
