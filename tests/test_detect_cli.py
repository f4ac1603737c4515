"""rce-fast fit-detector / detect / attack (adaptive), the block readers behind detect,
and detect under torchrun (2 CPU processes, gloo)."""
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from rce_fast.cli import main
from rce_fast.data import load_digits_split
from rce_fast.detect import threshold_at_fpr
from rce_fast.detect.bundle import load_detector, model_fingerprint
from rce_fast.streaming import _Mapped, _ZipStream, open_array
from rce_fast.train import load_classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained RCE ResNet-8 on digits and the three detectors fitted on it."""
    root = tmp_path_factory.mktemp("cli")
    ckpt = root / "rce.pt"
    assert main(["train", "--objective", "rce", "--model", "resnet8", "--steps", "20",
                 "--out", str(ckpt), "--quiet"]) == 0
    files = {}
    for kind, extra in (("kdensity", ["--per-class", "20", "--kernel-points", "10"]),
                        ("lid", ["--n-regression", "80", "--k", "10", "--lid-batch", "40"]),
                        ("mahalanobis", ["--n-regression", "80", "--noise", "0.005"])):
        files[kind] = root / f"{kind}.pt"
        assert main(["fit-detector", "--checkpoint", str(ckpt), "--out", str(files[kind]),
                     "--kind", kind, "--n-calibration", "150", "--n-fit", "400",
                     "--quiet", *extra]) == 0
    _, _, x, y = load_digits_split()
    return root, ckpt, files, x, y


def test_fit_detector_files(trained):
    root, ckpt, files, _, _ = trained
    model = load_classifier(ckpt)
    for kind, path in files.items():
        f = load_detector(path)
        assert f.kind == kind and f.fpr == 0.05
        assert f.model_fingerprint == model_fingerprint(model)
        cal = f.calibration_scores
        assert len(cal) == 150 and torch.equal(cal, cal.sort().values)
        assert f.threshold == threshold_at_fpr(cal, 0.05) == f.detector.threshold
        assert f.meta["checkpoint"] == str(ckpt) and f.meta["n_calibration"] == 150
    kd = load_detector(files["kdensity"]).detector
    assert kd.median_index is not None and kd.medians.shape == (10,)
    assert torch.bincount(kd.bank_labels).tolist() == [20] * 10
    assert load_detector(files["lid"]).meta["n_fit"] == 400


def _write_inputs(root, x):
    """The same images as .npy (uint8, N x H x W), .npz stored, .npz compressed (N, H, W,
    C floats), and a dict .pt like `rce-fast attack` writes."""
    u8 = ((x.numpy() + 0.5) * 255).round().astype(np.uint8)
    paths = {"npy": root / "imgs.npy", "npz": root / "imgs.npz",
             "npz_c": root / "imgs_c.npz", "pt": root / "imgs.pt"}
    np.save(paths["npy"], u8[:, 0])
    np.savez(paths["npz"], images=u8, labels=np.arange(len(u8)))
    np.savez_compressed(paths["npz_c"], images=x.numpy().transpose(0, 2, 3, 1))
    torch.save({"x_adv": x, "labels": torch.arange(len(x))}, paths["pt"])
    return paths, torch.from_numpy(u8.astype(np.float32) / 255.0 - 0.5)


def test_detect_every_format_and_the_fpr_option(trained):
    root, ckpt, files, x, _ = trained
    x = x[:300]
    paths, x_u8 = _write_inputs(root, x)
    model = load_classifier(ckpt)
    f = load_detector(files["kdensity"])
    results = {}
    for name, path in paths.items():
        out = root / f"scores_{name}.npz"
        assert main(["detect", "--checkpoint", str(ckpt), "--detector",
                     str(files["kdensity"]), "--input", str(path), "--out", str(out),
                     "--batch-size", "64", "--quiet"]) == 0
        with np.load(out) as z:
            results[name] = {k: z[k] for k in z.files}
        assert not (root / f".scores_{name}.npz.parts").exists()
    for name, images in (("npy", x_u8), ("npz", x_u8), ("npz_c", x), ("pt", x)):
        r = results[name]
        assert r["score"].shape == (300,) and r["prediction"].dtype == np.int64
        with torch.no_grad():
            z, feats = model.logits_and_features(images)
            want = f.detector.score(feats, z.argmax(1)).double().numpy()
        np.testing.assert_allclose(r["score"], want, rtol=1e-5, atol=1e-5)
        assert np.array_equal(r["prediction"], z.argmax(1).numpy())
        assert np.array_equal(r["flagged"], r["score"] < r["threshold"])
        assert float(r["threshold"]) == f.threshold and np.isnan(r["fpr"])
    assert np.array_equal(results["npy"]["score"], results["npz"]["score"])
    out = root / "scores_fpr.npz"
    assert main(["detect", "--checkpoint", str(ckpt), "--detector", str(files["lid"]),
                 "--input", str(paths["pt"]), "--out", str(out), "--fpr", "0.2",
                 "--quiet"]) == 0
    with np.load(out) as z:
        assert float(z["threshold"]) == load_detector(files["lid"]).threshold_for(0.2)
        assert float(z["fpr"]) == 0.2


def test_adaptive_attacks_from_the_command_line(trained, capsys):
    root, ckpt, files, _, y = trained
    outs = {}
    for attack, extra in (("pgd", []), ("pgd", ["--detector", str(files["kdensity"])]),
                          ("opgd", ["--detector", str(files["mahalanobis"])]),
                          ("cw-wb", ["--detector", str(files["kdensity"]),
                                     "--cw-steps", "10", "--cw-search", "1"])):
        out = root / f"{attack}{len(extra)}.pt"
        assert main(["attack", "--checkpoint", str(ckpt), "--attack", attack, "--n", "16",
                     "--eps", "0.2", "--steps", "5", "--out", str(out), *extra]) == 0
        outs[(attack, bool(extra))] = torch.load(out, weights_only=False)
    text = capsys.readouterr().out
    assert "robust accuracy" in text and "flagged" in text
    for (attack, aware), saved in outs.items():
        assert saved["x_adv"].shape == (16, 1, 8, 8) and saved["attack"] == attack
        assert torch.equal(saved["labels"], y[:16])
        assert (saved["x_adv"].abs() <= 0.5 + 1e-6).all()
    assert outs[("pgd", True)]["threshold"] == load_detector(files["kdensity"]).threshold
    assert "flagged" in outs[("pgd", True)]["info"] and "f2" in outs[("cw-wb", True)]["info"]
    wb = outs[("cw-wb", True)]["info"]  # the printed Table 3 reading matches the file
    on = wb["classified_as_target"]
    ratio = "n/a" if not on.any() else f"{float((wb['f2'][on] > 0).float().mean()):.2f}"
    assert f"{on.double().mean().item():.1%} on target, f2 > 0 among them: {ratio}" in text
    # the saved files feed `rce-fast evaluate` like the paper's attacks
    assert main(["evaluate", "--checkpoint", str(ckpt), "--adversarial",
                 str(root / "pgd2.pt")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["detect", "--input", "missing.npy"], "input file missing.npy not found"),
    (["detect", "--input", "{pt}", "--key", "nope"], "has no array 'nope'"),
    (["detect", "--input", "{nan}"], "NaN or inf values (row 2)"),
    (["detect", "--input", "{bad_shape}"], "images must be (N, H, W)"),
    (["attack", "--attack", "opgd"], "needs --detector"),
    (["attack", "--attack", "cw-wb", "--detector", "{lid}"], "cw-wb attacks the K-density"),
    (["detect", "--input", "{pt}", "--detector", "{other_model}"], "different model"),
    # a damaged compressed member fails with its name, not zlib's traceback
    (["detect", "--input", "{damaged}"], "damaged.npz: images.npy is corrupt"),
    # pixels outside every supported range are refused, not scored as something else
    (["detect", "--input", "{minus_one_to_one}"],
     "outside the auto-detected centered range [-0.5, 0.5]"),
    (["detect", "--input", "{twelve_bit}"], "outside the auto-detected uint8 range [0, 255]"),
    (["detect", "--input", "{u8}", "--scale", "unit"], "from 0 to 255, outside the unit range"),
    (["detect", "--input", "{complex}"], "must hold integers or floats, got complex64"),
    # a detector without a fingerprint, fitted on other classes: refused before any work
    (["detect", "--input", "{pt}", "--detector", "{three_classes}"],
     "does not fit --checkpoint"),
    (["detect", "--input", "{pt}", "--detector", "{twelve_classes}"],
     "the model has 10 classes but the detector's bank has 12"),
    (["detect", "--input", "{pt}", "--out", "{pt}"], "would replace that input"),
    (["detect", "--input", "{pt}", "--out", "{ckpt}"], "is also --checkpoint"),
    (["detect", "--input", "{pt}", "--out", "{long_name}"], "choose a shorter --out name"),
    (["detect", "--input", "{pt}", "--out", "{too_long_name}"], "cannot be"),
])
def test_user_errors_are_one_line_and_exit_2(trained, capsys, argv, message):
    root, ckpt, files, x, _ = trained
    _bad_inputs(root, ckpt, x)
    nan = x[:5].clone().numpy()
    nan[2, 0, 3, 3] = np.nan
    np.save(root / "nan.npy", nan)
    np.save(root / "bad_shape.npy", np.zeros((4, 5, 8, 8), np.float32))
    torch.save({"x_adv": x[:10]}, root / "imgs10.pt")
    other = load_detector(files["kdensity"])
    other_path = root / "other.pt"
    payload = torch.load(files["kdensity"], weights_only=True)
    payload["model_fingerprint"] = "0" * 64
    torch.save(payload, other_path)
    fill = {"pt": root / "imgs10.pt", "nan": root / "nan.npy",
            "bad_shape": root / "bad_shape.npy", "lid": files["lid"],
            "other_model": other_path, "ckpt": ckpt, "long_name": root / ("a" * 250),
            "too_long_name": root / ("a" * 300)}
    fill.update({k: root / v for k, v in _BAD_INPUTS.items()})
    argv = [a.format(**fill) for a in argv]
    command = argv[0]
    rest = argv[1:]
    base = ["--checkpoint", str(ckpt)]
    if command == "detect":
        if "--detector" not in rest:
            base += ["--detector", str(files["kdensity"])]
        if "--out" not in rest:
            base += ["--out", str(root / "err.npz")]
        base += ["--quiet"]
    else:
        base += ["--n", "4", "--out", str(root / "err.pt")]
    capsys.readouterr()
    assert main([command, *base, *rest]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (root / "err.npz").exists() and not (root / ".err.npz.parts").exists()
    assert other.kind == "kdensity"
    assert not list(root.glob(".*.parts")) and not list(root.glob("*tmp*"))
    assert (root / "imgs10.pt").is_file() and load_classifier(ckpt) is not None


_BAD_INPUTS = {"damaged": "damaged.npz", "minus_one_to_one": "pm1.npy",
               "twelve_bit": "u16.npy", "u8": "u8.npy", "complex": "complex.npy",
               "three_classes": "kd3.pt", "twelve_classes": "kd12.pt"}


def _bad_inputs(root, ckpt, x):
    """The files of _BAD_INPUTS in ``root`` (made once)."""
    if (root / "kd12.pt").exists():
        return
    from rce_fast import KDensityDetector
    imgs = x[:40].numpy()
    rng = np.random.default_rng(0)
    np.savez_compressed(root / "damaged.npz",
                        images=rng.uniform(0, 1, (400, 1, 8, 8)).astype(np.float32))
    info = zipfile.ZipFile(root / "damaged.npz").getinfo("images.npy")
    raw = bytearray((root / "damaged.npz").read_bytes())
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + \
        info.compress_size // 2
    raw[at] ^= 0xFF
    (root / "damaged.npz").write_bytes(bytes(raw))
    np.save(root / "pm1.npy", imgs * 2)
    np.save(root / "u16.npy", ((imgs + 0.5) * 4095).astype(np.uint16))
    np.save(root / "u8.npy", ((imgs + 0.5) * 255).round().astype(np.uint8))
    np.save(root / "complex.npy", imgs.astype(np.complex64))
    model = load_classifier(ckpt)
    with torch.no_grad():
        feats = model.features(x[:120])
    for classes, name in ((3, "kd3.pt"), (12, "kd12.pt")):
        det = KDensityDetector(per_class=5, seed=0).fit(
            feats, torch.arange(len(feats)) % classes, num_classes=classes)
        det.threshold = -3.0
        det.save(root / name)


def test_block_readers(tmp_path):
    a = np.arange(7 * 3 * 4, dtype=np.float32).reshape(7, 3, 4)
    np.savez(tmp_path / "s.npz", images=a, other=np.ones(2))
    np.savez_compressed(tmp_path / "c.npz", images=a)
    np.save(tmp_path / "a.npy", a)
    torch.save(torch.from_numpy(a), tmp_path / "t.pt")
    torch.save(torch.from_numpy(a), tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    stored = open_array(tmp_path / "s.npz")
    assert isinstance(stored, _Mapped) and isinstance(stored.array, np.memmap)
    compressed = open_array(tmp_path / "c.npz")
    assert isinstance(compressed, _ZipStream)
    for src in (stored, compressed, open_array(tmp_path / "a.npy"),
                open_array(tmp_path / "t.pt"), open_array(tmp_path / "legacy.pt")):
        assert src.shape == (7, 3, 4) and len(src) == 7
        for lo, hi in ((2, 5), (0, 1), (5, 7), (1, 3)):   # backwards too
            assert np.array_equal(src.read(lo, hi), a[lo:hi])
        src.close()
    with zipfile.ZipFile(tmp_path / "s.npz") as zf:
        assert zf.getinfo("images.npy").compress_type == zipfile.ZIP_STORED
    np.savez_compressed(tmp_path / "f.npz", images=np.asfortranarray(a))
    with pytest.raises(ValueError, match="Fortran order"):
        open_array(tmp_path / "f.npz")
    with pytest.raises(ValueError, match="must be .npy, .npz or .pt"):
        (tmp_path / "x.txt").write_text("1")
        open_array(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="holds \\['a', 'b'\\]"):
        np.savez(tmp_path / "two.npz", a=a, b=a)
        open_array(tmp_path / "two.npz")
    # a tensor saved while it required grad is read like any other
    torch.save({"x_adv": torch.from_numpy(a).requires_grad_(True)}, tmp_path / "g.pt")
    assert np.array_equal(open_array(tmp_path / "g.pt").read(0, 7), a)


def test_the_range_scan_reads_bounded_blocks(tmp_path, monkeypatch):
    """The pre-scan (min, max, NaN) reads at most SCAN_BYTES of rows at a time, whatever
    the row size, and finds the range and the first bad row across block edges."""
    from rce_fast import streaming
    a = np.random.default_rng(0).uniform(-0.5, 0.5, (50, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    src = open_array(tmp_path / "a.npy")
    sizes = []
    real = src.read
    src.read = lambda i, j: sizes.append(j - i) or real(i, j)
    monkeypatch.setattr(streaming, "SCAN_BYTES", 7 * a[0].nbytes + 5)
    assert streaming.scan_range(src, 3, 50) == (float(a[3:].min()), float(a[3:].max()))
    assert max(sizes) == 7 and sum(sizes) == 47
    monkeypatch.setattr(streaming, "SCAN_BYTES", 1)  # a row larger than the block: 1 row
    sizes.clear()
    a[33, 2, 5, 5] = np.inf
    np.save(tmp_path / "a.npy", a)
    src = open_array(tmp_path / "a.npy")
    with pytest.raises(ValueError, match="row 33"):
        streaming.scan_range(src, 0, 50)


def test_detect_under_torchrun_writes_one_merged_file(trained):
    """`rce-fast detect` under torchrun: 2 CPU processes (gloo) each score half the input;
    the merged file equals the single-process one."""
    root, ckpt, files, x, _ = trained
    np.save(root / "run.npy", x[:101].numpy())        # odd: the shards differ in size
    single = root / "single.npz"
    assert main(["detect", "--checkpoint", str(ckpt), "--detector", str(files["kdensity"]),
                 "--input", str(root / "run.npy"), "--out", str(single), "--quiet"]) == 0
    merged = root / "merged.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_port=29533", "-m", "rce_fast", "detect", "--checkpoint", str(ckpt),
         "--detector", str(files["kdensity"]), "--input", str(root / "run.npy"), "--out",
         str(merged), "--batch-size", "16", "--quiet"],
        capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("detect: 101 inputs") == 1      # rank 0 reports
    with np.load(single) as a, np.load(merged) as b:
        assert a.files == b.files
        np.testing.assert_allclose(b["score"], a["score"], rtol=1e-6, atol=1e-6)
        assert np.array_equal(a["prediction"], b["prediction"])
        assert np.array_equal(b["flagged"], b["score"] < b["threshold"])
    assert not (root / ".merged.npz.parts").exists()


def _budget_factory(monkeypatch, **fixed):
    """Make `rce-fast` build its Budget with ``fixed`` settings (one block per grant and
    a deterministic stop), as a test's stop point."""
    from rce_fast import resume
    real = resume.Budget
    made = []

    def factory(seconds=None, **kw):
        made.append(real(seconds, **{**kw, **fixed}))
        return made[-1]
    monkeypatch.setattr(resume, "Budget", factory)
    return made


