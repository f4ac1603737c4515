"""A tiny end-to-end experiment producing every report file, and the CLI."""
import json
import subprocess
import sys

import pytest
import torch

from rce_fast.cli import build_parser, main
from rce_fast.experiment import (ATTACKS, ExperimentConfig, compare_kd, render_report,
                                 run_experiment)


TINY = dict(steps=120, n_attack=40, per_class=100, kernel_points=20, cw_steps=30,
            cw_search=2, jsma_max_iterations=10, progress=False,
            wb_stage1=dict(max_iterations=20, c_init=10.0, binary_search_steps=1),
            wb_stage2=dict(max_iterations=20, c_init=100.0, binary_search_steps=1),
            pgd_steps=3, opgd_steps=4, baseline_fit_n=120, lid_batch=50, lid_k=10)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp")
    cfg = ExperimentConfig.demo(out=str(out), **TINY)
    lines = []
    return out, run_experiment(cfg, log=lines.append), lines


def test_tiny_end_to_end_writes_every_file_with_sane_values(tiny_run):
    out, results, lines = tiny_run
    for name in ("report.md", "results.json", "roc.png", "kd_hist.png", "examples.png",
                 "robust_accuracy.png", "ce.pt", "rce.pt", "ce_detector.pt",
                 "rce_detector.pt", "ce_lid.pt", "rce_mahalanobis.pt"):
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
        wb = m["attacks"]["C&W-wb"]
        assert 0.0 <= wb["f2_positive_ratio"] <= 1.0
        # the Table 3 ratio counts only the inputs the attack moved to its target
        info = torch.load(out / "adversarial" / f"{obj}_cw-wb.pt", weights_only=True)["info"]
        on, positive = info["classified_as_target"], info["f2"] > 0
        assert wb["classified_as_target"] == pytest.approx(float(on.float().mean()))
        assert wb["f2_positive_ratio"] == pytest.approx(float(positive.float().mean()))
        if on.any():
            assert wb["f2_positive_ratio_on_target"] == pytest.approx(
                float(positive[on].float().mean()))
        else:
            assert wb["f2_positive_ratio_on_target"] is None  # NaN in results.json
        for name, a in m["attacks"].items():
            se = a["auc_se"]["K-density"]
            assert se is None or 0.0 <= se < 0.5, (obj, name, se)
    assert set(saved["kd_comparison"]) == set(ATTACKS)
    report = (out / "report.md").read_text()
    for heading in ("Table 1 layout", "Table 2 layout", "C&W-wb", "Time per adversarial",
                    "RAND"):
        assert heading in report
    assert report in lines  # the tables are printed at the end
    # the time table sits beside the paper's P100 seconds: both sides' model, data,
    # budgets and hardware are named, as unlike conditions, not a speedup
    cfg = saved["config"]
    conditions = next(line for line in report.splitlines()
                      if line.startswith("Unlike conditions, so not a speedup."))
    from rce_fast._backend import cpu_model
    assert f"{cfg['model']} on {saved['data']['dataset']}" in conditions
    assert f"C&W and C&W-hc {cfg['cw_search']} x {cfg['cw_steps']:,} steps" in conditions
    assert cpu_model() in conditions or torch.cuda.is_available()
    assert "The paper: ResNet-32 on a P100" in conditions
    assert "C&W-wb 3 x 5,000 then 9 x 10,000 steps." in conditions
    # the FGSM row of Table 2 matches results.json
    fgsm = saved["models"]["rce"]["attacks"]["FGSM"]["auc"]["confidence"]
    assert (f"{fgsm:.3f}" if fgsm is not None else "n/a") in report


