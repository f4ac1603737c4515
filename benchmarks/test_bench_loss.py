"""RCE loss, forward + backward: rce_fast against the eager and compiled PyTorch reference.

The reference is the one the tests use (tests/reference.py): cross_entropy(Z / T, R_y),
the way the paper's loss is usually written. Shapes from the issue; fp32 on CPU, bf16
on GPU. Targets: CPU >= 1.5x eager at (8192, 1000) and (1024, 32000) and never slower
elsewhere; GPU >= 2x eager and >= 1.2x compiled at (4096, 32000) bf16. On CPU the table
also says which path (fused C++ loss or PyTorch) the loss measured fastest for the shape.
"""
import pytest
import torch

import rce_fast
from benchmarks.conftest import DEVICE, HAS_CUDA, set_target
from tests.reference import rce_loss_reference

DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
# The shapes, plus the two its targets name: (8192, 1000) on CPU, (4096, 32000)
# bf16 on GPU.
SHAPES = [(128, 10), (8192, 10), (4096, 1000), (8192, 1000), (1024, 32000), (256, 131072)]
if HAS_CUDA:
    SHAPES.append((4096, 32000))
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _eager_reference(z, y):
    return rce_loss_reference(z, y, dtype=z.dtype)


_COMPILED = {}


def _compiled_reference(z, y):
    key = tuple(z.shape)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_eager_reference, dynamic=False)
    return _COMPILED[key](z, y)


IMPLS = {"rce_fast": rce_fast.rce_loss, "eager reference": _eager_reference,
         "compiled reference": _compiled_reference}


def _case(n, num_classes):
    return f"rce_loss {n}x{num_classes} {_SHORT[DTYPE]}"


for _n, _l in SHAPES:
    if HAS_CUDA and (_n, _l) == (4096, 32000):
        set_target(_case(_n, _l), "eager reference", 2.0)
    elif not HAS_CUDA and (_n, _l) in ((8192, 1000), (1024, 32000)):
        set_target(_case(_n, _l), "eager reference", 1.5)
    else:
        set_target(_case(_n, _l), "eager reference", 1.0)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rce_loss_forward_backward(record, shape, impl):
    n, num_classes = shape
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(n, num_classes, generator=g) * 2).to(DTYPE).to(DEVICE).requires_grad_(True)
    y = torch.randint(0, num_classes, (n,), generator=g).to(DEVICE)
    fn = IMPLS[impl]
    fn(z, y).backward()  # warm-up: compiles the compiled reference outside the timing
    z.grad = None

    def step():
        z.grad = None
        fn(z, y).backward()
        return z.grad

    # Memory traffic of a fused fwd+bwd: read Z twice, write dZ once.
    bytes_moved = 3 * z.numel() * z.element_size()
    extra = {}
    if impl == "rce_fast" and not HAS_CUDA:  # which CPU path the first call measured fastest
        from rce_fast import ops
        extra["cpu_path"] = ops.rce_cpu_choices().get(ops._rce_shape_class(z), "torch")
    record(_case(n, num_classes), impl, step, bytes=bytes_moved, **extra)
    assert z.grad is not None and torch.isfinite(z.grad).all()
    if impl == "rce_fast":  # what was timed computes the loss (tests/ hold the full check)
        rows = slice(0, 64)
        got = fn(z.detach()[rows], y[rows]).double().cpu()
        want = rce_loss_reference(z.detach()[rows].double().cpu(), y[rows].cpu(),
                                  dtype=torch.float64)
        eps = torch.finfo(DTYPE).eps
        assert abs(got - want) <= 8 * eps * (1 + abs(want)), (got, want)
