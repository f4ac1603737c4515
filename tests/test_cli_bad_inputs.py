"""The command line's user errors: each is ONE line on stderr with exit status 2, no
traceback, and nothing is computed or written when an output cannot be written.

Covered for every command that reads or writes a file: missing, empty, corrupt,
truncated, foreign and pickled files (--checkpoint, --detector, --input,
--adversarial, --data-dir), outputs that cannot be written (--out, --json), devices
that are not devices or not present, argparse errors, and OS errors.
"""
from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from rce_fast.cli import main
from rce_fast.data import load_digits_split


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A briefly trained checkpoint, a K-density detector file, an attack file, and the
    bad files every case draws from."""
    root = tmp_path_factory.mktemp("cli_bad")
    ck = root / "ck.pt"
    assert main(["train", "--model", "resnet8", "--steps", "2", "--out", str(ck),
                 "--quiet"]) == 0
    kd = root / "kd.pt"
    assert main(["fit-detector", "--checkpoint", str(ck), "--out", str(kd), "--n-fit", "300",
                 "--per-class", "5", "--kernel-points", "3", "--n-calibration", "50",
                 "--quiet"]) == 0
    adv = root / "adv.pt"
    assert main(["attack", "--checkpoint", str(ck), "--attack", "fgsm", "--n", "8",
                 "--out", str(adv)]) == 0
    _, _, x, _ = load_digits_split()
    np.save(root / "imgs.npy", x[:8].numpy())
    data = ck.read_bytes()
    (root / "empty.pt").write_bytes(b"")
    (root / "garbage.pt").write_bytes(b"\x00 not a torch file " * 20)
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.ones(3)}, root / "foreign.pt")
    torch.save(types.SimpleNamespace(a=1), root / "pickled.pt")
    (root / "folder.pt").mkdir()
    (root / "a_file").write_text("x")
    torch.save({"x_adv": x[:8], "n": 9}, root / "adv_n.pt")
    torch.save({"x_adv": x[:8, :, :4], "n": 8}, root / "adv_shape.pt")
    bad = x[:8].clone()
    bad[3, 0, 2, 2] = float("nan")
    torch.save({"x_adv": bad, "n": 8}, root / "adv_nan.pt")
    torch.save({"x_adv": x[:8].tolist(), "n": 8}, root / "adv_list.pt")
    np.save(root / "imgs_empty.npy", np.zeros((0, 8, 8), np.float32))
    (root / "imgs_garbage.npy").write_bytes(b"\x93NUMPY garbage")
    np.save(root / "imgs_truncated.npy", x[:8].numpy())
    raw = (root / "imgs_truncated.npy").read_bytes()
    (root / "imgs_truncated.npy").write_bytes(raw[: len(raw) // 2])
    np.savez(root / "bad.npz", a=np.zeros(3))
    # datasets the checkpoint (trained on the digits, 8x8, 10 classes) was not trained on
    x_tr, y_tr, x_te, y_te = (t.numpy() for t in load_digits_split())
    big = np.zeros((40, 1, 16, 16), np.float32)
    np.savez(root / "big_images.npz", images=big, labels=np.arange(40) % 10)
    np.savez(root / "label_10.npz", x_train=x_tr[:50],
             y_train=np.where(y_tr[:50] == 3, 10, y_tr[:50]), x_test=x_te, y_test=y_te)
    np.savez(root / "other.npz", x_train=x_tr[:300], y_train=y_tr[:300], x_test=x_te,
             y_test=y_te)
    # its training split, but test images of another size / a test label it lacks
    np.savez(root / "test_big.npz", x_train=x_tr, y_train=y_tr,
             x_test=np.zeros((20, 1, 16, 16), np.float32), y_test=y_te[:20])
    np.savez(root / "test_label_10.npz", x_train=x_tr, y_train=y_tr, x_test=x_te,
             y_test=np.where(y_te == 3, 10, y_te))
    keep = y_tr < 5                                          # classes 0..4 only
    np.savez(root / "five.npz", x_train=x_tr[keep], y_train=y_tr[keep], x_test=x_te,
             y_test=y_te)
    np.save(root / "imgs_big.npy", np.zeros((8, 16, 16), np.float32))
    old = torch.load(ck, weights_only=False)                 # before data fingerprints
    del old["data"]
    torch.save(old, root / "ck_old.pt")
    np.save(root / "imgs_rgb.npy", np.zeros((8, 3, 8, 8), np.float32))
    return root


BAD_FILES = ["missing.pt", "empty.pt", "garbage.pt", "truncated.pt", "foreign.pt",
             "pickled.pt", "folder.pt"]
LONG = "n" * 300 + ".pt"   # ENAMETOOLONG: an OS error from the filesystem itself


def _base(command, f):
    """Valid arguments of each command (the case then replaces or adds one)."""
    ck, kd = str(f / "ck.pt"), str(f / "kd.pt")
    return {
        "train": ["train", "--model", "resnet8", "--steps", "1", "--quiet", "--out",
                  str(f / "out" / "t.pt")],
        "attack": ["attack", "--checkpoint", ck, "--attack", "fgsm", "--n", "4", "--out",
                   str(f / "out" / "a.pt")],
        "attack-pgd": ["attack", "--checkpoint", ck, "--attack", "pgd", "--n", "4",
                       "--steps", "1", "--detector", kd, "--out", str(f / "out" / "p.pt")],
        "evaluate": ["evaluate", "--checkpoint", ck],
        "fit-detector": ["fit-detector", "--checkpoint", ck, "--n-fit", "100", "--per-class",
                         "3", "--kernel-points", "2", "--quiet", "--out",
                         str(f / "out" / "d.pt")],
        "detect": ["detect", "--checkpoint", ck, "--detector", kd, "--input",
                   str(f / "imgs.npy"), "--quiet", "--out", str(f / "out" / "s.npz")],
    }[command]


def _set(argv, option, value):
    argv = list(argv)
    if option in argv:
        argv[argv.index(option) + 1] = value
    else:
        argv += [option, value]
    return argv


CASES = []
for _cmd in ("attack", "evaluate", "fit-detector", "detect"):
    for _name in BAD_FILES:
        CASES.append((_cmd, "--checkpoint", _name, _name))
for _cmd in ("detect", "attack-pgd"):
    for _name in BAD_FILES:
        CASES.append((_cmd, "--detector", _name, _name))
    CASES.append((_cmd, "--detector", "ck.pt", "ck.pt"))         # a checkpoint, not a detector
for _name in BAD_FILES + ["adv_n.pt", "adv_shape.pt", "adv_nan.pt", "adv_list.pt"]:
    CASES.append(("evaluate", "--adversarial", _name, _name))
for _name in ["missing.npy", "imgs_empty.npy", "imgs_garbage.npy", "imgs_truncated.npy",
              "bad.npz", "folder.pt", "empty.pt", "garbage.pt", "pickled.pt"]:
    CASES.append(("detect", "--input", _name, _name))
for _cmd in ("train", "attack", "fit-detector", "detect", "attack-pgd"):
    CASES.append((_cmd, "--out", "a_file/x.pt", "a_file"))      # under a file
    CASES.append((_cmd, "--out", ".", str(".")))                  # a folder
    CASES.append((_cmd, "--out", LONG, "nnnn"))                   # the OS refuses the name
    for _dev in ("foo", "cuda:7", "meta", "mps"):   # mps: not in this PyTorch build
        CASES.append((_cmd, "--device", _dev, "--device"))
CASES += [("evaluate", "--json", "a_file/r.json", "a_file"),
          ("evaluate", "--json", LONG, "nnnn"),
          ("evaluate", "--device", "foo", "--device"),
          ("train", "--dataset", "npz", "--data-dir"),              # npz without --data-dir
          ("train", "--data-dir", "missing.npz", "missing.npz"),
          ("train", "--data-dir", "garbage.pt", "garbage.pt"),
          ("train", "--data-dir", "bad.npz", "bad.npz"),
          ("fit-detector", "--data-dir", "missing.npz", "missing.npz")]
for _cmd in ("attack", "evaluate", "fit-detector", "attack-pgd"):  # not its training data
    CASES.append((_cmd, "--data-dir", "big_images.npz", "(1, 16, 16)"))
    CASES.append((_cmd, "--data-dir", "label_10.npz", "training label 10"))
for _cmd in ("attack", "evaluate", "attack-pgd"):                  # they use the test split
    # refused by load_npz itself (train and test images must agree) before the checkpoint
    CASES.append((_cmd, "--data-dir", "test_big.npz",
                  "train images are (1, 8, 8) (C, H, W) but test images are (1, 16, 16)"))
    CASES.append((_cmd, "--data-dir", "test_label_10.npz", "test label 10"))
CASES += [("fit-detector", "--data-dir", "five.npz", "no class 5, 6, 7, 8, 9 of the"),
          ("detect", "--input", "imgs_big.npy", "(1, 16, 16)"),
          ("attack-pgd", "--fpr", "1", "--fpr 1 flags every input")]


@pytest.mark.parametrize("command, option, value, message", CASES,
                         ids=[f"{c}{o}={v[:20]}" for c, o, v, _ in CASES])
def test_user_error_is_one_line_exit_2(files, capsys, command, option, value, message):
    argv = _base(command, files)
    if option == "--dataset":
        argv = _set(argv, "--dataset", value)
    else:
        if option in ("--out", "--json", "--checkpoint", "--detector", "--input",
                      "--adversarial", "--data-dir") and value != ".":
            value = str(files / value)
        elif value == ".":
            value = str(files)
            message = str(files)
        argv = _set(argv, option, value)
        if option == "--data-dir":
            argv = _set(argv, "--dataset", "npz")
        if option == "--gamma":
            argv = _set(argv, "--attack", "jsma")
    out_dir = files / "out"
    before = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err and err.startswith(f"rce-fast {argv[0]}: error:"), err
    after = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    assert after == before, "an output was written by a command that failed"
    assert not list(files.rglob("*.tmp")) and not list(files.rglob(".*.parts"))


def test_an_error_is_the_only_line_even_with_other_data(files, capsys):
    """The "other data" warning waits for each command's own checks: when one fails, its
    error is the only line on stderr."""
    other = str(files / "other.npz")
    cases = [(_set(_set(_base("attack", files), "--attack", "cw-wb"), "--data-dir", other),
              "needs --detector"),
             (_set(_base("evaluate", files), "--adversarial", str(files / "missing.pt")),
              "missing.pt"),
             (_set(_base("attack-pgd", files), "--detector", str(files / "ck.pt")), "ck.pt")]
    for argv, message in cases:
        argv = _set(_set(argv, "--dataset", "npz"), "--data-dir", other)
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error" in err[0] and message in err[0], err


def test_lid_needs_no_class_of_its_fit_inputs(files, tmp_path, capsys):
    """LID uses its fit inputs as unlabelled reference batches: fit inputs lacking classes
    are fine there (K-density and Mahalanobis refuse them)."""
    argv = ["fit-detector", "--checkpoint", str(files / "ck.pt"), "--kind", "lid",
            "--dataset", "npz", "--data-dir", str(files / "five.npz"), "--n-fit", "30",
            "--n-regression", "60", "--n-calibration", "50", "--lid-batch", "10",
            "--lid-batches", "1", "--k", "3", "--quiet", "--out", str(tmp_path / "lid.pt")]
    assert main(argv) == 0
    assert (tmp_path / "lid.pt").is_file()
    argv[argv.index("lid")] = "mahalanobis"
    assert main(argv) == 2
    assert "(raise --n-fit 30)" in capsys.readouterr().err


def test_a_checkpoint_without_fingerprint_is_checked_for_its_channels(files, capsys):
    """A checkpoint from before data fingerprints records only its input channels: those
    are checked (H and W cannot be), and its own data passes."""
    old = str(files / "ck_old.pt")
    detect = _set(_base("detect", files), "--checkpoint", old)
    capsys.readouterr()
    assert main(_set(detect, "--input", str(files / "imgs_rgb.npy"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rce-fast detect: error: checkpoint") and "1 channels" in err, err
    assert main(_set(_base("evaluate", files), "--checkpoint", old)) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["attack", "evaluate", "fit-detector"])
def test_same_shaped_other_data_gets_one_warning(files, capsys, command, tmp_path):
    """Other data with the images the checkpoint takes is a legitimate choice (transfer,
    a held-out set): one warning line on stderr, then the command runs. Its own
    training data gets none."""
    argv = _base(command, files)
    if "--out" in argv:
        argv = _set(argv, "--out", str(tmp_path / "o.pt"))
    capsys.readouterr()
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err
    argv = _set(_set(argv, "--dataset", "npz"), "--data-dir", str(files / "other.npz"))
    assert main(argv) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert err == [f"rce-fast {command}: warning: --dataset npz --data-dir "
                   f"{files / 'other.npz'} is not the training data of checkpoint "
                   f"{files / 'ck.pt'} (same image shape, other contents)"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0", "--out", "x.pt"], "positive integer"),
    (["train", "--steps", "abc", "--out", "x.pt"], "--steps"),
    (["train", "--objective", "mse", "--out", "x.pt"], "invalid choice"),
    (["train"], "--out"),
    (["attack", "--checkpoint", "c.pt", "--attack", "nope", "--out", "o.pt"], "invalid choice"),
    (["attack", "--checkpoint", "c.pt", "--attack", "fgsm", "--out", "o.pt", "--eps", "nan"],
     "--eps"),
    (["detect", "--checkpoint", "c", "--detector", "d", "--input", "i", "--out", "o",
      "--fpr", "1.5"], "--fpr"),
    (["fit-detector", "--checkpoint", "c", "--out", "o", "--kind", "svm"], "--kind"),
    (["evaluate", "--checkpoint", "c", "--bogus"], "unrecognized arguments"),
    (["nope"], "invalid choice"),
    ([], "required"),
    (["fit-detector", "--checkpoint", "c", "--out", "o", "--seed", str(2 ** 64)], "--seed"),
    # float32 scales and fractions checked at parse time, naming the option
    (["attack", "--checkpoint", "c.pt", "--attack", "cw", "--out", "o.pt", "--cw-c-init",
      "1e39"], "argument --cw-c-init: must be in [2**-126, 3.4e38]"),
    (["attack", "--checkpoint", "c.pt", "--attack", "cw", "--out", "o.pt", "--cw-c-init",
      "1e-50"], "argument --cw-c-init"),
    (["attack", "--checkpoint", "c.pt", "--attack", "jsma", "--out", "o.pt", "--gamma", "2"],
     "argument --gamma: must be in (0, 1]"),
    (["train", "--out", "x.pt", "--temperature", "0"], "argument --temperature"),
    (["evaluate", "--checkpoint", "c", "--sigma2", "1e-300"], "argument --sigma2"),
    (["fit-detector", "--checkpoint", "c", "--out", "o", "--sigma2", "nan"], "--sigma2"),
    (["fit-detector", "--checkpoint", "c", "--out", "o", "--seed", "-1"], "[0, 2**63 - 1)"),
    (["train", "--out", "x.pt", "--seed", str(2 ** 63 - 1)], "--seed"),
    (["attack", "--checkpoint", "c.pt", "--attack", "fgsm", "--out", "o.pt", "--seed", "-3"],
     "--seed"),
])
def test_argparse_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("extra, message", [
    (["--device", "foo"], "--device"),
    (["--checkpoint", "{f}/pickled.pt"], "pickled.pt"),
])
def test_the_installed_entry_point_prints_no_traceback(files, extra, message):
    """The real process (python -m rce_fast): exit status 2 and one line, no traceback."""
    argv = _base("attack", files)
    for option, value in zip(extra[::2], extra[1::2]):
        argv = _set(argv, option, value.format(f=files))
    proc = subprocess.run([sys.executable, "-m", "rce_fast", *argv], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and message in err, err


def test_evaluate_reads_adversarial_files_safely(files, tmp_path, capsys):
    """A crafted --adversarial file that would run code under weights_only=False is
    refused without running it; a good file is evaluated."""
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"x_adv": torch.zeros(2, 1, 8, 8), "n": 2, "evil": Boom()}, tmp_path / "e.pt")
    argv = _base("evaluate", files)
    assert main(argv + ["--adversarial", str(tmp_path / "e.pt")]) == 2
    assert not marker.exists()
    assert "e.pt" in capsys.readouterr().err
    assert main(argv + ["--adversarial", str(files / "adv.pt"), "--json",
                        str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "r.json").is_file() and not list(tmp_path.glob(".*tmp"))
    # --json may not be one of the --adversarial files it reads (it would replace it)
    import shutil
    shutil.copy(files / "adv.pt", tmp_path / "adv_copy.pt")
    before = (tmp_path / "adv_copy.pt").read_bytes()
    capsys.readouterr()
    assert main(argv + ["--adversarial", str(files / "adv.pt"), str(tmp_path / "adv_copy.pt"),
                        "--json", str(tmp_path / "adv_copy.pt")]) == 2
    assert "is also --adversarial" in capsys.readouterr().err
    assert (tmp_path / "adv_copy.pt").read_bytes() == before
