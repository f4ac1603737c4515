"""benchmarks.summary on a JSON file in pytest-benchmark's format."""
import json

from benchmarks import summary


def _bench(case, role, median, **extra):
    return {"group": case, "name": role, "stats": {"median": median},
            "extra_info": {"case": case, "role": role, **extra}}


def test_summary_table(tmp_path):
    data = {"machine_info": {"rce_fast_gpu": "NVIDIA H100 80GB HBM3", "rce_fast_torch": "2.11",
                             "rce_fast_cpu": "AMD EPYC", "rce_fast_cpu_capability": "AVX2",
                             "rce_fast_cpp_isa": "avx2", "rce_fast_threads": 2},
            "datetime": "2026-11-25",
            "benchmarks": [
                _bench("rce_loss 4096x32000 bf16", "rce_fast", 1e-3, bytes=3 * 4096 * 32000 * 2,
                       target_baseline="eager reference", target_ratio=2.0),
                _bench("rce_loss 4096x32000 bf16", "eager reference", 3e-3,
                       bytes=3 * 4096 * 32000 * 2, target_baseline="eager reference",
                       target_ratio=2.0),
                _bench("kdensity N=M=100k", "rce_fast", 0.5, pairs=1e9, dim=64),
                _bench("attack C&W CE", "rce_fast", 2.0, per_image_of=100, paper_seconds=45.0,
                       setting="mlp on mnist, batch 100, 3 x 100 steps",
                       paper_setting="ResNet-32 on a P100, 9 x 10,000 steps"),
                _bench("vs torchattacks CW", "rce_fast", 2.0, target_baseline="torchattacks",
                       target_ratio=3.0),
                _bench("vs torchattacks CW", "torchattacks", 3.0,
                       target_baseline="torchattacks", target_ratio=3.0),
                _bench("vs torchattacks CW", "model floor", 0.8,
                       target_baseline="torchattacks", target_ratio=3.0),
                _bench("rce_loss 128x10 fp32", "rce_fast", 1e-4, cpu_path="compiled"),
            ]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "t.md"
    assert summary.main([str(path), "-o", str(out)]) == 0
    table = out.read_text()
    assert "| rce_loss 4096x32000 bf16 | 1.00 ms | eager reference | 3.00 ms | 3.00x | >= 2x met" \
        in table
    assert "786 GB/s (23% of peak bandwidth)" in table
    assert "2e+09 pairs/s" in table and "of 3xTF32 peak" in table
    assert ">= 3x **missed**" in table
    # beside the paper's seconds, both sides' setting, labelled as unlike conditions
    assert "| attack C&W CE | 20.00 ms | mlp on mnist, batch 100, 3 x 100 steps | 45.00 s | " \
        "ResNet-32 on a P100, 9 x 10,000 steps |" in table
    assert "Unlike conditions, so not a speedup" in table
    assert "rce_fast's: NVIDIA H100 80GB HBM3, as above" in table
    assert "CPU: AMD EPYC (torch CPU capability AVX2, fused C++ loss compiled for avx2), " \
        "2 threads" in table
    assert "| vs torchattacks CW | 2.50x |" in table  # rce_fast / model floor
    assert "| rce_loss 128x10 fp32 | compiled |" in table


def test_summary_table_of_an_older_file_names_its_cpu(tmp_path):
    """Files written before the CPU fields existed still name the CPU (py-cpuinfo's)."""
    data = {"machine_info": {"rce_fast_gpu": None, "rce_fast_torch": "2.13",
                             "cpu": {"brand_raw": "Intel(R) Xeon(R) Processor"}},
            "benchmarks": [_bench("kdensity", "rce_fast", 0.02)]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    table = summary.render(summary.load(path))
    assert table.startswith("# rce_fast benchmarks (Intel(R) Xeon(R) Processor)")
    assert "CPU: Intel(R) Xeon(R) Processor" in table


def test_attack_budgets_are_named_for_both_settings():
    """The per-example table's setting column: at --paper-settings every attack's budget
    reads exactly as the paper's; at the default small budget the iterative C&W, C&W-wb
    and JSMA budgets say how much smaller they are."""
    from benchmarks import test_bench_attacks as tba

    def setting(paper):
        # the fixture's body, without pytest's request
        class _Config:
            def getoption(self, name):
                return {"--paper-settings": paper, "--bench-model": "mlp"}[name]

        class _Request:
            config = _Config()
        return tba.setting.__wrapped__(_Request())

    paper, small = setting(True), setting(False)
    for attack in tba.PAPER_BUDGET:
        assert tba._budget(attack, paper) == tba.PAPER_BUDGET[attack]
    assert tba._budget("C&W", small) == "3 x 100 steps"
    assert tba._budget("C&W-hc", small) == "3 x 100 steps, kappa 10"
    assert tba._budget("C&W-wb", small) == "1 x 50 then 2 x 100 steps"
    assert tba._budget("JSMA", small) == "at most 20 iterations"
    assert tba._budget("BIM", small) == "10 steps"
