"""Loads the compiled extension rce_fast._C, or records why it is not available."""
from __future__ import annotations

import functools
import warnings


@functools.lru_cache(maxsize=None)
def load():
    """(module or None, reason or None)."""
    try:
        from rce_fast import _C
    except ImportError as exc:
        return None, (f"the compiled extension rce_fast._C is not available ({exc}); "
                      "reinstall with `pip install -e .` (needs cmake, ninja and a C++ "
                      "compiler) to build it")
    return _C, None


@functools.lru_cache(maxsize=None)
def warn_fallback(op: str, why: str | None = None) -> None:
    """One RuntimeWarning per (op, reason): the compiled path cannot run, and why (by
    default, why the extension did not load)."""
    if why is None:
        why = load()[1]
    warnings.warn(f"{op}: {why}. Falling back to the slower PyTorch implementation.",
                  RuntimeWarning, stacklevel=3)
