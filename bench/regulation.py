"""Micro-benchmark of one Attention-Regulation layer call's inner loop (stattn.methods.regulation.core.inner_loop).

Per case (B cond images, H heads, a 16x16 grid, D, N = 77 keys, T targets, 20 iterations) and
implementation, after a correctness gate against the fp64 loop on the same inputs:

  fused        the Triton kernels (2 launches; on CPU: the Triton interpreter)
  fused+blend  the same plus theta_eff and the carried state (inner_loop_blend, still 2 launches)
  torch        the closed-form PyTorch loop (STATTN_BACKEND=reference)

it reports the time per call (CUDA: host wall time per call in a loop of back-to-back calls,
which is what a launch-bound op costs, and the replay time of a CUDA graph of one call, which is
the device time; CPU: perf_counter), and the launches per call: Triton launches counted at
stattn.kernels.launch._launch, and on CUDA every kernel the profiler sees (torch ops included).

Usage:
    python -m bench.regulation [--device cuda|cpu] [--quick] [--out DIR] [--aot] [--warps N]

--aot compiles the kernels for sm_90 with Triton's real compiler (no GPU needed; TRITON_INTERPRET
must be unset) and prints registers, spill stack and shared memory per variant.
Writes regulation-<device>-<time>.json and .md into --out (default bench/results/).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

import stattn
from stattn.methods.regulation import core as rc

from .env import REPO, provenance, machine, publish, stattn_backend

N_KEYS, ITERS = 77, 20
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cases(device: str, quick: bool) -> list[tuple]:
    """(B, H, h, w, D, T, dtype name): SD2-base's 16x16 layers (H = 5/10/20, D = 64) on CUDA;
    tiny shapes on the CPU, where the interpreter runs every iteration in Python."""
    if device == "cuda":
        heads = (5, 20) if quick else (5, 10, 20)
        targets = (1, 3) if quick else (1, 2, 3)
        return [(1, H, 16, 16, 64, T, "float16") for H in heads for T in targets]
    return [(1, 2, 8, 8, 16, T, "float32") for T in ((1,) if quick else (1, 3))]


def make_inputs(case, device, seed=0):
    B, H, h, w, D, T, dt = case
    g = torch.Generator().manual_seed(seed)
    q = (1.5 * torch.randn(B, H, h * w, D, generator=g)).to(device, DTYPES[dt])
    k = torch.randn(B, H, N_KEYS, D, generator=g).to(device, DTYPES[dt])
    gy, gx = stattn.gaussian_basis(h, w, device=device)
    theta0 = torch.rand(B, H, T, gy.shape[1], gx.shape[1], generator=g).to(device)
    tokens = (torch.randperm(N_KEYS - 1, generator=g)[:T] + 1).to(device)
    return q, k, tokens, theta0, (gy, gx)


def call(inp, D):
    q, k, tokens, theta0, basis = inp
    return rc.inner_loop(q, k, tokens, theta0, basis, scale=D ** -0.5, iters=ITERS)


def call_blend(inp, D, state, step):
    """The loop plus the across-steps blend (theta_eff, carried state) in the same launches."""
    q, k, tokens, theta0, basis = inp
    out = rc.inner_loop_blend(q, k, tokens, theta0, basis, state, step, scale=D ** -0.5, iters=ITERS)
    return rc.InnerResult(out.theta_best, out.best_iter, out.losses)


def gate(res, inp) -> dict:
    """Against the fp64 loop: loss error, whether best_iter agrees, theta_best error."""
    q, k, tokens, theta0 = (t.cpu() for t in inp[:4])
    gy, gx = (g.cpu() for g in inp[4])
    _, best, losses, traj = rc._loop_reference(
        q.double(), k.double(), tokens, theta0.double(), gy.double(), gx.double(), q.shape[-1] ** -0.5, ITERS,
        100.0, 0.9, (1.0, 80.0, 0.09), rc.default_thr(tokens.numel()), trajectory=True)
    got_best = int(res.best_iter)
    loss_err = ((res.losses.cpu().double() - losses).norm() / losses.norm()).item()
    theta_err = ((res.theta_best.cpu().double() - traj[got_best]).norm() / traj[got_best].norm()).item()
    near_tie = abs(losses[got_best] - losses[best]).item() <= 1e-4 * abs(losses[best]).item()
    ok = loss_err < 1e-3 and theta_err < 1e-3 and (got_best == int(best) or near_tie)
    return {"ok": bool(ok), "loss_err": loss_err, "theta_err": theta_err, "best_iter": got_best,
            "best_iter_fp64": int(best)}


@contextlib.contextmanager
def launch_counter():
    from stattn.kernels import launch

    counts = {"triton": 0}
    original = launch._launch

    def counted(*args):
        counts["triton"] += 1
        return original(*args)

    launch._launch = counted
    try:
        yield counts
    finally:
        launch._launch = original


def profiled_kernels(fn) -> int:
    """Device kernels one call launches, as the CUDA profiler sees them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def wall_us(fn, device: str, reps: int) -> dict:
    """Median and p20/p80 of per-call wall time; on CUDA the mean over back-to-back batches of
    calls with one synchronisation per batch (a launch-bound op: the host time is the cost)."""
    fn()
    samples = []
    batch = 20 if device == "cuda" else 1
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / batch * 1e6)
    s = torch.tensor(samples, dtype=torch.float64)
    p = s.quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"median": p[0], "p20": p[1], "p80": p[2], "reps": reps, "calls_per_rep": batch}


