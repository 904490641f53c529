"""The CUDA launch path's host cost, measured without a GPU: stattn's launcher and the kernel launch.

    python -m bench.launch_host [--repeats 2000] [--min-time 1] [--out bench/results]

On a GPU an eager call of the op costs, on the host: stattn's op layer, its launcher
(``stattn.kernels.launch``: output allocation, strides, grid, meta-parameters), the kernel launch
up to Triton's CUDA launcher, and that launcher (argument packing, cuLaunchKernel). All but the
last are plain Python and are timed here on CPU tensors of the same shapes:

- ``launcher``: ``launch.forward`` / ``launch.backward`` with the kernel launch itself replaced by a
  no-op (the launcher's own Python and allocations);
- ``JIT launch``: the forward launch through Triton's ``JITFunction.run`` (binder, specialisation of
  every argument, cache key, launch metadata and hooks), on a stand-in sm_90 driver
  (``stattn.kernels.aot.StandInDriver``) whose launcher is a no-op: what every launch cost before
  the cached launch, and costs with ``STATTN_TRITON_LAUNCH=jit``;
- ``cached launch``: the same launch through stattn's cached launch (``launch._cached_run``: one
  key lookup, then the compiled kernel's launcher), the default.

What it cannot time: the op layer on CUDA tensors and the CUDA launcher itself (bench.host
--device cuda, the GPU check's 08-host, measures the whole call there). Problems: the plain cross-attention call
(R = 1) at SD 1.5's M = 256 and 4096, and a controlled one (R = 2, offset, pins). The three are
timed one call at a time, interleaved (bench.native's ``_timed``), medians of at least
``--repeats`` calls each, one thread.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

import torch

from bench.env import machine, provenance, publish
from bench.native import _timed

PROBLEMS = (  # name, M, D, R, T (offset targets), pinned
    ("plain M=256 D=80", 256, 80, 1, 0, False),
    ("plain M=4096 D=40", 4096, 40, 1, 0, False),
    ("R=2 offset+pins M=1024 D=80", 1024, 80, 2, 2, True),
)
B, H, N, K = 2, 8, 77, 7     # batch, heads, keys, basis size
PARTS = ("op", "forward", "backward", "jit_launch", "cached_launch")


def _inputs(M, D, R, T, pinned):
    side = int(round(M ** 0.5))
    q = torch.randn(B, M, H, D, dtype=torch.float16).transpose(1, 2)    # as the processors pass it
    k = torch.randn(B, R, H, N, D, dtype=torch.float16)
    w, masks = torch.ones(B, R), torch.ones(B, R, M)
    theta = torch.zeros(B, H, T, K, K) if T else None
    tokens = torch.arange(1, T + 1, dtype=torch.int32) if T else None
    gy = torch.rand(side, K) if T else None
    pin = torch.zeros(N, dtype=torch.int32) if pinned else None
    return q, k, w, masks, theta, tokens, gy, pin


@contextlib.contextmanager
def _stand_in_launches(kernel, args, meta):
    """(JIT launch, cached launch) of one captured launch, each a no-argument callable, on a no-op
    sm_90 stand-in for Triton's active driver. Both launch a JITFunction of their own, built from
    the kernel's function: the module's kernels (and their compiled kernels' launchers) are never
    bound to the stand-in; it compiles for sm_90 once, when first called."""
    from triton.runtime.jit import JITFunction

    from stattn.kernels import aot, launch

    jit, grid = JITFunction(kernel.fn), (1, 1)

    def cached():
        if not launch._cached_run(jit, grid, args, meta):
            raise RuntimeError("the cached launch declined the forward launch")
    try:
        with aot.stand_in_driver(record=False):
            yield (lambda: jit[grid](*args, **meta)), cached
    finally:
        launch._layouts.pop(jit, None)
        for key in [k for k in launch._entries if k[0] is jit]:
            del launch._entries[key]


@contextlib.contextmanager
def _op_on_triton():
    """The op's CPU tensors routed to the Triton launcher as CUDA tensors are (stattn.ops.backend_for)."""
    from stattn import ops

    real = ops.backend_for
    ops.backend_for = lambda t: "triton"
    try:
        yield
    finally:
        ops.backend_for = real


def _plain_op(q, k):
    """stattn.region_attention(q, k, k) under no_grad: the op layer and the launcher (the launch a no-op)."""
    import stattn

    def op():
        with torch.no_grad():
            return stattn.region_attention(q, k, k)
    return op


def measure(repeats: int, min_s: float) -> list:
    from stattn.kernels import aot, launch

    rows = []
    for name, M, D, R, T, pinned in PROBLEMS:
        q, k, w, masks, theta, tokens, gy, pin = _inputs(M, D, R, T, pinned)
        scale = D ** -0.5
        fwd = lambda: launch.forward(q, k, k, w, masks, False, theta, tokens, gy, gy, pin, scale)  # noqa: E731
        with aot._captured() as launches:
            _, lse = fwd()
        bwd = lambda: launch.backward(q, q, k, k, w, masks, False, theta, tokens, gy, gy, pin, scale,  # noqa: E731
                                      lse, True, True, True, T > 0)
        kernel, args, meta = launches[0]
        parts = {"forward": fwd, "backward": bwd}
        if R == 1 and not T and not pinned:      # the plain call as the processors make it
            parts["op"] = _plain_op(q, k)
        real, launch._launch = launch._launch, lambda *a: None
        try:
            with _stand_in_launches(kernel, args, meta) as (jit, cached), _op_on_triton():
                jit(), cached()      # compiled (or read from Triton's cache) before the timing
                t = _timed({**parts, "jit_launch": jit, "cached_launch": cached}, repeats, min_s)
        finally:
            launch._launch = real
        row = {"problem": name, "M": M, "D": D, "R": R, "T": T, "pinned": pinned, "forward_args": len(args) + len(meta),
               **{f"{part}_us": t[part]["median"] * 1e3 if part in t else None for part in PARTS},
               "n": t["forward"]["n"]}
        print(f"{name}: op (no_grad) {_us(row['op_us'])}, launcher forward {row['forward_us']:.1f} µs, "
              f"backward {row['backward_us']:.1f} µs; "
              f"forward launch: JIT {row['jit_launch_us']:.1f} µs, cached {row['cached_launch_us']:.1f} µs",
              flush=True)
        rows.append(row)
    return rows


def _us(x, unit=" µs") -> str:
    return "–" if x is None else f"{x:.1f}{unit}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# CUDA launch path, host cost without a GPU ({env['cpu']}, 1 thread)", "",
             f"{provenance(env)}. Medians of single calls, interleaved (≥ {result['repeats']} each). launcher: "
             "stattn.kernels.launch with the launch a no-op. Forward launch, on a stand-in sm_90 driver whose "
             "CUDA launcher is a no-op: through Triton's JITFunction.run (STATTN_TRITON_LAUNCH=jit) and "
             "through stattn's cached launch (the default).", "",
             "| problem | op, no_grad µs | launcher forward µs | launcher backward µs | forward launch, JIT µs | "
             "forward launch, cached µs | forward args |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['problem']} | {_us(r.get('op_us'), '')} | {r['forward_us']:.1f} | {r['backward_us']:.1f} | "
                     f"{r['jit_launch_us']:.1f} | {r['cached_launch_us']:.1f} | {r['forward_args']} |")
    lines += ["", "op: `stattn.region_attention(q, k, v)` under no_grad, routed to the Triton launcher as on CUDA, "
                  "the launch a no-op (the op layer and the launcher; the plain problems only). An eager CUDA call "
                  "costs about op + cached launch + Triton's CUDA launcher."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2000, help="at least this many calls of each part")
    p.add_argument("--min-time", type=float, default=1.0, help="more repeats until the parts take about S seconds")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.min_time < 0:
        p.error(f"--min-time must be at least 0, got {args.min_time}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the launches are compiled for sm_90 (the interpreter replaces the kernels)")
    torch.set_num_threads(1)
    rows = measure(args.repeats, args.min_time)
    publish({"environment": machine("cpu"), "repeats": args.repeats, "min_time_s": args.min_time, "rows": rows},
            args.out, "launch-host", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
