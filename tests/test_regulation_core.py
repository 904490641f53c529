"""Attention-Regulation inner optimisation (stattn/methods/regulation/core.py, kernels/regulation.py):
the spec's check values, the closed-form gradient vs autograd (fp64), the fused loop (Triton,
interpreter on CPU) vs the fp64 oracle of tests/loop_oracle.py (iteration by iteration until the
first near-branch), the best-iterate rule on exact ties, the quantile vs torch.quantile, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import loop_oracle
import stattn
from stattn.methods.regulation import core as rc

F64 = torch.float64
WEIGHTS = loop_oracle.WEIGHTS


def spec_logits(n: int, w: int) -> torch.Tensor:
    """The spec's pattern L[n,r,c,j] = 0.5 sin(0.3r + 0.7c + 1.1j + 0.5n) + 4[j = 0] as z [1, n, w*w, 77]."""
    nn_, r, c, j = torch.meshgrid(*(torch.arange(s, dtype=F64) for s in (n, w, w, 77)), indexing="ij")
    z = 0.5 * torch.sin(0.3 * r + 0.7 * c + 1.1 * j + 0.5 * nn_) + 4 * (j == 0)
    return z.reshape(1, n, w * w, 77)


def const_theta(n, T, basis, value):
    gy, gx = basis
    return torch.full((1, n, T, gy.shape[1], gx.shape[1]), value, dtype=F64)


def require_native():
    """Skip a native-backend case where the extension is unavailable; fail instead under
    STATTN_REQUIRE_NATIVE=1 (CI), as tests/test_native.py does."""
    if not stattn.native.load():
        why = f"native extension unavailable: {stattn.native._state.get('error')}"
        if os.environ.get("STATTN_REQUIRE_NATIVE") == "1":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


# ---- check values A-C (spec) -------------------------------------------------------------------

@pytest.mark.parametrize("n,w", [(1, 16), (3, 8)])
def test_check_value_A_uniform_probabilities(n, w):
    basis = stattn.gaussian_basis(w, w, dtype=F64)
    r = rc.regulation_loss(torch.zeros(1, n, w * w, 77, dtype=F64), [2, 5], const_theta(n, 2, basis, 0.0), basis)
    assert r.loss.item() == pytest.approx(3.5847006, abs=1e-7)
    assert r.loss.item() == pytest.approx((1 / 77 - 0.9) ** 2 + 80 * (1 / 77 - 0.2) ** 2, rel=1e-12)


@pytest.mark.parametrize("value,expected", [(0.0, 3.74296642), (0.5, 3.54585454), (2.0, 1.82318898)])
def test_check_values_B(value, expected):
    basis = stattn.gaussian_basis(16, 16, dtype=F64)
    r = rc.regulation_loss(spec_logits(2, 16), [2, 5], const_theta(2, 2, basis, value), basis)
    assert r.loss.item() == pytest.approx(expected, abs=1e-8)
    if value == 0.5:
        assert (r.l_q.item(), r.l_m.item(), r.l_theta.item()) == pytest.approx((0.76702198, 0.03445416, 0.25), abs=1e-8)


@pytest.mark.parametrize("tokens,expected", [((2, 5, 7), 3.64216753), ((1, 2, 3, 4, 5, 6), 2.72533888)])
def test_check_values_C(tokens, expected):
    basis = stattn.gaussian_basis(32, 32, dtype=F64)
    r = rc.regulation_loss(spec_logits(1, 32), list(tokens), const_theta(1, len(tokens), basis, 0.3), basis)
    assert r.loss.item() == pytest.approx(expected, abs=1e-8)


# ---- closed form vs autograd (fp64) ------------------------------------------------------------

def autograd_loss(z, tokens, theta, gy, gx, quantile=0.9, weights=WEIGHTS, thr=None):
    """The loss written the straightforward way: edit the logits, softmax over all keys, torch.quantile."""
    B, H, M, N = z.shape
    T = len(tokens)
    thr = min(1.0, 0.2 * T) if thr is None else thr
    S = torch.einsum("yi,bhtij,xj->bhyxt", gy, theta, gx).reshape(B, H, M, T)
    onehot = torch.nn.functional.one_hot(torch.tensor(tokens), N).to(z.dtype)
    P = (z + S @ onehot).softmax(-1)[..., list(tokens)].transpose(-1, -2)      # [B, H, T, M]
    l_q = ((torch.quantile(P, quantile, dim=-1) - quantile) ** 2).mean()
    l_m = ((P.mean(-1) - thr / T) ** 2).mean()
    return weights[0] * l_q + weights[1] * l_m + weights[2] * theta.square().mean()


