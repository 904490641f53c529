"""`stattn doctor`: which backends can run here, why one cannot, and the versions in use.

    stattn doctor

Native: whether the C++ extension loads (installed build, or built now on first use: that can
take minutes once) and which row-kernel instruction set csrc/native_common.h will pick on this
CPU; Triton: its version and whether it runs on a GPU or under the interpreter; CUDA: the device
and its compute capability, or why there is none. Always exits 0: it reports, it does not judge.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Optional

import torch

VERSIONS = ("torch", "triton", "diffusers", "transformers", "numpy")
# x86-64-v3 as GCC's __builtin_cpu_supports("arch=x86-64-v3") tests it (/proc/cpuinfo names; abm = lzcnt)
_V3_FLAGS = frozenset("avx avx2 bmi1 bmi2 f16c fma abm movbe xsave".split())
# csrc/native_common.h has_v4(): the 16-lane x86-64-v4 kernels
_V4_FLAGS = frozenset("avx512f avx512bw avx512cd avx512dq avx512vl".split())


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[frozenset]:
    """The CPU's feature flags (Linux), or None where /proc/cpuinfo does not list them."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def native_isa(flags: Optional[frozenset], machine: str = platform.machine()) -> str:
    """The row kernels the native build runs on this CPU: its function multi-versioning
    (csrc/native_common.h) picks x86-64-v4 (AVX-512, 16 lanes, unless STATTN_NATIVE_V4=0),
    x86-64-v3 (AVX2 + FMA, 8 lanes) or the x86-64 baseline; elsewhere the compiler's default."""
    if machine not in ("x86_64", "AMD64"):
        return f"{machine}: compiler default (no multi-versioning)"
    if flags is None:
        return "unknown (no /proc/cpuinfo flags)"
    if _V4_FLAGS <= flags and _V3_FLAGS <= flags:
        if os.environ.get("STATTN_NATIVE_V4", "").startswith("0"):
            return "AVX2 (x86-64-v3; AVX-512 present but STATTN_NATIVE_V4=0)"
        return "AVX-512 (x86-64-v4, 16 lanes)"
    if _V3_FLAGS <= flags:
        return "AVX2 (x86-64-v3, 8 lanes)"
    return f"baseline x86-64 (missing for AVX2 kernels: {' '.join(sorted(_V3_FLAGS - flags))})"


def native_report() -> list:
    from . import native

    print("native: loading (the build on first use can take a few minutes once) ...", file=sys.stderr, flush=True)
    if native.load():
        how = "stattn._native, built at install" if "stattn._native" in sys.modules else \
            f"built on first use from {native.source_dir()}"
        lines = [f"native CPU kernels: available ({how})"]
    else:
        lines = [f"native CPU kernels: unavailable: {native._state.get('error', 'unknown error')}",
                 f"  fix: {native.BUILD_HINT}"]
    lines.append(f"  instruction set: {native_isa(cpu_flags())}")
    lines.append(f"  sources: {native.source_dir() or 'none found'}")
    return lines


def cuda_report() -> list:
    if torch.version.cuda is None:
        return [f"CUDA: unavailable: torch {torch.__version__} is built without CUDA "
                "(install a CUDA build of torch, README \"Install\")"]
    if not torch.cuda.is_available():
        return [f"CUDA: unavailable: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no device "
                "(driver, CUDA_VISIBLE_DEVICES)"]
    lines = [f"CUDA: {torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}"]
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        lines.append(f"  cuda:{i}: {torch.cuda.get_device_name(i)}, compute capability {major}.{minor}")
    return lines


def triton_report() -> list:
    v = version("triton")
    if v == "not installed":
        return ["Triton: not installed (CUDA tensors need it: `pip install triton`)"]
    if os.environ.get("TRITON_INTERPRET") == "1":
        from .ops import interpreter_problem

        problem = interpreter_problem()
        if problem:
            return [f"Triton {v}: CPU interpreter (TRITON_INTERPRET=1), unusable: {problem}"]
        return [f"Triton {v}: CPU interpreter (TRITON_INTERPRET=1; slow, for tests)"]
    if torch.cuda.is_available():
        return [f"Triton {v}: GPU (CUDA tensors run the Triton kernels)", f"  launches: {launch_report()}"]
    return [f"Triton {v}: no GPU, not used (TRITON_INTERPRET=1 STATTN_BACKEND=triton runs it interpreted)"]


def launch_report() -> str:
    """How the Triton kernels are launched: stattn's cached launch, or Triton's JIT and why."""
    from .kernels import launch

    try:
        ok, why = launch.cached_launch_available()
    except ValueError as e:              # a bad STATTN_TRITON_LAUNCH: the first CUDA call raises it
        return f"unusable: {e}"
    return ("cached (the JIT binds each launch signature once; STATTN_TRITON_LAUNCH=jit turns it off)" if ok else
            f"through Triton's JIT at every launch ({why})")


def report() -> str:
    backend = os.environ.get("STATTN_BACKEND", "auto")
    from . import __version__

    lines = [f"stattn {__version__} (STATTN_BACKEND={backend})", "backends:"]
    lines += ["  " + line for line in native_report() + triton_report() + cuda_report()]
    lines.append("versions:")
    lines += [f"  {name}: {version(name)}" for name in VERSIONS]
    lines.append(f"  python: {platform.python_version()} ({sys.executable})")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
