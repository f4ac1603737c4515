"""What every launcher needs before it launches a Triton kernel."""
from __future__ import annotations

import contextlib

import torch


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device for the launch.

    Triton launches on the *current* device (and its current stream): without this, a
    tensor on cuda:1 while cuda:0 is current (every rank >= 1 of a torchrun job that did
    not call set_device) runs on GPU 0 with GPU 1's pointers. A no-op for CPU tensors
    (the interpreter).
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
