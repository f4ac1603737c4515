"""One command for a lent GPU: build, test, sanitize and benchmark rce_fast, within a budget.

    bash scripts/gpu_check.sh OUT_DIR [--budget 450] [--skip STAGE,...] [--cpu]

Stages, in order, each with its own time cap (a share of what is left of the budget):

  env        GPU, driver, torch / triton / numpy versions, nvcc, compute-sanitizer.
  build      pip install --no-build-isolation -e . with CUDA code for this GPU only.
  tests      every GPU test on the compiled kernels (pytest -m gpu): losses and gradients
             against the fp64 references, opcheck, torch.compile (default and
             reduce-overhead), CPU == CUDA JSMA pairs, K-density values at D = 64 to
             2048 and gradients through the tiled backward (D = 65 to 4096, fp32, fp16,
             bf16).
  sanitizer  compute-sanitizer memcheck and racecheck on one launch of the JSMA CUDA op
             and of each Triton kernel, small inputs, torch's caching allocator off.
  bench      the GPU benchmarks, one group at a time, as many as the time left allows:
             the headline cases first (RCE loss 4096x32000 bf16, K-density 100k), then
             JSMA, the C&W step rates, the rest of the loss and K-density, the attacks.

Every command runs in its own process group and is killed at its cap: nothing can hang.
A stage out of time is reported "skipped", with what it finished (tests passed so far,
benchmark groups done). Writes four files, OUT_DIR/summary.json, summary.md,
gpu_check.log and bench_raw.json (every group's pytest-benchmark JSON), and prints
summary.md at the end. Four, because the device tool brings back at most eight files
from $OUT: scratch files (the sanitizer's script, each group's JSON) live elsewhere.

What the GPU machine lacks travels in ``.gpu_carry/`` (git-ignored; filled here by
scripts/gpu_prepare.sh and named in the device call's carry): ``wheels/*.whl`` are
installed --no-index --no-deps in the build stage (torchattacks, the benchmarks'
baseline), and ``mnist/`` becomes RCE_FAST_MNIST_DIR for the tests and benchmarks.

``--cpu`` runs the same orchestration without a GPU (what CI tests): the build stage is
skipped unless asked for, and stages that need a GPU report "skipped" with the reason.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "build", "tests", "sanitizer", "bench")
# Share of the time left that each stage may take (the last stage takes what remains).
DEFAULT_SHARES = {"env": 0.05, "build": 0.35, "tests": 0.45, "sanitizer": 0.35, "bench": 1.0}
# Benchmark groups (name, pytest arguments), most important first: each runs only if
# time is left. pytest-benchmark writes its JSON only when a run ends, so a group cut off
# at its cap leaves no numbers: the headline cases come first, in a group of
# their own, and the rest of each file later.
_TARGET_CASES = "4096x32000 or 100k"
BENCH_GROUPS = (
    ("targets", ["benchmarks/test_bench_loss.py", "benchmarks/test_bench_kdensity.py",
                 "-k", _TARGET_CASES]),
    ("jsma", ["benchmarks/test_bench_jsma.py"]),
    ("rates", ["benchmarks/test_bench_rates.py"]),
    ("loss", ["benchmarks/test_bench_loss.py", "-k", f"not ({_TARGET_CASES})"]),
    ("kdensity", ["benchmarks/test_bench_kdensity.py", "-k", f"not ({_TARGET_CASES})"]),
    ("attacks", ["benchmarks/test_bench_attacks.py"]),
    ("adaptive", ["benchmarks/test_bench_adaptive.py"]),
)
BENCH_WEIGHTS = {"targets": 3.0}
MIN_GROUP_SECONDS = 20.0
# What scripts/gpu_prepare.sh stages for the device call (see the module docstring).
CARRY = ROOT / ".gpu_carry"

# GPU targets of the GPU-readiness issue: case name (as the benchmarks record it) ->
# (baseline role, minimum ratio baseline / rce_fast).
GPU_TARGETS = {
    "rce_loss 4096x32000 bf16": [("eager reference", 2.0), ("compiled reference", 1.2)],
    "kdensity N=M=100k D=64 10 classes": [("naive torch.cdist", 5.0)],
}
PAIRS_TARGET = 1e12          # K-density kernel pairs per second at 100k x 100k, D = 64
HBM_FRACTION_TARGET = 0.8    # RCE loss, large shapes
JSMA_EXAMPLES_PER_S = 100.0  # ResNet-32 MNIST
CW_SECONDS_PER_EXAMPLE = 1.0     # 9 x 10,000 steps, batch 1000
CW_WB_SECONDS_PER_EXAMPLE = 10.0  # 3 x 5,000 + 9 x 10,000 steps


@dataclass
class Budget:
    """Wall-clock budget shared by the stages; ``clock`` is injectable for tests."""
    total: float
    clock: object = time.monotonic
    start: float = field(default=0.0)

    def __post_init__(self):
        self.start = self.clock()

    def left(self) -> float:
        return max(0.0, self.total - (self.clock() - self.start))

    def cap(self, share: float, override: float | None = None) -> float:
        """Seconds the next stage may take: ``share`` of what is left (or ``override``,
        never more than what is left)."""
        left = self.left()
        return min(left, override) if override is not None else left * share


@dataclass
class CommandResult:
    rc: int | None          # None when killed at the cap
    seconds: float
    timed_out: bool
    output: str


def run_command(cmd, cap: float, log, env=None, cwd=ROOT) -> CommandResult:
    """Run ``cmd`` (list) in its own process group, teeing output to ``log``; kill the
    whole group at ``cap`` seconds (SIGTERM, then SIGKILL after 5 s)."""
    log.write(f"\n$ {' '.join(shlex.quote(str(c)) for c in cmd)}   (cap {cap:.0f} s)\n")
    log.flush()
    start = time.monotonic()
    if cap <= 0:
        return CommandResult(None, 0.0, True, "")
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    # Raw reads of whatever is there: a line-based read would block on a partial line
    # (pytest's progress dots, a prompt) and so miss the cap while the command hangs.
    import codecs
    import selectors
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = proc.stdout.fileno()
    chunks: list[str] = []

    def take(data: bytes, final: bool = False) -> None:
        text = decoder.decode(data, final=final)
        if text:
            chunks.append(text)
            log.write(text)
            log.flush()

    timed_out = False
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    while True:
        remaining = cap - (time.monotonic() - start)
        if remaining <= 0:
            timed_out = True
            break
        if not sel.select(timeout=min(1.0, remaining)):
            if proc.poll() is not None:
                break
            continue
        data = os.read(fd, 65536)
        if not data:  # EOF: every writer closed the pipe
            if proc.poll() is not None:
                break
            time.sleep(0.05)
            continue
        take(data)
    if timed_out:
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.write(f"[gpu_check] killed after {cap:.0f} s (stage cap)\n")
    proc.wait()
    # What is still in the pipe; a grandchild that outlived the group kill and holds the
    # pipe open must not block us, so read only while there is something to read.
    while sel.select(timeout=0.2):
        data = os.read(fd, 65536)
        if not data:
            break
        take(data)
    take(b"", final=True)
    sel.close()
    proc.stdout.close()
    return CommandResult(None if timed_out else proc.returncode, time.monotonic() - start,
                         timed_out, "".join(chunks))


# ------------------------------------------------------------------------------ stages

def _python() -> str:
    return sys.executable


def stage_env(ctx) -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine()}
    code = ("import json, torch, numpy\n"
            "d = {'torch': torch.__version__, 'numpy': numpy.__version__,\n"
            "     'cuda': torch.version.cuda, 'gpu': None}\n"
            "try:\n    import triton; d['triton'] = triton.__version__\n"
            "except Exception as e:\n    d['triton'] = None\n"
            "if torch.cuda.is_available():\n"
            "    d['gpu'] = torch.cuda.get_device_name()\n"
            "    d['capability'] = list(torch.cuda.get_device_capability())\n"
            "    d['gpu_count'] = torch.cuda.device_count()\n"
            "print('ENV ' + json.dumps(d))\n")
    res = run_command([_python(), "-c", code], ctx.cap("env"), ctx.log)
    m = re.search(r"^ENV (.*)$", res.output, re.M)
    if m:
        info.update(json.loads(m.group(1)))
    for tool in ("nvcc", "compute-sanitizer", "nvidia-smi"):
        info[tool] = shutil.which(tool)
    ok = res.rc == 0 and m is not None
    ctx.env_info = info
    return {"status": "passed" if ok else "failed", "seconds": res.seconds, **info}


def stage_build(ctx) -> dict:
    if ctx.args.cpu and "build" not in ctx.args.only:
        return {"status": "skipped", "seconds": 0.0,
                "reason": "--cpu: the installed package is used as it is"}
    env = dict(os.environ)
    cap_ = ctx.env_info.get("capability")
    if cap_:
        env["CMAKE_CUDA_ARCHITECTURES"] = f"{cap_[0]}{cap_[1]}"  # this GPU only: short build
    wheels = sorted((CARRY / "wheels").glob("*.whl"))
    wheel_seconds, wheels_ok = 0.0, True
    if wheels:  # no network there: carried wheels only, their needs are already there
        res = run_command([_python(), "-m", "pip", "install", "--no-index", "--no-deps",
                           "--disable-pip-version-check", "-q", *wheels],
                          min(120.0, ctx.cap("build")), ctx.log)
        wheel_seconds, wheels_ok = res.seconds, res.rc == 0
    cmd = [_python(), "-m", "pip", "install", "--no-build-isolation", "--no-deps",
           "--disable-pip-version-check", "-q", "-e", "."]
    res = run_command(cmd, ctx.cap("build"), ctx.log, env=env)
    res.seconds += wheel_seconds
    if res.timed_out:
        return {"status": "skipped", "seconds": res.seconds, "reason": "out of time"}
    check = run_command([_python(), "-c", "import rce_fast, rce_fast._C as c; "
                         "print('WITH_CUDA', c.with_cuda)"], 60, ctx.log)
    with_cuda = "WITH_CUDA True" in check.output
    ok = res.rc == 0 and check.rc == 0 and (with_cuda or ctx.args.cpu) and wheels_ok
    return {"status": "passed" if ok else "failed", "seconds": res.seconds + check.seconds,
            "extension_with_cuda": with_cuda,
            "cuda_architectures": env.get("CMAKE_CUDA_ARCHITECTURES"),
            "carried_wheels": [w.name for w in wheels],
            **({} if wheels_ok else {"reason": "installing the carried wheels failed"})}


_PYTEST_LINE = re.compile(r"^(\S+::\S+.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.M)
# the same under pytest-xdist: "[gw0] [ 16%] PASSED tests/x.py::test_y"
_XDIST_LINE = re.compile(r"^\[gw\d+\] \[\s*\d+%\] (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) "
                         r"(\S+::\S+.*?)\s*$", re.M)


def pytest_progress(output: str) -> dict:
    """Counts of PASSED / FAILED / ERROR / SKIPPED lines in ``pytest -v`` output, and the
    failing test ids."""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failing = []
    lines = _PYTEST_LINE.findall(output) + [(t, o) for o, t in _XDIST_LINE.findall(output)]
    for test, outcome in lines:
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error",
               "SKIPPED": "skipped", "XFAIL": "skipped"}[outcome]
        counts[key] += 1
        if key in ("failed", "error"):
            failing.append(test.strip())
    return {**counts, "failing": failing[:50]}


def stage_tests(ctx) -> dict:
    if ctx.args.cpu:
        default = ["tests/test_gpu_readiness.py", "-k", "device_guard or host_sync"]
    else:
        default = ["tests", "-m", "gpu"]
    selection = shlex.split(ctx.args.pytest_args) if ctx.args.pytest_args else default
    env = dict(os.environ)
    workers = []
    if not ctx.args.cpu:
        env["RCE_FAST_TEST_INTERPRET"] = "0"   # the compiled kernels, not the interpreter
        # Most of this stage is compiling (Triton kernels, inductor), one CPU core each:
        # several test processes share the GPU (the GPU machine has 16 cores and xdist).
        if importlib.util.find_spec("xdist") is not None and not ctx.args.pytest_args:
            workers = ["-n", str(max(1, min(4, (os.cpu_count() or 2) // 2)))]
    cmd = [_python(), "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE", *workers,
           *selection]
    res = run_command(cmd, ctx.cap("tests"), ctx.log, env=env)
    prog = pytest_progress(res.output)
    if res.timed_out:
        return {"status": "skipped", "seconds": res.seconds, "reason": "out of time",
                "finished": prog}
    status = "passed" if res.rc == 0 and prog["passed"] > 0 else "failed"
    return {"status": status, "seconds": res.seconds, **prog, "rc": res.rc,
            "workers": int(workers[1]) if workers else 1}


SANITIZER_SCRIPT = """
import torch, rce_fast
from rce_fast import ops
dev = 'cuda'
g = torch.Generator(device=dev).manual_seed(0)
# JSMA pair search (the CUDA extension)
a = torch.randn(3, 300, device=dev, generator=g); b = torch.randn(3, 300, device=dev, generator=g)
d = torch.rand(3, 300, device=dev, generator=g) > 0.2
torch.ops.rce_fast.jsma_pairs(a, b, d, True)
# RCE loss forward + backward (Triton), ragged shape
for dtype in (torch.float32, torch.bfloat16):
    z = torch.randn(37, 1003, device=dev, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, 1003, (37,), device=dev, generator=g)
    rce_fast.rce_loss(z, y).backward()
