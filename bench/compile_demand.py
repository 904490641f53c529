"""The cold Triton compiles the GPU check's test selection needs, measured without a GPU.

    python -m bench.compile_demand [--jobs N] [--workers 1,4,8,12] [--out bench/results] [-- PYTEST_ARGS]

On a GPU with a cold Triton cache, 02-correctness (``pytest -m gpu``) spends most of its time
compiling kernel variants, one CPU core each. This says how many and how long, so its budget and
its number of pytest-xdist processes rest on a measurement:

1. capture: ``pytest -m gpu`` over the GPU check's test files (bench.gpu_check.gpu_test_files, or
   PYTEST_ARGS) on the CPU under the Triton interpreter, with every non-float64 tensor on the
   Triton backend as on CUDA; each launch's specialisation for sm_90, the one the JIT compiles
   (stattn.kernels.aot.jit_specialisation: Triton's own binder), is recorded per test;
2. compile: each distinct specialisation once with Triton's compiler and ptxas for sm_90, in a
   fresh (cold) cache, --jobs processes, the seconds of each;
3. schedule: the compile time of W pytest-xdist processes, each test handed in collection order to
   the first free process, a variant compiled by no process yet (or still compiling elsewhere) costing
   its seconds, as with Triton's cache shared through the file system.

What it cannot see: the tests that run only on CUDA (skipped here; listed in the result, their own
variants come on top) and each process's start (imports, CUDA context). The compile seconds are
this CPU's; the GPU machine's cores may differ.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ENV = "STATTN_COMPILE_DEMAND"     # the capture's output file; set: this module, as a pytest plugin, records
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ 1. capture (a pytest plugin)

class _Recorder:
    """Routes the op to the Triton backend as CUDA does and records each launch's specialisation."""

    def __init__(self, path: str):
        self.path, self.current = path, None
        self.tests: dict = {}          # nodeid -> distinct specialisations (JSON), in launch order
        self.skipped: list = []

    def install(self):
        import torch

        from stattn import ops
        from stattn.kernels import aot, launch
        from stattn.methods.regulation import core

        def cuda_like_backend(t):     # stattn.ops.backend_for for a CUDA tensor
            return "reference" if ops.backend_choice() == "reference" or t.dtype == torch.float64 else "triton"
        ops.backend_for = core.backend_for = cuda_like_backend
        real = launch._launch

        def recording(kernel, grid, args, meta):
            spec = aot.serialise_specialisation(kernel, *aot.jit_specialisation(kernel, args, meta))
            seen = self.tests.setdefault(self.current, [])
            if spec not in seen:
                seen.append(spec)
            return real(kernel, grid, args, meta)
        launch._launch = recording

    def pytest_runtest_setup(self, item):
        self.current = item.nodeid

    def pytest_runtest_logreport(self, report):
        if report.skipped and report.when in ("setup", "call"):
            self.skipped.append(report.nodeid)

    def pytest_unconfigure(self, config):
        from stattn.cli import _write_atomic

        text = json.dumps({"tests": {k: v for k, v in self.tests.items() if k}, "skipped": self.skipped})
        _write_atomic(Path(self.path), lambda f: f.write(text.encode()))


def pytest_configure(config):
    path = os.environ.get(ENV)
    if path:
        recorder = _Recorder(path)
        recorder.install()
        config.pluginmanager.register(recorder, "stattn-compile-demand")


def capture(pytest_args: list) -> dict:
    """Run the selection under the interpreter with the recorder; {"tests", "skipped"}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "capture.json"
        env = {**os.environ, "TRITON_INTERPRET": "1", ENV: str(out)}
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.compile_demand",
                "-m", "gpu", *pytest_args]
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
        if not out.is_file():
            raise RuntimeError(f"the capture run wrote nothing (exit {done.returncode}):\n{done.stdout[-3000:]}"
                               f"{done.stderr[-3000:]}")
        # failures are expected and harmless: the op runs the Triton backend everywhere, bfloat16 included,
        # which the interpreter computes wrongly; the launches are what a CUDA run makes
        return json.loads(out.read_text())


# ------------------------------------------------------------------ 2. compile (cold cache)

def _compile_one(spec: str) -> float:
    from stattn.kernels import aot

    t0 = time.perf_counter()
    aot.compile_specialisation(*aot.deserialise_specialisation(spec))
    return time.perf_counter() - t0


def compile_all(specs: list, jobs: int) -> dict:
    """Seconds of each specialisation's compile for sm_90 in a fresh Triton cache."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("bench.compile_demand: unset TRITON_INTERPRET (it replaces the kernels this compiles)")
    import multiprocessing
    from unittest import mock

    # the pool's processes inherit the environment: every compile is cold
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict(os.environ, {"TRITON_CACHE_DIR": cache}):
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            return dict(zip(specs, pool.map(_compile_one, specs)))