def _assert_same_npz(path_a, path_b):
    """The two .npz files hold the same members with the same bits."""
    with np.load(path_a) as a, np.load(path_b) as b:
        assert a.files == b.files
        for k in a.files:
            assert np.array_equal(a[k], b[k], equal_nan=True), k


def _done(parts, rank=0):
    """Rows a process recorded as scored in a detect parts folder."""
    return json.loads((parts / f"rank{rank}_progress.json").read_text())["done"]


def test_detect_stopped_and_continued_gives_the_uninterrupted_file(trained, monkeypatch,
                                                                    capsys):
    """A detect run stopped twice (after 2 blocks each time) and then run to the end writes
    the file of an uninterrupted run, bit for bit; the kept parts are then removed."""
    root, ckpt, files, x, _ = trained
    np.save(root / "stop.npy", x[:300].numpy())          # 5 blocks of 64
    base = ["detect", "--checkpoint", str(ckpt), "--detector", str(files["kdensity"]),
            "--input", str(root / "stop.npy"), "--batch-size", "64"]
    full = root / "full.npz"
    assert main([*base, "--out", str(full), "--quiet"]) == 0
    out = root / "stopped.npz"
    parts = root / ".stopped.npz.parts"
    with monkeypatch.context() as m:
        _budget_factory(m, max_chunk=1, stop_after=2)
        for rows in (128, 256):
            assert main([*base, "--out", str(out), "--quiet"]) == 3
            assert "not finished, run the same command again" in capsys.readouterr().err
            assert not out.exists()
            progress = json.loads((parts / "rank0_progress.json").read_text())
            assert progress["done"] == rows
    assert main([*base, "--out", str(out)]) == 0
    assert "continuing: 256 of 300 inputs" in capsys.readouterr().out
    assert not parts.exists()
    _assert_same_npz(full, out)


