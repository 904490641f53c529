"""The work of `stattn eval`: every (prompt, seed, method) image with the same settings and, per
(prompt, seed), the same initial noise; scored, recorded, skipped when already recorded.

The work list is grouped by (prompt, seed): a group's methods run in one process, one after the
other, so its grid can be drawn when the last one is done. Groups are sharded across processes with
accelerate's PartialState.split_between_processes (one process without a launcher). Every process
reads the finished records before any process writes (a barrier), so all agree on what is left.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from . import records as rec

IMAGES_DIR = "images"
GRIDS_DIR = "grids"


@dataclass(frozen=True)
class Group:
    index: int          # the prompt's position in the prompt list
    prompt: object      # prompts.Prompt
    seed: int


def groups(prompts: list, seeds: list) -> list:
    """Every (prompt, seed), in prompt order; a prompt with its own seed (a file's line) gets only that."""
    return [Group(i, p, s) for i, p in enumerate(prompts) for s in ((p.seed,) if p.seed is not None else seeds)]


def work_keys(gs: list, methods: list, settings_hash: str) -> list:
    return [(g.prompt.text, g.seed, m, settings_hash) for g in gs for m in methods]


def stem(g: Group, method: Optional[str] = None) -> str:
    """p<index>-<prompt hash>-s<seed>[-<method>]: the prompt's hash keeps another work list's
    prompt at the same index (a rerun with other --prompts into the same --out) from overwriting it."""
    import hashlib

    digest = hashlib.sha256(g.prompt.text.encode()).hexdigest()[:8]
    return f"p{g.index:04d}-{digest}-s{g.seed}" + (f"-{method}" if method else "")


def item(g: Group):
    """stattn generate's Item of the group (its where names the prompt for error messages)."""
    from ..cli import Item

    where = g.prompt.where or f"--prompts {g.prompt.set} prompt {g.index} ({g.prompt.text!r})"
    return Item(g.prompt.text, g.seed, None, list(g.prompt.targets) or None, g.prompt.layout, where)


def method_args(args, method: str) -> argparse.Namespace:
    """The options stattn.cli's _generate / _controller read, for one method."""
    return argparse.Namespace(**{**vars(args), "method": method, "num_images": 1,
                                 "clip": args.clip if args.optimize else None})


def grid(images: list, labels: list):
    """The images side by side, each under its label."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    band = 14
    out = Image.new("RGB", (w * len(images), h + band), "white")
    draw = ImageDraw.Draw(out)
    for i, (img, label) in enumerate(zip(images, labels)):
        out.paste(img.convert("RGB"), (i * w, band))
        draw.text((i * w + 2, 1), label, fill="black")
    return out


class Scorer:
    """The metric models of the run (loaded once per process)."""

    def __init__(self, clip: Optional[str], detector: Optional[str], threshold: float):
        from ..integration import models
        from . import metrics, tiny

        self.clip = self.detector = None
        if clip is not None:     # tiny: built in memory (every process the same, nothing saved)
            self.clip = (metrics.Clip(models.tiny_clip(), name="tiny (random weights)") if clip == "tiny"
                         else metrics.Clip(clip, name=os.path.abspath(clip)))
        if detector is not None:
            self.detector = (metrics.Detector(tiny.detector(), threshold, name="tiny OWLv2 (random weights)")
                             if detector == "tiny" else metrics.Detector(detector, threshold, os.path.abspath(detector)))

    def __call__(self, image, prompt) -> dict:
        out = {}
        if self.clip is not None:
            out.update(self.clip.scores(image, prompt.text, prompt.targets))
        if self.detector is not None and prompt.targets:
            out.update(self.detector.scores(image, prompt.targets, prompt.relation))
        return out

    def names(self) -> dict:
        out = {}
        if self.clip is not None:
            out["clip"] = self.clip.name
        if self.detector is not None:
            out["detector"] = f"{self.detector.name} ({self.detector.kind}, threshold {self.detector.threshold})"
        return out


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run(args, prompts: list, settings: dict, state, runner, scorer: Scorer, log=print) -> dict:
    """Generate, score and record what is not yet recorded (this process's share); returns
    {generated, recorded_before, settings_hash}."""
    from .. import __version__, cli

    h = rec.settings_hash(settings)
    out = Path(args.out)
    gs = groups(prompts, args.seeds)
    done = rec.finished(out)
    state.wait_for_everyone()       # everyone has read what is finished before anyone appends
    todo = [g for g in gs if any((g.prompt.text, g.seed, m, h) not in done for m in args.methods)]
    n = 0
    (out / IMAGES_DIR / h).mkdir(parents=True, exist_ok=True)
    (out / GRIDS_DIR / h).mkdir(parents=True, exist_ok=True)
    with state.split_between_processes(todo) as mine, rec.Writer(rec.rank_path(out, state.process_index)) as w:
        for g in mine:
            for method in args.methods:
                if (g.prompt.text, g.seed, method, h) in done:
                    continue
                margs = method_args(args, method)
                it = item(g)
                cli._resolve(runner, margs, it)
                _peak_reset(runner.device)
                t0 = time.perf_counter()
                result, _, controller = cli._generate(runner, margs, it, maps=False)
                if runner.device.type == "cuda":
                    torch.cuda.synchronize(runner.device)
                ms = (time.perf_counter() - t0) * 1e3
                peak = _peak(runner.device)
                image = result.images[0]
                name = Path(IMAGES_DIR) / h / f"{stem(g, method)}.png"
                cli._write_png(out / name, image)
                w.add({"prompt": g.prompt.text, "set": g.prompt.set, "index": g.index, "seed": g.seed,
                       "method": method, "settings_hash": h, "settings": settings, "targets": list(g.prompt.targets),
                       "relation": list(g.prompt.relation) if g.prompt.relation else None,
                       "layout": g.prompt.layout, "method_settings": controller.settings() if controller else None,
                       "image": str(name), "generate_ms": ms, "total_ms": result.total_ms,
                       "step_ms_median": result.report()["step_ms_median"], "peak_bytes": peak,
                       "finished_at": time.time(), "scores": scorer(image, g.prompt),
                       "process": state.process_index, "stattn": __version__})
                n += 1
            _write_grid(out, h, g, args.methods)
            log(f"[{state.process_index}] {stem(g)}: {g.prompt.text!r} done")
    return {"generated": n, "recorded_before": sum(k in done for k in work_keys(gs, args.methods, h)),
            "settings_hash": h}


def _write_grid(out: Path, h: str, g: Group, methods: list) -> None:
    from PIL import Image

    from .. import cli

    images = [Image.open(out / IMAGES_DIR / h / f"{stem(g, m)}.png") for m in methods]
    img = grid(images, list(methods))
    cli._write_png(out / GRIDS_DIR / h / f"{stem(g)}.png", img)
