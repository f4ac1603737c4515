"""Triton kernels and their launchers (installed as ``rce_fast.kernels``).

Raw tensors in, raw tensors out; argument checking and dispatch live in ``rce_fast``.
Importing this package imports Triton.
"""
from . import kdensity, rce_loss  # noqa: F401