def test_detect_scans_its_input_once_across_stops(trained, monkeypatch, capsys):
    """The pixel range found by the first run is kept with its progress: a continued run
    does not read the whole input again before scoring (on a large input under a short
    time budget that pass alone could use the budget up)."""
    from rce_fast import streaming
    root, ckpt, files, x, _ = trained
    np.save(root / "scan.npy", x[:200].numpy())
    base = ["detect", "--checkpoint", str(ckpt), "--detector", str(files["kdensity"]),
            "--input", str(root / "scan.npy"), "--batch-size", "64", "--quiet"]
    scans = []
    real = streaming.scan_range
    monkeypatch.setattr(streaming, "scan_range",
                        lambda *a, **k: scans.append(a[1:3]) or real(*a, **k))
    out = root / "scan.npz"
    with monkeypatch.context() as m:
        _budget_factory(m, max_chunk=1, stop_after=1)
        assert main([*base, "--out", str(out)]) == 3
    assert scans == [(0, 200)]
    assert main([*base, "--out", str(out)]) == 0 and scans == [(0, 200)]
    assert not (root / ".scan.npz.parts").exists()
    assert main([*base, "--out", str(root / "scan_full.npz")]) == 0
    _assert_same_npz(out, root / "scan_full.npz")
    with monkeypatch.context() as m:
        _budget_factory(m, max_chunk=1, stop_after=1)
        assert main([*base, "--out", str(out)]) == 3
    assert len(scans) == 3
    np.save(root / "scan.npy", x[:200].numpy() * 0.5)  # other pixels: scanned anew
    assert main([*base, "--out", str(out), "--restart"]) == 0
    assert len(scans) == 4


