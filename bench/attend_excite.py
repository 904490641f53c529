"""Attend-and-Excite end to end, side by side in one process:

  diffusers             StableDiffusionAttendAndExcitePipeline as shipped (eager attention everywhere, one
                        image at a time, a forward with gradients at every loop turn)
  diffusers+accelerate  the same pipeline after stattn.accelerate: its own loop, its AttentionStore fed by
                        the fused op's maps, SDPA on self-attention
  stattn                stattn.AttendAndExcite on the same components: the loop with the whole batch at once,
                        maps from region_attention(return_probs=...), no forward whose gradient is unused,
                        maps forwards stopped after the last map layer, the UNet's parameters frozen

Same prompt, targets, seed and settings for all; variants alternate within each repeat; medians of the time
per image; peak memory per variant (CUDA: max_memory_allocated; CPU: the process's resident memory sampled
every 5 ms during the call, above its level just before, after malloc_trim); the latents are compared with
diffusers' (max |difference|) and the refinement iteration counts must agree.

    python -m bench.attend_excite                       # CPU: full:sd15 (random weights) at 512 px, 2 steps, 1 thread
    python -m bench.attend_excite --model tiny --size 64 --attn-res 4 4 --repeats 1   # the harness, in seconds
Results (JSON + Markdown, with device, versions, shapes, dtype, commit) go to bench/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import inspect
import os
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

import stattn
from stattn.integration import models

from .env import REPO, machine, provenance, publish, quantiles, sync

DEFAULT_OUT = REPO / "bench" / "results"
PROMPT = "a photo of a cat and a frog"
TARGETS = ["cat", "frog"]
VARIANTS = ("diffusers", "diffusers+accelerate", "stattn")


def _ae_pipeline(base):
    from diffusers import StableDiffusionAttendAndExcitePipeline as AE

    names = inspect.signature(AE.__init__).parameters
    return AE(**{k: v for k, v in base.components.items() if k in names}, requires_safety_checker=False)


@contextlib.contextmanager
def counting_refinements(pipe, max_refinement_steps: Optional[int] = None):
    """The stock A&E pipeline instrumented for the block: yields a list that gets (loop turn, iterations)
    for each refinement as it ends (a refinement aggregates the maps once per iteration and once more at
    the end; the turn is the number of guided, no-grad, UNet forwards before it). max_refinement_steps:
    the pipeline's own parameter of its refinement method (its call has none); None leaves its default."""
    refinements, inside, guided = [], [False, 0], [0]
    refine, aggregate = pipe._perform_iterative_refinement_step, pipe._aggregate_and_get_max_attention_per_token
    cap = {} if max_refinement_steps is None else {"max_refinement_steps": max_refinement_steps}

    def counted_aggregate(*a, **k):
        inside[1] += inside[0]
        return aggregate(*a, **k)

    def counted_refine(*a, **k):
        inside[:] = [True, 0]
        try:
            return refine(*a, **cap, **k)
        finally:
            inside[0] = False
            refinements.append((guided[0], inside[1] - 1))

    def count_guided(module, args):
        guided[0] += not torch.is_grad_enabled()

    object.__setattr__(pipe, "_perform_iterative_refinement_step", counted_refine)
    object.__setattr__(pipe, "_aggregate_and_get_max_attention_per_token", counted_aggregate)
    hook = pipe.unet.register_forward_pre_hook(count_guided)
    try:
        yield refinements
    finally:
        hook.remove()
        del vars(pipe)["_perform_iterative_refinement_step"], vars(pipe)["_aggregate_and_get_max_attention_per_token"]


def refinements_of(ae: stattn.AttendAndExcite) -> list:
    """(loop turn, iterations) of every refinement of the controller's last call, in loop order (as
    :func:`counting_refinements` gives the pipeline's)."""
    return [(i, n) for i in sorted(ae.refinement_iterations) for n in ae.refinement_iterations[i] if n]


