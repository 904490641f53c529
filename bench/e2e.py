"""End-to-end generation time, side by side in one process: the stock diffusers pipeline, the stock
pipeline with `stattn.accelerate`, and `stattn.Runner` (stock attention, fused attention, CUDA graphs).

    python -m bench.e2e                                  # GPU: SD 1.5 / SD 2-base 512 px, SDXL 1024 px
    python -m bench.e2e --model tiny --steps 10          # CPU: the tiny random model (harness check)
    python -m bench.e2e --model full:sd2-base --variants regulation --scheduler DPMSolverMultistepScheduler

Every variant generates the same prompt with the same seed on the same pipeline object; variants are
alternated within each repeat and the medians compared (overhead = T / T_stock - 1). Full-size
models have random weights (`stattn.integration.models.full`): timing does not depend on weight values.
Results (JSON + Markdown, with device, versions, commit) go to bench/results/.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import stattn
from stattn.integration import models
from stattn.integration.runner import Runner

from .env import REPO, provenance, machine, publish, quantiles, sync

DEFAULT_OUT = REPO / "bench" / "results"
PROMPT = "a photo of a cat and a frog on a bench"
GPU_MODELS = (("full:sd15", 512), ("full:sd2-base", 512), ("full:sdxl", 1024))


@dataclass
class Variant:
    name: str
    make: Callable        # (pipe) -> generate(seed, steps, size) -> images
    own_unet: bool = False  # a UNet of its own: its processors/controller stay installed (graphs bake them in)


def _stock(accelerated: bool) -> Callable:
    def make(pipe):
        (stattn.accelerate if accelerated else stattn.restore)(pipe)

        def generate(seed, steps, size):
            g = torch.Generator(pipe.device).manual_seed(seed)
            return pipe(PROMPT, num_inference_steps=steps, height=size, width=size, generator=g,
                        output_type="pt").images
        return generate
    return make


TARGETS = ["cat", "frog"]


def _regulation(fused: bool, steps: int):
    from stattn.methods.regulation.controller import AttentionRegulation

    # released defaults: the first 25 of 50 steps edited (half of a shorter run)
    return AttentionRegulation(targets=TARGETS, fused=fused, edit_steps=min(25, steps // 2))


METHODS = {"regulation": _regulation}


def _runner(accelerated: bool, cuda_graphs: bool = False, method: str = None, fused: bool = True) -> Callable:
    def make(pipe):
        stattn.restore(pipe)
        runner = Runner(pipe, cuda_graphs=cuda_graphs, accelerate=accelerated)
        applied = {}

        def generate(seed, steps, size):
            if method is not None and applied.get("steps") != steps:
                METHODS[method](fused, steps).apply(runner, prompt=PROMPT)
                applied["steps"] = steps
            return runner(PROMPT, steps=steps, height=size, width=size, seed=seed, output_type="pt").images
        return generate
    return make


VARIANTS = {
    "stock": Variant("stock", _stock(False)),
    "stock+accelerate": Variant("stock+accelerate", _stock(True)),
    "runner (stock attention)": Variant("runner (stock attention)", _runner(False)),
    "runner": Variant("runner", _runner(True), own_unet=True),
    "runner+graphs": Variant("runner+graphs", _runner(True, cuda_graphs=True), own_unet=True),
    # Attention Regulation (targets "cat", "frog"), released defaults
    "regulation": Variant("regulation", _runner(True, method="regulation"), own_unet=True),
    "regulation+graphs": Variant("regulation+graphs", _runner(True, True, method="regulation"), own_unet=True),
    "regulation (reference)": Variant("regulation (reference)", _runner(True, method="regulation", fused=False),
                                      own_unet=True),
}
PRESETS = {
    "default": ["stock", "stock+accelerate", "runner (stock attention)", "runner", "runner+graphs"],
    # issue 4's comparison: plain SD and the method, same runner, fused (eager, graphs) and reference
    "regulation": ["runner", "runner+graphs", "regulation", "regulation+graphs", "regulation (reference)"],
}


def measure_model(model: str, size: int, names: list, steps: int, repeats: int, device: str,
                  dtype: torch.dtype, scheduler=None, log=print) -> dict:
    """Alternate the variants `repeats` times on one pipeline; one warm-up generation each."""
    pipe = models.resolve(model, dtype=dtype, device=device, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipes = {name: _with_own_unet(pipe) if VARIANTS[name].own_unet else pipe for name in names}
    gens = {name: VARIANTS[name].make(pipes[name]) for name in names}
    times = {name: [] for name in names}
    outputs = {}
    for rep in range(repeats + 1):  # rep 0 warms up (compiles, allocator, cuDNN plans)
        for name in names:
            if not VARIANTS[name].own_unet:
                _set_processors(pipe, name)
            sync(device)
            t0 = time.perf_counter()
            out = gens[name](0, steps, size)
            sync(device)
            if rep:
                times[name].append((time.perf_counter() - t0) * 1e3)
            outputs[name] = out
    ref = outputs[names[0]].float()
    result = {"model": model, "size": size, "steps": steps, "repeats": repeats, "variants": {}}
    base = statistics.median(times[names[0]])
    for name in names:
        q = quantiles(times[name])
        diff = (outputs[name].float() - ref).abs().max().item()
        result["variants"][name] = {"ms": q, "vs_first": q["median"] / base - 1.0,
                                    "max_abs_diff_vs_first": diff}
        log(f"  {model} {name:26s} {q['median']:9.1f} ms  ({q['median'] / base - 1:+.1%})  diff {diff:.2e}")
    stattn.restore(pipe)
    return result


def _with_own_unet(pipe):
    """The same pipeline with a copy of its UNet (text encoders and VAE shared)."""
    import copy

    return type(pipe)(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})


def _set_processors(pipe, name):
    """Each variant's attention processors (the pipeline object is shared)."""
    if name in ("stock", "runner (stock attention)"):
        stattn.restore(pipe)
    elif not hasattr(pipe.unet, "_stattn"):
        stattn.accelerate(pipe)


