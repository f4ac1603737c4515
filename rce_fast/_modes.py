"""Running a user's model for inference without changing it."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def model_in_eval_mode(model):
    """Every module of ``model`` in eval mode inside the block, each module's own
    train/eval flag restored afterwards (also on error). A model that is not an
    ``nn.Module`` (any callable) is left alone."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    try:
        # the flags themselves, not model.eval(): a wrapper may override train() to leave
        # what it wraps alone (GuardedClassifier does, for attack libraries' sake)
        for module, _ in flags:
            module.training = False
        yield
    finally:
        for module, flag in flags:
            module.training = flag