def graph_us(fn) -> dict:
    """Replay time of a CUDA graph holding one call (device time, no host overhead)."""
    from triton.testing import do_bench_cudagraph

    med, p20, p80 = do_bench_cudagraph(fn, rep=200, quantiles=[0.5, 0.2, 0.8])
    return {"median": med * 1e3, "p20": p20 * 1e3, "p80": p80 * 1e3}


def measure(case, device: str, quick: bool) -> dict:
    D = case[4]
    inp = make_inputs(case, device)
    row = {"case": dict(zip(("B", "H", "h", "w", "D", "T", "dtype"), case)), "impls": {}}
    state = inp[3].clone()
    step = torch.full((), 3, dtype=torch.int64, device=device)
    impls = {"fused": ("triton", lambda: call(inp, D)),
             "fused+blend": ("triton", lambda: call_blend(inp, D, state, step)),
             "torch": ("reference", lambda: call(inp, D))}
    for impl, (name, fn) in impls.items():
        if quick and impl == "fused+blend" and device == "cpu":
            continue
        with stattn_backend(name):
            with launch_counter() as counts:
                res = fn()
            entry = {"gate": gate(res, inp), "triton_launches": counts["triton"]}
            reps = 5 if device == "cpu" and impl != "torch" else (10 if quick else 30)
            entry["wall_us"] = wall_us(fn, device, reps)
            if device == "cuda":
                entry["kernels_per_call"] = profiled_kernels(fn)
                with contextlib.suppress(Exception):   # reported as missing if capture fails
                    entry["graph_us"] = graph_us(fn)
            row["impls"][impl] = entry
    f, t = row["impls"]["fused"], row["impls"]["torch"]
    row["speedup_wall"] = t["wall_us"]["median"] / f["wall_us"]["median"]
    return row


# ------------------------------------------------------------------------------- sm_90 compiles

def capture(case):
    """The launches of one call with meta tensors (no memory, no device)."""
    from stattn.kernels import aot
    from stattn.kernels import regulation as kreg

    B, H, h, w, D, T, dt = case
    meta = dict(device="meta")
    q = torch.empty(B, H, h * w, D, dtype=DTYPES[dt], **meta)
    k = torch.empty(B, H, N_KEYS, D, dtype=DTYPES[dt], **meta)
    gy, gx = (torch.empty(n, kk, **meta) for n, kk in
              zip((h, w), (g.shape[1] for g in stattn.gaussian_basis(h, w))))
    tokens = torch.empty(T, dtype=torch.int64, **meta)
    theta0 = torch.empty(B, H, T, gy.shape[1], gx.shape[1], **meta)
    step = torch.empty((), dtype=torch.int64, **meta)
    with aot._captured() as launches:
        for blend in (None, (torch.empty_like(theta0), step, 0.99, 0.25)):   # plain, and with the blend
            kreg.inner_loop(q, k, tokens, theta0, gy, gx, D ** -0.5, ITERS, 100.0,
                            rc.quantile_position(0.9, h * w), 0.9, 0.2, (1.0, 80.0, 0.09), blend=blend)
    return launches


AOT_CASES = [(1, 20, 16, 16, 64, T, "float16") for T in (1, 2, 3)] + [
    (1, 10, 16, 16, 64, 3, "bfloat16"), (1, 5, 16, 16, 40, 3, "float32"), (1, 5, 24, 24, 64, 3, "float16"),
    (1, 5, 32, 32, 64, 3, "float16"), (1, 5, 8, 8, 64, 3, "float16"), (1, 5, 16, 16, 64, 8, "float16"),
    (1, 5, 64, 64, 64, 2, "float16")]


