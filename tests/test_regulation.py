"""Attention Regulation: the eager reference against the spec's check values and invariants, the
fused path against the reference (inner loop, edited logits, layer output, controller state over
steps, whole pipelines), the token helper, and bad input."""
import pytest
import torch

import loop_oracle
import stattn
from stattn.integration import models
from stattn import reference as ref
from stattn.methods.regulation import reference as rr
from stattn.integration.control import CrossAttentionCall
from stattn.methods.regulation.controller import AttentionRegulation
from stattn.integration.tokens import eos_index, prompt_words, token_indices

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
    # the halves are computed on slices of the batch, which BLAS may block otherwise than the whole:
    # the same arithmetic to fp64 rounding (values O(1)), not bit for bit
    fp64 = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.out[:2], plain[:2], **fp64)             # unconditional half untouched
    assert (res.out[2:] - plain[2:]).abs().max() > 1e-3                     # conditional half edited
    Pc = res.cond_probs
    for col in (0, eos):                                                    # pinned: unedited probability
        torch.testing.assert_close(Pc[..., col], P[2:, ..., col], **fp64)
    assert (Pc.sum(-1) - 1).abs().max() > 1e-6                              # so rows no longer sum to 1
    # edited logits: only the target columns move (the others get z + sum of products with an exact 0)
    z = rr._cond_logits(q[2:], k[2:], scale)
    ze = rr._edited_logits(z, tokens, rr.to_flat(res.theta_eff), rr.released_basis(*grid))
    other = [j for j in range(77) if j not in tokens]
    assert torch.equal(ze[..., other], z[..., other])
    assert (ze[..., tokens] - z[..., tokens]).abs().min() > 0
    late = rr.reference_layer_call(q, k, v, step=3, theta_prev=res.theta_best, **kw)
    # steps >= edit_steps: plain, the same call as `plain` on the same inputs
    assert torch.equal(late.out, plain) and late.theta_best is res.theta_best
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
    ("a catfish and a frog", ["fish"], "'fish' is not in the prompt"),            # not inside a word
])
def test_token_indices_rejects_missing_targets(tok, prompt, words, needle):
    with pytest.raises(ValueError, match=needle) as e:
        token_indices(tok, prompt, words)
    assert repr(prompt) in str(e.value)


def test_word_boundaries_come_from_the_tokenizers_offsets(tok):
    """"fish" is the second token of "catfish" (cat, fish</w>): a token run alone would match it;
    the tokenizer's word_ids / offsets say it is not a word of the prompt."""
    assert tok.convert_ids_to_tokens(tok("catfish", add_special_tokens=False).input_ids)[-1] == "fish</w>"
    prompt = "A catfish, a fish and a Red-car"
    words = prompt_words(tok, prompt)
    assert [w for w, _ in words] == ["A", "catfish", ",", "a", "fish", "and", "a", "Red", "-", "car"]
    assert words[1][1] == [2, 3]                                   # its two tokens, after SOS and "a"
    assert token_indices(tok, prompt, ["fish"]) == [words[4][1][0]]
    assert token_indices(tok, prompt, ["catfish", "red-car"]) == [2, 3] + [c for _, cols in words[7:] for c in cols]
    assert prompt_words(tok, "a cat " * 60)[-1] == ("a", [75]) and len(prompt_words(tok, "a cat " * 60)) == 75


def test_token_indices_bad_arguments(tok):
    with pytest.raises(ValueError, match="words"):
        token_indices(tok, PROMPT, [])
    with pytest.raises(ValueError, match="non-empty string"):
        token_indices(tok, PROMPT, ["cat", " "])
    with pytest.raises(ValueError, match="subtokens"):
        token_indices(tok, PROMPT, ["cat"], subtokens="last")
    with pytest.raises(TypeError, match="prompt"):
        token_indices(tok, ["a cat"], ["cat"])


# ------------------------------------------------------------------------------ fused vs reference

