"""Controllers on stock diffusers pipelines count steps, rows and prompts as the pipeline does.

- the step is the denoising loop's index (the ``i`` of ``callback_on_step_end``) for every scheduler
  diffusers ships, img2img with strength < 1 included, and every pipeline call starts a generation;
- classifier-free guidance is the pipeline call's (a contradicting ``cfg=`` is an error);
- targets, objects and layout are resolved in the call's own prompts (a list of prompts gets
  per-row key columns); calls with only ``prompt_embeds`` must carry the applied prompt's;
- Attention Regulation and spatial-temporal control give the same images on a stock pipeline as
  on the Runner.
"""
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers

import stattn
from stattn.integration import models
from stattn.integration.control import Generation

PROMPT = "a photo of a cat and a frog"
OTHER = "a big frog next to a small cat"
SCHEDULERS = sorted({s.name for s in KarrasDiffusionSchedulers} | {"PNDMScheduler", "LCMScheduler"})


class Recorder(stattn.Controller):
    """Plain attention; records what a controller is told."""

    def __init__(self):
        self.generations, self.steps, self.calls = [], [], []

    def begin_generation(self, generation):
        self.generations.append(generation)
        self.steps.append([])
        self.calls.append([])

    def begin_step(self, step, timestep):
        self.steps[-1].append(step)

    def attention(self, call):
        self.calls[-1].append((call.step, call.cfg))
        return None


def _loop_indices(pipe, prompt=PROMPT, **kw):
    seen = []

    def cb(p, i, t, kwargs):
        seen.append(i)
        return {}

    pipe(prompt, callback_on_step_end=cb, output_type="latent", generator=torch.Generator().manual_seed(0), **kw)
    return seen


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_steps_are_the_loop_index_for_every_scheduler(scheduler):
    pipe = models.tiny(0, scheduler=scheduler)
    rec = Recorder()
    stattn.accelerate(pipe, controller=rec)
    for _ in range(2):                                     # each call is a new generation
        seen = _loop_indices(pipe, num_inference_steps=4)
        assert rec.steps[-1] == seen == list(range(len(seen))), scheduler
        assert len(seen) == pipe._num_timesteps == rec.generations[-1].steps
        n_layers = len({c for c in rec.calls[-1]}) and len(rec.calls[-1]) // len(seen)
        assert [s for s, _ in rec.calls[-1]] == [i for i in seen for _ in range(n_layers)]
    assert len(rec.generations) == 2
    stattn.restore(pipe)


def test_img2img_strength_counts_the_evaluations_that_run():
    base = models.tiny(0, scheduler="DDIMScheduler")
    pipe = StableDiffusionImg2ImgPipeline(**base.components)
    rec = Recorder()
    stattn.accelerate(pipe, controller=rec)
    image = torch.rand(1, 3, 64, 64)
    seen = _loop_indices(pipe, image=image, strength=0.5, num_inference_steps=8)
    assert len(seen) == 4 and rec.steps[-1] == seen == [0, 1, 2, 3]
    assert rec.generations[-1].steps == 4
    stattn.restore(pipe)
    ctrl = stattn.AttentionRegulation(["cat"], layers="all", edit_steps=5)
    ctrl.apply(pipe, prompt=PROMPT)
    with pytest.raises(ValueError, match="edit_steps: 5 edited steps but this run has only 4 UNet evaluations"):
        pipe(PROMPT, image=image, strength=0.5, num_inference_steps=8, output_type="latent")
    ctrl.remove(pipe)


def test_bare_unet_rule_and_reset():
    """Without a pipeline: a larger timestep starts a run, PNDM's repeated one does not."""
    pipe = models.tiny(0)                                  # PNDM: 5 steps = 6 evaluations, one timestep twice
    rec = Recorder()
    stattn.accelerate(pipe.unet, controller=rec)
    pipe.scheduler.set_timesteps(5)
    ts = list(pipe.scheduler.timesteps)
    assert len(ts) == 6 and ts[1] == ts[2]
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for _ in range(2):
            for t in ts:
                pipe.unet(x, t, encoder_hidden_states=ctx)
        assert rec.steps == [list(range(6))] * 2
        pipe.unet(x, ts[-1], encoder_hidden_states=ctx)   # same timestep: the run goes on ...
        assert rec.steps[-1][-1] == 6
        stattn.integration.processors.tracker_of(pipe.unet).reset()   # ... unless told
        pipe.unet(x, ts[-1], encoder_hidden_states=ctx)
        assert rec.steps[-1] == [0]
    stattn.restore(pipe.unet)


def test_hook_keeps_the_pipeline_class_name_and_goes_away():
    pipe = models.tiny(0)
    cls = type(pipe)
    stattn.accelerate(pipe, controller=Recorder())
    assert type(pipe).__name__ == cls.__name__ and isinstance(pipe, cls) and type(pipe) is not cls
    stattn.restore(pipe)
    assert type(pipe) is cls


# ------------------------------------------------------------------------------ guidance from the pipeline

