"""The whole GPU check as one prepared call: environment and install, CUDA tests, the benchmarks,
and a summary against the README's GPU targets, in at most 8 minutes on an H100/H200 (cold Triton
cache).

    python -m bench.gpu_check [--out DIR] [--dry] [--budget-s 480] [--archive FILE.tar.gz]
    make gpu-check                      # the same; ARGS="--out DIR --archive FILE" passes options
    make gpu-check DRY=1                # the CPU dry run (CI runs it): tiny shapes, Triton interpreter

Stages, in order, each a subprocess (its own process group, killed when it overruns its budget and
recorded as "timed out"), each writing under OUT/<nn-stage>/ (log.txt and the benchmark's own
JSON + Markdown) as soon as it ends; OUT/summary.json and OUT/summary.md are rewritten atomically
before and after every stage, so a call cut short still leaves everything done before it.

  stage          GPU budget  what
  01-env              30 s   nvidia-smi, versions, commit; diffusers from the wheels in .whl/ if the
                             image lacks it (pip --target /tmp/stattn-site, put on PYTHONPATH); stattn
                             itself editable (pip -e ., offline) where this tree's is not importable
  02-correctness      90 s   pytest -m gpu over the test files with gpu-marked tests (the kernels vs
                             fp64 in fp32/fp16/bf16, rows/lengths, the inner loop, CUDA graphs); with
                             pytest-xdist (in the GPU image) -n cores - 2 (at most 12): the ~230 cold
                             Triton compiles in parallel; each outcome goes to progress.jsonl as it is
                             known, so a time-out still gives the counts of the tests done. The cached
                             Triton launch's test runs first: if it fails, the later stages launch
                             through Triton's JIT (STATTN_TRITON_LAUNCH=jit; the summary says so)
  03-micro            75 s   bench.micro --quick at the SD 1.5 shapes (R = 1/2/4, offset; stattn, SDPA,
                             R x SDPA + combine, FlexAttention), one run per M: a time-out keeps the rest
  04-regulation       85 s   bench.regulation --quick (inner loop per layer call), then bench.e2e
                             --variants regulation on SD 2-base 512 px, DPM-Solver++, 50 steps, fp16,
                             1 repeat (plain vs fused, eager and CUDA graphs, vs the eager reference)
  05-spacetime        60 s   bench.spacetime, SD 1.5 512 px, 20 steps (not 50: the budget), 1 repeat,
                             1/3/5 objects fixed weights and the optimisation pass (time, peak memory)
  06-e2e              60 s   bench.e2e stock vs accelerate vs Runner (eager, graphs): SD 1.5 512 px,
                             2 repeats; SDXL 1024 px, 1 repeat, only if >= 30 s of the stage are left
  07-attend-excite    40 s   bench.attend_excite: diffusers' A&E pipeline vs it after stattn.accelerate vs
                             stattn.AttendAndExcite, SD 1.5 512 px, 10 steps, fp16, 1 repeat (time per
                             image, peak memory, refinement counts, latents vs diffusers)
  08-host             40 s   bench.host --device cuda --quick, fp16: per-call time of eager back-to-back
                             calls, the op vs SDPA at M = 16 / 256 (the op also with every launch through
                             Triton's JIT), the processor vs AttnProcessor2_0 at the SD 1.5 shapes, and the
                             tiny model's step with and without accelerate (its
                             files rewritten after each table: a time-out keeps the tables done)
  summary              —     OUT/summary.md: each stage's status, time and key numbers, and every GPU
                             target of the README's Status table with its measured value, met or not
  total              480 s   (--budget-s, default 480, caps the whole run: a stage gets at most what is left)

On the GPU the stages run with CXX naming no compiler: the native CPU extension is neither built nor
used there (its build on first use takes minutes; stattn's CPU path then takes the reference).

The per-stage times are estimates for a cold H100/H200 that no run has confirmed yet: the summary
records each stage's time, so the first GPU run shows where the budgets need moving.

On a GPU machine, from a copy of the tree (no .git needed). Beside the tree, at its root:
  .whl/diffusers-0.42.1-py3-none-any.whl     the GPU image has torch, triton, transformers, not diffusers:
      pip download --no-deps --only-binary=:all: diffusers==0.42.1 -d .whl
      (.whl/ is in .gitignore; in another checkout: echo .whl/ >> .git/info/exclude)
  COMMIT                                      the commit the copy is of (read when there is no .git):
      git rev-parse HEAD > COMMIT                (/COMMIT is in .gitignore)
The one command (the device tool: carry [".whl", "COMMIT"], timeout_s 600):
      python3 -m bench.gpu_check --out /tmp/gpu-check --archive "$OUT/gpu-check.tar.gz"
--archive rewrites one .tar.gz of OUT after every stage (the device returns at most 8 files; a
time-out of the call still returns the archive of the stages done). The summary is also printed.
Unpack it under bench/results/ and commit it.

--dry: the same stages on the CPU with tiny shapes and quick options, TRITON_INTERPRET=1, and a
one-case CPU test selection (about 2 minutes on 2 idle cores, 4 on busy ones; its numbers check the
script, they measure nothing); each stage may take 300 s there, the whole 1200 s. Exit status: 0 if
every stage ended ok, 1 otherwise.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from . import pytest_progress
from .commit import tree_state

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET_S = {"gpu": 480.0, "dry": 1200.0}   # the dry run's are loose (DRY_STAGE_BUDGET_S)
SITE = Path("/tmp/stattn-site")                    # where the carried wheels are installed
NO_COMPILER = "stattn-gpu-check-no-compiler"       # CXX on the GPU: the native CPU extension is not built
KILL_GRACE_S = 3.0                                 # SIGTERM, then SIGKILL after this long


# ------------------------------------------------------------------------------ the stage runner

class StageTimedOut(Exception):
    """A command ran past its stage's deadline; its process group was killed."""


