"""Spatial-temporal attention control: the spec's toy combination in both modes, gradients against
finite differences, the invariants (c = 0 is plain SD, affine in c_i, identical objects, E_i = E_D),
per-step weights picked on the device, end-to-end tiny runs (stock pipeline and Runner, several
schedulers, batches, SD / SD 2 / SDXL), caching, and bad input."""
import pytest
import torch

import stattn
from stattn.integration import models
from stattn import reference as ref
from stattn.integration.control import CrossAttentionCall, Generation
from stattn.methods.spacetime.layout import Box, Centre, Layout
from stattn.methods.spacetime.controller import SpatialTemporal, combine, region_kv

from helpers import TOL, rel_err

PROMPT = "a photo of a cat and a frog"
MODES = ("same_branch", "uncond_ref")


# ------------------------------------------------------------------------------ the spec's toy case

def toy(c=2.5, m=1.0):
    """1 head, d = 2, 2 keys, one pixel; rows [uncond, cond]; float64 leaves."""
    d = dict(dtype=torch.float64)
    q = torch.tensor([[0.5, 1.0], [1.0, 0.5]], **d).view(2, 1, 1, 2).requires_grad_(True)
    k = torch.stack([torch.tensor([[0.0, 1.0], [1.0, 0.0]], **d), torch.eye(2, **d)]).view(2, 1, 1, 2, 2)
    v = torch.stack([torch.tensor([[2.0, 0.0], [0.0, 2.0]], **d), torch.eye(2, **d)]).view(2, 1, 1, 2, 2)
    k_obj = torch.tensor([[0.0, 1.0], [2.0, 0.0]], **d).view(1, 1, 1, 2, 2)
    v_obj = torch.tensor([[0.0, 0.0], [4.0, 4.0]], **d).view(1, 1, 1, 2, 2)
    cw = torch.tensor([c], **d).requires_grad_(True)
    masks = torch.tensor([[m]], **d)
    return q, k, v, k_obj, v_obj, masks, cw


def run_toy(mode, c=2.5, m=1.0):
    q, k, v, k_obj, v_obj, masks, cw = toy(c, m)
    kc, vc = region_kv(k, v, k_obj, v_obj, 1)
    out = combine(q, k, v, kc, vc, masks, cw, mode=mode, cond_start=1, scale=1.0)
    return out, q, cw


O_D = (0.622459, 0.377541)
O_U = (1.244919, 0.755081)


@pytest.mark.parametrize("mode,expected", [("uncond_ref", (5.685907, 6.665582)), ("same_branch", (7.242056, 7.609434))])
def test_toy_combination(mode, expected):
    out, _, _ = run_toy(mode)
    assert out[1].flatten().tolist() == pytest.approx(expected, abs=2e-6)
    assert out[0].flatten().tolist() == pytest.approx(O_U, abs=2e-6)          # the uncond row is untouched
    out0, _, _ = run_toy(mode, m=0.0)
    assert out0[1].flatten().tolist() == pytest.approx(O_D, abs=2e-6)         # outside the region: O_D
    # O_i = (3.270298, 3.270298): c = 1 in same_branch replaces O_D by O_i
    if mode == "same_branch":
        assert run_toy(mode, c=1.0)[0][1].flatten().tolist() == pytest.approx((3.270298, 3.270298), abs=2e-6)


