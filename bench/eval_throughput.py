"""`stattn eval` throughput: images per second with 1 and with 2 data-parallel processes (CPU, gloo,
tiny model by default), and the time per image of each method.

    python -m bench.eval_throughput                      # tiny model, 4 prompts x 2 seeds x 3 methods
    python -m bench.eval_throughput --processes 1 2 4 --steps 20

Each process count runs the whole command afresh (`python -m stattn.evaluation`, through
`torch.distributed.run --standalone` for more than one process) into its own folder. Images per
second are counted over the generation window, from the first image's start to the last one's end
(the records' finished_at - generate_ms), so model loading is left out (scoring is in it when
--clip is given); the command's wall time is reported beside it. Each process gets OMP_NUM_THREADS = cores / processes unless --threads is
given. Results (JSON + Markdown) go to bench/results/.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .env import REPO, machine, provenance, publish

DEFAULT_OUT = REPO / "bench" / "results"


def _run(n: int, args, out: Path) -> dict:
    from stattn.evaluation import records

    threads = args.threads or max(1, (os.cpu_count() or 1) // n)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
    eval_args = ["--model", args.model, "--prompts", args.prompts, "--limit", str(args.limit), "--seeds", args.seeds,
                 "--methods", args.methods, "--steps", str(args.steps), "--device", "cpu", "--out", str(out), "--quiet"]
    if args.clip:
        eval_args += ["--clip", args.clip]
    launch = ([sys.executable, "-m", "stattn.evaluation"] if n == 1 else
              [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "stattn.evaluation"])
    t0 = time.perf_counter()
    subprocess.run(launch + eval_args, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    recs = records.read(records.rank_files(out))
    start = min(r["finished_at"] - r["generate_ms"] / 1e3 for r in recs)
    end = max(r["finished_at"] for r in recs)
    per_method = {}
    for r in recs:
        per_method.setdefault(r["method"], []).append(r["generate_ms"])
    return {"processes": n, "threads_per_process": threads, "images": len(recs), "window_s": end - start,
            "images_per_s": len(recs) / (end - start), "command_s": wall,
            "ms_per_image": {m: statistics.median(v) for m, v in per_method.items()}}


def markdown(result: dict) -> str:
    rows = result["runs"]
    methods = list(rows[0]["ms_per_image"])
    lines = ["# stattn eval throughput", "", f"{result['environment']['device']}; {provenance(result['environment'])}",
             "", f"model {result['args']['model']}, prompts {result['args']['prompts']} (first "
             f"{result['args']['limit']}), seeds {result['args']['seeds']}, {result['args']['steps']} steps", "",
             "| processes | threads each | images | images / s | speed-up | command s | "
             + " | ".join(f"{m} ms / image" for m in methods) + " |",
             "|" + "---|" * (6 + len(methods))]
    base = rows[0]["images_per_s"]
    for r in rows:
        lines.append(f"| {r['processes']} | {r['threads_per_process']} | {r['images']} | {r['images_per_s']:.2f} | "
                     f"{r['images_per_s'] / base:.2f}x | {r['command_s']:.1f} | "
                     + " | ".join(f"{r['ms_per_image'][m]:.1f}" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eval_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--prompts", default="ae-animals")
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--seeds", default="0-1")
    p.add_argument("--methods", default="none,regulation,spacetime")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--clip", help="score with this CLIP too (default: no metrics, generation only)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS per process (default: cores / processes)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="stattn-eval-bench-") as tmp:
        for n in args.processes:
            runs.append(_run(n, args, Path(tmp) / f"p{n}"))
    result = {"bench": "eval_throughput", "args": {k: str(v) for k, v in vars(args).items()},
              "environment": machine("cpu"), "runs": runs}
    publish(result, args.out, "eval", markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
