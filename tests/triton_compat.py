"""Make the Triton interpreter of older Tritons usable with NumPy >= 2.4.

Triton 3.6's interpreter (the GPU machine has triton 3.6.0 with NumPy 2.5) converts a
scalar tensor to a Python int with ``int(handle.data)``. Scalars are 1-element 1-d
arrays there, and NumPy 2.4 removed their implicit conversion, so every kernel loop
with a runtime bound (``range(b_lo, b_hi, BLOCK_N)``) raises ``TypeError: only
0-dimensional arrays can be converted to Python scalars``. Later Tritons convert
``handle.data.squeeze()`` instead; :func:`apply` installs that same conversion on an
interpreter that lacks it. It changes nothing else, and nothing on a Triton that
already has the fix (3.9, CI's). Used by tests/conftest.py only: the interpreter is a
test and debugging tool, the package's kernels never run it in production.
"""
from __future__ import annotations

import inspect


def needs_patch() -> bool:
    """True when the installed interpreter converts scalars with the NumPy-2.4-broken
    ``int(self.handle.data)``."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    fn = getattr(interpreter, "_patch_lang_tensor", None)
    if fn is None:
        return False
    src = inspect.getsource(fn)
    return "int(self.handle.data)" in src and "squeeze" not in src


def apply() -> bool:
    """Install the fixed ``__index__`` on Triton's interpreter if needed; True if patched."""
    if not needs_patch():
        return False
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
