"""What only a GPU would show, checked here as far as a CPU allows (issue: the first GPU
run must work): launches on the tensors' device, CUDA-graph capture safety, feature sizes
of real networks in the fused K-density kernel, fp32 softmax weights in low-precision
gradients, and the GPU-only cases themselves (skipped without a GPU)."""
import contextlib
import os

import pytest
import torch

import rce_fast
from rce_fast import ops
from tests.reference import kdensity_reference, rce_loss_reference

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_interpreter = pytest.mark.skipif(not INTERP, reason="the Triton interpreter is off")
# The Triton-only kernel tests below run where Triton runs: the interpreter on CPU
# tensors, or the compiled kernels on a GPU (one process cannot do both).
TRITON_DEVICES = [pytest.param("cpu", id="interp"),
                  pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _skip_unless_triton_runs_on(device):
    if device == "cpu" and not INTERP:
        pytest.skip("the Triton interpreter is off (the cuda case runs the compiled kernels)")
    if device == "cuda" and (INTERP or not torch.cuda.is_available()):
        pytest.skip("needs a CUDA GPU with compiled Triton kernels")


def _kd_data(n, m, d, classes, dtype=torch.float32, device="cpu", seed=0, near=False):
    """Random class-clustered features; ``near``: queries next to their class centre
    (large centres), so that sum_j p_j x_j - q cancels heavily in the gradient."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * (4 if near else 2)
    bl = torch.cat([torch.arange(classes), torch.randint(0, classes, (m - classes,),
                                                         generator=g)])
    b = centers[bl] + torch.randn(m, d, generator=g)
    qc = torch.randint(0, classes, (n,), generator=g)
    q = centers[qc] + torch.randn(n, d, generator=g) * (0.05 if near else 1.5)
    return q.to(dtype).to(device), b.to(dtype).to(device), bl.to(device), qc.to(device)


# ------------------------------------------------------------------- launch device guard

@needs_interpreter
def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    """Triton launches on the current device: each launcher must enter a device guard
    for its tensors' device (recorded here; on CPU the guard is a no-op)."""
    from rce_fast.kernels import kdensity as kd
    from rce_fast.kernels import rce_loss as rl
    seen = []

    def recording_guard(device):
        seen.append(torch.device(device))
        return contextlib.nullcontext()

    monkeypatch.setattr(rl, "device_guard", recording_guard)
    monkeypatch.setattr(kd, "device_guard", recording_guard)
    z, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    loss, lse = rl.rce_forward(z, y, -100, 1.0)
    rl.rce_backward(torch.ones(6), z, y, lse, -100, 1.0)
    for dim in (8, 100):  # single-chunk and tiled backward
        q, b, bl, qc = _kd_data(5, 9, dim, 2)
        order = torch.argsort(qc, stable=True)
        off = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(qc, minlength=2).cumsum(0)])
        boff = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(bl, minlength=2).cumsum(0)])
        bs = b[torch.argsort(bl, stable=True)]
        lse = kd.kdensity_lse(q[order], off, bs, boff, 1.0)
        kd.kdensity_grad(torch.ones(5), q[order], off, bs, boff, lse, 1.0)
    assert seen == [torch.device("cpu")] * 6


def test_device_guard_targets_the_tensor_device():
    from rce_fast.kernels._launch import device_guard
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)


# ----------------------------------------------------------------- CUDA-graph capture