@dataclass
class StageContext:
    """What a stage's body gets: its folder, its deadline, the environment of its subprocesses
    (one dict for all stages: the env stage adds PYTHONPATH for the later ones), whether this is
    the dry run, and the record of the commands it ran."""
    directory: Path
    deadline: float
    env: dict
    dry: bool
    commands: list = field(default_factory=list)
    facts: dict = field(default_factory=dict)     # what the stage found out (env: versions, commit)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def call(self, argv: list, *, min_left_s: float = 0.0, label: Optional[str] = None,
             extra_env: Optional[dict] = None) -> Optional[int]:
        """Run argv in REPO, its output appended to the stage's log.txt; its exit status, or None
        when skipped because less than min_left_s of the stage is left. Past the deadline the
        command's process group is killed and StageTimedOut raised."""
        argv = [str(a) for a in argv]
        record = {"label": label or _label(argv), "argv": argv}
        self.commands.append(record)
        left = self.left()
        if left < max(min_left_s, 1.0):
            record.update(status=f"skipped: {max(left, 0):.0f} s of the stage left, needs {min_left_s:.0f} s", rc=None)
            return None
        t0 = time.monotonic()
        with open(self.directory / "log.txt", "a") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, cwd=REPO, env={**self.env, **(extra_env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                _kill_group(proc)   # on a time-out, and whatever a finished command left in its group
            seconds = round(time.monotonic() - t0, 1)
            if rc is None:
                log.write(f"\n[gpu_check] timed out after {seconds} s: process group killed\n\n")
                record.update(status=f"timed out after {seconds:.0f} s", rc=None, seconds=seconds)
                raise StageTimedOut(record["label"])
            log.write(f"[gpu_check] exit {rc} after {seconds} s\n\n")
        record.update(status="ok" if rc == 0 else f"exit {rc}", rc=rc, seconds=seconds)
        return rc


def _label(argv: list) -> str:
    """A command's short name: the module of `python -m MODULE`, else the program and its first word."""
    return argv[2] if len(argv) > 2 and argv[1] == "-m" else " ".join(argv[:2])


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, SIGKILL to it after a grace period."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # children that ignored SIGTERM or outlived the leader
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@dataclass(frozen=True)
class Stage:
    name: str                                    # its folder under OUT: "03-micro"
    budget_s: float
    run: Callable[[StageContext], None]          # the body: ctx.call(...) for each command
    keys: Callable[[Path], dict] = lambda d: {}  # key numbers, read back from the stage's files
    details: Callable[[dict], list] = lambda k: []  # Markdown lines of those numbers for summary.md
    note: str = ""                               # what it runs, and what differs from the issue's spec


def run_check(stages: list, out: Path, budget_s: float, dry: bool, archive: Optional[Path] = None,
              env: Optional[dict] = None, header: Optional[dict] = None, log=print) -> dict:
    """Run the stages in order, the whole within budget_s; summary.json / .md before and after each."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = dict(os.environ if env is None else env)
    summary = {"mode": "dry" if dry else "gpu", "budget_s": budget_s, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               **(header or {}), "ok": False,
               "stages": [{"name": s.name, "budget_s": s.budget_s, "status": "pending", "note": s.note}
                          for s in stages]}
    publish_summary(summary, out, archive)
    for stage, record in zip(stages, summary["stages"]):
        left = budget_s - (time.monotonic() - start)
        if left < 1.0:
            record["status"] = "not run: the overall budget is spent"
            continue
        directory = out / stage.name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        ctx = StageContext(directory, time.monotonic() + min(stage.budget_s, left), env, dry)
        record["status"] = "running"   # what a call cut short in this stage leaves
        publish_summary(summary, out, archive)
        log(f"[gpu_check] {stage.name}: budget {min(stage.budget_s, left):.0f} s")
        t0 = time.monotonic()
        try:
            stage.run(ctx)
            failed = [c for c in ctx.commands if c.get("rc") not in (0, None)]
            record["status"] = "ok" if not failed else f"failed: {failed[0]['label']} ({failed[0]['status']})"
        except StageTimedOut as exc:
            record["status"] = f"timed out: {exc}"
        except Exception as exc:   # one broken stage must not stop the later ones
            record["status"] = f"error: {type(exc).__name__}: {exc}"
        record.update(seconds=round(time.monotonic() - t0, 1), commands=ctx.commands, facts=ctx.facts)
        record["keys"] = _guarded(stage.keys, directory)
        record["details"] = _guarded(stage.details, record["keys"], default=[])
        summary.update({k: ctx.facts[k] for k in ("commit", "gpu", "triton_launch") if k in ctx.facts})
        log(f"[gpu_check] {stage.name}: {record['status']} ({record['seconds']:.0f} s)")
        publish_summary(summary, out, archive)
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["ok"] = all(r["status"] == "ok" for r in summary["stages"])
    publish_summary(summary, out, archive)
    return summary


def _guarded(fn, arg, default=None):
    """fn(arg), or what went wrong: files half written by a killed stage must not crash the summary."""
    try:
        return fn(arg)
    except Exception as exc:
        return default if default is not None else {"error": f"{type(exc).__name__}: {exc}"}


def _write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def publish_summary(summary: dict, out: Path, archive: Optional[Path] = None) -> None:
    """summary.json and summary.md, each written whole and renamed; then the archive of OUT."""
    _write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    _write_atomic(out / "summary.md", markdown(summary))
    if archive is not None:
        archive.parent.mkdir(parents=True, exist_ok=True)
        tmp = archive.with_name(f".{archive.name}.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(out, arcname=out.name)
        os.replace(tmp, archive)


# -------------------------------------------------------------------------- reading result files

def _get(d, *path):
    """d[path[0]][path[1]]..., None where any step is missing or not a mapping."""
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _fmt(x, spec: str = ".3g", suffix: str = "") -> str:
    return "n/a" if not isinstance(x, (int, float)) or isinstance(x, bool) else f"{x:{spec}}{suffix}"


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _results(directory: Path, prefix: str) -> list:
    """The benchmark's result files in a stage folder (<prefix>-<device>-<time>.json), oldest first."""
    return [_load(p) for p in sorted(directory.glob(f"{prefix}-*.json"))]


def _pct(x) -> str:
    return _fmt(None if x is None else 100 * x, "+.1f", " %")


# ------------------------------------------------------------------------------------ stage 1: env

VERSIONS = r"""
import json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "triton", "diffusers", "transformers", "numpy", "stattn", "stattn.kernels"):
    try:
        module = __import__(name, fromlist=["_"])
        out[name] = getattr(module, "__version__", None) or module.__file__
    except Exception as exc:
        out[name], out[name + " error"] = None, f"{type(exc).__name__}: {exc}"
if out["torch"]:
    import torch
    out["cuda"], out["cuda_available"] = torch.version.cuda, torch.cuda.is_available()
    out["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
print("GPU_CHECK_VERSIONS " + json.dumps(out))
"""


def _versions(ctx: StageContext) -> dict:
    """Versions as the later stages' interpreter sees them (the stage environment's PYTHONPATH)."""
    log = ctx.directory / "log.txt"
    start = log.stat().st_size if log.exists() else 0
    ctx.call([sys.executable, "-c", VERSIONS], label="versions")
    with open(log) as f:
        f.seek(start)
        for line in f:
            if line.startswith("GPU_CHECK_VERSIONS "):
                return json.loads(line.split(" ", 1)[1])
    return {}


def _nvidia_smi(ctx: StageContext) -> str:
    if shutil.which("nvidia-smi") is None:
        return "none (no nvidia-smi)"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=max(1.0, ctx.left()))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"nvidia-smi failed: {exc}"
    return done.stdout.strip() or f"nvidia-smi: {done.stderr.strip()}"


def stage_env(ctx: StageContext, wheels: Path = REPO / ".whl") -> None:
    """GPU, versions and commit; diffusers from the wheels, and stattn itself, where not importable."""
    ctx.facts["commit"] = tree_state(REPO)
    ctx.facts["gpu"] = _nvidia_smi(ctx)
    versions, install = _versions(ctx), []
    if not versions.get("diffusers"):
        found = sorted(wheels.glob("*.whl"))
        if not found:
            raise RuntimeError(f"diffusers is not importable and {wheels} holds no wheel "
                               "(pip download --no-deps --only-binary=:all: diffusers==0.42.1 -d .whl)")
        ctx.call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                  "--upgrade", "--target", SITE, *found], label=f"pip install --target {SITE}")
        ctx.env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(SITE), ctx.env.get("PYTHONPATH"))))
        install.append(f"{' '.join(w.name for w in found)} into {SITE} (on PYTHONPATH)")
    kernels = versions.get("stattn.kernels")
    if not kernels or Path(kernels).resolve().parent != REPO / "kernels":
        # offline, editable (stattn.kernels is kernels/); CXX names no compiler, so setup.py skips the
        # native CPU extension: a GPU run does not use it, and its build takes minutes
        ctx.call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                  "-e", "."], label="pip install -e .", extra_env={"CXX": NO_COMPILER})
        install.append("stattn: pip install -e . (without the native CPU extension)")
    if install:
        versions = _versions(ctx)
    ctx.facts["install"] = install or ["nothing: diffusers and this tree's stattn were importable"]
    ctx.facts["versions"] = versions
    (ctx.directory / "env.json").write_text(json.dumps(ctx.facts, indent=1) + "\n")
    missing = [n for n in ("torch", "triton", "diffusers", "transformers", "stattn", "stattn.kernels")
               if not versions.get(n)]
    if missing:
        raise RuntimeError(f"not importable after the install: {', '.join(missing)}")


