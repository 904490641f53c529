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

Errors in what the user gave (model directory, method, target word, size, prompt, seed, device,
--out) print one line and exit with status 2, before any generation starts. `generate` writes
every file atomically (a temporary name in --out, then os.replace), report.json last; it refuses a
non-empty --out unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

METHODS = ("none", "regulation", "spacetime")
BENCH_SUITES = ("micro", "e2e", "native", "regulation", "spacetime")  # modules of stattn.bench
BENCH_OUT = "bench-results"  # `stattn bench`'s default --out, under the current directory
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# words not worth a heatmap when no --targets are given
# the files a `generate` run writes (--overwrite removes an earlier run's), and its temporaries
OUT_FILES = ("image_*.png", "attention_*.png", "report.json", ".*.stattn-tmp")
TMP_SUFFIX = ".stattn-tmp"
SEED_RANGE = 2 ** 64  # torch.Generator.manual_seed
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
    g.add_argument("--overwrite", action="store_true", help="write into a non-empty --out: an earlier "
                   "run's image_*.png, attention_*.png and report.json there are removed first")
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

    device = torch.device(args.device)  # _check_args has run
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    try:
        return Runner.from_pretrained(args.model, dtype=dtype, device=args.device,
                                      scheduler=args.scheduler, cuda_graphs=args.cuda_graphs)
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(f"--model {args.model}: {_one_line(e)}") from e


def _check_args(args) -> None:
    """The checks that need no model: everything wrong here fails before loading anything."""
    from . import models

    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {args.num_images}")
    if args.method not in METHODS:
        raise UsageError(f"--method: unknown method {args.method!r}; available: {', '.join(METHODS)}")
    if not args.prompt.strip():
        raise UsageError(f"--prompt: expected some text, got {args.prompt!r}")
    if not math.isfinite(args.guidance):
        raise UsageError(f"--guidance: expected a finite number, got {args.guidance}")
    if not 0 <= args.seed < SEED_RANGE:
        raise UsageError(f"--seed: expected an integer in [0, 2**64), got {args.seed}")
    _check_device(args.device)
    if args.cuda_graphs and torch.device(args.device).type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA --device, got {args.device!r}")
    if args.scheduler is not None:
        try:
            models._scheduler_class(args.scheduler)
        except ValueError as e:
            raise UsageError(f"--scheduler {args.scheduler}: {_one_line(e)}") from e


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--device {name}: unknown device; expected cpu, cuda[:N] or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: unsupported device type {device.type!r}; expected cpu, cuda[:N] or mps")


