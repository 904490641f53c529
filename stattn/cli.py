"""The `stattn` command: generate (images + attention heatmaps + JSON report), bench, profile.

    stattn generate --model tiny --prompt "a photo of a cat and a frog" --out out/
    stattn generate --model DIR --prompt "..." --method regulation --targets cat frog --steps 50
    stattn generate --model DIR --prompt "a cat to the left of a frog" --method spacetime [--optimize --clip DIR]
    stattn bench micro --quick            # bench.micro's options; results in ./bench-results
    stattn bench e2e --model tiny         # bench.e2e's options
    stattn bench native --quick           # the native CPU kernels (also regulation, spacetime)
    stattn profile --model tiny --prompt "..." --out prof/
    stattn doctor                         # backends available here, why not, versions
    stattn --version

Errors in what the user gave (model directory, method, target word, size) print one line and
exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch

METHODS = ("none", "regulation", "spacetime")
BENCH_SUITES = ("micro", "e2e", "native", "regulation", "spacetime")  # modules of stattn.bench
BENCH_OUT = "bench-results"  # `stattn bench`'s default --out, under the current directory
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# words not worth a heatmap when no --targets are given
STOP_WORDS = frozenset("a an the of and or on in at to with without from by for is are photo picture "
                       "image painting next left right above below under top".split())


class UsageError(Exception):
    """Something the user gave is wrong: one line, exit status 2."""


# ------------------------------------------------------------------------- arguments
def _common(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--model", required=True, help="a diffusers model directory, or tiny / tiny-sd2 / "
                   "tiny-sdxl (random, offline), or full:sd15 / full:sd2-base / full:sdxl (random weights)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--method", default="none", help=f"attention control: {', '.join(METHODS)}")
    p.add_argument("--targets", nargs="+", help="words of the prompt to edit / to show heatmaps of "
                   "(default for heatmaps: the prompt's content words; spacetime: its objects, default "
                   "found in the prompt)")
    st = p.add_argument_group("spacetime (spatial-temporal control)")
    st.add_argument("--layout", help="object boxes as 'name [x, y, w, h]' lines on a 512 canvas (text or a "
                    "file); default: placed from the relations the prompt states")
    st.add_argument("--spacetime-mode", default="same_branch", choices=("same_branch", "uncond_ref"))
    st.add_argument("--optimize", action="store_true", help="optimise the temporal weights against CLIP first")
    st.add_argument("--clip", help="CLIP model directory for --optimize (or 'tiny': a random tiny CLIP)")
    st.add_argument("--passes", type=int, default=3, help="--optimize: generations, as released (3)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, help="height and width in pixels (default: the model's)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--scheduler", help="a diffusers scheduler class name, e.g. DPMSolverMultistepScheduler")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the UNet step as a CUDA graph")
    p.add_argument("--out", type=Path, default=Path(out_default))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="stattn", description="fused attention control for diffusion")
    p.add_argument("--version", action="version", version=f"stattn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images, attention heatmaps and a JSON report")
    _common(g, "stattn-out")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-maps", action="store_true", help="skip recording the attention maps "
                   "(they cost a little time; the report's timings then show the plain run)")
    b = sub.add_parser("bench", help="benchmarks: micro (the op), e2e (whole generations), native (the C++ "
                       "CPU kernels), regulation, spacetime", description="results (.json, .md) go to "
                       f"--out DIR, default ./{BENCH_OUT} (under the current directory)")
    b.add_argument("suite", choices=BENCH_SUITES)
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of python -m bench.<suite>")
    sub.add_parser("doctor", help="which backends run here (native CPU build and its ISA, Triton, CUDA), "
                   "why one is missing, versions")
    pr = sub.add_parser("profile", help="torch.profiler trace (Chrome JSON) and per-op table of a generation")
    _common(pr, "stattn-profile")
    return p


# ------------------------------------------------------------------------- generate / profile
def _load(args):
    from .runner import Runner

    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.method not in METHODS:
        raise UsageError(f"--method: unknown method {args.method!r}; available: {', '.join(METHODS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    dtype = DTYPES[args.dtype or ("fp16" if args.device == "cuda" else "fp32")]
    try:
        return Runner.from_pretrained(args.model, dtype=dtype, device=args.device,
                                      scheduler=args.scheduler, cuda_graphs=args.cuda_graphs)
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(f"--model {args.model}: {_one_line(e)}") from e


def _targets(runner, args) -> tuple[list, list]:
    """(key indices, labels) of the target words; every word must be in the prompt."""
    from .tokens import token_indices

    words = args.targets or [w for w in _words(args.prompt) if w not in STOP_WORDS] or _words(args.prompt)[:1]
    try:  # one call: a repeated word takes its successive occurrences
        tokens = token_indices(runner.pipe.tokenizer, args.prompt, words)
    except ValueError as e:
        raise UsageError(f"--targets: {_one_line(e)}") from e
    ids = runner.pipe.tokenizer(args.prompt).input_ids
    labels = [runner.pipe.tokenizer.decode([ids[i]]).strip() if i < len(ids) else str(i) for i in tokens]
    return tokens, labels


def _words(prompt: str) -> list:
    return [w.strip(".,;:!?\"'()").lower() for w in prompt.split() if w.strip(".,;:!?\"'()")]


def _controller(runner, args, tokens):
    if args.method == "regulation":
        from .regulation import AttentionRegulation

        if not args.targets:
            raise UsageError("--method regulation needs --targets (the words whose attention to regulate)")
        try:
            # released defaults; edits the first 25 steps (all of them in a shorter run)
            method = AttentionRegulation(targets=list(args.targets), edit_steps=min(25, args.steps),
                                         cfg=args.guidance > 1.0)
            method.apply(runner, prompt=args.prompt)
        except ValueError as e:
            raise UsageError(f"--method regulation: {_one_line(e)}") from e
        return method
    if args.method == "spacetime":
        return _spacetime(runner, args)
    return None


def _spacetime(runner, args):
    from .spacetime import SpatialTemporal

    layout = args.layout
    if layout is not None and Path(layout).is_file():
        layout = Path(layout).read_text()
    if args.optimize and not args.clip:
        raise UsageError("--optimize needs --clip DIR (a CLIP model directory; the released code uses ViT-B/32)")
    try:
        method = SpatialTemporal(objects=list(args.targets) if args.targets else "auto", layout=layout,
                                 mode=args.spacetime_mode, cfg=args.guidance > 1.0)
        method.apply(runner, prompt=args.prompt)
        if args.optimize:
            from . import models

            clip = models.tiny_clip() if args.clip == "tiny" else args.clip
            method.optimize(runner, args.prompt, clip=clip, steps=args.steps, passes=args.passes, seed=args.seed,
                            guidance_scale=args.guidance, height=args.size, width=args.size,
                            num_images=args.num_images)
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(f"--method spacetime: {_one_line(e)}") from e
    return method


def _generate(runner, args, profile_dir=None, maps=True):
    from .maps import AttentionMaps
    from .processors import accelerate

    tokens, labels = _targets(runner, args)
    method = _controller(runner, args, tokens)
    inner = method if method is not None else None
    recorder = AttentionMaps(tokens, inner=inner) if maps else None
    if recorder is not None:
        accelerate(runner, controller=recorder)
    elif method is None:
        accelerate(runner)
    size = args.size
    try:
        result = runner(args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                        guidance_scale=args.guidance, height=size, width=size, num_images=args.num_images,
                        seed=args.seed, progress=not getattr(args, "no_progress", True), profile=profile_dir)
    except ValueError as e:
        raise UsageError(_one_line(e)) from e
    return result, recorder, labels, method


def cmd_generate(args) -> int:
    from .maps import heatmap_figure

    runner = _load(args)
    result, recorder, labels, method = _generate(runner, args, maps=not args.no_maps)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, img in enumerate(result.images):
        path = out / f"image_{i}.png"
        img.save(path)
        written.append(path)
    if recorder is not None:
        maps = recorder.maps()
        for i, img in enumerate(result.images):
            path = out / f"attention_{i}.png"
            heatmap_figure(img, maps[i], labels).save(path)
            written.append(path)
    report = result.report()
    report["settings"].update(method=args.method, targets=args.targets, heatmap_tokens=labels,
                              model_arg=args.model, maps_recorded=recorder is not None)
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    written.append(path)
    med = report["step_ms_median"]
    print(f"generated {len(result.images)} image(s) in {result.total_ms / 1e3:.2f} s "
          f"({med:.1f} ms per step, median)")
    for p in written:
        print(f"  {p}")
    return 0


def cmd_profile(args) -> int:
    runner = _load(args)
    _generate(runner, args, maps=False)  # warm-up: compiles and allocations out of the trace
    result, *_ = _generate(runner, args, profile_dir=args.out, maps=False)
    print(result.table)
    print(f"trace: {result.trace}\nper-op table: {Path(args.out) / 'ops.txt'}")
    return 0


def cmd_bench(args) -> int:
    import importlib

    suite = importlib.import_module(f".bench.{args.suite}", __package__)
    rest = [a for a in args.args if a != "--"]
    # an installed stattn.bench would write next to itself (site-packages): default to the cwd
    if not any(a == "--out" or a.startswith("--out=") for a in rest):
        rest += ["--out", str(Path.cwd() / BENCH_OUT)]
    return suite.main(rest)


def cmd_doctor(args) -> int:
    from . import doctor

    return doctor.main([])


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Optional[list] = None) -> int:
    # diffusers imports transformers' image processors we never use, which warn without torchvision
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    handler = {"generate": cmd_generate, "profile": cmd_profile, "bench": cmd_bench,
               "doctor": cmd_doctor}[args.command]
    try:
        return handler(args)
    except UsageError as e:
        print(f"stattn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