@pytest.mark.parametrize("mode", MODES)
def test_toy_gradients_match_finite_differences(mode):
    g = torch.tensor([0.7, -1.3, 0.4, 2.1], dtype=torch.float64).view(2, 1, 1, 2)   # dL/dout
    out, q, cw = run_toy(mode)
    dq, dc = torch.autograd.grad((out * g).sum(), [q, cw])
    eps = 1e-6

    def loss(qv, cv):
        q0, k, v, k_obj, v_obj, masks, _ = toy()
        kc, vc = region_kv(k, v, k_obj, v_obj, 1)
        return (combine(qv, k, v, kc, vc, masks, cv, mode=mode, cond_start=1, scale=1.0) * g).sum().item()

    q0 = q.detach()
    c0 = cw.detach()
    fd_c = (loss(q0, c0 + eps) - loss(q0, c0 - eps)) / (2 * eps)
    assert dc.item() == pytest.approx(fd_c, rel=1e-6, abs=1e-8)
    fd_q = torch.zeros_like(q0)
    for i in range(q0.numel()):
        e = torch.zeros_like(q0).view(-1)
        e[i] = eps
        e = e.view_as(q0)
        fd_q.view(-1)[i] = (loss(q0 + e, c0) - loss(q0 - e, c0)) / (2 * eps)
    assert torch.allclose(dq, fd_q, rtol=1e-6, atol=1e-8)
    # a loss on the cond row alone reaches the uncond row's query only through uncond_ref's cross-row term
    out, q, _ = run_toy(mode)
    dq_cond_only, = torch.autograd.grad((out[1] * g[1]).sum(), [q])
    assert (dq_cond_only[0].abs().sum() > 0) == (mode == "uncond_ref")


# ------------------------------------------------------------------------------ invariants

def random_layer(B=4, H=2, M=12, D=8, N=7, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64, generator=g)
    q = torch.randn(B, H, M, D, **d)
    k, v = torch.randn(B, 1, H, N, D, **d), torch.randn(B, 1, H, N, D, **d)
    k_obj, v_obj = torch.randn(1, n, H, N, D, **d), torch.randn(1, n, H, N, D, **d)
    masks = (torch.rand(n, M, generator=g) > 0.4).double()
    return q, k, v, k_obj, v_obj, masks


def layer(mode, c, q, k, v, k_obj, v_obj, masks, c0=2):
    kc, vc = region_kv(k, v, k_obj, v_obj, c0)
    return combine(q, k, v, kc, vc, masks, torch.as_tensor(c, dtype=torch.float64), mode=mode, cond_start=c0)


def plain(q, k, v):
    return ref.region_attention(q, k, v, torch.ones(q.shape[0], 1, q.shape[2], dtype=q.dtype),
                                torch.ones(q.shape[0], 1, dtype=q.dtype))