def test_defense_table_has_every_attack_detector_and_model(tiny_run):
    """Every (model, attack, detector) row with AUROC, TPR and robust accuracy at 5% FPR
    in [0, 1], the same numbers in report.md, and the robust-accuracy plot."""
    from rce_fast._defense_table import ADAPTIVE_ATTACKS, DETECTORS

    out, results, lines = tiny_run
    saved = json.loads((out / "results.json").read_text())["defense"]
    assert saved["fpr"] == 0.05
    assert (saved["calibration_images"], saved["evaluation_images"],
            saved["adaptive_images"]) == (20, 20, 20)
    attacks = (*ATTACKS, *ADAPTIVE_ATTACKS)
    report = (out / "report.md").read_text()
    header = "| attack | detector | CE AUROC | CE TPR | CE RA | RCE AUROC | RCE TPR | RCE RA |"
    assert header in report and report in lines
    rows = [line for line in report.splitlines() if line.startswith("| ")
            and line.count("|") == 9 and line != header and "---" not in line]
    assert len(rows) == len(attacks) * len(DETECTORS)
    for obj in ("ce", "rce"):
        table = saved["models"][obj]
        assert list(table) == list(attacks)
        for attack in attacks:
            assert list(table[attack]) == list(DETECTORS)
            for det, m in table[attack].items():
                assert 0.0 <= m["robust_accuracy"] <= 1.0
                assert m["n_attacked"] == 20 and 0 <= m["n_adv_used"] <= 20
                for key in ("auroc", "tpr"):
                    v = m[key]
                    assert (v is None) == (m["n_adv_used"] == 0), (obj, attack, det, key)
                    assert v is None or 0.0 <= v <= 1.0, (obj, attack, det, key, v)
                assert 0.0 <= m["clean_fpr"] <= 1.0  # realised on the evaluation half
                fprs, acc = m["curve"]["fpr"], m["curve"]["robust_accuracy"]
                assert len(fprs) == len(acc) == 41 and all(0 <= a <= 1 for a in acc)
                assert acc[fprs.index(0.05)] == m["robust_accuracy"]
                assert all(b >= a for a, b in zip(acc, acc[1:]))  # more flags, more RA
    for attack in attacks:
        for det in DETECTORS:
            cells = [f"{v:.3f}" if v is not None else "n/a"
                     for obj in ("ce", "rce") for v in (
                         saved["models"][obj][attack][det][k]
                         for k in ("auroc", "tpr", "robust_accuracy"))]
            assert f"| {attack} | {det} | " + " | ".join(cells) + " |" in rows
    assert "robust accuracy at 5% FPR" in report and "odd positions" in report
    png = (out / "robust_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_defense_table_numbers_from_the_saved_files(tiny_run):
    """Robust accuracy and TPR of K-density against FGSM and OPGD, recomputed here from
    the saved model, detector and examples with plain NumPy (threshold: the order
    statistic on the even-position clean images; metrics on the odd positions)."""
    import numpy as np

    from rce_fast.data import load_digits_split
    from rce_fast.detect import KDensityDetector
    from rce_fast.experiment import _load_adversarial
    from rce_fast.train import load_classifier

    out, results, _ = tiny_run
    _, _, x_te, y_te = load_digits_split()
    x, y = x_te[:TINY["n_attack"]], y_te[:TINY["n_attack"]]
    model = load_classifier(out / "rce.pt", "cpu")
    det = KDensityDetector.load(out / "rce_detector.pt", "cpu")

    def kd(images):
        with torch.no_grad():
            z, f = model.logits_and_features(images)
        return z.argmax(1).numpy(), det.score(f, z.argmax(1)).double().numpy()

    _, held = kd(x[0::2])
    k = int(np.floor(0.05 * len(held)))
    t = np.sort(held)[k]
    assert results["defense"]["adaptive"]["rce"]["OPGD"]["threshold"] == pytest.approx(
        t, rel=1e-6)
    for attack, path, rows in (("FGSM", "rce_fgsm.pt", slice(1, None, 2)),
                               ("OPGD", "rce_opgd.pt", slice(None))):
        ref = x if attack == "FGSM" else x[1::2]
        adv = _load_adversarial(out / "adversarial" / path, ref)[0][rows]
        pred, s = kd(adv)
        truth = y[1::2].numpy()
        flagged = s < t
        m = results["defense"]["models"]["rce"][attack]["K-density"]
        assert m["robust_accuracy"] == pytest.approx(np.mean(flagged | (pred == truth)))
        wrong = pred != truth
        assert m["n_adv_used"] == int(wrong.sum())
        if wrong.any():
            assert m["tpr"] == pytest.approx(np.mean(flagged[wrong]))


def test_one_attacked_image_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="n_attack must be >= 2"):
        run_experiment(_tiny_cfg(tmp_path / "one", n_attack=1), log=lambda s: None)
    assert not (tmp_path / "one" / "state.json").exists()


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


