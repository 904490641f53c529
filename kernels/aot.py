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

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64"}
_OPTIONS = ("num_warps", "num_stages")


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


def compile_launch(kernel, args, meta, target: GPUTarget):
    """Compile one captured launch with the specialisations the JIT would apply at run time:
    ints equal to 1 become constants, ints divisible by 16 and (aligned) pointers get the
    divisibility hint (that is what lets loads vectorise)."""
    names = kernel.arg_names
    constexprs = {k: v for k, v in meta.items() if k not in _OPTIONS}
    signature, attrs, positional = {}, {}, iter(args)
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        a = next(positional)
        if isinstance(a, torch.Tensor):
            signature[name] = _PTR[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            signature[name] = "fp32"
        elif a == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -2 ** 31 <= a < 2 ** 31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    options = {k: meta[k] for k in _OPTIONS if k in meta}
    return triton.compile(src, target=target, options=options)


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
