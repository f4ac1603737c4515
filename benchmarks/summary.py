"""Turn a pytest-benchmark JSON file into the markdown speed table.

    python -m benchmarks.summary results.json [-o table.md]

Per case (e.g. "rce_loss 1024x32000 fp32"): rce_fast's median time, each baseline's,
the baseline / rce_fast ratio and, where the issue set one, the target and whether it
was met; per-example times for the attacks beside the paper's P100 seconds, each side
with its model, budget and hardware (unlike conditions, never a speedup); rce_fast's
time as a multiple of the model floor where one was measured; the CPU path the loss
measured fastest; and on a GPU the fraction of the hardware limit (memory bandwidth for
the loss, tensor-core rate for K-density pair evaluations). The header names the CPU
model and torch's CPU capability, which CPU timings depend on.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

# Peak memory bandwidth (bytes/s) and dense TF32 tensor-core rate (flop/s) by GPU name.
GPU_LIMITS = {
    "H200": (4.8e12, 494e12),
    "H100 SXM": (3.35e12, 494e12),
    "H100 80GB HBM3": (3.35e12, 494e12),
    "H100 PCIe": (2.0e12, 378e12),
    "H100": (3.35e12, 494e12),
    "A100": (2.0e12, 156e12),
}


def gpu_limits(name: str | None):
    if not name:
        return None
    for key, limits in GPU_LIMITS.items():  # most specific names first
        if key in name:
            return limits
    return None


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def render(data: dict) -> str:
    info = data.get("machine_info", {})
    gpu = info.get("rce_fast_gpu")
    limits = gpu_limits(gpu)
    cases: dict[str, dict] = defaultdict(dict)
    extra: dict[str, dict] = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        ex = bench.get("extra_info", {})
        case, role = ex.get("case", bench.get("group")), ex.get("role", bench.get("name"))
        cases[case][role] = bench["stats"]["median"]
        extra[case].update({k: v for k, v in ex.items() if k not in ("case", "role")})
    cpu = info.get("rce_fast_cpu") or info.get("cpu", {}).get("brand_raw") or "unknown CPU"
    cpu_line = f"CPU: {cpu}"
    if info.get("rce_fast_cpu_capability"):
        cpu_line += f" (torch CPU capability {info['rce_fast_cpu_capability']}"
        if info.get("rce_fast_cpp_isa"):
            cpu_line += f", fused C++ loss compiled for {info['rce_fast_cpp_isa']}"
        cpu_line += ")"
    if info.get("rce_fast_threads"):
        threads = info["rce_fast_threads"]
        cpu_line += f", {threads} thread{'s' if threads != 1 else ''}"
    timers = {b.get("options", {}).get("timer") for b in data.get("benchmarks", [])} - {None}
    if timers and timers != {"perf_counter"} and timers != {"time.perf_counter"}:
        cpu_line += f"; timer {', '.join(sorted(timers))} (CPU time, not wall clock)"
    lines = [f"# rce_fast benchmarks ({gpu or cpu})", "", cpu_line, "",
             f"torch {info.get('rce_fast_torch', '?')}, "
             f"{data.get('datetime', '')}".rstrip(", "), "",
             "| case | rce_fast | baseline | baseline time | ratio | target | hardware |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for case in sorted(cases):
        roles = cases[case]
        ours = roles.get("rce_fast")
        ex = extra[case]
        hw = _hardware(ex, ours, limits)
        baselines = [r for r in roles if r != "rce_fast"]
        if not baselines:
            lines.append(f"| {case} | {_t(ours)} | | | | | {hw} |")
        for role in baselines:
            ratio = roles[role] / ours if ours else float("nan")
            target = ""
            if ex.get("target_baseline") == role:
                goal = ex["target_ratio"]
                target = f">= {goal:g}x " + ("met" if ratio >= goal else "**missed**")
            lines.append(f"| {case} | {_t(ours)} | {role} | {_t(roles[role])} | "
                         f"{ratio:.2f}x | {target} | {hw} |")
    floors = [c for c in sorted(cases) if "model floor" in cases[c] and "rce_fast" in cases[c]]
    if floors:
        lines += ["", "| case | rce_fast / model floor |", "| --- | --- |"]
        lines += [f"| {c} | {cases[c]['rce_fast'] / cases[c]['model floor']:.2f}x |"
                  for c in floors]
    paths = [(c, e["cpu_path"]) for c, e in sorted(extra.items()) if "cpu_path" in e]
    if paths:
        lines += ["", "| case | CPU path measured fastest |", "| --- | --- |"]
        lines += [f"| {c} | {p} |" for c, p in paths]
    per = [(c, e) for c, e in extra.items() if "per_image_of" in e and "rce_fast" in cases[c]]
    if per:
        where = gpu or cpu
        lines += ["", "Seconds per adversarial example beside the paper's appendix Table 1. "
                  "Unlike conditions, so not a speedup: each side names its model, data, "
                  f"budget and hardware (rce_fast's: {where}, as above).", "",
                  "| case | rce_fast per example | rce_fast's setting | "
                  "paper per example | paper's setting |", "| --- | --- | --- | --- | --- |"]
        for case, ex in sorted(per):
            mine = cases[case]["rce_fast"] / ex["per_image_of"]
            paper = ex.get("paper_seconds")
            lines.append(f"| {case} | {_t(mine)} | {ex.get('setting', 'not recorded')} | "
                         f"{_t(paper) if paper else ''} | "
                         f"{ex.get('paper_setting', 'P100, ResNet-32') if paper else ''} |")
    return "\n".join(lines) + "\n"


def _t(seconds) -> str:
    if seconds is None:
        return "n/a"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def _hardware(ex: dict, ours, limits) -> str:
    if not ours:
        return ""
    parts = []
    if "bytes" in ex:
        gbs = ex["bytes"] / ours
        text = f"{gbs / 1e9:.0f} GB/s"
        if limits:
            text += f" ({100 * gbs / limits[0]:.0f}% of peak bandwidth)"
        parts.append(text)
    if "pairs" in ex:
        rate = ex["pairs"] / ours
        text = f"{rate:.3g} pairs/s"
        if limits and "dim" in ex:
            flops = rate * 2 * ex["dim"]  # one multiply-add per feature per pair
            text += f" ({100 * flops / (limits[1] / 3):.0f}% of 3xTF32 peak)"
        parts.append(text)
    return "; ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.summary",
                                description="markdown table from pytest-benchmark JSON")
    p.add_argument("json", help="file written by pytest benchmarks/ --benchmark-json=FILE")
    p.add_argument("-o", "--output", help="write the table here (default: stdout)")
    args = p.parse_args(argv)
    table = render(load(args.json))
    if args.output:
        with open(args.output, "w") as f:
            f.write(table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