# K-density forward + backward (Triton), single-chunk and tiled feature sizes
for dim in (64, 200):
    q = torch.randn(70, dim, device=dev, generator=g).requires_grad_(True)
    bank = torch.randn(90, dim, device=dev, generator=g)
    bl = torch.arange(90, device=dev) % 3; qc = torch.arange(70, device=dev) % 3
    rce_fast.kdensity(q, bank, bl, qc, 0.5 * dim).sum().backward()
torch.cuda.synchronize()
print('SANITIZER_SCRIPT_OK')
"""


# Only our kernels are instrumented (torch's own would take minutes): one substring
# filter per family, which compute-sanitizer takes as key=value (kns: a substring of the
# mangled name; several --kernel-name options select the union). The JSMA kernels are
# pairs_partial_kernel and pairs_final_kernel (csrc/jsma_cuda.cu), the Triton kernels
# keep their Python names (_rce_*, _kd_*).
SANITIZER_ARGS = ("--error-exitcode", "99", "--kernel-name", "kns=pairs_",
                  "--kernel-name", "kns=_rce_", "--kernel-name", "kns=_kd_")


def sanitizer_counts(output: str) -> dict:
    """Errors and racecheck hazards from compute-sanitizer's summary lines, e.g.
    'ERROR SUMMARY: 0 errors' or 'RACECHECK SUMMARY: 3 hazards displayed (1 error,
    2 warnings)'. None where the line is absent (the tool did not get that far)."""
    def num(pattern):
        m = re.search(pattern, output)
        return int(m.group(1)) if m else None
    hazards = num(r"RACECHECK SUMMARY: (\d+) hazard")
    race_errors = num(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error")
    errors = num(r"ERROR SUMMARY: (\d+) error")
    if race_errors is not None:
        errors = max(errors or 0, race_errors)
    return {"errors": errors, "hazards": hazards,
            "warnings": num(r"RACECHECK SUMMARY: .*?(\d+) warning")}


def stage_sanitizer(ctx) -> dict:
    tool = shutil.which("compute-sanitizer")
    if ctx.args.cpu or not ctx.env_info.get("gpu"):
        return {"status": "skipped", "seconds": 0.0, "reason": "no GPU"}
    if tool is None:
        return {"status": "skipped", "seconds": 0.0, "reason": "compute-sanitizer not found"}
    script = ctx.scratch / "sanitizer_script.py"
    script.write_text(SANITIZER_SCRIPT)
    cap = ctx.cap("sanitizer")
    start = time.monotonic()
    results = {}
    # Without the caching allocator every tensor is its own allocation, so memcheck sees
    # an access past a tensor's end even where torch's 2 MiB blocks would hide it.
    env = {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    for name in ("memcheck", "racecheck"):
        left = cap - (time.monotonic() - start)
        res = run_command([tool, "--tool", name, *SANITIZER_ARGS, _python(), str(script)],
                          left / (2 if name == "memcheck" else 1), ctx.log, env=env)
        results[name] = {"rc": res.rc, "seconds": round(res.seconds, 1),
                         "timed_out": res.timed_out, **sanitizer_counts(res.output),
                         "script_ok": "SANITIZER_SCRIPT_OK" in res.output}
    seconds = time.monotonic() - start
    if any(r["timed_out"] for r in results.values()):
        return {"status": "skipped", "seconds": seconds, "reason": "out of time", **results}
    # racecheck's warnings (hazards it cannot prove harmful, which Hopper's asynchronous
    # copies can show) are recorded; its errors, like memcheck's, fail the stage. The
    # summary line must be there (errors == 0, not None): a crash has none. A non-zero
    # exit with 0 errors (warnings, if the tool counts them) is recorded in "rc".
    ok = all(r["script_ok"] and r["errors"] == 0 for r in results.values())
    return {"status": "passed" if ok else "failed", "seconds": seconds, **results}


def stage_bench(ctx) -> dict:
    groups = ([(Path(g).stem, [g]) for g in ctx.args.bench_groups]
              if ctx.args.bench_groups else list(BENCH_GROUPS))
    start = time.monotonic()
    cap = ctx.cap("bench")
    done, skipped, failed, jsons, ran = [], [], [], [], []
    for i, (group, selection) in enumerate(groups):
        left = cap - (time.monotonic() - start)
        if left < MIN_GROUP_SECONDS:
            skipped.extend(name for name, _ in groups[i:])
            break
        out_json = ctx.scratch / f"bench_{group}.json"
        cmd = [_python(), "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection,
               f"--benchmark-json={out_json}", "--benchmark-max-time=0.5",
               "--benchmark-min-rounds=3", "--benchmark-warmup=on"]
        if ctx.args.cpu:
            cmd.append("--benchmark-disable")
        # give later groups a chance: at most what is left, split over the groups left
        # by weight (the headline group compiles the torch.compile reference: 3 shares)
        weights = [BENCH_WEIGHTS.get(name, 1.0) for name, _ in groups[i:]]
        share = left if i == len(groups) - 1 else max(
            MIN_GROUP_SECONDS, left * weights[0] / sum(weights) * 1.5)
        res = run_command(cmd, min(left, share), ctx.log)
        ran.append(out_json)
        if res.timed_out:
            skipped.append(group)
        elif res.rc not in (0, 5):  # 5: pytest selected nothing (a case this device skips)
            failed.append(group)
        else:
            done.append(group)
        if out_json.exists():
            jsons.append(out_json)
    cases = bench_cases(jsons, ctx.env_info.get("gpu"))
    merge_bench_json(ran, ctx.out / "bench_raw.json")
    seconds = time.monotonic() - start
    status = "failed" if failed else ("skipped" if skipped else "passed")
    return {"status": status, "seconds": seconds, "groups_done": done,
            "groups_skipped": skipped, "groups_failed": failed,
            "reason": "out of time" if skipped and not failed else None, "cases": cases}


def merge_bench_json(json_paths, dest: Path) -> None:
    """Every group's pytest-benchmark JSON in one file, {file stem: its JSON}; a group
    that left none (cut off at its cap, or timing disabled) is there with the reason."""
    merged = {}
    for path in json_paths:
        path = Path(path)
        if not path.exists():
            merged[path.stem] = {"no_json": "pytest-benchmark wrote none (the run was cut "
                                            "off, failed early, or timing was disabled)"}
            continue
        try:
            merged[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            merged[path.stem] = {"unreadable": f"{type(exc).__name__}: {exc}"}
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    os.replace(tmp, dest)


# --------------------------------------------------------------------- bench analysis

def _gpu_limits(gpu):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.summary import gpu_limits
    finally:
        sys.path.pop(0)
    return gpu_limits(gpu)


def bench_cases(json_paths, gpu: str | None) -> list[dict]:
    """Per benchmark case: every implementation's median, baseline / rce_fast ratios,
    the issue's targets and whether they were met, and the fraction of the hardware
    limit (HBM bandwidth for the loss, pair rate for K-density) on a known GPU."""
    by_case: dict[str, dict] = {}
    for path in json_paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        for bench in data.get("benchmarks", []):
            ex = bench.get("extra_info", {})
            case = ex.get("case", bench.get("group"))
            role = ex.get("role", bench.get("name"))
            entry = by_case.setdefault(case, {"case": case, "median_s": {}, "extra": {}})
            entry["median_s"][role] = bench["stats"]["median"]
            entry["extra"].update({k: v for k, v in ex.items() if k not in ("case", "role")})
    limits = _gpu_limits(gpu)
    out = []
    for case, entry in sorted(by_case.items()):
        ours = entry["median_s"].get("rce_fast")
        ex = entry["extra"]
        row = {"case": case, "median_s": entry["median_s"], "ratios": {}, "targets": []}
        if ours:
            for role, t in entry["median_s"].items():
                if role != "rce_fast":
                    row["ratios"][role] = t / ours
            if "bytes" in ex:
                row["bandwidth_GBps"] = ex["bytes"] / ours / 1e9
                if limits:
                    row["hbm_fraction"] = ex["bytes"] / ours / limits[0]
            if "pairs" in ex:
                row["pairs_per_s"] = ex["pairs"] / ours
                row["targets"].append({"what": "pairs/s", "target": PAIRS_TARGET,
                                       "value": row["pairs_per_s"],
                                       "met": row["pairs_per_s"] >= PAIRS_TARGET}
                                      if "100k" in case else None)
            if "per_image_of" in ex:
                row["seconds_per_example"] = ours / ex["per_image_of"]
                row["examples_per_s"] = ex["per_image_of"] / ours
            if "seconds_per_example_at_paper_budget" in ex:
                row["seconds_per_example_at_paper_budget"] = \
                    ex["seconds_per_example_at_paper_budget"]
        for baseline, ratio in GPU_TARGETS.get(case, []):
            got = row["ratios"].get(baseline)
            row["targets"].append({"what": f"vs {baseline}", "target": ratio, "value": got,
                                   "met": got is not None and got >= ratio})
        row["targets"] = [t for t in row["targets"] if t]
        out.append(row)
    return out


def gpu_targets(cases: list[dict]) -> list[dict]:
    """The GPU targets of the GPU-readiness issue, each with the measured value and
    whether it was met (None where the case did not run)."""
    by = {c["case"]: c for c in cases}

    def find(prefix):
        return next((c for name, c in by.items() if name.startswith(prefix)), None)

    rows = []
    loss = by.get("rce_loss 4096x32000 bf16")
    for baseline, need in GPU_TARGETS["rce_loss 4096x32000 bf16"]:
        got = loss["ratios"].get(baseline) if loss else None
        rows.append({"target": f"RCE loss 4096x32000 bf16 >= {need}x {baseline}",
                     "value": got, "unit": "x", "met": None if got is None else got >= need})
    for name, c in sorted(by.items()):
        if name.startswith("rce_loss") and c.get("hbm_fraction") is not None and \
                any(k in name for k in ("x32000", "x131072", "8192x1000")):
            rows.append({"target": f"{name}: > {HBM_FRACTION_TARGET:.0%} of HBM bandwidth",
                         "value": c["hbm_fraction"], "unit": "of HBM",
                         "met": c["hbm_fraction"] > HBM_FRACTION_TARGET})
    kd = by.get("kdensity N=M=100k D=64 10 classes")
    got = kd.get("pairs_per_s") if kd else None
    rows.append({"target": f"K-density 100k x 100k D=64 >= {PAIRS_TARGET:.0e} pairs/s",
                 "value": got, "unit": "pairs/s",
                 "met": None if got is None else got >= PAIRS_TARGET})
    got = kd["ratios"].get("naive torch.cdist") if kd else None
    rows.append({"target": "K-density 100k x 100k >= 5x naive cdist", "value": got,
                 "unit": "x", "met": None if got is None else got >= 5.0})
    js = find("JSMA paper budget")
    got = js.get("examples_per_s") if js else None
    rows.append({"target": f"JSMA >= {JSMA_EXAMPLES_PER_S:g} examples/s (ResNet-32 MNIST)",
                 "value": got, "unit": "examples/s",
                 "met": None if got is None else got >= JSMA_EXAMPLES_PER_S})
    for prefix, need, label in (("C&W step", CW_SECONDS_PER_EXAMPLE, "C&W 9 x 10,000 steps"),
                                ("C&W-wb stage 2 step", CW_WB_SECONDS_PER_EXAMPLE,
                                 "C&W-wb 3 x 5,000 + 9 x 10,000 steps")):
        c = find(prefix)
        got = c.get("seconds_per_example_at_paper_budget") if c else None
        rows.append({"target": f"{label} < {need:g} s/example (extrapolated)", "value": got,
                     "unit": "s/example", "met": None if got is None else got < need})
    return rows


# ------------------------------------------------------------------------- the driver

class Context:
    def __init__(self, args, out: Path, log, budget: Budget):
        self.args, self.out, self.log, self.budget = args, out, log, budget
        self.env_info: dict = {}
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))

    def cap(self, stage: str) -> float:
        return self.budget.cap(self.args.shares.get(stage, DEFAULT_SHARES[stage]),
                               self.args.caps.get(stage))


STAGE_FUNCS = {"env": stage_env, "build": stage_build, "tests": stage_tests,
               "sanitizer": stage_sanitizer, "bench": stage_bench}


def _parse_pairs(text: str | None, kind=float) -> dict:
    out = {}
    for item in (text or "").split(","):
        if item.strip():
            key, _, value = item.partition("=")
            if key.strip() not in STAGES:
                raise argparse.ArgumentTypeError(f"unknown stage {key.strip()!r}; stages are "
                                                 f"{', '.join(STAGES)}")
            out[key.strip()] = kind(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (created; summary.json, summary.md, log)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="wall-clock seconds for everything (default: %(default)s)")
    p.add_argument("--skip", default="", help="comma-separated stages to skip")
    p.add_argument("--only", default="", help="comma-separated stages to run (default all)")
    p.add_argument("--cap", dest="caps", type=_parse_pairs, default={},
                   help="fixed caps in seconds, e.g. tests=120,bench=200")
    p.add_argument("--share", dest="shares", type=_parse_pairs, default={},
                   help="share of the time left per stage, e.g. tests=0.5")
    p.add_argument("--cpu", action="store_true",
                   help="no GPU: run the orchestration on CPU (what CI tests)")
    p.add_argument("--pytest-args", default=None,
                   help="test selection for the tests stage (default: tests -m gpu)")
    p.add_argument("--bench-groups", type=lambda s: [g for g in s.split(",") if g],
                   default=None, help="benchmark files, comma-separated, in order")
    return p


def selected(stage: str, args) -> bool:
    """Whether ``stage`` runs: not in --skip, and in --only when given. env always runs;
    so does build on a GPU (a fresh machine has no compiled extension, and a rerun with
    --only tests would test the PyTorch fallback), unless --skip build."""
    if stage in args.skip:
        return False
    always = ("env",) if args.cpu else ("env", "build")
    return not args.only or stage in args.only or stage in always


def main(argv=None, clock=time.monotonic) -> int:
    args = build_parser().parse_args(argv)
    if args.budget <= 0:
        print("gpu_check: --budget must be > 0", file=sys.stderr)
        return 2
    for opt in ("skip", "only"):
        names = [s.strip() for s in getattr(args, opt).split(",") if s.strip()]
        unknown = [n for n in names if n not in STAGES]
        if unknown:
            print(f"gpu_check: --{opt}: unknown stage(s) {unknown}; stages are "
                  f"{', '.join(STAGES)}", file=sys.stderr)
            return 2
        setattr(args, opt, names)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "gpu_check.log", "w")
    except OSError as exc:
        print(f"gpu_check: cannot write to {out}: {exc}", file=sys.stderr)
        return 2
    budget = Budget(args.budget, clock)
    if (CARRY / "mnist" / "train-images-idx3-ubyte.gz").exists():
        os.environ.setdefault("RCE_FAST_MNIST_DIR", str(CARRY / "mnist"))
    ctx = Context(args, out, log, budget)
    summary = {"date": _dt.datetime.now().isoformat(timespec="seconds"),
               "budget_s": args.budget, "mode": "cpu" if args.cpu else "gpu",
               "gpu": None, "torch": None, "triton": None,
               "mnist": os.environ.get("RCE_FAST_MNIST_DIR"), "stages": {}, "cases": []}
    for stage in STAGES:
        if not selected(stage, args):
            summary["stages"][stage] = {"status": "skipped", "seconds": 0.0,
                                        "reason": "not selected"}
            continue
        log.write(f"\n===== stage {stage} ({budget.left():.0f} s left) =====\n")
        log.flush()
        try:
            result = STAGE_FUNCS[stage](ctx)
        except Exception as exc:  # a broken stage must not lose the others' results
            result = {"status": "failed", "seconds": 0.0,
                      "reason": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(result.get("seconds", 0.0), 1)
        summary["stages"][stage] = result
        if stage == "env":
            summary.update({k: ctx.env_info.get(k) for k in ("gpu", "torch", "triton")})
        write_summary(out, summary)  # after every stage: a kill loses nothing done
    summary["cases"] = summary["stages"].get("bench", {}).pop("cases", []) or []
    summary["targets"] = gpu_targets(summary["cases"])
    summary["total_seconds"] = round(budget.total - budget.left(), 1)
    write_summary(out, summary)
    log.close()
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    print((out / "summary.md").read_text())
    failed = [s for s, r in summary["stages"].items() if r["status"] == "failed"]
    return 1 if failed else 0


def render_markdown(summary: dict) -> str:
    lines = [f"# rce_fast GPU check: {summary.get('gpu') or 'no GPU'}", "",
             f"{summary.get('date')}, mode {summary.get('mode')}, torch {summary.get('torch')}, "
             f"triton {summary.get('triton')}, budget {summary.get('budget_s')} s, total "
             f"{summary.get('total_seconds', '?')} s.", "",
             "| stage | status | seconds | notes |", "| --- | --- | --- | --- |"]
    for name, r in summary["stages"].items():
        notes = []
        if r.get("reason"):
            notes.append(r["reason"])
        if "passed" in r and isinstance(r.get("passed"), int):
            notes.append(f"{r['passed']} passed, {r.get('failed', 0)} failed, "
                         f"{r.get('skipped', 0)} skipped")
        if r.get("finished"):
            f = r["finished"]
            notes.append(f"finished before the cap: {f['passed']} passed, {f['failed']} failed")
        if r.get("failing"):
            notes.append("failing: " + ", ".join(r["failing"][:5]))
        for tool in ("memcheck", "racecheck"):
            if isinstance(r.get(tool), dict):
                t = r[tool]
                notes.append(f"{tool}: rc {t['rc']}, errors {t['errors']}, hazards "
                             f"{t['hazards']}, warnings {t.get('warnings')}")
        if r.get("groups_done") is not None:
            notes.append(f"groups done {len(r['groups_done'])}, skipped "
                         f"{len(r.get('groups_skipped', []))}, failed "
                         f"{len(r.get('groups_failed', []))}")
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', 0):.1f} | "
                     f"{'; '.join(notes)} |")
    cases = summary.get("cases") or summary["stages"].get("bench", {}).get("cases") or []
    if cases:
        lines += ["", "| case | rce_fast | baselines (ratio) | rate | targets |",
                  "| --- | --- | --- | --- | --- |"]
        for c in cases:
            ours = c["median_s"].get("rce_fast")
            base = ", ".join(f"{k} {v:.2f}x" for k, v in c["ratios"].items())
            rate = []
            if "bandwidth_GBps" in c:
                rate.append(f"{c['bandwidth_GBps']:.0f} GB/s"
                            + (f" ({c['hbm_fraction']:.0%} of HBM)" if "hbm_fraction" in c
                               else ""))
            if "pairs_per_s" in c:
                rate.append(f"{c['pairs_per_s']:.3g} pairs/s")
            if "examples_per_s" in c:
                rate.append(f"{c['examples_per_s']:.3g} examples/s")
            if "seconds_per_example_at_paper_budget" in c:
                rate.append(f"{c['seconds_per_example_at_paper_budget']:.3g} s/example at "
                            "the paper's budget (extrapolated)")
            tg = "; ".join(f"{t['what']} >= {t['target']:g}: "
                           f"{'met' if t['met'] else 'MISSED'}" for t in c["targets"])
            lines.append(f"| {c['case']} | {ours * 1e3:.3f} ms | {base} | "
                         f"{', '.join(rate)} | {tg} |" if ours else
                         f"| {c['case']} | n/a | {base} | | {tg} |")
    if summary.get("targets"):
        lines += ["", "| GPU target | measured | met |", "| --- | --- | --- |"]
        for t in summary["targets"]:
            value = "not measured" if t["value"] is None else f"{t['value']:.3g} {t['unit']}"
            met = {None: "n/a", True: "yes", False: "NO"}[t["met"]]
            lines.append(f"| {t['target']} | {value} | {met} |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict) -> None:
    """Atomic writes of summary.json and summary.md."""
    for name, text in (("summary.json", json.dumps(summary, indent=2, default=str)),
                       ("summary.md", render_markdown(summary))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


if __name__ == "__main__":
    raise SystemExit(main())
