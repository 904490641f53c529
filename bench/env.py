"""What every result file records: device, versions, commit (one place for bench.micro and bench.e2e)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
import re
import subprocess
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parent.parent


def _command(*args: str) -> Optional[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=REPO,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_model()


def slugify(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bprocessor\b|\bcpu\b|@.*", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40]


def device_slug(device: str) -> str:
    name = slugify(device_name(device))
    return name if device == "cuda" else "-".join(filter(None, ("cpu", name)))


def git_state() -> dict:
    """The commit and whether the tree is dirty (bench.commit.tree_state: git, or the COMMIT file of a
    copy without .git)."""
    from .commit import tree_state

    return tree_state(REPO)


def provenance(env: dict) -> str:
    """What a result was measured with, for its Markdown: commit `abcdef123456` (dirty); torch X,
    triton Y, diffusers Z (where installed)."""
    git = env["git"]
    versions = [f"torch {env['torch']}", f"triton {env['triton']}"]
    if env.get("diffusers"):
        versions.append(f"diffusers {env['diffusers']}")
    return (f"commit `{(git.get('commit') or 'unknown')[:12]}`{' (dirty)' if git.get('dirty') else ''}; "
            + ", ".join(versions))


def machine(device: str) -> dict:
    """Device and software versions for a result file."""
    import triton

    env = {"device": device, "device_name": device_name(device), "python": platform.python_version(),
           "torch": torch.__version__, "triton": triton.__version__, "platform": platform.platform(),
           "cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "git": git_state()}
    with contextlib.suppress(ImportError):
        import diffusers
        import transformers

        env.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   driver=_command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
                   sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                   capability=f"{props.major}.{props.minor}")
    return env


def sync(device) -> None:
    """Wait for the device's queued work (wall-clock timings of whole generations)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def quantiles(xs: list) -> dict:
    """Median, p20, p80 and count of repeated wall times."""
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]  # noqa: E731
    return {"median": statistics.median(xs), "p20": pick(0.2), "p80": pick(0.8), "n": len(xs)}


def result_stem(prefix: str, device: str) -> str:
    """<prefix>-<device>-<time>: the name of a run's result files."""
    return f"{prefix}-{device_slug(device)}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_results(result: dict, out_dir: Path, prefix: str, markdown: Callable[[dict], str],
                  stem: Optional[str] = None) -> tuple[Path, Path]:
    """<stem>.json (the raw result) and .md (its table) under out_dir (stem: result_stem's by
    default), each written whole and renamed onto its name: a run killed meanwhile leaves the
    previous version (a benchmark rewriting its partial results under one stem) or none."""
    from stattn.cli import _write_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or result_stem(prefix, result["environment"]["device"])
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    text, md = json.dumps(result, indent=1, default=str) + "\n", markdown(result)   # both before either is written
    _write_atomic(json_path, lambda f: f.write(text.encode()))
    _write_atomic(md_path, lambda f: f.write(md.encode()))
    return json_path, md_path


def publish(result: dict, out_dir: Path, prefix: str, markdown: Callable[[dict], str],
            stem: Optional[str] = None) -> None:
    """Write the result files and print the table and where they are."""
    json_path, md_path = write_results(result, out_dir, prefix, markdown, stem)
    print()
    print(markdown(result))
    print(f"wrote {json_path}\n      {md_path}")


@contextlib.contextmanager
def stattn_backend(name: Optional[str]):
    """Set STATTN_BACKEND (stattn.backend_for reads it at every call) for the block; None: leave it."""
    if name is None:
        yield
        return
    previous = os.environ.get("STATTN_BACKEND")
    os.environ["STATTN_BACKEND"] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ["STATTN_BACKEND"]
        else:
            os.environ["STATTN_BACKEND"] = previous
