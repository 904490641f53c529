"""The CUDA launch path's host cost, measured without a GPU: stattn's launcher and Triton's binder.

    python -m bench.launch_host [--repeats 2000] [--min-time 1] [--out bench/results]

On a GPU an eager call of the op costs, on the host: stattn's op layer, its launcher
(``stattn.kernels.launch``: output allocation, strides, grid, meta-parameters), Triton's JIT
binder (specialisation of every argument and the compiled-kernel lookup) and the driver launch. The
first two and the third are plain Python and can be timed here on CPU tensors of the same shapes:

- ``launcher``: ``launch.forward`` / ``launch.backward`` with the kernel launch itself replaced by a
  no-op (the launcher's own Python and allocations);
- ``triton binder``: Triton's generated binder plus its cache-key lookup on the captured forward
  launch's arguments, built for sm_90 (Triton's CUDA backend, no driver) as ``JITFunction.run``
  calls them at every launch.

What it cannot time: the op layer on CUDA tensors and the driver launch (bench.host --device cuda,
the GPU check's 08-host, measures the whole call there). Problems: the plain cross-attention call
(R = 1) at SD 1.5's M = 256 and 4096, and a controlled one (R = 2, offset, pins). The three are
timed one call at a time, interleaved (bench.native's ``_timed``), medians of at least
``--repeats`` calls each, one thread.
"""
from __future__ import annotations

import argparse
import statistics
import time
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


def _binder(kernel, args, meta):
    """Triton's per-launch binder and cache-key lookup for this launch (JITFunction.run's first steps)."""
    from triton.runtime.jit import compute_cache_key

    from stattn.kernels import aot

    _, _, binder = aot.jit_binder(kernel)    # Triton's CUDA backend for sm_90, no driver
    cache: dict = {}
    options = dict(meta, debug=False, instrumentation_mode="")

    def bind():
        _, specialization, opts = binder(*args, **options)
        return compute_cache_key(cache, specialization, opts)
    return bind


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
        real, launch._launch = launch._launch, lambda *a: None
        try:
            t = _timed({"forward": fwd, "backward": bwd, "binder": _binder(kernel, args, meta)}, repeats, min_s)
        finally:
            launch._launch = real
        row = {"problem": name, "M": M, "D": D, "R": R, "T": T, "pinned": pinned, "forward_args": len(args) + len(meta),
               **{f"{part}_us": t[part]["median"] * 1e3 for part in ("forward", "backward", "binder")},
               "n": t["forward"]["n"]}
        print(f"{name}: launcher forward {row['forward_us']:.1f} µs, backward {row['backward_us']:.1f} µs; "
              f"Triton binder (forward) {row['binder_us']:.1f} µs", flush=True)
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# CUDA launch path, host cost without a GPU ({env['cpu']}, 1 thread)", "",
             f"{provenance(env)}. Medians of single calls, interleaved (≥ {result['repeats']} each). launcher: "
             "stattn.kernels.launch with the launch a no-op; binder: Triton's per-launch binder + cache key "
             "(sm_90 backend) on the forward launch's arguments.", "",
             "| problem | launcher forward µs | launcher backward µs | Triton binder (forward) µs | forward args |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['problem']} | {r['forward_us']:.1f} | {r['backward_us']:.1f} | {r['binder_us']:.1f} | "
                     f"{r['forward_args']} |")
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
    torch.set_num_threads(1)
    rows = measure(args.repeats, args.min_time)
    publish({"environment": machine("cpu"), "repeats": args.repeats, "min_time_s": args.min_time, "rows": rows},
            args.out, "launch-host", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
