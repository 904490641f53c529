"""Attention Regulation: the eager reference against the spec's check values and invariants, the
fused path against the reference (inner loop, edited logits, layer output, controller state over
steps, whole pipelines), the token helper, and bad input."""
import math

import pytest
import torch

import stattn
from stattn import models
from stattn import reference as ref
from stattn import regulation_reference as rr
from stattn.control import CrossAttentionCall
from stattn.regulation import AttentionRegulation
from stattn.tokens import eos_index, token_indices

PROMPT = "a photo of a cat and a frog"


@pytest.fixture(scope="module")
def tok():
    return models.tokenizer()


def spec_logits(N: int, w: int) -> torch.Tensor:
    """The spec's pattern L[n,r,c,j] = 0.5 sin(0.3r + 0.7c + 1.1j + 0.5n) + 4 [j = 0], as [N, w*w, 77]."""
    n, r, c, j = torch.meshgrid(*(torch.arange(s, dtype=torch.float64) for s in (N, w, w, 77)), indexing="ij")
    return (0.5 * torch.sin(0.3 * r + 0.7 * c + 1.1 * j + 0.5 * n) + 4.0 * (j == 0)).reshape(N, w * w, 77)


def spec_loss(z, tokens, w, value):
    G = rr.released_basis(w, w)
    theta = torch.full((z.shape[0], G.shape[0], len(tokens)), float(value), dtype=torch.float64)
    return rr.regulation_loss(z, tokens, theta, G)


# ------------------------------------------------------------------------------ spec check values

def test_check_value_a_uniform_attention():
    expected = (1 / 77 - 0.9) ** 2 + 80 * (1 / 77 - 0.2) ** 2
    for N, w in ((1, 16), (3, 24)):
        loss = spec_loss(torch.zeros(N, w * w, 77, dtype=torch.float64), [2, 5], w, 0.0).loss
        assert loss.item() == pytest.approx(expected, abs=1e-12)
        assert loss.item() == pytest.approx(3.5847006, abs=5e-8)


@pytest.mark.parametrize("theta,expected", [(0.0, 3.74296642), (0.5, 3.54585454), (2.0, 1.82318898)])
def test_check_value_b(theta, expected):
    parts = spec_loss(spec_logits(2, 16), [2, 5], 16, theta)
    assert parts.loss.item() == pytest.approx(expected, abs=5e-9)
    if theta == 0.5:
        assert parts.l_q.item() == pytest.approx(0.76702198, abs=5e-9)
        assert parts.l_m.item() == pytest.approx(0.03445416, abs=5e-9)
        assert parts.l_theta.item() == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("tokens,expected", [((2, 5, 7), 3.64216753), ((1, 2, 3, 4, 5, 6), 2.72533888)])
def test_check_value_c(tokens, expected):
    assert spec_loss(spec_logits(1, 32), list(tokens), 32, 0.3).loss.item() == pytest.approx(expected, abs=5e-9)


# ------------------------------------------------------------------------------ invariants

@pytest.mark.parametrize("w,K", [(16, 49), (32, 49), (48, 49), (64, 49), (96, 49), (24, 121), (8, 9)])
def test_basis_size_and_flat_order(w, K):
    G = rr.released_basis(w, w)
    assert G.shape == (K, w * w)
    gy, gx = stattn.gaussian_basis(w, w, dtype=torch.float64)
    theta = torch.randn(2, 3, 2, gy.shape[1], gx.shape[1], dtype=torch.float64)
    S_sep = ref.score_offset(theta, gy, gx).reshape(6, w * w, 2)         # separable, ScoreOffset layout
    S_flat = torch.einsum("km,nkt->nmt", G, rr.to_flat(theta))            # released flat layout
    torch.testing.assert_close(S_flat, S_sep, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rr.from_flat(rr.to_flat(theta), 2, 3, gy.shape[1], gx.shape[1]), theta)


def test_flat_order_is_x_outer():
    G = rr.released_basis(16, 16)                                          # sigma 1, centres 2..14
    peak = G[1].reshape(16, 16).argmax()
    assert divmod(int(peak), 16) == (4, 2)                                 # k = 1: x = 2, y = 4


