"""Compile the kernels ahead of time for a GPU target, without a GPU, and report their resources.

    python -m stattn.kernels.aot [--arch 90] [--quick]

Captures the launches the launchers make for SD-like problems (meta tensors: no memory, no
device), compiles each with Triton's real compiler and ptxas for the target, and prints registers,
spill stack and shared memory per kernel variant: what the CPU interpreter cannot check. Needs
TRITON_INTERPRET unset (the interpreter replaces the JIT functions this compiles).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import launch


@dataclass
class Problem:
    M: int
    D: int
    N: int = 77
    R: int = 2
    T: int = 2
    pinned: bool = True
    affine: bool = True
    dtype: torch.dtype = torch.float16
    B: int = 2
    H: int = 8
    per_row: bool = False     # tokens [B, T] and pin [B, N] (a batch of different prompts)
    lengths: bool = False     # per-region key lengths (IP-Adapter's image-token regions)
    probs: bool = False       # region 0's maps out of the forward, their gradient into the backward

    def __str__(self):
        extra = (" rows" if self.per_row else "") + (" lengths" if self.lengths else "") + \
            (" probs" if self.probs else "")
        return (f"M={self.M} D={self.D} N={self.N} R={self.R} T={self.T} pin={int(self.pinned)} "
                f"{str(self.dtype).split('.')[-1]}{extra}")


@contextlib.contextmanager
def _captured():
    launches = []
    original = launch._launch
    launch._launch = lambda kernel, grid, args, meta: launches.append((kernel, args, meta))
    try:
        yield launches
    finally:
        launch._launch = original


def capture(p: Problem):
    """The launches of one forward and one full backward of problem p, as (kernel, args, meta)."""
    meta = dict(device="meta")
    side = int(round(p.M ** 0.5))
    # q as the processors pass it: a view of to_q's [B, M, H * D] output (rows H * D apart)
    q = torch.empty(p.B, p.M, p.H, p.D, dtype=p.dtype, **meta).transpose(1, 2)
    k = torch.empty(p.B, p.R, p.H, p.N, p.D, dtype=p.dtype, **meta)
    w = torch.empty(p.B, p.R, dtype=torch.float32, **meta)
    masks = torch.empty(p.B, p.R, p.M, dtype=torch.float32, **meta)
    theta = torch.empty(p.B, p.H, p.T, 7, 7, dtype=torch.float32, **meta) if p.T else None
    rows = (p.B,) if p.per_row else ()
    tokens = torch.empty(*rows, p.T, dtype=torch.int32, **meta) if p.T else None
    gy = torch.empty(side, 7, dtype=torch.float32, **meta)
    pin = torch.empty(*rows, p.N, dtype=torch.int32, **meta) if p.pinned else None
    lengths = torch.empty(p.R, dtype=torch.int32, **meta) if p.lengths else None
    grad_probs = torch.empty(p.B, p.H, p.M, p.N, dtype=torch.float32, **meta) if p.probs else None
    with _captured() as launches:
        o, lse, *_ = launch.forward(q, k, k, w, masks, p.affine, theta, tokens, gy, gy, pin, p.D ** -0.5, lengths,
                                    want_probs=p.probs)
        launch.backward(o, q, k, k, w, masks, p.affine, theta, tokens, gy, gy, pin, p.D ** -0.5, lse,
                        True, True, True, True, lengths, grad_probs=grad_probs)
    return launches


SM90 = GPUTarget("cuda", 90, 32)   # H100 / H200: what driver.active.get_current_target() gives there


@functools.lru_cache(maxsize=None)
def _jit_and_binder(fn, target: GPUTarget):
    """A JITFunction of fn (under TRITON_INTERPRET=1 the kernels are interpreter wrappers of the same
    function) with Triton's generated binder and backend for target: JITFunction.create_binder's
    steps, with the target given instead of read from a driver."""
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn)
    backend = make_backend(target)
    return jit, backend, create_function_from_signature(jit.signature, jit.params, backend)


def _fn(kernel):
    return kernel if isinstance(kernel, triton.runtime.jit.JITFunction) else kernel.fn


def jit_binder(kernel, target: GPUTarget = SM90):
    """(jit, backend, binder) of a kernel for target: what JITFunction.run uses at every launch."""
    return _jit_and_binder(_fn(kernel), target)


class StandInDriver:
    """Triton's active-driver interface for one sm_90 device (H100/H200), without a GPU: the JIT
    compiles for sm_90 and each launch goes to a launcher that records it in ``launches`` (the
    compiled kernel's hash, grid, stream, function, packed metadata and arguments) instead of
    running it, calling the launch hooks as Triton's CUDA launcher does. ``stand_in_driver()``
    installs one as Triton's active driver for a block."""

    def __init__(self, target: GPUTarget = SM90, record: bool = True):
        self.target, self.record, self.launches = target, record, []
        self.utils = _StandInUtils()
        self.launcher_cls = functools.partial(_StandInLauncher, self)

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0x57


class _StandInUtils:
    def load_binary(self, name, binary, shared, device):
        """(module, function, registers, spills, max threads); the function names the binary."""
        import hashlib

        return object(), ("function", name, hashlib.sha1(binary).hexdigest()[:16]), 0, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class _StandInLauncher:
    def __init__(self, drv, src, metadata):
        self.driver, self.hash = drv, metadata.hash

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, leave, *args):
        if enter is not None:           # as the CUDA launcher: a None hook is skipped
            enter(launch_metadata)
        if self.driver.record:
            self.driver.launches.append((self.hash, (gx, gy, gz), stream, function, packed_metadata, args))
        if leave is not None:
            leave(launch_metadata)


