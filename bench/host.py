"""Host cost: is the drop-in ever slower than stock? Per call and per step, side by side in one run.

Three tables, every comparison interleaved call by call (the shared machine's slow spells hit both
alike), medians (p20/p80 kept) of many repeats, one torch thread by default:

- op: ``stattn.region_attention`` (R = 1, the plain path) against
  ``torch.nn.functional.scaled_dot_product_attention`` at host-bound shapes (M = 16 .. 256 queries,
  D = 40 / 64 / 160, B = 2, H = 8, N = 77), under ``torch.no_grad()``, with grad mode on and no
  input requiring grad (what a pipeline call outside ``no_grad`` does), and forward + backward with
  q, k, v requiring grad (a loss through the attention). Target: ratio <= 1.0.
- processor: one diffusers ``Attention`` layer at every SD 1.5 (512 px) and SDXL (1024 px)
  cross-attention shape, ``AttnProcessor2_0`` against stattn's fused processor
  (``StattnAttnProcessor``), the same context at every call as in a generation (stattn's K/V cache then
  serves it). Target: ratio <= 1.00.
- step: the denoising step of a whole pipeline call (``callback_on_step_end`` timestamps; the first
  step dropped), the stock pipeline against the same pipeline after ``stattn.accelerate``, for the
  tiny model and (unless --quick) SD 1.5's architecture with random weights at 256 px, with how many
  of the accelerated cross-attention calls were host-bound and ran SDPA (``HOST_BOUND_MACS``).
  Target <= 1.00.

On CUDA (``--device cuda``, fp16 by default) a timed sample is a burst of ``CUDA_BURST`` calls then
one synchronize, divided by the burst: the per-call time of back-to-back eager calls, which is the
host's cost wherever that exceeds the kernel's (no CUDA graphs: the way ``accelerate`` runs in a
stock pipeline); the steps synchronize at every step. The SD 1.5 step runs at 512 px there.

The result files are rewritten (whole, then renamed) after each table and step, marked
``"complete": false`` until the end: a run cut short (a time-out) keeps what it measured.

    python -m bench.host [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--quick | --op-only] [--threads 1]
                         [--repeats 30] [--min-time 1] [--step-runs 20] [--out bench/results]
    stattn bench host [--quick | --op-only]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import stattn
from stattn.integration import models
from stattn.integration.processors import StattnAttnProcessor

from .env import REPO, machine, provenance, publish, result_stem, sync, write_results
from .native import _paired, _timed

B, H, N = 2, 8, 77
HOST_M = (16, 64, 256)
HOST_D = (40, 64, 160)
# (model, M, query dim, heads, head dim, context dim): every cross-attention shape of the UNet
SD15 = [("sd15", 4096, 320, 8, 40, 768), ("sd15", 1024, 640, 8, 80, 768), ("sd15", 256, 1280, 8, 160, 768),
        ("sd15", 64, 1280, 8, 160, 768)]
SDXL = [("sdxl", 4096, 640, 10, 64, 2048), ("sdxl", 1024, 1280, 20, 64, 2048)]
PROMPT = "a photo of a cat and a frog"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = 1e-4          # fp32 on the CPU: the compared paths agree to rounding (checked before timing)
# the others: fp16 / bf16 round the outputs (eps 1e-3 / 8e-3), CUDA's Triton kernels take tf32 products in fp32
TOLS = {("cpu", torch.float32): TOL, ("cuda", torch.float32): 5e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
CUDA_BURST = 20     # calls per timed sample on CUDA, then one synchronize


def tolerance(device: str, dtype: torch.dtype) -> float:
    """The gate's bound on max |stattn - stock| / max(1, max |stock|) for this device and dtype."""
    return TOLS[(device, dtype)] if dtype == torch.float32 else TOLS[dtype]


def _diff(ours, stock) -> float:
    """max over the pairs of max |a - b| / max(1, max |b|), in fp64."""
    return max(float((a.detach().double() - b.detach().double()).abs().max() /
                     max(1.0, float(b.detach().double().abs().max()))) for a, b in zip(ours, stock))


def _gate(what: str, err: float, tol: float = TOL) -> float:
    if not err <= tol:
        raise AssertionError(f"{what}: stattn and stock differ by {err:g} (> {tol:g}); not timing a wrong result")
    return err


def _per_call(fns: dict, device: str) -> tuple:
    """(fns as timed, calls per sample): on CUDA each sample is CUDA_BURST calls and a synchronize."""
    if device == "cpu":
        return fns, 1

    def burst(fn):
        def run():
            for _ in range(CUDA_BURST):
                fn()
            torch.cuda.synchronize()
        return run
    return {name: burst(fn) for name, fn in fns.items()}, CUDA_BURST