@pytest.mark.parametrize("B,H,h,w,T,quantile", [(1, 2, 16, 16, 3, 0.9), (2, 1, 5, 7, 1, 0.9), (1, 3, 8, 8, 2, 0.37)])
def test_closed_form_gradient_matches_autograd_fp64(B, H, h, w, T, quantile):
    g = torch.Generator().manual_seed(h * w + T)
    gy, gx = stattn.gaussian_basis(h, w, sigma=1 if min(h, w) < 16 else None, dtype=F64)
    z = 2 * torch.randn(B, H, h * w, 77, generator=g, dtype=F64)
    tokens = [int(i) for i in torch.randperm(77, generator=g)[:T]]
    theta = torch.randn(B, H, T, gy.shape[1], gx.shape[1], generator=g, dtype=F64, requires_grad=True)
    expected = autograd_loss(z, tokens, theta, gy, gx, quantile)
    (grad,) = torch.autograd.grad(expected, theta)
    got = rc.regulation_loss(z, tokens, theta.detach(), (gy, gx), quantile=quantile)
    assert got.loss.item() == pytest.approx(expected.item(), rel=1e-12)
    torch.testing.assert_close(got.grad, grad, rtol=1e-9, atol=1e-12)


def test_loss_invariant_to_a_constant_per_pixel():
    g = torch.Generator().manual_seed(3)
    gy, gx = stattn.gaussian_basis(16, 16, dtype=F64)
    z = torch.randn(1, 2, 256, 77, generator=g, dtype=F64)
    theta = torch.randn(1, 2, 2, 7, 7, generator=g, dtype=F64)
    a = rc.regulation_loss(z, [3, 9], theta, (gy, gx))
    b = rc.regulation_loss(z + 10 * torch.randn(1, 2, 256, 1, generator=g, dtype=F64), [3, 9], theta, (gy, gx))
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-10)
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("M", [7, 144, 256, 576, 1024])
@pytest.mark.parametrize("quantile", [0.0, 0.37, 0.9, 1.0])
def test_quantile_position_matches_torch_quantile(M, quantile, dtype):
    """(lo, hi, frac) are torch.quantile's, bit for bit: the values are the integers -lo .. M-1-lo in a
    random order, so its order statistics lo and hi are exactly 0 and 1 and any lerp of them (a + w (b - a)
    or b - (b - a)(1 - w), fused or not) is w itself: torch.quantile returns its own frac exactly."""
    lo, hi, frac = rc.quantile_position(quantile, M, dtype)
    assert 0 <= lo <= hi <= min(lo + 1, M - 1) and (hi == lo) == (frac == 0)
    x = (torch.randperm(M, generator=torch.Generator().manual_seed(M)) - lo).to(dtype)
    assert torch.quantile(x, quantile).item() == frac


# ---- the loop: Triton (interpreter) vs the fp64 PyTorch loop -----------------------------------

LOOP_CASES = [  # (B, H, h, w, D, T, dtype)
    (1, 2, 16, 16, 64, 3, torch.float32),
    (2, 1, 16, 16, 40, 1, torch.float16),
    (1, 2, 12, 12, 40, 3, torch.float16),   # odd grid: padded tiles, K = 5 x 5
    (1, 1, 8, 8, 64, 1, torch.float32),     # sigma clamped to 1
]
ITERS = 4


def loop_inputs(B, H, h, w, D, T, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, h * w, D, generator=g) * 1.5).to(device, dtype)
    k = torch.randn(B, H, 77, D, generator=g).to(device, dtype)
    gy, gx = stattn.gaussian_basis(h, w, device=device)
    theta0 = torch.rand(B, H, T, gy.shape[1], gx.shape[1], generator=g).to(device)
    tokens = (torch.randperm(76, generator=g)[:T] + 1).to(device)
    return q, k, tokens, theta0, (gy, gx)