def test_table3_rows_with_no_example_on_target_or_from_older_results(tiny_run):
    """The C&W-wb table reads the ratio among the examples on target: NaN (none on
    target) and a results dict written before that column existed both print n/a."""
    import copy
    _, results, _ = tiny_run
    models = copy.deepcopy(results["models"])
    models["ce"]["attacks"]["C&W-wb"].update(f2_positive_ratio=0.5,
                                             f2_positive_ratio_on_target=float("nan"),
                                             classified_as_target=0.0)
    models["rce"]["attacks"]["C&W-wb"].pop("f2_positive_ratio_on_target")
    models["rce"]["attacks"]["C&W-wb"].update(f2_positive_ratio=0.75,
                                              classified_as_target=0.25)
    report = render_report({**results, "models": models})
    rows = [line for line in report.splitlines() if line.startswith(("| CE |", "| RCE |"))
            and line.count("|") == 6]
    assert rows[0].startswith("| CE | 0.00 | n/a | 0.50 |"), rows
    assert rows[1].startswith("| RCE | 0.25 | n/a | 0.75 |"), rows


@pytest.mark.parametrize("fpr, error", [(1.0, ValueError), (-0.1, ValueError),
                                        (float("nan"), ValueError), ("0.05", TypeError),
                                        (True, TypeError)])
def test_a_defense_fpr_without_a_threshold_is_refused_before_any_work(tmp_path, fpr, error):
    """At FPR 1 every input is flagged and the adaptive attacks have no finite threshold:
    refused at the start, not after training and fitting."""
    from rce_fast.experiment import run_experiment
    out = tmp_path / "run"
    with pytest.raises(error, match="defense_fpr"):
        run_experiment(ExperimentConfig.demo(out=str(out), defense_fpr=fpr), log=lambda *a: None)
    assert not out.exists() or not any(out.iterdir())


def test_checkpoints_are_reused(tiny_run, tmp_path):
    out, _, _ = tiny_run
    cfg = ExperimentConfig.demo(out=str(tmp_path), n_attack=8, per_class=20, kernel_points=5,
                                cw_steps=5, cw_search=1, jsma_max_iterations=2, progress=False,
                                checkpoints={"ce": str(out / "ce.pt"),
                                             "rce": str(out / "rce.pt")},
                                wb_stage1=dict(max_iterations=3, binary_search_steps=1),
                                wb_stage2=dict(max_iterations=3, binary_search_steps=1),
                                pgd_steps=2, opgd_steps=2, baseline_fit_n=60, lid_batch=20,
                                lid_k=5)
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
     "argument --cw-c-init: must be in [2**-126, 3.4e38]"),
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
    # --n past the test set attacks all of it, and the file says so: evaluate reads it
    everything = tmp_path / "all.pt"
    assert main(["attack", "--checkpoint", str(ckpt), "--attack", "fgsm", "--n", "100000",
                 "--out", str(everything)]) == 0
    captured = capsys.readouterr()
    assert "--n 100000 is more than the 540 test images" in captured.err
    assert "fgsm: 540 examples" in captured.out
    saved = torch.load(everything, weights_only=False)
    assert saved["n"] == 540 and saved["x_adv"].shape == (540, 1, 8, 8)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--adversarial",
                 str(everything)]) == 0


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


# ------------------------------------------------------------- stopping and continuing

def _tiny_cfg(out, **over):
    return ExperimentConfig.demo(**{**TINY, "out": str(out), **over})


def _nth(kind, n):
    return lambda k, grants: k == kind and sum(g[0] == kind for g in grants) >= n - 1


def _comparable(results):
    """results.json without what differs between runs that computed the same thing:
    timings, the session log and the output folder."""
    r = json.loads(json.dumps(results))
    r.pop("sessions", None)
    r["config"].pop("out")
    for m in r["models"].values():
        m.pop("train_seconds")
        for entry in m["attacks"].values():
            entry.pop("seconds_per_example")
    for m in r["defense"]["adaptive"].values():
        for entry in m.values():
            entry.pop("seconds")
    return r


