"""Micro-benchmark of ``stattn.region_attention`` against what a user would otherwise run.

For each case (a UNet cross-attention layer shape, R regions, optionally a Gaussian-basis offset)
every implementation is first checked against the fp64 reference on the same random inputs, then
timed, forward and forward+backward (gradients of q, region weights and theta: what the inner
optimisations of Attention Regulation / region control need; k and v need none):

  stattn      stattn.region_attention: the Triton kernels (on CPU: the Triton interpreter)
  stattn-ref  stattn.region_attention with STATTN_BACKEND=reference (CPU only)
  sdpa        R torch SDPA calls + the alpha-weighted combine, eager (the offset as a dense mask)
  flex        compiled FlexAttention, the offset a captured tensor read in score_mod
              (CUDA only: no CPU backward; R = 1 with an offset only: one softmax per call)
  eager-ref   stattn.reference.region_attention under autograd (what the released methods do)

Usage:
    python -m bench.micro [--device cuda|cpu] [--quick] [--dtype fp16|bf16|fp32] [--out DIR]
                          [--filter SUBSTRING] [--threads N] [--value-checks]

Writes micro-<device>-<YYYYmmdd-HHMMSS>.json (all raw numbers) and .md (the tables, also printed)
into --out. Measuring rules: medians of alternated runs in one process. CPU times of the Triton interpreter say nothing
about GPU performance; the CPU mode exists to exercise the whole harness without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # the only way Triton runs without a GPU; read when stattn's kernels are first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import stattn  # noqa: E402  (after the interpreter switch)
from stattn import reference  # noqa: E402

from .env import REPO, provenance, machine, publish, stattn_backend  # noqa: E402

DEFAULT_OUT = REPO / "bench" / "results"

B, N = 2, 77                   # batch (cond + uncond), CLIP text tokens
TOKENS, PINNED = (2, 3), (0, 5)  # offset: T = 2 target tokens; SOS and the first EOS pinned
QUANTILES = (0.5, 0.2, 0.8)    # median, p20, p80
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# (M, H, D) of the cross-attention layers: SD 1.5 / SD 2 at 512 px, SDXL at 1024 px
UNET_LAYERS = {
    "sd15": ((4096, 8, 40), (1024, 8, 80), (256, 8, 160)),
    "sd2": ((4096, 5, 64), (1024, 10, 64), (256, 20, 64)),
    "sdxl": ((4096, 10, 64), (1024, 20, 64)),
}
CPU_LAYERS = {"tiny": ((64, 2, 40), (256, 2, 64))}
# (R, offset) per layer: plain cross-attention, Attention Regulation's edit, multi-region control
VARIANTS = ((1, False), (1, True), (2, False), (4, False))

# ||out - ref|| / ||ref|| bounds per device and dtype; GPU fp32 runs tl.dot in tf32
TOLERANCE = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 3e-4,
             torch.float16: 2e-3, torch.bfloat16: 1e-2}
GRAD_TOL_FACTOR = 2.5  # gradients go through one more low-precision product (as in tests/)

# Timer settings (ms): do_bench's warm-up / measuring windows; CPU runs at least MIN_REPS calls
TIMING = {("cuda", False): (25, 100), ("cuda", True): (10, 40),
          ("cpu", False): (200, 2000), ("cpu", True): (1, 300)}
MIN_REPS, MAX_REPS = 3, 1000
COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}  # copy-bandwidth source size: far beyond any cache


# ----------------------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    model: str
    M: int
    H: int
    D: int
    R: int
    offset: bool = False

    @property
    def name(self) -> str:
        return f"{self.model}-m{self.M}-h{self.H}-d{self.D}-r{self.R}" + ("-offset" if self.offset else "")

    @property
    def side(self) -> int:
        """Latent grid side (square grids: M = side^2)."""
        return math.isqrt(self.M)

    @property
    def has_regions(self) -> bool:
        """R > 1 carries masks and weights; R = 1 is plain (or offset) cross-attention."""
        return self.R > 1

    def __str__(self) -> str:
        return self.name


def cases_for(device: str, quick: bool) -> list[Case]:
    """The benchmark's cases; --quick keeps a few that still cover every code path."""
    if device == "cpu":
        layers = CPU_LAYERS
    else:
        layers = {"sd15": UNET_LAYERS["sd15"]} if quick else UNET_LAYERS
    cases = [Case(model, M, H, D, R, off) for model, shapes in layers.items()
             for (M, H, D) in shapes for (R, off) in VARIANTS]
    if device == "cpu" and quick:  # the interpreter costs ~1 s per call at M = 256
        cases = [c for c in cases if c.M == 64 or (c.R == 1 and c.offset)]
    return cases


