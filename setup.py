"""Build script for rce_fast.

``kernels/`` (Triton kernels) ships inside the package as ``rce_fast.kernels`` so no
top-level module called ``kernels`` lands in site-packages.
"""
from setuptools import setup

setup(
    name="rce_fast",
    version="0.1.0",
    description=("GPU-accelerated Reverse Cross-Entropy training and K-density detection of "
                 "adversarial examples (Pang et al., NeurIPS 2018)"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["rce_fast", "rce_fast.kernels"],
    package_dir={"rce_fast": "rce_fast", "rce_fast.kernels": "kernels"},
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
        "test": ["pytest>=7", "pytest-benchmark>=4"],
    },
    entry_points={},
)