def _tensors(obj, path=""):
    """(path, tensor) for every tensor in nested dicts / lists (detector files hold
    lists of per-layer tensors and a dict for the regression)."""
    if torch.is_tensor(obj):
        yield path, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}/{i}")


def test_a_run_stopped_eight_times_gives_the_uninterrupted_results(tiny_run, tmp_path):
    """Stops inside CE training, inside CE's C&W, inside stage 2 of CE's C&W-wb, before
    CE's LID detector and its Orthogonal PGD (units of the defense table), between two
    RCE attacks and before RCE's defense table; every continuation reproduces the
    uninterrupted run, the defense table included."""
    from rce_fast._defense_table import ADAPTIVE_SLUGS, adaptive_rows
    from rce_fast.experiment import _load_adversarial
    from rce_fast.resume import Budget, StopRequested

    out0, straight, _ = tiny_run
    out = tmp_path / "run"
    train_kind = "train resnet8 batch 128"
    plan = [_nth(train_kind, 3), _nth("C&W", 2), _nth("C&W-wb stage 2", 2), _nth("LID", 1),
            _nth("attack OPGD", 1), _nth("attack BIM", 1), _nth("defense table", 1), None]
    seen = []
    for stop in plan:
        budget = Budget(max_chunk=8, chunk_seconds=float("inf"), stop_if=stop)
        try:
            resumed = run_experiment(_tiny_cfg(out), log=lambda s: None, budget=budget)
            seen.append("finished")
        except StopRequested:
            partial = sorted(p.name for p in (out / "partial").glob("*.pt"))
            seen.append((json.loads((out / "state.json").read_text())["sessions"][-1][
                "result"], partial))
            if len(seen) == 1:
                state = torch.load(out / "ce.pt", weights_only=True)
                assert state["step"] == 16 and "optimizer" in state
            if len(seen) == 3:
                assert torch.load(out / "partial" / "ce_cw-wb.pt",
                                  weights_only=True)["state"]["stage"] == 2
    assert seen == [("stopped: stop_if at 'train resnet8 batch 128'", []),
                    ("stopped: stop_if at 'C&W'", ["ce_cw.pt"]),
                    ("stopped: stop_if at 'C&W-wb stage 2'", ["ce_cw-wb.pt"]),
                    ("stopped: stop_if at 'LID'", []),
                    ("stopped: stop_if at 'attack OPGD'", []),
                    ("stopped: stop_if at 'attack BIM'", []),
                    ("stopped: stop_if at 'defense table'", []), "finished"]
    assert _comparable(resumed) == _comparable(straight)
    assert resumed["defense"]["models"] == straight["defense"]["models"]  # the table
    saved = json.loads((out / "results.json").read_text())
    assert _comparable(saved) == _comparable(json.loads((out0 / "results.json").read_text()))
    assert len(saved["sessions"]) == 8
    from rce_fast.data import load_digits_split
    x_att = load_digits_split()[2][:TINY["n_attack"]]
    for f in sorted((out0 / "adversarial").glob("*.pt")):
        if f.name.endswith("fit-bim.pt"):  # training images: stored against x_train
            ta, tb = (torch.load(p, weights_only=True) for p in (f, out / "adversarial" / f.name))
            pa, pb = list(_tensors(ta)), list(_tensors(tb))
            assert pa and len(pa) == len(pb)
            for (ka, va), (kb, vb) in zip(pa, pb):
                assert ka == kb and torch.equal(va, vb), (f.name, ka)
            continue
        # The adaptive attacks attack only the evaluation half: stored against those rows.
        ref = (x_att[adaptive_rows(_tiny_cfg(out), len(x_att))]
               if f.stem.split("_", 1)[1] in ADAPTIVE_SLUGS.values() else x_att)
        a, info_a = _load_adversarial(f, ref)
        b, info_b = _load_adversarial(out / "adversarial" / f.name, ref)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f.name
        for k, v in info_a.items():
            w = info_b[k]
            if torch.is_tensor(v):
                assert torch.equal(v, w), (f.name, k)
            else:  # a ratio over no examples is NaN in both
                assert v == w or (v != v and w != w), (f.name, k, v, w)
    for name in ("ce.pt", "rce.pt", "ce_detector.pt", "rce_detector.pt", "ce_lid.pt",
                 "rce_lid.pt", "ce_mahalanobis.pt", "rce_mahalanobis.pt"):
        a = torch.load(out0 / name, weights_only=True)
        b = torch.load(out / name, weights_only=True)
        ta = a["model"] if "model" in a else a
        tb = b["model"] if "model" in b else b
        pairs = list(zip(_tensors(ta), _tensors(tb)))
        assert pairs and len(pairs) == len(list(_tensors(ta)))
        for (ka, va), (kb, vb) in pairs:
            assert ka == kb and torch.equal(va, vb), (name, ka)
        assert "optimizer" not in a and "optimizer" not in b  # finished: the model only
    assert not (out / "partial").exists() and not list(out.rglob(".*.tmp"))


