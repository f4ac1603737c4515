"""A tiny end-to-end experiment producing every report file, and the CLI."""
import json
import subprocess
import sys

import pytest
import torch

from rce_fast.cli import build_parser, main
from rce_fast.experiment import (ATTACKS, ExperimentConfig, compare_kd, render_report,
                                 run_experiment)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    cfg = ExperimentConfig.demo(
        out=str(out), steps=120, n_attack=40, per_class=100, kernel_points=20, cw_steps=30,
        cw_search=2, jsma_max_iterations=10, progress=False,
        wb_stage1=dict(max_iterations=20, c_init=10.0, binary_search_steps=1),
        wb_stage2=dict(max_iterations=20, c_init=100.0, binary_search_steps=1))
    lines = []
    return out, run_experiment(cfg, log=lines.append), lines


def test_tiny_end_to_end_writes_every_file_with_sane_values(tiny_run):
    out, results, lines = tiny_run
    for name in ("report.md", "results.json", "roc.png", "kd_hist.png", "examples.png",
                 "ce.pt", "rce.pt", "ce_detector.pt", "rce_detector.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    for obj in ("ce", "rce"):
        m = saved["models"][obj]
        assert 0 <= m["test_error"] < 30
        assert set(m["attacks"]) == set(ATTACKS)
        for name, a in m["attacks"].items():
            assert a["seconds_per_example"] > 0 and 0 <= a["pairs"] <= 40
            for metric, v in a["auc"].items():
                assert v is None or 0.0 <= v <= 1.0, (obj, name, metric, v)
        assert 0.0 <= m["attacks"]["C&W-wb"]["f2_positive_ratio"] <= 1.0
        for name, a in m["attacks"].items():
            se = a["auc_se"]["K-density"]
            assert se is None or 0.0 <= se < 0.5, (obj, name, se)
    assert set(saved["kd_comparison"]) == set(ATTACKS)
    report = (out / "report.md").read_text()
    for heading in ("Table 1 layout", "Table 2 layout", "C&W-wb", "Time per adversarial",
                    "RAND"):
        assert heading in report
    assert report in lines  # the tables are printed at the end
    # the FGSM row of Table 2 matches results.json
    fgsm = saved["models"]["rce"]["attacks"]["FGSM"]["auc"]["confidence"]
    assert (f"{fgsm:.3f}" if fgsm is not None else "n/a") in report


def test_kd_comparison_separates_noise_from_real_gaps(tiny_run):
    _, results, _ = tiny_run
    models = {obj: {**m, "attacks": {k: dict(v) for k, v in m["attacks"].items()}}
              for obj, m in results["models"].items()}

    def put(name, ce, rce, se):
        for obj, a in (("ce", ce), ("rce", rce)):
            models[obj]["attacks"][name].update(pairs=100, auc={**models[obj]["attacks"][
                name]["auc"], "K-density": a}, auc_se={"K-density": se})
    put("FGSM", 0.90, 0.95, 0.01)       # higher
    put("BIM", 0.95, 0.95, 0.01)        # equal counts as at or above
    put("ILCM", 0.95, 0.93, 0.01)       # lower by 0.02 < 2 * sqrt(2) * 0.01: noise
    put("JSMA", 0.99, 0.90, 0.01)       # lower by 0.09: real
    put("C&W", 0.99, float("nan"), 0.01)
    cmp = compare_kd(models)
    assert [cmp[a][0] for a in ("FGSM", "BIM", "ILCM", "JSMA", "C&W")] == [
        "at_or_above", "at_or_above", "within_noise", "below", "undefined"]
    assert cmp["ILCM"][2] == pytest.approx(2 * 2 ** 0.5 * 0.01)
    report = render_report({**results, "models": models})
    assert "NOT at or above (RCE lower by more than two standard errors): JSMA (-0.090" in report
    assert "ILCM (-0.020, 2 SE = 0.028)" in report
    assert "no AUC" in report and "C&W" in report


def test_checkpoints_are_reused(tiny_run, tmp_path):
    out, _, _ = tiny_run
    cfg = ExperimentConfig.demo(out=str(tmp_path), n_attack=8, per_class=20, kernel_points=5,
                                cw_steps=5, cw_search=1, jsma_max_iterations=2, progress=False,
                                checkpoints={"ce": str(out / "ce.pt"),
                                             "rce": str(out / "rce.pt")},
                                wb_stage1=dict(max_iterations=3, binary_search_steps=1),
                                wb_stage2=dict(max_iterations=3, binary_search_steps=1))
    lines = []
    run_experiment(cfg, log=lines.append)
    assert any("loaded" in line for line in lines)
    assert not (tmp_path / "ce.pt").exists()


def test_help_explains_every_command():
    parser = build_parser()
    text = parser.format_help()
    for cmd in ("demo", "reproduce", "train", "attack", "evaluate"):
        assert cmd in text
    proc = subprocess.run([sys.executable, "-m", "rce_fast", "reproduce", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--data-dir" in proc.stdout and "--steps" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["demo", "--steps", "0"], "positive integer"),
    (["reproduce", "--dataset", "svhn", "--data-dir", "x"], "invalid choice"),
    (["reproduce", "--dataset", "mnist"], "--data-dir"),
    (["reproduce", "--dataset", "mnist", "--data-dir", "x", "--cw-c-init", "0"],
     "must be a finite number > 0"),
    (["attack", "--checkpoint", "c.pt", "--attack", "fgsm", "--out", "o.pt", "--eps", "-1"],
     "must be a finite number >= 0"),
])
def test_bad_arguments_exit_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_dir_is_reported(tmp_path, capsys):
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out",
                 str(tmp_path / "m.pt"), "--steps", "1", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and str(tmp_path) in err


def test_train_attack_evaluate_round_trip(tmp_path, capsys):
    ckpt = tmp_path / "rce.pt"
    assert main(["train", "--objective", "rce", "--model", "resnet8", "--steps", "60",
                 "--out", str(ckpt), "--quiet"]) == 0
    assert ckpt.is_file()
    adv = tmp_path / "fgsm.pt"
    assert main(["attack", "--checkpoint", str(ckpt), "--attack", "fgsm", "--eps", "0.2",
                 "--n", "50", "--out", str(adv)]) == 0
    saved = torch.load(adv, weights_only=False)
    assert saved["x_adv"].shape == (50, 1, 8, 8)
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--adversarial", str(adv),
                 "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert 0 <= result["test_error"] <= 100 and str(adv) in result["attacks"]


def test_training_under_torchrun_ddp(tmp_path):
    """The same `rce-fast train` command under torchrun: 2 CPU processes (gloo), DDP."""
    ckpt = tmp_path / "ddp.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port=29531", "-m", "rce_fast", "train", "--objective", "rce", "--model",
         "resnet8", "--steps", "20", "--out", str(ckpt), "--quiet"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test error") == 1  # rank 0 reports
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 20