def fp64_loop(q, k, tokens, theta0, basis, iters, lr=100.0):
    """The closed-form loop in fp64 on the CPU, with every evaluated theta_i."""
    q, k, tokens, theta0 = (t.cpu() for t in (q, k, tokens, theta0))
    gy, gx = (g.cpu() for g in basis)
    return rc._loop_reference(q.double(), k.double(), tokens, theta0.double(), gy.double(), gx.double(),
                              q.shape[-1] ** -0.5, iters, lr, 0.9, WEIGHTS, rc.default_thr(len(tokens)),
                              trajectory=True)


def assert_matches_fp64(res, q, k, tokens, theta0, basis, iters, construction_ties=False):
    """A run of the loop (scale D^-1/2, the default settings) against the fp64 oracle: losses iteration by
    iteration up to the first near-branch, the best-iterate rule and theta_best whatever the prefix
    (tests/loop_oracle.py). Returns the last iteration compared."""
    assert res.theta_best.device == q.device and res.losses.device == q.device
    ct = F64 if q.dtype == F64 else torch.float32
    assert res.theta_best.dtype == ct and res.losses.dtype == ct
    assert res.best_iter.dtype == torch.int64 and res.best_iter.dim() == 0
    o = loop_oracle.oracle(q, k, tokens, theta0, basis, scale=q.shape[-1] ** -0.5, iters=iters,
                           construction_ties=construction_ties)
    return loop_oracle.assert_matches(res, o)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,h,w,D,T,dtype", LOOP_CASES)
def test_triton_loop_matches_fp64_loop(B, H, h, w, D, T, dtype, device, triton_backend, poisoned):
    inp = loop_inputs(B, H, h, w, D, T, dtype, device=device)
    res = rc.inner_loop(*inp, scale=D ** -0.5, iters=ITERS)
    assert assert_matches_fp64(res, *inp, ITERS) >= 2   # no near-branch before iteration 2 on these inputs
    # theta moves every iteration (lr = 100 may overshoot: the loss need not fall)
    assert (res.losses.diff().abs() > 1e-4 * res.losses[0]).all()


@pytest.mark.gpu
def test_triton_loop_strided_inputs(device, triton_backend, poisoned):
    """B and H both > 1, q and k as views of [B, M, H, D] / [B, N, H, D] projections, theta0 a
    transposed view: the kernels index by strides, no copies."""
    q, k, tokens, theta0, basis = loop_inputs(2, 2, 8, 8, 24, 2, torch.float16, seed=6, device=device)
    qv = q.transpose(1, 2).contiguous().transpose(1, 2)
    kv = k.transpose(1, 2).contiguous().transpose(1, 2)
    tv = theta0.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not (qv.is_contiguous() or kv.is_contiguous() or tv.is_contiguous())
    res = rc.inner_loop(qv, kv, tokens, tv, basis, scale=24 ** -0.5, iters=3)
    assert assert_matches_fp64(res, q, k, tokens, theta0, basis, 3) == 2


@pytest.mark.gpu
def test_triton_loop_shares_the_quantile_weight_among_ties(device, triton_backend, poisoned):
    """q = 0 and theta0 = 0: every logit is exactly 0 (whatever the summation order), so every pixel
    has the same probability at the first iteration and each order statistic ties M ways; both paths
    split its weight equally, and L(theta_1) shows the step agrees. (theta_1 is mirror-symmetric, so
    iteration 1 has near-ties that float32 and float64 break differently: the oracle ends the
    comparison there.)"""
    q, k, tokens, theta0, basis = loop_inputs(1, 2, 8, 8, 16, 2, torch.float32, seed=7, device=device)
    q, theta0 = torch.zeros_like(q), torch.zeros_like(theta0)
    res = rc.inner_loop(q, k, tokens, theta0, basis, scale=0.25, iters=2)
    assert assert_matches_fp64(res, q, k, tokens, theta0, basis, 2, construction_ties=True) == 1
    *_, traj = fp64_loop(q, k, tokens, theta0, basis, 2)
    assert traj[1].std() > 0   # the tied step moves theta non-uniformly (the basis is not flat)


def test_reference_loop_fp32_matches_fp64_loop(reference_backend):
    inp = loop_inputs(1, 2, 16, 16, 40, 2, torch.float32)
    res = rc.inner_loop(*inp, scale=40 ** -0.5, iters=6)
    assert assert_matches_fp64(res, *inp, 6) >= 3