def test_a_folder_with_another_run_is_refused_unless_forced_or_restarted(tiny_run, tmp_path):
    import shutil

    from rce_fast.resume import Budget, ResumeMismatch, StopRequested

    out0, straight, _ = tiny_run
    out = tmp_path / "copy"
    shutil.copytree(out0, out)
    with pytest.raises(ResumeMismatch) as exc:
        run_experiment(_tiny_cfg(out, cw_steps=31, seed=2), log=lambda s: None)
    msg = str(exc.value)
    assert "cw_steps: 30 before, 31 now" in msg and "seed: 0 before, 2 now" in msg
    assert "--force-resume" in msg and "--restart" in msg
    before = (out / "ce.pt").read_bytes()
    lines = []
    forced = run_experiment(_tiny_cfg(out, cw_steps=31), log=lines.append, force_resume=True)
    assert any("changed settings" in line and "cw_steps" in line for line in lines)
    assert forced["forced_resumes"] == [["cw_steps: 30 before, 31 now"]]
    assert (out / "ce.pt").read_bytes() == before  # finished parts stay as they are
    assert forced["models"]["ce"]["attacks"]["C&W"]["auc"] == straight["models"]["ce"][
        "attacks"]["C&W"]["auc"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StopRequested):
        run_experiment(_tiny_cfg(out), log=lambda s: None, restart=True,
                       budget=Budget(stop_after=0))
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["ce.pt", "notes.txt", "state.json"]  # ce.pt: the stop's checkpoint
    assert torch.load(out / "ce.pt", weights_only=True)["step"] == 0
    state = json.loads((out / "state.json").read_text())
    assert state["units"] == {} and state["settings"]["cw_steps"] == 30