def _check_out(out: Path, overwrite: bool) -> None:
    """--out must be a directory (or creatable as one) that we can write to, and empty unless
    --overwrite: a rerun never leaves an earlier run's files mixed with the new ones."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    existing = out
    while not existing.exists():  # the nearest existing ancestor, where the folders get created
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a directory")
    try:  # a real probe: os.access says yes to root on a read-only file system
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".probe.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write in {existing} ({_one_line(e)})") from e
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out}: is not empty; give --overwrite to replace an earlier run's files there")


def _check_maps_size(runner, args) -> None:
    """The heatmaps come from the cross-attention layers within AttentionMaps' max_pixels: at a
    size where every such layer is larger, nothing would be recorded."""
    import inspect

    from .maps import AttentionMaps

    size = args.size or runner.default_size()
    limit = inspect.signature(AttentionMaps).parameters["max_pixels"].default
    cfg = runner.unet.config
    latent = size // runner.pipe.vae_scale_factor
    levels = [i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t]
    if cfg.mid_block_type and "CrossAttn" in cfg.mid_block_type:
        levels.append(len(cfg.down_block_types) - 1)
    if not levels:
        return
    smallest = (latent // 2 ** max(levels)) ** 2
    if smallest > limit:
        raise UsageError(f"--size {size}: too large for the attention heatmaps (the smallest cross-attention "
                         f"layer would be {smallest} pixels, over {limit}); use a smaller --size or --no-maps")


def _targets(runner, args) -> tuple[list, list]:
    """(key indices, labels) of the target words, found in the prompt as the pipeline encodes it:
    truncated to the tokenizer's length (diffusers does so, with a warning)."""
    from .tokens import prompt_ids, token_indices

    tok = runner.pipe.tokenizer
    full = len(tok(args.prompt).input_ids)  # with SOS and EOS
    truncated = full > tok.model_max_length
    if args.targets:
        try:  # one call: a repeated word takes its successive occurrences
            tokens = token_indices(tok, args.prompt, list(args.targets))
        except ValueError as e:
            cut = (f" (the prompt is {full} tokens, truncated to the text encoder's {tok.model_max_length}: "
                   f"a target past the cut is not encoded)" if truncated else "")
            raise UsageError(f"--targets: {_one_line(e)}{cut}") from e
    else:
        words = [w for w in _words(args.prompt) if w not in STOP_WORDS] or _words(args.prompt)[:1]
        if truncated:
            tokens = _default_tokens(tok, args.prompt, words)
        else:
            try:
                tokens = token_indices(tok, args.prompt, words)
            except ValueError as e:
                raise UsageError(f"--prompt: its words for the heatmaps are not found in its tokens "
                                 f"({_one_line(e)}); give --targets") from e
    ids = prompt_ids(tok, args.prompt)
    labels = [tok.decode([ids[i]]).strip() for i in tokens]
    return tokens, labels


def _default_tokens(tok, prompt, words) -> list:
    """The content words that survive the prompt's truncation, in order (those past the cut have
    nothing to show)."""
    from .tokens import token_indices

    kept: list = []
    for w in words:
        try:
            token_indices(tok, prompt, kept + [w])
        except ValueError:
            break  # past the cut: every later word is too
        kept.append(w)
    if not kept:
        raise UsageError("--prompt: no word of the prompt survives its truncation to the text encoder's length")
    return token_indices(tok, prompt, kept)


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

    _check_args(args)
    runner = _load(args)  # a bad --model is named first, even when --out is wrong too
    _check_out(args.out, args.overwrite)
    if not args.no_maps:
        _check_maps_size(runner, args)
    result, recorder, labels, method = _generate(runner, args, maps=not args.no_maps)
    # everything is built before anything is written, so a failure here leaves --out as it was
    files = [(f"image_{i}.png", img) for i, img in enumerate(result.images)]
    if recorder is not None:
        maps = recorder.maps()
        files += [(f"attention_{i}.png", heatmap_figure(img, maps[i], labels)) for i, img in enumerate(result.images)]
    report = result.report()
    report["settings"].update(method=args.method, targets=args.targets, heatmap_tokens=labels,
                              model_arg=args.model, maps_recorded=recorder is not None)
    report["finished"] = True
    out = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: {_one_line(e)}") from e
    if args.overwrite:
        _remove_earlier_run(out)
    written = []
    for name, img in files:
        written.append(_write_atomic(out / name, lambda f, img=img: img.save(f, format="PNG")))
    text = json.dumps(report, indent=2, default=str).encode()
    written.append(_write_atomic(out / "report.json", lambda f: f.write(text)))  # last: the run is complete
    med = report["step_ms_median"]
    print(f"generated {len(result.images)} image(s) in {result.total_ms / 1e3:.2f} s "
          f"({med:.1f} ms per step, median)")
    for p in written:
        print(f"  {p}")
    return 0


def _remove_earlier_run(out: Path) -> None:
    for pattern in OUT_FILES:
        for name in glob.glob(glob.escape(str(out)) + os.sep + pattern, include_hidden=True):
            os.unlink(name)


def _write_atomic(path: Path, write) -> Path:
    """write(file) into a temporary file in path's folder, then os.replace it onto path: an
    interrupted run leaves no truncated file under the real name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cmd_profile(args) -> int:
    _check_args(args)
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
