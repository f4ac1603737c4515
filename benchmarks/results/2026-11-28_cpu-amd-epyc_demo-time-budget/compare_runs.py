"""Compare a time-boxed, continued demo run with an uninterrupted one: every number of
results.json except timings/sessions/paths, and every tensor of every saved .pt file."""
import json, sys
from pathlib import Path
import torch
a, b = Path(sys.argv[1]), Path(sys.argv[2])
SKIP = ("seconds", "sessions", "out", "started", "time_budget", "per_example", "forced_resumes")
def strip(x):
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if not any(s in k for s in SKIP)}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x
ra, rb = (strip(json.loads((p / "results.json").read_text())) for p in (a, b))
def diff(x, y, path=""):
    if type(x) != type(y):
        yield path; return
    if isinstance(x, dict):
        for k in set(x) | set(y):
            if k not in x or k not in y: yield f"{path}/{k} (missing)"
            else: yield from diff(x[k], y[k], f"{path}/{k}")
    elif isinstance(x, list):
        if len(x) != len(y): yield path
        else:
            for i, (u, v) in enumerate(zip(x, y)): yield from diff(u, v, f"{path}[{i}]")
    elif x != y and not (x != x and y != y):
        yield path
d = list(diff(ra, rb))
print("results.json differences:", d[:20] if d else "none")
def tensors(obj, p=""):
    if torch.is_tensor(obj): yield p, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str): yield from tensors(obj[k], f"{p}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj): yield from tensors(v, f"{p}[{i}]")
files = sorted(f.relative_to(a) for f in a.rglob("*.pt"))
bad, n_t = [], 0
for f in files:
    if not (b / f).exists():
        bad.append(f"{f} missing"); continue
    ta = list(tensors(torch.load(a / f, weights_only=True)))
    tb = list(tensors(torch.load(b / f, weights_only=True)))
    if [k for k, _ in ta] != [k for k, _ in tb]:
        bad.append(f"{f} keys"); continue
    for (k, u), (_, v) in zip(ta, tb):
        n_t += 1
        if u.dtype != v.dtype or u.shape != v.shape or not torch.equal(u.view(-1).view(torch.uint8) if u.is_floating_point() else u, v.view(-1).view(torch.uint8) if v.is_floating_point() else v):
            bad.append(f"{f}{k}")
print(f".pt files: {len(files)}, tensors: {n_t}, differing: {bad[:20] if bad else 'none'}")
ma, mb = ((p / "report.md").read_text() for p in (a, b))
import re
strip_t = lambda s: [l for l in s.splitlines() if not re.search(r"s\)|seconds|ms/|e[-+]0\d \||took|session", l)]
print("report.md lines differing (timings excluded):", [x for x, y in zip(strip_t(ma), strip_t(mb)) if x != y][:10])
