"""`stattn eval`: generate every (prompt, seed, method) image of a prompt set, score it, record it,
summarise (see docs/eval.md).

    stattn eval --model M --prompts ae|spatial|FILE --methods none,regulation,spacetime --seeds 0-3 \\
        --clip DIR [--detector DIR] --out runs/NAME
    accelerate launch --multi_gpu --num_processes N -m stattn.evaluation ...   # data-parallel on GPUs
    torchrun --standalone --nproc_per_node N -m stattn.evaluation ... --device cpu   # on the CPU (gloo)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from .. import cli as gen_cli
from ..cli import UsageError

DEFAULT_METHODS = "none,regulation,spacetime"
NEEDS_TARGETS = ("regulation", "spacetime")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model (as stattn generate)")
    m.add_argument("--model", required=True, help="a diffusers directory, hub repo id, single-file checkpoint, "
                   "or tiny / tiny-sd2 / tiny-sdxl (random, offline)")
    m.add_argument("--local-files-only", action="store_true")
    m.add_argument("--config", help="a single-file checkpoint's component configs (as stattn generate)")
    m.add_argument("--scheduler", help="a diffusers scheduler class name (default: the model's)")
    m.add_argument("--device", help="cpu, cuda[:N] or mps (default: each process's accelerator, else cpu)")
    m.add_argument("--dtype", choices=tuple(gen_cli.DTYPES), help="default fp16 on cuda, fp32 on cpu")
    m.add_argument("--cuda-graphs", action="store_true")
    w = p.add_argument_group("the work")
    w.add_argument("--prompts", required=True, help="shipped sets ae (= ae-animals, ae-animal-object, ae-objects), "
                   "spatial, or any of them joined by commas; or a file: one prompt a line, or JSON lines with "
                   "prompt, targets, layout, seed")
    w.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated: " + ", ".join(gen_cli.METHODS))
    w.add_argument("--seeds", default="0", help="e.g. 0-3 or 0,5,7 (a file line's own seed replaces them)")
    w.add_argument("--limit", type=int, help="only the first N prompts")
    w.add_argument("--num-inference-steps", "--steps", dest="steps", type=int, default=50)
    w.add_argument("--guidance-scale", "--guidance", dest="guidance", type=float,
                   help="default the pipeline's: 7.5 (SD), 5.0 (SDXL)")
    w.add_argument("--height", type=int)
    w.add_argument("--width", type=int)
    w.add_argument("--size", type=int, help="height and width at once")
    w.add_argument("--spacetime-mode", default="same_branch", choices=("same_branch", "uncond_ref"))
    w.add_argument("--optimize", action="store_true", help="spacetime: optimise the temporal weights against "
                   "--clip first")
    w.add_argument("--passes", type=int, default=3, help="--optimize: generations, as released")
    s = p.add_argument_group("metrics (local model directories)")
    s.add_argument("--clip", help="a transformers CLIPModel directory (or tiny: random weights) for the CLIP "
                   "score and the minimum object similarity")
    s.add_argument("--detector", help="a transformers OWLv2 / OWL-ViT directory (or tiny: random weights) for "
                   "the detection rate")
    s.add_argument("--threshold", type=float, default=0.1, help="the detector's score threshold")
    p.add_argument("--out", type=Path, required=True, help="the run folder (a rerun resumes it)")
    p.add_argument("--quiet", action="store_true", help="no line per finished prompt")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The `eval` subcommand on stattn's subparsers."""
    p = subparsers.add_parser("eval", help="evaluate methods on prompt sets: images, grids, records.jsonl, "
                              "summary with 95 %% intervals; resumable, data-parallel",
                              formatter_class=gen_cli._HelpFormatter)
    _add_arguments(p)
    return p


def parse_seeds(text: str) -> list:
    """'0-3' -> [0, 1, 2, 3]; '0,5,7'; '0-2,9'. Each seed once, in the order given."""
    seeds = []
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            lo_i = int(lo)
            hi_i = int(hi) if hi else lo_i
            if hi_i < lo_i:
                raise ValueError(f"{part.strip()!r} is an empty range")
            seeds += range(lo_i, hi_i + 1)
    except ValueError as e:
        raise UsageError(f"--seeds {text}: expected seeds like 0-3 or 0,5,7 ({gen_cli._one_line(e)})") from e
    for s in seeds:
        gen_cli._check_seed(s, f"--seeds {text}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text}: a seed is given twice")
    return seeds


def parse_methods(text: str) -> list:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in gen_cli.METHODS]
    if not methods or unknown:
        raise UsageError(f"--methods {text}: unknown method(s) {unknown}; available: {', '.join(gen_cli.METHODS)}")
    if len(set(methods)) != len(methods):
        raise UsageError(f"--methods {text}: a method is given twice")
    return methods


