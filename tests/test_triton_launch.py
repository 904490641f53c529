"""The cached Triton launch (stattn.kernels.launch) against Triton's own JITFunction.run, without a
GPU: a stand-in sm_90 driver (stattn.kernels.aot.StandInDriver) compiles for real and records
what reaches the CUDA launcher. Both paths must hand it the same compiled kernel and the same
arguments, launch after launch, through alignment, dtype, stride and option changes, with and
without launch hooks. Runs in a subprocess: the interpreter (set by conftest when there is no
GPU) replaces the JIT functions."""
import json
import os
import subprocess
import sys

import pytest
import torch

from stattn.kernels import launch

SCRIPT = r"""
import json, sys
import torch
import triton
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction
from stattn.kernels import aot, launch, regulation

drv = aot.StandInDriver()
driver.set_active(drv)                       # for the whole process
B, H, N = 2, 3, 77


def attention(M, D, dtype, R=1, T=0, pinned=False, per_row=False, lengths=False, probs=False, misaligned=False):
    g = torch.Generator().manual_seed(M * 131 + D)
    side = int(round(M ** 0.5))
    if misaligned:        # q one element into its buffer: not 16-byte aligned
        q = torch.empty(B * M * H * D + 1, dtype=dtype)[1:].view(B, M, H, D).transpose(1, 2)
    else:
        q = torch.empty(B, M, H, D, dtype=dtype).transpose(1, 2)
    k = torch.empty(B, R, H, N, D, dtype=dtype)
    w, masks = torch.rand(B, R, generator=g), torch.rand(B, R, M, generator=g)
    rows = (B,) if per_row else ()
    theta = torch.zeros(B, H, T, 7, 7) if T else None
    tokens = torch.arange(1, T + 1, dtype=torch.int32).expand(*rows, T).contiguous() if T else None
    gy = torch.rand(side, 7, generator=g)
    pin = torch.zeros(*rows, N, dtype=torch.int32) if pinned else None
    lens = torch.full((R,), N - 5, dtype=torch.int32) if lengths else None
    o, lse, *_ = launch.forward(q, k, k, w, masks, R > 1, theta, tokens, gy, gy, pin, D ** -0.5, lens, want_probs=probs)
    gp = torch.zeros(B, H, M, N) if probs else None
    launch.backward(o, q, k, k, w, masks, R > 1, theta, tokens, gy, gy, pin, D ** -0.5, lse,
                    True, True, True, T > 0, lens, grad_probs=gp)


def inner_loop(blend):
    M, D, T, side = 64, 40, 2, 8
    q = torch.empty(1, H, M, D, dtype=torch.float16)
    k = torch.empty(1, H, N, D, dtype=torch.float16)
    tokens = torch.arange(1, T + 1, dtype=torch.int32)
    theta0 = torch.zeros(1, H, T, 7, 7)
    gy = torch.rand(side, 7)
    extra = (torch.zeros(1, H, T, 7, 7), 3, 0.9, 0.5) if blend else None
    regulation.inner_loop(q, k, tokens, theta0, gy, gy, D ** -0.5, 4, 0.1, (40, 60, 0.25), 0.2, 0.3,
                          (1.0, 0.5, 0.25), blend=extra)


PROBLEMS = [lambda: attention(64, 40, torch.float16),
            lambda: attention(64, 40, torch.float16, misaligned=True),
            lambda: attention(64, 40, torch.float32),
            lambda: attention(48, 64, torch.float16),
            lambda: attention(77, 80, torch.float16, R=3, T=2, pinned=True, per_row=True, lengths=True, probs=True),
            lambda: attention(64, 40, torch.float16),           # again: the first problem's entries
            lambda: inner_loop(False), lambda: inner_loop(True), lambda: inner_loop(False)]


def describe(a):
    if isinstance(a, torch.Tensor):
        return ["tensor", str(a.dtype), list(a.shape), list(a.stride()), a.data_ptr() % 16]
    return [type(a).__name__, a]


def run(cached, hook):
    launch._CACHED = cached
    launch._entries.clear()
    launch._layouts.clear()
    drv.launches.clear()
    seen = []
    if hook:
        def record(metadata):
            meta = metadata.get()
            seen.append([meta["name"], list(meta["function"]), meta["stream"]])
        knobs.runtime.launch_enter_hook.add(record)
    jit_runs = [0]
    real = JITFunction.run

    def counted(self, *a, **kw):
        jit_runs[0] += 1
        return real(self, *a, **kw)
    JITFunction.run = counted
    types = {}
    capture = launch._launch
    def typed(kernel, grid, args, meta):        # each position keeps its type (the cached key's contract)
        types.setdefault(kernel.__name__, set()).add(tuple(type(a).__name__ for a in args))
        capture(kernel, grid, args, meta)
    launch._launch = typed
    try:
        for _ in range(2):
            for problem in PROBLEMS:
                problem()
    finally:
        JITFunction.run = real
        launch._launch = capture
        if hook:
            knobs.runtime.launch_enter_hook.remove(record)
    launches = [[h, list(g), s, list(f), list(p), [describe(a) for a in args]] for h, g, s, f, p, args in drv.launches]
    return {"launches": launches, "hooks": seen, "jit_runs": jit_runs[0], "entries": len(launch._entries),
            "layouts": sorted(k.__name__ for k, v in launch._layouts.items() if v is not None),
            "types": {k: len(v) for k, v in types.items()}}


print(json.dumps({f"{mode}-{hook}": run(mode == "cached", hook) for mode in ("jit", "cached") for hook in (False, True)}))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "STATTN_TRITON_LAUNCH")}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("hook", [False, True], ids=["no hooks", "a launch hook"])
def test_the_cached_launch_hands_the_launcher_what_the_jit_hands_it(runs, hook):
    jit, cached = runs[f"jit-{hook}"], runs[f"cached-{hook}"]
    assert len(jit["launches"]) == len(cached["launches"]) >= 40
    for i, (a, b) in enumerate(zip(jit["launches"], cached["launches"])):
        assert a == b, f"launch {i}: compiled kernel, grid, stream, function, metadata or arguments differ"
    assert len({h for h, *_ in jit["launches"]}) >= 16   # many compiled kernels, told apart
    assert jit["hooks"] == cached["hooks"] and (len(cached["hooks"]) == len(cached["launches"]) if hook else True)


def test_the_cached_launch_binds_once_per_signature(runs):
    jit, cached = runs["jit-False"], runs["cached-False"]
    assert jit["jit_runs"] == len(jit["launches"]) and jit["entries"] == 0
    # every signature through the JIT once, its repeats (the second round, problem 1 again) not
    assert cached["jit_runs"] == cached["entries"] < len(cached["launches"]) // 2
    assert cached["layouts"] == ["_best_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_fwd_kernel",
                                 "_inner_loop_kernel"]


def test_each_kernel_keeps_its_argument_types_per_position(runs):
    """The cached key's contract (launch._Layout): tensors first, then ints and floats, each
    position always of one type, whatever the problem."""
    assert runs["cached-False"]["types"] == {k: 1 for k in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel",
                                                            "_inner_loop_kernel", "_best_kernel")}


def test_the_launch_setting_is_checked(monkeypatch):
    monkeypatch.setenv("STATTN_TRITON_LAUNCH", "JIT")
    assert launch.launch_choice() == "jit"
    assert launch.cached_launch_available()[0] is False
    monkeypatch.setenv("STATTN_TRITON_LAUNCH", "fast")
    with pytest.raises(ValueError, match="STATTN_TRITON_LAUNCH must be cached or jit, got 'fast'"):
        launch.launch_choice()


def test_the_cached_launch_stays_off_under_the_interpreter_and_other_tritons(monkeypatch):
    monkeypatch.delenv("STATTN_TRITON_LAUNCH", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch.cached_launch_available() == (False, "TRITON_INTERPRET=1: the interpreter runs the kernels")
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(launch.triton, "__version__", "3.7.0")
    ok, why = launch.cached_launch_available()
    assert not ok and "triton 3.7.0" in why and "3.6.x" in why


def test_doctor_says_how_kernels_are_launched(monkeypatch):
    from stattn import doctor

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("STATTN_TRITON_LAUNCH", raising=False)
    monkeypatch.setattr(launch.triton, "__version__", "3.6.0")
    assert doctor.launch_report().startswith("cached (")
    monkeypatch.setenv("STATTN_TRITON_LAUNCH", "jit")
    assert doctor.launch_report() == "through Triton's JIT at every launch (STATTN_TRITON_LAUNCH=jit)"
    monkeypatch.setenv("STATTN_TRITON_LAUNCH", "fast")
    assert doctor.launch_report().startswith("unusable: STATTN_TRITON_LAUNCH must be cached or jit")
    monkeypatch.setattr(doctor.torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("STATTN_TRITON_LAUNCH")
    assert doctor.triton_report()[1].startswith("  launches: cached (")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="launches the kernels on a GPU")
def test_on_cuda_the_cached_launch_computes_what_the_jit_launch_computes(monkeypatch):
    """The same compiled kernel on the same inputs: bit-equal outputs (the kernels are deterministic),
    forward and every gradient, the cached entries first made then hit."""
    g = torch.Generator().manual_seed(0)
    B, H, M, N, D, R, T = 2, 3, 77, 77, 64, 2, 2
    cuda = lambda t: t.cuda()     # noqa: E731
    q = cuda(torch.randn(B, M, H, D, generator=g).half()).transpose(1, 2)
    k, v = (cuda(torch.randn(B, R, H, N, D, generator=g).half()) for _ in range(2))
    w, masks = cuda(torch.rand(B, R, generator=g)), cuda(torch.rand(B, R, M, generator=g))
    theta = cuda(torch.randn(B, H, T, 7, 7, generator=g) * 0.1)
    tokens = cuda(torch.tensor([3, 5], dtype=torch.int32))
    gy, gx = cuda(torch.rand(7, 7, generator=g)), cuda(torch.rand(11, 7, generator=g))    # M = 7 x 11 pixels
    pin = cuda((torch.arange(N) % 9 == 0).to(torch.int32))
    do = cuda(torch.randn(B, H, M, D, generator=g).half())

    def run(cached):
        monkeypatch.setattr(launch, "_CACHED", cached)
        o, lse = launch.forward(q, k, v, w, masks, True, theta, tokens, gy, gx, pin, D ** -0.5)
        grads = launch.backward(do, q, k, v, w, masks, True, theta, tokens, gy, gx, pin, D ** -0.5, lse,
                                True, True, True, True)
        torch.cuda.synchronize()
        return [o, lse, *grads]

    monkeypatch.setattr(launch, "_entries", {})
    reference = run(False)
    assert not launch._entries
    for _ in range(2):                 # the first run makes the entries, the second hits them
        ours = run(True)
        assert launch._entries
        assert all(torch.equal(a, b) for a, b in zip(reference, ours))