def test_guidance_comes_from_the_pipeline_call():
    pipe = models.tiny(0)
    rec = Recorder()
    stattn.accelerate(pipe, controller=rec)
    pipe(PROMPT, num_inference_steps=2, guidance_scale=1.0, num_images_per_prompt=2, output_type="latent")
    assert rec.generations[-1].cfg is False and {c for _, c in rec.calls[-1]} == {False}
    pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, output_type="latent")
    assert rec.generations[-1].cfg is True
    stattn.restore(pipe)


def test_regulation_without_guidance_edits_every_image():
    """guidance_scale = 1 with two images: both rows are conditional (cfg is taken from the call,
    not guessed from an even batch), so both are edited exactly as with cfg=False."""
    pipe = models.tiny(0, scheduler="DDIMScheduler")

    def run(ctrl):
        ctrl.apply(pipe, prompt=PROMPT)
        try:
            return pipe(PROMPT, num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2,
                        generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="latent").images
        finally:
            ctrl.remove(pipe)

    kw = dict(layers="all", edit_steps=2, init="zeros")
    auto = run(stattn.AttentionRegulation(["cat", "frog"], **kw))
    explicit = run(stattn.AttentionRegulation(["cat", "frog"], cfg=False, **kw))
    plain = pipe(PROMPT, num_inference_steps=3, guidance_scale=1.0, num_images_per_prompt=2,
                 generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="latent").images
    torch.testing.assert_close(auto, explicit, rtol=1e-5, atol=1e-6)
    for i in range(2):                                    # each image differs from the unedited one
        assert (auto[i] - plain[i]).abs().max() > 1e-4


# ------------------------------------------------------------------------------ the call's own prompt

def _latents(pipe, prompt, n=1, steps=3, **kw):
    return pipe(prompt, num_inference_steps=steps, generator=[torch.Generator().manual_seed(s) for s in range(n)],
                output_type="latent", **kw).images


def test_regulation_resolves_targets_in_the_call_prompt():
    pipe = models.tiny(0, scheduler="DDIMScheduler")
    kw = dict(layers="all", edit_steps=2, init="zeros")
    ctrl = stattn.AttentionRegulation(["cat", "frog"], **kw)
    ctrl.apply(pipe, prompt=OTHER)
    expected = _latents(pipe, OTHER)
    ctrl.remove(pipe)
    ctrl = stattn.AttentionRegulation(["cat", "frog"], **kw)
    ctrl.apply(pipe, prompt=PROMPT)                        # applied for another prompt ...
    got = _latents(pipe, OTHER)                            # ... the call's prompt decides the columns
    assert ctrl.rows == [(stattn.token_indices(pipe.tokenizer, OTHER, ["cat", "frog"]),
                          stattn.eos_index(pipe.tokenizer, OTHER))]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="target 'cat' is not in the prompt"):
        _latents(pipe, "a photo of a dog")
    ctrl.remove(pipe)


@pytest.mark.parametrize("fused", [True, False])
def test_regulation_per_row_columns_for_a_list_of_prompts(fused):
    """[A, B]: each row gets its own key columns and EOS. The fused path equals the eager reference
    (itself per-row by gathers), and a list of one prompt twice equals num_images_per_prompt=2."""
    # fp64: the inner loop (20 steps at lr 100) is a chaotic map; two implementations of it agree
    # portably only where rounding is far below its branch points
    pipe = models.tiny(0, scheduler="DDIMScheduler", dtype=torch.float64)
    kw = dict(layers="all", edit_steps=2, init="zeros")

    def run(prompt, n=1, fused=fused, **call):
        ctrl = stattn.AttentionRegulation(["cat", "frog"], fused=fused, **kw)
        ctrl.apply(pipe, prompt=PROMPT)
        try:
            return _latents(pipe, prompt, n=n, **call), ctrl.rows
        finally:
            ctrl.remove(pipe)

    def close(a, b):   # fp64 implementations of the same sums: ~1e-15 measured
        assert (a - b).abs().max() <= 1e-9 * b.abs().max()

    got, rows = run([PROMPT, OTHER], n=2)
    assert rows[0] != rows[1] and [r[0] for r in rows] == [
        stattn.token_indices(pipe.tokenizer, p, ["cat", "frog"]) for p in (PROMPT, OTHER)]
    if fused:
        close(got, run([PROMPT, OTHER], n=2, fused=False)[0])
    twice, rows = run([PROMPT, PROMPT], n=2)
    assert rows is None                                   # every row apply()'s columns: the shared form
    close(twice, run(PROMPT, n=2, num_images_per_prompt=2)[0])


def test_prompt_embeds_must_be_the_applied_prompt():
    pipe = models.tiny(0, scheduler="DDIMScheduler")
    ctrl = stattn.AttentionRegulation(["cat", "frog"], layers="all", edit_steps=2, init="zeros")
    ctrl.apply(pipe, prompt=PROMPT)
    expected = _latents(pipe, PROMPT)
    pe, ne = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    got = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=3,
               generator=[torch.Generator().manual_seed(0)], output_type="latent").images
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    other, _ = pipe.encode_prompt(OTHER, "cpu", 1, True)
    with pytest.raises(ValueError, match="prompt_embeds: these embeddings are not those of the prompt"):
        pipe(prompt_embeds=other, negative_prompt_embeds=ne, num_inference_steps=2, output_type="latent")
    ctrl.remove(pipe)