@contextlib.contextmanager
def stand_in_driver(record: bool = True):
    """A StandInDriver as Triton's active driver inside the block, the previous one after it (set
    back as it was: Triton's reset_active would look for a GPU driver, and there is none)."""
    from triton.runtime import driver

    previous, stand_in = driver._active, StandInDriver(record=record)
    driver.set_active(stand_in)
    try:
        yield stand_in
    finally:
        driver.set_active(previous)


def jit_specialisation(kernel, args, meta, target: GPUTarget = SM90):
    """What JITFunction.run derives from one launch before it compiles, for target and without a
    driver: (signature, constexprs, attrs, options), through Triton's own binder and _pack_args.
    Compiling these (compile_specialisation) is the JIT's compile: the same specialisation of
    every argument (ints equal to 1, divisibility by 16, pointer alignment) and the same entry
    of Triton's cache."""
    from triton import knobs

    jit, backend, binder = jit_binder(kernel, target)
    kwargs = dict(meta)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug            # as JITFunction.run
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialisation, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialisation, options)
    return signature, constexprs, attrs, options


def compile_specialisation(kernel, signature, constexprs, attrs, options, target: GPUTarget = SM90):
    """triton.compile of a specialisation, as JITFunction._do_compile makes it."""
    jit, _, _ = jit_binder(kernel, target)
    return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)


def compile_launch(kernel, args, meta, target: GPUTarget = SM90):
    """Compile one captured launch as the JIT would compile it at run time on target."""
    return compile_specialisation(kernel, *jit_specialisation(kernel, args, meta, target), target)


def serialise_specialisation(kernel, signature, constexprs, attrs, options) -> str:
    """A specialisation as JSON (Triton's own format, that of JITFunction.preload), to compile in
    another process (deserialise_specialisation)."""
    from triton.runtime.jit import get_full_name, serialize_specialization_data

    return serialize_specialization_data(get_full_name(_fn(kernel)), signature, constexprs, attrs, options, "")


def deserialise_specialisation(data: str, target: GPUTarget = SM90):
    """(kernel, signature, constexprs, attrs, options) from serialise_specialisation's JSON, the
    kernel imported by name; JITFunction.preload's decoding, without the driver."""
    import importlib
    import json

    import triton.language as tl
    from triton.runtime.jit import convert_to_tuple_if_list

    obj = json.loads(data)
    module, name = obj["name"].rsplit(".", 1)
    kernel = getattr(importlib.import_module(module), name)
    constexprs = {tuple(k): tl.dtype(v) if tl.dtype.is_dtype(v) else
                  tl.constexpr(v["constexpr"]) if isinstance(v, dict) and "constexpr" in v else v
                  for k, v in zip(obj["constant_keys"], obj["constant_vals"])}
    attrs = dict(zip(map(tuple, obj["attrs_keys"]), obj["attrs_vals"]))
    signature = {k: convert_to_tuple_if_list(v) for k, v in obj["signature"].items()}
    _, backend, _ = jit_binder(kernel, target)
    options = backend.parse_options({k: tuple(v) if isinstance(v, list) else v for k, v in obj["options"].items()})
    return kernel, signature, constexprs, attrs, options


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, read by the cuobjdump Triton ships."""
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


PROBLEMS = [Problem(M=4096, D=40), Problem(M=1024, D=80), Problem(M=256, D=160), Problem(M=4096, D=64),
            Problem(M=4096, D=40, R=1, T=0, pinned=False, affine=False),
            Problem(M=256, D=64, N=154), Problem(M=1024, D=64, dtype=torch.bfloat16),
            Problem(M=256, D=40, dtype=torch.float32),
            Problem(M=4096, D=40, R=3, per_row=True, lengths=True), Problem(M=256, D=160, R=3, lengths=True),
            Problem(M=4096, D=40, probs=True), Problem(M=256, D=160, R=3, lengths=True, probs=True)]
QUICK = [PROBLEMS[0], PROBLEMS[2], PROBLEMS[5], PROBLEMS[8], PROBLEMS[11]]   # 11: the probs variants


def report(problems, arch: int):
    """Compile every distinct launch of `problems`; returns rows of (problem, kernel, meta, usage)."""
    target = GPUTarget("cuda", arch, 32)
    rows, seen = [], set()
    for p in problems:
        for kernel, args, meta in capture(p):
            key = (kernel.__name__, tuple(sorted(meta.items())), str(p.dtype))
            if key in seen:
                continue
            seen.add(key)
            compiled = compile_launch(kernel, args, meta, target)
            usage = resource_usage(compiled.asm["cubin"])
            usage["SHARED"] = compiled.metadata.shared  # dynamic shared memory (cuobjdump shows static)
            rows.append((p, kernel.__name__, meta, usage))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    ap.add_argument("--quick", action="store_true", help="five problems only (every kernel variant kind)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("stattn.kernels.aot: unset TRITON_INTERPRET (it replaces the kernels this compiles)")
    rows = report(QUICK if args.quick else PROBLEMS, args.arch)
    print("| problem | kernel | tiles (M,N,D) / warps | REG | STACK | SHARED |\n|---|---|---|---|---|---|")
    for p, name, meta, use in rows:
        tiles = f"{meta['BLOCK_M']},{meta['BLOCK_N']},{meta['BLOCK_D']} / {meta['num_warps']}"
        print(f"| {p} | {name} | {tiles} | {use.get('REG', '?')} | {use.get('STACK', '?')} | "
              f"{use.get('SHARED', '?')} |")
    return rows


if __name__ == "__main__":
    main()