def keys_env(directory: Path) -> dict:
    facts = _load(directory / "env.json")
    v = facts.get("versions", {})
    return {"gpu": facts.get("gpu"), "commit": _get(facts, "commit", "commit"),
            **{k: v.get(k) for k in ("python", "torch", "cuda", "triton", "diffusers", "transformers", "numpy")},
            "install": facts.get("install")}


def details_env(k: dict) -> list:
    return [f"- install: {line}" for line in k.get("install") or []]


def brief_env(k: dict) -> str:
    return (f"{k.get('gpu')}; python {k.get('python')}, torch {k.get('torch')} (CUDA {k.get('cuda')}), "
            f"triton {k.get('triton')}, diffusers {k.get('diffusers')}, transformers {k.get('transformers')}")


# ---------------------------------------------------------------------------- stage 2: correctness

DRY_TESTS = ["tests/test_kernels.py", "-k", "test_kernel_matches_reference and D40-R1-T0"]  # one interpreter case


# The CUDA test of stattn's cached Triton launch against Triton's JIT launch (bit-equal outputs).
# It is collected first; should it fail, the later stages launch through the JIT
# (STATTN_TRITON_LAUNCH=jit): their numbers then stand, and the summary says so.
LAUNCH_TEST_FILE = "tests/test_triton_launch.py"
LAUNCH_TEST = f"{LAUNCH_TEST_FILE}::test_on_cuda_the_cached_launch_computes_what_the_jit_launch_computes"


def stage_correctness(ctx: StageContext) -> None:
    if ctx.dry:
        selection = DRY_TESTS
    else:
        files = gpu_test_files()   # not all of tests/: collecting the rest costs time and builds nothing here
        selection = sorted(files, key=lambda f: f != LAUNCH_TEST_FILE)
        if _importable(ctx, "xdist"):
            selection += ["-n", str(xdist_workers())]
    try:
        run_gpu_tests(ctx, selection)
    finally:                       # a time-out too: the outcomes reported so far decide
        launch_fallback(ctx, pytest_progress.read(ctx.directory / PROGRESS))


def launch_fallback(ctx: StageContext, outcomes: list) -> None:
    """STATTN_TRITON_LAUNCH=jit for the later stages if the cached-launch test failed on CUDA."""
    failed = [r["outcome"] for r in outcomes if r.get("nodeid") == LAUNCH_TEST and r.get("outcome") in ("failed", "error")]
    if failed:
        ctx.env["STATTN_TRITON_LAUNCH"] = "jit"
        ctx.facts["triton_launch"] = (f"jit: {LAUNCH_TEST.split('::')[1]} {failed[0]}; the later stages launch "
                                      "every kernel through Triton's JIT (STATTN_TRITON_LAUNCH=jit)")


def run_gpu_tests(ctx: StageContext, selection: list) -> None:
    """pytest -m gpu on selection, junit.xml at the end and each outcome appended to progress.jsonl as
    it is known (bench.pytest_progress): a time-out keeps the counts of the tests done."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.pytest_progress",
            "-m", "gpu", "--junitxml", ctx.directory / "junit.xml", *selection]
    ctx.call(argv, label="pytest -m gpu", extra_env={pytest_progress.ENV: str(ctx.directory / PROGRESS)})


PROGRESS = "progress.jsonl"


def xdist_workers(cpus: Optional[int] = None) -> int:
    """pytest-xdist processes for 02. Its time is the cold Triton compiles, one core each: 234 kernel
    variants, 168 s of one Xeon core, which 4 processes bring to 49 s and 12 to 19 s in xdist's
    scheduling (python -m bench.compile_demand: bench/results/compile-demand-cpu-intel-xeon-20261203-160359).
    Two cores stay for the controller and the processes' CUDA host threads."""
    from .env import usable_cores

    return max(1, min(12, (usable_cores() if cpus is None else cpus) - 2))