# ------------------------------------------------------------------ 3. schedule

def schedule(tests: list, seconds: dict, workers: int) -> dict:
    """Compile time of `workers` processes: tests (nodeid, [spec]) in order, each to the first free
    process; a spec finished by any process before it is needed is a cache hit, otherwise it is
    compiled (again, if another process is still at it). {"makespan_s", "compile_s"}."""
    free = [(0.0, w) for w in range(workers)]
    ready: dict = {}                    # spec -> when its first compile ends
    total = 0.0
    for _, specs in tests:
        now, w = heapq.heappop(free)
        for spec in specs:
            if ready.get(spec, float("inf")) <= now:
                continue
            now += seconds[spec]
            total += seconds[spec]
            ready[spec] = min(ready.get(spec, float("inf")), now)
        heapq.heappush(free, (now, w))
    return {"makespan_s": max(t for t, _ in free), "compile_s": total}


def _kernel(spec: str) -> str:
    return json.loads(spec)["name"].rsplit(".", 1)[1]


def summarise(captured: dict, seconds: dict, workers: list) -> dict:
    tests = list(captured["tests"].items())
    by_kernel, by_file = defaultdict(lambda: [0, 0.0]), defaultdict(lambda: [set(), 0.0])
    for spec, s in seconds.items():
        by_kernel[_kernel(spec)][0] += 1
        by_kernel[_kernel(spec)][1] += s
    for nodeid, specs in tests:
        f = by_file[nodeid.split("::")[0]]
        for spec in specs:
            if spec not in f[0]:
                f[0].add(spec)
                f[1] += seconds[spec]
    return {
        "tests_launching": len(tests), "skipped_here": captured["skipped"], "variants": len(seconds),
        "compile_s": sum(seconds.values()), "max_variant_s": max(seconds.values(), default=0.0),
        "kernels": [{"kernel": k, "variants": n, "compile_s": s} for k, (n, s) in
                    sorted(by_kernel.items(), key=lambda kv: -kv[1][1])],
        "files": [{"file": k, "variants": len(v[0]), "compile_s": v[1]} for k, v in
                  sorted(by_file.items(), key=lambda kv: -kv[1][1])],
        "workers": [{"workers": w, **schedule(tests, seconds, w)} for w in workers]}


def markdown(result: dict) -> str:
    from bench.env import provenance

    env = result["environment"]
    lines = [f"# Cold Triton compiles of the GPU check's tests, sm_90 ({env['cpu']})", "",
             f"{provenance(env)}. Selection: `pytest -m gpu {' '.join(result['pytest_args'])}`; compiled with "
             f"{result['jobs']} processes in a fresh cache.", "",
             f"- {result['variants']} distinct kernel variants from {result['tests_launching']} tests; "
             f"{result['compile_s']:.1f} s of compiling on one core (slowest variant {result['max_variant_s']:.2f} s)",
             f"- skipped here (CUDA only; their variants come on top): {len(result['skipped_here'])} tests", "",
             "| xdist processes | compile time, makespan (s) | compile seconds, all processes |", "|---|---|---|"]
    lines += [f"| {r['workers']} | {r['makespan_s']:.1f} | {r['compile_s']:.1f} |" for r in result["workers"]]
    lines += ["", "| kernel | variants | compile s |", "|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['variants']} | {r['compile_s']:.1f} |" for r in result["kernels"]]
    lines += ["", "| test file | variants | compile s (alone) |", "|---|---|---|"]
    lines += [f"| {r['file']} | {r['variants']} | {r['compile_s']:.1f} |" for r in result["files"]]
    return "\n".join(lines) + "\n"


def _workers(text: str) -> list:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--workers takes positive integers separated by commas, got {text!r}")
    return values


def main(argv=None) -> int:
    from bench.env import machine, publish, usable_cores
    from bench.gpu_check import gpu_test_files

    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    cores = usable_cores()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=cores, help="compiling processes (default: the cores)")
    p.add_argument("--workers", type=_workers, default=[1, 4, 8, 12], help="xdist process counts to schedule")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(ours)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    pytest_args = pytest_args or gpu_test_files()
    captured = capture(pytest_args)
    specs = sorted({s for v in captured["tests"].values() for s in v})
    if not specs:
        raise SystemExit(f"bench.compile_demand: the selection launched no Triton kernel ({' '.join(pytest_args)})")
    seconds = compile_all(specs, args.jobs)
    result = {"environment": machine("cpu"), "pytest_args": pytest_args, "jobs": args.jobs,
              **summarise(captured, seconds, args.workers)}
    publish(result, args.out, "compile-demand", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