class _PeakRSS:
    """The process's resident memory above its level at the start, sampled every 5 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)       # freed heap back to the system: a fair baseline
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.bytes = self.peak - self.base


def measure(args, log=print) -> dict:
    dtype = args.dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        base = models.resolve(args.model, dtype=dtype, device=args.device)
        ae_pipe = _ae_pipeline(base)
    for p in (base, ae_pipe):
        p.set_progress_bar_config(disable=True)
    settings = dict(max_iter_to_alter=args.max_iter_to_alter, thresholds={0: args.threshold},
                    scale_factor=20, attn_res=tuple(args.attn_res))
    indices = stattn.token_indices(base.tokenizer, PROMPT, TARGETS)
    latent = args.size // base.vae_scale_factor

    def noise(size):
        n = size // base.vae_scale_factor
        return torch.randn(args.images, base.unet.config.in_channels, n, n,
                           generator=torch.Generator().manual_seed(0)).to(device=args.device, dtype=dtype)

    def run(name, size=args.size, steps=args.steps, settings=settings):
        kw = dict(num_inference_steps=steps, height=size, width=size, output_type="latent", latents=noise(size),
                  num_images_per_prompt=args.images)
        if name == "stattn":
            ae = stattn.AttendAndExcite(targets=TARGETS, max_refinement_steps=args.max_refinement_steps, **settings)
            ae.apply(base, prompt=PROMPT)
            out = base(PROMPT, **kw).images
            ae.remove(base)
            refinements = refinements_of(ae)
        else:
            (stattn.accelerate if name == "diffusers+accelerate" else stattn.restore)(ae_pipe)
            with counting_refinements(ae_pipe, args.max_refinement_steps) as refinements:
                out = ae_pipe(PROMPT, token_indices=indices, **settings, **kw).images
            stattn.restore(ae_pipe)
        return out, [n for _, n in refinements]

    # one-time costs (kernel loading, first allocations) paid before timing: each variant once, small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = 128 // base.vae_scale_factor // 2         # the second level's grid at 128 px
        small = dict(settings, attn_res=(n, n), max_iter_to_alter=1)
        for name in VARIANTS:
            run(name, size=128, steps=1, settings=small)
    times = {v: [] for v in VARIANTS}
    peak, outputs, counts = {}, {}, {}
    checks = stattn.set_value_checks(False)   # the NaN checks read values (a host sync per call)
    try:
        for rep in range(args.repeats + args.warmup):
            for name in VARIANTS[rep % 3:] + VARIANTS[:rep % 3]:     # each variant first in turn
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(args.device)
                with warnings.catch_warnings(), _PeakRSS() as rss:
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    out, n = run(name)
                    sync(args.device)
                    ms = (time.perf_counter() - t0) * 1e3
                mem = torch.cuda.max_memory_allocated() if args.device == "cuda" else rss.bytes
                peak[name] = max(peak.get(name, 0), mem)
                outputs[name], counts[name] = out.float().cpu(), n
                if rep >= args.warmup:
                    times[name].append(ms / args.images)
                log(f"  repeat {rep}{' (warm-up)' if rep < args.warmup else ''} {name:22s} {ms / 1e3:8.1f} s "
                    f"({ms / 1e3 / args.images:.1f} s per image), peak {mem / 2**30:.2f} GiB, refinements {n}")
    finally:
        stattn.set_value_checks(checks)
    stock = statistics.median(times["diffusers"])
    result = {"model": args.model, "size": args.size, "latent": [latent, latent], "steps": args.steps,
              "turns": len(ae_pipe.scheduler.timesteps), "images": args.images, "prompt": PROMPT,
              "targets": TARGETS, "token_indices": indices, "settings": {**settings, "thresholds": {"0": args.threshold},
                                                                         "max_refinement_steps": args.max_refinement_steps},
              "repeats": args.repeats, "warmup": args.warmup, "variants": {}}
    for name in VARIANTS:
        q = quantiles(times[name])
        result["variants"][name] = {
            "s_per_image": {k: (v / 1e3 if k != "n" else v) for k, v in q.items()},
            "speedup_vs_diffusers": stock / q["median"], "peak_bytes": peak[name],
            "refinement_iterations": counts[name],
            "max_abs_latent_diff_vs_diffusers": (outputs[name] - outputs["diffusers"]).abs().max().item(),
            "max_abs_latent": outputs["diffusers"].abs().max().item()}
    return result


def markdown(run: dict) -> str:
    env, m = run["environment"], run["result"]
    s = m["settings"]
    lines = [f"# Attend-and-Excite end to end: {env['device_name']}, {env['dtype']}, {env['torch_threads']} thread(s)", "",
             f"{provenance(env)}; {m['model']} (random weights), {m['size']} px (latents {m['latent'][0]}x{m['latent'][1]}), "
             f"{m['steps']} steps ({m['turns']} loop turns, PNDM), {m['images']} image(s), CFG 7.5, prompt "
             f"{m['prompt']!r}, targets {m['targets']} (token indices {m['token_indices']}), attn_res "
             f"{tuple(s['attn_res'])}, max_iter_to_alter {s['max_iter_to_alter']}, thresholds {{0: {s['thresholds']['0']}}}, "
             f"max_refinement_steps {s['max_refinement_steps']} (the pipeline's own parameter, set on its refinement "
             f"method), scale_factor {s['scale_factor']}; times per image: median [p20–p80] over {m['repeats']} "
             f"alternated repeat(s) (the order rotated) after {m['warmup']} warm-up repeat(s) and one small run of each.", "",
             "| variant | time per image | speedup vs diffusers | peak memory | refinement iterations | max |Δ latents| vs diffusers |",
             "|---|---|---|---|---|---|"]
    for name, v in m["variants"].items():
        q = v["s_per_image"]
        lines.append(f"| {name} | {q['median']:.1f} s [{q['p20']:.1f}–{q['p80']:.1f}] | {v['speedup_vs_diffusers']:.2f}x | "
                     f"{v['peak_bytes'] / 2**30:.2f} GiB | {v['refinement_iterations']} | "
                     f"{v['max_abs_latent_diff_vs_diffusers']:.1e} (of {v['max_abs_latent']:.1f}) |")
    mem = ("CUDA max_memory_allocated" if env["device"] == "cuda" else
           "resident memory above its level before the call (sampled every 5 ms, after malloc_trim)")
    lines += ["", f"Peak memory: {mem}, largest over the repeats."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench.attend_excite", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="full:sd15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--images", type=int, default=1, help="images per prompt")
    p.add_argument("--attn-res", type=int, nargs=2, default=(16, 16))
    p.add_argument("--max-iter-to-alter", type=int, default=None, help="default: every loop turn")
    p.add_argument("--threshold", type=float, default=0.05, help="turn 0's refinement threshold")
    p.add_argument("--max-refinement-steps", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16" if cuda else "fp32")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.max_iter_to_alter is None:
        args.max_iter_to_alter = args.steps + 1          # PNDM runs steps + 1 turns
    return args


def run(args, log=print) -> dict:
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = machine(args.device)
    env["dtype"] = str(args.dtype).removeprefix("torch.")
    return {"environment": env, "result": measure(args, log)}


def main(argv=None) -> int:
    args = parse_args(argv)
    publish(run(args), args.out, "attend-excite", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