def gpu_test_files(tests: Path = REPO / "tests") -> list:
    """The test files with a function or class marked gpu, or a module-level pytestmark naming it
    (relative to REPO; read from the syntax tree: the marker's text inside a string does not count)."""
    return [str(p.relative_to(REPO)) for p in sorted(tests.glob("test_*.py")) if _marks_gpu(p.read_text())]


def _marks_gpu(source: str) -> bool:
    def is_gpu(node) -> bool:       # pytest.mark.gpu, called or not
        node = node.func if isinstance(node, ast.Call) else node
        return (isinstance(node, ast.Attribute) and node.attr == "gpu" and isinstance(node.value, ast.Attribute)
                and node.value.attr == "mark")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if any(is_gpu(d) for d in node.decorator_list):
                return True
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                  for t in node.targets):
            marks = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            if any(is_gpu(m) for m in marks):
                return True
    return False


def _importable(ctx: StageContext, module: str) -> bool:
    try:
        return subprocess.run([sys.executable, "-c", f"import {module}"], env=ctx.env, capture_output=True,
                              timeout=max(1.0, min(30.0, ctx.left()))).returncode == 0
    except subprocess.SubprocessError:
        return False


def keys_correctness(directory: Path) -> dict:
    launch_test = next((r["outcome"] for r in pytest_progress.read(directory / PROGRESS)
                        if r.get("nodeid") == LAUNCH_TEST), None)
    path = directory / "junit.xml"
    if not path.is_file():
        return {**_progress_counts(directory / PROGRESS), "launch_test": launch_test}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    return {**count, "passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"],
            "not_passed": bad[:20], "launch_test": launch_test}


def _progress_counts(path: Path) -> dict:
    """Counts from bench.pytest_progress's lines when pytest did not finish (no junit.xml): the tests
    that ended before the kill, marked partial."""
    records = pytest_progress.read(path)
    if not records:
        return {"junit": "missing (pytest did not finish)"}
    n = {o: sum(r["outcome"] == o for r in records) for o in ("passed", "failed", "error", "skipped", "xfailed",
                                                             "xpassed")}
    # junit.xml's convention: an xfail counts as skipped, an xpass as passed
    return {"partial": True, "tests": len(records), "passed": n["passed"] + n["xpassed"], "failures": n["failed"],
            "errors": n["error"], "skipped": n["skipped"] + n["xfailed"],
            "not_passed": [r["nodeid"] for r in records if r["outcome"] in ("failed", "error")][:20]}


def brief_correctness(k: dict) -> str:
    if "tests" not in k:
        return k.get("junit") or k.get("error", "n/a")
    counts = f"{k['passed']} passed, {k['failures']} failed, {k['errors']} errors, {k['skipped']} skipped"
    if k.get("partial"):
        return f"partial (pytest did not finish): {counts} of the {k['tests']} reported"
    return f"{counts} of {k['tests']}"


def details_correctness(k: dict) -> list:
    return [f"- not passed: `{name}`" for name in k.get("not_passed", [])]


# ---------------------------------------------------------------------------------- stage 3: micro

MICRO_SPLIT = ("m4096", "m1024", "m256")   # one run per SD 1.5 shape: a time-out keeps the shapes done


def stage_micro(ctx: StageContext) -> None:
    micro = [sys.executable, "-m", "bench.micro", "--quick", "--out", ctx.directory]
    if ctx.dry:
        ctx.call([*micro, "--device", "cpu", "--filter", "tiny-m64-h2-d40-r1-offset"])
        return
    for shape in MICRO_SPLIT:
        ctx.call([*micro, "--device", "cuda", "--filter", f"sd15-{shape}-"], label=f"bench.micro {shape}")


def keys_micro(directory: Path) -> dict:
    cases = [c for run in _results(directory, "micro") for c in run.get("cases", [])]
    if not cases:
        return {"results": "missing"}
    rows = []
    for c in cases:
        ours, sp = _get(c, "impls", "stattn") or {}, c.get("speedup") or {}
        rows.append({"case": c.get("name"), "M": c.get("M"), "R": c.get("R"), "status": c.get("status"),
                     "fwd_ms": _get(ours, "fwd", "ms", "median"), "fwdbwd_ms": _get(ours, "fwd+bwd", "ms", "median"),
                     "pct_copy_fwd": _get(ours, "fwd", "pct_copy"), "pct_copy_fwdbwd": _get(ours, "fwd+bwd", "pct_copy"),
                     "x_sdpa_fwd": _get(sp, "fwd", "sdpa"), "x_sdpa_fwdbwd": _get(sp, "fwd+bwd", "sdpa"),
                     "x_flex_fwdbwd": _get(sp, "fwd+bwd", "flex")})
    return {"cases": len(rows), "failed": [r["case"] for r in rows if r["status"] != "ok"], "rows": rows}


def _extreme(rows, key, where=lambda r: True, pick=min):
    """(value, case) of the smallest (pick=min) value of key over the rows that have one."""
    vals = [(r[key], r["case"]) for r in rows if where(r) and isinstance(r.get(key), (int, float))]
    return pick(vals) if vals else (None, None)


def brief_micro(k: dict) -> str:
    if "rows" not in k:
        return k.get("results") or k.get("error", "n/a")
    failed = f", FAILED the gate: {', '.join(k['failed'])}" if k["failed"] else ""
    return f"cases: {k['cases']}{failed}"


def details_micro(k: dict) -> list:
    lines = ["| case | fwd ms | × SDPA fwd | × SDPA fwd+bwd | × Flex fwd+bwd | % copy fwd | % copy fwd+bwd |",
             "|---|---|---|---|---|---|---|"]
    for r in k.get("rows", []):
        lines.append(f"| {r['case']} | {_fmt(r['fwd_ms'])} | {_fmt(r['x_sdpa_fwd'])} | {_fmt(r['x_sdpa_fwdbwd'])} | "
                     f"{_fmt(r['x_flex_fwdbwd'])} | {_fmt(r['pct_copy_fwd'], '.0f')} | {_fmt(r['pct_copy_fwdbwd'], '.0f')} |")
    return lines if k.get("rows") else []


