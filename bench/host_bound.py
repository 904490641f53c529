"""Where stattn's op beats SDPA inside a denoising step: the measurement behind HOST_BOUND_MACS.

A call's cost inside a UNet evaluation differs from its cost in a hot loop: between two
cross-attention calls the step runs ~1 ms of other code, which evicts the op's code and state,
while SDPA's stays warm from the self-attention layers. So every plain cross-attention call of
accelerated UNets is timed in place, the whole evaluation alternating between stattn's op and SDPA
(with the same K/V cache and processor around them), grouped by shape (B, H, M, N, D), medians.
The processors' HOST_BOUND_MACS is set to 0 for the run (every call to the op, timed or not).

    python -m bench.host_bound [--evals 12] [--threads 1] [--out bench/results]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import stattn
from stattn.integration import models, processors

from .env import REPO, machine, provenance, publish

# (model, px, UNet evaluations): the tiny model's and SD 1.5's smallest layers, 0.16 M to 50 M multiply-adds
CASES = (("tiny", 64, 100), ("sd15", 64, 12), ("sd15", 128, 12), ("sd15", 256, 6))


def in_context(name: str, px: int, evals: int) -> list:
    """Per shape: median in-step time of the op's and of SDPA's plain calls, alternating by evaluation."""
    pipe = models.tiny() if name == "tiny" else models.full(name, dtype=torch.float32)
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, px // 8, px // 8, generator=g)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a photo of a cat and a frog", "cpu", 1, True)[:2]
    context, t = torch.cat([uncond, cond]), torch.tensor(500)
    times: dict = {}
    use = ["op"]
    real = processors.region_attention

    def timed(q, k, v, scale=None):
        start = time.perf_counter()
        o = real(q, k, v, scale=scale) if use[0] == "op" else \
            F.scaled_dot_product_attention(q, k[:, 0], v[:, 0], scale=scale)
        elapsed = time.perf_counter() - start
        B, H, M, D = q.shape
        times.setdefault((B, H, M, k.shape[3], D), {"op": [], "sdpa": []})[use[0]].append(elapsed)
        return o

    saved = processors.HOST_BOUND_MACS, processors.region_attention
    processors.HOST_BOUND_MACS, processors.region_attention = 0, timed
    try:
        stattn.accelerate(unet)
        with torch.no_grad():
            for i in range(evals + 2):
                use[0] = ("op", "sdpa")[i % 2]
                unet(x, t, encoder_hidden_states=context)
                if i == 1:
                    times.clear()              # the first evaluation of each (K/V projected, first calls)
    finally:
        processors.HOST_BOUND_MACS, processors.region_attention = saved
        stattn.restore(unet)
    rows = []
    for (B, H, M, N, D), r in sorted(times.items(), key=lambda kv: kv[0][0] * kv[0][1] * kv[0][2] * kv[0][4]):
        op, sdpa = statistics.median(r["op"]) * 1e6, statistics.median(r["sdpa"]) * 1e6
        rows.append({"model": name, "px": px, "B": B, "H": H, "M": M, "N": N, "D": D, "macs": B * H * M * N * D,
                     "op_us": op, "sdpa_us": sdpa, "ratio": op / sdpa, "n": min(len(r["op"]), len(r["sdpa"]))})
    return rows


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Plain cross-attention calls inside a UNet evaluation: stattn's op vs SDPA ({env['device_name']}, "
             f"{result['threads']} thread(s), fp32)", "",
             f"{provenance(env)}. Each call timed in place, evaluations alternating op / SDPA, medians; "
             f"HOST_BOUND_MACS as shipped: {result['host_bound_macs']} (calls at or below it run SDPA).", "",
             "| model | px | B × H × M × N × D | M multiply-adds | op µs | SDPA µs | op / SDPA | n |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['px']} | {r['B']} × {r['H']} × {r['M']} × {r['N']} × {r['D']} | "
                     f"{r['macs'] / 1e6:.2f} | {r['op_us']:.0f} | {r['sdpa_us']:.0f} | {r['ratio']:.2f} | {r['n']} |")
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_bound", description=__doc__.split("\n\n")[0])
    p.add_argument("--evals", type=int, default=None, help="UNet evaluations per case (default: per case)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", default=None, help="comma-separated model:px, e.g. tiny:64,sd15:128 (default: all)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    if args.evals is not None and args.evals < 2:
        p.error(f"--evals must be at least 2 (one of each), got {args.evals}")
    evals_of = {(m, px): n for m, px, n in CASES}
    cases = CASES
    if args.cases:
        try:
            cases = tuple((m, int(px), evals_of.get((m, int(px)), 12))
                          for m, px in (c.split(":") for c in args.cases.split(",")))
        except ValueError:
            p.error(f"--cases must be model:px pairs separated by commas (e.g. tiny:64,sd15:128), got {args.cases!r}")
    torch.set_num_threads(args.threads)
    rows = []
    for name, px, evals in cases:
        case = in_context(name, px, args.evals or evals)
        for r in case:
            print(f"{name} {px}px M={r['M']} D={r['D']}: op {r['op_us']:.0f} vs SDPA {r['sdpa_us']:.0f} µs "
                  f"({r['ratio']:.2f}x)", flush=True)
        rows += case
    result = {"environment": machine("cpu"), "threads": args.threads, "host_bound_macs": processors.HOST_BOUND_MACS,
              "cases": [list(c) for c in cases], "rows": rows}
    publish(result, args.out, "host-bound", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