@pytest.mark.parametrize("backend", ["triton", "torch_chunked"])
def test_capture_skips_the_host_check_and_poisons_bad_rows(backend, monkeypatch):
    """Inside CUDA-graph capture the label check (a host sync) is skipped; a row whose
    label is out of range then gets a NaN loss and NaN gradient, never a wrong number."""
    if backend == "triton" and not INTERP:
        pytest.skip("the Triton interpreter is off")
    if backend == "torch_chunked":
        from rce_fast import _torch_impl
        monkeypatch.setattr(_torch_impl, "SMALL_ELEMS", -1)
        backend = "torch"
    z = torch.randn(6, 5)
    y = torch.tensor([0, 7, 2, -100, -3, 4])
    with rce_fast.use_backend(backend):
        with pytest.raises(ValueError, match="class index 7"):   # eager: a clear error
            rce_fast.rce_loss(z, y)
        monkeypatch.setattr(ops, "host_sync_forbidden", lambda t: True)
        zz = z.clone().requires_grad_(True)
        rows = rce_fast.rce_loss(zz, y, reduction="none")
        rows.sum().backward()
    bad = torch.tensor([False, True, False, False, True, False])
    assert torch.isnan(rows[bad]).all() and torch.isnan(zz.grad[bad]).all()
    good = ~bad
    ref = rce_loss_reference(z, torch.where(bad, 0, y), reduction="none")
    torch.testing.assert_close(rows[good].double(), ref[good], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(zz.grad[good]).all()
    assert (zz.grad[3] == 0).all()  # ignore_index still means zero


def test_host_sync_forbidden_is_false_on_cpu():
    assert not ops.host_sync_forbidden(torch.zeros(3))


# ------------------------------------------------------- feature sizes real users have

@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dim", [65, 768, 2048, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_features_run_in_the_fused_kernel(dim, dtype, device):
    """ViT-B (768), ResNet-50 (2048) and 4096-d features: forward and gradient against
    the float64 brute force, through the tiled (D > 64) Triton kernels (on a GPU, the
    tiled backward's global accumulator and its barriers run for real)."""
    _skip_unless_triton_runs_on(device)
    q, b, bl, qc = _kd_data(40, 70, dim, 3, dtype, seed=dim)
    sigma2 = 2.0 * dim  # keeps the kernel weights spread over several bank rows
    w = torch.linspace(-1.0, 2.0, 40)
    with rce_fast.use_backend("triton"):
        qd = q.to(device)
        assert ops._backend.pick("kdensity", ops._KD_LSE, q=qd).name == "triton"
        qq = qd.clone().requires_grad_(True)
        out = rce_fast.kdensity(qq, b.to(device), bl.to(device), qc.to(device), sigma2)
        (out * w.to(device)).sum().backward()
    out, grad = out.cpu(), qq.grad.cpu()
    q64 = q.double().requires_grad_(True)
    ref = kdensity_reference(q64, b.double(), bl, qc, sigma2)
    (ref * w.double()).sum().backward()
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad.double(), q64.grad, rtol=1e-4, atol=1e-6)
    else:  # the class-centred bf16 copy the kernel receives is the error: bound by it
        from tests.test_kdensity import _low_precision_reference
        low = _low_precision_reference(q, b, bl, qc, sigma2, dtype)
        assert (out.double() - ref).abs().max() <= 2 * (low - ref).abs().max() + 1e-3
        assert torch.isfinite(grad.float()).all()


# ------------------------------------------------------ low-precision gradient weights

def _sorted_inputs(q, b, bl, qc, classes):
    order = torch.argsort(qc, stable=True)
    off = torch.cat([torch.zeros(1, dtype=torch.long),
                     torch.bincount(qc, minlength=classes).cumsum(0)])
    border = torch.argsort(bl, stable=True)
    boff = torch.cat([torch.zeros(1, dtype=torch.long),
                      torch.bincount(bl, minlength=classes).cumsum(0)])
    return q[order].contiguous(), off, b[border].contiguous(), boff, qc[order], bl[border]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dim", [48, 200])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_gradient_keeps_fp32_softmax_weights(dtype, dim, device):
    """kdensity_grad on fp16/bf16 inputs against float64 autograd AT THOSE SAME INPUTS,
    with queries next to their class centre so that sum_j p_j x_j - q cancels: the only error
    left is the kernel's arithmetic plus the final rounding to the output dtype. Rounding
    the weights p to the input dtype before the second dot would add about one input-ulp
    of |x| to the gradient entries (the test checks that it would break the bound on a
    few percent of them); fp32 weights keep the error near fp32 rounding.
    """
    _skip_unless_triton_runs_on(device)
    classes = 3
    q, b, bl, qc = _kd_data(64, 90, dim, classes, torch.float64, seed=7, near=True)
    # centred on the class means, as rce_fast.kdensity hands them to the kernel
    centers = torch.stack([b[bl == c].mean(0) for c in range(classes)])
    q, b = (q - centers[qc]).to(dtype), (b - centers[bl]).to(dtype)
    qs, off, bs, boff, qcs, bls = _sorted_inputs(q, b, bl, qc, classes)
    sigma2 = 0.2 * dim  # weights spread over many bank rows
    g = torch.linspace(0.5, 1.5, 64)
    with rce_fast.use_backend("triton"):
        dev = [t.to(device) for t in (qs, off, bs, boff)]
        lse = torch.ops.rce_fast.kdensity_lse(*dev, sigma2)
        dq = torch.ops.rce_fast.kdensity_grad(g.to(device), *dev, lse, sigma2)
    lse, dq = lse.cpu(), dq.cpu()
    q64 = qs.double().requires_grad_(True)
    ref_lse = kdensity_reference(q64, bs.double(), bls, qcs, sigma2) + \
        torch.bincount(bls, minlength=classes)[qcs].double().log()
    (ref_lse * g.double()).sum().backward()
    ref = q64.grad
    eps = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]  # output rounding
    scale = (2.0 / sigma2) * float(bs.double().abs().max()) * float(g.max())
    err = (dq.double() - ref).abs()
    bound = eps * ref.abs() + 1e-5 * scale
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    # what rounding the weights would cost: far above the bound (the test can tell)
    p_low = torch.exp(-torch.cdist(qs.double(), bs.double()) ** 2 / sigma2
                      - lse.double()[:, None])
    p_low = p_low * (qcs[:, None] == bls[None, :])
    damage = (2.0 / sigma2) * ((p_low.to(dtype).double() - p_low) @ bs.double()) * g.double()[:, None]
    share = (damage.abs() > bound).double().mean().item()
    assert share > 0.01, f"rounded weights would break the bound on only {share:.1%} of entries"


