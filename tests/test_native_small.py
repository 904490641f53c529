"""The native small-M path (csrc/region_attention.cpp, M <= kSmallM = 64 with fp32 compute: the
forward's and the backward's products in register tiles, small_mm, instead of BLAS calls) against
the fp64 reference, forward and every gradient (the backward reads its log-sum-exps): M = 1 / 15 / 16 / 17
/ 18 (one 16-lane vector of pixels and either side) and 63 / 64 against 65 (the BLAS path), D and
N of every column tail (D = 3, 12, 36, 40, 160; N = 13, 77, 154), one to four regions, offsets
with pins, key lengths, fp32 / bf16 / fp16 (packed into fp32 first), the processors' strided q,
outputs NaN-poisoned; its sums do not depend on the thread count; both fp32 instruction paths
(STATTN_NATIVE_V4=0: 8 lanes)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import stattn
from stattn import reference as ref
from helpers import GRAD_TOL_FACTOR, TOL, Case, make_inputs, reference_run, rel_err, run
# importing test_native skips (or, under STATTN_REQUIRE_NATIVE=1, fails) without the native extension
from test_native import NATIVE_TOL, _check, _ids, native_backend  # noqa: F401  (a fixture)

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

CASES = [
    # (M = 1 and 17, prime or below the basis' 3 x 3 grid: test_plain_call_... below)
    Case(D=40, R=1, T=0, h=3, w=5),                                       # M = 15
    Case(D=64, R=1, T=0, h=4, w=4),                                       # M = 16: one 16-lane vector
    Case(D=160, R=1, T=0, h=3, w=6),                                      # M = 18
    Case(D=160, R=1, T=1, pinned=(0,), h=4, w=4),
    Case(D=12, R=2, T=3, pinned=(0, 9), affine=True, h=4, w=4),          # D < 16: an 8-lane tile + scalars
    Case(D=3, R=1, T=0, N=13, h=3, w=3),                                 # D < 8, N < 16
    Case(D=36, R=2, T=1, pinned=(5,), N=13, h=3, w=7),                   # D = 2 * 16 + 4
    Case(D=40, R=4, T=3, pinned=(0, 1), float_masks=False, h=7, w=9),    # M = 63
    Case(D=80, R=2, T=1, pinned=(0,), N=154, h=8, w=8),                  # M = 64, Np = 160
    Case(D=40, R=2, T=2, pinned=(0,), affine=True, h=5, w=13),           # M = 65: the BLAS path
    Case(D=64, R=2, T=1, key_lengths=(77, 20), h=4, w=4),                # pad keys from a length on
    Case(D=40, R=2, T=1, key_lengths=(9, 77), h=3, w=6),
    Case(D=40, R=2, T=3, pinned=(0, 9), affine=True, dtype=BF16, h=4, w=4),
    Case(D=160, R=1, T=0, dtype=BF16, h=3, w=6),
    Case(D=80, R=2, T=1, pinned=(3,), affine=True, dtype=F16, h=3, w=5),
    Case(D=40, R=2, T=3, pinned=(0, 7), affine=True, dtype=F64, h=4, w=4),   # fp64: BLAS at any M
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: _ids(c) + (f"-L{c.key_lengths}" if c.key_lengths else ""))
def test_small_path_matches_reference(case, native_backend):
    inp = make_inputs(case, "cpu")
    out, grads = run(case, inp, case.dtype)
    _check(case, inp, out, grads)


def _plain(B, H, M, D, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, M, D, generator=g), torch.randn(B, 1, H, N, D, generator=g),
            torch.randn(B, 1, H, N, D, generator=g))


@pytest.mark.parametrize("M", [1, 15, 16, 17, 64, 65])
@pytest.mark.parametrize("D", [40, 64, 160])
def test_plain_call_matches_reference_on_both_sides_of_the_threshold(M, D, native_backend):
    """The host-bound call (one region, no offset, B = 2, H = 8, N = 77) as the processors make it:
    q a transposed view of [B, M, H, D]."""
    q, k, v = _plain(2, 8, M, D, 77, seed=M + D)
    qv = q.transpose(1, 2).contiguous().transpose(1, 2)   # [B, H, M, D] view of [B, M, H, D] memory
    expected = ref.region_attention(q.double(), k.double(), v.double(), torch.ones(2, 1, M, dtype=F64),
                                    torch.ones(2, 1, dtype=F64), False, None, D ** -0.5)
    for x in (q, qv):
        out = stattn.region_attention(x, k, v)
        assert rel_err(out, expected) < NATIVE_TOL[F32]


def test_small_path_sums_do_not_depend_on_the_thread_count(native_backend):
    """The products' sums run in a fixed order whatever the task split: bit-identical outputs."""
    q, k, v = _plain(2, 8, 17, 40, 77)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(stattn.region_attention(q, k, v))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_small_path_with_8_lanes():
    """STATTN_NATIVE_V4=0 (read once: a fresh process) runs the small products' 8-lane tiles, as on
    an AVX2 machine: forward and gradients against the reference at M = 15 / 16 / 18 / 64."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import torch\n"
        "from helpers import Case, make_inputs, run, reference_run, rel_err\n"
        "errs = []\n"
        "for case in (Case(D=40, R=1, T=0, h=4, w=4), Case(D=160, R=2, T=1, pinned=(0,), h=3, w=6),\n"
        "             Case(D=12, R=1, T=0, N=13, h=8, w=8), Case(D=36, R=2, T=3, pinned=(0, 9), h=3, w=5)):\n"
        "    inp = make_inputs(case, 'cpu')\n"
        "    out, grads = run(case, inp, torch.float32)\n"
        "    ref, rg = reference_run(case, inp)\n"
        "    errs += [rel_err(out, ref)] + [rel_err(g, rg[n]) for n, g in grads.items()]\n"
        "print(max(errs))\n")
    env = dict(os.environ, STATTN_BACKEND="native", STATTN_NATIVE_POISON="1", OMP_NUM_THREADS="1",
               STATTN_NATIVE_V4="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < TOL[("cpu", F32)] * GRAD_TOL_FACTOR


@pytest.mark.parametrize("case", [Case(D=40, R=1, T=1, pinned=(0,), h=4, w=4),
                                  Case(D=160, R=2, T=3, pinned=(0, 9), affine=True, h=3, w=6),
                                  Case(D=40, R=1, T=0, dtype=BF16, h=4, w=4)], ids=_ids)
def test_recomputed_logits_are_the_saved_ones(case, native_backend, monkeypatch):
    """The backward recomputes the logits (STATTN_SAVE_LOGITS=0) with the forward's small product,
    so its gradients are those from the saved logits bit for bit."""
    inp = make_inputs(case, "cpu")
    results = {}
    for save in ("1", "0"):
        monkeypatch.setenv("STATTN_SAVE_LOGITS", save)
        results[save] = run(case, inp, case.dtype)
        _check(case, inp, *results[save])
    assert torch.equal(results["1"][0], results["0"][0])
    for name, g in results["1"][1].items():
        assert torch.equal(g, results["0"][1][name]), name