def test_a_kept_pixel_range_is_not_reused_after_the_input_changed(trained, monkeypatch,
                                                                   capsys):
    """A run stopped right after its scan keeps the range (nothing scored yet). The input
    is known by a sampled hash; pixels changed in place between its samples also change
    the file's time stamp, which the kept range is keyed on too: the next run scans again
    and refuses the new out-of-range pixel instead of clipping it."""
    root, ckpt, files, x, _ = trained
    big = np.random.default_rng(5).uniform(-0.5, 0.5, (24000, 1, 8, 8)).astype(np.float32)
    path = root / "inplace.npy"
    np.save(path, big)
    args = ["detect", "--checkpoint", str(ckpt), "--detector", str(files["kdensity"]),
            "--input", str(path), "--out", str(root / "inplace.npz"), "--quiet"]
    with monkeypatch.context() as m:
        _budget_factory(m, stop_after=0)
        assert main(args) == 3
    assert list((root / ".inplace.npz.parts").glob("rank0_range.json"))
    # a pixel whose bytes lie outside every sample the file id hashes (_file_id)
    size, header = path.stat().st_size, path.stat().st_size - big.nbytes
    read = [(0, 1 << 20), (size - (1 << 20), size)] + \
        [(size * k // 17, size * k // 17 + (1 << 16)) for k in range(1, 17)]
    row = next(r for r in range(len(big))
               if not any(a <= header + r * 256 + 108 < b for a, b in read))  # pixel (3, 3)
    mm = np.load(path, mmap_mode="r+")
    mm[row, 0, 3, 3] = 0.9
    mm.flush()
    del mm
    capsys.readouterr()
    assert main(args) == 2
    assert "pixels range from" in capsys.readouterr().err
    assert not (root / ".inplace.npz.parts").exists()


def test_a_failed_merge_leaves_no_temporary_file(trained, monkeypatch, capsys):
    """The merged .npz is written through a temporary file that is removed when the write
    fails (a full disk, here), and the error names --out; the scores stay in the parts,
    so the same command finishes once there is room."""
    import errno

    from numpy.lib import format as npy
    root, ckpt, files, x, _ = trained
    np.save(root / "merge.npy", x[:70].numpy())
    args = ["detect", "--checkpoint", str(ckpt), "--detector", str(files["kdensity"]),
            "--input", str(root / "merge.npy"), "--out", str(root / "merge.npz"), "--quiet"]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(npy, "write_array_header_2_0", full)
        capsys.readouterr()
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "No space left on device" in err
    assert not (root / "merge.npz").exists()
    assert not [p for p in root.iterdir() if "merge.npz" in p.name and "tmp" in p.name]
    assert _done(root / ".merge.npz.parts") == 70
    assert main(args) == 0 and not (root / ".merge.npz.parts").exists()


def test_detect_stops_on_sigterm_and_refuses_other_settings(trained, monkeypatch, capsys):
    """SIGTERM during `detect` stops it at the next block (exit 3, the scores kept). A
    re-run with another --fpr continues (the flags are recomputed from the kept scores);
    one with another --batch-size is refused, naming it, and --restart starts over."""
    import os
    import signal
    root, ckpt, files, x, _ = trained
    np.save(root / "term.npy", x[:200].numpy())
    base = ["detect", "--checkpoint", str(ckpt), "--detector", str(files["kdensity"]),
            "--input", str(root / "term.npy")]
    out = root / "term.npz"

    def terminate_at_third(kind, grants):
        if len(grants) == 2:
            os.kill(os.getpid(), signal.SIGTERM)   # the handler detect installed
        return False
    with monkeypatch.context() as m:
        _budget_factory(m, max_chunk=1, stop_if=terminate_at_third)
        assert main([*base, "--batch-size", "50", "--out", str(out), "--quiet"]) == 3
    assert "SIGTERM received" in capsys.readouterr().err
    parts = root / ".term.npz.parts"
    assert _done(parts) == 100
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # restored
    # another batch size would give other blocks: refused, nothing touched
    assert main([*base, "--batch-size", "40", "--out", str(out), "--fpr", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "other settings (batch_size: 50 before, 40 now)" in err and "--restart" in err
    assert _done(parts) == 100
    with monkeypatch.context() as m:   # stop again, then finish with another --fpr
        _budget_factory(m, max_chunk=1, stop_after=1)
        assert main([*base, "--batch-size", "50", "--out", str(out), "--quiet"]) == 3
    assert main([*base, "--batch-size", "50", "--out", str(out), "--fpr", "0.2"]) == 0
    assert "continuing: 150 of 200" in capsys.readouterr().out
    fresh = root / "term_fresh.npz"
    assert main([*base, "--batch-size", "50", "--out", str(fresh), "--fpr", "0.2",
                 "--quiet"]) == 0
    with np.load(fresh) as a:
        assert a["flagged"].any() and not a["flagged"].all()
    _assert_same_npz(fresh, out)


def test_detect_knows_its_input_by_content(trained, monkeypatch, capsys):
    """The kept scores belong to the input's content, not its name or time stamp: the
    same bytes copied elsewhere continue, other bytes of the same size are refused."""
    import shutil
    root, ckpt, files, x, _ = trained
    a_path, b_path = root / "content_a.npy", root / "content_b.npy"
    np.save(a_path, x[:90].numpy())
    np.save(b_path, x[90:180].numpy())
    assert a_path.stat().st_size == b_path.stat().st_size
    base = ["detect", "--checkpoint", str(ckpt), "--detector", str(files["kdensity"]),
            "--batch-size", "30", "--out", str(root / "content.npz"), "--quiet"]
    with monkeypatch.context() as m:
        _budget_factory(m, max_chunk=1, stop_after=1)
        assert main([*base, "--input", str(a_path)]) == 3
    capsys.readouterr()
    assert main([*base, "--input", str(b_path)]) == 2
    assert "input:" in capsys.readouterr().err
    moved = root / "moved" / "content_a.npy"
    moved.parent.mkdir()
    shutil.copy(a_path, moved)                    # another path and time stamp
    assert main([*base, "--input", str(moved)]) == 0


def test_detect_time_budget_too_small_keeps_earlier_scores(trained, monkeypatch, capsys):
    root, ckpt, files, x, _ = trained
    np.save(root / "small.npy", x[:120].numpy())
    base = ["detect", "--checkpoint", str(ckpt), "--detector", str(files["kdensity"]),
            "--input", str(root / "small.npy"), "--batch-size", "40", "--quiet"]
    out = root / "small.npz"
    with monkeypatch.context() as m:
        _budget_factory(m, max_chunk=1, stop_after=1)
        assert main([*base, "--out", str(out)]) == 3
    parts = root / ".small.npz.parts"
    assert _done(parts) == 40
    capsys.readouterr()
    # a budget already spent before the first block: an error (exit 2), the parts stay
    with monkeypatch.context() as m:
        _budget_factory(m, spent=1e6)
        assert main([*base, "--out", str(out), "--time-budget", "5"]) == 2
    assert "too small" in capsys.readouterr().err
    assert _done(parts) == 40
    # --restart overwrites the kept scores: when that run ends before scoring anything,
    # no record of the old scores may survive it
    with monkeypatch.context() as m:
        _budget_factory(m, spent=1e6)
        assert main([*base, "--out", str(out), "--restart", "--time-budget", "5"]) == 2
    assert not parts.exists()
    assert main([*base, "--out", str(out)]) == 0 and not parts.exists()
    fresh = root / "small_fresh.npz"
    assert main([*base, "--out", str(fresh)]) == 0
    _assert_same_npz(fresh, out)


_STOP_RANK0 = """
import os, sys
from rce_fast import resume
real = resume.Budget
def factory(seconds=None, **kw):  # one block per round; rank 0 stops at its second round
    kw["max_chunk"] = 1
    if os.environ.get("RANK") == "0":
        kw["stop_after"] = 1
    return real(seconds, **kw)
resume.Budget = factory
from rce_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_detect_under_torchrun_stops_together_and_continues(trained):
    """Under torchrun a stop on one process stops every process in the same round (each
    exits 3, torchrun itself 1; no merged file: the merge needs every part); the same
    command then finishes, and the merged file equals the single-process one."""
    root, ckpt, files, x, _ = trained
    np.save(root / "tr.npy", x[:90].numpy())
    single = root / "tr_single.npz"
    args = ["detect", "--checkpoint", str(ckpt), "--detector", str(files["kdensity"]),
            "--input", str(root / "tr.npy"), "--batch-size", "16", "--quiet"]
    assert main([*args, "--out", str(single)]) == 0
    (root / "stop_rank0.py").write_text(_STOP_RANK0)
    merged = root / "tr_merged.npz"

    def torchrun(*script):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run",
                               "--nproc_per_node=2", "--master_port=29534", *script,
                               *args, "--out", str(merged)],
                              capture_output=True, text=True, timeout=600, cwd=root)
    proc = torchrun(str(root / "stop_rank0.py"))
    assert proc.returncode != 0 and "not finished" in proc.stderr, proc.stderr[-3000:]
    assert not merged.exists()
    parts = root / ".tr_merged.npz.parts"
    done = [_done(parts, r) for r in (0, 1)]
    assert done == [16, 32]      # rank 1 stopped in the same round, its half unfinished
    proc = torchrun("-m", "rce_fast")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not parts.exists()
    with np.load(single) as a, np.load(merged) as b:
        np.testing.assert_allclose(b["score"], a["score"], rtol=1e-6, atol=1e-6)
        assert np.array_equal(a["prediction"], b["prediction"])


_KILLED_AT_THIRD_BLOCK = """
import os, signal, sys
from rce_fast import _cli_detect, detect
_cli_detect._PROGRESS_SECONDS = 0.0       # record after every block
real, calls = detect.score_inputs, []
def score_inputs(*a, **k):
    calls.append(1)
    if len(calls) == 4:  # the third block (the first call checks the detector fits)
        os.kill(os.getpid(), signal.SIGKILL)   # no handler, no finally: killed outright
    return real(*a, **k)
detect.score_inputs = score_inputs
from rce_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_detect_killed_outright_redoes_only_what_it_had_not_recorded(trained, capsys):
    """Progress is recorded while scoring (not only at a clean stop), with no time
    budget: a process killed by SIGKILL in its third block keeps its first two."""
    root, ckpt, files, x, _ = trained
    np.save(root / "kill.npy", x[:100].numpy())
    args = ["detect", "--checkpoint", str(ckpt), "--detector", str(files["kdensity"]),
            "--input", str(root / "kill.npy"), "--batch-size", "25", "--quiet"]
    (root / "killed.py").write_text(_KILLED_AT_THIRD_BLOCK)
    out = root / "kill.npz"
    proc = subprocess.run([sys.executable, str(root / "killed.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == -9, proc.stderr[-3000:]
    parts = root / ".kill.npz.parts"
    assert _done(parts) == 50
    assert main([*args, "--out", str(out)]) == 0 and not parts.exists()
    full = root / "kill_full.npz"
    assert main([*args, "--out", str(full)]) == 0
    _assert_same_npz(full, out)