# ----------------------------------------------------------------------------- stage 4: regulation

E2E_REGULATION = ["--variants", "regulation", "--scheduler", "DPMSolverMultistepScheduler"]


def stage_regulation(ctx: StageContext) -> None:
    device = ["--device", "cpu"] if ctx.dry else ["--device", "cuda"]
    ctx.call([sys.executable, "-m", "bench.regulation", *device, "--quick", "--out", ctx.directory])
    model = ["--model", "tiny", "--steps", "2"] if ctx.dry else ["--model", "full:sd2-base", "--steps", "50"]
    ctx.call([sys.executable, "-m", "bench.e2e", *model, *E2E_REGULATION, "--repeats", "1", "--out", ctx.directory],
             label="bench.e2e --variants regulation")


def _e2e_models(directory: Path) -> list:
    """Per model: its steps, size and each variant's median ms and ratio to the first variant."""
    models = []
    for run in _results(directory, "e2e"):
        for m in run.get("models", []):
            models.append({"model": m.get("model"), "size": m.get("size"), "steps": m.get("steps"),
                           "repeats": m.get("repeats"),
                           "ms": {n: _get(v, "ms", "median") for n, v in (m.get("variants") or {}).items()}})
    return models


def _overhead(ms: dict, name: str, base: str):
    a, b = ms.get(name), ms.get(base)
    return a / b - 1.0 if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def keys_regulation(directory: Path) -> dict:
    runs = _results(directory, "regulation")
    cases = []
    for row in (runs[-1].get("cases", []) if runs else []):
        c, impls = row.get("case") or {}, row.get("impls") or {}
        cases.append({"case": "H={H} T={T} D={D} {dtype}".format(**{k: c.get(k) for k in ("H", "T", "D", "dtype")}),
                      "gate_ok": all(_get(e, "gate", "ok") for e in impls.values()) if impls else None,
                      "fused_us": _get(impls, "fused", "wall_us", "median"),
                      "fused_graph_us": _get(impls, "fused", "graph_us", "median"),
                      "torch_us": _get(impls, "torch", "wall_us", "median")})
    models = _e2e_models(directory)
    for m in models:
        m["overhead_eager"] = _overhead(m["ms"], "regulation", "runner")
        m["overhead_graphs"] = _overhead(m["ms"], "regulation+graphs", "runner+graphs")
        m["overhead_reference"] = _overhead(m["ms"], "regulation (reference)", "runner")
    return {"inner_loop": cases, "e2e": models}


def brief_regulation(k: dict) -> str:
    loop = k.get("inner_loop") or []
    worst, _ = _extreme(loop, "fused_us", pick=max)
    gates = "n/a" if not loop else "all ok" if all(c["gate_ok"] for c in loop) else "FAILED"
    parts = [f"inner loop: {len(loop)} cases, gates {gates}, fused ≤ {_fmt(worst, '.1f', ' µs')}/call"]
    for m in k.get("e2e") or []:
        parts.append(f"{m['model']} {m['steps']} steps: regulation {_pct(m['overhead_eager'])} eager, "
                     f"{_pct(m['overhead_graphs'])} graphs, reference {_pct(m['overhead_reference'])}")
    return "; ".join(parts)


def _e2e_table(models: list) -> list:
    lines = []
    for m in models:
        first = next(iter(m["ms"]), None)
        lines += ["", f"{m['model']}, {m['size']} px, {m['steps']} steps, repeats: {m['repeats']}", "",
                  f"| variant | median ms | vs {first} |", "|---|---|---|"]
        lines += [f"| {n} | {_fmt(v, '.1f')} | {_pct(_overhead(m['ms'], n, first))} |" for n, v in m["ms"].items()]
    return lines


def details_regulation(k: dict) -> list:
    lines = []
    if k.get("inner_loop"):
        lines += ["| inner loop case | gates | fused µs/call | fused graph µs | torch µs/call |", "|---|---|---|---|---|"]
        lines += [f"| {c['case']} | {'ok' if c['gate_ok'] else 'FAIL'} | {_fmt(c['fused_us'], '.1f')} | "
                  f"{_fmt(c['fused_graph_us'], '.1f')} | {_fmt(c['torch_us'], '.1f')} |" for c in k["inner_loop"]]
    return lines + _e2e_table(k.get("e2e") or [])


# ------------------------------------------------------------------------------ stage 5: spacetime

def stage_spacetime(ctx: StageContext) -> None:
    model = ["--model", "tiny", "--steps", "2"] if ctx.dry else ["--model", "full:sd15", "--steps", "20"]
    ctx.call([sys.executable, "-m", "bench.spacetime", *model, "--repeats", "1", "--out", ctx.directory])


def keys_spacetime(directory: Path) -> dict:
    runs = _results(directory, "spacetime")
    m = (_get(runs[-1], "models") or [{}])[0] if runs else {}
    variants = m.get("variants") or {}
    opt = _get(m, "optimise", "full") or {}
    return {"model": m.get("model"), "steps": m.get("steps"),
            "overhead": {n: v.get("vs_plain") for n, v in variants.items()},
            "peak_gib": {n: (v["peak_bytes"] / 2**30 if v.get("peak_bytes") else None) for n, v in variants.items()},
            "optimise_pass_ms": opt.get("pass_ms"), "optimise_vs_generation": opt.get("vs_plain_generation"),
            "optimise_peak_gb": opt["peak_bytes"] / 1e9 if opt.get("peak_bytes") else None}


def brief_spacetime(k: dict) -> str:
    if not k.get("model"):
        return k.get("error", "n/a")
    o = k.get("overhead") or {}
    return (f"{k.get('model')} {k.get('steps')} steps: fused n=3 {_pct(o.get('fused n=3'))}, unfused n=3 "
            f"{_pct(o.get('unfused n=3'))} vs plain; optimisation pass {_fmt(k.get('optimise_pass_ms'), '.0f', ' ms')} "
            f"({_fmt(k.get('optimise_vs_generation'), '.2f', '×')} a generation, peak "
            f"{_fmt(k.get('optimise_peak_gb'), '.1f', ' GB')})")