def representative_cases(device: str) -> list[Case]:
    """A few cases for the pytest-benchmark entry point: plain, offset, 4 regions."""
    model, (M, H, D) = ("sd15", UNET_LAYERS["sd15"][0]) if device == "cuda" else ("tiny", CPU_LAYERS["tiny"][0])
    return [Case(model, M, H, D, R, off) for R, off in ((1, False), (1, True), (4, False))]


def tolerance(device: str, dtype: torch.dtype) -> float:
    return TOLERANCE.get((device, dtype), TOLERANCE.get(dtype))


# ---------------------------------------------------------------------------------------- inputs

@dataclass
class OffsetConsts:
    """What the SDPA / Flex offset baselines need besides theta. It depends on the text only, so
    it is built once, as a user would across an inner optimisation's iterations. Pinned columns
    take their probability from the un-offset softmax, so region 0's output splits exactly into
    softmax(z + S) @ v_free + softmax(z) @ v_pin."""
    onehot: torch.Tensor            # [T, N]: S @ onehot puts S [.., T] on the target columns
    slot: torch.Tensor              # [N] int32: t at column tokens[t], -1 elsewhere
    v_free: torch.Tensor            # region 0's v with the pinned keys zeroed [B, H, N, D]
    v_pin: Optional[torch.Tensor]   # region 0's v with only the pinned keys (None: none pinned)


def offset_consts(offset: stattn.ScoreOffset, v: torch.Tensor) -> OffsetConsts:
    n_keys, device = v.shape[-2], v.device
    tokens = torch.tensor(offset.tokens, device=device)
    slot = torch.full((n_keys,), -1, dtype=torch.int32, device=device)
    slot[tokens] = torch.arange(len(offset.tokens), dtype=torch.int32, device=device)
    v0 = v[:, 0]
    pin = torch.zeros(n_keys, 1, dtype=torch.bool, device=device)
    pin[list(offset.pinned)] = True
    v_pin = v0 * pin if offset.pinned else None
    return OffsetConsts(F.one_hot(tokens, n_keys).float(), slot, v0 * ~pin, v_pin)


@dataclass
class Inputs:
    q: torch.Tensor                    # [B, H, M, D], requires grad
    k: torch.Tensor                    # [B, R, H, N, D]
    v: torch.Tensor                    # [B, R, H, N, D]
    masks: Optional[torch.Tensor]      # [B, R, M] float32, None for R = 1
    weights: Optional[torch.Tensor]    # [B, R] float32, requires grad; None for R = 1
    offset: Optional[stattn.ScoreOffset]  # theta requires grad
    grad_out: torch.Tensor             # dO [B, H, M, D]
    consts: Optional[OffsetConsts] = None  # the offset baselines' text-side constants

    def grad_targets(self) -> dict[str, torch.Tensor]:
        """The tensors whose gradients the inner optimisations use."""
        targets = {"q": self.q}
        if self.weights is not None:
            targets["region_weights"] = self.weights
        if self.offset is not None:
            targets["theta"] = self.offset.theta
        return targets


