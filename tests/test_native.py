"""Native CPU kernels (csrc/, stattn.native) against the fp64 reference on the Triton tests' random
inputs: odd pixel counts, N = 77 (and N > 128), D in {40, 64, 80, 160}, R in {1, 2, 4}, T in {0, 1, 3},
pinned tokens, affine on/off, fp32/bf16/fp16/fp64, every output NaN-poisoned; only the requested
gradients; determinism; a three-way check with the interpreter Triton kernels; the fallback when
the extension cannot be loaded."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import loop_oracle
import stattn
from stattn import native
from helpers import GRAD_TOL_FACTOR, TOL, Case, make_inputs, op_args, reference_run, rel_err, run

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
# bf16 has no CPU entry in helpers.TOL (the Triton interpreter has no bf16): the CUDA bound applies,
# since the error is the bf16 rounding of the inputs either way; fp64 is exact to rounding.
NATIVE_TOL = {F32: TOL[("cpu", F32)], F16: TOL[("cpu", F16)], BF16: TOL[("cuda", BF16)], F64: 1e-12}

if not native.load():
    # CI sets STATTN_REQUIRE_NATIVE=1: there a broken build must fail the run, not skip these tests
    if os.environ.get("STATTN_REQUIRE_NATIVE") == "1":
        pytest.fail(f"native extension unavailable: {native._state.get('error')}", pytrace=False)
    pytest.skip(f"native extension unavailable: {native._state.get('error')}", allow_module_level=True)


@pytest.fixture
def native_backend(monkeypatch):
    monkeypatch.setenv("STATTN_BACKEND", "native")
    monkeypatch.setenv("STATTN_NATIVE_POISON", "1")  # every native output starts NaN-filled


CASES = [
    Case(D=40, R=1, T=0),                                                 # plain cross-attention, M = 35
    Case(D=64, R=1, T=1, pinned=(0,)),
    Case(D=80, R=2, T=3, pinned=(0, 9), affine=True),
    Case(D=160, R=4, T=1, affine=True, h=3, w=5),
    Case(D=40, R=4, T=3, pinned=(0, 1), float_masks=False),
    Case(D=64, R=2, T=0, pinned=(0,), affine=True),                       # pins without an offset
    Case(D=40, R=2, T=3, pinned=(0, 140), N=154, h=4, w=6),               # N > 128
    Case(D=80, R=2, T=1, pinned=(5,), h=13, w=11),                        # M = 143: a partial second pixel block
    Case(D=40, R=2, T=3, pinned=(0, 9), affine=True, dtype=BF16, h=9, w=7),
    Case(D=160, R=1, T=1, pinned=(0,), dtype=BF16, h=4, w=5),
    Case(D=64, R=4, T=0, dtype=BF16),
    Case(D=80, R=2, T=1, pinned=(3,), affine=True, dtype=F16),
    Case(D=40, R=2, T=3, pinned=(0, 7), affine=True, dtype=F64, h=6, w=5),
    Case(D=36, R=2, T=1, pinned=(0,), N=13),    # D and N not multiples of 8 (the key transpose's tails)
]


def _ids(c):
    return (f"D{c.D}-R{c.R}-T{c.T}-pin{len(c.pinned)}-{'aff' if c.affine else 'lin'}-M{c.M}-N{c.N}-"
            f"{str(c.dtype).split('.')[-1]}{'-bool' if not c.float_masks else ''}")


def _check(case, inp, out, grads, wrt=("q", "k", "v", "weights", "masks", "theta")):
    ref_out, ref_grads = reference_run(case, inp, wrt=wrt)
    tol = NATIVE_TOL[case.dtype]
    assert out.dtype == case.dtype and out.shape == ref_out.shape
    assert rel_err(out, ref_out) < tol, "forward"
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert g.shape == ref_grads[name].shape, name
        assert rel_err(g, ref_grads[name]) < tol * GRAD_TOL_FACTOR, name


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_native_matches_reference(case, native_backend):
    inp = make_inputs(case, "cpu")
    out, grads = run(case, inp, case.dtype)
    _check(case, inp, out, grads)


# Where the backward's dk / dv go: with one pixel chunk per head (M <= 1024) and fp32 / fp64 inputs
# the kernel writes them into the outputs (per region, the first block overwriting, key lengths'
# rows zeroed); with two chunks (M = 1200) or fp16 / bf16 inputs, per-chunk partials summed after.
# Both against the reference, poisoned outputs, lengths and an offset.
@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize("h,w", [(13, 11), (40, 30)], ids=["M143-one-chunk", "M1200-two-chunks"])
def test_native_dk_dv_direct_and_chunked(h, w, dtype, native_backend):
    case = Case(D=40, R=2, T=2, pinned=(0,), affine=True, key_lengths=(77, 30), h=h, w=w, dtype=dtype)
    inp = make_inputs(case, "cpu")
    out, grads = run(case, inp, case.dtype)
    _check(case, inp, out, grads)
    pad = grads["k"][:, 1, :, 30:]
    assert torch.equal(pad, torch.zeros_like(pad)) and torch.equal(grads["v"][:, 1, :, 30:], pad)


# The forward's row paths for region 0 with an offset: the shared-exp path (edited and un-offset
# softmax from one exp pass), its two-pass fallback when the two maxima are more than 60 apart or
# there are more than 16 targets, and a pinned target (it keeps its un-offset probability).
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("theta_scale,tokens,pinned", [
    (1.0, (3, 5), (0, 3)),
    (40.0, (2, 6), (0,)),                   # offsets of +-100: rows on both sides of the 60 gap
    (-40.0, (2, 6, 9), (0, 6)),
    (1.0, tuple(range(1, 18)), (0,)),       # 17 targets
], ids=["pinned-target", "large-positive", "large-negative", "17-targets"])
def test_native_offset_row_paths(theta_scale, tokens, pinned, dtype, native_backend):
    case = Case(D=40, R=2, T=len(tokens), pinned=pinned, affine=True, h=4, w=5, dtype=dtype)
    inp = make_inputs(case, "cpu")
    inp["theta"] = inp["theta"] * theta_scale
    inp["tokens"] = tokens
    out, grads = run(case, inp, case.dtype)
    _check(case, inp, out, grads)


# fp32 native kernels flush subnormals to zero on their worker threads (csrc/native_common.h,
# TaskScope): a basis with subnormal entries (far from its centres) must still match the fp64
# reference, and the calling thread's floating-point state must be restored after every op.
def test_native_subnormal_basis_matches_reference_and_restores_the_callers_state(native_backend):
    case = Case(D=40, R=2, T=2, pinned=(0,), affine=True, h=20, w=18)
    inp = make_inputs(case, "cpu")
    gy32 = inp["basis"][0].float()
    assert ((gy32 != 0) & (gy32.abs() < torch.finfo(F32).tiny)).any(), "the basis must hold subnormals"
    tiny = torch.tensor([3e-39], dtype=F32)
    out, grads = run(case, inp, F32)
    _check(case, inp, out, grads)
    q, k, tokens, theta0, gy, gx = _loop_inputs(1, 2, 20, 18, 40, 2, F32)
    native.inner_loop(q, k, tokens, theta0, gy, gx, 40 ** -0.5, 2, 100.0, (300, 301, 0.5), 0.9, 0.2,
                      (1.0, 80.0, 0.09))
    assert (tiny * 2).item() == 2 * tiny.item() != 0  # not flushed to 0 on this thread


# The forward keeps its logits for the backward when a gradient will be taken (STATTN_SAVE_LOGITS,
# default on): the backward then loads them instead of recomputing the product, which gives the same
# bits (the same product on the same packed operands), so the gradients must be identical.
@pytest.mark.parametrize("case", [Case(D=80, R=2, T=3, pinned=(0, 9), affine=True, h=13, w=11),
                                  Case(D=40, R=2, T=3, pinned=(0, 9), affine=True, dtype=BF16, h=9, w=7),
                                  Case(D=40, R=2, T=3, pinned=(0, 7), affine=True, dtype=F64, h=6, w=5)], ids=_ids)
def test_native_saved_logits_give_the_recomputed_gradients(case, native_backend, monkeypatch):
    inp = make_inputs(case, "cpu")
    results, passed = {}, []
    backward = native.backward
    monkeypatch.setattr(native, "backward", lambda *a, **kw: passed.append(a[-1] is not None) or backward(*a, **kw))
    for save in ("1", "0"):
        monkeypatch.setenv("STATTN_SAVE_LOGITS", save)
        results[save] = run(case, inp, case.dtype)
        _check(case, inp, *results[save])
    assert passed == [True, False]  # the backward got the saved logits, then had to recompute them
    assert torch.equal(results["1"][0], results["0"][0])
    for name, g in results["1"][1].items():
        assert torch.equal(g, results["0"][1][name]), name


@pytest.mark.parametrize("backend", ["native", "reference", "triton"])
def test_forward_returns_the_logits_when_asked(backend, monkeypatch):
    monkeypatch.setenv("STATTN_BACKEND", backend)
    monkeypatch.setenv("STATTN_NATIVE_POISON", "1")
    args = _opcheck_args()
    q, k, scale = args[0], args[1], args[11]
    o, lse, logits, _ = torch.ops.stattn.region_attention(*args, save_logits=True)
    expected = torch.einsum("bhmd,brhnd->bhmrn", q.double(), k.double()).flatten(3) * scale
    assert logits.shape == expected.shape and logits.dtype == F32
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)
    o2, lse2, none, _ = torch.ops.stattn.region_attention(*args)
    assert none.numel() == 0
    torch.testing.assert_close(o2, o, rtol=0, atol=0)   # saving only copies the logits out: the same output


def test_native_backward_rejects_foreign_logits(native_backend):
    args = _opcheck_args()
    o, lse, logits, _ = torch.ops.stattn.region_attention(*args, save_logits=True)
    with pytest.raises(RuntimeError, match="logits must be the forward's saved logits"):
        native.backward(torch.ones_like(o), *args, lse, [True] * 6, logits[..., :-1].contiguous())


def test_native_lse_matches_reference(native_backend):
    case = Case(D=40, R=2, T=3, pinned=(0, 9), h=5, w=7)
    inp = make_inputs(case, "cpu", seed=2)
    gy, gx = (b.float() for b in inp["basis"])
    off = stattn.ScoreOffset(inp["theta"].float(), inp["tokens"], (gy, gx), pinned=case.pinned)
    tokens, pin = off.device_tensors(case.N)
    q, k, v = (inp[n].float() for n in ("q", "k", "v"))
    _, lse, _ = native.forward(q, k, v, inp["weights"].float(), inp["masks"].float(), False, off.theta, tokens,
                            gy, gx, pin, case.D ** -0.5)
    ref_off = stattn.ScoreOffset(inp["theta"], inp["tokens"], inp["basis"], pinned=case.pinned)
    expected = stattn.reference.region_lse(inp["q"], inp["k"], case.D ** -0.5, ref_off)
    assert lse.shape == (case.B, case.R + 1, case.H, case.M) and lse.dtype == F32
    torch.testing.assert_close(lse.double(), expected.double(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("wrt", [("q",), ("theta",), ("q", "weights"), ("masks",), ("k", "v"), ("v",), ("k",)])
def test_native_computes_only_requested_gradients(wrt, native_backend):
    case = Case(D=40, R=2, T=1, pinned=(0,), h=3, w=5)
    inp = make_inputs(case, "cpu", seed=3)
    out, grads = run(case, inp, F32, wrt=wrt)
    assert set(grads) == set(wrt)
    _check(case, inp, out, grads, wrt=wrt)


def test_native_strided_q_and_grad(native_backend):
    """diffusers hands q as a transposed view [B, M, H, D] -> [B, H, M, D]."""
    case = Case(D=40, R=2, T=1, pinned=(0,), h=5, w=5)
    inp = make_inputs(case, "cpu", seed=5)
    inp["q"] = inp["q"].transpose(1, 2).contiguous().transpose(1, 2)
    out, grads = run(case, inp, F32, wrt=("q", "theta"))
    _check(case, inp, out, grads, wrt=("q", "theta"))


def test_native_theta_without_tokens_gets_zero_gradient(native_backend):
    case = Case(D=40, R=2, T=0, pinned=(0, 3), h=3, w=4)
    inp = make_inputs(case, "cpu", seed=6)
    out, grads = run(case, inp, F32)
    assert torch.equal(grads["theta"], torch.zeros_like(grads["theta"]))
    _check(case, inp, out, grads)


@pytest.mark.parametrize("threads", [1, 2])
def test_native_backward_is_deterministic(threads, native_backend):
    """Bitwise-equal repeated runs: the cross-pixel sums (dk, dv, dtheta, dweights) are per-chunk
    partials over a fixed pixel partition, summed in a fixed order (BLAS itself promises run-to-run,
    not cross-thread-count, reproducibility, so the thread count is held fixed)."""
    case = Case(D=40, R=2, T=3, pinned=(0, 9), affine=True, h=40, w=30)   # M = 1200: two pixel chunks
    inp = make_inputs(case, "cpu", seed=7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        (o0, g0), (o1, g1) = run(case, inp, F32), run(case, inp, F32)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(o0, o1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_native_gradcheck_fp64(native_backend):
    case = Case(B=1, H=2, h=3, w=4, D=5, R=2, N=9, T=2, pinned=(0, 4), affine=True)
    inp = make_inputs(case, "cpu")
    gy, gx = inp["basis"]

    def f(q, k, v, masks, weights, theta):
        off = stattn.ScoreOffset(theta, inp["tokens"], (gy, gx), pinned=case.pinned)
        return stattn.region_attention(q, k, v, masks=masks, region_weights=weights, affine=True, offset=off)

    args = [inp[n].clone().requires_grad_() for n in ("q", "k", "v", "masks", "weights", "theta")]
    assert torch.autograd.gradcheck(f, args)


def _opcheck_args():
    return op_args()


@pytest.mark.parametrize("save_logits", [False, True])
def test_native_opcheck(save_logits, native_backend, monkeypatch):
    monkeypatch.delenv("STATTN_NATIVE_POISON")
    args = _opcheck_args()
    for t in args[:5] + (args[6],):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.stattn.region_attention.default, args, {"save_logits": save_logits})


THREE_WAY = [Case(D=40, R=2, T=1, pinned=(0,), affine=True, h=5, w=7),
             Case(D=80, R=1, T=3, pinned=(4,), h=4, w=5),
             Case(D=64, R=4, T=0, dtype=F16, h=3, w=5)]


@pytest.mark.parametrize("case", THREE_WAY, ids=_ids)
def test_three_way_reference_triton_native(case, monkeypatch):
    """The op under all three CPU backends on the same inputs: each near the fp64 oracle and the
    native and interpreter-Triton results near each other."""
    inp = make_inputs(case, "cpu", seed=11)
    results = {}
    for backend in ("reference", "triton", "native"):
        monkeypatch.setenv("STATTN_BACKEND", backend)
        results[backend] = run(case, inp, case.dtype)
        _check(case, inp, *results[backend])
    tol = NATIVE_TOL[case.dtype]
    (o_n, g_n), (o_t, g_t) = results["native"], results["triton"]
    assert rel_err(o_n, o_t.double()) < tol
    for name in g_n:
        assert rel_err(g_n[name], g_t[name].double()) < tol * GRAD_TOL_FACTOR, name


def test_unavailable_extension_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(native, "_state", {"ok": False, "error": "simulated: not built"})
    monkeypatch.setenv("STATTN_BACKEND", "auto")
    case = Case(D=40, R=2, T=1, pinned=(0,), h=3, w=5)
    inp = make_inputs(case, "cpu", seed=4)
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable.*simulated: not built.*pip install"):
        out, grads = run(case, inp, F32)
    assert stattn.ops.backend_for(inp["q"]) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # the warning is one-time
        run(case, inp, F32)
    _check(case, inp, out, grads)
    monkeypatch.setenv("STATTN_BACKEND", "native")          # asked for explicitly: an error, not a fallback
    with pytest.raises(RuntimeError, match="STATTN_BACKEND=native"):
        stattn.ops.backend_for(inp["q"])


def test_bad_backend_name_is_rejected(monkeypatch):
    monkeypatch.setenv("STATTN_BACKEND", "nativ")
    with pytest.raises(ValueError, match="auto, triton, native or reference"):
        stattn.ops.backend_for(torch.zeros(1))


@pytest.mark.parametrize("switch", ["STATTN_NATIVE_BLAS", "STATTN_NATIVE_V4"])
def test_switched_off_paths(switch):
    """Paths a machine may take that this one does not, each switched on in a fresh process (the
    switches are read once): STATTN_NATIVE_BLAS=0 takes the kernels' own loops instead of libtorch's
    sgemm/dgemm (a torch build that does not export them); STATTN_NATIVE_V4=0 runs the fp32 row
    work with 8 lanes (AVX2 or baseline machines) instead of AVX-512's 16. Forward and every gradient
    against the reference, on the row paths: plain, offset with pins (shared exps), offsets of +-100
    (the two-pass fallback)."""
    code = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "import torch\n"
        "from helpers import Case, make_inputs, run, reference_run, rel_err\n"
        "errs = []\n"
        "for case, scale in ((Case(D=40, R=2, T=1, pinned=(0,), affine=True, h=3, w=5), 1.0),\n"
        "                    (Case(D=80, R=2, T=3, pinned=(0, 9), h=5, w=7), 1.0),\n"
        "                    (Case(D=40, R=1, T=0, h=4, w=5), 1.0),\n"
        "                    (Case(D=40, R=2, T=2, pinned=(0,), affine=True, h=4, w=5), 40.0)):\n"
        "    inp = make_inputs(case, 'cpu')\n"
        "    if scale != 1.0: inp['theta'] = inp['theta'] * scale\n"
        "    out, grads = run(case, inp, torch.float32)\n"
        "    ref, rg = reference_run(case, inp)\n"
        "    errs += [rel_err(out, ref)] + [rel_err(g, rg[n]) for n, g in grads.items()]\n"
        "print(max(errs))\n")
    env = dict(os.environ, STATTN_BACKEND="native", STATTN_NATIVE_POISON="1", OMP_NUM_THREADS="1")
    env[switch] = "0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < TOL[("cpu", F32)] * GRAD_TOL_FACTOR


# ---------------------------------------------------------------------------------------------
# Attention Regulation inner loop (csrc/regulation.cpp) against the closed-form PyTorch loop

def _loop_inputs(B, H, h, w, D, T, dtype, seed=0, tie_rows=False):
    g = torch.Generator().manual_seed(seed)
    M = h * w
    q = torch.randn(B, H, M, D, generator=g, dtype=torch.float64)
    if tie_rows:  # 95 % of the pixels with q = 0: logits exactly 0 in any summation order, a tie of 95 %;
        # scattered, so that the offset breaks it generically after the first step (a block of tied pixels
        # gives a periodic offset inside the block, and ties again)
        q[:, :, torch.randperm(M, generator=g)[: M * 95 // 100]] = 0
    k = torch.randn(B, H, 77, D, generator=g, dtype=torch.float64)
    ct = torch.float64 if dtype == F64 else F32
    gy, gx = stattn.gaussian_basis(h, w, dtype=ct)
    theta0 = 0.1 * torch.randn(B, H, T, gy.shape[1], gx.shape[1], generator=g, dtype=torch.float64)
    tokens = torch.randperm(77, generator=g)[:T]
    return q.to(dtype), k.to(dtype), tokens, theta0.to(ct), gy, gx


def _native_loop(q, k, tokens, theta0, gy, gx, scale, iters):
    from stattn.methods.regulation import core as rc

    ct = torch.float64 if q.dtype == F64 else F32
    T = tokens.numel()
    return rc.InnerResult(*native.inner_loop(q, k, tokens, theta0, gy, gx, scale, iters, 100.0,
                                             rc.quantile_position(0.9, q.shape[2], ct), 0.9, rc.default_thr(T) / T,
                                             loop_oracle.WEIGHTS))


# Against the fp64 oracle of tests/loop_oracle.py: fp64 iteration by iteration over all 20 iterations;
# fp32 / bf16 up to the first iteration where fp32 rounding can swap the quantile's order statistics
# (after it the two are different trajectories), and the best-iterate rule and theta_best throughout.
@pytest.mark.parametrize("B,H,h,w,D,T,dtype,reach", [
    (1, 2, 8, 8, 40, 1, F64, 19),        # fp64: nth_element over all pixels
    (2, 3, 24, 20, 64, 3, F64, 19),      # M = 480
    (2, 2, 16, 16, 160, 2, F32, 2),      # M = 256 (SD's 16 x 16 layer): fp32 bisection over all pixels
    (2, 2, 32, 24, 40, 2, F64, 19),      # M = 768
    (2, 2, 32, 24, 80, 2, F32, 2),       # M = 768, fp32: bisection within the sampled window
    (1, 2, 24, 24, 40, 3, BF16, 2),
])
def test_native_inner_loop_matches_closed_form(B, H, h, w, D, T, dtype, reach):
    q, k, tokens, theta0, gy, gx = _loop_inputs(B, H, h, w, D, T, dtype)
    res = _native_loop(q, k, tokens, theta0, gy, gx, D ** -0.5, 20)
    ct = torch.float64 if dtype == F64 else F32
    assert res.theta_best.dtype == res.losses.dtype == ct and res.best_iter.dtype == torch.int64
    assert res.best_iter.dim() == 0 and res.theta_best.shape == theta0.shape and res.losses.shape == (20,)
    o = loop_oracle.oracle(q, k, tokens, theta0, (gy, gx), scale=D ** -0.5, iters=20)
    assert loop_oracle.assert_matches(res, o) >= reach


# The tie is exact by construction (q = 0 rows, theta0 = 0: every tied pixel's logits are exactly 0,
# whatever kernel computes them), so every path shares the quantile's weight the same way at iteration
# 0 and theta_1 shows it. fp64 selects with nth_element, fp32 by bisection (at M = 256 over all pixels,
# at M = 576 within the sampled window, here the tie itself). Later iterations break the tie by the
# offset, generically: fp64 compares three iterations, fp32 up to its first near-branch.
@pytest.mark.parametrize("h,dtype,iters,reach", [(24, F64, 3, 2), (16, F32, 2, 1), (24, F32, 2, 1)])
def test_native_inner_loop_shares_the_quantile_weight_among_ties(h, dtype, iters, reach):
    M = h * h
    q, k, tokens, theta0, gy, gx = _loop_inputs(1, 2, h, h, 40, 2, dtype, seed=3, tie_rows=True)
    theta0.zero_()  # every tied pixel has the same probability: a tie at the 0.9 quantile
    z = torch.einsum("bhmd,bhnd->bhmn", q, k) * 40 ** -0.5
    p = z.softmax(-1)[0, 0, :, tokens[0]]
    assert (p == p.sort().values[int(0.9 * (M - 1))]).sum() > 0.85 * M
    res = _native_loop(q, k, tokens, theta0, gy, gx, 40 ** -0.5, iters)
    o = loop_oracle.oracle(q, k, tokens, theta0, (gy, gx), scale=40 ** -0.5, iters=iters, construction_ties=True)
    assert loop_oracle.assert_matches(res, o) >= reach


def test_native_inner_loop_is_deterministic():
    from stattn.methods.regulation import core as rc

    q, k, tokens, theta0, gy, gx = _loop_inputs(2, 2, 32, 24, 40, 2, F32, seed=5)
    call = lambda: native.inner_loop(q, k, tokens, theta0, gy, gx, 40 ** -0.5, 20, 100.0,  # noqa: E731
                                     rc.quantile_position(0.9, 768, F32), 0.9, 0.2, (1.0, 80.0, 0.09))
    a, b = call(), call()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bench_timing_interleaves_the_compared_paths():
    from bench.native import _timed

    calls = []
    timed = _timed({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then one of each per repeat
    assert set(timed) == {"a", "b"} and all(t["n"] == 3 and len(t["times_ms"]) == 3 for t in timed.values())


def test_bench_timing_repeats_cheap_groups_up_to_the_time_budget(monkeypatch):
    import time

    from bench import native as bench_native

    def sleeper(s):
        return lambda: time.sleep(s)

    # a repeat of >= 4 ms under a 0.2 s budget: at most 50 repeats (10 even if sleeps overshoot 5x)
    timed = bench_native._timed({"a": sleeper(0.002), "b": sleeper(0.002)}, repeats=3, min_s=0.2)
    assert 10 <= timed["a"]["n"] <= 50 and timed["a"]["n"] == timed["b"]["n"]
    assert bench_native._timed({"a": sleeper(0.002)}, repeats=3, min_s=0.0)["a"]["n"] == 3
    monkeypatch.setattr(bench_native, "MAX_REPEATS", 7)  # the cap holds for a near-free call
    assert bench_native._timed({"a": lambda: None}, repeats=3, min_s=10.0)["a"]["n"] == 7


def test_bench_paired_speedup_is_the_median_of_per_repeat_ratios():
    from bench.native import _paired

    # a slow spell in the second repeat slows both paths; the ratio of the medians is 2.2 / 1.6
    assert _paired({"times_ms": [2.0, 20.0, 2.2]}, {"times_ms": [1.0, 10.0, 1.6]}) == 2.0


def test_bench_native_quick_run_writes_checked_results(tmp_path, capsys):
    import json

    from bench import native as bench_native

    threads = torch.get_num_threads()
    try:
        assert bench_native.main(["--quick", "--repeats", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (js,) = tmp_path.glob("native-*.json")
    (md,) = tmp_path.glob("native-*.md")
    res = json.loads(js.read_text())
    assert [r["R"] for r in res["op"]] == [1, 2, 4] and len(res["inner_loop"]) == 1
    for row in res["op"]:
        assert row["max_rel_err"] < 1e-5 and row["speedup_fwd"] > 0 and row["native_fwd_ms"]["n"] == 1
    loop = res["inner_loop"][0]
    # (two fp32 runs of the 20-iteration loop need not pick the same best iterate: tests/loop_oracle.py)
    assert set(loop["best_iter"]) == {"native", "closed_form", "eager_autograd"}
    assert all(0 <= b < loop["iters"] for b in loop["best_iter"].values())
    assert "| 1024 | 80 | 4 |" in md.read_text()
