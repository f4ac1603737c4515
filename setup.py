"""Build script for rce_fast.

- ``kernels/`` (Triton kernels) ships inside the package as ``rce_fast.kernels``, so no
  top-level module called ``kernels`` lands in site-packages.
- ``csrc/`` is built by CMake + ninja into the pybind11 module ``rce_fast._C`` (the JSMA
  pair search; CUDA too when a CUDA compiler is found). No torch at build time.
  Set RCE_FAST_NO_EXTENSION=1 to skip it (the package then uses its PyTorch fallback),
  RCE_FAST_CUDA=0 to build the CPU path only, CMAKE_CUDA_ARCHITECTURES to choose GPUs.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11  # a build requirement (pyproject.toml)

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DRCE_FAST_CUDA={'OFF' if os.environ.get('RCE_FAST_CUDA') == '0' else 'ON'}",
        ]
        if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
        try:
            import ninja  # noqa: F401
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
        except ImportError:
            pass
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel"], check=True)


ext_modules = [] if os.environ.get("RCE_FAST_NO_EXTENSION") == "1" else [
    CMakeExtension("rce_fast._C")]

setup(
    name="rce_fast",
    version="0.1.0",
    description=("GPU-accelerated Reverse Cross-Entropy training and K-density detection of "
                 "adversarial examples (Pang et al., NeurIPS 2018)"),
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # every package under rce_fast/ (found, so a new subpackage cannot be left out of
    # the wheel), plus kernels/ mapped into the namespace
    packages=find_packages(include=["rce_fast", "rce_fast.*"]) + ["rce_fast.kernels"],
    package_dir={"rce_fast": "rce_fast", "rce_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # Install torch yourself first (CPU or the CUDA build you want); any >= 2.4 works.
        "torch>=2.4",
        "triton>=3.6; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy>=1.23",
        "scikit-learn>=1.2",
        "tqdm>=4.60",
        "matplotlib>=3.6",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6.0"],
    },
    entry_points={"console_scripts": ["rce-fast = rce_fast.cli:main"]},
    zip_safe=False,
)
