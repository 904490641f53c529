"""stattn: the package `stattn`, the Triton kernels of kernels/ as `stattn.kernels`, the
benchmarks of bench/ as `stattn.bench` (for the `stattn bench` command) and the C++ sources of
csrc/ as data in `stattn/csrc` (for the build on first use, stattn/native.py).

Install torch first (the CPU or the CUDA build, README "Install"): `torch>=2.4` is then satisfied
and pip installs no other torch. With build isolation (plain `pip install .`) torch is not
importable here, so no extension is compiled at install time; stattn compiles csrc/ on first use
(ninja, a requirement, and a C++ compiler)."""
import glob
import os
import re
import shutil

from setuptools import setup

# one place for the version: stattn.__version__ (read, not imported: the build may lack torch)
VERSION = re.search(r'^__version__ = "([^"]+)"', open("stattn/__init__.py").read(), re.M).group(1)
CSRC_PATTERNS = ["*.cpp", "*.h"]  # what csrc/ holds that a build needs (stattn.csrc's package data)


def _native_extension():
    """stattn._native (csrc/, the CPU kernels) when torch and a C++ compiler are present at build
    time (`pip install -e . --no-build-isolation` after installing torch, as `make install` does).
    Otherwise none: stattn then builds it on first use (needs ninja) or uses the reference."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("stattn: torch is not importable at build time (build isolation), so the native CPU extension is "
              "compiled on first use instead (ninja + a C++ compiler); to compile it now: install torch, then "
              "`pip install --no-build-isolation .`")
        return [], {}
    if not shutil.which(os.environ.get("CXX", "c++")):
        print("stattn: no C++ compiler found, skipping the native CPU extension (install one, e.g. g++, for the "
              "build on first use or a rebuild)")
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
    version=VERSION,
    description="Fused Triton attention-control kernels for text-to-image diffusion",
    # stattn.csrc: no Python, only the C++ sources native.py compiles on first use (MANIFEST.in
    # puts them in the sdist too)
    packages=["stattn", "stattn.evaluation", "stattn.integration", "stattn.methods",
              "stattn.methods.regulation", "stattn.methods.spacetime", "stattn.kernels", "stattn.bench", "stattn.csrc"],
    package_dir={"stattn": "stattn", "stattn.kernels": "kernels", "stattn.bench": "bench", "stattn.csrc": "csrc"},
    package_data={"stattn": ["data/**/*", "configs/**/*"], "stattn.csrc": CSRC_PATTERNS},
    entry_points={"console_scripts": ["stattn=stattn.cli:main"]},
    ext_modules=_EXT_MODULES,
    cmdclass=_CMDCLASS,
    # The floors are the oldest releases the suite has run on (README, "Tested versions"): torch 2.11
    # (the GPU image's; 2.13 in CI), triton 3.6, diffusers 0.42 (its processors are what stattn's
    # reproduce), transformers 5.17, Python 3.11. An installed torch (CPU or CUDA) satisfies the
    # floor, so install torch first; ninja: the native extension's build on first use
    # (torch.utils.cpp_extension.load). numpy is not capped here: only the Triton 3.6 interpreter
    # (the test suite's CPU Triton runs) needs < 2.4.
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.11", "triton>=3.6", "numpy", "diffusers>=0.42", "transformers>=5.17", "pillow", "ninja",
        "accelerate",   # stattn eval: the work list split over processes (PartialState)
    ],
    # the test extra: peft for the LoRA drop-in tests, torchsde for DPMSolverSDEScheduler (every diffusers
    # scheduler is tested), numpy < 2.4 for the Triton 3.6 interpreter
    # the eval extra: the summary's bar chart (stattn eval writes it when matplotlib is there)
    # scipy: diffusers' LMSDiscreteScheduler and transformers' OWLv2 image processor (the eval's
    # detector) import it (it came only through torchsde before)
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy<2.4", "peft", "torchsde", "scipy"],
                    "eval": ["matplotlib", "scipy"]},
)
