"""stattn.AttendAndExcite against diffusers' StableDiffusionAttendAndExcitePipeline (the specification),
and stattn.accelerate on that pipeline.

The tiny SD model (64 px, latents 8x8) has cross-attention at 8x8 and 4x4; attn_res picks one. Its random
weights spread attention evenly (losses ~0.98), so the thresholds below are set between the losses of
successive refinement iterations (spaced ~1e-3, against fp32 differences ~1e-6) to make refinement stop
early, at different counts per image, or at its cap.
"""
import inspect
import warnings

import pytest
import torch
import diffusers

import stattn
from stattn.integration import models
from stattn.integration.processors import NotAcceleratedWarning, status
from stattn.methods.attend_excite import core
from stattn.methods.attend_excite.controller import DEFAULT_THRESHOLDS
from bench.attend_excite import counting_refinements, refinements_of

AE = diffusers.StableDiffusionAttendAndExcitePipeline
PROMPT = "a photo of a cat and a frog"        # cat = 5, frog = 8


@pytest.fixture(autouse=True)
def _quiet():
    # one thread: the tiny model's ops are too small to share (conftest puts the count back)
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)       # the deprecated pipeline
        warnings.filterwarnings("ignore", message="torch.meshgrid")   # its GaussianSmoothing
        yield