def make_inputs(case: Case, device: str, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Fresh random inputs (never zeros), drawn in fp64 on the CPU so every device sees the same."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, dt=dtype, grad=False):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    c = case
    q = randn(B, c.H, c.M, c.D, grad=True)
    k, v = randn(B, c.R, c.H, N, c.D), randn(B, c.R, c.H, N, c.D)
    masks = weights = offset = None
    if c.has_regions:
        masks = torch.rand(B, c.R, c.M, generator=g).to(device)
        weights = (0.25 + torch.rand(B, c.R, generator=g)).to(device).requires_grad_()
    if c.offset:
        basis = stattn.gaussian_basis(c.side, c.side, device=device)
        theta = randn(B, c.H, len(TOKENS), basis[0].shape[1], basis[1].shape[1], dt=torch.float32, grad=True)
        offset = stattn.ScoreOffset(theta, TOKENS, basis, pinned=PINNED)
    consts = offset_consts(offset, v) if offset is not None else None
    return Inputs(q, k, v, masks, weights, offset, randn(B, c.H, c.M, c.D), consts)


def dense_region_args(inp: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks [B, R, M], weights [B, R]) as the reference takes them: ones where absent."""
    R, M = inp.k.shape[1], inp.q.shape[2]
    if inp.weights is not None:
        return inp.masks, inp.weights
    ones = torch.ones(B, R, device=inp.q.device)
    return ones[..., None].expand(B, R, M), ones


# ------------------------------------------------------------------------------- implementations

def run_stattn(inp: Inputs) -> torch.Tensor:
    return stattn.region_attention(inp.q, inp.k, inp.v, masks=inp.masks, region_weights=inp.weights,
                                   offset=inp.offset)


def run_eager_reference(inp: Inputs) -> torch.Tensor:
    masks, weights = dense_region_args(inp)
    return reference.region_attention(inp.q, inp.k, inp.v, masks, weights, False, inp.offset)


def score_offset(inp: Inputs) -> torch.Tensor:
    """S [B, H, M, T] from theta (per call: theta is what the inner optimisation updates)."""
    off = inp.offset
    return reference.score_offset(off.theta, off.gy, off.gx)


def _sdpa_region(inp: Inputs, r: int) -> torch.Tensor:
    k, v = inp.k[:, r], inp.v[:, r]
    if r != 0 or inp.offset is None:
        return F.scaled_dot_product_attention(inp.q, k, v)
    c = inp.consts
    bias = (score_offset(inp) @ c.onehot).to(inp.q.dtype)  # dense [B, H, M, N]: SDPA has no column map
    o = F.scaled_dot_product_attention(inp.q, k, c.v_free, attn_mask=bias)
    return o if c.v_pin is None else o + F.scaled_dot_product_attention(inp.q, k, c.v_pin)


def run_sdpa(inp: Inputs) -> torch.Tensor:
    """One SDPA call per region (a softmax each), combined with alpha_r = w_r * mask_r per pixel."""
    out = None
    for r in range(inp.k.shape[1]):
        o_r = _sdpa_region(inp, r)
        if inp.weights is not None:
            alpha_r = (inp.weights[:, r, None] * inp.masks[:, r]).to(o_r.dtype)  # [B, M]
            o_r = alpha_r[:, None, :, None] * o_r
        out = o_r if out is None else out + o_r
    return out


def _flex_region0(q, k, v_free, v_pin, S, slot):
    """Region 0's two parts (see OffsetConsts). S [B, H, M, T] is captured by score_mod and read
    at the target columns through slot: no dense [M, N] bias. The parts are summed outside the
    graph: inductor's CPU flex template rejects a fused epilogue."""
    from torch.nn.attention.flex_attention import flex_attention

    def add_offset(score, b, h, m, n):
        t = slot[n]
        return score + torch.where(t >= 0, S[b, h, m, t.clamp(min=0)], 0.0)

    o_free = flex_attention(q, k, v_free, score_mod=add_offset)
    return o_free, None if v_pin is None else flex_attention(q, k, v_pin)


@functools.cache
def _compiled_flex():
    # one cache entry per shape and grad mode: the full case list needs more than the default 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(_flex_region0, dynamic=False, fullgraph=True)


def run_flex(inp: Inputs) -> torch.Tensor:
    c = inp.consts
    o_free, o_pin = _compiled_flex()(inp.q, inp.k[:, 0], c.v_free, c.v_pin, score_offset(inp), c.slot)
    return o_free if o_pin is None else o_free + o_pin


@dataclass(frozen=True)
class Impl:
    name: str
    run: Callable[[Inputs], torch.Tensor]
    backend: Optional[str] = None  # STATTN_BACKEND while it runs; None leaves it alone


IMPLS = {i.name: i for i in (
    Impl("stattn", run_stattn, "triton"),
    Impl("stattn-ref", run_stattn, "reference"),
    Impl("sdpa", run_sdpa),
    Impl("flex", run_flex),
    Impl("eager-ref", run_eager_reference),
)}
BASELINES = tuple(n for n in IMPLS if n != "stattn")


def skip_reason(impl: Impl, case: Case, device: str) -> Optional[str]:
    """Why ``impl`` does not run on ``case`` (None: it runs)."""
    if impl.name == "stattn-ref" and device != "cpu":
        return "the CPU comparison of stattn's two backends"
    if impl.name == "flex":
        if device != "cuda":
            return "FlexAttention has no CPU backward"
        if case.R != 1 or not case.offset:
            return "FlexAttention baseline covers R = 1 with an offset only (one softmax per call)"
    return None


@contextlib.contextmanager
def value_checks(enabled: bool):
    """stattn's NaN/inf argument checks cost a host sync per call, so hot loops turn them off:
    off while timing unless asked for (the correctness gate runs with the default, on)."""
    previous = stattn.set_value_checks(enabled)
    try:
        yield
    finally:
        stattn.set_value_checks(previous)


def pass_fn(impl: Impl, inp: Inputs, pass_name: str) -> Callable[[], object]:
    """The timed callable: forward without autograd, or forward + the needed gradients."""
    if pass_name == "fwd":
        def fwd():
            with torch.no_grad():
                return impl.run(inp)
        return fwd
    targets = tuple(inp.grad_targets().values())

    def fwd_bwd():
        return torch.autograd.grad(impl.run(inp), targets, inp.grad_out)
    return fwd_bwd


# ----------------------------------------------------------------------------------- correctness

@dataclass
class Oracle:
    out: torch.Tensor                 # fp64
    grads: dict[str, torch.Tensor]    # fp64, keyed like Inputs.grad_targets


def fp64_twin(inp: Inputs) -> Inputs:
    """The same (already rounded) inputs in fp64, with the same leaves requiring grad."""
    def f64(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    offset = None
    if inp.offset is not None:
        o = inp.offset
        offset = stattn.ScoreOffset(f64(o.theta), o.tokens, (f64(o.gy), f64(o.gx)), o.pinned)
    return Inputs(f64(inp.q), f64(inp.k), f64(inp.v), f64(inp.masks), f64(inp.weights), offset, f64(inp.grad_out))


def fp64_oracle(inp: Inputs) -> Oracle:
    """The eager reference in fp64 on the same inputs, gradients by autograd."""
    twin = fp64_twin(inp)
    out = run_eager_reference(twin)
    targets = twin.grad_targets()
    grads = torch.autograd.grad(out, tuple(targets.values()), twin.grad_out)
    return Oracle(out.detach(), dict(zip(targets, grads)))


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    """||out - expected|| / ||expected||; NaN anywhere gives NaN (which never passes)."""
    out = out.detach().double()
    return ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def poison_allocator(like: torch.Tensor) -> None:
    """Free a NaN-filled block of ``like``'s size so the next same-size allocation (the output)
    likely reuses it and an element the kernel never writes reads as NaN. Best effort: caching
    allocators (CUDA, small CPU blocks) reuse it, fresh mmap pages on the CPU do not."""
    torch.full_like(like, float("nan"), requires_grad=False)


def gate(impl: Impl, inp: Inputs, oracle: Oracle, tol: float, pass_name: str) -> dict:
    """Correctness of one implementation and pass: {'ok', 'err' or 'grad_err', 'tol'}."""
    poison_allocator(inp.q)  # o and dq have q's size
    result = pass_fn(impl, inp, pass_name)()
    if pass_name == "fwd":
        err = rel_err(result, oracle.out)
        return {"ok": math.isfinite(err) and err <= tol, "err": err, "tol": tol}
    errs = {name: rel_err(g, oracle.grads[name]) for name, g in zip(inp.grad_targets(), result)}
    grad_tol = tol * GRAD_TOL_FACTOR
    ok = all(math.isfinite(e) and e <= grad_tol for e in errs.values())
    return {"ok": ok, "grad_err": errs, "err": max(errs.values()), "tol": grad_tol}


# ---------------------------------------------------------------------------------------- timing

def time_cuda(fn: Callable, warmup_ms: float, rep_ms: float) -> dict:
    from triton.testing import do_bench  # flushes L2 between calls, times with CUDA events

    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    return {"median": median, "p20": p20, "p80": p80}


def time_cpu(fn: Callable, warmup_ms: float, rep_ms: float) -> dict:
    """do_bench's scheme with perf_counter: warm up for warmup_ms (at least one call), then
    as many calls as fit in rep_ms (at least MIN_REPS), each timed on its own."""
    start = time.perf_counter()
    calls = 0
    while calls == 0 or (time.perf_counter() - start) * 1e3 < warmup_ms:
        fn()
        calls += 1
    per_call_ms = (time.perf_counter() - start) * 1e3 / calls
    reps = min(MAX_REPS, max(MIN_REPS, int(rep_ms / max(per_call_ms, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    median, p20, p80 = torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {"median": median, "p20": p20, "p80": p80, "reps": reps}


def make_timer(device: str, quick: bool) -> Callable[[Callable], dict]:
    warmup_ms, rep_ms = TIMING[(device, quick)]
    timer = time_cuda if device == "cuda" else time_cpu
    return functools.partial(timer, warmup_ms=warmup_ms, rep_ms=rep_ms)


def bytes_moved(case: Case, dtype: torch.dtype, pass_name: str) -> int:
    """Minimum HBM traffic, the same for every implementation: the forward
    reads q, k, v (+ float32 masks) and writes o; the backward reads q, k, v (+ masks) and dO and
    writes dq. Weights, theta and the basis are a few KB and left out."""
    e = torch.empty((), dtype=dtype).element_size()
    q_like = B * case.H * case.M * case.D * e
    kv = 2 * B * case.R * case.H * N * case.D * e
    masks = B * case.R * case.M * 4 if case.has_regions else 0
    fwd = 2 * q_like + kv + masks
    bwd = 3 * q_like + kv + masks
    return fwd if pass_name == "fwd" else fwd + bwd


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_bandwidth(device: str, timer: Callable) -> dict:
    """Device copy bandwidth, timed like the kernels, counting read + write bytes."""
    src = torch.randn(COPY_BYTES[device] // 4, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    return {"bytes": nbytes, "ms": ms, "gbps": gbps(nbytes, ms["median"])}


# ------------------------------------------------------------------------------------------ runs

def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]


GATE_FAILED = "stattn failed its correctness gate"


@dataclass(frozen=True)
class Setup:
    """What every measurement of one run shares."""
    device: str
    dtype: torch.dtype
    timer: Callable[[Callable], dict]
    copy_gbps: float
    checks: bool  # stattn's value checks while timing

    @property
    def tol(self) -> float:
        return tolerance(self.device, self.dtype)


def measure_pass(impl: Impl, case: Case, inp: Inputs, oracle: Oracle, setup: Setup, pass_name: str) -> dict:
    """Gate one pass, then time it if it passed."""
    try:
        entry = gate(impl, inp, oracle, setup.tol, pass_name)
        if entry["ok"]:
            with value_checks(setup.checks):
                entry["ms"] = setup.timer(pass_fn(impl, inp, pass_name))
            entry["bytes"] = bytes_moved(case, setup.dtype, pass_name)
            entry["gbps"] = gbps(entry["bytes"], entry["ms"]["median"])
            entry["pct_copy"] = 100.0 * entry["gbps"] / setup.copy_gbps
        return entry
    except Exception as exc:  # a baseline that cannot run is a result, not a crash
        return {"ok": False, "error": describe_error(exc)}


def measure_impl(impl: Impl, case: Case, inp: Inputs, oracle: Oracle, setup: Setup, passes=PASSES) -> dict:
    """One implementation on one case; passes left out are marked as skipped by the gate."""
    result = {}
    with stattn_backend(impl.backend):
        if impl.backend is not None:
            result["backend"] = stattn.backend_for(inp.q)  # proof of which path was timed
        for pass_name in PASSES:
            result[pass_name] = (measure_pass(impl, case, inp, oracle, setup, pass_name)
                                 if pass_name in passes else {"skipped": GATE_FAILED})
    return result


def speedups(impls: dict) -> dict:
    """Baseline median / stattn median per pass (> 1: stattn is faster)."""
    out = {}
    for pass_name in PASSES:
        ours = impls["stattn"][pass_name].get("ms")
        out[pass_name] = {}
        for name in BASELINES:
            theirs = impls[name].get(pass_name, {}).get("ms")
            if ours and theirs:
                out[pass_name][name] = theirs["median"] / ours["median"]
    return out


def measure_case(case: Case, setup: Setup) -> dict:
    """All implementations on one case. stattn is gated first: a pass it fails is timed for none."""
    inp = make_inputs(case, setup.device, setup.dtype)
    oracle = fp64_oracle(inp)
    impls = {"stattn": measure_impl(IMPLS["stattn"], case, inp, oracle, setup)}
    passed = [p for p in PASSES if impls["stattn"][p].get("ok")]
    for name in BASELINES:
        reason = skip_reason(IMPLS[name], case, setup.device)
        impls[name] = ({"skipped": reason} if reason else
                       measure_impl(IMPLS[name], case, inp, oracle, setup, passed))
    failed = [p for p in PASSES if p not in passed]
    return {**asdict(case), "name": case.name, "B": B, "N": N, "T": len(TOKENS) if case.offset else 0,
            "pinned": list(PINNED) if case.offset else [], "status": "failed" if failed else "ok",
            "failed_passes": failed, "impls": impls, "speedup": speedups(impls)}


# ----------------------------------------------------------------------------------- environment

def environment(device: str, dtype: torch.dtype, quick: bool, checks: bool) -> dict:
    env = machine(device)
    env.update({
        "dtype": str(dtype).removeprefix("torch."), "quick": quick, "value_checks_while_timing": checks,
        "stattn": stattn.__version__, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "timer": "triton.testing.do_bench" if device == "cuda" else "time.perf_counter",
        "warmup_ms": TIMING[(device, quick)][0], "rep_ms": TIMING[(device, quick)][1], "quantiles": QUANTILES,
    })
    return env


def use_interpreter() -> None:
    """--device cpu runs stattn's kernels in the Triton interpreter, which must be switched on
    before stattn imports them (triton.jit reads TRITON_INTERPRET when it decorates)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "stattn.kernels" in sys.modules:
        raise RuntimeError("--device cpu needs TRITON_INTERPRET=1 in the environment (kernels already imported)")
    os.environ["TRITON_INTERPRET"] = "1"


def run_benchmark(device: str, dtype: torch.dtype, quick: bool, name_filter: str = "",
                  checks: bool = False, threads: int = 1, log=print) -> dict:
    """Every case of the device (those whose name contains name_filter): the raw results."""
    if device == "cpu":
        use_interpreter()
        torch.set_num_threads(threads)
    timer = make_timer(device, quick)
    env = environment(device, dtype, quick, checks)
    copy = copy_bandwidth(device, timer)
    log(f"{env['device_name']}: copy bandwidth {copy['gbps']:.1f} GB/s")
    setup = Setup(device, dtype, timer, copy["gbps"], checks)
    cases = []
    for case in cases_for(device, quick):
        if name_filter not in case.name:
            continue
        t0 = time.perf_counter()
        cases.append(measure_case(case, setup))
        log(f"  {case.name}: {cases[-1]['status']} ({time.perf_counter() - t0:.1f} s)")
    return {"environment": env, "copy_bandwidth": copy, "cases": cases}


# ---------------------------------------------------------------------------------------- report

def fmt_num(x: float) -> str:
    """Three significant digits, never an exponent above 100."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_times(t: dict) -> str:
    """'median [p20–p80] unit', the unit picked by the median."""
    factor, unit = (1e3, "µs") if t["median"] < 1 else (1.0, "ms") if t["median"] < 1e3 else (1e-3, "s")
    return f"{fmt_num(t['median'] * factor)} [{fmt_num(t['p20'] * factor)}–{fmt_num(t['p80'] * factor)}] {unit}"


def fmt_cell(entry: dict, pass_name: str) -> str:
    """One implementation's cell: 'median [p20–p80]', or why there is no time."""
    if "skipped" in entry:
        return "–"
    e = entry.get(pass_name, {})
    if "ms" in e:
        return fmt_times(e["ms"])
    if "skipped" in e:
        return "–"
    if "error" in e:
        return "error"
    return f"FAIL ({e['err']:.1e})" if "err" in e else "FAIL"


def table(run: dict, pass_name: str) -> list[str]:
    names = [n for n in IMPLS if any("skipped" not in c["impls"][n] for c in run["cases"])]
    baselines = [n for n in names if n != "stattn"]
    head = (["case", "err", *names, "stattn GB/s", "% copy"] + [f"× {n}" for n in baselines])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in run["cases"]:
        ours = c["impls"]["stattn"].get(pass_name, {})
        err = f"{ours['err']:.1e}" if "err" in ours else "error"
        bw = [fmt_num(ours["gbps"]), fmt_num(ours["pct_copy"])] if "gbps" in ours else ["–", "–"]
        sp = [fmt_num(c["speedup"][pass_name][n]) if n in c["speedup"][pass_name] else "–" for n in baselines]
        row = [c["name"], err, *(fmt_cell(c["impls"][n], pass_name) for n in names), *bw, *sp]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def notes(run: dict) -> list[str]:
    """Skip reasons, errors and failures, each once."""
    seen = []
    for c in run["cases"]:
        for name, entry in c["impls"].items():
            items = [("", entry)] if "skipped" in entry else [(f" {p}", entry.get(p, {})) for p in PASSES]
            for p, e in items:
                if "skipped" in e and e["skipped"] != GATE_FAILED:
                    line = f"- {name}: skipped: {e['skipped']}"
                elif "error" in e:
                    line = f"- {name}{p} on {c['name']}: {e['error']}"
                elif e.get("ok") is False:
                    line = f"- {name}{p} on {c['name']}: FAILED the gate, rel. err {e['err']:.2e} > {e['tol']:.2g}"
                else:
                    continue
                if line not in seen:
                    seen.append(line)
    return seen


def markdown(run: dict) -> str:
    env, copy = run["environment"], run["copy_bandwidth"]
    lines = [
        f"# stattn micro-benchmark: {env['device_name']}, {env['dtype']}",
        "",
        f"{provenance(env)}, python {env['python']}"
        + (f", CUDA {env['cuda']}, driver {env['driver']}" if env["device"] == "cuda" else
           f", torch threads {env['torch_threads']}, TRITON_INTERPRET={env['TRITON_INTERPRET']}")
        + f"; B = {B}, N = {N}; copy bandwidth {copy['gbps']:.1f} GB/s (read + write).",
        "",
        f"Cases: model-m(M)-h(H)-d(D)-r(R), -offset: a Gaussian-basis offset on tokens {TOKENS} with "
        f"{PINNED} pinned; R > 1: random soft masks and weights. "
        "Times: median [p20–p80]. err: stattn's ‖out − ref‖/‖ref‖ against the fp64 reference (fwd+bwd: "
        "the worst of its gradients of q, region weights, theta). GB/s: stattn over the minimum bytes "
        "(read q, k, v, masks, dO; write o, dq); % copy: of the measured copy bandwidth. "
        "× baseline: baseline median / stattn median (> 1: stattn faster).",
    ]
    if env["device"] == "cpu":
        lines += ["", "CPU: stattn runs in the Triton interpreter (numpy); these times check the harness, "
                      "not performance."]
    for pass_name in PASSES:
        lines += ["", f"## {pass_name}", "", *table(run, pass_name)]
    extra = notes(run)
    if extra:
        lines += ["", "## Notes", "", *extra]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer cases and shorter timing windows")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the .json and .md results")
    p.add_argument("--filter", default="", help="only cases whose name contains this")
    p.add_argument("--threads", type=int, default=1,
                   help="cpu: torch threads (default 1: the interpreter is single-threaded, and on a busy "
                        "small machine OpenMP barriers stall for whole scheduler ticks)")
    p.add_argument("--value-checks", action="store_true",
                   help="keep stattn's NaN/inf argument checks (a host sync each) while timing")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    args.dtype = DTYPES[args.dtype or ("fp16" if args.device == "cuda" else "fp32")]
    if args.device == "cpu" and args.dtype == torch.bfloat16:
        p.error("the Triton interpreter has no bfloat16: use fp16 or fp32 on cpu")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    run = run_benchmark(args.device, args.dtype, args.quick, args.filter, args.value_checks, args.threads)
    publish(run, args.out, "micro", markdown)
    return 1 if any(c["status"] != "ok" for c in run["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