def test_fp64_loop_keeps_the_first_strict_minimum(reference_backend):
    q, k, tokens, theta0, basis = loop_inputs(1, 2, 8, 8, 16, 2, F64, seed=5)
    res = rc.inner_loop(q, k, tokens, theta0.double(), basis, scale=0.25, iters=8, lr=400.0)
    *_, traj = fp64_loop(q, k, tokens, theta0, basis, 8, lr=400.0)
    losses = res.losses.tolist()
    best = min(range(8), key=lambda i: (losses[i], i))
    assert int(res.best_iter) == best and res.theta_best.dtype == F64
    # the same function (regulation_core._loop_reference) on the same inputs: its own iterate, exactly
    torch.testing.assert_close(res.theta_best, traj[best], rtol=0, atol=0)
    one = rc.inner_loop(q, k, tokens, theta0.double(), basis, scale=0.25, iters=1)
    assert int(one.best_iter) == 0 and torch.equal(one.theta_best, theta0.double())   # a copy of theta0


# ---- the branch logic: the best iterate on losses that tie exactly by construction ------------

@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
@pytest.mark.parametrize("lr,expected", [(1.0, 1), (2.0, 0), (0.0, 0)])
def test_best_iterate_is_the_first_strict_minimum_of_exact_ties(backend, lr, expected, monkeypatch, poisoned):
    """Losses that tie bit for bit in any arithmetic, so every backend must pick the same iterate.
    Loss weights (0, 0, w2 = K T / 2) make the step theta itself (2 w2 / (K T) = 1 exactly, the softmax
    terms 0 * finite = 0): lr = 1 sends theta to 0 in one step and keeps it there, losses (L0 > 0, 0, 0,
    0): the strict minimum at iteration 1 stays the best over its later ties; lr = 2 flips theta's
    sign, so every loss (mean theta^2) is the same: iteration 0 stays the best, and theta_best is theta0,
    not its negation. lr = 0 with the default weights evaluates L(theta0) four times: 0 again."""
    if backend == "native":
        require_native()
    monkeypatch.setenv("STATTN_BACKEND", backend)
    monkeypatch.setenv("STATTN_NATIVE_POISON", "1")
    q, k, tokens, theta0, basis = loop_inputs(1, 2, 8, 8, 16, 2, torch.float32, seed=12)
    K = theta0.shape[-2] * theta0.shape[-1]
    weights = WEIGHTS if lr == 0 else (0.0, 0.0, K * len(tokens) / 2)
    res = rc.inner_loop(q, k, tokens, theta0, basis, scale=0.25, iters=4, lr=lr, loss_weights=weights)
    losses = res.losses.tolist()
    assert int(res.best_iter) == expected, losses
    if lr == 1.0:
        assert losses[0] > 0 and losses[1:] == [0.0, 0.0, 0.0]
        assert torch.equal(res.theta_best, torch.zeros_like(theta0))
    else:
        assert losses == [losses[0]] * 4
        assert torch.equal(res.theta_best, theta0)


@pytest.mark.gpu
def test_triton_quantile_matches_torch_quantile(device, triton_backend, poisoned):
    """Loss weights (1, 0, 0) and one iteration: losses[0] is the quantile term alone."""
    inp = loop_inputs(1, 2, 12, 12, 40, 3, torch.float32, seed=2, device=device)
    res = rc.inner_loop(*inp, scale=40 ** -0.5, iters=1, loss_weights=(1.0, 0.0, 0.0))
    q, k, tokens, theta0 = (t.cpu() for t in inp[:4])
    gy, gx = (g.cpu() for g in inp[4])
    z = torch.einsum("bhmd,bhnd->bhmn", q.double(), k.double()) * 40 ** -0.5
    S = torch.einsum("yi,bhtij,xj->bhyxt", gy.double(), theta0.double(), gx.double()).reshape(1, 2, 144, 3)
    onehot = torch.nn.functional.one_hot(tokens, 77).double()
    P = (z + S @ onehot).softmax(-1)[..., tokens].transpose(-1, -2)
    expected = ((torch.quantile(P, 0.9, dim=-1) - 0.9) ** 2).mean()
    assert res.losses[0].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:All-NaN slice")