def check(args) -> list:
    """Everything that needs no model; returns the prompts."""
    from . import metrics, prompts as P

    args.methods = parse_methods(args.methods)
    args.seeds = parse_seeds(args.seeds)
    for name in ("steps", "passes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('steps', 'num-inference-steps')}: must be at least 1, got "
                             f"{getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit: must be at least 1, got {args.limit}")
    for name in ("height", "width", "size"):
        v = getattr(args, name)
        if v is not None and v < 8:
            raise UsageError(f"--{name}: expected pixels (a positive multiple of 8), got {v}")
    if args.size is not None and (args.height is not None or args.width is not None):
        raise UsageError("--size sets both --height and --width: give either --size or --height/--width")
    if args.device is not None:
        gen_cli._check_device(args.device)
    if args.optimize and not args.clip:
        raise UsageError("--optimize needs --clip DIR")
    if not 0 <= args.threshold <= 1:
        raise UsageError(f"--threshold: expected a score in [0, 1], got {args.threshold}")
    if args.clip is not None and args.clip != "tiny" and not os.path.isdir(args.clip):
        raise UsageError(f"--clip {args.clip}: not a directory (expected a local transformers CLIPModel directory)")
    if args.detector is not None and args.detector != "tiny":
        try:
            metrics.check_detector_dir(args.detector)
        except ValueError as e:
            raise UsageError(f"--detector {args.detector}: {gen_cli._one_line(e)}") from e
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a directory")
    prompts = P.load(args.prompts)[:args.limit]
    for method in args.methods:
        if any(part in NEEDS_TARGETS for part in method.split("+")):   # alone or composed
            for i, p in enumerate(prompts):
                if not p.targets:
                    raise UsageError(f"{p.where or f'--prompts {p.set} prompt {i}'}: --methods {method} needs "
                                     f"targets, and the prompt {p.text!r} names no object; give \"targets\"")
    return prompts


def settings(args, runner) -> dict:
    """What the images and scores depend on besides (prompt, seed, method): its hash keys the records."""
    from .. import __version__

    height, width = gen_cli._size(runner, args)
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    names = {k: (os.path.abspath(v) if v not in (None, "tiny") else v) for k, v in
             (("clip", args.clip), ("detector", args.detector))}
    return {"model": model, "config": args.config, "scheduler": args.scheduler, "dtype": str(runner.dtype),
            "device_type": runner.device.type, "cuda_graphs": args.cuda_graphs, "steps": args.steps,
            "guidance": gen_cli._guidance(runner, args), "height": height, "width": width,
            "spacetime_mode": args.spacetime_mode, "optimize": args.optimize, "passes": args.passes,
            **names, "threshold": args.threshold if args.detector else None, "stattn": __version__}


def _state(device: Optional[str]):
    """accelerate's PartialState: this process's rank, device and share of the work (one process
    without a launcher)."""
    import torch

    try:
        from accelerate import PartialState
    except ImportError as e:
        raise UsageError("stattn eval needs accelerate (pip install accelerate): it shards the work across "
                         "processes, and runs the one-process default too") from e

    cpu = device is not None and torch.device(device).type == "cpu" or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def evaluate(args) -> int:
    from . import records as rec
    from . import run as R
    from . import summary

    prompts = check(args)
    state = _state(args.device)
    if args.device is None or (args.device == "cuda" and state.num_processes > 1):
        args.device = str(state.device)
    args.num_images, args.no_maps = 1, True
    runner = gen_cli._load(args)
    gen_cli._check_size(runner, args)
    for method in args.methods:         # every target checked against its prompt before any image
        margs = R.method_args(args, method)
        for g in R.groups(prompts, args.seeds[:1]):
            gen_cli._resolve(runner, margs, R.item(g))
    scorer = R.Scorer(args.clip, args.detector, args.threshold)
    config = settings(args, runner)
    args.out.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if args.quiet else (lambda s: print(s, flush=True))
    counts = R.run(args, prompts, config, state, runner, scorer, log=log)
    state.wait_for_everyone()
    if state.is_main_process:
        h = counts["settings_hash"]
        keys = R.work_keys(R.groups(prompts, args.seeds), args.methods, h)
        merged = rec.merge(args.out, keys)
        wanted = set(keys)
        mine = [r for r in merged if rec.key(r) in wanted]
        s = summary.write(args.out, mine, scorer.names())
        print(f"stattn eval: {len(mine)} image(s) of {len({k[0] for k in keys})} prompt(s) recorded "
              f"({counts['recorded_before']} before this run), settings {h}\n"
              f"  {args.out / rec.MERGED}\n  {args.out / 'summary.md'}" + (f"\n  {s['plot']}" if s["plot"] else ""))
    return 0


def main(args) -> int:
    """Run `stattn eval` on parsed arguments; a usage error prints one line and returns 2."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return evaluate(args)
    except UsageError as e:
        print(f"stattn eval: error: {e}", file=sys.stderr)
        return 2


def run_cli(argv: Optional[list] = None) -> int:
    """`python -m stattn.evaluation ARGS` (what `stattn eval ARGS` runs)."""
    p = argparse.ArgumentParser(prog="stattn eval", description="evaluate attention-control methods on prompt "
                                "sets (docs/eval.md)",
                                formatter_class=gen_cli._HelpFormatter)
    _add_arguments(p)
    return main(p.parse_args(sys.argv[1:] if argv is None else [str(a) for a in argv]))