def test_damaged_kept_files_are_redone_not_fatal_at_the_report(tiny_run, tmp_path):
    """A state folder copied in parts can arrive cut: a damaged file of a finished attack
    is found before any work, dropped and redone (with the defense table built on it),
    and a damaged partial C&W state is started over; the results are the uninterrupted
    run's. Before, a cut attack file failed with a raw error at the report, after all
    other work, and a cut partial state with an OSError naming no file."""
    import shutil

    from rce_fast.resume import Budget, StopRequested

    out0, straight, _ = tiny_run
    out = tmp_path / "copy"
    shutil.copytree(out0, out)
    fgsm = out / "adversarial" / "ce_fgsm.pt"
    fgsm.write_bytes(fgsm.read_bytes()[:len(fgsm.read_bytes()) // 2])
    opgd = out / "adversarial" / "rce_opgd.pt"   # read only by a defense table to build
    opgd.write_bytes(b"")
    lines = []
    again = run_experiment(_tiny_cfg(out), log=lines.append)
    assert any("ce_fgsm.pt" in line and "redoing ce/FGSM" in line for line in lines), lines
    assert any("redoing ce/defense" in line for line in lines)
    assert not any("rce/OPGD" in line for line in lines)
    assert _comparable(again) == _comparable(straight)
    assert again["defense"]["models"] == straight["defense"]["models"]
    # a partial C&W state cut in half: that attack starts over, with the same result
    run = tmp_path / "run"
    with pytest.raises(StopRequested):
        run_experiment(_tiny_cfg(run), log=lambda s: None,
                       budget=Budget(max_chunk=8, chunk_seconds=float("inf"),
                                     stop_if=_nth("C&W", 2)))
    partial = run / "partial" / "ce_cw.pt"
    partial.write_bytes(partial.read_bytes()[:len(partial.read_bytes()) // 2])
    assert _comparable(run_experiment(_tiny_cfg(run), log=lambda s: None)) == \
        _comparable(straight)


def test_which_kept_units_are_redone(tmp_path):
    """_redo_unreadable_units on a hand-made state: with other attacked images (another
    n_attack), every paper attack and the defense table are redone, and so are the
    adaptive attacks even where their rows are the same images (adaptive_n): their
    threshold came from the other half of the old attacked set. With the same images,
    only a damaged file's unit is redone, and a finished defense table keeps its inputs."""
    import types

    from rce_fast._defense_table import ADAPTIVE_ATTACKS, ADAPTIVE_SLUGS, adaptive_rows
    from rce_fast.experiment import (ATTACK_SLUGS, _redo_unreadable_units,
                                     _save_adversarial)

    g = torch.Generator().manual_seed(0)
    x_tr, x_old = torch.rand(50, 1, 4, 4, generator=g), torch.rand(40, 1, 4, 4, generator=g)
    cfg = _tiny_cfg(tmp_path, adaptive_n=6, baseline_fit_n=20)

    def state(x_att, defense: bool, record_n: bool = True):
        run = types.SimpleNamespace(out=tmp_path, units={}, save=lambda: None)
        for obj in ("ce", "rce"):
            for name in ATTACKS:
                _save_adversarial(tmp_path / "adversarial" / f"{obj}_{ATTACK_SLUGS[name]}.pt",
                                  x_att + 0.01, x_att, None, 1.0)
                run.units[f"{obj}/{name}"] = {}
            rows = adaptive_rows(cfg, len(x_att))
            for name in ADAPTIVE_ATTACKS:
                _save_adversarial(tmp_path / "adversarial" / f"{obj}_{ADAPTIVE_SLUGS[name]}.pt",
                                  x_att[rows], x_att[rows], None, 1.0)
                run.units[f"{obj}/{name}"] = {"n_attack": len(x_att)} if record_n else {}
            _save_adversarial(tmp_path / "adversarial" / f"{obj}_fit-bim.pt", x_tr[:20],
                              x_tr[:20], None, 1.0)
            run.units[f"{obj}/baseline-fit"] = {}
            if defense:
                run.units[f"{obj}/defense"] = {}
        return run

    x_new = x_old[:30]                                   # n_attack 40 -> 30
    assert adaptive_rows(cfg, 40).tolist() == adaptive_rows(cfg, 30).tolist()  # same rows
    for record_n in (True, False):
        run, lines = state(x_old, defense=True, record_n=record_n), []
        _redo_unreadable_units(cfg, run, x_tr, x_new, lines.append)
        assert sorted(run.units) == ["ce/baseline-fit", "rce/baseline-fit"], lines
    run, lines = state(x_old, defense=False), []           # same images: nothing redone
    _redo_unreadable_units(cfg, run, x_tr, x_old, lines.append)
    assert len(run.units) == 2 * (len(ATTACKS) + len(ADAPTIVE_ATTACKS) + 1) and not lines
    run, lines = state(x_old, defense=True), []
    (tmp_path / "adversarial" / "rce_opgd.pt").write_bytes(b"PK\x03\x04cut")  # not read
    (tmp_path / "adversarial" / "ce_jsma.pt").write_bytes(b"")
    _redo_unreadable_units(cfg, run, x_tr, x_old, lines.append)
    assert "ce/JSMA" not in run.units and "ce/defense" not in run.units
    assert "rce/OPGD" in run.units and "rce/defense" in run.units
    assert all(f"ce/{a}" in run.units for a in ADAPTIVE_ATTACKS)  # same images: kept
    assert not (tmp_path / "adversarial" / "ce_jsma.pt").exists()
    assert len(lines) == 2 and "ce_jsma.pt" in lines[0]


def test_training_begun_on_a_gpu_continues_on_a_cpu(tmp_path):
    """amp (bf16 autocast) is on for training on CUDA; a state folder stopped during
    training on a GPU and continued on a CPU keeps the setting it began with, instead of
    having its own checkpoint refused as a run of other settings."""
    from rce_fast.resume import Budget, StopRequested

    out = tmp_path / "run"
    with pytest.raises(StopRequested):
        run_experiment(_tiny_cfg(out), log=lambda s: None,
                       budget=Budget(max_chunk=8, chunk_seconds=float("inf"),
                                     stop_if=_nth("train resnet8 batch 128", 2)))
    state = torch.load(out / "ce.pt", weights_only=True)
    state["config"]["amp"] = True       # as a CUDA session writes it
    torch.save(state, out / "ce.pt")
    lines = []
    with pytest.raises(StopRequested):   # past the point of the refusal, then stopped
        run_experiment(_tiny_cfg(out), log=lines.append,
                       budget=Budget(max_chunk=8, chunk_seconds=float("inf"),
                                     stop_if=_nth("train resnet8 batch 128", 2)))
    assert any("ce.pt began with amp=True" in line for line in lines), lines
    assert torch.load(out / "ce.pt", weights_only=True)["step"] == 16


def test_forced_on_with_another_n_attack_redoes_the_attacks(tiny_run, tmp_path):
    """--force-resume with another n_attack keeps the models and detectors and redoes
    every attack on the new images (before, it failed at the report with a raw size
    mismatch after all other work)."""
    import shutil

    out0, _, _ = tiny_run
    out = tmp_path / "copy"
    shutil.copytree(out0, out)
    before = (out / "ce.pt").read_bytes()
    lines = []
    forced = run_experiment(_tiny_cfg(out, n_attack=30), log=lines.append,
                            force_resume=True)
    assert (out / "ce.pt").read_bytes() == before
    from rce_fast._defense_table import ADAPTIVE_ATTACKS
    # per model: the attacks, the defense table, and the adaptive attacks (other rows)
    assert sum("redoing" in line for line in lines) == 2 * (len(ATTACKS) + 1 +
                                                            len(ADAPTIVE_ATTACKS))
    fresh = run_experiment(_tiny_cfg(tmp_path / "fresh", n_attack=30), log=lambda s: None)
    for obj in ("ce", "rce"):
        for name in ATTACKS:
            a, b = forced["models"][obj]["attacks"][name], fresh["models"][obj]["attacks"][name]
            # NaN (no pair) compares equal as JSON text
            assert json.dumps(a["auc"]) == json.dumps(b["auc"]), (obj, name)
            assert a["pairs"] == b["pairs"], (obj, name)
    assert json.dumps(forced["defense"]["models"]) == json.dumps(fresh["defense"]["models"])


@pytest.mark.parametrize("argv", [
    ["demo", "--out", "{f}/sub"],
    ["reproduce", "--dataset", "mnist", "--data-dir", "x", "--out", "{f}"],
    ["train", "--out", "{f}/m.pt", "--steps", "1"],
    ["train", "--out", "{d}", "--steps", "1"],
    ["attack", "--checkpoint", "c.pt", "--attack", "fgsm", "--out", "{f}/a.pt"],
])
def test_an_unwritable_output_fails_before_any_work(argv, tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    named = tmp_path if any("{d}" in a for a in argv) else afile
    assert main([a.format(f=afile, d=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(named) in err
    assert afile.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_train_refusal_and_resume_flags_on_the_command_line(tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    args = ["train", "--model", "resnet8", "--steps", "2", "--out", str(ckpt), "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args[:-1] + ["--objective", "ce", "--seed", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "objective: 'rce' before, 'ce' now" in err
    assert "seed: 0 before, 4 now" in err and "--force-resume" in err
    assert main(args + ["--objective", "ce", "--restart"]) == 0
    assert torch.load(ckpt, weights_only=True)["config"]["objective"] == "ce"
    with pytest.raises(SystemExit) as exc:
        main(args + ["--restart", "--force-resume"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_time_budget_option_is_checked():
    for bad in ("0", "-3", "inf", "nan"):
        with pytest.raises(SystemExit):
            main(["demo", "--time-budget", bad])