def _timed_calls(fns: dict, repeats: int, min_s: float, device: str) -> dict:
    """_timed of the callables, per call (ms; "times_ms" too), bursts on CUDA."""
    timed, calls = _per_call(fns, device)
    t = _timed(timed, repeats, min_s)
    return {name: {k: (v if k == "n" else [x / calls for x in v] if k == "times_ms" else v / calls)
                   for k, v in r.items()} for name, r in t.items()}


# the op table's modes: under torch.no_grad(); grad mode on with no input requiring grad (a pipeline
# call outside no_grad); inputs requiring grad, forward and backward timed together (a loss through
# the attention: training, LoRA, Attend-and-Excite's latent update)
MODES = ("no_grad", "grad mode", "fwd+bwd")


def op_case(M: int, D: int, mode: str, repeats: int, min_s: float, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> dict:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    g = torch.Generator().manual_seed(M * 1000 + D)
    backward = mode == "fwd+bwd"
    like = dict(device=device, dtype=dtype)
    q = torch.randn(B, H, M, D, generator=g).to(**like).requires_grad_(backward)
    k, v = (torch.randn(B, 1, H, N, D, generator=g).to(**like).requires_grad_(backward) for _ in range(2))
    grad_out = torch.randn(B, H, M, D, generator=g).to(**like)

    def ours():
        o = stattn.region_attention(q, k, v)
        return (o, *torch.autograd.grad(o, (q, k, v), grad_out)) if backward else (o,)

    def sdpa():
        o = F.scaled_dot_product_attention(q, k[:, 0], v[:, 0])
        return (o, *torch.autograd.grad(o, (q, k, v), grad_out)) if backward else (o,)

    fns = {"stattn": ours, "sdpa": sdpa}
    if device == "cuda":     # the same calls with every launch through Triton's JITFunction.run
        fns["stattn-jit"] = _jit_launched(ours)
    with torch.set_grad_enabled(mode != "no_grad"):
        err = _gate(f"op M={M} D={D} {mode}", _diff(ours(), sdpa()), tolerance(device, dtype))
        t = _timed_calls(fns, repeats, min_s, device)
    row = {"M": M, "D": D, "mode": mode, "max_diff": err, "stattn_us": t["stattn"]["median"] * 1e3,
           "sdpa_us": t["sdpa"]["median"] * 1e3, "ratio": t["stattn"]["median"] / t["sdpa"]["median"],
           "ratio_paired": _paired(t["stattn"], t["sdpa"]), "n": t["stattn"]["n"],
           "stattn": _drop_times(t["stattn"]), "sdpa": _drop_times(t["sdpa"])}
    if "stattn-jit" in t:
        row.update(stattn_jit_us=t["stattn-jit"]["median"] * 1e3,
                   ratio_jit=t["stattn-jit"]["median"] / t["sdpa"]["median"], stattn_jit=_drop_times(t["stattn-jit"]))
    return row


def _jit_launched(fn):
    """fn with stattn's cached Triton launch off (STATTN_TRITON_LAUNCH=jit's path) while it runs."""
    from stattn.kernels import launch

    def run():
        cached, launch._CACHED = launch._CACHED, False
        try:
            return fn()
        finally:
            launch._CACHED = cached
    return run


def processor_case(model: str, M: int, C: int, heads: int, D: int, Cx: int, repeats: int, min_s: float,
                   device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    with torch.random.fork_rng():
        torch.manual_seed(M + C)
        attn = Attention(query_dim=C, cross_attention_dim=Cx, heads=heads, dim_head=D).eval().to(device, dtype)
        x = torch.randn(B, M, C).to(device, dtype)
        ctx = torch.randn(B, N, Cx).to(device, dtype)
    stock, fused = AttnProcessor2_0(), StattnAttnProcessor()

    def run(proc):
        return lambda: proc(attn, x, encoder_hidden_states=ctx)

    with torch.no_grad():
        err = _gate(f"processor {model} M={M}", _diff([run(fused)()], [run(stock)()]), tolerance(device, dtype))
        t = _timed_calls({"stattn": run(fused), "stock": run(stock)}, repeats, min_s, device)
    return {"model": model, "M": M, "C": C, "heads": heads, "D": D, "context_dim": Cx, "max_diff": err,
            "stattn_ms": t["stattn"]["median"], "stock_ms": t["stock"]["median"],
            "ratio": t["stattn"]["median"] / t["stock"]["median"], "ratio_paired": _paired(t["stattn"], t["stock"]),
            "n": t["stattn"]["n"], "stattn": _drop_times(t["stattn"]), "stock": _drop_times(t["stock"])}


def step_case(name: str, pipe, size: int, steps: int, runs: int) -> dict:
    """Per-step wall times of whole pipeline calls, stock and accelerated alternately (synchronized
    at every step on CUDA)."""
    times: dict = {"stock": [], "stattn": []}
    calls = {}
    device = pipe.unet.device

    def call(accelerated: bool) -> list:
        (stattn.accelerate if accelerated else stattn.restore)(pipe)
        stamps = []

        def stamp(p, i, t, kw):
            sync(device)
            stamps.append(time.perf_counter())
            return kw

        pipe(PROMPT, num_inference_steps=steps, height=size, width=size, output_type="latent",
             generator=torch.Generator().manual_seed(0), callback_on_step_end=stamp)
        if accelerated:
            st = stattn.status(pipe)
            calls.update(fused=st.fused_calls, sdpa=st.sdpa_calls)
        return [b - a for a, b in zip(stamps, stamps[1:])]   # step 0 (its warm-up) dropped

    pipe.set_progress_bar_config(disable=True)
    call(False), call(True)                                   # warm-up both
    pairs = []
    for i in range(runs):
        run = {}
        for which in (("stock", "stattn") if i % 2 == 0 else ("stattn", "stock")):
            run[which] = [s * 1e3 for s in call(which == "stattn")]
            times[which] += run[which]
        pairs.append(statistics.median(run["stattn"]) / statistics.median(run["stock"]))
    stattn.restore(pipe)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "size": size, "steps": steps, "runs": runs, "stock_ms": med["stock"],
            "stattn_ms": med["stattn"], "ratio": med["stattn"] / med["stock"], "ratio_paired": statistics.median(pairs),
            "n": len(times["stock"]), "fused_calls": calls["fused"], "sdpa_calls": calls["sdpa"]}


def _drop_times(t: dict) -> dict:
    return {k: v for k, v in t.items() if k != "times_ms"}


def _table(title: str, columns: list, rows: list, cells) -> list:
    """A Markdown section: title, header, one line per row from cells(row) -> list of strings."""
    lines = ["", f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cells(r)) + " |" for r in rows]