def details_spacetime(k: dict) -> list:
    o, peak = k.get("overhead") or {}, k.get("peak_gib") or {}
    if not o:
        return []
    return ["| variant | vs plain | peak GiB |", "|---|---|---|",
            *(f"| {n} | {_pct(v)} | {_fmt(peak.get(n), '.2f')} |" for n, v in o.items())]


# -------------------------------------------------------------------------- stage 7: attend-excite

def stage_attend_excite(ctx: StageContext) -> None:
    """diffusers' Attend-and-Excite pipeline vs the same after stattn.accelerate vs stattn.AttendAndExcite."""
    if ctx.dry:
        model = ["--model", "tiny", "--size", "64", "--attn-res", "4", "4", "--steps", "2"]
    else:   # the A&E paper's setting but 10 steps (the budget): every turn updates, turn 0 refines
        model = ["--model", "full:sd15", "--size", "512", "--steps", "10", "--max-refinement-steps", "2"]
    ctx.call([sys.executable, "-m", "bench.attend_excite", *model, "--repeats", "1", "--out", ctx.directory])


def keys_attend_excite(directory: Path) -> dict:
    runs = _results(directory, "attend-excite")
    m = _get(runs[-1], "result") or {} if runs else {}
    variants = m.get("variants") or {}
    return {"model": m.get("model"), "size": m.get("size"), "steps": m.get("steps"),
            "s_per_image": {n: _get(v, "s_per_image", "median") for n, v in variants.items()},
            "speedup": {n: v.get("speedup_vs_diffusers") for n, v in variants.items()},
            "peak_gib": {n: (v["peak_bytes"] / 2**30 if v.get("peak_bytes") else None) for n, v in variants.items()},
            "refinements": {n: v.get("refinement_iterations") for n, v in variants.items()},
            "latent_diff": {n: v.get("max_abs_latent_diff_vs_diffusers") for n, v in variants.items()}}


def brief_attend_excite(k: dict) -> str:
    if not k.get("model"):
        return k.get("error", "n/a")
    s = k.get("speedup") or {}
    return (f"{k.get('model')} {k.get('size')} px {k.get('steps')} steps: stattn {_fmt(s.get('stattn'), '.2f', '×')}, "
            f"diffusers+accelerate {_fmt(s.get('diffusers+accelerate'), '.2f', '×')} diffusers' speed")


def details_attend_excite(k: dict) -> list:
    t, s, peak = k.get("s_per_image") or {}, k.get("speedup") or {}, k.get("peak_gib") or {}
    if not t:
        return []
    n, d = k.get("refinements") or {}, k.get("latent_diff") or {}
    return ["| variant | s per image | × diffusers | peak GiB | refinements | max Δ latents |", "|---|---|---|---|---|---|",
            *(f"| {v} | {_fmt(t.get(v), '.2f')} | {_fmt(s.get(v), '.2f')} | {_fmt(peak.get(v), '.2f')} | {n.get(v)} | "
              f"{_fmt(d.get(v), '.1e')} |" for v in t)]


# ----------------------------------------------------------------------------------- stage 8: host

def stage_host(ctx: StageContext) -> None:
    """bench.host: is the drop-in's per-call host cost above stock's (eager, no CUDA graphs)?"""
    host = [sys.executable, "-m", "bench.host", "--quick", "--out", ctx.directory]
    if ctx.dry:
        ctx.call([*host, "--device", "cpu", "--repeats", "2", "--min-time", "0", "--step-runs", "1"])
        return
    ctx.call([*host, "--device", "cuda", "--repeats", "10", "--min-time", "0.2", "--step-runs", "10"])


def keys_host(directory: Path) -> dict:
    runs = _results(directory, "host")
    if not runs:
        return {"results": "missing"}
    r = runs[-1]
    rows = [{"case": f"op M={c['M']} D={c['D']} {c['mode']}", "ratio": c.get("ratio"), "ratio_jit": c.get("ratio_jit")}
            for c in r.get("op", [])]
    rows += [{"case": f"layer {c['model']} M={c['M']}", "ratio": c.get("ratio")} for c in r.get("processor", [])]
    rows += [{"case": f"step {c['model']} {c['size']} px", "ratio": c.get("ratio")} for c in r.get("step", [])]
    return {"dtype": r.get("dtype"), "complete": r.get("complete", True), "rows": rows}


def brief_host(k: dict) -> str:
    if "rows" not in k:
        return k.get("results") or k.get("error", "n/a")
    worst, case = _extreme(k["rows"], "ratio", pick=max) if k["rows"] else (None, None)
    partial = "" if k.get("complete", True) else ", partial run"
    return f"{len(k['rows'])} cells ({k.get('dtype')}{partial}), worst stattn / stock {_fmt(worst, '.2f')} ({case})"


def details_host(k: dict) -> list:
    rows = k.get("rows") or []
    return ["| cell | stattn / stock | with the JIT launch |", "|---|---|---|",
            *(f"| {r['case']} | {_fmt(r['ratio'], '.2f')} | "
              f"{'–' if r.get('ratio_jit') is None else _fmt(r['ratio_jit'], '.2f')} |" for r in rows)] \
        if rows else []


# ----------------------------------------------------------------------------------- stage 6: e2e

def stage_e2e(ctx: StageContext) -> None:
    if ctx.dry:
        ctx.call([sys.executable, "-m", "bench.e2e", "--model", "tiny", "--steps", "2", "--repeats", "1",
                  "--out", ctx.directory])
        return
    ctx.call([sys.executable, "-m", "bench.e2e", "--model", "full:sd15", "--repeats", "2", "--out", ctx.directory],
             label="bench.e2e sd15")
    ctx.call([sys.executable, "-m", "bench.e2e", "--model", "full:sdxl", "--repeats", "1", "--out", ctx.directory],
             label="bench.e2e sdxl", min_left_s=30)


def keys_e2e(directory: Path) -> dict:
    models = _e2e_models(directory)
    for m in models:
        m["accelerate"] = _overhead(m["ms"], "stock+accelerate", "stock")
        m["runner"] = _overhead(m["ms"], "runner", "stock")
        m["graphs_vs_runner"] = _overhead(m["ms"], "runner+graphs", "runner")
    return {"models": models}