def test_kernel_flags_bad_device_tokens_with_nan_losses(device, triton_backend, poisoned):
    """Device tokens are not read on the host; the kernel turns an invalid index into NaN losses,
    best_iter 0 and theta_best = theta0 (launcher called directly: CPU tokens would be checked)."""
    from stattn.kernels import regulation as kreg

    q, k, _, theta0, (gy, gx) = loop_inputs(1, 1, 8, 8, 16, 2, torch.float32, device=device)
    for bad in ([3, 77], [4, 4]):
        theta_best, best, losses = kreg.inner_loop(q, k, torch.tensor(bad, device=device), theta0, gy, gx, 0.25, 2, 100.0,
                                                   rc.quantile_position(0.9, 64), 0.9, 0.2, WEIGHTS)
        assert torch.isnan(losses).all() and int(best) == 0
        assert torch.equal(theta_best, theta0)


# ---- registration, bad input -------------------------------------------------------------------

def op_args(dtype=torch.float32, device="cpu"):
    q, k, tokens, theta0, (gy, gx) = loop_inputs(1, 2, 8, 8, 16, 2, dtype, device=device)
    return (q, k, tokens, theta0, gy, gx, 0.25, 3, 100.0, 0.9, 1.0, 80.0, 0.09, 0.4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend, device, monkeypatch):
    monkeypatch.setenv("STATTN_BACKEND", backend)
    torch.library.opcheck(torch.ops.stattn.regulation_inner_loop.default, op_args(device=device),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph_matches_eager(backend, device, monkeypatch):
    monkeypatch.setenv("STATTN_BACKEND", backend)
    q, k, tokens, theta0, basis = loop_inputs(1, 2, 8, 8, 16, 2, torch.float32, device=device)

    def f(q, theta0):
        return rc.inner_loop(q, k, tokens, theta0, basis, scale=0.25, iters=3)

    eager = f(q, theta0)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, theta0)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def _bad_calls():
    q, k, tokens, theta0, basis = loop_inputs(1, 2, 8, 8, 16, 2, torch.float32)
    ok = dict(q=q, k=k, tokens=tokens, theta0=theta0, basis=basis, scale=0.25)
    gy, gx = basis
    return ok, [
        (dict(q=q[0]), ValueError, "q must have shape"),
        (dict(k=k.double()), TypeError, "k must have q's dtype"),
        (dict(k=k[:, :1]), ValueError, "k must have shape"),
        (dict(q=q.int(), k=k.int()), TypeError, "q must be float16"),
        (dict(tokens=torch.tensor([3, 77])), ValueError, "out of range"),
        (dict(tokens=torch.tensor([4, 4])), ValueError, "must not repeat"),
        (dict(tokens=torch.tensor([], dtype=torch.int64)), ValueError, "at least one"),
        (dict(tokens=torch.tensor([1.0, 2.0])), TypeError, "tokens must be an int64"),
        (dict(tokens=[1, 2, 3]), ValueError, "theta0 must have shape"),
        (dict(theta0=theta0.half()), TypeError, "theta0 must be float32"),
        (dict(theta0=theta0.double()), TypeError, "float64 only with float64 q"),
        (dict(theta0=theta0.clone().fill_(float("nan"))), ValueError, "theta0 contains NaN"),
        (dict(basis=(gy[:4], gx)), ValueError, "does not match M"),
        (dict(basis=(gy, gx[:, :2])), ValueError, "theta0 must have shape"),
        (dict(basis=gy), TypeError, "basis must be a pair"),
        (dict(scale=-1.0), ValueError, "scale must be a positive"),
        (dict(iters=0), ValueError, "iters must be an int >= 1"),
        (dict(iters=2.0), ValueError, "iters must be an int >= 1"),
        (dict(lr=float("inf")), ValueError, "lr must be a finite"),
        (dict(quantile=1.5), ValueError, "quantile must be in"),
        (dict(loss_weights=(1.0, 2.0)), ValueError, "loss_weights must be three"),
        (dict(thr=torch.tensor(0.4)), TypeError, "thr must be a Python float"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls()[1])))
def test_bad_input_errors_name_the_argument(case):
    ok, bad = _bad_calls()
    change, err, match = bad[case]
    kwargs = {**ok, **change}
    with pytest.raises(err, match=match):
        rc.inner_loop(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("tokens"), kwargs.pop("theta0"),
                      kwargs.pop("basis"), **kwargs)