def compile_report(problems=AOT_CASES, arch: int = 90) -> list[dict]:
    """Compile every distinct launch for the target; rows of kernel resources."""
    from triton.backends.compiler import GPUTarget

    from stattn.kernels import aot

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_report: unset TRITON_INTERPRET (it replaces the kernels this compiles)")
    rows, seen = [], set()
    for case in problems:
        for kernel, args, meta in capture(case):
            key = (kernel.__name__, tuple(sorted(meta.items())), case[-1])
            if key in seen:
                continue
            seen.add(key)
            compiled = aot.compile_launch(kernel, args, meta, GPUTarget("cuda", arch, 32))
            use = aot.resource_usage(compiled.asm["cubin"])
            rows.append({"case": "B={} H={} {}x{} D={} T={} {}".format(*case), "kernel": kernel.__name__,
                         "num_warps": meta["num_warps"], "blend": bool(meta.get("BLEND")), "REG": use.get("REG"),
                         "STACK": use.get("STACK"), "LOCAL": use.get("LOCAL"), "SHARED": compiled.metadata.shared})
    return rows


def override_warps(num_warps: int) -> None:
    from stattn.kernels import regulation as kreg

    config = kreg.config

    def patched(*args, **kwargs):
        return {**config(*args, **kwargs), "num_warps": num_warps}

    kreg.config = patched


# ------------------------------------------------------------------------------------- reports

def markdown(run: dict) -> str:
    env = run["environment"]
    lines = [f"# Attention-Regulation inner loop, one layer call ({ITERS} iterations)", "",
             f"{env['device_name']} · {provenance(env)}",
             "",
             "| case | impl | gate (loss err / theta err / best) | wall µs/call (p20–p80) | graph µs | "
             "Triton launches | kernels/call |", "|---|---|---|---|---|---|---|"]
    for row in run["cases"]:
        c = row["case"]
        name = f"B={c['B']} H={c['H']} {c['h']}x{c['w']} D={c['D']} T={c['T']} {c['dtype']}"
        for impl, e in row["impls"].items():
            g, w = e["gate"], e["wall_us"]
            graph = f"{e['graph_us']['median']:.1f}" if "graph_us" in e else "–"
            lines.append(f"| {name} | {impl} | {'ok' if g['ok'] else 'FAIL'} {g['loss_err']:.1e} / "
                         f"{g['theta_err']:.1e} / {g['best_iter']} | {w['median']:.1f} ({w['p20']:.1f}–{w['p80']:.1f}) "
                         f"| {graph} | {e['triton_launches']} | {e.get('kernels_per_call', '–')} |")
    lines += ["", "Wall time: host time per call of back-to-back calls (CUDA: batches of 20, one sync each). "
              "Graph: replay of a CUDA graph holding one call (device time). On the CPU the fused path is the "
              "Triton interpreter: its times say nothing about a GPU."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.regulation", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--aot", action="store_true", help="sm_90 compile report instead of timings")
    p.add_argument("--warps", type=int, help="override the loop kernel's num_warps (tuning on a GPU)")
    args = p.parse_args(argv)
    if args.warps:
        override_warps(args.warps)
    if args.aot:
        rows = compile_report()
        print("| case | kernel | blend | warps | REG | STACK | LOCAL | SHARED |\n|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['case']} | {r['kernel']} | {int(r['blend'])} | {r['num_warps']} | {r['REG']} | {r['STACK']} | "
                  f"{r['LOCAL']} | {r['SHARED']} |")
        return 1 if any(r["STACK"] or r["LOCAL"] for r in rows) else 0
    if args.device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            if "stattn.kernels" in sys.modules:
                p.error("--device cpu needs TRITON_INTERPRET=1 set before the kernels are imported")
            os.environ["TRITON_INTERPRET"] = "1"   # read by triton.jit when the kernels are imported
        torch.set_num_threads(1)
    run = {"environment": machine(args.device), "iters": ITERS, "warps_override": args.warps,
           "cases": [measure(c, args.device, args.quick) for c in cases(args.device, args.quick)]}
    publish(run, args.out, "regulation", markdown)
    return 0 if all(e["gate"]["ok"] for r in run["cases"] for e in r["impls"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