def brief_e2e(k: dict) -> str:
    return "; ".join(f"{m['model']} {m['size']} px: accelerate {_pct(m['accelerate'])}, runner {_pct(m['runner'])} "
                     f"vs stock, graphs {_pct(m['graphs_vs_runner'])} vs runner" for m in k.get("models") or []) or "n/a"


def details_e2e(k: dict) -> list:
    return _e2e_table(k.get("models") or [])[1:]


# --------------------------------------------------------------------- the stages and the targets

DRY_STAGE_BUDGET_S = 300.0   # each stage's in the dry run: CI machines are shared, their times vary 5x


def default_stages(dry: bool = False) -> list:
    """The check's stages (--dry changes their options and budgets, not the list: see each stage_ body)."""
    stages = [
        Stage("01-env", 30, stage_env, keys_env, details_env, note="nvidia-smi, versions, commit; install where needed"),
        Stage("02-correctness", 90, stage_correctness, keys_correctness, details_correctness,
              note="pytest -m gpu over the files with gpu-marked tests, -n (cores - 2, at most 12) with pytest-xdist"),
        Stage("03-micro", 75, stage_micro, keys_micro, details_micro,
              note="bench.micro --quick at the SD 1.5 shapes, one run per M"),
        Stage("04-regulation", 85, stage_regulation, keys_regulation, details_regulation,
              note="bench.regulation --quick; bench.e2e SD 2-base 512 px DPM-Solver++ 50 steps fp16, 1 repeat"),
        Stage("05-spacetime", 60, stage_spacetime, keys_spacetime, details_spacetime,
              note="bench.spacetime SD 1.5 512 px, 20 steps (the issue: 50; the budget), 1 repeat"),
        Stage("06-e2e", 60, stage_e2e, keys_e2e, details_e2e,
              note="bench.e2e SD 1.5 512 px 2 repeats; SDXL 1024 px 1 repeat if >= 30 s are left"),
        Stage("07-attend-excite", 40, stage_attend_excite, keys_attend_excite, details_attend_excite,
              note="bench.attend_excite SD 1.5 512 px 10 steps fp16: diffusers vs +accelerate vs stattn"),
        Stage("08-host", 40, stage_host, keys_host, details_host,
              note="bench.host --device cuda --quick fp16: op vs SDPA, layer vs AttnProcessor2_0, tiny step"),
    ]
    return [replace(s, budget_s=DRY_STAGE_BUDGET_S) for s in stages] if dry else stages


BRIEFS = {"01-env": brief_env, "02-correctness": brief_correctness, "03-micro": brief_micro,
          "04-regulation": brief_regulation, "05-spacetime": brief_spacetime, "06-e2e": brief_e2e,
          "07-attend-excite": brief_attend_excite, "08-host": brief_host}


def _all_under(values, bound):
    vals = [v for v in values if isinstance(v, (int, float))]
    return (max(vals) <= bound) if vals else None


def _all_equal(values) -> bool:
    """Whether the values (numbers, or lists of per-image counts) are all the same."""
    values = list(values)
    return all(v == values[0] for v in values)


def _targets(keys: dict) -> list:
    """(target, measured, met) for each GPU target of the README's Status table; met is None
    where the stage gave no number."""
    rows = []
    c = keys.get("02-correctness") or {}
    failed = c.get("failures", 0) + c.get("errors", 0)
    rows.append(("CUDA tests (`pytest -m gpu`) pass", brief_correctness(c),
                 None if "tests" not in c or (c.get("partial") and not failed)   # not all ran: open, unless one failed
                 else failed == 0 and c["passed"] > 0))
    outcome = c.get("launch_test")       # its outcome from progress.jsonl; None: not run (the dry run)
    rows.append(("cached Triton launch = JIT launch on CUDA (bit-equal outputs and gradients)", outcome or "not run",
                 None if outcome in (None, "skipped") else outcome == "passed"))
    micro = (keys.get("03-micro") or {}).get("rows") or []
    for label, key, where, pick, bound in (
            ("≥ SDPA at R = 1, forward (× SDPA ≥ 1)", "x_sdpa_fwd", lambda r: r["R"] == 1, min, 1.0),
            ("≥ SDPA at R = 1, forward + backward (× SDPA ≥ 1)", "x_sdpa_fwdbwd", lambda r: r["R"] == 1, min, 1.0),
            ("≥ 70 % of copy bandwidth, forward at M = 4096", "pct_copy_fwd", lambda r: r["M"] == 4096, min, 70.0),
            ("R = 4 ≥ 2.5× unfused (R SDPA + combine), forward", "x_sdpa_fwd", lambda r: r["R"] == 4, min, 2.5),
            ("R = 4 ≥ 2.5× unfused, forward + backward", "x_sdpa_fwdbwd", lambda r: r["R"] == 4, min, 2.5),
            ("backward ≥ 2× FlexAttention (fwd + bwd)", "x_flex_fwdbwd", lambda r: True, min, 2.0)):
        value, case = _extreme(micro, key, where, pick)
        rows.append((label, f"worst {_fmt(value)} ({case})" if case else "n/a",
                     None if value is None else value >= bound))
    reg = keys.get("04-regulation") or {}
    worst, case = _extreme(reg.get("inner_loop") or [], "fused_us", pick=max)
    rows.append(("inner loop ≤ 100 µs per layer call (fused, host wall time)",
                 f"worst {_fmt(worst, '.1f', ' µs')} ({case})" if case else "n/a",
                 None if worst is None else worst <= 100.0))
    for m in reg.get("e2e") or []:
        for mode in ("eager", "graphs"):
            value = m.get(f"overhead_{mode}")
            rows.append((f"Attention Regulation overhead ≤ 5 % ({m['model']}, {mode})", _pct(value),
                         None if value is None else value <= 0.05))
    st = keys.get("05-spacetime") or {}
    value = (st.get("overhead") or {}).get("fused n=3")
    rows.append(("spatial-temporal overhead ≤ 15 % (3 objects, fused)", _pct(value),
                 None if value is None else value <= 0.15))
    gb, ratio = st.get("optimise_peak_gb"), st.get("optimise_vs_generation")
    rows.append(("optimisation ≤ 24 GB and ≤ 4× a generation",
                 f"{_fmt(gb, '.1f', ' GB')}, {_fmt(ratio, '.2f', '×')}",
                 None if gb is None or ratio is None else gb <= 24.0 and ratio <= 4.0))
    for m in (keys.get("06-e2e") or {}).get("models") or []:
        for label, key, bound in (("accelerate ≤ stock", "accelerate", 0.0), ("runner ≥ stock (not slower)", "runner", 0.0),
                                  ("CUDA graphs faster than the eager runner", "graphs_vs_runner", 0.0)):
            value = m.get(key)
            rows.append((f"{label} ({m['model']}, {m['size']} px)", _pct(value),
                         None if value is None else value <= bound if key != "graphs_vs_runner" else value < bound))
    ae = keys.get("07-attend-excite") or {}
    speed, counts = (ae.get("speedup") or {}).get("stattn"), ae.get("refinements") or {}
    rows.append(("Attend-and-Excite on the engine faster than diffusers' pipeline, same refinements",
                 brief_attend_excite(ae) if ae.get("model") else "n/a",
                 None if speed is None else speed > 1.0 and _all_equal(counts.values())))
    host = keys.get("08-host") or {}
    worst, case = _extreme(host.get("rows") or [], "ratio", pick=max)
    rows.append(("host cost ≤ stock, eager (op vs SDPA, layer vs AttnProcessor2_0, tiny step; ratio ≤ 1.00)",
                 f"worst {_fmt(worst, '.2f')} ({case})" if case else "n/a", None if worst is None else worst <= 1.0))
    return rows


