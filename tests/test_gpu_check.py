"""The GPU check's CPU-side logic (arguments, time caps, process-group kills, summary
writing, benchmark analysis), so that scripts/gpu_check.sh cannot rot between the
sessions that are lent a GPU."""
import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up
_spec.loader.exec_module(gpu_check)


def _run(args, timeout=600):
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("args, message", [
    (["--skip", "warp"], "unknown stage"),
    (["--only", "tests,nope"], "unknown stage"),
    (["--budget", "0"], "--budget must be > 0"),
    (["--cap", "zzz=3"], "unknown stage"),
])
def test_bad_arguments(tmp_path, args, message):
    proc = _run([str(tmp_path / "out"), *args], timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = _run([str(blocker / "out"), "--cpu"], timeout=60)
    assert proc.returncode == 2 and "cannot write" in proc.stderr


def test_budget_caps_with_a_fake_clock():
    now = [100.0]
    budget = gpu_check.Budget(300.0, clock=lambda: now[0])
    assert budget.cap(0.5) == 150.0
    now[0] += 200.0
    assert budget.left() == 100.0 and budget.cap(0.5) == 50.0
    assert budget.cap(0.5, override=500.0) == 100.0   # never more than what is left
    now[0] += 1000.0
    assert budget.left() == 0.0 and budget.cap(1.0) == 0.0


def test_run_command_kills_the_whole_process_group(tmp_path):
    log = open(tmp_path / "log", "w")
    start = time.monotonic()
    res = gpu_check.run_command(["bash", "-c", "echo started; sleep 60 & sleep 60"], 1.5, log)
    log.close()
    assert res.timed_out and res.rc is None and "started" in res.output
    assert time.monotonic() - start < 20
    assert "killed after" in (tmp_path / "log").read_text()
    ok = gpu_check.run_command([sys.executable, "-c", "print('hi')"], 30,
                               open(tmp_path / "log2", "w"))
    assert ok.rc == 0 and not ok.timed_out and "hi" in ok.output


def test_cpu_mode_end_to_end_writes_the_summary(tmp_path):
    out = tmp_path / "gpu"
    proc = _run([str(out), "--cpu", "--budget", "400",
                 "--pytest-args", "tests/test_gpu_readiness.py -k host_sync_forbidden_is_false",
                 "--bench-groups", "benchmarks/test_bench_jsma.py"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"gpu", "torch", "triton", "stages", "cases"}
    st = summary["stages"]
    assert list(st) == list(gpu_check.STAGES)
    assert st["env"]["status"] == "passed" and st["env"]["torch"]
    assert st["build"]["status"] == "skipped"
    assert st["tests"]["status"] == "passed" and st["tests"]["passed"] == 1
    assert st["sanitizer"]["status"] == "skipped" and st["sanitizer"]["reason"] == "no GPU"
    assert st["bench"]["status"] == "passed" and st["bench"]["groups_done"]
    assert all(isinstance(r["seconds"], float) for r in st.values())
    md = (out / "summary.md").read_text()
    assert "| tests | passed |" in md and md in proc.stdout
    assert (out / "gpu_check.log").stat().st_size > 0
    # The device tool brings back at most eight files from $OUT: exactly these four.
    assert sorted(f.name for f in out.iterdir()) == [
        "bench_raw.json", "gpu_check.log", "summary.json", "summary.md"]
    # --cpu runs the benchmarks with timing disabled: the group is there, with no stats
    assert list(json.loads((out / "bench_raw.json").read_text())) == ["bench_test_bench_jsma"]


def test_a_stage_out_of_time_is_skipped_with_what_it_finished(tmp_path):
    slow = tmp_path / "test_slow.py"
    # test_slow leaves a partial line in the pipe while it hangs (as pytest's progress
    # dots do when output is unbuffered): the cap must still hold.
    slow.write_text("import sys, time\n\ndef test_fast():\n    pass\n\n"
                    "def test_slow():\n    sys.__stdout__.write('waiting...')\n"
                    "    sys.__stdout__.flush()\n    time.sleep(120)\n")
    out = tmp_path / "gpu"
    start = time.monotonic()
    proc = _run([str(out), "--cpu", "--only", "tests", "--cap", "tests=25",
                 "--pytest-args", f"{slow} -p no:randomly"])
    assert time.monotonic() - start < 100
    summary = json.loads((out / "summary.json").read_text())
    tests = summary["stages"]["tests"]
    assert tests["status"] == "skipped" and tests["reason"] == "out of time"
    assert tests["finished"]["passed"] == 1
    assert summary["stages"]["bench"]["reason"] == "not selected"
    assert proc.returncode == 0  # skipped is not failed


def test_bench_analysis_ratios_bandwidth_and_targets(tmp_path):
    data = {"machine_info": {"rce_fast_gpu": "NVIDIA H100 80GB HBM3"}, "benchmarks": [
        {"extra_info": {"case": "rce_loss 4096x32000 bf16", "role": "rce_fast",
                        "bytes": 3 * 4096 * 32000 * 2}, "stats": {"median": 3.0e-4}},
        {"extra_info": {"case": "rce_loss 4096x32000 bf16", "role": "eager reference"},
         "stats": {"median": 9.0e-4}},
        {"extra_info": {"case": "rce_loss 4096x32000 bf16", "role": "compiled reference"},
         "stats": {"median": 3.3e-4}},
        {"extra_info": {"case": "kdensity N=M=100k D=64 10 classes", "role": "rce_fast",
                        "pairs": 1e10}, "stats": {"median": 0.02}},
    ]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    cases = {c["case"]: c for c in gpu_check.bench_cases([path], "NVIDIA H100 80GB HBM3")}
    loss = cases["rce_loss 4096x32000 bf16"]
    assert loss["ratios"]["eager reference"] == pytest.approx(3.0)
    assert loss["bandwidth_GBps"] == pytest.approx(3 * 4096 * 32000 * 2 / 3e-4 / 1e9)
    assert 0 < loss["hbm_fraction"] < 1
    met = {t["what"]: t["met"] for t in loss["targets"]}
    assert met == {"vs eager reference": True, "vs compiled reference": False}
    kd = cases["kdensity N=M=100k D=64 10 classes"]
    assert kd["pairs_per_s"] == pytest.approx(5e11)
    assert [t["met"] for t in kd["targets"] if t["what"] == "pairs/s"] == [False]
    targets = gpu_check.gpu_targets(list(cases.values()))
    by = {t["target"]: t for t in targets}
    assert by["RCE loss 4096x32000 bf16 >= 2.0x eager reference"]["met"] is True
    assert by["RCE loss 4096x32000 bf16 >= 1.2x compiled reference"]["met"] is False
    assert by["K-density 100k x 100k D=64 >= 1e+12 pairs/s"]["met"] is False
    assert any(t["met"] is None and "JSMA" in t["target"] for t in targets)  # not run
    md = gpu_check.render_markdown({"stages": {}, "cases": list(cases.values()),
                                    "targets": targets})
    assert "MISSED" in md and "GB/s" in md and "| GPU target |" in md and "not measured" in md


def test_sanitizer_summary_lines():
    """memcheck's and racecheck's summary lines, as compute-sanitizer prints them: racecheck
    warnings are recorded, its errors count as errors."""
    clean = gpu_check.sanitizer_counts("========= ERROR SUMMARY: 0 errors\n")
    assert clean == {"errors": 0, "hazards": None, "warnings": None}
    race = gpu_check.sanitizer_counts(
        "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n")
    assert race == {"errors": 1, "hazards": 3, "warnings": 2}
    warn = gpu_check.sanitizer_counts(
        "========= RACECHECK SUMMARY: 1 hazard displayed (0 errors, 1 warning)\n"
        "========= ERROR SUMMARY: 0 errors\n")
    assert warn == {"errors": 0, "hazards": 1, "warnings": 1}
    assert gpu_check.sanitizer_counts("Segmentation fault")["errors"] is None
    # every family of our kernels is selected, in compute-sanitizer's key=value form
    args = gpu_check.SANITIZER_ARGS
    filters = [args[i + 1] for i, a in enumerate(args) if a == "--kernel-name"]
    assert filters == ["kns=pairs_", "kns=_rce_", "kns=_kd_"]


def test_default_bench_groups_cover_every_benchmark_once():
    """The default groups (headline cases first, the rest of each file later) select every
    benchmark in benchmarks/ exactly once, as pytest collects them on this machine."""
    def collect(args):
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                               "-p", "no:cacheprovider", *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)
        assert proc.returncode in (0, 5), proc.stdout[-2000:] + proc.stderr[-2000:]
        return [line for line in proc.stdout.splitlines() if "::" in line]

    everything = collect(sorted(str(p.relative_to(ROOT))
                                for p in (ROOT / "benchmarks").glob("test_*.py")))
    grouped = [t for _, selection in gpu_check.BENCH_GROUPS for t in collect(selection)]
    assert len(grouped) == len(set(grouped)), "a benchmark runs in two groups"
    assert sorted(grouped) == sorted(everything)
    targets = collect(dict(gpu_check.BENCH_GROUPS)["targets"])
    assert any("test_kdensity_100k" in t for t in targets)


def test_pytest_progress_reads_plain_and_xdist_output():
    plain = ("tests/a.py::test_x[cuda] PASSED [ 10%]\n"
             "tests/a.py::test_y[cuda] FAILED [ 20%]\n"
             "tests/b.py::test_z SKIPPED (needs a CUDA GPU) [ 30%]\n")
    xdist = ("[gw0] [ 16%] PASSED tests/a.py::test_x[cuda] \n"
             "[gw1] [ 33%] ERROR tests/b.py::test_w[args0-unknown stage] \n"
             "tests/b.py::test_v \n"      # a test starting: no outcome yet
             "[gw1] [ 50%] XFAIL tests/b.py::test_u \n")
    assert gpu_check.pytest_progress(plain) == {
        "passed": 1, "failed": 1, "error": 0, "skipped": 1, "failing": ["tests/a.py::test_y[cuda]"]}
    got = gpu_check.pytest_progress(xdist)
    assert (got["passed"], got["error"], got["skipped"]) == (1, 1, 1)
    assert got["failing"] == ["tests/b.py::test_w[args0-unknown stage]"]


def test_stage_selection_builds_on_a_gpu_even_with_only():
    def runs(argv):
        args = gpu_check.build_parser().parse_args(["out", *argv])
        args.skip = [s for s in args.skip.split(",") if s]
        args.only = [s for s in args.only.split(",") if s]
        return [s for s in gpu_check.STAGES if gpu_check.selected(s, args)]
    assert runs([]) == list(gpu_check.STAGES)
    assert runs(["--only", "tests"]) == ["env", "build", "tests"]
    assert runs(["--only", "tests", "--skip", "build"]) == ["env", "tests"]
    assert runs(["--only", "tests", "--cpu"]) == ["env", "tests"]
    assert runs(["--skip", "bench,sanitizer"]) == ["env", "build", "tests"]
