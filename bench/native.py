"""Native CPU kernels (csrc/) against the eager PyTorch paths, on the CPU, in one run.

Two parts, at SD 1.5's cross-attention shapes for one layer call (B = 2 images, H = 8 heads,
N = 77 keys; M = 4096 / 1024 / 256 / 64 pixels with D = 40 / 80 / 160 / 160: every cross-attention
layer of SD 1.5's UNet at 512 px, the mid block's 8 x 8 included), fp32:

- the op ``stattn.region_attention`` with R = 1, 2, 4 regions, an offset on 2 target tokens and
  2 pinned tokens (affine, float masks): forward, and forward + backward (grads of q, the region
  weights and theta), STATTN_BACKEND=native against =reference (the eager PyTorch reference);
- the Attention Regulation inner optimisation of one layer call (20 iterations, 2 target tokens):
  the native op (stattn.native.inner_loop) against the released algorithm's eager autograd loop
  (stattn.methods.regulation.reference.reference_inner_loop, the oracle) and against the closed-form
  vectorised PyTorch loop (regulation_core's CPU path).

With the op's forward, its two products alone (q k^T and p v for all regions, torch.bmm: the same
MKL gemm both paths use) are timed too: reference / products bounds what any implementation that
computes both products can gain.

Every timed pair is checked first (native vs reference relative error, recorded). Times are
wall-clock medians (p20/p80 kept) of --repeats repeats after a warm-up (more, up to MAX_REPEATS,
where they would take under --min-time seconds: cheap cells get many), the compared paths interleaved
call by call (so that the shared machine's slow spells hit them alike), with --threads torch threads
(default 1, the steadier comparison on a shared machine; --threads 2 uses both cores of the
development machine). The load average before and after is recorded.

    python -m bench.native [--quick] [--threads 1] [--repeats 3] [--min-time 0] [--out bench/results]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import stattn
from stattn import native
from stattn.methods.regulation import core as rc
from stattn.methods.regulation import reference as rr

from .env import REPO, provenance, machine, publish, quantiles, stattn_backend

B, H, N = 2, 8, 77
SHAPES = [(64, 64, 40), (32, 32, 80), (16, 16, 160), (8, 8, 160)]      # (h, w, D): SD 1.5 at 512 px
REGIONS = (1, 2, 4)
TOKENS, PINNED, ITERS = (2, 5), (0, 7), 20
MAX_REPEATS = 400


def _timed(fns: dict, repeats: int, min_s: float = 0.0) -> dict:
    """{name: ms quantiles and "times_ms" in repeat order} of the callables in `fns`, interleaved:
    each repeat runs every callable once (in a rotating order), so that a slow spell of the shared
    machine hits all of them alike and their ratios stay fair. At least `repeats` repeats, more
    (up to MAX_REPEATS) until the repeats take about `min_s` seconds: the cheap cells, where one
    slow spell would move a median of a few samples, get many."""
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()                                               # warm-up (and the JIT build, if any)
    one = time.perf_counter() - t0                         # about one repeat (a JIT build: more)
    repeats = max(repeats, min(MAX_REPEATS, math.ceil(min_s / max(one, 1e-6))))
    names = list(fns)
    times = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: {**{k: (v * 1e3 if k != "n" else v) for k, v in quantiles(t).items()},
                   "times_ms": [x * 1e3 for x in t]} for name, t in times.items()}


def _paired(slow: dict, fast: dict) -> float:
    """Median over the repeats of slow / fast within one repeat (the two calls ran back to back)."""
    return statistics.median(a / b for a, b in zip(slow["times_ms"], fast["times_ms"]))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def op_inputs(h, w, D, R, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = h * w
    q = torch.randn(B, H, M, D, generator=g)
    k = torch.randn(B, R, H, N, D, generator=g)
    v = torch.randn(B, R, H, N, D, generator=g)
    masks = torch.rand(B, R, M, generator=g)
    weights = 0.25 + torch.rand(B, R, generator=g)
    gy, gx = stattn.gaussian_basis(h, w)
    theta = torch.randn(B, H, len(TOKENS), gy.shape[1], gx.shape[1], generator=g)
    return q, k, v, masks, weights, theta, (gy, gx)


def op_case(h, w, D, R, repeats: int, min_s: float = 0.0) -> dict:
    q, k, v, masks, weights, theta, basis = op_inputs(h, w, D, R)

    def call(backward: bool):
        leaves = [t.detach().requires_grad_(backward) for t in (q, weights, theta)]
        off = stattn.ScoreOffset(leaves[2], TOKENS, basis, pinned=PINNED)
        out = stattn.region_attention(leaves[0], k, v, masks=masks, region_weights=leaves[1], affine=True,
                                      offset=off)
        if not backward:
            return [out]
        return [out, *torch.autograd.grad(out, leaves, torch.ones_like(out) / out.numel() ** 0.5)]

    def on(backend, backward):
        def fn():
            with stattn_backend(backend):
                return call(backward)
        return fn

    # the forward's floor: its two products alone (q k^T, then p v, all regions at once) as torch.bmm,
    # the same MKL gemm both paths use; no implementation of the op can go below it
    qq, kk, vv = q.flatten(0, 1), k.transpose(1, 2).flatten(2, 3).flatten(0, 1), v.transpose(1, 2).flatten(2, 3).flatten(0, 1)

    def products():
        return torch.bmm(torch.bmm(qq, kk.transpose(1, 2)), vv)

    row = {"h": h, "w": w, "M": h * w, "D": D, "R": R}
    results = {backend: on(backend, True)() for backend in ("native", "reference")}
    for mode, backward in (("fwd", False), ("fwdbwd", True)):
        fns = {backend: on(backend, backward) for backend in ("native", "reference")}
        if not backward:
            fns["products"] = products
        for name, t in _timed(fns, repeats, min_s).items():
            row[f"{name}_{mode}_ms"] = t
    row["max_rel_err"] = max(_rel(a, b) for a, b in zip(results["native"], results["reference"]))
    for mode in ("fwd", "fwdbwd"):
        row[f"speedup_{mode}"] = row[f"reference_{mode}_ms"]["median"] / row[f"native_{mode}_ms"]["median"]
        row[f"speedup_paired_{mode}"] = _paired(row[f"reference_{mode}_ms"], row[f"native_{mode}_ms"])
    return row


def loop_case(h, w, D, repeats: int, min_s: float = 0.0) -> dict:
    g = torch.Generator().manual_seed(1)
    M, T = h * w, len(TOKENS)
    q = 1.5 * torch.randn(B, H, M, D, generator=g)
    k = torch.randn(B, H, N, D, generator=g)
    gy, gx = stattn.gaussian_basis(h, w)
    theta0 = torch.rand(B, H, T, gy.shape[1], gx.shape[1], generator=g)      # the release's U[0, 1) init
    tokens = torch.tensor(TOKENS)
    scale, weights, thr = D ** -0.5, (1.0, 80.0, 0.09), rc.default_thr(T)
    qpos = rc.quantile_position(0.9, M, torch.float32)
    runs = {
        "native": lambda: native.inner_loop(q, k, tokens, theta0, gy, gx, scale, ITERS, 100.0, qpos, 0.9, thr / T,
                                            weights),
        "closed_form": lambda: rc._loop_reference(q, k, tokens, theta0, gy, gx, scale, ITERS, 100.0, 0.9,
                                                  weights, thr),
        "eager_autograd": lambda: rr.reference_inner_loop(q, k, list(TOKENS), theta0, (h, w), scale=scale,
                                                          iters=ITERS, thr=thr),
    }
    row = {"h": h, "w": w, "M": M, "D": D, "T": T, "iters": ITERS}
    outs = {name: fn() for name, fn in runs.items()}
    row["best_iter"] = {name: int(o[1]) for name, o in outs.items()}
    row["losses_rel_err_vs_closed_form"] = _rel(outs["native"][2], outs["closed_form"][2])
    row["theta_best_rel_err_vs_closed_form"] = _rel(outs["native"][0], outs["closed_form"][0])
    row["losses_rel_err_vs_eager"] = _rel(outs["native"][2], outs["eager_autograd"][2])
    row["theta_best_rel_err_vs_eager"] = _rel(outs["native"][0], outs["eager_autograd"][0])
    for name, t in _timed(runs, repeats, min_s).items():
        row[f"{name}_ms"] = t
    for name in ("closed_form", "eager_autograd"):
        row[f"speedup_vs_{name}"] = row[f"{name}_ms"]["median"] / row["native_ms"]["median"]
        row[f"speedup_paired_vs_{name}"] = _paired(row[f"{name}_ms"], row["native_ms"])
    return row


def _ms(d: dict) -> str:
    return f"{d['median']:.1f} ({d['p20']:.1f}-{d['p80']:.1f})"


def markdown(res: dict) -> str:
    e = res["environment"]
    lines = [f"# Native CPU kernels vs eager PyTorch ({e['device_name']})", "",
             f"{provenance(e)}; {e['torch_threads']} threads, fp32, B={B} H={H} N={N}; "
             f"load average before/after {res['load_before']} / {res['load_after']} "
             "(shared machine: other jobs may have run at the same time). Times in ms: median (p20-p80) "
             f"of at least {res['repeats']} runs after a warm-up (more where they took under "
             f"{res.get('min_time_s', 0):g} s: see the repeats columns), the compared paths interleaved call by call.", "",
             "## stattn.region_attention (offset on 2 tokens, 2 pinned, affine)", "",
             "| M | D | R | native fwd | reference fwd | speed-up (paired) | fwd's 2 products alone (bmm) | speed-up bound | native fwd+bwd | reference fwd+bwd | speed-up (paired) | max rel err | repeats fwd / fwd+bwd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["op"]:
        bound = r["reference_fwd_ms"]["median"] / r["products_fwd_ms"]["median"]
        lines.append(f"| {r['M']} | {r['D']} | {r['R']} | {_ms(r['native_fwd_ms'])} | {_ms(r['reference_fwd_ms'])} | "
                     f"{r['speedup_fwd']:.1f}x ({r['speedup_paired_fwd']:.1f}x) | {_ms(r['products_fwd_ms'])} | "
                     f"{bound:.1f}x | {_ms(r['native_fwdbwd_ms'])} | {_ms(r['reference_fwdbwd_ms'])} | "
                     f"{r['speedup_fwdbwd']:.1f}x ({r['speedup_paired_fwdbwd']:.1f}x) | {r['max_rel_err']:.1e} | "
                     f"{r['native_fwd_ms']['n']} / {r['native_fwdbwd_ms']['n']} |")
    lines += ["", "Speed-up: the ratio of the medians; in parentheses the paired speed-up, the median over the "
              "repeats of the two paths' ratio within one repeat (their calls ran back to back), steadier "
              "where a slow spell of the shared machine hit some repeats. Speed-up bound: reference forward / "
              "its two products alone, the most any implementation that computes both products with the "
              "same gemm can gain over the reference."]
    lines += ["", f"## Attention Regulation inner loop ({ITERS} iterations, T = {len(TOKENS)})", "",
              "| M | D | native | closed-form PyTorch | speed-up (paired) | eager autograd (released) | speed-up (paired) | best iter (nat/cf/eager) | rel err losses / theta_best vs closed form | vs eager | repeats |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["inner_loop"]:
        b = r["best_iter"]
        lines.append(f"| {r['M']} | {r['D']} | {_ms(r['native_ms'])} | {_ms(r['closed_form_ms'])} | "
                     f"{r['speedup_vs_closed_form']:.1f}x ({r['speedup_paired_vs_closed_form']:.1f}x) | "
                     f"{_ms(r['eager_autograd_ms'])} | {r['speedup_vs_eager_autograd']:.1f}x "
                     f"({r['speedup_paired_vs_eager_autograd']:.1f}x) | "
                     f"{b['native']}/{b['closed_form']}/{b['eager_autograd']} | "
                     f"{r['losses_rel_err_vs_closed_form']:.1e} / {r['theta_best_rel_err_vs_closed_form']:.1e} | "
                     f"{r['losses_rel_err_vs_eager']:.1e} / {r['theta_best_rel_err_vs_eager']:.1e} | {r['native_ms']['n']} |")
    lines += ["", "In fp32 the loop is ill-conditioned: the quantile's gradient sits on one or two pixels, and "
              "where two pixels' probabilities are a few ulp apart, rounding decides which one gets it (a 5-ulp "
              "near-tie flipped by different logit rounding changed one head's step by half at M = 1024), so "
              "any two of the three fp32 implementations can drift apart by 1e-3..1e-1 after 20 steps while "
              "the best iterate agrees. In fp64 the native loop matches the closed form to 1e-15 "
              "(tests/test_native.py checks 1e-9)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.native", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the M = 1024 shape only")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-time", type=float, default=0.0, metavar="S",
                   help="more repeats (up to %d) where fewer would take under S seconds per timed group" % MAX_REPEATS)
    p.add_argument("--threads", type=int, default=1, help="torch threads for every timed call")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    if not native.load():
        print(f"native extension unavailable: {native._state.get('error')}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    shapes = SHAPES[1:2] if args.quick else SHAPES
    load_before = os.getloadavg()
    op_rows, loop_rows = [], []
    for h, w, D in shapes:
        for R in REGIONS:
            op_rows.append(op_case(h, w, D, R, args.repeats, args.min_time))
            r = op_rows[-1]
            print(f"op M={h * w} D={D} R={R}: fwd {r['speedup_fwd']:.1f}x ({r['speedup_paired_fwd']:.1f}x paired), "
                  f"fwd+bwd {r['speedup_fwdbwd']:.1f}x ({r['speedup_paired_fwdbwd']:.1f}x)", flush=True)
        loop_rows.append(loop_case(h, w, D, args.repeats, args.min_time))
        r = loop_rows[-1]
        print(f"inner loop M={h * w}: {r['speedup_vs_eager_autograd']:.1f}x "
              f"({r['speedup_paired_vs_eager_autograd']:.1f}x paired) vs eager autograd, "
              f"{r['speedup_vs_closed_form']:.1f}x vs closed form", flush=True)
    result = {"environment": machine("cpu"), "repeats": args.repeats, "min_time_s": args.min_time, "dtype": "float32",
              "load_before": [round(x, 2) for x in load_before],
              "load_after": [round(x, 2) for x in os.getloadavg()],
              "op": op_rows, "inner_loop": loop_rows}
    publish(result, args.out, "native", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
