"""stattn.Runner across pipeline classes and stock arguments: it equals the stock ControlNet
(single, multi, guess mode, guidance window; SD and SDXL), IP-Adapter, clip_skip, custom schedule,
cross_attention_kwargs, guidance-embedding and safety-checker paths, and rejects every pipeline
whose loop it does not reproduce, and every argument it does not take, with a clear error."""
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import diffusers
import stattn
from diffusers import (ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                       StableDiffusionXLControlNetPipeline, UNet2DConditionModel)
from stattn.integration import models
from stattn.integration.control import Controller
from stattn.integration.runner import Runner

STEPS = 2
PROMPT = "a photo of a cat and a frog"
EXACT = 1e-5   # Runner(accelerate=False): the stock code path, operation for operation
FUSED = 1e-3   # the fused cross-attention kernel against diffusers' SDPA, fp32


def _tiny(seed=0, kind="sd", scheduler="DDIMScheduler"):
    pipe = models.tiny(seed=seed, kind=kind, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock(pipe, seed=0, **kw):
    stattn.restore(pipe)
    return pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kw).images


def _run(pipe, accelerate=False, seed=0, **kw):
    runner = Runner(pipe, accelerate=accelerate)
    try:
        return runner(PROMPT, steps=STEPS, seed=seed, output_type="np", **kw).images
    finally:
        stattn.restore(pipe)


def _diff(a, b):
    return float(abs(torch.as_tensor(a) - torch.as_tensor(b)).max())


def _image(seed, size=64):
    return PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def _controlnet(unet, seed):
    """A tiny ControlNet copied from the UNet; its zero-initialised convolutions made random so that
    the control changes the image."""
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(conv.weight, std=0.05)
            torch.nn.init.normal_(conv.bias, std=0.05)
    return net.eval()


