"""pytest-benchmark setup shared by every benchmark group.

Each benchmark registers its result under a *case* (e.g. "rce_loss 8192x1000 fp32") with
a role: "rce_fast" for ours, anything else for a baseline. At the end of the run a table
prints, per case, every implementation's median time and the baseline/ours ratio, with
the target from the issue and whether it was met. Timings are only compared within one
run (same machine, same load). ``--benchmark-disable`` (CI's quick mode) runs every
benchmark once as a smoke test and prints no table. ``--enforce-targets`` turns a missed
target into a failure.
"""
from __future__ import annotations

import collections

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

_RESULTS: dict[str, dict[str, float]] = collections.defaultdict(dict)
_TARGETS: dict[str, tuple[str, float]] = {}
_EXTRA: dict[str, dict] = collections.defaultdict(dict)


def pytest_addoption(parser):
    group = parser.getgroup("rce_fast benchmarks")
    group.addoption("--enforce-targets", action="store_true", default=False,
                    help="fail the run when a speed target stated in an issue is missed")
    group.addoption("--paper-settings", action="store_true", default=False,
                    help="attack budgets of the paper (9 x 10,000 C&W steps, ...): slow")
    group.addoption("--bench-model", default=None,
                    help="network for the attack benchmarks: mlp, resnet8, resnet32, "
                         "resnet56 (default: mlp on CPU, resnet32 on GPU)")


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def timed(fn):
    """Wrap ``fn`` so GPU work is synchronised inside the timed region."""
    def run():
        out = fn()
        sync()
        return out
    return run


def set_target(case: str, baseline: str, min_ratio: float) -> None:
    """Declare that rce_fast must be at least ``min_ratio`` x faster than ``baseline`` on ``case``."""
    _TARGETS[case] = (baseline, min_ratio)


def cpu_info() -> dict:
    """What a CPU timing depends on: model, torch's vector capability (its exp and
    softmax kernels), the fused C++ loss's instruction set, threads."""
    from rce_fast import _backend, _ext
    module, _ = _ext.load()
    return {"rce_fast_cpu": _backend.cpu_model(),
            "rce_fast_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "rce_fast_cpp_isa": module.cpu_isa() if module is not None else None,
            "rce_fast_threads": torch.get_num_threads()}


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["rce_fast_gpu"] = torch.cuda.get_device_name() if HAS_CUDA else None
    machine_info["rce_fast_torch"] = torch.__version__
    machine_info.update(cpu_info())


@pytest.fixture
def record(benchmark, request):
    """record(case, role, fn, **extra): benchmark fn and file its median under case/role."""
    def _record(case, role, fn, rounds=None, **extra):
        benchmark.group = case
        benchmark.name = role
        benchmark.extra_info.update(extra, case=case, role=role)
        if case in _TARGETS:  # so the JSON (and benchmarks.summary) knows the target
            benchmark.extra_info.update(target_baseline=_TARGETS[case][0],
                                        target_ratio=_TARGETS[case][1])
        if rounds:
            result = benchmark.pedantic(timed(fn), rounds=rounds, warmup_rounds=1)
        else:
            result = benchmark(timed(fn))
        if benchmark.stats is not None:  # None under --benchmark-disable
            _RESULTS[case][role] = benchmark.stats.stats.median
            _EXTRA[case].update(extra)
        return result
    return _record


def summary_rows():
    rows = []
    for case, roles in _RESULTS.items():
        ours = roles.get("rce_fast")
        for role, t in roles.items():
            if role == "rce_fast":
                continue
            ratio = t / ours if ours else float("nan")
            target = _TARGETS.get(case)
            verdict = ""
            if target and target[0] == role:
                verdict = f">= {target[1]:g}x: " + ("met" if ratio >= target[1] else "MISSED")
            rows.append((case, role, ours, t, ratio, verdict))
    return rows


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = summary_rows()
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("rce_fast speed ratios (baseline time / rce_fast time, same run)")
    info = cpu_info()
    tr.write_line(f"device: {torch.cuda.get_device_name() if HAS_CUDA else 'cpu'}, "
                  f"CPU {info['rce_fast_cpu']} (torch capability "
                  f"{info['rce_fast_cpu_capability']}, C++ loss {info['rce_fast_cpp_isa']}), "
                  f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    tr.write_line(f"{'case':38s} {'baseline':22s} {'rce_fast':>11s} {'baseline':>11s} "
                  f"{'ratio':>7s}  target")
    for case, role, ours, t, ratio, verdict in rows:
        ours_s = f"{ours * 1e3:9.3f}ms" if ours else "        n/a"
        tr.write_line(f"{case:38s} {role:22s} {ours_s} {t * 1e3:9.3f}ms {ratio:6.2f}x  {verdict}")
    for case, extra in _EXTRA.items():
        if "bytes" in extra and "rce_fast" in _RESULTS[case]:
            gbs = extra["bytes"] / _RESULTS[case]["rce_fast"] / 1e9
            tr.write_line(f"{case:38s} rce_fast moves {gbs:8.1f} GB/s")
        if "per_image_of" in extra:
            per = {role: t / extra["per_image_of"] for role, t in _RESULTS[case].items()}
            tr.write_line(f"{case:38s} per example: " + ", ".join(
                f"{role} {t * 1e3:.3f} ms" for role, t in per.items()))
        if "paper_seconds" in extra and "rce_fast" in _RESULTS[case]:
            ours = _RESULTS[case]["rce_fast"] / extra.get("per_image_of", 1)
            tr.write_line(f"{case:38s} {ours:.3g} s per example ({extra.get('setting', '')}; "
                          f"unlike conditions, the paper's: {extra['paper_seconds']:.3g} s, "
                          f"{extra.get('paper_setting', 'P100, ResNet-32')})")
        if "model floor" in _RESULTS[case] and "rce_fast" in _RESULTS[case]:
            tr.write_line(f"{case:38s} rce_fast takes "
                          f"{_RESULTS[case]['rce_fast'] / _RESULTS[case]['model floor']:.2f}x "
                          f"the model floor")
        if "cpu_path" in extra:
            tr.write_line(f"{case:38s} CPU path: {extra['cpu_path']}")
        if "pairs" in extra and "rce_fast" in _RESULTS[case]:
            rate = extra["pairs"] / _RESULTS[case]["rce_fast"]
            tr.write_line(f"{case:38s} rce_fast evaluates {rate:.3g} query-bank pairs/s")
    missed = [r for r in rows if r[5].endswith("MISSED")]
    if missed and config.getoption("--enforce-targets"):
        tr.write_line(f"{len(missed)} speed target(s) missed")
        config._rce_fast_missed = True


def pytest_sessionfinish(session, exitstatus):
    if getattr(session.config, "_rce_fast_missed", False) and exitstatus == 0:
        session.exitstatus = 1