def ae_pipeline(base):
    names = inspect.signature(AE.__init__).parameters
    pipe = AE(**{k: v for k, v in base.components.items() if k in names}, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny(dtype=torch.float32, scheduler=None):
    pipe = models.tiny(0, scheduler=scheduler, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_run(pipe, prompt, token_indices, *, max_refinement_steps=20, **kw):
    """The pipeline's latents and its refinements [(loop turn, iterations)] in loop order."""
    with counting_refinements(pipe, max_refinement_steps) as refinements:
        out = pipe(prompt, token_indices=token_indices, output_type="latent", **kw).images
    return out, refinements


def stattn_run(pipe, ae, prompt, **kw):
    out = pipe(prompt, output_type="latent", **kw).images
    return out, refinements_of(ae)


def noise(images, dtype=torch.float32):
    """x_T as the pipelines draw it with generator seed 0 (drawn in fp32 for every dtype)."""
    return torch.randn(images, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# name -> (prompt, AttendAndExcite kwargs, the pipeline's token_indices, call kwargs, scheduler, expected counts)
CASES = {
    # refinement at turn 0 stops after 3 iterations (losses 0.98446, 0.98321, 0.98217 vs target 0.9827)
    "one image": (PROMPT, dict(targets=["cat", "frog"], attn_res=(4, 4), thresholds={0: 0.0173}, scale_factor=2000,
                               max_iter_to_alter=4), [5, 8], {}, None, [(0, 3)]),
    # two images of one prompt, batched: 3 and 2 iterations; turn 3 refines after max_iter_to_alter (no step)
    "two images": (PROMPT, dict(targets=["cat", "frog"], attn_res=(4, 4), thresholds={0: 0.0173, 3: 0.03},
                                scale_factor=2000, max_iter_to_alter=2, max_refinement_steps=4), [5, 8],
                   dict(num_images_per_prompt=2), None, None),
    # a list of prompts with their own targets (2 and 1 tokens), maps at 8x8; cross_attention_kwargs given
    # (the pipeline's refinement forwards go without them: its first iteration is run again)
    "prompt list": (["a cat and a frog", "a photo of a dog"],
                    dict(token_indices=[[2, 5], [5]], attn_res=(8, 8), thresholds={0: 0.02}, scale_factor=2000,
                         max_iter_to_alter=4), [[2, 5], [5]], dict(cross_attention_kwargs={"scale": 1.0}), None,
                    [(0, 2), (0, 3)]),
    # Euler (the pipeline's maps forward takes the latents unscaled), no guidance, refinement at its cap
    "euler, cap": (PROMPT, dict(targets=["frog"], attn_res=(4, 4), thresholds={0: 0.05}, max_iter_to_alter=4,
                                max_refinement_steps=3), [8], dict(guidance_scale=1.0), "EulerDiscreteScheduler",
                   [(0, 3)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_latents_as_the_pipeline(name):
    prompt, settings, indices, kw, scheduler, expected = CASES[name]
    images = (1 if isinstance(prompt, str) else len(prompt)) * kw.get("num_images_per_prompt", 1)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        kw = dict(num_inference_steps=3, latents=noise(images, dtype), **CASES[name][3])
        base = tiny(dtype, scheduler)
        stock = ae_pipeline(base)
        s = stock_run(stock, prompt, indices, max_iter_to_alter=settings["max_iter_to_alter"],
                      thresholds=settings["thresholds"], scale_factor=settings.get("scale_factor", 20),
                      attn_res=settings["attn_res"], max_refinement_steps=settings.get("max_refinement_steps", 20),
                      **kw)
        ae = stattn.AttendAndExcite(**settings)
        ae.apply(base, prompt=prompt if isinstance(prompt, str) else None)
        runs[dtype] = s, stattn_run(base, ae, prompt, **kw)
    (s32, c_s32), (m32, c_m32) = runs[torch.float32]
    (s64, c_s64), (m64, c_m64) = runs[torch.float64]
    assert c_m32 == c_s32 == c_s64 == c_m64, (c_m32, c_s32, c_s64, c_m64)
    if expected is not None:
        assert c_s32 == expected
    assert any(n for _, n in c_s32)
    # fp64: the same computation (its rounding ~1e-16 grows through <= 10 UNet-gradient steps)
    assert rel(m64, s64) <= 1e-10, rel(m64, s64)
    # fp32: as far from the fp64 result as the pipeline's own fp32 run is (other summation orders)
    e = rel(s32, s64)
    assert rel(m32, s64) <= 4 * e + 1e-6, (rel(m32, s64), e)


def test_two_images_refine_independently():
    """Batched refinement keeps each image's own count (the loop of the pipeline is per image)."""
    prompt, settings, indices, kw, scheduler, _ = CASES["two images"]
    base = tiny()
    ae = stattn.AttendAndExcite(**settings)
    ae.apply(base, prompt=prompt)
    stattn_run(base, ae, prompt, num_inference_steps=3, latents=noise(2), **kw)
    assert ae.refinement_iterations[0] == [3, 2]
    assert sorted(ae.losses) == [0, 1]        # the updates of turns 0 and 1 only (max_iter_to_alter=2)


def test_loss_equals_the_pipeline_functions():
    """core on a batch with per-image targets = the pipeline's per-image functions (values and
    gradients), fp64."""
    torch.manual_seed(0)
    B, r, N = 3, (4, 5), 77
    probs = torch.softmax(torch.randn(B, r[0] * r[1], N, dtype=torch.float64) * 3, -1).requires_grad_()
    rows = [[2, 5], [7], [1, 75]]
    K = 2
    targets = torch.tensor([t + t[:1] * (K - len(t)) for t in rows])
    valid = torch.tensor([[j < len(t) for j in range(K)] for t in rows])
    maxima = core.max_attention_per_token(probs[..., 1:-1], r, targets)
    ours = core.losses(maxima, valid)
    g_ours = torch.autograd.grad(ours.sum(), probs)[0]
    theirs = []
    for b, t in enumerate(rows):
        maps = probs[b].reshape(*r, N).clone()        # the pipeline scales a view of its maps in place
        m = AE._compute_max_attention_per_index(maps, t)
        theirs.append(AE._compute_loss(m))
        for k, j in enumerate(t):
            assert torch.allclose(maxima[b, k], m[k], rtol=1e-12, atol=0)
    g_theirs = torch.autograd.grad(sum(theirs), probs)[0]
    assert torch.allclose(ours, torch.stack(theirs), rtol=1e-12, atol=0)
    assert torch.allclose(g_ours, g_theirs, rtol=1e-10, atol=1e-14)


def test_smoothing_kernel_is_the_pipelines():
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite \
        import GaussianSmoothing

    theirs = GaussianSmoothing().weight
    ours = core.smoothing_kernel()
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    # sigma = 0.5 as written acts as 1/sqrt(2): the neighbour / centre weight is e^-1
    assert abs((ours[0, 0, 0, 1] / ours[0, 0, 1, 1]).item() - torch.e ** -1) < 1e-6


def test_aggregate_weights_layers_by_heads():
    a, b = torch.rand(1, 4, 3), torch.rand(1, 4, 3)
    got = core.aggregate([a, b], [2, 6])
    assert torch.allclose(got, (2 * a + 6 * b) / 8)


def test_defaults_are_the_pipelines():
    ae = stattn.AttendAndExcite(targets=["cat"])
    call = inspect.signature(AE.__call__).parameters
    refine = inspect.signature(AE._perform_iterative_refinement_step).parameters
    assert ae.max_iter_to_alter == call["max_iter_to_alter"].default
    assert ae.thresholds == call["thresholds"].default == DEFAULT_THRESHOLDS
    assert ae.scale_factor == call["scale_factor"].default
    assert ae.attn_res == call["attn_res"].default
    assert ae.max_refinement_steps == refine["max_refinement_steps"].default
    assert core.step_sizes(20, 3) == pytest.approx([20.0, 20 * 0.75 ** 0.5, 20 * 0.5 ** 0.5], rel=1e-15)


def test_maps_come_from_the_fused_op_and_stop_early(monkeypatch):
    """The loss reads maps from region_attention(return_probs=...) at the attn_res layers only; a maps
    forward after the first stops at the last of them; the guided forward has no maps."""
    from stattn.methods.attend_excite import controller

    calls = []
    real = controller.region_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], q.requires_grad, kw.get("return_probs")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(controller, "region_attention", spy)
    base = tiny()
    ae = stattn.AttendAndExcite(targets=["cat", "frog"], attn_res=(4, 4), thresholds={}, max_iter_to_alter=2)
    ae.apply(base, prompt=PROMPT)
    before = status(base).fused_calls
    base(PROMPT, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    # 6 layers at 4x4 (down_blocks.1 x2, mid, up_blocks.0 x3), maps of the 75 text columns 1..75
    assert calls and all(M == 16 and g and cols == tuple(range(1, 76)) for M, g, cols in calls)
    assert len(calls) == 2 * 6                 # turns 0 and 1 (PNDM's 3 turns: the last not altered)
    layers = 11                                # every cross-attention layer of the tiny UNet
    first = layers                             # turn 0: the whole UNet (counting the map layers)
    second = 2 + 2 + 1 + 3                     # turn 1: down_blocks.0 x2, down_blocks.1 x2, mid, up_blocks.0 x3
    guided = 3 * layers
    assert status(base).fused_calls - before == first + second + guided


def test_accelerate_runs_the_stock_pipeline_through_stattn():
    """accelerate(ae_pipe): the pipeline's own loop, its cross-attention fused (store fed from the op's
    maps), SDPA on self-attention, same latents as stock; restore puts everything back."""
    base = tiny()
    pipe = ae_pipeline(base)
    kw = dict(attn_res=(4, 4), thresholds={0: 0.0173}, scale_factor=2000, max_iter_to_alter=4, num_inference_steps=3,
              latents=noise(1))
    stock, c_stock = stock_run(pipe, PROMPT, [5, 8], **kw)
    before = dict(pipe.unet.attn_processors)
    stattn.accelerate(pipe)
    seen = set()           # the processors of the maps forwards (after accelerate's watcher has run)
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a: seen.update(type(p).__name__ for p in m.attn_processors.values()) if torch.is_grad_enabled()
        else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NotAcceleratedWarning)
        got, c_got = stock_run(pipe, PROMPT, [5, 8], **kw)
    hook.remove()
    st = status(pipe)
    assert not [w for w in caught if issubclass(w.category, NotAcceleratedWarning)]
    assert c_got == c_stock == [(0, 3)]
    assert rel(got, stock) <= 1e-5, rel(got, stock)
    assert seen == {"StattnAttendExciteProcessor", "SelfAttendExcite"}
    assert st.fused_calls > 0 and not st.left
    stattn.restore(pipe)
    after = pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert "register_attention_control" not in vars(pipe)


def test_remove_gives_back_the_pipeline():
    base = tiny()
    cls = type(base)
    ae = stattn.AttendAndExcite(targets=["cat"], attn_res=(4, 4))
    assert ae.apply(base, prompt=PROMPT) is base
    assert type(base) is not cls and type(base).__name__ == cls.__name__ and isinstance(base, cls)
    ae.remove(base)
    assert type(base) is cls and status(base) is None
    kw = dict(num_inference_steps=2, output_type="latent")
    a = base(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    b = models.tiny(0)(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    assert rel(a, b) <= 1e-6          # the stock call (Attend-and-Excite's updates would move them by O(1))


def test_restored_elsewhere_is_an_error():
    base = tiny()
    stattn.AttendAndExcite(targets=["cat"], attn_res=(4, 4)).apply(base, prompt=PROMPT)
    stattn.restore(base)
    with pytest.raises(ValueError, match="no longer installed"):
        base(PROMPT, num_inference_steps=1)


def test_prompt_embeds_must_be_the_applied_prompts():
    base = tiny()
    ae = stattn.AttendAndExcite(targets=["cat"], attn_res=(4, 4), max_iter_to_alter=1, thresholds={})
    ae.apply(base, prompt=PROMPT)
    good = base.encode_prompt(PROMPT, "cpu", 1, False)[0]
    other = base.encode_prompt("a photo of a cat", "cpu", 1, False)[0]
    kw = dict(num_inference_steps=1, output_type="latent", guidance_scale=1.0)
    a = base(prompt_embeds=good, generator=torch.Generator().manual_seed(0), **kw).images
    b = base(PROMPT, generator=torch.Generator().manual_seed(0), **kw).images
    assert rel(a, b) <= 1e-6
    with pytest.raises(ValueError, match="prompt_embeds"):
        base(prompt_embeds=other, **kw)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(), ValueError, "exactly one"),
    (dict(targets=["cat"], token_indices=[5]), ValueError, "exactly one"),
    (dict(targets=[""]), ValueError, "targets"),
    (dict(token_indices=[0]), ValueError, "start token"),
    (dict(token_indices="5"), TypeError, "token_indices"),
    (dict(targets=["cat"], thresholds=[0.5]), TypeError, "thresholds"),
    (dict(targets=["cat"], thresholds={0: 1.5}), ValueError, "thresholds"),
    (dict(targets=["cat"], thresholds={-1: 0.5}), ValueError, "thresholds"),
    (dict(targets=["cat"], scale_factor=0), ValueError, "scale_factor"),
    (dict(targets=["cat"], attn_res=(16,)), ValueError, "attn_res"),
    (dict(targets=["cat"], max_iter_to_alter=-1), ValueError, "max_iter_to_alter"),
    (dict(targets=["cat"], max_refinement_steps=0), ValueError, "max_refinement_steps"),
    (dict(targets=["cat"], subtokens="last"), ValueError, "subtokens"),
])
def test_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        stattn.AttendAndExcite(**kwargs)


def test_bad_apply():
    base = tiny()
    with pytest.raises(ValueError, match="prompt"):
        stattn.AttendAndExcite(targets=["cat"]).apply(base)
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        stattn.AttendAndExcite(targets=["dog"]).apply(base, prompt=PROMPT)
    with pytest.raises(ValueError, match="token_indices"):
        stattn.AttendAndExcite(token_indices=[76]).apply(base)
    with pytest.raises(TypeError, match="pipe"):
        stattn.AttendAndExcite(targets=["cat"]).apply(base.unet, prompt=PROMPT)
    with pytest.raises(TypeError, match="added conditioning"):
        stattn.AttendAndExcite(targets=["cat"]).apply(models.tiny(0, "sdxl"), prompt=PROMPT)
    assert status(base) is None and type(base).__call__ is diffusers.StableDiffusionPipeline.__call__


def test_bad_calls():
    base = tiny()
    ae = stattn.AttendAndExcite(token_indices=[[5], [2]], attn_res=(16, 16))
    ae.apply(base)
    with pytest.raises(ValueError, match="attn_res"):
        base(["a photo of a cat", "a cat"], num_inference_steps=1)
    with pytest.raises(ValueError, match="2 lists of indices but the call has 1"):
        base(PROMPT, num_inference_steps=1)
    with pytest.raises(TypeError, match="an AttendAndExcite setting"):
        base(PROMPT, max_iter_to_alter=3)
    with pytest.raises(TypeError, match="does not take"):
        base(PROMPT, callback_on_step_end=print)
    with pytest.raises(ValueError, match="callback_steps"):
        base(["a", "b"], callback_steps=0)
    with pytest.raises(ValueError, match="divisible by 8"):
        base(["a", "b"], height=60)
    ae.remove(base)
    stattn.AttendAndExcite(targets=["frog"], attn_res=(4, 4)).apply(base, prompt=PROMPT)
    with pytest.raises(ValueError, match="'frog' is not in the prompt"):
        base("a photo of a cat", num_inference_steps=1)
