"""stattn: the package `stattn`, the Triton kernels of kernels/ as `stattn.kernels` and the
benchmarks of bench/ as `stattn.bench` (for the `stattn bench` command)."""
from setuptools import setup

setup(
    name="stattn",
    version="0.1.0",
    description="Fused Triton attention-control kernels for text-to-image diffusion",
    packages=["stattn", "stattn.kernels", "stattn.bench"],
    package_dir={"stattn": "stattn", "stattn.kernels": "kernels", "stattn.bench": "bench"},
    package_data={"stattn": ["data/**/*", "configs/**/*"]},
    entry_points={"console_scripts": ["stattn=stattn.cli:main"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "triton>=3.0", "numpy", "diffusers>=0.30", "transformers>=4.40", "pillow",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy<2.4"]},
)