@pytest.mark.parametrize("mode", MODES)
def test_zero_weights_is_plain_attention(mode):
    q, k, v, k_obj, v_obj, masks = random_layer()
    out = layer(mode, [0.0, 0.0], q, k, v, k_obj, v_obj, masks)
    assert torch.allclose(out, plain(q, k, v), atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_affine_in_each_weight(mode):
    q, k, v, k_obj, v_obj, masks = random_layer(seed=1)
    f = lambda c0, c1: layer(mode, [c0, c1], q, k, v, k_obj, v_obj, masks)  # noqa: E731
    base, one = f(0.3, 0.7), f(1.3, 0.7)
    assert torch.allclose(f(-2.2, 0.7), base + (-2.5) * (one - base), atol=1e-10)
    assert not torch.allclose(one, base)
    base, one = f(0.3, 0.7), f(0.3, 1.7)
    assert torch.allclose(f(0.3, 3.7), base + 3.0 * (one - base), atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_identical_objects_at_half_weight_equal_one(mode):
    q, k, v, k_obj, v_obj, masks = random_layer(n=1, seed=2)
    one = layer(mode, [2.0], q, k, v, k_obj, v_obj, masks)
    two = layer(mode, [1.0, 1.0], q, k, v, k_obj.repeat(1, 2, 1, 1, 1), v_obj.repeat(1, 2, 1, 1, 1),
                masks.repeat(2, 1))
    assert torch.allclose(one, two, atol=1e-12)


def test_same_branch_with_the_prompt_as_object_ignores_weights():
    q, k, v, _, _, masks = random_layer(n=1, seed=3)
    k_obj, v_obj = k[2:3], v[2:3]          # E_i = E_D (the cond rows' prompt, batch of one image here)
    q, k, v = q[1:3], k[1:3], v[1:3]
    outs = [layer("same_branch", [c], q, k, v, k_obj, v_obj, masks, c0=1) for c in (0.0, 0.8, 5.0)]
    for o in outs[1:]:
        assert torch.allclose(o, outs[0], atol=1e-12)


def test_no_guidance_rows_are_all_conditional():
    q, k, v, k_obj, v_obj, masks = random_layer(B=3, seed=4)
    out = layer("same_branch", [0.6, 1.2], q, k, v, k_obj, v_obj, masks, c0=0)
    for b in range(3):     # row b alone gives the same
        ob = layer("same_branch", [0.6, 1.2], q[b:b + 1], k[b:b + 1], v[b:b + 1], k_obj, v_obj, masks, c0=0)
        assert torch.allclose(out[b:b + 1], ob, atol=1e-12)
    with pytest.raises(ValueError, match="uncond_ref.*classifier-free"):
        layer("uncond_ref", [0.6, 1.2], q, k, v, k_obj, v_obj, masks, c0=0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_combination_through_the_kernels_matches_fp64(mode, device, triton_backend, poisoned, monkeypatch):
    """The Triton kernels (the interpreter on a CPU) in fp32: output, dq (both rows) and dc against
    the fp64 reference path (NaN-poisoned kernel outputs)."""
    q, k, v, k_obj, v_obj, masks = random_layer(M=20, D=16, N=77, seed=5)
    c = torch.tensor([1.5, 0.7], dtype=torch.float64)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def run(dtype):
        qq = q.to(device, dtype).requires_grad_(True)
        cc = c.to(device, dtype if dtype == torch.float64 else torch.float32).requires_grad_(True)
        kk, vv = k.to(device, dtype), v.to(device, dtype)
        kc, vc = region_kv(kk, vv, k_obj.to(device, dtype), v_obj.to(device, dtype), 2)
        out = combine(qq, kk, vv, kc, vc, masks.to(device, dtype), cc, mode=mode, cond_start=2)
        return (out, *torch.autograd.grad((out * g.to(device, dtype)).sum(), [qq, cc]))

    got = run(torch.float32)
    monkeypatch.setenv("STATTN_BACKEND", "reference")
    expected = run(torch.float64)
    for a, b in zip(got, expected):
        assert rel_err(a, b) < 2.5 * TOL[(torch.device(device).type, torch.float32)]


# ------------------------------------------------------------------------------ per-step weights

def test_step_weights_read_on_the_device_from_step_tensor(pipe):
    W = torch.arange(12, dtype=torch.float32).view(2, 6)
    st = SpatialTemporal(["cat", "frog"], weights=W)
    st.apply(pipe, prompt=PROMPT)

    def picked(s):
        call = CrossAttentionCall("x", None, None, None, None, None, (1, 1), step=-1, timestep=None, scale=1.0,
                                  step_tensor=torch.tensor(s))
        return st.step_weights(call).tolist()               # from step_tensor, not call.step

    assert [picked(s) for s in (0, 3, 5)] == [W[:, s].tolist() for s in (0, 3, 5)]
    cols = st._cols
    pipe.scheduler.set_timesteps(6)                         # PNDM: 7 evaluations, the 2nd timestep twice
    assert len(pipe.scheduler.timesteps) == 7
    st.begin_generation(Generation(steps=7, timesteps=pipe.scheduler.timesteps))
    assert st._cols is cols                                 # refilled in place (CUDA-graph safe)
    assert [picked(e) for e in range(7)] == [W[:, s].tolist() for s in (0, 1, 1, 2, 3, 4, 5)]
    st.remove(pipe)
    st = SpatialTemporal(["cat", "frog"], weights=torch.tensor([0.5, 1.5]))
    st.apply(pipe, prompt=PROMPT)
    assert picked(4) == [0.5, 1.5]
    st.remove(pipe)


# ------------------------------------------------------------------------------ pipelines

@pytest.fixture(scope="module")
def pipe():
    return models.tiny(0)


def images(p, prompt=PROMPT, steps=3, n=1, seed=0, **kw):
    gen = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return p(prompt, num_inference_steps=steps, num_images_per_prompt=n, generator=gen, output_type="np",
             **kw).images


@pytest.mark.parametrize("kind,mode", [("sd", "same_branch"), ("sd", "uncond_ref"), ("sd2", "same_branch"),
                                       ("sdxl", "uncond_ref")])
def test_zero_weights_reproduce_the_stock_pipeline(kind, mode):
    p = models.tiny(0, kind)
    expected = images(p, n=2)
    SpatialTemporal(mode=mode, weights=0.0).apply(p, prompt=PROMPT)
    try:
        got = images(p, n=2)
    finally:
        stattn.restore(p)
    assert abs(got - expected).max() < 1e-4
    # and the control does change a run
    SpatialTemporal(mode=mode).apply(p, prompt=PROMPT)
    try:
        assert abs(images(p, n=2) - expected).max() > 1e-3
    finally:
        stattn.restore(p)


@pytest.mark.parametrize("mode", MODES)
def test_runner_and_stock_pipeline_agree_any_scheduler(mode):
    p = models.tiny(0, scheduler="EulerAncestralDiscreteScheduler")
    runner = stattn.Runner(p)
    st = SpatialTemporal(mode=mode)
    st.apply(runner, prompt=PROMPT)
    r = runner(PROMPT, steps=4, num_images=2, generator=[torch.Generator().manual_seed(i) for i in range(2)],
               output_type="np").images
    st.apply(p, prompt=PROMPT)
    s = images(p, steps=4, n=2)
    st.remove(p)
    assert abs(r - s).max() < 1e-4
    assert abs(r[0] - r[1]).max() > 1e-3            # two images, two seeds


def test_local_descriptions_encoded_once_and_kv_projected_once_per_layer(pipe, monkeypatch):
    from stattn.methods.spacetime import controller as spacetime

    projected, encoded = [], []
    real_project, real_encode = spacetime.project_kv, pipe.encode_prompt
    monkeypatch.setattr(spacetime, "project_kv", lambda attn, ctx: projected.append(attn) or real_project(attn, ctx))
    st = SpatialTemporal(["cat", "frog"])
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: encoded.append(k.get("prompt")) or real_encode(*a, **k))
    st.apply(pipe, prompt=PROMPT)
    assert encoded == [["a photo of a cat", "a photo of a frog"]]
    monkeypatch.setattr(pipe, "encode_prompt", real_encode)
    images(pipe, steps=4)
    layers = [m for _, m in pipe.unet.named_modules() if getattr(m, "is_cross_attention", False)]
    assert len(projected) == len(layers) and set(map(id, projected)) == set(map(id, layers))
    kv = st._kv[next(iter(st._kv))]
    assert kv["kc"].shape[1] == 3                    # prompt + 2 objects, for the cond rows
    st.remove(pipe)


def test_per_step_weights_and_layout_forms(pipe):
    steps = 3
    W = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    plain_img = images(pipe, steps=steps)
    for layout in ([(0.25, 0.5), (0.75, 0.5)], [(0.0, 0.2, 0.5, 0.8), (0.5, 0.2, 1.0, 0.8)],
                   "a cat [0, 100, 256, 300]\na frog [256, 100, 256, 300]",
                   {"cat": (0.25, 0.5), "frog": torch.ones(16, 16)}):
        st = SpatialTemporal(["cat", "frog"], layout=layout, weights=W)
        st.apply(pipe, prompt=PROMPT)
        assert [p.text for p in st.phrases] == ["a cat", "a frog"]
        assert abs(images(pipe, steps=steps) - plain_img).max() < 1e-4     # W = 0 at every step
        st.remove(pipe)
    W[:, 1] = 2.5                                                           # control at the middle step only
    st = SpatialTemporal(["cat", "frog"], layout=[(0.25, 0.5), (0.75, 0.5)], weights=W)
    st.apply(pipe, prompt=PROMPT)
    last = images(pipe, steps=steps)
    st.remove(pipe)
    assert abs(last - plain_img).max() > 1e-4
    m = st.layout_used.masks((8, 8))
    assert torch.equal(m[0].view(8, 8).bool(), Centre(0.25, 0.5).mask(8, 8))
    # a given layout's names become the objects with objects="auto"
    st = SpatialTemporal(layout=Layout(["a red cat", "a frog"], [Box(0, 0, 0.5, 1), Box(0.5, 0, 1, 1)]))
    st.apply(pipe, prompt=PROMPT)
    assert st.descriptions == ["a photo of a red cat", "a photo of a frog"]
    st.remove(pipe)


def test_guidance_one_with_cfg_false(pipe):
    st = SpatialTemporal(cfg=False)
    st.apply(pipe, prompt=PROMPT)
    out = images(pipe, guidance_scale=1.0)
    assert out.shape == (1, 64, 64, 3)
    st.remove(pipe)
    st = SpatialTemporal()                      # guidance taken from the pipeline call: the same image
    st.apply(pipe, prompt=PROMPT)
    torch.testing.assert_close(images(pipe, guidance_scale=1.0), out, rtol=0, atol=1e-5)
    st.remove(pipe)
    st = SpatialTemporal(cfg=True)              # a contradiction is an error, not a guess
    st.apply(pipe, prompt=PROMPT)
    with pytest.raises(ValueError, match="cfg: the controller was given cfg=True, but this pipeline call runs "
                                         "without classifier-free guidance"):
        images(pipe, guidance_scale=1.0, steps=1)
    st.remove(pipe)


# ------------------------------------------------------------------------------ bad input

def test_bad_input(pipe):
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        SpatialTemporal(["cat", "dog"]).apply(pipe, prompt=PROMPT)
    with pytest.raises(ValueError, match="empty"):
        SpatialTemporal(["cat"], layout=[torch.zeros(8, 8)])
    with pytest.raises(ValueError, match="box outside|inside \\[0, 1\\]"):
        SpatialTemporal(["cat"], layout=[(0.2, 0.2, 1.3, 0.5)])
    with pytest.raises(ValueError, match="outside the 512x512 canvas"):
        SpatialTemporal(layout="a cat [300, 0, 300, 100]")
    with pytest.raises(ValueError, match="weights: expected .*\\[objects=2"):
        SpatialTemporal(["cat", "frog"], weights=torch.ones(3, 50))
    with pytest.raises(ValueError, match="weights: expected .*\\[objects=2"):      # auto: checked at apply
        SpatialTemporal(weights=torch.ones(3)).apply(pipe, prompt=PROMPT)
    with pytest.raises(ValueError, match="weights: expected"):
        SpatialTemporal(["cat"], weights=torch.ones(1, 2, 3))
    with pytest.raises(TypeError, match="weights"):
        SpatialTemporal(["cat"], weights="high")
    with pytest.raises(ValueError, match="1 regions for 2 objects"):
        SpatialTemporal(["cat", "frog"], layout=[(0.5, 0.5)]).apply(pipe, prompt=PROMPT)
    with pytest.raises(ValueError, match="no region given for objects \\['frog'\\]"):
        SpatialTemporal(["cat", "frog"], layout={"cat": (0.5, 0.5)}).apply(pipe, prompt=PROMPT)
    with pytest.raises(ValueError, match="mode"):
        SpatialTemporal(mode="paper")
    with pytest.raises(ValueError, match="uncond_ref"):
        SpatialTemporal(mode="uncond_ref", cfg=False)
    with pytest.raises(TypeError, match="one prompt string"):
        SpatialTemporal().apply(pipe, prompt=[PROMPT, PROMPT])
    with pytest.raises(ValueError, match="no object phrase"):
        SpatialTemporal().apply(pipe, prompt="on and under")
    with pytest.raises(ValueError, match="objects"):
        SpatialTemporal([])
    st = SpatialTemporal(["cat", "frog"], weights=torch.ones(2, 5))
    st.apply(pipe, prompt=PROMPT)
    try:
        with pytest.raises(ValueError, match="weights: per-step weights for 5 steps, but this run has 3 denoising "
                                             "steps \\(4 UNet evaluations\\)"):
            images(pipe, steps=3)
    finally:
        st.remove(pipe)


# ------------------------------------------------------------------------------ optimising W

def tiny_clip(dtype=torch.float32):
    return models.tiny_clip(0, dtype=dtype)


@pytest.mark.parametrize("n", [64, 512])
def test_clip_resize_is_exact_area_averaging(n):
    from stattn.methods.spacetime.controller import clip_resize

    # A[o, p] = overlap of output cell o with input pixel p, over the output cell's length
    edges_in = torch.arange(n + 1, dtype=torch.float64) / n
    edges_out = torch.arange(225, dtype=torch.float64) / 224
    lo = torch.maximum(edges_out[:-1, None], edges_in[None, :-1])
    hi = torch.minimum(edges_out[1:, None], edges_in[None, 1:])
    A = (hi - lo).clamp_min(0) * 224
    x = torch.rand(1, 3, n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(clip_resize(x), A @ x @ A.T, atol=1e-12)


def test_weight_gradients_match_finite_differences(reference_backend):
    """dL/dW through the whole sampling loop (checkpointed UNet evaluations recomputed in the
    backward at the right step, PNDM's repeated timestep sharing a column), the decoder and CLIP."""
    from stattn.integration.runner import Runner
    from stattn.methods.spacetime.controller import ClipLoss, _freeze, _unfreeze, sample_images

    pipe = models.tiny(0, dtype=torch.float64)
    st = SpatialTemporal(["cat", "frog"], weights=torch.full((2, 3), 2.5, dtype=torch.float64))
    st.apply(pipe, prompt=PROMPT)
    runner = Runner(pipe, accelerate=False)
    clip, tok = tiny_clip(torch.float64)
    frozen = _freeze([pipe.unet, pipe.vae, pipe.text_encoder, clip])
    loss_fn = ClipLoss(clip, tok, PROMPT, [p.name for p in st.phrases], st.layout_used.crops(64, 64))
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(W, **kw):
        st.W = W
        return loss_fn(sample_images(runner, PROMPT, x_T, steps=3, guidance_scale=7.5, height=64, width=64, **kw))

    def grad(**kw):
        W = torch.full((2, 3), 2.5, dtype=torch.float64, requires_grad=True)
        loss(W, **kw).backward()
        return W.grad

    try:
        g = grad()
        eps = 1e-4
        with torch.no_grad():
            for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)):
                Wp, Wm = torch.full((2, 3), 2.5, dtype=torch.float64), torch.full((2, 3), 2.5, dtype=torch.float64)
                Wp[i, j] += eps
                Wm[i, j] -= eps
                fd = (loss(Wp).item() - loss(Wm).item()) / (2 * eps)
                assert g[i, j].item() == pytest.approx(fd, rel=1e-5, abs=1e-10)
        assert torch.allclose(grad(checkpoint=False), g, rtol=1e-10, atol=1e-14)
        last = grad(grad_steps=1)                  # the last evaluation only: column 2
        assert torch.equal(last[:, :2], torch.zeros(2, 2, dtype=torch.float64))
        assert torch.allclose(last[:, 2], g[:, 2], rtol=1e-10, atol=1e-14)
    finally:
        _unfreeze(frozen)
        st.remove(pipe)


def test_optimize_short_run(pipe, reference_backend):
    st = SpatialTemporal(["cat", "frog"])
    with pytest.raises(ValueError, match="apply"):
        st.optimize(pipe, PROMPT, clip=tiny_clip(), steps=3)
    st.apply(pipe, prompt=PROMPT)
    with pytest.raises(ValueError, match="passes"):
        st.optimize(pipe, PROMPT, clip=tiny_clip(), steps=3, passes=1)
    with pytest.raises(TypeError, match="clip"):
        st.optimize(pipe, PROMPT, clip=42, steps=3)
    result = st.optimize(pipe, PROMPT, clip=tiny_clip(), steps=3, passes=3, seed=0, lr=0.05)
    assert len(result.losses) == len(result.weights) == len(result.pass_ms) == 2
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert st.W.shape == (2, 3) and not st.W.requires_grad
    assert not torch.allclose(result.weights[0], torch.full((2, 3), 2.5))      # Adam moved W
    assert torch.equal(result.weights[-1], st.W.cpu())
    assert all(p.requires_grad and p.grad is None for p in pipe.unet.parameters())
    # the final image: a normal generation from the same x_T with the optimised weights
    final = pipe(PROMPT, num_inference_steps=3, latents=result.latents, output_type="np").images
    again = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert abs(final - again).max() < 1e-6
    st.remove(pipe)


def test_layer_calls_read_no_values_back(pipe, value_reads):
    """The controller's masks and W are checked when made; the op's per-call NaN checks (a host read,
    a sync per layer on CUDA) stay off for its calls, on for a user's own combine()."""
    st = SpatialTemporal(["cat", "frog"], weights=torch.tensor([[1.0, 2.0, 0.5], [0.5, 1.0, 2.0]]))
    st.apply(pipe, prompt=PROMPT)
    try:
        images(pipe)
        assert stattn.status(pipe).fused_calls > 0 and value_reads == []
    finally:
        st.remove(pipe)
    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 1, 2, 5, 8), torch.randn(2, 1, 2, 5, 8)
    combine(q, k, v, torch.randn(1, 2, 2, 5, 8), torch.randn(1, 2, 2, 5, 8), torch.rand(1, 6), torch.ones(1),
            cond_start=1)
    assert value_reads                              # a direct call checks what it is given