def _inner_case(dtype, seed=0, B=2, H=2, h=8, w=8, T=2):
    q, k, _ = _layer(B=B, H=H, h=h, w=w, dtype=dtype, seed=seed)
    gy, gx = stattn.gaussian_basis(h, w, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    theta0 = rr.initial_theta(B, H, T, gy.shape[1], gx.shape[1], generator=torch.Generator().manual_seed(seed),
                              dtype=gy.dtype)
    return q, k, [3, 6, 11][:T], theta0, (gy, gx)


@pytest.mark.parametrize("dtype,backend", [(torch.float64, "reference"), (torch.float32, "reference"),
                                           (torch.float32, "triton")])
def test_inner_loop_matches_reference(dtype, backend, monkeypatch):
    """The fused loop (closed form, or the Triton kernels) and the released algorithm by autograd, each
    against the fp64 oracle (tests/loop_oracle.py): fp64 iteration by iteration over the whole loop,
    fp32 up to its first near-branch (the loop is a chaotic map: two fp32 runs need not share a
    trajectory after it) and the best-iterate rule throughout. Then the edited logits and the layer
    output at the reference's theta_best, one evaluation each."""
    from stattn.methods.regulation.core import inner_loop

    monkeypatch.setenv("STATTN_BACKEND", backend)
    iters = 20 if backend == "reference" else 8                         # the interpreter is slow
    q, k, tokens, theta0, basis = _inner_case(dtype)
    scale = 0.25
    got = inner_loop(q, k, torch.tensor(tokens), theta0, basis, scale=scale, iters=iters)
    exp = rr.reference_inner_loop(q, k, tokens, theta0, (8, 8), scale=scale, iters=iters)
    oracle = loop_oracle.oracle(q, k, tokens, theta0, basis, scale=scale, iters=iters)
    reach = [loop_oracle.assert_matches(run, oracle) for run in (got, exp)]
    assert min(reach) == iters - 1 if dtype == torch.float64 else min(reach) >= 2   # how far each was compared
    # one evaluation each, no iteration: fp64 to rounding, fp32 to a few hundred ulps of the logits
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    # the edited logits and the layer output through stattn.region_attention with the offset
    theta = exp.theta_best.to(theta0.dtype)
    off = stattn.ScoreOffset(theta, tokens, basis, pinned=(0, 9))
    z, ze = ref.region_logits(q, k[:, None], scale, off)
    z_ref = rr._cond_logits(q, k, scale)
    ze_ref = rr._edited_logits(z_ref, tokens, rr.to_flat(theta), rr.released_basis(8, 8))
    torch.testing.assert_close(ze.reshape(ze_ref.shape).double(), ze_ref.double(), **tol)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    out = stattn.region_attention(q, k[:, None], v[:, None], offset=off, scale=scale)
    out_ref, _ = rr.edited_attention(q, k, v, tokens, theta, (8, 8), scale=scale, pinned=(0, 9))
    torch.testing.assert_close(out.double(), out_ref.double(), **tol)


def test_closed_form_gradient_matches_autograd():
    from stattn.methods.regulation.core import regulation_loss

    q, k, tokens, theta0, basis = _inner_case(torch.float64, seed=3, T=3)
    z = rr._cond_logits(q, k, 0.25)
    theta = rr.to_flat(theta0).requires_grad_(True)
    L = rr.regulation_loss(z, tokens, theta, rr.released_basis(8, 8)).loss
    (auto,) = torch.autograd.grad(L, theta)
    closed = regulation_loss(z.reshape(2, 2, 64, 77), tokens, theta0, basis)
    torch.testing.assert_close(closed.loss, L.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rr.to_flat(closed.grad), auto, rtol=1e-10, atol=1e-13)


def _call(q, k, v, step, name="up_blocks.1.attentions.0.transformer_blocks.0.attn2", grid=(8, 8)):
    return CrossAttentionCall(name, None, q, k[:, None], v[:, None], None, grid, step, None, 0.25,
                              torch.tensor(step))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("cfg,dtype", [(True, torch.float64), (False, torch.float64), (True, torch.float32)])
def test_controller_over_steps_matches_reference(fused, cfg, dtype):
    """The controller's per-layer state (carried best, step-0 rule, decay, edit window) against
    the reference's layer call chained by hand, on the same θ0 draws. fp32 runs 2 iterations per call:
    the loop's fp32 trajectories are comparable only before their first near-branch, which these inputs
    reach at iteration 1 (checked against the fp64 oracle), so that both pick the same best iterate."""
    q, k, v = _layer(B=4, dtype=dtype, seed=4)
    tokens, eos, edit_steps = [3, 6], 9, 3
    iters = 6 if dtype == torch.float64 else 2
    ctrl = AttentionRegulation(token_indices=tokens, eos_index=eos, edit_steps=edit_steps, iters=iters, fused=fused,
                               cfg=cfg, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    Bc = 2 if cfg else 4
    prev = None
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for step in range(5):
        qs, ks, vs = (t * (1 + 0.1 * step) for t in (q, k, v))               # a different input each step
        out = ctrl.attention(_call(qs, ks, vs, step))
        theta0 = None
        if step < edit_steps:
            theta0 = rr.initial_theta(Bc, 2, 2, 3, 3, generator=gen, dtype=torch.float64 if dtype == torch.float64
                                      else torch.float32)
            if dtype == torch.float32:
                oracle = loop_oracle.oracle(qs[4 - Bc:], ks[4 - Bc:], tokens, theta0, stattn.gaussian_basis(8, 8),
                                            scale=0.25, iters=iters)
                assert loop_oracle.prefix(oracle, dtype) == iters - 1
        exp = rr.reference_layer_call(qs, ks, vs, step=step, theta0=theta0, theta_prev=prev, tokens=tokens,
                                      eos=eos, grid=(8, 8), scale=0.25, cfg=cfg, edit_steps=edit_steps, iters=iters)
        prev = exp.theta_best
        plain = stattn.region_attention(qs, ks[:, None], vs[:, None], scale=0.25)
        if out is None:                                                     # plain attention, fused path
            assert fused and step >= edit_steps
            out = plain
        torch.testing.assert_close(out.double(), exp.out.double(), **tol)
        if cfg:
            torch.testing.assert_close(out[:2], plain[:2], **tol)           # the uncond half is not edited
        if step < edit_steps:
            assert (out[4 - Bc:] - plain[4 - Bc:]).abs().max() > 1e-4
    # another layer is not selected
    assert ctrl.attention(_call(q, k, v, 0, name="down_blocks.1.attentions.0.transformer_blocks.0.attn2")) is None


def test_controller_renormalize_matches_reference():
    q, k, v = _layer(B=2, dtype=torch.float64, seed=8)
    outs = []
    for fused in (True, False):
        ctrl = AttentionRegulation(token_indices=[3, 6], renormalize=True, iters=5, fused=fused,
                                   generator=torch.Generator().manual_seed(2))
        outs.append(ctrl.attention(_call(q, k, v, 0)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-9, atol=1e-10)
    pinned = AttentionRegulation(token_indices=[3, 6], eos_index=9, iters=5, generator=torch.Generator().manual_seed(2))
    assert (pinned.attention(_call(q, k, v, 0)) - outs[0]).abs().max() > 1e-6


def test_fused_uncond_rows_are_plain_attention():
    """One launch for the whole batch: θ = 0 on the unconditional rows leaves their logits exactly
    as they are, so their output is plain attention up to summation order."""
    q, k, v = _layer(B=4, dtype=torch.float32, seed=5)
    ctrl = AttentionRegulation(token_indices=[3, 6], eos_index=9, iters=3)
    out = ctrl.attention(_call(q, k, v, 0))
    plain = stattn.region_attention(q, k[:, None], v[:, None], scale=0.25)
    torch.testing.assert_close(out[:2], plain[:2], rtol=1e-6, atol=1e-6)
    assert (out[2:] - plain[2:]).abs().max() > 1e-2
    st = next(iter(ctrl._states.values()))
    assert torch.equal(st.theta_full[:2], torch.zeros_like(st.theta_full[:2]))
    keys = [ctrl.graph_key(s) for s in (0, 1, 24, 25, 40)]  # step 0 seeds the carried θ: own path
    assert keys[0] != keys[1] == keys[2] and keys[3] == keys[4] and len(set(keys)) == 3


# ------------------------------------------------------------------------------ pipelines

@pytest.fixture(scope="module")
def sd():
    # fp64: the fused controller and the eager reference run the inner loop, a chaotic map, 20 times a
    # layer call; two fp32 implementations of it need not share a trajectory (see tests/loop_oracle.py),
    # two fp64 ones do, to rounding (the fp32 kernels are compared with the fp64 oracle loop by loop)
    pipe = models.tiny(seed=0, kind="sd", scheduler="DPMSolverMultistepScheduler", dtype=torch.float64)  # DPM-Solver++
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(x, ctrl, prompt=PROMPT, steps=4, size=64, seeds=(1, 2), **kw):
    ctrl.apply(x, prompt=prompt)
    try:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        if isinstance(x, stattn.Runner):
            return x(prompt, steps=steps, num_images=len(seeds), generator=gens, height=size, width=size,
                     output_type="latent", **kw).latents
        return x(prompt, num_inference_steps=steps, num_images_per_prompt=len(seeds), generator=gens,
                 height=size, width=size, output_type="latent", **kw).images
    finally:
        ctrl.remove(x)


def test_pipeline_fused_matches_reference(sd):
    """Tiny SD (fp64), DPM-Solver++, 2 images from a list of generators: the fused controller and the
    eager reference give the same latents, to fp64 rounding; the edit changes them; maps are recorded
    for every step."""
    def mk(fused):
        return AttentionRegulation(["cat", "frog"], edit_steps=3, fused=fused, record_maps=True,
                                   generator=torch.Generator().manual_seed(0))

    fused, reference = mk(True), mk(False)
    a, b = _generate(sd, fused), _generate(sd, reference)
    plain = _generate(sd, AttentionRegulation(["cat", "frog"], edit_steps=0))
    stattn.accelerate(sd)
    try:
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        no_controller = sd(PROMPT, num_inference_steps=4, num_images_per_prompt=2, generator=gens, height=64,
                           width=64, output_type="latent").images
    finally:
        stattn.restore(sd)
    # steps >= edit_steps: the controller returns None and the processor makes the very call it makes
    # without a controller (stattn.integration.processors: region_attention(q, k, v, scale)): the same bits
    assert torch.equal(plain, no_controller)
    assert (a - b).abs().max() <= 1e-9 * a.abs().max()
    assert (a - plain).abs().max() > 1e-2 * a.abs().max()
    assert fused.tokens == [5, 8] and fused.eos == 9
    assert len(fused.maps) == 4 and fused.maps[0].shape == (2, 2, 8, 8)
    for ma, mb in zip(fused.maps, reference.maps):
        torch.testing.assert_close(ma, mb, rtol=1e-9, atol=1e-12)
        assert 0 <= float(ma.min()) and float(ma.max()) <= 1


def test_runner_all_layers_and_no_cfg(sd):
    runner = stattn.Runner(sd)
    def mk(fused, **kw):
        return AttentionRegulation(["frog"], layers="all", edit_steps=2, iters=5, fused=fused, init="zeros", **kw)

    a = _generate(runner, mk(True), size=128)                               # grids 16x16 and 8x8
    b = _generate(runner, mk(False), size=128)
    assert (a - b).abs().max() <= 1e-9 * a.abs().max()
    a = _generate(runner, mk(True, cfg=False), seeds=(3,), guidance_scale=1.0)
    b = _generate(runner, mk(False, cfg=False), seeds=(3,), guidance_scale=1.0)
    assert (a - b).abs().max() <= 1e-9 * a.abs().max()


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(), ValueError, "give exactly one"),
    (dict(targets=["cat"], token_indices=[5]), ValueError, "give exactly one"),
    (dict(targets=[]), ValueError, "targets"),
    (dict(token_indices=[]), ValueError, "token_indices"),
    (dict(token_indices=[0, 3]), ValueError, "token_indices"),
    (dict(token_indices=[3, 9], eos_index=9), ValueError, "pinned"),
    (dict(targets="cat", lr="big"), TypeError, "lr"),
    (dict(targets="cat", iters=0), ValueError, "iters"),
    (dict(targets="cat", edit_steps=-1), ValueError, "edit_steps"),
    (dict(targets="cat", quantile=1.5), ValueError, "quantile"),
    (dict(targets="cat", loss_weights=(1, 80)), ValueError, "loss_weights"),
    (dict(targets="cat", init="normal"), ValueError, "init"),
    (dict(targets="cat", generator=3), TypeError, "generator"),
    (dict(targets="cat", beta=0.1), ValueError, "fused=False"),
    (dict(targets="cat", layers=[]), ValueError, "layers"),
    (dict(targets="cat", fused=1), TypeError, "fused"),
])
def test_bad_arguments(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        AttentionRegulation(**kwargs)


def test_bad_use_gives_clear_errors(sd):
    with pytest.raises(ValueError, match=r"'dog' is not in the prompt 'a photo of a cat and a frog'"):
        AttentionRegulation(["cat", "dog"]).apply(sd, prompt=PROMPT)
    with pytest.raises(ValueError, match="prompt"):
        AttentionRegulation(["cat"]).apply(sd)
    with pytest.raises(ValueError, match="tokenizer"):
        AttentionRegulation(["cat"]).apply(sd.unet, prompt=PROMPT)
    with pytest.raises(ValueError, match="matches none of this UNet's cross-attention layers"):
        AttentionRegulation(["cat"], layers="mid_blocks.7").apply(sd, prompt=PROMPT)
    with pytest.raises(ValueError, match="eos_index"):
        AttentionRegulation(token_indices=[5]).apply(sd)
    with pytest.raises(ValueError, match="edit_steps: 25 edited steps but this run has only 4"):
        _generate(sd, AttentionRegulation(["cat"]))
    with pytest.raises(ValueError, match="cfg: the controller was given cfg=True, but this pipeline call runs "
                                         "without"):                    # a contradiction is an error, not a guess
        _generate(sd, AttentionRegulation(["cat"], edit_steps=2, cfg=True), seeds=(1,), guidance_scale=1.0)
    with pytest.raises(ValueError, match="too small for the Gaussian basis"):
        _generate(sd, AttentionRegulation(["cat"], layers="all", edit_steps=2), size=32)
    ctrl = AttentionRegulation(["cat"], edit_steps=2)
    stattn.accelerate(sd, controller=ctrl)                                 # installed without apply()
    try:
        with pytest.raises(ValueError, match="not resolved"):
            sd(PROMPT, num_inference_steps=2, output_type="latent")
    finally:
        stattn.restore(sd)
    assert not hasattr(sd.unet, "_stattn")


def test_fused_state_in_place_and_step_from_step_tensor():
    """CUDA-graph readiness on the CPU: under replay Python does not run again, so the step must be
    read from call.step_tensor and the per-layer state updated in place. Feed a stale Python step
    (as a captured graph has) with the right step_tensor and compare with the reference."""
    q, k, v = _layer(B=2, dtype=torch.float64, seed=6)
    tokens, eos = [3, 6], 9
    ctrl = AttentionRegulation(token_indices=tokens, eos_index=eos, iters=4,
                               generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    prev, ptrs = None, None
    for step in range(4):
        call = _call(q, k, v, min(step, 1))                                # Python step frozen at 1
        call.step_tensor = torch.tensor(step)
        out = ctrl.attention(call)
        theta0 = rr.initial_theta(1, 2, 2, 3, 3, generator=gen, dtype=torch.float64)
        exp = rr.reference_layer_call(q, k, v, step=step, theta0=theta0, theta_prev=prev, tokens=tokens, eos=eos,
                                      grid=(8, 8), scale=0.25, iters=4)
        prev = exp.theta_best
        torch.testing.assert_close(out, exp.out, rtol=1e-9, atol=1e-10)
        st = next(iter(ctrl._states.values()))
        now = (st.theta_prev.data_ptr(), st.theta_full.data_ptr(), st.tokens.data_ptr())
        assert ptrs is None or now == ptrs
        ptrs = now
    assert len(ctrl._states) == 1


@pytest.mark.parametrize("init", ["uniform", "zeros"])
def test_fused_layer_call_is_three_kernel_launches(init, triton_backend, monkeypatch):
    """An edited layer call after step 0: the inner loop (2 launches, θ_eff written into the
    offset) and the edited attention (1 launch); nothing else goes through the Triton launcher."""
    from stattn.kernels import launch

    q, k, v = _layer(B=4, dtype=torch.float32, seed=6)
    ctrl = AttentionRegulation(token_indices=[3, 6], eos_index=9, iters=3, init=init)
    ctrl.attention(_call(q, k, v, 0))
    names = []
    real = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda kernel, *a: (names.append(kernel.fn.__name__), real(kernel, *a)))
    ctrl.attention(_call(q, k, v, 1))
    assert names == ["_inner_loop_kernel", "_best_kernel", "_fwd_kernel"]


def test_settings_rebuild_the_same_controller():
    import json

    pipe = models.tiny()
    ar = AttentionRegulation(targets=["cat", "frog"], layers="all", edit_steps=3, iters=5, lr=50.0, init="zeros",
                             loss_weights=(1.0, 40.0, 0.1), subtokens="first")
    ar.apply(pipe, prompt=PROMPT)
    settings = json.loads(json.dumps(ar.settings()))
    assert settings["resolved"]["tokens"] == [5, 8] and settings["resolved"]["eos"] == 9
    again = AttentionRegulation.from_settings(settings)
    again.apply(pipe, prompt=PROMPT)
    assert again.settings() == settings
    stattn.restore(pipe)


class _SlowTokenizer:
    """A tokenizer without offsets (transformers 4's pure-Python CLIPTokenizer, which diffusers
    pipelines load there): the same ids, no word_ids / offset_mapping."""
    is_fast = False

    def __init__(self, fast):
        self._fast = fast

    def __call__(self, text, **kw):
        kw.pop("return_offsets_mapping", None)
        enc = self._fast(text, **kw)
        return type("Enc", (), {"input_ids": enc.input_ids})()

    def __getattr__(self, name):        # convert_ids_to_tokens, convert_tokens_to_string, eos_token_id, ...
        return getattr(self._fast, name)


def test_a_tokenizer_without_offsets_finds_the_same_words(tok):
    slow = _SlowTokenizer(tok)
    for prompt in ("A catfish, a fish and a Red-car", PROMPT, "a cat " * 60):
        fast_words = prompt_words(tok, prompt)
        slow_words = prompt_words(slow, prompt)
        assert [cols for _, cols in slow_words] == [cols for _, cols in fast_words], prompt
        assert [w.lower() for w, _ in slow_words] == [w.lower() for w, _ in fast_words], prompt
    assert token_indices(slow, "a catfish and a fish", ["fish"]) == token_indices(tok, "a catfish and a fish", ["fish"])


def test_maps_of_different_prompts_fused_equal_reference(sd):
    """Rows of different prompts put the targets at different key columns: the fused path's maps (the
    op's probability side output, all columns then each row's targets) equal the eager reference's."""
    prompts = [PROMPT, "a small frog and a cat"]

    def run(fused):
        ctrl = AttentionRegulation(["cat", "frog"], edit_steps=2, iters=4, fused=fused, record_maps=True,
                                   init="zeros")
        ctrl.apply(sd, prompt=PROMPT)
        try:
            gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
            sd(prompts, num_inference_steps=3, generator=gens, height=64, width=64, output_type="latent")
        finally:
            ctrl.remove(sd)
        return ctrl

    fused, reference = run(True), run(False)
    assert fused.rows is not None and fused.rows[0][0] != fused.rows[1][0]      # per-row columns
    assert len(fused.maps) == 3
    for ma, mb in zip(fused.maps, reference.maps):
        torch.testing.assert_close(ma, mb, rtol=1e-9, atol=1e-12)