def markdown(result: dict) -> str:
    env = result["environment"]
    device, dtype = env["device"], result["dtype"]
    how = (f"{result['threads']} thread(s)" if device == "cpu" else
           f"bursts of {result.get('cuda_burst', CUDA_BURST)} eager calls, then a synchronize")
    lines = [f"# Host cost: stattn vs stock ({env['device_name']}, {how}, {dtype})", "",
             f"{provenance(env)}. Medians of interleaved repeats, per call; ratio = stattn / stock (target <= 1.00); "
             "paired = median of the per-repeat ratios."]
    jit = any("stattn_jit_us" in r for r in result["op"])    # CUDA: also every launch through Triton's JIT
    lines += _table("The op (R = 1) vs SDPA at host-bound shapes (B = 2, H = 8, N = 77)",
                    ["M", "D", "mode", "stattn µs", "SDPA µs", "ratio", "paired", "n"] +
                    (["stattn, JIT launch µs", "its ratio"] if jit else []), result["op"],
                    lambda r: [str(r["M"]), str(r["D"]), r["mode"], f"{r['stattn_us']:.1f}",
                               f"{r['sdpa_us']:.1f}", f"{r['ratio']:.2f}", f"{r['ratio_paired']:.2f}", str(r["n"])] +
                    ([f"{r['stattn_jit_us']:.1f}", f"{r['ratio_jit']:.2f}"] if jit else []))
    if jit:
        lines += ["", "JIT launch: the same calls with STATTN_TRITON_LAUNCH=jit's path (every launch through "
                      "Triton's JITFunction.run), alternated with the others."]
    if not (result["processor"] or result["step"]):
        lines += ["", "(--op-only: the op's table alone.)"]
    if result["processor"]:
        lines += _table("One cross-attention layer: stattn's processor vs AttnProcessor2_0 (B = 2, no_grad)",
                        ["model", "M", "C", "heads × D", "stattn ms", "stock ms", "ratio", "paired", "n"], result["processor"],
                        lambda r: [r["model"], str(r["M"]), str(r["C"]), f"{r['heads']} × {r['D']}",
                                   f"{r['stattn_ms']:.3f}", f"{r['stock_ms']:.3f}", f"{r['ratio']:.2f}",
                                   f"{r['ratio_paired']:.2f}", str(r["n"])])
    if result["step"]:
        lines += _table("Denoising step of a pipeline call: stock vs `stattn.accelerate(pipe)`",
                        ["model", "px", "stattn ms", "stock ms", "ratio", "paired (per run)", "steps timed",
                         "SDPA / fused calls"],
                        result["step"],
                        lambda r: [r["model"], str(r["size"]), f"{r['stattn_ms']:.2f}", f"{r['stock_ms']:.2f}",
                                   f"{r['ratio']:.2f}", f"{r.get('ratio_paired', float('nan')):.2f}", str(r["n"]),
                                   f"{r['sdpa_calls']} / {r['fused_calls']}" if "sdpa_calls" in r else "-"])
    if result.get("complete") is False:
        lines += ["", "**Partial result**: written before the run ended (the tables or steps after these are missing)."]
    worst = max([r["ratio"] for r in result["op"] + result["processor"] + result["step"]])
    lines += ["", f"Worst ratio: {worst:.2f} ({'every cell within' if worst <= 1.0 else 'over'} the 1.00 target).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="M = 16 / 256, D = 64, the SD 1.5 processor shapes, "
                       "the tiny model's steps only")
    which.add_argument("--op-only", action="store_true", help="the op's cells only (every M and D), no processor "
                       "or step timings")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--min-time", type=float, default=1.0, metavar="S",
                   help="more repeats where fewer would take under S seconds per timed pair")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every timed call")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default fp32 on cpu, fp16 on cuda")
    p.add_argument("--step-runs", type=int, default=20, metavar="N",
                   help="pipeline calls of the tiny model per side (the SD 1.5 step: 6)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device (torch.cuda.is_available() is False)")
    if args.step_runs < 1:
        p.error(f"--step-runs must be at least 1, got {args.step_runs}")
    device, dtype = args.device, DTYPES[args.dtype or ("fp16" if args.device == "cuda" else "fp32")]
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    Ms, Ds = ((16, 256), (64,)) if args.quick else (HOST_M, HOST_D)
    op, proc, step = [], [], []
    stem = result_stem("host", device)
    environment = machine(device)          # once: it runs git and, on CUDA, nvidia-smi

    def result(complete: bool) -> dict:
        return {"environment": environment, "threads": args.threads, "repeats": args.repeats,
                "min_time_s": args.min_time, "dtype": str(dtype).removeprefix("torch."), "quick": args.quick,
                "op_only": args.op_only, "cuda_burst": CUDA_BURST if device == "cuda" else None,
                "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
                "complete": complete, "op": op, "processor": proc, "step": step}

    def save() -> None:            # after each table and step: a run cut short keeps what it measured
        write_results(result(False), args.out, "host", markdown, stem)

    for mode in MODES:
        for M in Ms:
            for D in Ds:
                op.append(op_case(M, D, mode, args.repeats, args.min_time, device, dtype))
                r = op[-1]
                print(f"op M={M} D={D} {mode}: {r['stattn_us']:.1f} vs {r['sdpa_us']:.1f} µs "
                      f"({r['ratio']:.2f}x)", flush=True)
    save()
    for shape in () if args.op_only else SD15 if args.quick else SD15 + SDXL:
        proc.append(processor_case(*shape, max(5, args.repeats // 3), args.min_time, device, dtype))
        r = proc[-1]
        print(f"processor {r['model']} M={r['M']}: {r['stattn_ms']:.3f} vs {r['stock_ms']:.3f} ms "
              f"({r['ratio']:.2f}x)", flush=True)
    if not args.op_only:
        save()
        step.append(step_case("tiny", models.tiny(dtype=dtype, device=device), 64, 10, args.step_runs))  # many runs: noise
        print(f"step tiny: {step[-1]['stattn_ms']:.2f} vs {step[-1]['stock_ms']:.2f} ms ({step[-1]['ratio']:.2f}x)",
              flush=True)
        save()
    if not (args.quick or args.op_only):
        px = 256 if device == "cpu" else 512                          # a CPU step at 512 px: ~30 s
        # 6 runs: a CPU step is 3-9 s, and the cross-attention's share of it under 1 %
        step.append(step_case("sd15", models.full("sd15", dtype=dtype, device=device), px, 4 if device == "cpu" else 10,
                              6))
        print(f"step sd15 {px}px: {step[-1]['stattn_ms']:.1f} vs {step[-1]['stock_ms']:.1f} ms "
              f"({step[-1]['ratio']:.2f}x)", flush=True)
    publish(result(True), args.out, "host", markdown, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