def test_bf16_only_upcasts_where_the_interpreter_needs_it():
    from rce_fast.kernels.kdensity import _upcast
    assert _upcast(torch.zeros(1, dtype=torch.bfloat16))
    assert not _upcast(torch.zeros(1, dtype=torch.float16))
    assert not _upcast(torch.zeros(1, dtype=torch.float32))


# ------------------------------------------------------------------- GPU-only cases

@pytest.mark.gpu
def test_rce_loss_under_reduce_overhead_compile():
    """torch.compile(mode="reduce-overhead") captures CUDA graphs: the loss and gradient
    must match eager on every replay."""
    torch._dynamo.reset()

    def step(z, y):
        loss = rce_fast.rce_loss(z, y, temperature=1.5)
        (g,) = torch.autograd.grad(loss, z)
        return loss, g

    compiled = torch.compile(step, mode="reduce-overhead")
    for i in range(4):
        z = torch.randn(256, 10, device="cuda", requires_grad=True)
        y = torch.randint(0, 10, (256,), device="cuda")
        loss_c, g_c = compiled(z, y)
        loss_e, g_e = step(z, y)
        torch.testing.assert_close(loss_c, loss_e)
        torch.testing.assert_close(g_c, g_e)


@pytest.mark.gpu
def test_rce_loss_inside_a_cuda_graph():
    z = torch.randn(64, 10, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    rce_fast.rce_loss(z, y)  # warm-up (and the eager check) outside capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rce_fast.rce_loss(z, y, reduction="none")
        with torch.cuda.graph(graph):
            out = rce_fast.rce_loss(z, y, reduction="none")
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.testing.assert_close(out.double().cpu(),
                               rce_loss_reference(z.cpu(), y.cpu(), reduction="none"),
                               rtol=1e-5, atol=1e-5)
    y[5] = 99  # out of range: the replayed graph poisons that row instead of lying
    graph.replay()
    assert torch.isnan(out[5]) and torch.isfinite(out[torch.arange(64, device="cuda") != 5]).all()


@pytest.mark.gpu
def test_jsma_cuda_past_the_grid_limit_and_on_a_side_stream():
    """The CUDA pair search launches at most 65535 images (grid y) at a time; a larger
    batch is chunked. On a non-default stream it must order after that stream's work: the
    input is written there after a long sleep kernel, so a launch on another stream would
    read it before it exists. Both against the C++ CPU path (identical pairs by the tie
    rule)."""
    from rce_fast.attacks import jsma_pairs
    why = ops._jsma_compiled_why_not(torch.zeros(1, 2, device="cuda"))
    if why is not None and "driver supports CUDA" in why:
        pytest.skip(why)  # the designed fallback, on a driver older than nvcc's CUDA
    assert why is None
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(70000, 12, generator=g), torch.randn(70000, 12, generator=g)
    d = torch.rand(70000, 12, generator=g) > 0.2
    want = jsma_pairs(a, b, d, True)
    ac, bc, dc = a.cuda(), b.cuda(), d.cuda()
    assert torch.equal(jsma_pairs(ac, bc, dc, True).cpu(), want)
    late = torch.full_like(ac[:4096], float("nan"))
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the side stream
        late.copy_(ac[:4096])
        got = jsma_pairs(late, bc[:4096], dc[:4096], True)
    side.synchronize()
    assert torch.equal(got.cpu(), want[:4096])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    z, y = torch.randn(128, 10), torch.randint(0, 10, (128,))
    q, b, bl, qc = _kd_data(50, 80, 64, 4)
    ref_loss = rce_fast.rce_loss(z, y)
    ref_kd = rce_fast.kdensity(q, b, bl, qc, 1.0)
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    torch.testing.assert_close(rce_fast.rce_loss(z.to(dev), y.to(dev)).cpu(), ref_loss,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rce_fast.kdensity(q.to(dev), b.to(dev), bl.to(dev),
                                                 qc.to(dev), 1.0).cpu(), ref_kd,
                               rtol=1e-4, atol=1e-4)


def test_training_makes_its_rank_gpu_the_current_device(monkeypatch):
    """Under torchrun rank r trains on cuda:r (LOCAL_RANK): train() must make it the
    current device, or everything launched outside a device guard (and NCCL) lands on
    GPU 0. Checked without a GPU by recording the call and stopping there."""
    from rce_fast.train import TrainConfig, train

    class Reached(Exception):
        pass

    seen = []

    def record(device):
        seen.append(torch.device(device))
        raise Reached

    monkeypatch.setattr(torch.cuda, "set_device", record)
    # train() checks that the device exists: pretend two GPUs are there
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    x, y = torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    with pytest.raises(Reached):
        train(TrainConfig(model="resnet8", steps=1, batch_size=2, progress=False), x, y,
              device="cuda:1")
    assert seen == [torch.device("cuda:1")]