def _shown(argv: list) -> str:
    """A command as one would type it (python for this interpreter), shortened."""
    text = shlex.join(["python" if a == sys.executable else a for a in argv])
    return text if len(text) <= 300 else text[:297] + "..."


def markdown(summary: dict) -> str:
    dry = summary.get("mode") == "dry"
    commit = summary.get("commit") or {}
    keys = {r["name"]: r.get("keys") or {} for r in summary["stages"]}
    lines = [f"# stattn GPU check: {summary.get('gpu', 'n/a')}", ""]
    if dry:
        lines += ["**Dry run on the CPU** (tiny shapes, Triton interpreter): it checks the script; its numbers "
                  "measure nothing.", ""]
    lines += [f"Commit `{commit.get('commit', 'n/a')}` ({commit.get('source', 'n/a')}"
              f"{', dirty' if commit.get('dirty') else ''}); started {summary.get('started')}; budget "
              f"{_fmt(summary.get('budget_s'), '.0f', ' s')}, took {_fmt(summary.get('seconds'), '.0f', ' s')}"
              f"{'' if 'seconds' in summary else ' (not finished)'}.", ""]
    if summary.get("triton_launch"):
        lines += [f"**Triton launch fallback**: {summary['triton_launch']}.", ""]
    lines += ["| stage | status | time / budget | key numbers |", "|---|---|---|---|"]
    for r in summary["stages"]:
        brief = _guarded(BRIEFS[r["name"]], keys[r["name"]], default="") if r["name"] in BRIEFS else ""
        lines.append(f"| {r['name']} | {r['status']} | {_fmt(r.get('seconds'), '.0f')} / {_fmt(r['budget_s'], '.0f')} s "
                     f"| {brief} |")
    lines += ["", "## GPU targets (README, Status)", "", "| target | measured | met |", "|---|---|---|"]
    targets = _guarded(_targets, keys)
    if isinstance(targets, dict):          # a reader's bug must show, not leave an empty table
        lines.append(f"| (the targets could not be read: {targets['error']}) | n/a | n/a |")
    for target, measured, met in targets if isinstance(targets, list) else []:
        lines.append(f"| {target} | {measured} | {'n/a' if met is None else 'yes' if met else 'NO'} |")
    for r in summary["stages"]:
        commands = r.get("commands") or []
        if not commands and not r.get("details"):
            continue
        lines += ["", f"## {r['name']}", "", f"On a GPU: {r['note']}." if r.get("note") else "", ""]
        lines += [f"- `{_shown(c['argv'])}`: {c['status']}" for c in commands if c["label"] != "versions"]
        if r.get("details"):
            lines += ["", *r["details"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main

def _prepare_out(out: Path) -> None:
    """An earlier check's folder (it has summary.json) is replaced; any other non-empty one refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / "summary.json").is_file():
            raise SystemExit(f"--out {out}: not empty and not an earlier gpu_check folder (no summary.json); "
                             "choose another folder")
        shutil.rmtree(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="result folder (default: bench/results/gpu-check-<time>; "
                   "--dry: $TMPDIR/gpu-check-dry); an earlier check's folder is replaced")
    p.add_argument("--dry", action="store_true", help="the CPU dry run: tiny shapes, Triton interpreter")
    p.add_argument("--budget-s", type=float, help=f"time for the whole run (default {DEFAULT_BUDGET_S['gpu']:.0f} s, "
                   f"--dry {DEFAULT_BUDGET_S['dry']:.0f} s)")
    p.add_argument("--archive", type=Path, help="a .tar.gz of the result folder, rewritten after every stage")
    args = p.parse_args(argv)
    if args.budget_s is not None and not args.budget_s > 0:
        p.error(f"--budget-s must be a positive number of seconds, got {args.budget_s:g}")
    if args.archive is not None and not args.archive.name.endswith((".tar.gz", ".tgz")):
        p.error(f"--archive must name a .tar.gz or .tgz file, got {args.archive}")
    args.budget_s = args.budget_s or DEFAULT_BUDGET_S["dry" if args.dry else "gpu"]
    if args.out is None:
        args.out = (Path(os.environ.get("TMPDIR", "/tmp")) / "gpu-check-dry" if args.dry
                    else REPO / "bench" / "results" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def main(argv=None, stages: Optional[list] = None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    _prepare_out(out)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.dry:
        env["TRITON_INTERPRET"] = "1"          # read when the kernels are first imported
    else:
        env.pop("TRITON_INTERPRET", None)      # the real compiler on the GPU
        # no build of the native CPU extension on first use (minutes): a GPU run does not measure it,
        # and stattn's CPU path then takes the reference (with its one warning line)
        env["CXX"] = NO_COMPILER
    summary = run_check(stages if stages is not None else default_stages(args.dry), out, args.budget_s, args.dry,
                        args.archive, env)
    print(markdown(summary))
    print(f"wrote {out}/summary.md, summary.json" + (f"; {args.archive}" if args.archive else ""))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
