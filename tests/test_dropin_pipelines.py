"""`stattn.accelerate(pipe)` on every pipeline class it meets: the images equal the same pipeline's
without stattn (fp32 tolerance), the fused path really runs (never zero fused calls where stattn
says it accelerates), what it leaves is reported, and `restore` leaves the stock processors."""
import inspect
import warnings

import pytest
import torch
import diffusers

import stattn
from stattn.integration import models
from stattn.integration.processors import NotAcceleratedWarning, status

PROMPT = "a photo of a cat and a frog"
# fp32 images from two summation orders of the same attention: |difference| ~ 1e-6 on [0, 1] pixels
ATOL = 1e-4


def _as(cls, base, **extra):
    names = inspect.signature(cls.__init__).parameters
    comps = {k: v for k, v in base.components.items() if k in names}
    comps.update(extra)
    return cls(**comps)


def _gligen():
    base = models.tiny(0)
    config = {k: v for k, v in base.unet.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{**config, "attention_type": "gated"})
    return _as(diffusers.StableDiffusionGLIGENPipeline, base, unet=unet)


def _image(size=64):
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3))


# name -> (build pipeline, call kwargs); stattn accelerates the cross-attention of every one
CASES = {
    "sd": (lambda: models.tiny(0), {}),
    "sd2": (lambda: models.tiny(0, "sd2"), {}),
    "sdxl": (lambda: models.tiny(0, "sdxl"), {}),
    "img2img": (lambda: _as(diffusers.StableDiffusionImg2ImgPipeline, models.tiny(0, scheduler="DDIMScheduler")),
                dict(image=_image(), strength=0.6, num_inference_steps=4)),
    "inpaint": (lambda: _as(diffusers.StableDiffusionInpaintPipeline, models.tiny(0, scheduler="DDIMScheduler")),
                dict(image=_image(), mask_image=(_image()[:, :1] > 0.5).float())),
    "controlnet": (lambda: _as(diffusers.StableDiffusionControlNetPipeline, base := models.tiny(0),
                               controlnet=diffusers.ControlNetModel.from_unet(base.unet)),
                   dict(image=_image())),
    "gligen": (_gligen, dict(gligen_phrases=["a cat", "a frog"], gligen_boxes=[[0.1, 0.1, 0.5, 0.5],
                                                                             [0.5, 0.5, 0.9, 0.9]],
                             gligen_scheduled_sampling_beta=1.0)),
    # installs its own processors (AttendExciteAttnProcessor) at each call: stattn wraps them (maps from the fused op)
    "attend_and_excite": (lambda: _as(diffusers.StableDiffusionAttendAndExcitePipeline, models.tiny(0)),
                          dict(token_indices=[5, 8], max_iter_to_alter=0, attn_res=(8, 8),
                               num_inference_steps=1)),
}


def _run(pipe, kw):
    kw = {"num_inference_steps": 2, **kw}
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


@pytest.mark.parametrize("name", list(CASES))
def test_accelerate_equals_the_stock_pipeline(name):
    build, kw = CASES[name]
    pipe = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        stock = _run(pipe, kw)
        before = dict(pipe.unet.attn_processors)
        stattn.accelerate(pipe)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NotAcceleratedWarning)
            got = _run(pipe, kw)
        st = status(pipe)
    assert abs(got - stock).max() <= ATOL, name
    assert st.fused_calls > 0 and st.accelerated and not st.left, (name, st)
    assert not any(issubclass(w.category, NotAcceleratedWarning) for w in caught), [str(w.message) for w in caught]
    stattn.restore(pipe)                 # stattn's processors gone, the stock ones back
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("kind, dtype", [("sd", torch.float32), ("sd", torch.float16), ("sdxl", torch.float16)])
def test_accelerate_equals_stock_on_the_device(kind, dtype):
    """The drop-in on this machine's device (the GPU check runs it on CUDA: Triton kernels), fp16
    included where the device computes it (CPU: fp32 only; fp16 cases then run in fp32)."""
    dtype = dtype if DEVICE == "cuda" else torch.float32
    pipe = models.tiny(0, kind, dtype=dtype, device=DEVICE)
    kw = dict(num_inference_steps=3, output_type="np")
    gen = lambda: torch.Generator(DEVICE).manual_seed(0)     # noqa: E731
    stock = pipe(PROMPT, generator=gen(), **kw).images
    stattn.accelerate(pipe)
    got = pipe(PROMPT, generator=gen(), **kw).images
    st = status(pipe)
    stattn.restore(pipe)
    # fp16: both paths round the attention output to fp16 (2^-11 relative) and differ in summation order
    tol = ATOL if dtype == torch.float32 else 2e-2
    assert abs(got - stock).max() <= tol and st.fused_calls > 0 and not st.left, (kind, dtype, st)