# ---- the across-steps blend fused into the second launch --------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_blend_gives_theta_eff_and_carries_theta_best(backend, as_tensor, device, monkeypatch, poisoned):
    monkeypatch.setenv("STATTN_BACKEND", backend)
    q, k, tokens, theta0, basis = loop_inputs(1, 2, 8, 8, 16, 2, torch.float32, seed=4, device=device)
    state = torch.randn(theta0.shape, generator=torch.Generator().manual_seed(9)).to(device)
    prev = state.clone()
    step = torch.tensor(7, device=device) if as_tensor else 7
    res = rc.inner_loop_blend(q, k, tokens, theta0, basis, state, step, scale=0.25, iters=3)
    plain = rc.inner_loop(q, k, tokens, theta0, basis, scale=0.25, iters=3)
    # the blend only adds to the loop's second launch (or follows the same loop): the same loop, exactly
    torch.testing.assert_close(res.theta_best, plain.theta_best, rtol=0, atol=0)
    assert int(res.best_iter) == int(plain.best_iter)
    torch.testing.assert_close(res.losses, plain.losses, rtol=0, atol=0)
    expected = 0.99 ** 7 * (0.25 * prev + 0.75 * plain.theta_best)
    torch.testing.assert_close(res.theta_eff, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(state, plain.theta_best)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_blend_into_a_given_buffer(backend, device, monkeypatch, poisoned):
    """out= receives theta_eff in place, here the trailing (cond) rows of a bigger offset tensor."""
    monkeypatch.setenv("STATTN_BACKEND", backend)
    q, k, tokens, theta0, basis = loop_inputs(1, 2, 8, 8, 16, 2, torch.float32, seed=5, device=device)
    state = torch.randn(theta0.shape, generator=torch.Generator().manual_seed(3)).to(device)
    state2 = state.clone()
    full = torch.full((2, *theta0.shape[1:]), 7.0, device=device)  # [uncond; cond]
    res = rc.inner_loop_blend(q, k, tokens, theta0, basis, state, torch.tensor(4, device=device), scale=0.25,
                              iters=3, out=full[1:])
    ref = rc.inner_loop_blend(q, k, tokens, theta0, basis, state2, 4, scale=0.25, iters=3)
    assert res.theta_eff.data_ptr() == full[1:].data_ptr()
    torch.testing.assert_close(full[1:], ref.theta_eff, rtol=1e-6, atol=1e-6)
    assert torch.equal(full[0], torch.full_like(full[0], 7.0)) and torch.equal(state, state2)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        rc.inner_loop_blend(q, k, tokens, theta0, basis, state, 4, scale=0.25, iters=3, out=full)


def test_opcheck_blend_out(reference_backend):
    q, k, tokens, theta0, gy, gx, *rest = op_args()
    torch.library.opcheck(torch.ops.stattn.regulation_inner_loop_blend_out.default,
                          (q, k, tokens, theta0, gy, gx, theta0.clone(), theta0.clone(), torch.tensor(3), 0, 0.99,
                           0.25, *rest), test_utils=("test_schema", "test_faketensor"))


def test_opcheck_blend(reference_backend):
    q, k, tokens, theta0, gy, gx, *rest = op_args()
    torch.library.opcheck(torch.ops.stattn.regulation_inner_loop_blend.default,
                          (q, k, tokens, theta0, gy, gx, theta0.clone(), torch.tensor(3), 0, 0.99, 0.25, *rest),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("change,err,match", [
    (dict(theta_state=torch.zeros(1, 2, 2, 3, 3, dtype=F64)), ValueError, "theta_state must be a contiguous"),
    (dict(theta_state=torch.zeros(1, 2, 2, 3, 3).transpose(-1, -2)), ValueError, "theta_state must be a contiguous"),
    (dict(step=torch.tensor(2.0)), TypeError, "step must be a 0-d integer tensor"),
    (dict(step=-1), ValueError, "step must be an int >= 0"),
    (dict(decay=0.0), ValueError, "decay must be a positive"),
])
def test_blend_bad_input(change, err, match):
    q, k, tokens, theta0, basis = loop_inputs(1, 2, 8, 8, 16, 2, torch.float32)
    kwargs = {**dict(theta_state=theta0.clone(), step=3, scale=0.25), **change}
    with pytest.raises(err, match=match):
        rc.inner_loop_blend(q, k, tokens, theta0, basis, kwargs.pop("theta_state"), kwargs.pop("step"), **kwargs)


# ---- CUDA only: bfloat16 and CUDA-graph capture (not run without a GPU) ------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda_only
def test_cuda_bf16_loop_matches_fp64_loop(poisoned):
    inp = loop_inputs(1, 5, 16, 16, 64, 3, torch.bfloat16, device="cuda")
    res = rc.inner_loop(*inp, scale=0.125, iters=ITERS)
    assert_matches_fp64(res, *inp, ITERS)


@pytest.mark.gpu
@cuda_only
def test_cuda_graph_replay_matches_eager():
    """Captured once, replayed with new q and step: the same results as eager calls (no host
    sync, no data-dependent allocation inside the loop, the step read on the device)."""
    q, k, tokens, theta0, basis = loop_inputs(1, 5, 16, 16, 64, 3, torch.float16, device="cuda")
    state = theta0.clone()
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    run = lambda: rc.inner_loop_blend(q, k, tokens, theta0, basis, state, step, scale=0.125)  # noqa: E731
    run()  # warm-up: compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    q2 = loop_inputs(1, 5, 16, 16, 64, 3, torch.float16, seed=1, device="cuda")[0]
    q.copy_(q2)
    step.fill_(4)
    state.copy_(theta0)
    graph.replay()
    got = [t.clone() for t in captured]
    state_after = state.clone()
    state.copy_(theta0)
    eager = run()
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(state_after, state, rtol=0, atol=0)


# ---- the real compiler (sm_90): registers, no spills -------------------------------------------

COMPILE_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from bench.regulation import compile_report
rows = compile_report([(1, 5, 16, 16, 64, 3, 'float16'), (1, 5, 16, 16, 40, 1, 'float32')])
print(json.dumps(rows))
"""


def test_kernels_compile_for_sm90_without_spills():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT.format(root=root)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert {(r["kernel"], r["blend"]) for r in rows} >= {("_inner_loop_kernel", False), ("_best_kernel", False),
                                                        ("_best_kernel", True)}
    for r in rows:
        assert r["STACK"] == 0 and r["LOCAL"] == 0, r
        assert r["SHARED"] <= 232448, r


# ---- per-row target columns (a batch of different prompts) ---------------------------------------

def test_key_order_puts_every_row_targets_at_row_0_columns():
    rows = [[2, 5], [3, 9], [5, 2]]
    orders = rc.key_order(rows, 12)
    assert rc.key_order([[2, 5], [2, 5]], 12) is None                 # equal rows: the shared form
    for r, o in zip(rows, orders):
        assert sorted(o) == list(range(12))                            # a permutation of the keys
        assert [o[c] for c in rows[0]] == r                            # row b's targets at row 0's places
    with pytest.raises(ValueError, match="same number of target columns"):
        rc.key_order([[2, 5], [3]], 12)
    with pytest.raises(ValueError, match="distinct and in"):
        rc.key_order([[2, 5], [3, 3]], 12)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_per_row_tokens_match_per_row_loops_fp64(backend, monkeypatch):
    """inner_loop with tokens [B, T] against an oracle built from one-row loops: L is a mean over
    (image, head, token) with T tokens per row, so L = mean_b L_b and row b's step lr*n*dL/dtheta_b
    is the one-row loop's own (n = B*H there, H alone); only the best iteration, argmin of mean_b
    L_b, couples the rows. fp64: losses to rounding, theta_best to rounding."""
    if backend == "native":
        require_native()
    monkeypatch.setenv("STATTN_BACKEND", backend)
    q, k, _, theta0, basis = loop_inputs(3, 2, 8, 8, 16, 2, F64, seed=11)
    theta0 = theta0.double()
    rows = [[3, 7], [7, 12], [40, 2]]
    res = rc.inner_loop(q, k, torch.tensor(rows), theta0, basis, scale=0.25, iters=6)
    per_row = [fp64_loop(q[b:b + 1], k[b:b + 1], torch.tensor(r), theta0[b:b + 1], basis, 6)
               for b, r in enumerate(rows)]
    losses = torch.stack([p[2] for p in per_row]).mean(0)
    best = min(range(6), key=lambda i: (float(losses[i]), i))
    torch.testing.assert_close(res.losses, losses, rtol=1e-12, atol=0)
    assert int(res.best_iter) == best
    expected = torch.cat([p[3][best] for p in per_row])
    torch.testing.assert_close(res.theta_best, expected, rtol=1e-10, atol=1e-12)
    shared = rc.inner_loop(q, k, [3, 7], theta0, basis, scale=0.25, iters=6)
    assert not torch.allclose(shared.losses, res.losses)               # the rows' own columns matter
