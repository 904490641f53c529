"""The `stattn` command: generate (images + attention heatmaps + JSON report), bench, profile.

    stattn generate --model tiny --prompt "a photo of a cat and a frog" --out out/
    stattn generate --model DIR|REPO_ID|FILE.safetensors --prompt "..." --method regulation --targets cat frog
    stattn generate --model DIR --prompt "a cat to the left of a frog" --method spacetime [--optimize --clip DIR]
    stattn generate --model DIR --prompts prompts.txt|prompts.jsonl --out runs/batch
    stattn generate --from-report out/report.json --out again/       # the same images again
    stattn bench micro --quick            # bench.micro's options; results in ./bench-results
    stattn bench native --quick           # the native CPU kernels (also e2e, regulation, spacetime, host)
    stattn eval --model tiny --prompts ae --methods none,regulation --seeds 0-1 --clip tiny --out runs/ae
    stattn profile --model tiny --prompt "..." --out prof/
    stattn doctor                         # backends available here, why not, versions
    stattn --version

Options carry diffusers' names (``--num-inference-steps``, ``--guidance-scale``, ``--height``,
``--width``, ``--num-images-per-prompt``, ``--negative-prompt``); the short forms (``--steps``,
``--guidance``, ``--size``, ``--num-images``) are aliases. Errors in what the user gave print one
line and exit with status 2, before any generation starts. `generate` writes every file atomically
(a temporary name in --out, then os.replace); report.json is written first with ``"finished":
false`` and rewritten last with ``true``; a non-empty --out is refused unless --overwrite is given.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

METHODS = ("none", "regulation", "spacetime", "regulation+spacetime")  # the last: stattn.compose
BENCH_SUITES = ("micro", "e2e", "native", "regulation", "spacetime", "host")  # modules of stattn.bench
BENCH_OUT = "bench-results"  # `stattn bench`'s default --out, under the current directory
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the files a `generate` run writes (--overwrite removes an earlier run's), and its temporaries
OUT_FILES = ("image_*.png", "attention_*.png", "report.json", ".*.stattn-tmp")
TMP_SUFFIX = ".stattn-tmp"
SEED_RANGE = 2 ** 64  # torch.Generator.manual_seed
REPORT_VERSION = 2
# JSONL keys of a --prompts line, and the options --from-report may be combined with
LINE_KEYS = ("prompt", "negative_prompt", "targets", "layout", "seed")
WITH_REPORT = ("from_report", "out", "overwrite", "no_progress", "device", "command")
# words not worth a heatmap when no --targets are given
STOP_WORDS = frozenset("a an the of and or on in at to with without from by for is are photo picture "
                       "image painting next left right above below under top".split())


class UsageError(Exception):
    """Something the user gave is wrong: one line, exit status 2."""


@dataclass
class Item:
    """One prompt of a run (a --prompt, or one line of a --prompts file)."""
    prompt: str
    seed: int
    negative_prompt: Optional[str] = None
    targets: Optional[list] = None
    layout: Optional[str] = None
    where: str = "--prompt"                 # for error messages
    method: Optional[dict] = None           # a method's settings() (from --from-report)
    # resolved before generating
    tokens: list = field(default_factory=list)
    labels: list = field(default_factory=list)


# ------------------------------------------------------------------------- arguments
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except the empty ones (None, False) that say nothing."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _common(p: argparse.ArgumentParser, out_default: str) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", help="a diffusers model directory, a Hugging Face hub repo id (owner/name), a "
                   "single-file checkpoint (.safetensors / .ckpt / .pt / .bin / .pth), or tiny / tiny-sd2 / tiny-sdxl "
                   "(random, offline), or full:sd15 / full:sd2-base / full:sd2 / full:sdxl (random weights)")
    m.add_argument("--local-files-only", action="store_true", help="never download: the hub repo id must be "
                   "in the local Hugging Face cache (also the default under HF_HUB_OFFLINE=1)")
    m.add_argument("--config", help="a single-file checkpoint's component configs and tokenizer: a diffusers "
                   "directory or hub repo id of the same architecture (diffusers' from_single_file config=; "
                   "default: diffusers' hub repo for the checkpoint type, cached or downloaded)")
    m.add_argument("--scheduler", help="a diffusers scheduler class name, e.g. DPMSolverMultistepScheduler "
                   "(default: the model's)")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda[:N] or mps")
    m.add_argument("--dtype", choices=tuple(DTYPES), help="default fp16 on cuda, fp32 on cpu")
    m.add_argument("--cuda-graphs", action="store_true", help="replay the UNet step as a CUDA graph")
    c = p.add_argument_group("generation (diffusers' pipeline arguments)")
    c.add_argument("--prompt", help="the text prompt (or --prompts FILE)")
    c.add_argument("--prompts", type=Path, help="a batch: a text file with one prompt a line, or JSON lines "
                   f"with the keys {', '.join(LINE_KEYS)} (prompt required; the others default to the options)")
    c.add_argument("--negative-prompt", help="what the guidance steers away from")
    c.add_argument("--num-inference-steps", "--steps", dest="steps", type=int, default=50, help="denoising steps")
    c.add_argument("--guidance-scale", "--guidance", dest="guidance", type=float,
                   help="default the pipeline's: 7.5 (SD), 5.0 (SDXL)")
    c.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's)")
    c.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's)")
    c.add_argument("--size", type=int, help="height and width at once")
    c.add_argument("--num-images-per-prompt", "--num-images", dest="num_images", type=int, default=1,
                   help="images of each prompt")
    c.add_argument("--seed", type=int, default=0, help="the initial noise and the method's random draws")
    c.add_argument("--method", default="none", help=f"attention control: {', '.join(METHODS)}")
    c.add_argument("--targets", nargs="+", help="words of the prompt to edit / to show heatmaps of "
                   "(default for heatmaps: the prompt's content words; spacetime: its objects, default "
                   "found in the prompt)")
    st = p.add_argument_group("spacetime (spatial-temporal control)")
    st.add_argument("--layout", help="object boxes as 'name [x, y, w, h]' lines on a 512 canvas (text or a "
                    "file); default: placed from the relations the prompt states")
    st.add_argument("--spacetime-mode", default="same_branch", choices=("same_branch", "uncond_ref"),
                    help="where the object branches' reference attention comes from (see docs/spatial-temporal.md)")
    st.add_argument("--optimize", action="store_true", help="optimise the temporal weights against CLIP first")
    st.add_argument("--clip", help="CLIP model directory for --optimize (or 'tiny': a random tiny CLIP)")
    st.add_argument("--passes", type=int, default=3, help="--optimize: generations, as released")
    p.add_argument("--out", type=Path, default=Path(out_default), help="the output folder")


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The parser; ``defaults=False`` gives every option the default SUPPRESS, so that parsing
    tells which options were given."""
    from . import __version__

    p = argparse.ArgumentParser(prog="stattn", description="fused attention control for diffusion")
    p.add_argument("--version", action="version", version=f"stattn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    kw = dict(formatter_class=_HelpFormatter)
    g = sub.add_parser("generate", help="generate images, attention heatmaps and a JSON report", **kw)
    _common(g, "stattn-out")
    g.add_argument("--from-report", type=Path, help="regenerate a report.json's images: every setting comes "
                   "from it (combine only with --out, --overwrite, --no-progress, --device)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-maps", action="store_true", help="skip recording the attention maps "
                   "(they cost a little time; the report's timings then show the plain run)")
    g.add_argument("--overwrite", action="store_true", help="write into a non-empty --out: an earlier "
                   "run's image_*.png, attention_*.png and report.json there are removed first")
    b = sub.add_parser("bench", help="benchmarks: micro (the op), e2e (whole generations), native (the C++ "
                       "CPU kernels), regulation, spacetime, host (per-call and per-step cost vs stock)", description="results (.json, .md) go to "
                       f"--out DIR, default ./{BENCH_OUT} (under the current directory)")
    b.add_argument("suite", choices=BENCH_SUITES)
    b.add_argument("args", nargs=argparse.REMAINDER, help="options of python -m bench.<suite>")
    sub.add_parser("doctor", help="which backends run here (native CPU build and its ISA, Triton, CUDA), "
                   "why one is missing, versions")
    pr = sub.add_parser("profile", help="torch.profiler trace (Chrome JSON), per-op table and the image of a "
                        "generation", **kw)
    _common(pr, "stattn-profile")
    from .evaluation import cli as eval_cli

    eval_cli.add_parser(sub)
    if not defaults:
        for sp in (g, pr):
            for action in sp._actions:
                if action.option_strings and action.dest != "help":
                    action.default = argparse.SUPPRESS
    return p


# ------------------------------------------------------------------------- checks before loading
def _check_args(args) -> None:
    """The checks that need no model: everything wrong here fails before loading anything."""
    from .integration import models

    if not args.model:
        raise UsageError("--model: required (a model directory, hub repo id, checkpoint file or tiny), "
                         "unless --from-report gives it")
    if args.steps < 1:
        raise UsageError(f"--num-inference-steps must be at least 1, got {args.steps}")
    if args.num_images < 1:
        raise UsageError(f"--num-images-per-prompt must be at least 1, got {args.num_images}")
    if args.method not in METHODS:
        raise UsageError(f"--method: unknown method {args.method!r}; available: {', '.join(METHODS)}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError(f"--guidance-scale: expected a finite number, got {args.guidance}")
    if args.size is not None and (args.height is not None or args.width is not None):
        raise UsageError("--size sets both --height and --width: give either --size or --height/--width")
    for name in ("height", "width", "size"):
        v = getattr(args, name)
        if v is not None and v < 8:
            raise UsageError(f"--{name}: expected pixels (a positive multiple of 8), got {v}")
    _check_seed(args.seed, "--seed")
    _check_device(args.device)
    if args.cuda_graphs and torch.device(args.device).type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA --device, got {args.device!r}")
    if args.scheduler is not None:
        try:
            models._scheduler_class(args.scheduler)
        except ValueError as e:
            raise UsageError(f"--scheduler {args.scheduler}: {_one_line(e)}") from e
    if _uses(args, "regulation") and not args.targets and not args.prompts and not args.from_report:
        raise UsageError(f"--method {args.method} needs --targets (the words whose attention to regulate)")
    if args.optimize and args.method != "spacetime":
        raise UsageError(f"--optimize optimises spatial-temporal's weights: it needs --method spacetime, got "
                         f"--method {args.method}")
    if args.optimize and not args.clip:
        raise UsageError("--optimize needs --clip DIR (a CLIP model directory; the released code uses ViT-B/32)")


def _check_seed(seed, where: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_RANGE:
        raise UsageError(f"{where}: expected an integer in [0, 2**64), got {seed!r}")


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


# ------------------------------------------------------------------------- the items of a run
def _items(args) -> list:
    """The run's prompts: --prompt, or every line of --prompts, with their seeds and targets."""
    if (args.prompt is None) == (args.prompts is None):
        raise UsageError("--prompt / --prompts: give exactly one (a prompt, or a file of prompts)")
    if args.prompt is not None:
        items = [Item(args.prompt, args.seed, args.negative_prompt, args.targets, args.layout)]
    else:
        items = _read_prompts(args.prompts, args)
    for item in items:
        if not isinstance(item.prompt, str) or not item.prompt.strip():
            raise UsageError(f"{item.where}: expected some text, got {item.prompt!r}")
        if _uses(args, "regulation") and not item.targets:
            raise UsageError(f"{item.where}: --method {args.method} needs targets (--targets, or a \"targets\" key)")
    return items


def _read_prompts(path: Path, args) -> list:
    """One prompt a line (blank lines skipped), or JSON lines (a file ending .jsonl, or whose first
    line starts with '{') with the keys LINE_KEYS."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts {path}: cannot be read ({_one_line(e)})") from e
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise UsageError(f"--prompts {path}: no prompt in the file")
    jsonl = path.suffix == ".jsonl" or numbered[0][1].lstrip().startswith("{")
    items = []
    for n, line in numbered:
        where = f"--prompts {path} line {n}"
        if not jsonl:
            items.append(Item(line.strip(), args.seed, args.negative_prompt, args.targets, args.layout, where))
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{where}: not a JSON object ({_one_line(e)})") from e
        if not isinstance(entry, dict):
            raise UsageError(f"{where}: expected a JSON object with the keys {', '.join(LINE_KEYS)}, got {line.strip()!r}")
        unknown = sorted(set(entry) - set(LINE_KEYS))
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {unknown}; expected {', '.join(LINE_KEYS)}")
        if "prompt" not in entry:
            raise UsageError(f"{where}: no \"prompt\"")
        targets = entry.get("targets", args.targets)
        if isinstance(targets, str):
            targets = [targets]
        if targets is not None and not (isinstance(targets, list) and targets
                                        and all(isinstance(t, str) and t.strip() for t in targets)):
            raise UsageError(f"{where}: \"targets\": expected a word or a non-empty list of words, got {targets!r}")
        for key in ("negative_prompt", "layout"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise UsageError(f"{where}: \"{key}\": expected a string, got {entry[key]!r}")
        seed = entry.get("seed", args.seed)
        _check_seed(seed, f"{where}: \"seed\"")
        items.append(Item(entry["prompt"], seed, entry.get("negative_prompt", args.negative_prompt), targets,
                          entry.get("layout", args.layout), where))
    return items


# ------------------------------------------------------------------------- checks after loading
def _load(args):
    from .integration.runner import Runner

    device = torch.device(args.device)  # _check_args has run
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    extra = {k: v for k, v in (("local_files_only", args.local_files_only or None), ("config", args.config))
             if v is not None}
    try:
        return Runner.from_pretrained(args.model, dtype=dtype, device=args.device, scheduler=args.scheduler,
                                      cuda_graphs=args.cuda_graphs, **extra)
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(f"--model {args.model}: {_one_line(e)}") from e


def _check_maps_size(runner, args) -> None:
    """The heatmaps come from the cross-attention layers within AttentionMaps' max_pixels: at a
    size where every such layer is larger, nothing would be recorded."""
    import inspect

    from .integration.maps import AttentionMaps

    height, width = _size(runner, args)
    limit = inspect.signature(AttentionMaps).parameters["max_pixels"].default
    cfg = runner.unet.config
    levels = [i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t]
    if cfg.mid_block_type and "CrossAttn" in cfg.mid_block_type:
        levels.append(len(cfg.down_block_types) - 1)
    if not levels:
        return
    f = runner.pipe.vae_scale_factor * 2 ** max(levels)
    smallest = (height // f) * (width // f)
    if smallest > limit:
        raise UsageError(f"--height/--width {height}x{width}: too large for the attention heatmaps (the smallest "
                         f"cross-attention layer would be {smallest} pixels, over {limit}); use a smaller size or "
                         "--no-maps")


def _check_size(runner, args) -> None:
    """--height / --width as the Runner (the pipeline) accepts them, before anything runs."""
    for name, value in zip(("height", "width"), _size(runner, args)):
        try:
            runner._check_size(name, value)
        except ValueError as e:
            given = "size" if args.size is not None else name
            raise UsageError(f"--{given}: {_one_line(e)}") from e


def _size(runner, args) -> tuple:
    default = runner.default_size()
    return (args.size or args.height or default, args.size or args.width or default)


def _resolve(runner, args, item: Item) -> None:
    """The item's heatmap columns and labels, and its method's targets / layout, checked against
    its prompt as the pipeline encodes it (truncated to the tokenizer's length, as diffusers does)."""
    from .integration.tokens import prompt_ids, prompt_words, token_indices

    tok = runner.pipe.tokenizer
    full = len(tok(item.prompt).input_ids)  # with SOS and EOS
    if item.targets:
        try:  # one call: a repeated word takes its successive occurrences
            tokens = token_indices(tok, item.prompt, list(item.targets))
        except ValueError as e:
            cut = (f" (the prompt is {full} tokens, truncated to the text encoder's {tok.model_max_length}: "
                   f"a target past the cut is not encoded)" if full > tok.model_max_length else "")
            where = "--targets" if item.where == "--prompt" else f"{item.where}: targets"
            raise UsageError(f"{where}: {_one_line(e)}{cut}") from e
    else:   # the words that survive the truncation, as the tokenizer splits them
        words = [(w, cols) for w, cols in prompt_words(tok, item.prompt) if any(c.isalnum() for c in w)]
        content = [cols for w, cols in words if w.lower() not in STOP_WORDS] or [cols for _, cols in words[:1]]
        if not content:
            raise UsageError(f"{item.where}: no word of the prompt to show the attention of; give --targets")
        tokens = [c for cols in content for c in cols]
    ids = prompt_ids(tok, item.prompt)
    item.tokens, item.labels = tokens, [tok.decode([ids[i]]).strip() for i in tokens]
    if _uses(args, "spacetime") and item.method is None:
        try:
            _spacetime(item, args)._resolve(item.prompt)
        except ValueError as e:
            raise UsageError(f"{item.where}: --method {args.method}: {_one_line(e)}") from e


def _layout_text(layout: Optional[str]) -> Optional[str]:
    if layout is not None and Path(layout).is_file():
        return Path(layout).read_text()
    return layout


def _spacetime(item: Item, args):
    from .methods.spacetime.controller import SpatialTemporal

    try:
        if item.method is not None and args.method == "spacetime":     # from a report
            return SpatialTemporal.from_settings(item.method)
        return SpatialTemporal(objects=list(item.targets) if item.targets else "auto", layout=_layout_text(item.layout),
                               mode=args.spacetime_mode)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{item.where}: --method spacetime: {_one_line(e)}") from e


def _uses(args, part: str) -> bool:
    """Whether --method runs ``part`` ("regulation" / "spacetime"), alone or composed."""
    return part in args.method.split("+")


def _regulation(item: Item, args):
    from .methods.regulation.controller import AttentionRegulation

    if item.method is not None and args.method == "regulation":     # from a report
        return AttentionRegulation.from_settings(item.method)
    # released defaults; edits the first 25 steps (all of them in a shorter run)
    return AttentionRegulation(targets=list(item.targets), edit_steps=min(25, args.steps))


def _controller(runner, args, item: Item):
    """The item's method, applied to its prompt (an error names the item)."""
    if args.method == "none":
        return None
    try:
        if args.method == "regulation":
            method = _regulation(item, args)
            method.apply(runner, prompt=item.prompt)
            return method
        if args.method == "regulation+spacetime":
            from .methods.compose import Composed, compose

            method = (Composed.from_settings(item.method) if item.method is not None else
                      compose(_regulation(item, args), _spacetime(item, args)))
            method.apply(runner, prompt=item.prompt)
            return method
        method = _spacetime(item, args)
        method.apply(runner, prompt=item.prompt)
        if args.optimize and item.method is None:   # a report's weights are already optimised
            from .integration import models

            clip = models.tiny_clip() if args.clip == "tiny" else args.clip
            height, width = _size(runner, args)
            method.optimize(runner, item.prompt, clip=clip, steps=args.steps, passes=args.passes, seed=item.seed,
                            guidance_scale=_guidance(runner, args), height=height, width=width,
                            num_images=args.num_images)
        return method
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(f"{item.where}: --method {args.method}: {_one_line(e)}") from e


def _guidance(runner, args) -> float:
    return args.guidance if args.guidance is not None else (5.0 if runner.is_xl else 7.5)


# ------------------------------------------------------------------------- generate
def _generate(runner, args, item: Item, *, maps: bool, callback=None, profile_dir=None):
    """One item: its method and heatmap recorder installed, its images generated. The method's
    random draws (Attention Regulation's θ₀) come from the global RNG seeded with the item's seed."""
    from .integration import models
    from .integration.maps import AttentionMaps
    from .integration.processors import accelerate

    with models._seeded(item.seed, runner.device):
        method = _controller(runner, args, item)
        recorder = AttentionMaps(item.tokens, inner=method) if maps else None
        if recorder is not None:
            accelerate(runner, controller=recorder)
        elif method is None:
            accelerate(runner)
        height, width = _size(runner, args)
        try:
            result = runner(item.prompt, negative_prompt=item.negative_prompt, steps=args.steps,
                            guidance_scale=_guidance(runner, args), height=height, width=width,
                            num_images=args.num_images, seed=item.seed, callback=callback, profile=profile_dir)
        except ValueError as e:
            raise UsageError(("" if item.where == "--prompt" else f"{item.where}: ") + _one_line(e)) from e
    return result, recorder, method


class _Run:
    """--out being written: report.json ("finished": false) before the first image, each item's
    files as soon as they exist, report.json again at the end ("finished": true)."""

    def __init__(self, out: Path, overwrite: bool, report: dict):
        self.out, self.report, self.written = out, report, []
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {out}: {_one_line(e)}") from e
        if overwrite:
            _remove_earlier_run(out)
        self._write_report(finished=False)

    def add(self, files: list) -> None:
        for name, img in files:
            self.written.append(_write_png(self.out / name, img))

    def finish(self) -> None:
        self._write_report(finished=True)

    def _write_report(self, finished: bool) -> None:
        self.report["finished"] = finished
        text = json.dumps(self.report, indent=2, default=str).encode()
        path = _write_atomic(self.out / "report.json", lambda f: f.write(text))
        if finished:
            self.written.append(path)


def _stem(kind: str, items: list, i: int, j: int) -> str:
    """image_<j>.png for one prompt; image_<i>_<j>.png (prompt i, image j) for a batch."""
    return f"{kind}_{j}.png" if len(items) == 1 else f"{kind}_{i}_{j}.png"


def _run_args(args) -> dict:
    """The settings shared by every item, as --from-report needs them."""
    model = args.model
    if os.path.exists(model):
        model = os.path.abspath(model)
    keys = ("local_files_only", "config", "scheduler", "dtype", "cuda_graphs", "steps", "guidance", "height",
            "width", "size", "num_images", "method", "spacetime_mode", "optimize", "clip", "passes", "no_maps")
    return {"model": model, "device": args.device, **{k: getattr(args, k) for k in keys}}


def cmd_generate(args, argv) -> int:
    from . import __version__
    from .integration.maps import heatmap_figure

    if args.from_report is not None:
        _from_report(args, argv)
    _check_args(args)
    items = _items(args) if args.from_report is None else args.items
    runner = _load(args)  # a bad --model is named first, even when --out is wrong too
    _check_out(args.out, args.overwrite)
    _check_size(runner, args)
    if not args.no_maps:
        _check_maps_size(runner, args)
    for item in items:
        _resolve(runner, args, item)
    report = {"stattn": __version__, "report_version": REPORT_VERSION, "command": list(argv),
              "args": _run_args(args), "finished": False, "items": []}
    bar = _progress(runner, args, len(items) * _evaluations(runner, args.steps))
    run = None
    with bar:
        for i, item in enumerate(items):
            result, recorder, method = _generate(runner, args, item, maps=not args.no_maps,
                                                 callback=lambda *a: bar.update())
            # the item's files are built before any is written: a failure leaves them all unwritten
            files = [(_stem("image", items, i, j), img) for j, img in enumerate(result.images)]
            if recorder is not None:
                maps = recorder.maps()
                files += [(_stem("attention", items, i, j), heatmap_figure(img, maps[j], item.labels))
                          for j, img in enumerate(result.images)]
            entry = {"prompt": item.prompt, "negative_prompt": item.negative_prompt, "seed": item.seed,
                     "targets": item.targets, "layout": item.layout, "heatmap_tokens": item.labels,
                     "heatmap_token_indices": item.tokens, "method": method.settings() if method else None,
                     "images": [name for name, _ in files], **result.report()}
            report["items"].append(entry)
            if run is None:
                run = _Run(args.out, args.overwrite, report)
            run.add(files)
    steps = sorted(ms for e in report["items"] for ms in e["step_ms"])
    report["step_ms_median"] = steps[len(steps) // 2]
    report["total_ms"] = sum(e["total_ms"] for e in report["items"])
    run.finish()
    n = len(items) * args.num_images
    print(f"generated {n} image(s) of {len(items)} prompt(s) in {report['total_ms'] / 1e3:.2f} s "
          f"({report['step_ms_median']:.1f} ms per step, median)")
    for p in run.written:
        print(f"  {p}")
    return 0


def _evaluations(runner, steps: int) -> int:
    """UNet evaluations of one generation: the scheduler's timesteps for ``steps`` (PNDM and Heun
    take more than ``steps``), set on a copy so the runner's scheduler is untouched."""
    import copy

    scheduler = copy.deepcopy(runner.scheduler)
    scheduler.set_timesteps(steps, device="cpu")
    return len(scheduler.timesteps)


def _progress(runner, args, total: int):
    """One progress bar over every denoising step of the run (diffusers' tqdm settings)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=True) if args.no_progress else runner.pipe.progress_bar(total=total)


def _from_report(args, argv) -> None:
    """Fill args and args.items from a report.json: every setting as it was; only --out,
    --overwrite, --no-progress and --device may be given beside it."""
    parser = build_parser(defaults=False)
    given = vars(parser.parse_args(argv))
    extra = sorted(_option_names(parser, args.command)[k] for k in given if k not in WITH_REPORT)
    if extra:
        raise UsageError(f"--from-report: every setting comes from the report; do not give {', '.join(extra)}")
    path = args.from_report
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        run, entries = report["args"], report["items"]
        if report.get("report_version") != REPORT_VERSION:
            raise ValueError(f"report_version {report.get('report_version')!r}, expected {REPORT_VERSION}")
        device = args.device if "device" in given else run["device"]
        for key, value in run.items():
            setattr(args, key, value)
        args.device = device
        args.items = [Item(e["prompt"], e["seed"], e["negative_prompt"], e["targets"], e["layout"],
                           f"--from-report {path} item {i}", e["method"]) for i, e in enumerate(entries)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--from-report {path}: not a stattn generate report.json ({_one_line(e)})") from e
    args.prompt = args.prompts = None


def _option_names(parser, command: str) -> dict:
    """dest -> the option's (diffusers') name, e.g. steps -> --num-inference-steps."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings}


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


def _write_png(path: Path, image) -> Path:
    """A PIL image written atomically as PNG (_write_atomic)."""
    return _write_atomic(path, lambda f: image.save(f, format="PNG"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------- profile / bench / doctor
def cmd_profile(args, argv) -> int:
    if args.prompts is not None:
        raise UsageError("--prompts: stattn profile profiles one --prompt")
    _check_args(args)
    item, = _items(args)
    runner = _load(args)
    _check_out(args.out, overwrite=True)  # the profile's own files are replaced
    _resolve(runner, args, item)
    _generate(runner, args, item, maps=False)  # warm-up: compiles and allocations out of the trace
    result, *_ = _generate(runner, args, item, maps=False, profile_dir=args.out)
    images = [_write_png(args.out / f"image_{j}.png", img) for j, img in enumerate(result.images)]
    print(result.table)
    print(f"trace: {result.trace}\nper-op table: {Path(args.out) / 'ops.txt'}\n"
          f"image(s): {', '.join(str(p) for p in images)}")
    return 0


def cmd_bench(args, argv) -> int:
    import importlib

    suite = importlib.import_module(f".bench.{args.suite}", __package__)
    rest = [a for a in args.args if a != "--"]
    # an installed stattn.bench would write next to itself (site-packages): default to the cwd
    if not any(a == "--out" or a.startswith("--out=") for a in rest):
        rest += ["--out", str(Path.cwd() / BENCH_OUT)]
    return suite.main(rest)


def cmd_eval(args, argv) -> int:
    from .evaluation import cli as eval_cli

    return eval_cli.main(args)     # prints its own one-line errors (exit 2)


def cmd_doctor(args, argv) -> int:
    from . import doctor

    return doctor.main([])


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Optional[list] = None) -> int:
    # diffusers imports transformers' image processors we never use, which warn without torchvision
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = build_parser().parse_args(argv)
    handler = {"generate": cmd_generate, "profile": cmd_profile, "bench": cmd_bench, "eval": cmd_eval,
               "doctor": cmd_doctor}[args.command]
    try:
        return handler(args, argv)
    except UsageError as e:
        print(f"stattn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
