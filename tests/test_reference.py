"""The reference is the oracle: its closed-form backward against autograd and gradcheck (fp64),
the Gaussian basis rule, and the op's invariants on every backend."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import stattn
from stattn import reference as ref
from helpers import TOL, Case, make_inputs, rel_err

BACKENDS = ["reference", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("STATTN_BACKEND", request.param)
    return request.param


def _offset(inp, pinned=(), theta=None):
    th = inp["theta"] if theta is None else theta
    return stattn.ScoreOffset(th, inp["tokens"], inp["basis"], pinned=pinned)


@pytest.mark.parametrize("case", [Case(R=1, T=0), Case(R=3, T=2, pinned=(0, 7)),
                                  Case(R=2, T=1, pinned=(3,), affine=True), Case(R=4, T=3, affine=True)])
def test_closed_form_backward_matches_autograd(case):
    inp = make_inputs(case, "cpu")
    leaves = [inp[n].clone().requires_grad_() for n in ("q", "k", "v", "masks", "weights")]
    theta = inp["theta"].clone().requires_grad_() if inp["theta"] is not None else None
    off = _offset(inp, case.pinned, theta) if theta is not None else None
    out = ref.region_attention(*leaves, case.affine, off)
    do = torch.randn_like(out)
    wrt = leaves + ([theta] if theta is not None and case.T else [])
    auto = torch.autograd.grad(out, wrt, do)
    dq, dk, dv, dw, dm, dt = ref.region_attention_backward(do, *[t.detach() for t in leaves], case.affine, off)
    closed = [dq, dk, dv, dm, dw] + ([dt] if dt is not None else [])
    assert len(closed) == len(auto)
    for a, c in zip(auto, closed):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("affine,pinned", [(False, ()), (True, (0, 4))])
def test_gradcheck_public_op_fp64(affine, pinned, reference_backend):
    case = Case(B=1, H=2, h=3, w=4, D=5, R=2, N=9, T=2, pinned=pinned, affine=affine)
    inp = make_inputs(case, "cpu")
    gy, gx = stattn.gaussian_basis(case.h, case.w, sigma=1, dtype=torch.float64)
    theta = torch.randn(1, 2, 2, gy.shape[1], gx.shape[1], dtype=torch.float64, requires_grad=True)

    def f(q, k, v, masks, weights, theta):
        off = stattn.ScoreOffset(theta, (1, 6), (gy, gx), pinned=pinned)
        return stattn.region_attention(q, k, v, masks=masks, region_weights=weights, affine=affine, offset=off)

    args = [inp[n].requires_grad_() for n in ("q", "k", "v", "masks", "weights")] + [theta]
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("w,expected", [(16, 7), (32, 7), (48, 7), (64, 7), (96, 7), (24, 11), (8, 3)])
def test_gaussian_basis_rule(w, expected):
    gy, gx = stattn.gaussian_basis(w, w, dtype=torch.float64)
    sigma = max(1, w // 16)
    assert gy.shape == gx.shape == (w, expected)
    centres = torch.arange(2 * sigma, w, 2 * sigma, dtype=torch.float64)
    assert torch.equal(gx.argmax(0).double(), centres) and torch.allclose(gx.max(0).values, torch.ones(expected, dtype=torch.float64))
    r = torch.arange(w, dtype=torch.float64)
    torch.testing.assert_close(gy[:, 0], torch.exp(-(r - 2 * sigma) ** 2 / (2 * sigma ** 2)))


def test_score_offset_is_the_separable_basis_sum():
    h, w = 4, 6
    gy, gx = stattn.gaussian_basis(h, w, sigma=1, dtype=torch.float64)
    theta = torch.randn(1, 1, 2, gy.shape[1], gx.shape[1], dtype=torch.float64)
    S = ref.score_offset(theta, gy, gx)
    for y, x, t in itertools.product(range(h), range(w), range(2)):
        direct = sum(gy[y, i] * theta[0, 0, t, i, j] * gx[x, j]
                     for i in range(gy.shape[1]) for j in range(gx.shape[1]))
        torch.testing.assert_close(S[0, 0, y * w + x, t], direct)


def _lowp(inp, dtype):
    return {n: (t.to(dtype) if isinstance(t, torch.Tensor) and n in ("q", "k", "v") else t) for n, t in inp.items()}


def test_plain_cross_attention_equals_sdpa(backend, device):
    case = Case(R=1, T=0, h=5, w=7, D=40)
    inp = make_inputs(case, device)
    q, k, v = (inp[n].float() for n in ("q", "k", "v"))
    out = stattn.region_attention(q, k, v)
    expected = F.scaled_dot_product_attention(q.double(), k[:, 0].double(), v[:, 0].double())
    assert rel_err(out, expected) < TOL[(device, torch.float32)]


def test_zero_theta_has_no_effect(backend, device):
    case = Case(R=2, T=3, h=4, w=5)
    inp = make_inputs(case, device)
    q, k, v = (inp[n].float() for n in ("q", "k", "v"))
    masks, weights = inp["masks"].float(), inp["weights"].float()
    theta0 = torch.zeros_like(inp["theta"]).float()
    basis = tuple(b.float() for b in inp["basis"])
    plain = stattn.region_attention(q, k, v, masks=masks, region_weights=weights)
    edited = stattn.region_attention(q, k, v, masks=masks, region_weights=weights,
                                     offset=stattn.ScoreOffset(theta0, inp["tokens"], basis, pinned=(0, 2)))
    assert rel_err(edited, plain.double()) < TOL[(device, torch.float32)]


def _single(q, k, v, r):
    return stattn.region_attention(q, k[:, r:r + 1], v[:, r:r + 1])


def test_one_hot_alpha_selects_a_region_and_regions_are_separate_softmaxes(backend, device):
    case = Case(R=3, T=0, h=5, w=5)
    inp = make_inputs(case, device)
    q, k, v = (inp[n].float() for n in ("q", "k", "v"))
    choice = torch.randint(0, 3, (case.M,), generator=torch.Generator().manual_seed(0)).to(device)
    onehot = F.one_hot(choice, 3).T.bool()                                   # [R, M]
    out = stattn.region_attention(q, k, v, masks=onehot)
    per_region = torch.stack([_single(q, k, v, r) for r in range(3)])         # [R, B, H, M, D]
    expected = per_region[choice, :, :, torch.arange(case.M, device=device)].permute(1, 2, 0, 3)
    assert rel_err(out, expected.double()) < TOL[(device, torch.float32)]
    summed = stattn.region_attention(q, k, v)                                 # all alphas 1
    assert rel_err(summed, per_region.sum(0).double()) < TOL[(device, torch.float32)]


def test_affine_mix(backend, device):
    case = Case(R=3, T=0, h=4, w=4)
    inp = make_inputs(case, device)
    q, k, v = (inp[n].float() for n in ("q", "k", "v"))
    masks, weights = inp["masks"].float(), inp["weights"].float() * 0.3
    out = stattn.region_attention(q, k, v, masks=masks, region_weights=weights, affine=True)
    a = weights[..., None] * masks                                            # [B, R, M]
    a0 = 1 - a[:, 1:].sum(1)
    per = [_single(q, k, v, r) for r in range(3)]
    expected = a0[:, None, :, None] * per[0] + sum(a[:, r, None, :, None] * per[r] for r in (1, 2))
    assert rel_err(out, expected.double()) < TOL[(device, torch.float32)]


def test_pinned_columns_keep_their_unedited_probability():
    case = Case(R=1, T=2, h=4, w=4)
    inp = make_inputs(case, "cpu")
    off = _offset(inp, pinned=(0, 5))
    p = ref.region_probs(inp["q"], inp["k"], case.D ** -0.5, off)[:, 0]
    plain = ref.region_probs(inp["q"], inp["k"], case.D ** -0.5)[:, 0]
    torch.testing.assert_close(p[..., [0, 5]], plain[..., [0, 5]])
    edited = ref.region_probs(inp["q"], inp["k"], case.D ** -0.5, _offset(inp))[:, 0]
    others = [n for n in range(case.N) if n not in (0, 5)]
    torch.testing.assert_close(p[..., others], edited[..., others])
    assert not torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)))       # rows no longer sum to 1