def test_optimize_stops_when_adam_makes_the_weights_non_finite(pipe, reference_backend, monkeypatch):
    from stattn.methods.spacetime import controller

    st = SpatialTemporal(["cat", "frog"])
    st.apply(pipe, prompt=PROMPT)

    class NaNLoss(controller.ClipLoss):
        def __call__(self, images):
            return super().__call__(images) * float("nan")

    monkeypatch.setattr(controller, "ClipLoss", NaNLoss)
    try:
        with pytest.raises(ValueError, match=r"optimize: Adam's step made the weights W NaN or inf .*lr"):
            st.optimize(pipe, PROMPT, clip=tiny_clip(), steps=3, passes=3, seed=0)
    finally:
        st.remove(pipe)


@pytest.mark.parametrize("mode", MODES)
def test_fused_equals_the_unfused_released_structure(mode):
    """The benchmark's baseline (one SDPA call per region, combined eagerly, the cross-row term
    written out) gives the same images as the fused controller."""
    from bench.spacetime import UnfusedSpatialTemporal

    runner = stattn.Runner(models.tiny(0, scheduler="DDIMScheduler"))
    out = {}
    for cls in (SpatialTemporal, UnfusedSpatialTemporal):
        cls(["cat", "frog"], mode=mode, weights=torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, 2.5]])).apply(
            runner, prompt=PROMPT)
        out[cls] = runner(PROMPT, steps=3, num_images=2, seed=0, output_type="np").images
    assert abs(out[SpatialTemporal] - out[UnfusedSpatialTemporal]).max() < 1e-4