def markdown(run: dict) -> str:
    env = run["environment"]
    lines = [f"# stattn end-to-end: {env['device_name']}, {env['dtype']}", "",
             f"{provenance(env)}; "
             f"prompt {PROMPT!r} (method targets {TARGETS}), seed 0, CFG 7.5 (SDXL 5), "
             f"scheduler {run.get('scheduler') or 'the model default'}; one image; "
             f"times: median [p20–p80] over {run['repeats']} alternated repeats after one warm-up.", ""]
    for m in run["models"]:
        lines += [f"## {m['model']}, {m['size']} px, {m['steps']} steps", "",
                  "| variant | time per image | vs first | max |Δ image| vs first |", "|---|---|---|---|"]
        for name, v in m["variants"].items():
            q = v["ms"]
            lines.append(f"| {name} | {q['median']:.1f} [{q['p20']:.1f}–{q['p80']:.1f}] ms | "
                         f"{v['vs_first']:+.1%} | {v['max_abs_diff_vs_first']:.1e} |")
        lines.append("")
    if env["device"] == "cpu":
        lines += [f"CPU: stattn's op runs its {env['stattn_backend']} backend here (torch threads "
                  f"{env['torch_threads']}); a CPU run checks the harness and gives CPU ratios, the GPU "
                  "run is the measurement."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="model (repeatable): tiny, full:sd15, a directory; "
                   "default: the SD 1.5, SD 2-base and SDXL architectures on a GPU, tiny on the CPU")
    p.add_argument("--size", type=int, help="image size (default: 512, SDXL 1024, tiny 64)")
    p.add_argument("--steps", type=int, default=50 if cuda else 10)
    p.add_argument("--repeats", type=int, default=5 if cuda else 3)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16" if cuda else "fp32")
    p.add_argument("--variants", default="default",
                   help=f"a preset {list(PRESETS)} or comma-separated names, the first is the baseline; "
                        f"from {list(VARIANTS)} (variants with graphs are dropped on the CPU)")
    p.add_argument("--scheduler", help="a diffusers scheduler class name (default: the model's)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    preset = args.variants in PRESETS
    names = PRESETS.get(args.variants) or [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)} or a preset {list(PRESETS)}")
    graphs = [v for v in names if "graphs" in v]
    if graphs and args.device != "cuda":
        if not preset:
            p.error(f"--variants: {graphs} need --device cuda")
        names = [v for v in names if v not in graphs]
    args.variants = names
    args.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    return args


def run(args, log=print) -> dict:
    torch.manual_seed(0)
    if args.model:
        targets = [(m, args.size or (1024 if "sdxl" in m and "tiny" not in m else 64 if "tiny" in m else 512))
                   for m in args.model]
    else:
        targets = list(GPU_MODELS) if args.device == "cuda" else [("tiny", 64)]
    env = machine(args.device)
    env["dtype"] = str(args.dtype).removeprefix("torch.")
    env["stattn_backend"] = stattn.backend_for(torch.empty(0, device=args.device, dtype=args.dtype))
    out = {"environment": env, "repeats": args.repeats, "variants": args.variants,
           "scheduler": args.scheduler, "models": []}
    for model, size in targets:
        out["models"].append(measure_model(model, size, args.variants, args.steps, args.repeats,
                                           args.device, args.dtype, args.scheduler, log))
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    publish(result, args.out, "e2e", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
