"""stattn: the package `stattn`, the Triton kernels of kernels/ as `stattn.kernels` and the
benchmarks of bench/ as `stattn.bench` (for the `stattn bench` command)."""
import glob
import os
import shutil

from setuptools import setup


def _native_extension():
    """stattn._native (csrc/, the CPU kernels) when torch and a C++ compiler are present at build
    time (`pip install -e . --no-build-isolation` after installing torch, as `make install` does).
    Otherwise none: stattn then builds it on first use (needs ninja) or uses the reference."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("stattn: torch is not importable at build time, skipping the native CPU extension "
              "(install torch first, then `pip install --no-build-isolation`)")
        return [], {}
    if not shutil.which(os.environ.get("CXX", "c++")):
        print("stattn: no C++ compiler found, skipping the native CPU extension")
        return [], {}
    ext = CppExtension("stattn._native", sorted(glob.glob("csrc/*.cpp")), include_dirs=["csrc"],
                       depends=sorted(glob.glob("csrc/*.h")),  # a changed header rebuilds too
                       # = stattn.native.CFLAGS / LDFLAGS (no -march; -fopenmp for at::parallel_for)
                       extra_compile_args=["-O3", "-fno-trapping-math", "-fopenmp"], extra_link_args=["-fopenmp"],
                       optional=True)               # a failing compile leaves the reference path
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=False)}


_EXT_MODULES, _CMDCLASS = _native_extension()

setup(
    name="stattn",
    version="0.1.0",
    description="Fused Triton attention-control kernels for text-to-image diffusion",
    packages=["stattn", "stattn.kernels", "stattn.bench"],
    package_dir={"stattn": "stattn", "stattn.kernels": "kernels", "stattn.bench": "bench"},
    package_data={"stattn": ["data/**/*", "configs/**/*"]},
    entry_points={"console_scripts": ["stattn=stattn.cli:main"]},
    ext_modules=_EXT_MODULES,
    cmdclass=_CMDCLASS,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "triton>=3.0", "numpy", "diffusers>=0.30", "transformers>=4.40", "pillow",
    ],
    # the test extra: peft for the LoRA drop-in tests, torchsde for DPMSolverSDEScheduler (every diffusers
    # scheduler is tested), numpy < 2.4 for the Triton 3.6 interpreter
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy<2.4", "peft", "torchsde"]},
)
