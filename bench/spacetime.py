"""Spatial-temporal attention control end to end, side by side in one process:

  plain            stattn.Runner, fused attention, no controller
  fused n=k        SpatialTemporal with k objects, fixed weights: one region_attention call per layer
                   for the cond rows (+ one plain call for the uncond rows)
  unfused n=k      the released structure: k + 2 separate attention calls per layer (SDPA: uncond,
                   full prompt, each object), combined in PyTorch (object K/V cached, as in the fused path)
  optimise pass    one SpatialTemporal.optimize pass (3 objects): differentiable sampling with
                   checkpointing, VAE decode, CLIP loss (ViT-B/32 architecture with random weights on
                   a GPU, a tiny CLIP on the CPU), backward, Adam step

Variants alternate within each repeat on the same Runner; the medians are compared with plain
(overhead = T / T_plain − 1); peak memory per variant on CUDA; the unfused images are compared
with the fused ones (same objects, weights and seed).

    python -m bench.spacetime                               # GPU: full:sd15 at 512 px, 50 steps, fp16
    python -m bench.spacetime --model tiny --steps 4        # CPU: the harness on the tiny model
Results (JSON + Markdown, with device, versions, commit) go to bench/results/.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import stattn
from stattn.integration import models
from stattn.integration.runner import Runner
from stattn.methods.spacetime.controller import SpatialTemporal

from .env import REPO, provenance, machine, publish, quantiles, sync

DEFAULT_OUT = REPO / "bench" / "results"
PROMPT = "a photo of a cat, a dog, a bird, a frog and a horse"
OBJECTS = ["cat", "dog", "bird", "frog", "horse"]
COUNTS = (1, 3, 5)


class UnfusedSpatialTemporal(SpatialTemporal):
    """The released computation order: every region its own attention call, combined eagerly."""

    def attention(self, call):
        c0 = self._cond_start(call)
        kc, vc = self._region_kv(call, c0)
        q, s = call.q, call.scale
        outs = [F.scaled_dot_product_attention(q[c0:], kc[:, r], vc[:, r], scale=s) for r in range(kc.shape[1])]
        alpha = (self.step_weights(call)[:, None] * self._grid_masks(call)).to(q.dtype)     # [n, M]
        out_u = F.scaled_dot_product_attention(q[:c0], call.k[:c0, 0], call.v[:c0, 0], scale=s) if c0 else None
        base = outs[0] if self.mode == "same_branch" else out_u
        out_c = outs[0]
        for i, o in enumerate(outs[1:]):
            out_c = out_c + alpha[i][None, None, :, None] * (o - base)
        return out_c if out_u is None else torch.cat([out_u, out_c])


def measure(model: str, size: int, steps: int, repeats: int, device: str, dtype: torch.dtype, mode: str,
            optimise: bool, log=print) -> dict:
    pipe = models.resolve(model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    runner = Runner(pipe)
    controllers = {"plain": None}
    for n in COUNTS:
        controllers[f"fused n={n}"] = SpatialTemporal(OBJECTS[:n], mode=mode)
        controllers[f"unfused n={n}"] = UnfusedSpatialTemporal(OBJECTS[:n], mode=mode)
    times = {name: [] for name in controllers}
    peak = {}
    outputs = {}
    for rep in range(repeats + 1):            # rep 0 warms up (compiles, allocator, cuDNN plans)
        for name, ctrl in controllers.items():
            if ctrl is None:
                stattn.accelerate(runner)
            else:
                ctrl.apply(runner, prompt=PROMPT)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            t0 = time.perf_counter()
            out = runner(PROMPT, steps=steps, height=size, width=size, seed=0, output_type="pt").images
            sync(device)
            if rep:
                times[name].append((time.perf_counter() - t0) * 1e3)
            else:
                outputs[name] = out.float().cpu()
                if device == "cuda":
                    peak[name] = torch.cuda.max_memory_allocated()
    base = statistics.median(times["plain"])
    result = {"model": model, "size": size, "steps": steps, "repeats": repeats, "mode": mode, "variants": {}}
    for name in controllers:
        q = quantiles(times[name])
        row = {"ms": q, "vs_plain": q["median"] / base - 1.0, "peak_bytes": peak.get(name)}
        if name.startswith("unfused"):
            row["max_abs_diff_vs_fused"] = (outputs[name] - outputs[name.replace("unfused", "fused")]).abs().max().item()
        result["variants"][name] = row
        extra = f"  diff vs fused {row['max_abs_diff_vs_fused']:.2e}" if "max_abs_diff_vs_fused" in row else ""
        log(f"  {name:14s} {q['median']:9.1f} ms  ({row['vs_plain']:+.1%}){extra}")
    if optimise:
        result["optimise"] = measure_optimise(runner, size, steps, device, dtype, mode, base, log)
    stattn.restore(runner)
    return result


def measure_optimise(runner, size, steps, device, dtype, mode, plain_ms, log) -> dict:
    """Optimisation, 3 objects, from the same W and x_T: one differentiable pass (forward + backward
    + Adam step) after a warm-up, full and with gradients truncated to the last k UNet evaluations
    (the cheaper option); its effect: the loss change over two updates and how the first update of
    W lines up with the full one (cosine)."""
    # the released loss model's architecture (ViT-B/32, random weights) on a GPU, a tiny CLIP on the CPU
    clip = (models.random_clip(dtype=dtype, device=device) if device == "cuda"
            else models.tiny_clip(0, dtype=dtype, device=device))
    st = SpatialTemporal(OBJECTS[:3], mode=mode)
    st.apply(runner, prompt=PROMPT)
    w0 = st.W[:, :1].contiguous()
    truncated = max(1, steps // 5)
    out, first_update = {}, {}
    for grad_steps in (None, truncated):
        name = "full" if grad_steps is None else f"last {grad_steps} steps"
        res = None
        for _ in range(2):                        # the first run warms up
            st.W = w0.clone()
            res = st.optimize(runner, PROMPT, clip=clip, steps=steps, passes=3, seed=0, height=size, width=size,
                              grad_steps=grad_steps)
        ms = statistics.median(res.pass_ms)
        first_update[name] = (res.weights[0] - w0.cpu().expand_as(res.weights[0])).flatten().double()
        out[name] = {"grad_steps": grad_steps, "pass_ms": ms, "vs_plain_generation": ms / plain_ms,
                     "peak_bytes": res.peak_bytes, "losses": [float(x) for x in res.losses]}
        peak = f", peak {res.peak_bytes / 2**30:.2f} GiB" if res.peak_bytes else ""
        log(f"  optimise {name:14s} {ms:9.1f} ms per pass ({ms / plain_ms:.2f}x a plain generation{peak}), "
            f"losses {out[name]['losses']}")
    full = first_update["full"]
    for name, d in first_update.items():
        out[name]["cos_first_update_vs_full"] = float(torch.nn.functional.cosine_similarity(d, full, dim=0))
    out["clip"] = "ViT-B/32 architecture (random weights)" if device == "cuda" else "tiny"
    return out


def markdown(run: dict) -> str:
    env = run["environment"]
    lines = [f"# spatial-temporal control end to end: {env['device_name']}, {env['dtype']}", "",
             f"{provenance(env)}; "
             f"prompt {PROMPT!r}, objects the first n of {OBJECTS}, seed 0, CFG 7.5, one image, value checks "
             f"off; times: median [p20–p80] over {run['repeats']} alternated repeats after one warm-up.", ""]
    for m in run["models"]:
        lines += [f"## {m['model']}, {m['size']} px, {m['steps']} steps, mode {m['mode']}", "",
                  "| variant | time per image | vs plain | peak memory | max |Δ image| unfused vs fused |",
                  "|---|---|---|---|---|"]
        for name, v in m["variants"].items():
            q = v["ms"]
            mem = f"{v['peak_bytes'] / 2**30:.2f} GiB" if v["peak_bytes"] else "—"
            diff = f"{v['max_abs_diff_vs_fused']:.1e}" if "max_abs_diff_vs_fused" in v else ""
            lines.append(f"| {name} | {q['median']:.1f} [{q['p20']:.1f}–{q['p80']:.1f}] ms | {v['vs_plain']:+.1%} | "
                         f"{mem} | {diff} |")
        if "optimise" in m:
            o = m["optimise"]
            lines += ["", f"Optimisation (3 objects, CLIP {o['clip']}, Adam, passes = 3 from the same W and x_T):", "",
                      "| gradients | time per pass | vs a plain generation | peak memory | losses (before each update) "
                      "| cos(first ΔW, full) |", "|---|---|---|---|---|---|"]
            for name, v in o.items():
                if not isinstance(v, dict):
                    continue
                mem = f"{v['peak_bytes'] / 2**30:.2f} GiB" if v["peak_bytes"] else "—"
                losses = ", ".join(f"{x:.4f}" for x in v["losses"])
                lines.append(f"| {name} | {v['pass_ms']:.1f} ms | {v['vs_plain_generation']:.2f}x | {mem} | {losses} | "
                             f"{v['cos_first_update_vs_full']:.3f} |")
        lines.append("")
    if env["device"] == "cpu":
        lines += ["CPU: stattn's op runs its CPU path here; this checks the harness, the GPU run is the measurement."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench.spacetime", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="full:sd15" if cuda else "tiny")
    p.add_argument("--size", type=int, help="image size (default: 512, tiny 64)")
    p.add_argument("--steps", type=int, default=50 if cuda else 4)
    p.add_argument("--repeats", type=int, default=5 if cuda else 2)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16" if cuda else "fp32")
    p.add_argument("--mode", choices=("same_branch", "uncond_ref"), default="same_branch")
    p.add_argument("--no-optimise", action="store_true", help="skip the optimisation pass")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    args.size = args.size or (64 if "tiny" in args.model else 512)
    return args


def run(args, log=print) -> dict:
    torch.manual_seed(0)
    env = machine(args.device)
    env["dtype"] = str(args.dtype).removeprefix("torch.")
    checks = stattn.set_value_checks(False)   # the NaN checks read values (a host sync per call)
    try:
        m = measure(args.model, args.size, args.steps, args.repeats, args.device, args.dtype, args.mode,
                    not args.no_optimise, log)
    finally:
        stattn.set_value_checks(checks)
    return {"environment": env, "repeats": args.repeats, "models": [m]}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    publish(result, args.out, "spacetime", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
