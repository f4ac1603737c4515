"""The build ships every package: `pip install .` (not only `-e .`) gives a working
rce_fast. setup.py is run with setuptools.setup captured, so no build is needed."""
import os
import pathlib
import runpy
import subprocess

import pytest
import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_kwargs(monkeypatch):
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def test_every_package_and_the_kernels_are_shipped(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "rce_fast").rglob("__init__.py")}
    assert on_disk and on_disk <= set(kw["packages"]), sorted(on_disk - set(kw["packages"]))
    # kernels/ (top level in the repository) installs as rce_fast.kernels, never `kernels`
    assert "rce_fast.kernels" in kw["packages"] and "kernels" not in kw["packages"]
    assert kw["package_dir"]["rce_fast.kernels"] == "kernels"
    assert (ROOT / "kernels" / "__init__.py").is_file()
    assert [e.name for e in kw["ext_modules"]] == ["rce_fast._C"]
    assert kw["entry_points"]["console_scripts"] == ["rce-fast = rce_fast.cli:main"]


def test_no_unpinned_cuda_torch_and_declared_dependencies(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    names = {r.split(">")[0].split("=")[0].split(";")[0].strip() for r in kw["install_requires"]}
    assert {"torch", "numpy", "scikit-learn", "tqdm", "matplotlib", "triton"} <= names
    ci = (ROOT / ".ci" / "run").read_text()
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert "torch==2.13.0" in install  # the CPU build; never an unpinned CUDA torch
    assert "bash scripts/install.sh" in ci


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
    command = ci_lines[-1]
    assert command.startswith("python3 -m pytest")
    assert f"\n   {command}\n" in readme or f"\n{command}\n" in readme


@pytest.mark.parametrize("index", [None, "https://download.pytorch.org/whl/cpu"])
def test_install_pins_torch_and_takes_its_index_from_the_environment(tmp_path, index):
    """scripts/install.sh with no torch present installs torch==2.13.0, from
    RCE_FAST_TORCH_INDEX when set (PyPI's Linux torch is the CUDA build), and passes that
    index to torch's install only. A stand-in python records the pip calls."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    'if [ "$1" = "-c" ] && [ "$2" = "import torch" ]; then exit 1; fi\n'
                    f'printf "%s\\n" "$*" >> {log}\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "RCE_FAST_TORCH_INDEX"}
    env["PYTHON"] = str(fake)
    if index:
        env["RCE_FAST_TORCH_INDEX"] = index
    subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], env=env, check=True,
                   capture_output=True, timeout=60)
    pips = [line for line in log.read_text().splitlines() if line.startswith("-m pip install")]
    torch_line = [line for line in pips if line.endswith("torch==2.13.0")]
    assert len(torch_line) == 1
    assert (f"--index-url {index}" in torch_line[0]) == bool(index)
    assert not any("--index-url" in line for line in pips if line not in torch_line)


def test_cuda_build_carries_sass_for_turing_ampere_hopper_and_ptx():
    """The default CMAKE_CUDA_ARCHITECTURES: sm_75 (T4), sm_80 (A100; also runs on sm_86 /
    sm_89), sm_90 (H100) SASS, and compute_90 PTX that newer GPUs JIT-compile. Read with
    the cuobjdump Triton ships (none is on the CPU machines' PATH)."""
    import glob

    from rce_fast import _ext
    module, why = _ext.load()
    if module is None or not module.with_cuda:
        pytest.skip(why or "rce_fast._C was built without CUDA")
    if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
        pytest.skip("the build chose its own CMAKE_CUDA_ARCHITECTURES")
    try:
        import triton
    except ImportError:
        pytest.skip("no Triton, so no cuobjdump")
    tools = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                   "bin", "cuobjdump"))
    if not tools:
        pytest.skip("this Triton ships no cuobjdump")

    def listing(kind):
        out = subprocess.run([tools[0], f"--list-{kind}", module.__file__],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    elf = listing("elf")
    assert all(f"sm_{a}.cubin" in elf for a in (75, 80, 90)), elf
    assert "sm_90.ptx" in listing("ptx")