def test_loss_invariant_to_constant_per_pixel():
    z = spec_logits(2, 16)
    shift = 7 * torch.randn(2, 256, 1, dtype=torch.float64)
    for theta in (0.0, 0.7):
        a, b = spec_loss(z, [2, 5], 16, theta), spec_loss(z + shift, [2, 5], 16, theta)
        torch.testing.assert_close(b.loss, a.loss, rtol=1e-12, atol=1e-12)


def _layer(B=4, H=2, h=8, w=8, D=16, N=77, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, h * w, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def test_layer_call_invariants():
    q, k, v = _layer()
    tokens, eos, grid, scale = [3, 6], 9, (8, 8), 0.25
    theta0 = rr.initial_theta(2, 2, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain, P = rr.edited_attention(q, k, v, tokens, None, grid, scale=scale)
    kw = dict(theta0=theta0, tokens=tokens, eos=eos, grid=grid, scale=scale, edit_steps=3, iters=4)
    res = rr.reference_layer_call(q, k, v, step=1, theta_prev=torch.zeros_like(theta0), **kw)
    assert torch.equal(res.out[:2], plain[:2])                              # unconditional half untouched
    assert (res.out[2:] - plain[2:]).abs().max() > 1e-3                     # conditional half edited
    Pc = res.cond_probs
    for col in (0, eos):                                                    # pinned: unedited probability
        torch.testing.assert_close(Pc[..., col], P[2:, ..., col], rtol=0, atol=0)
    assert (Pc.sum(-1) - 1).abs().max() > 1e-6                              # so rows no longer sum to 1
    # edited logits: only the target columns move
    z = rr._cond_logits(q[2:], k[2:], scale)
    ze = rr._edited_logits(z, tokens, rr.to_flat(res.theta_eff), rr.released_basis(*grid))
    other = [j for j in range(77) if j not in tokens]
    assert torch.equal(ze[..., other], z[..., other])
    assert (ze[..., tokens] - z[..., tokens]).abs().min() > 0
    late = rr.reference_layer_call(q, k, v, step=3, theta_prev=res.theta_best, **kw)
    assert torch.equal(late.out, plain) and late.theta_best is res.theta_best  # steps >= edit_steps: plain
    renorm = rr.reference_layer_call(q, k, v, step=1, theta_prev=torch.zeros_like(theta0), renormalize=True, **kw)
    torch.testing.assert_close(renorm.cond_probs.sum(-1), torch.ones_like(renorm.cond_probs[..., 0]))


def test_best_iterate_rule_and_blend():
    q, k, v = _layer(B=2)
    tokens, grid, scale = [3, 6], (8, 8), 0.25
    theta0 = rr.initial_theta(1, 2, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    qc, kc = q[1:], k[1:]
    res = rr.reference_inner_loop(qc, kc, tokens, theta0, grid, scale=scale, iters=6)
    z, G = rr._cond_logits(qc, kc, scale), rr.released_basis(*grid)
    # replay the trajectory by hand: theta_{i+1} = theta_i - lr * n * grad, n = 1 image * 2 heads
    theta, losses = rr.to_flat(theta0).clone(), []
    for _ in range(6):
        theta.requires_grad_(True)
        L = rr.regulation_loss(z, tokens, theta, G).loss
        (g,) = torch.autograd.grad(L, theta)
        losses.append(L.detach())
        theta = theta.detach() - 100.0 * 2 * g
    torch.testing.assert_close(res.losses, torch.stack(losses), rtol=1e-12, atol=1e-12)
    best = int(torch.stack(losses).argmin())
    assert int(res.best_iter) == best
    best_loss = rr.regulation_loss(z, tokens, rr.to_flat(res.theta_best), G).loss
    torch.testing.assert_close(best_loss, losses[best], rtol=1e-12, atol=1e-12)
    one = rr.reference_inner_loop(qc, kc, tokens, theta0, grid, scale=scale, iters=1)
    assert torch.equal(one.theta_best, theta0) and int(one.best_iter) == 0
    # blend: theta_eff = 0.99^t (0.25 prev + 0.75 best); at step 0 "prev" is theta0
    kw = dict(theta0=theta0, tokens=tokens, eos=9, grid=grid, scale=scale, iters=6)
    s0 = rr.reference_layer_call(q, k, v, step=0, theta_prev=None, **kw)
    torch.testing.assert_close(s0.theta_eff, 0.25 * theta0 + 0.75 * res.theta_best)
    prev = torch.rand_like(theta0)
    s4 = rr.reference_layer_call(q, k, v, step=4, theta_prev=prev, **kw)
    torch.testing.assert_close(s4.theta_eff, 0.99 ** 4 * (0.25 * prev + 0.75 * res.theta_best))


def test_initial_theta_is_the_released_draw():
    g = torch.Generator().manual_seed(3)
    theta = rr.initial_theta(2, 3, 2, 4, 5, generator=g)
    flat = torch.rand(6, 20, 2, generator=torch.Generator().manual_seed(3))   # torch.rand(n, K, T)
    torch.testing.assert_close(rr.to_flat(theta), flat, rtol=0, atol=0)
    assert torch.equal(rr.initial_theta(1, 1, 1, 2, 2, init="zeros"), torch.zeros(1, 1, 1, 2, 2))


def test_beta_term():
    z = spec_logits(2, 16)
    G = rr.released_basis(16, 16)
    zero = torch.zeros(2, G.shape[0], 2, dtype=torch.float64)
    assert rr.regulation_loss(z, [2, 5], zero, G, beta=0.1).l_dev.item() == 0
    theta = torch.full_like(zero, 0.5)
    a = rr.regulation_loss(z, [2, 5], theta, G)
    b = rr.regulation_loss(z, [2, 5], theta, G, beta=0.1)
    assert b.l_dev.item() > 0
    torch.testing.assert_close(b.loss, a.loss + 0.1 * b.l_dev)


# ------------------------------------------------------------------------------ token helper

def test_token_indices_words_repeats_subwords_phrases(tok):
    assert token_indices(tok, PROMPT, ["cat", "frog"]) == [5, 8]
    assert token_indices(tok, PROMPT, ["frog", "cat"]) == [8, 5]
    assert token_indices(tok, "a cat and a cat", ["cat", "cat"]) == [2, 5]      # k-th occurrence
    assert token_indices(tok, "a cat and a cat", "cat") == [2]
    assert token_indices(tok, "A Cat and a frog", ["cat"]) == [2]               # CLIP lower-cases
    split = tok("xylophone", add_special_tokens=False).input_ids
    assert len(split) > 1                                                       # a word in several tokens
    assert token_indices(tok, "a xylophone and a cat", ["xylophone", "cat"]) == \
        list(range(2, 2 + len(split))) + [4 + len(split)]
    assert token_indices(tok, "a xylophone and a cat", ["xylophone"], subtokens="first") == [2]
    assert token_indices(tok, "a photo of a red car", ["red car"]) == [5, 6]       # a phrase
    assert eos_index(tok, PROMPT) == 9 and eos_index(tok, "a cat and a cat") == 6
    assert eos_index(tok, " ".join(["cat"] * 100)) == 76                         # truncated prompt


@pytest.mark.parametrize("prompt,words,needle", [
    (PROMPT, ["dog"], "'dog' is not in the prompt"),
    ("a photo of cats", ["cat"], "'cat' is not in the prompt"),                  # whole words only
    (PROMPT, ["cat", "cat"], "more times than the 1 time"),
    ("a red car", ["red car", "car"], "more times than the 1 time"),
    (" ".join(["cat"] * 80) + " dog", ["dog"], "after truncation"),
])
def test_token_indices_rejects_missing_targets(tok, prompt, words, needle):
    with pytest.raises(ValueError, match=needle) as e:
        token_indices(tok, prompt, words)
    assert repr(prompt) in str(e.value)


def test_token_indices_bad_arguments(tok):
    with pytest.raises(ValueError, match="words"):
        token_indices(tok, PROMPT, [])
    with pytest.raises(ValueError, match="non-empty string"):
        token_indices(tok, PROMPT, ["cat", " "])
    with pytest.raises(ValueError, match="subtokens"):
        token_indices(tok, PROMPT, ["cat"], subtokens="last")
    with pytest.raises(TypeError, match="prompt"):
        token_indices(tok, ["a cat"], ["cat"])