# ------------------------------------------------------------------ settings round trip
@pytest.mark.parametrize("layout", [
    None,
    "cat [0, 0, 256, 512]\nfrog [256, 0, 256, 512]",
    {"frog": (0.6, 0.5), "cat": Box(0.0, 0.0, 0.5, 1.0)},
    [Centre(0.25, 0.5, radius=0.3), (0.5, 0.0, 1.0, 1.0)],
])
def test_settings_rebuild_the_same_controller(layout):
    import json

    pipe = models.tiny()
    objects = "auto" if layout is None or isinstance(layout, str) else ["cat", "frog"]
    st = SpatialTemporal(objects=objects, layout=layout, weights=torch.tensor([[1.0, 2.0], [0.5, 0.25]]))
    st.apply(pipe, prompt=PROMPT)
    settings = json.loads(json.dumps(st.settings()))           # JSON-able, and exact through JSON
    again = SpatialTemporal.from_settings(settings)
    again.apply(pipe, prompt=PROMPT)
    assert again.settings() == settings and torch.equal(again.W, st.W)
    assert again.descriptions == st.descriptions
    for grid in ((8, 8), (4, 4)):
        assert torch.equal(again.layout_used.masks(grid), st.layout_used.masks(grid))
    stattn.restore(pipe)


def test_a_mask_layout_has_no_json_form():
    st = SpatialTemporal(objects=["cat"], layout=[torch.ones(4, 4)])
    with pytest.raises(TypeError, match="only Box and Centre regions have a JSON form"):
        st.settings()