def test_spacetime_lays_out_the_call_prompt():
    pipe = models.tiny(0, scheduler="DDIMScheduler")
    st = stattn.SpatialTemporal(["cat", "frog"])
    st.apply(pipe, prompt=OTHER)
    expected = _latents(pipe, OTHER)
    layout = st.layout_used
    st.remove(pipe)
    st = stattn.SpatialTemporal(["cat", "frog"])
    st.apply(pipe, prompt=PROMPT)
    got = _latents(pipe, OTHER)
    assert st.layout_used.names == layout.names and st.descriptions[0].endswith("small cat")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="SpatialTemporal lays out one prompt per call"):
        _latents(pipe, [PROMPT, OTHER], n=2)
    st.remove(pipe)


# ------------------------------------------------------------------------------ stock pipeline = Runner

@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("method", ["regulation", "spacetime"])
def test_methods_on_a_stock_pipeline_equal_the_runner(scheduler, method):
    """Every scheduler (PNDM repeats its first timestep, Heun and KDPM2 evaluate timesteps twice,
    ancestral and SDE samplers draw noise): the stock pipeline's steps are counted as the Runner
    counts them, so both give the same image."""
    # fp64 for the regulation's chaotic inner loop: both sides then agree portably to rounding
    pipe = models.tiny(0, scheduler=scheduler, dtype=torch.float64 if method == "regulation" else torch.float32)
    runner = stattn.Runner(pipe)

    def make():
        if method == "regulation":
            return stattn.AttentionRegulation(["cat", "frog"], layers="all", edit_steps=3, init="zeros",
                                              record_maps=True)
        return stattn.SpatialTemporal(["cat", "frog"], weights=torch.linspace(0.5, 2.0, 4)[None].repeat(2, 1))  # per step

    ctrl = make()
    ctrl.apply(pipe, prompt=PROMPT)
    torch.manual_seed(0)                 # DPMSolverSDE seeds its Brownian tree from the global RNG
    stock = _latents(pipe, PROMPT, steps=4)
    stock_maps = len(ctrl.maps) if method == "regulation" else None
    ctrl.remove(pipe)
    ctrl = make()
    ctrl.apply(runner, prompt=PROMPT)
    torch.manual_seed(0)
    ran = runner(PROMPT, steps=4, generator=[torch.Generator().manual_seed(0)], output_type="latent").latents
    evaluations = len(pipe.scheduler.timesteps)
    if method == "regulation":
        assert stock_maps == len(ctrl.maps) == evaluations
    ctrl.remove(runner)
    torch.testing.assert_close(stock, ran, rtol=1e-5, atol=1e-6)


def test_generation_reports_what_the_runner_runs():
    pipe = models.tiny(0)
    runner = stattn.Runner(pipe)
    rec = Recorder()
    stattn.accelerate(runner, controller=rec)
    runner([PROMPT, OTHER], steps=3, num_images=2, guidance_scale=1.0, output_type="latent")
    g = rec.generations[-1]
    assert isinstance(g, Generation) and g.source == "runner" and g.cfg is False
    assert g.prompts == [PROMPT, PROMPT, OTHER, OTHER] and g.steps == len(pipe.scheduler.timesteps)
    assert rec.steps[-1] == list(range(g.steps))
    stattn.restore(runner)


@pytest.mark.parametrize("method", ["regulation", "spacetime", "compose"])
def test_shipped_methods_read_no_values_back_per_call(method, value_reads):
    """docs/writing-a-method.md's rule 4 for the shipped methods: the op's NaN checks (a host read,
    a sync per layer call on a GPU) never run on their layer calls; what they pass is theirs and
    checked when made."""
    pipe = models.tiny(0, scheduler="DDIMScheduler")
    reg = lambda: stattn.AttentionRegulation(["cat", "frog"], layers="all", edit_steps=2)  # noqa: E731
    st = lambda: stattn.SpatialTemporal(["cat", "frog"], weights=torch.tensor([0.5, 1.5]))  # noqa: E731
    ctrl = {"regulation": reg, "spacetime": st, "compose": lambda: stattn.compose(reg(), st())}[method]()
    ctrl.apply(pipe, prompt=PROMPT)
    try:
        value_reads.clear()               # (set-up may check what the user gave)
        _latents(pipe, PROMPT, steps=2)
        # θ0 is read on the CPU only, where it is free (regulation.core._check_theta; on a GPU a NaN
        # shows in the losses): every other read would be a sync per layer call there
        assert stattn.status(pipe).fused_calls > 0 and [n for n in value_reads if n != "theta0"] == []
    finally:
        ctrl.remove(pipe)