@pytest.fixture(scope="module")
def cn():
    sd = _tiny(seed=3)
    pipe = StableDiffusionControlNetPipeline.from_pipe(sd, controlnet=_controlnet(sd.unet, 0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------ which pipelines
REJECTED = ["StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "StableDiffusionInstructPix2PixPipeline",
            "StableDiffusionUpscalePipeline", "StableDiffusionLatentUpscalePipeline", "StableDiffusionDepth2ImgPipeline",
            "StableDiffusionGLIGENPipeline", "StableDiffusionAttendAndExcitePipeline", "StableDiffusionSAGPipeline",
            "StableDiffusionPanoramaPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
            "StableDiffusionControlNetImg2ImgPipeline", "StableDiffusionControlNetInpaintPipeline",
            "StableDiffusionXLControlNetUnionPipeline", "StableDiffusionPAGPipeline", "StableDiffusionAdapterPipeline",
            "LatentConsistencyModelPipeline"]


@pytest.mark.parametrize("name", REJECTED)
def test_other_pipelines_are_rejected_by_class(name):
    cls = getattr(diffusers, name)
    pipe = cls.__new__(cls)   # the decision reads the class alone: no components needed
    with pytest.raises(TypeError, match=rf"pipe: .*; {name} runs another loop .*stattn\.accelerate\(pipe\)"):
        Runner(pipe)


def test_a_real_img2img_pipeline_is_rejected_and_accelerate_still_works():
    sd = _tiny(seed=4)
    img2img = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(sd)
    with pytest.raises(TypeError, match="StableDiffusionImg2ImgPipeline runs another loop"):
        Runner(img2img)
    stattn.accelerate(img2img)                       # the way the message points to
    assert hasattr(img2img.unet, "_stattn")
    stattn.restore(img2img)


def test_subclasses_count_only_with_the_stock_call():
    sd = _tiny(seed=5)

    class Renamed(StableDiffusionPipeline):          # same loop: accepted, equal to stock
        pass

    class Custom(StableDiffusionPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    renamed = Renamed(**sd.components, requires_safety_checker=False)
    renamed.set_progress_bar_config(disable=True)
    assert _diff(_run(renamed), _stock(sd)) < EXACT
    with pytest.raises(TypeError, match="Custom subclasses StableDiffusionPipeline but overrides __call__"):
        Runner(Custom(**sd.components, requires_safety_checker=False))


def test_a_pipeline_hooked_by_a_controller_is_still_its_stock_class():
    sd = _tiny(seed=6)
    stattn.accelerate(sd, controller=Controller())   # stattn.integration.pipeline_calls swaps in a hooking subclass
    try:
        assert Runner(sd).family.stock is StableDiffusionPipeline
    finally:
        stattn.restore(sd)


# ------------------------------------------------------------------ ControlNet
@pytest.mark.parametrize("kwargs", [
    {},
    {"controlnet_conditioning_scale": 0.5, "control_guidance_start": 0.3, "control_guidance_end": 0.9},
    {"guess_mode": True},
    {"guidance_scale": 1.0, "num_images": 2},
], ids=["default", "scale-window", "guess", "no-cfg-two-images"])
def test_controlnet_equals_stock(cn, kwargs):
    stock = {("num_images_per_prompt" if k == "num_images" else k): v for k, v in kwargs.items()}
    expected = _stock(cn, image=_image(0), **stock)
    assert _diff(_run(cn, image=_image(0), **kwargs), expected) < EXACT


def test_controlnet_changes_the_image_and_fused_equals_stock(cn):
    expected = _stock(cn, image=_image(0))
    assert _diff(expected, _stock(cn, image=_image(0), controlnet_conditioning_scale=0.0)) > 1e-3
    assert _diff(_run(cn, accelerate=True, image=_image(0)), expected) < FUSED


def test_controlnet_size_from_the_image(cn):
    expected = _stock(cn, image=_image(1, size=96))
    got = _run(cn, image=_image(1, size=96))
    assert got.shape == expected.shape == (1, 96, 96, 3) and _diff(got, expected) < EXACT


def test_multi_controlnet_equals_stock():
    sd = _tiny(seed=7)
    pipe = StableDiffusionControlNetPipeline.from_pipe(sd, controlnet=[_controlnet(sd.unet, 1), _controlnet(sd.unet, 2)])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(image=[_image(2), _image(3)], controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.4])
    assert _diff(_run(pipe, **kw), _stock(pipe, **kw)) < EXACT


@pytest.mark.parametrize("guess_mode", [False, True])
def test_sdxl_controlnet_equals_stock(guess_mode):
    xl = _tiny(seed=8, kind="sdxl", scheduler=None)
    pipe = StableDiffusionXLControlNetPipeline.from_pipe(xl, controlnet=_controlnet(xl.unet, 3))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(image=_image(4), guess_mode=guess_mode)
    expected = _stock(pipe, **kw)
    assert _diff(_run(pipe, **kw), expected) < EXACT
    if not guess_mode:
        assert _diff(_run(pipe, accelerate=True, **kw), expected) < FUSED


def test_controlnet_arguments_are_checked(cn, tmp_path):
    runner = Runner(cn, accelerate=False)
    with pytest.raises(TypeError, match="image: StableDiffusionControlNetPipeline needs its ControlNet"):
        runner(PROMPT, steps=1)
    with pytest.raises(TypeError, match="guidance_rescale: StableDiffusionControlNetPipeline has no"):
        runner(PROMPT, steps=1, image=_image(0), guidance_rescale=0.5)
    with pytest.raises(ValueError, match="control guidance start"):      # the pipeline's own check_inputs
        runner(PROMPT, steps=1, image=_image(0), control_guidance_start=0.8, control_guidance_end=0.2)
    with pytest.raises(TypeError, match="controlnet_conditioning_scale"):
        runner(PROMPT, steps=1, image=_image(0), controlnet_conditioning_scale=1)
    with pytest.raises(ValueError, match=r"height: .*ControlNet image's size"):
        runner(PROMPT, steps=1, image=_image(0, size=40))
    with pytest.raises(ValueError, match="cuda_graphs=True .* ControlNet"):
        Runner(cn, cuda_graphs=True, accelerate=False)


@pytest.mark.parametrize("name, value", [("image", _image(0)), ("controlnet_conditioning_scale", 0.5),
                                         ("guess_mode", True), ("control_guidance_start", 0.2),
                                         ("control_guidance_end", 0.8)])
def test_controlnet_arguments_without_a_controlnet_are_rejected(name, value):
    with pytest.raises(TypeError, match=f"{name}: a ControlNet argument, but StableDiffusionPipeline has no"):
        Runner(_tiny(seed=9), accelerate=False)(PROMPT, steps=1, **{name: value})


# ------------------------------------------------------------------ IP-Adapter
EMBED = 12   # image-embedding width of the tiny IP-Adapter


def _with_ip_adapter(pipe, seed):
    """A random IP-Adapter ("proj" image projection, 4 tokens) loaded through diffusers' own loader."""
    unet = pipe.unet
    width = unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    ip, key = {}, 1
    for name in unet.attn_processors:            # the loader numbers cross-attention layers 1, 3, 5, ...
        if name.endswith("attn1.processor"):
            continue
        hidden = modules[name[:-len(".processor")]].to_k.out_features
        ip[f"{key}.to_k_ip.weight"] = torch.randn(hidden, width, generator=g) * 0.2
        ip[f"{key}.to_v_ip.weight"] = torch.randn(hidden, width, generator=g) * 0.2
        key += 2
    proj = {"proj.weight": torch.randn(4 * width, EMBED, generator=g) * 0.2, "proj.bias": torch.zeros(4 * width),
            "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}
    unet._load_ip_adapter_weights([{"image_proj": proj, "ip_adapter": ip}], low_cpu_mem_usage=False)
    return pipe


def _embeds(seed, rows):
    return [torch.randn(rows, 1, EMBED, generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_ip_adapter_embeds_equal_stock(kind):
    pipe = _with_ip_adapter(_tiny(seed=10, kind=kind, scheduler=None), seed=0)
    embeds = _embeds(0, rows=2)                      # [negative; positive] under CFG
    expected = _stock(pipe, ip_adapter_image_embeds=embeds)
    assert _diff(expected, _stock(pipe, ip_adapter_image_embeds=_embeds(1, rows=2))) > 1e-3
    assert _diff(_run(pipe, ip_adapter_image_embeds=embeds), expected) < EXACT
    with warnings.catch_warnings():   # layers stattn does not reproduce keep their processor, with a warning
        warnings.simplefilter("ignore")
        fused = _run(pipe, accelerate=True, ip_adapter_image_embeds=embeds)
    assert _diff(fused, expected) < FUSED


def test_ip_adapter_without_guidance_two_images():
    pipe = _with_ip_adapter(_tiny(seed=11), seed=1)
    kw = dict(ip_adapter_image_embeds=_embeds(2, rows=1), guidance_scale=1.0)
    expected = _stock(pipe, num_images_per_prompt=2, **kw)
    assert _diff(_run(pipe, num_images=2, **kw), expected) < EXACT


def test_ip_adapter_inputs_are_checked():
    plain = Runner(_tiny(seed=12), accelerate=False)
    with pytest.raises(ValueError, match="ip_adapter_image_embeds: the UNet has no IP-Adapter loaded"):
        plain(PROMPT, steps=1, ip_adapter_image_embeds=_embeds(0, rows=2))
    runner = Runner(_with_ip_adapter(_tiny(seed=12), seed=2), accelerate=False)
    with pytest.raises(ValueError, match=r"ip_adapter_image_embeds\[0\]: with classifier-free guidance"):
        runner(PROMPT, steps=1, ip_adapter_image_embeds=_embeds(0, rows=1))
    with pytest.raises(ValueError, match="2 tensors for 1 IP-Adapters"):
        runner(PROMPT, steps=1, ip_adapter_image_embeds=_embeds(0, rows=2) * 2)
    with pytest.raises(TypeError, match="ip_adapter_image_embeds: expected a list"):
        runner(PROMPT, steps=1, ip_adapter_image_embeds=_embeds(0, rows=2)[0])
    with pytest.raises(ValueError, match="not both"):
        runner(PROMPT, steps=1, ip_adapter_image=_image(0), ip_adapter_image_embeds=_embeds(0, rows=2))
    with pytest.raises(ValueError, match="ip_adapter_image: the pipeline has no image_encoder"):
        runner(PROMPT, steps=1, ip_adapter_image=_image(0))


# ------------------------------------------------------------------ other stock arguments
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_clip_skip_equals_stock(kind):
    pipe = _tiny(seed=13, kind=kind, scheduler=None)
    if kind == "sd" and not hasattr(pipe.text_encoder, "text_model"):
        # transformers >= 5: SD's encode_prompt cannot apply clip_skip (stock fails); the Runner says so
        with pytest.raises(AttributeError, match="text_model"):
            _stock(pipe, clip_skip=1)
        with pytest.raises(TypeError, match="clip_skip: StableDiffusionPipeline.encode_prompt cannot apply it"):
            _run(pipe, clip_skip=1)
        return
    expected = _stock(pipe, clip_skip=1)
    assert _diff(expected, _stock(pipe)) > 1e-4
    assert _diff(_run(pipe, clip_skip=1), expected) < EXACT


@pytest.mark.parametrize("schedule", [{"timesteps": [999, 700, 300]}, {"sigmas": [14.6, 3.0, 0.5]}])
def test_custom_schedule_equals_stock(schedule):
    pipe = _tiny(seed=14, scheduler="EulerDiscreteScheduler")
    stock = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **schedule).images
    runner = Runner(pipe, accelerate=False)
    res = runner(PROMPT, seed=0, output_type="np", **schedule)
    assert _diff(res.images, stock) < EXACT and res.settings["steps"] == len(pipe.scheduler.timesteps)
    ddim = Runner(_tiny(seed=14), accelerate=False)
    with pytest.raises(ValueError, match="does not support custom"):   # diffusers' retrieve_timesteps
        ddim(PROMPT, output_type="latent", **schedule)


class _Gain:
    """A self-attention processor with an extra call argument, as cross_attention_kwargs feed them."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * gain


def test_cross_attention_kwargs_reach_the_unet():
    pipe = _tiny(seed=15)
    procs = pipe.unet.attn_processors
    pipe.unet.set_attn_processor({n: _Gain(p) if n.endswith("attn1.processor") else p for n, p in procs.items()})
    kw = dict(cross_attention_kwargs={"gain": 0.5})
    expected = _stock(pipe, **kw)
    assert _diff(expected, _stock(pipe)) > 1e-3
    assert _diff(_run(pipe, **kw), expected) < EXACT
    assert _diff(_run(pipe, accelerate=True, **kw), expected) < FUSED


def test_guidance_embedding_unet_equals_stock():
    pipe = _tiny(seed=16)
    config = {**{k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}, "time_cond_proj_dim": 8}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        pipe.unet = UNet2DConditionModel.from_config(config).eval()
    kw = dict(guidance_scale=4.0)                    # embedded in the UNet: no [uncond; cond] batch
    expected = _stock(pipe, **kw)
    runner = Runner(pipe, accelerate=False)
    assert not runner.guided(4.0)
    assert _diff(runner(PROMPT, steps=STEPS, seed=0, output_type="np", **kw).images, expected) < EXACT


class _FlagAll(torch.nn.Module):
    """A safety checker that flags every image (the stock pipeline then returns it black)."""

    device, dtype = torch.device("cpu"), torch.float32

    def forward(self, images, clip_input):
        return torch.zeros_like(images) if isinstance(images, torch.Tensor) else np.zeros_like(images), \
            [True] * len(images)


def test_the_safety_checker_runs_as_in_the_stock_call():
    from transformers import CLIPImageProcessor

    sd = _tiny(seed=17)
    pipe = StableDiffusionPipeline(**{**sd.components, "safety_checker": _FlagAll(),
                                      "feature_extractor": CLIPImageProcessor()})
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
    res = Runner(pipe, accelerate=False)(PROMPT, steps=STEPS, seed=0, output_type="np")
    assert out.nsfw_content_detected == res.nsfw == [True]
    assert _diff(res.images, out.images) < EXACT


@pytest.mark.parametrize("kwargs", [{"prompt_embeds": torch.zeros(1, 77, 32)}, {"callback_on_step_end": print},
                                    {"num_inference_steps": 2}, {"prompt_2": "a dog"}, {"denoising_end": 0.5},
                                    {"return_dict": False}])
def test_stock_arguments_the_runner_does_not_take_are_rejected(kwargs):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{next(iter(kwargs))}'"):
        Runner(_tiny(seed=18), accelerate=False)(PROMPT, steps=1, **kwargs)
