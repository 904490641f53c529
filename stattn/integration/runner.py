"""A minimal Stable Diffusion runner: the denoising loop and nothing else, measured.

:class:`Runner` wraps a diffusers txt2img pipeline — ``StableDiffusionPipeline`` (SD 1.x / 2.x),
``StableDiffusionXLPipeline``, ``StableDiffusionControlNetPipeline`` or
``StableDiffusionXLControlNetPipeline`` — and reuses the pipeline's own code for everything that is
not the loop (prompt encoding, IP-Adapter image embeds, ControlNet image preparation, latent
preparation, SDXL time ids, VAE decode, safety checker / watermark, post-processing), so its images
equal the stock pipeline's. Any other pipeline (img2img, inpainting, instruct-pix2pix, upscalers,
depth2img, GLIGEN, Attend-and-Excite, SAG, panorama, a subclass with its own ``__call__`` ...) runs
another loop: ``Runner(pipe)`` rejects it, and ``stattn.accelerate(pipe)`` accelerates it instead.
What the Runner adds:

- prompts are encoded once (cached per prompt and settings), and the fused cross-attention processor
  (:func:`stattn.accelerate`) projects the constant text K/V once per layer instead of every step;
- controllers (Attention Regulation, spatial-temporal control, yours) plug in through
  ``stattn.accelerate(runner, controller=...)`` exactly as they do on a stock pipeline;
- an optional CUDA-graph mode (``cuda_graphs=True``): one UNet evaluation captured per latent shape
  and controller ``graph_key`` and replayed from static buffers;
- per-step wall time (CUDA events on a GPU), and on request a ``torch.profiler`` Chrome trace, a
  per-op table and NVTX / profiler ranges per UNet block.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .control import Generation, prompt_rows as _prompt_rows
from .processors import accelerate as _accelerate, tracker_of

__all__ = ["Runner", "RunResult"]


@dataclass
class RunResult:
    images: Any                       # list of PIL images, or a tensor / array per `output_type`
    latents: torch.Tensor             # final latents [B, C, h, w] (before VAE decode)
    step_ms: list                     # wall time of each denoising step (UNet + CFG + scheduler)
    total_ms: float                   # the whole call: encoding, loop, decode
    trace: Optional[str] = None       # Chrome trace path when profiled
    table: Optional[str] = None       # per-op profiler table when profiled
    settings: dict = field(default_factory=dict)
    nsfw: Optional[list] = None       # the SD safety checker's verdict per image (None: no checker run)

    def report(self) -> dict:
        """Timings and settings as a JSON-able dict."""
        steps = sorted(self.step_ms)
        med = steps[len(steps) // 2] if steps else None
        return {"total_ms": self.total_ms, "step_ms": self.step_ms, "step_ms_median": med,
                "trace": self.trace, "settings": self.settings}


@dataclass(eq=False)
class _Conditioning:
    context: torch.Tensor             # encoder_hidden_states, [uncond; cond] under CFG
    added: Optional[dict]             # added_cond_kwargs: SDXL text_embeds / time_ids, IP-Adapter image_embeds
    batch: int                        # images (rows of one CFG half)
    timestep_cond: Optional[torch.Tensor] = None   # guidance-scale embedding of UNets with time_cond_proj_dim
    attention_kwargs: Optional[dict] = None        # the call's cross_attention_kwargs, passed to the UNet


# ---------------------------------------------------------------------- supported pipelines
@dataclass(frozen=True)
class _Family:
    """A diffusers pipeline class whose ``__call__`` loop the Runner reproduces, and how it differs."""

    stock: type
    xl: bool
    controlnet: bool

    @property
    def rescale(self) -> bool:        # the ControlNet pipelines take no guidance_rescale
        return not self.controlnet

    @property
    def begin_index(self) -> bool:    # only SDXL txt2img calls scheduler.set_begin_index(0)
        return self.xl and not self.controlnet


def _families() -> dict:
    from diffusers import (StableDiffusionControlNetPipeline, StableDiffusionPipeline,
                           StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline)

    return {cls: _Family(cls, xl, cn) for cls, xl, cn in (
        (StableDiffusionPipeline, False, False), (StableDiffusionXLPipeline, True, False),
        (StableDiffusionControlNetPipeline, False, True), (StableDiffusionXLControlNetPipeline, True, True))}


def _unsupported(cls: type, why: str, pipeline: bool = True) -> TypeError:
    names = ", ".join(c.__name__ for c in _families())
    hint = (". Accelerate that pipeline with stattn.accelerate(pipe) (controllers: stattn.accelerate(pipe, "
            "controller=...)) and call it as usual" if pipeline else "")
    return TypeError(f"pipe: stattn.Runner reproduces the denoising loop of {names} only (txt2img SD 1.x / 2.x / "
                     f"SDXL, with ControlNet and IP-Adapter inputs); {cls.__name__} {why}{hint}")


def _family_of(pipe) -> _Family:
    """The supported class ``pipe`` is, decided by its class alone: a subclass counts only when its
    ``__call__`` is the stock one (stattn.integration.pipeline_calls' hook is seen through: it wraps the stock loop)."""
    families = _families()
    cls = type(pipe)
    cls = cls.__dict__.get("_stattn_stock_class", cls)
    for base in cls.__mro__:
        family = families.get(base)
        if family is not None:
            if cls.__call__ is not base.__call__:
                raise _unsupported(cls, f"subclasses {base.__name__} but overrides __call__, so its loop may differ")
            return family
    from diffusers import DiffusionPipeline

    if not issubclass(cls, DiffusionPipeline):
        raise _unsupported(cls, "is not a diffusers pipeline", pipeline=False)
    raise _unsupported(cls, "runs another loop (img2img strength, inpainting masks, extra guidance or latent "
                            "updates, other conditioning) that the Runner does not reproduce")


def _controlnet_of(pipe):
    net = pipe.controlnet
    return getattr(net, "_orig_mod", net)   # torch.compile'd: check the wrapped module, as diffusers does


# ---------------------------------------------------------------------- the call's arguments
@dataclass
class _Control:
    image: Any                        # as given; prepared by the pipeline's prepare_image
    scale: Any                        # controlnet_conditioning_scale (float, or a list per ControlNet)
    guess: bool
    start: list
    end: list


@dataclass
class _Call:
    prompt: Union[str, list]
    negative_prompt: Any
    steps: Optional[int]
    timesteps: Optional[list]
    sigmas: Optional[list]
    guidance_scale: float
    guidance_rescale: float
    height: Optional[int]             # None: from the ControlNet image
    width: Optional[int]
    num_images: int
    generator: Any
    seed: Optional[int]
    latents: Optional[torch.Tensor]
    eta: float
    clip_skip: Optional[int]
    attention_kwargs: Optional[dict]
    ip_image: Any
    ip_embeds: Optional[list]
    control: Optional[_Control]
    output_type: str
    progress: bool
    callback: Any

    @property
    def batch(self) -> int:
        return (1 if isinstance(self.prompt, str) else len(self.prompt)) * self.num_images

    @property
    def lora_scale(self):             # the stock pipelines' text-encoder LoRA scale
        return self.attention_kwargs.get("scale", None) if self.attention_kwargs is not None else None


class Runner:
    """The denoising loop of a diffusers SD / SDXL txt2img pipeline (ControlNet and IP-Adapter
    inputs included), lean and measured.

    ``Runner(pipe)`` takes a loaded ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
    ``StableDiffusionControlNetPipeline`` or ``StableDiffusionXLControlNetPipeline`` (or a subclass
    that keeps the stock ``__call__``) and raises TypeError for any other pipeline;
    :meth:`from_pretrained` loads a model directory, hub repo id or single-file checkpoint (or
    ``"tiny"``); an img2img / inpainting model there generates text-to-image from its components."""

    def __init__(self, pipe, *, cuda_graphs: bool = False, accelerate: bool = True):
        family = _family_of(pipe)
        parts = ("unet", "vae", "scheduler", "text_encoder", "tokenizer") + (("controlnet",) if family.controlnet else ())
        for part in parts:
            if getattr(pipe, part, None) is None and not (part == "text_encoder" and family.xl):
                raise ValueError(f"pipe: expected a {family.stock.__name__} with a {part}, "
                                 f"got {type(pipe).__name__} without one")
        if cuda_graphs and family.controlnet:
            raise ValueError("cuda_graphs=True captures the UNet evaluation alone, and the ControlNet residuals it "
                             f"adds change at every step: not supported for {type(pipe).__name__}; use "
                             "cuda_graphs=False")
        self.pipe = pipe
        self.family = family
        self.unet = pipe.unet
        self.scheduler = pipe.scheduler
        self.cuda_graphs = bool(cuda_graphs)
        self._cond_cache: dict = {}
        self._graphs = _GraphCache()
        if accelerate:
            # a controller installed on the pipeline before (stattn.accelerate(pipe, controller=c))
            # stays installed: the Runner's accelerate would otherwise drop it without a word
            installed = tracker_of(self.unet)
            controller = installed.controller if installed is not None else None
            try:
                _accelerate(pipe if controller is not None else self.unet, controller=controller)
            except ValueError as e:   # no layer stattn reproduces (e.g. IP-Adapter attention): the stock path
                warnings.warn(f"stattn.Runner: the UNet keeps its stock attention processors ({e})", stacklevel=2)

    @classmethod
    def from_pretrained(cls, model: Union[str, Path], *, dtype=None, torch_dtype=None, device=None,
                        scheduler=None, cuda_graphs: bool = False, accelerate: bool = True,
                        local_files_only: Optional[bool] = None, config=None) -> "Runner":
        """Load what ``stattn.integration.models.resolve`` accepts — ``"tiny"``, ``"tiny-sdxl"``, ``"full:sd15"``
        ..., a diffusers directory, a single-file checkpoint (``config``: a diffusers directory or
        Hub id with its component configs), a Hub repo id (``local_files_only`` None follows
        HF_HUB_OFFLINE) — and run it text-to-image. An SD / SDXL img2img or inpainting pipeline (with
        or without ControlNet) becomes its txt2img pipeline through diffusers'
        ``AutoPipelineForText2Image.from_pipe`` (the same component objects); any other class keeps
        the TypeError of ``Runner(pipe)``."""
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree: give one of them")
        from . import models

        dtype = dtype if dtype is not None else torch_dtype
        kw = {"device": device, "scheduler": scheduler, "local_files_only": local_files_only, "config": config}
        if dtype is not None:
            kw["dtype"] = dtype
        pipe = cls._text2image(models.resolve(str(model), **kw))
        return cls(pipe, cuda_graphs=cuda_graphs, accelerate=accelerate)

    @staticmethod
    def _text2image(pipe):
        """`pipe` itself when the Runner takes it; else, when diffusers maps its class to a txt2img class
        the Runner takes (``AutoPipelineForText2Image.from_pipe``: img2img / inpainting -> txt2img, the
        same component objects), that pipeline; else `pipe` (``Runner(pipe)`` then names the class)."""
        try:
            _family_of(pipe)
            return pipe
        except TypeError:
            pass
        from diffusers import AutoPipelineForText2Image, DiffusionPipeline

        if not isinstance(pipe, DiffusionPipeline):
            return pipe
        try:
            text2image = AutoPipelineForText2Image.from_pipe(pipe)
        except ValueError:                # "AutoPipeline can't find a pipeline linked to ...": none
            return pipe
        try:
            _family_of(text2image)
        except TypeError:
            return pipe
        unet, vae, target = pipe.unet.config, pipe.vae.config, type(text2image).__name__
        if unet.in_channels != vae.latent_channels:
            raise _unsupported(type(pipe), f"has a UNet of {unet.in_channels} input channels (latents with a mask "
                                           f"and a masked image: a dedicated inpainting model), and {target} feeds "
                                           f"it {vae.latent_channels}-channel latents alone: it cannot generate "
                                           "text-to-image")
        if getattr(pipe.config, "requires_aesthetics_score", False):
            raise _unsupported(type(pipe), f"(requires_aesthetics_score, an SDXL refiner) conditions its UNet on an "
                                           f"aesthetic score, which {target} does not give: it cannot generate "
                                           "text-to-image")
        return text2image

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def is_xl(self) -> bool:
        return self.family.xl

    @property
    def controller(self):
        t = tracker_of(self.unet)
        return t.controller if t is not None else None

    def default_size(self) -> int:
        return self.unet.config.sample_size * self.pipe.vae_scale_factor

    def guided(self, guidance_scale: float) -> bool:
        """Classifier-free guidance as the stock pipelines decide it (``do_classifier_free_guidance``):
        a scale above 1, unless the UNet embeds the guidance scale itself (``time_cond_proj_dim``)."""
        return guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    # ------------------------------------------------------------------ conditioning
    def encode(self, prompt, negative_prompt=None, num_images: int = 1, cfg: bool = True,
               height: Optional[int] = None, width: Optional[int] = None, *, clip_skip: Optional[int] = None,
               lora_scale: Optional[float] = None) -> _Conditioning:
        """Text conditioning through the pipeline's own ``encode_prompt``, cached per arguments and
        text-encoder weights (the same tensors are returned again, so the processors' K/V cache
        hits); never cached while a text encoder holds PEFT (LoRA) layers."""
        encoders = _encoder_key(self.pipe)
        key = (_hashable(prompt), _hashable(negative_prompt), num_images, cfg, height, width, clip_skip, lora_scale,
               encoders)
        hit = self._cond_cache.get(key) if encoders is not None else None
        if hit is not None:
            return hit
        batch = (1 if isinstance(prompt, str) else len(prompt)) * num_images
        with torch.no_grad():
            if self.is_xl:
                cond = self._encode_xl(prompt, negative_prompt, num_images, cfg, height, width, clip_skip, lora_scale)
            else:
                pe, ne = self.pipe.encode_prompt(prompt, self.device, num_images, cfg, negative_prompt,
                                                 lora_scale=lora_scale, clip_skip=clip_skip)
                cond = _Conditioning(torch.cat([ne, pe]) if cfg else pe, None, batch)
        self._cond_cache = {key: cond}  # keep one: a new prompt frees the old tensors
        return cond

    def _encode_xl(self, prompt, negative_prompt, num_images, cfg, height, width, clip_skip, lora_scale) -> _Conditioning:
        pe, ne, ppe, npe = self.pipe.encode_prompt(
            prompt=prompt, device=self.device, num_images_per_prompt=num_images,
            do_classifier_free_guidance=cfg, negative_prompt=negative_prompt, lora_scale=lora_scale,
            clip_skip=clip_skip)
        proj = (int(ppe.shape[-1]) if self.pipe.text_encoder_2 is None
                else self.pipe.text_encoder_2.config.projection_dim)
        size = (height, width)   # original and target size; the ControlNet pipeline's come from its image: the same
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype,
                                               text_encoder_projection_dim=proj)
        if cfg:
            pe, ppe, time_ids = torch.cat([ne, pe]), torch.cat([npe, ppe]), torch.cat([time_ids, time_ids])
        batch = pe.shape[0] // (2 if cfg else 1)
        time_ids = time_ids.to(self.device).repeat(batch, 1)
        return _Conditioning(pe.to(self.device), {"text_embeds": ppe.to(self.device), "time_ids": time_ids}, batch)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(self, prompt: Union[str, list], *, negative_prompt=None, steps: Optional[int] = None,
                 timesteps: Optional[list] = None, sigmas: Optional[list] = None,
                 guidance_scale: Optional[float] = None, guidance_rescale: float = 0.0, height: Optional[int] = None,
                 width: Optional[int] = None, num_images: int = 1, generator=None, seed: Optional[int] = None,
                 latents: Optional[torch.Tensor] = None, eta: float = 0.0, clip_skip: Optional[int] = None,
                 cross_attention_kwargs: Optional[dict] = None, ip_adapter_image=None,
                 ip_adapter_image_embeds: Optional[list] = None, image=None, controlnet_conditioning_scale=None,
                 guess_mode: Optional[bool] = None, control_guidance_start=None, control_guidance_end=None,
                 output_type: str = "pil", progress: bool = False, profile: Union[None, str, Path] = None,
                 callback=None) -> RunResult:
        """Generate images; the arguments mean what the stock pipeline's of the same name do
        (``steps`` is its ``num_inference_steps``, 50 unless ``timesteps`` / ``sigmas`` are given;
        ``num_images`` its ``num_images_per_prompt``). ``seed`` builds a generator on the runner's
        device when no ``generator`` (a ``torch.Generator`` or a list, one per image) is given.
        ``guidance_scale`` defaults as in the stock pipelines: 7.5 (SD), 5 (SDXL).

        ControlNet pipelines take ``image`` (required), ``controlnet_conditioning_scale`` (1.0),
        ``guess_mode``, ``control_guidance_start`` / ``_end`` (0 / 1) and no ``guidance_rescale``;
        the others take none of these. IP-Adapter inputs (``ip_adapter_image`` or precomputed
        ``ip_adapter_image_embeds``) need an IP-Adapter loaded in the UNet. ``cross_attention_kwargs``
        go to the UNet (its ``"scale"`` also to the text encoder's LoRA layers, as in the stock call).
        Stock arguments not listed here (``prompt_embeds``, ``callback_on_step_end``, SDXL's
        ``prompt_2`` / micro-conditioning sizes / ``denoising_end`` ...) are not supported and
        Python rejects them.

        ``profile=DIR`` writes a Chrome trace (``DIR/trace.json``) and a per-op table (``DIR/ops.txt``).
        ``callback(i, t, latents)`` runs after every step."""
        if guidance_scale is None:
            guidance_scale = 5.0 if self.is_xl else 7.5
        control = None
        given = {"image": image, "controlnet_conditioning_scale": controlnet_conditioning_scale,
                 "guess_mode": guess_mode, "control_guidance_start": control_guidance_start,
                 "control_guidance_end": control_guidance_end}
        if self.family.controlnet:
            control = self._check_control(image, controlnet_conditioning_scale, guess_mode,
                                          control_guidance_start, control_guidance_end)
        else:
            for name, value in given.items():
                if value is not None:
                    raise TypeError(f"{name}: a ControlNet argument, but {type(self.pipe).__name__} has no ControlNet "
                                    "(the Runner runs txt2img; for img2img / inpainting use the stock pipeline with "
                                    "stattn.accelerate(pipe))")
        call = _Call(prompt, negative_prompt, steps, timesteps, sigmas, guidance_scale, guidance_rescale, height,
                     width, num_images, generator, seed, latents, eta, clip_skip, cross_attention_kwargs,
                     ip_adapter_image, ip_adapter_image_embeds, control, output_type, progress, callback)
        self._check_call(call)
        if call.generator is None and call.seed is not None:
            call.generator = torch.Generator(self.device).manual_seed(int(call.seed))
        t_start = time.perf_counter()
        with _profiling(profile, self.unet) as prof:
            result = self._generate(call)
        result.total_ms = (time.perf_counter() - t_start) * 1e3
        if prof is not None:
            result.trace, result.table = prof.trace, prof.table
        result.settings = self._settings(call)
        return result

    # ------------------------------------------------------------------ argument checks
    def _check_control(self, image, scale, guess, start, end) -> _Control:
        from diffusers.models import MultiControlNetModel

        name = type(self.pipe).__name__
        if image is None:
            raise TypeError(f"image: {name} needs its ControlNet conditioning image (PIL image, array, tensor or "
                            "a list of them)")
        if guess is not None and not isinstance(guess, bool):
            raise TypeError(f"guess_mode: expected a bool, got {guess!r}")
        start = 0.0 if start is None else start
        end = 1.0 if end is None else end
        # the stock call's alignment of control_guidance_start / end into lists
        if not isinstance(start, list) and isinstance(end, list):
            start = len(end) * [start]
        elif not isinstance(end, list) and isinstance(start, list):
            end = len(start) * [end]
        elif not isinstance(start, list) and not isinstance(end, list):
            net = _controlnet_of(self.pipe)
            mult = len(net.nets) if isinstance(net, MultiControlNetModel) else 1
            start, end = mult * [start], mult * [end]
        return _Control(image, 1.0 if scale is None else scale, bool(guess), start, end)

    def _check_call(self, call: _Call) -> None:
        prompt = call.prompt
        if not isinstance(prompt, str) and not (isinstance(prompt, (list, tuple)) and prompt
                                                and all(isinstance(p, str) for p in prompt)):
            raise TypeError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
        if isinstance(prompt, tuple):
            call.prompt = list(prompt)
        self._check_schedule(call)
        if not _is_int(call.num_images) or call.num_images < 1:
            raise ValueError(f"num_images: expected a positive integer, got {call.num_images!r}")
        if call.output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type: expected 'pil', 'np', 'pt' or 'latent', got {call.output_type!r}")
        if call.generator is not None and call.seed is not None:
            raise ValueError("give either generator or seed, not both")
        if call.seed is not None:
            if not _is_int(call.seed):
                raise TypeError(f"seed: expected an integer in [0, 2**64), got {call.seed!r}")
            if not 0 <= call.seed < 2 ** 64:
                raise ValueError(f"seed: expected an integer in [0, 2**64) (torch.Generator.manual_seed), got {call.seed}")
        for name in ("guidance_scale", "guidance_rescale", "eta"):
            _check_finite(name, getattr(call, name))
        if call.guidance_rescale != 0 and not self.family.rescale:
            raise TypeError(f"guidance_rescale: {type(self.pipe).__name__} has no guidance rescale; leave it 0")
        if self.family.controlnet:
            call.height, call.width = self._check_size("height", call.height), self._check_size("width", call.width)
        else:   # the ControlNet pipelines take their default size from the image
            size = self.default_size()
            call.height = size if call.height is None else self._check_size("height", call.height)
            call.width = size if call.width is None else self._check_size("width", call.width)
        if call.latents is not None and not isinstance(call.latents, torch.Tensor):
            raise TypeError(f"latents: expected a torch.Tensor or None, got {type(call.latents).__name__}")
        self._check_clip_skip(call.clip_skip)
        if call.attention_kwargs is not None and not isinstance(call.attention_kwargs, dict):
            raise TypeError(f"cross_attention_kwargs: expected a dict or None, got {type(call.attention_kwargs).__name__}")
        self._check_ip_adapter(call)
        self._stock_check(call)

    def _check_schedule(self, call: _Call) -> None:
        if call.steps is not None and (not _is_int(call.steps) or call.steps < 1):
            raise ValueError(f"steps: expected a positive integer, got {call.steps!r}")
        for name in ("timesteps", "sigmas"):
            value = getattr(call, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or not value or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
                raise TypeError(f"{name}: expected a non-empty list of numbers, got {value!r}")
            if call.steps is not None:
                raise ValueError(f"give steps or {name}, not both: the schedule {name} gives sets the number of steps")
            setattr(call, name, list(value))
        if call.timesteps is not None and call.sigmas is not None:
            raise ValueError("give timesteps or sigmas, not both")
        if call.steps is None and call.timesteps is None and call.sigmas is None:
            call.steps = 50   # the stock num_inference_steps default

    def _size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def _check_size(self, name: str, v, source: str = "") -> Optional[int]:
        if v is None:
            return None
        multiple = self._size_multiple()
        if not _is_int(v) or v <= 0 or v % multiple:
            raise ValueError(f"{name}: expected a positive multiple of {multiple} for this model "
                             f"(VAE factor x UNet downsampling){source}, got {v!r}")
        return int(v)

    def _check_clip_skip(self, clip_skip) -> None:
        if clip_skip is None:
            return
        # hidden_states[-(clip_skip + 1)] in SD, [-(clip_skip + 2)] in SDXL: num_hidden_layers + 1 states
        encoders = [e for e in (getattr(self.pipe, "text_encoder", None), getattr(self.pipe, "text_encoder_2", None))
                    if e is not None]
        limit = min(e.config.num_hidden_layers for e in encoders) - (1 if self.is_xl else 0)
        if not _is_int(clip_skip) or not 0 <= clip_skip <= limit:
            raise ValueError(f"clip_skip: expected None or an integer in [0, {limit}] (layers of this text encoder "
                             f"to skip), got {clip_skip!r}")
        if not self.is_xl and not hasattr(self.pipe.text_encoder, "text_model"):
            # SD's encode_prompt applies text_encoder.text_model.final_layer_norm, which transformers 5's
            # CLIPTextModel no longer has: the stock call fails there too
            raise TypeError(f"clip_skip: {type(self.pipe).__name__}.encode_prompt cannot apply it to this "
                            f"{type(self.pipe.text_encoder).__name__} (no .text_model, as in transformers >= 5; the "
                            "stock pipeline fails the same way); leave clip_skip None")

    def _check_ip_adapter(self, call: _Call) -> None:
        image, embeds = call.ip_image, call.ip_embeds
        if image is None and embeds is None:
            return
        if image is not None and embeds is not None:
            raise ValueError("give ip_adapter_image or ip_adapter_image_embeds, not both")
        name = "ip_adapter_image" if image is not None else "ip_adapter_image_embeds"
        proj = getattr(self.unet, "encoder_hid_proj", None)
        layers = getattr(proj, "image_projection_layers", None)
        if self.unet.config.encoder_hid_dim_type != "ip_image_proj" or layers is None:
            raise ValueError(f"{name}: the UNet has no IP-Adapter loaded (pipe.load_ip_adapter(...)), so the stock "
                             "pipeline would ignore it")
        if image is not None:
            if getattr(self.pipe, "image_encoder", None) is None:
                raise ValueError("ip_adapter_image: the pipeline has no image_encoder to embed it; load one or pass "
                                 "precomputed ip_adapter_image_embeds")
            return
        if not isinstance(embeds, list) or not all(isinstance(e, torch.Tensor) and e.dim() in (3, 4) for e in embeds):
            raise TypeError("ip_adapter_image_embeds: expected a list of 3-D or 4-D tensors, one per IP-Adapter, "
                            f"got {embeds!r}")
        if len(embeds) != len(layers):
            raise ValueError(f"ip_adapter_image_embeds: {len(embeds)} tensors for {len(layers)} IP-Adapters")
        if self.guided(call.guidance_scale):
            for i, e in enumerate(embeds):
                if e.shape[0] % 2:
                    raise ValueError(f"ip_adapter_image_embeds[{i}]: with classifier-free guidance each tensor is "
                                     f"[negative; positive] along dim 0 (an even size), got shape {tuple(e.shape)}")

    def _stock_check(self, call: _Call) -> None:
        """The pipeline's own ``check_inputs`` on what the Runner passes it (ControlNet image and
        guidance checks included), called by keyword as each family names its parameters."""
        c = call.control
        given = {"prompt": call.prompt, "prompt_2": None, "height": call.height, "width": call.width,
                 "callback_steps": None, "negative_prompt": call.negative_prompt,
                 "ip_adapter_image": call.ip_image, "ip_adapter_image_embeds": call.ip_embeds}
        if c is not None:
            given.update(image=c.image, controlnet_conditioning_scale=c.scale, control_guidance_start=c.start,
                         control_guidance_end=c.end)
        params = inspect.signature(self.pipe.check_inputs).parameters
        self.pipe.check_inputs(**{k: v for k, v in given.items() if k in params})

    def _check_latents(self, latents, batch, height, width) -> None:
        f = self.pipe.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape} ({batch} images of {height}x{width} px, latent = "
                             f"image / {f}), got {tuple(latents.shape)}")

    # ------------------------------------------------------------------ the loop
    def _generate(self, call: _Call) -> RunResult:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
            rescale_noise_cfg, retrieve_timesteps)

        pipe, unet, device = self.pipe, self.unet, self.device
        cfg = self.guided(call.guidance_scale)
        control = self._prepare_control(call, cfg) if call.control is not None else None
        text = self.encode(call.prompt, call.negative_prompt, call.num_images, cfg, call.height, call.width,
                           clip_skip=call.clip_skip, lora_scale=call.lora_scale)
        image_embeds = None
        if call.ip_image is not None or call.ip_embeds is not None:
            image_embeds = pipe.prepare_ip_adapter_image_embeds(call.ip_image, call.ip_embeds, device, text.batch, cfg)
        timesteps, call.steps = retrieve_timesteps(self.scheduler, call.steps, device, call.timesteps, call.sigmas)
        if call.latents is not None:
            self._check_latents(call.latents, text.batch, call.height, call.width)
        latents = pipe.prepare_latents(text.batch, unet.config.in_channels, call.height, call.width,
                                       text.context.dtype, device, call.generator, call.latents)
        cond = self._unet_conditioning(text, image_embeds, call, latents.dtype)
        extra = pipe.prepare_extra_step_kwargs(call.generator, call.eta)
        if control is not None:
            control.keep = _controlnet_keep(control, len(timesteps))
        if self.family.begin_index and hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        tracker = tracker_of(unet)
        if tracker is not None:
            tracker.driven = True
            tracker.begin_generation(Generation(
                cfg=cfg, prompts=_prompt_rows(call.prompt, call.num_images), steps=len(timesteps),
                timesteps=timesteps, batch=cond.context.shape[0], source="runner", pipeline=pipe))
        if self.cuda_graphs:
            self._graphs.begin(unet, cond)
        step_fn = self._graphs.step if self.cuda_graphs else _eager_unet
        timer = _StepTimer(device)
        scale = call.guidance_scale
        bar = pipe.progress_bar(total=len(timesteps)) if call.progress else contextlib.nullcontext()
        try:
            with bar:
                for i, t in enumerate(timesteps):
                    timer.start()
                    model_in = torch.cat([latents] * 2) if cfg else latents
                    model_in = self.scheduler.scale_model_input(model_in, t)
                    residuals = (self._residuals(control, i, t, latents, model_in, text, cfg)
                                 if control is not None else None)
                    if tracker is not None:
                        tracker.latent_hw = tuple(model_in.shape[-2:])
                        tracker.set_step(i, t, device)
                    key = tracker.controller.graph_key(i) if tracker is not None and tracker.controller else None
                    noise = step_fn(unet, model_in, t, cond, key, residuals)
                    if cfg:
                        uncond, text_noise = noise.chunk(2)
                        noise = uncond + scale * (text_noise - uncond)
                        if call.guidance_rescale > 0:
                            noise = rescale_noise_cfg(noise, text_noise, guidance_rescale=call.guidance_rescale)
                    latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
                    timer.stop()
                    if call.callback is not None:
                        call.callback(i, t, latents)
                    if call.progress:
                        bar.update()
        finally:
            if tracker is not None:
                tracker.driven = False
        images, nsfw = self._finish(latents, call, cond.context.dtype)
        return RunResult(images=images, latents=latents, step_ms=timer.elapsed_ms(), total_ms=0.0, nsfw=nsfw)

    def _unet_conditioning(self, text: _Conditioning, image_embeds, call: _Call, dtype) -> _Conditioning:
        """The cached text conditioning, with this call's IP-Adapter embeds, guidance-scale embedding
        and cross_attention_kwargs when it has any (a new object: CUDA graphs bake these in)."""
        timestep_cond = None
        dim = self.unet.config.time_cond_proj_dim
        if dim is not None:   # as the stock call: w - 1 per image, embedded, in the latents' dtype
            w = torch.tensor(call.guidance_scale - 1).repeat(text.batch)
            timestep_cond = self.pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(device=self.device,
                                                                                             dtype=dtype)
        if image_embeds is None and timestep_cond is None and call.attention_kwargs is None:
            return text
        added = text.added
        if image_embeds is not None:
            added = {**(added or {}), "image_embeds": image_embeds}
        return dataclasses.replace(text, added=added, timestep_cond=timestep_cond,
                                   attention_kwargs=call.attention_kwargs)

    # ------------------------------------------------------------------ ControlNet
    def _prepare_control(self, call: _Call, cfg: bool) -> "_PreparedControl":
        """The ControlNet image(s) through the pipeline's own ``prepare_image``; the image sets the
        size when height / width are not given (as in the stock call)."""
        from diffusers.models import MultiControlNetModel

        pipe, c = self.pipe, call.control
        net = _controlnet_of(pipe)
        multi = isinstance(net, MultiControlNetModel)
        scale = c.scale
        if multi and isinstance(scale, float):
            scale = [scale] * len(net.nets)
        guess = c.guess or (net.nets[0] if multi else net).config.global_pool_conditions
        kw = dict(width=call.width, height=call.height, batch_size=call.batch, num_images_per_prompt=call.num_images,
                  device=self.device, dtype=net.dtype, do_classifier_free_guidance=cfg, guess_mode=guess)
        if multi:
            images = c.image
            if not self.is_xl and isinstance(images[0], list):   # SD's ControlNet call transposes nested lists
                images = [list(t) for t in zip(*images)]
            image = [pipe.prepare_image(image=im, **kw) for im in images]
            height, width = image[0].shape[-2:]
        else:
            image = pipe.prepare_image(image=c.image, **kw)
            height, width = image.shape[-2:]
        source = " (the ControlNet image's size when height / width are not given)"
        call.height, call.width = self._check_size("height", int(height), source), self._check_size("width", int(width), source)
        return _PreparedControl(image, scale, bool(guess), multi, c.start, c.end)

    def _residuals(self, control: "_PreparedControl", i, t, latents, model_in, text: _Conditioning, cfg) -> dict:
        """One ControlNet evaluation, as the stock loop runs it (guess mode: the conditional half only,
        zeros added to the unconditional half)."""
        half = control.guess and cfg
        if half:
            c_in = self.scheduler.scale_model_input(latents, t)
            c_ctx = text.context.chunk(2)[1]
        else:
            c_in, c_ctx = model_in, text.context
        kw = {}
        if self.is_xl:   # the text added conditioning only (the stock call adds image_embeds after the ControlNet)
            added = {"text_embeds": text.added["text_embeds"], "time_ids": text.added["time_ids"]}
            kw["added_cond_kwargs"] = {k: v.chunk(2)[1] for k, v in added.items()} if half else added
        down, mid = self.pipe.controlnet(c_in, t, encoder_hidden_states=c_ctx, controlnet_cond=control.image,
                                         conditioning_scale=control.scale_at(i), guess_mode=control.guess,
                                         return_dict=False, **kw)
        if half:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    # ------------------------------------------------------------------ decode
    def _vae_decode(self, latents, generator=None):
        """The VAE decode of the pipeline's ``__call__``: SD divides by the scaling factor (the VAE in
        its own dtype); SDXL upcasts an fp16 VAE marked force_upcast and denormalises with the
        VAE's latents_mean / latents_std when it has them."""
        vae = self.pipe.vae
        cfg = vae.config
        if not self.is_xl:
            return vae.decode(latents / cfg.scaling_factor, return_dict=False, generator=generator)[0]
        upcast = vae.dtype == torch.float16 and getattr(cfg, "force_upcast", False)
        if upcast:   # the fp16 SDXL VAE overflows: decode in fp32 as the stock pipeline does
            vae.to(torch.float32)
        try:
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype if upcast else vae.dtype)
            if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
                mean = torch.tensor(cfg.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(cfg.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / cfg.scaling_factor + mean
            else:
                latents = latents / cfg.scaling_factor
            return vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(torch.float16)

    def _decode(self, latents, output_type):
        """Latents to images (VAE decode and post-processing), without the safety checker or watermark."""
        if output_type == "latent":
            return latents
        return self.pipe.image_processor.postprocess(self._vae_decode(latents), output_type=output_type)

    def _finish(self, latents, call: _Call, dtype):
        """Decode, then the stock call's safety checker (SD) or watermark (SDXL), and post-process."""
        if call.output_type == "latent":
            return latents, None
        image = self._vae_decode(latents, call.generator)
        if self.is_xl:
            watermark = getattr(self.pipe, "watermark", None)
            if watermark is not None:
                image = watermark.apply_watermark(image)
            return self.pipe.image_processor.postprocess(image, output_type=call.output_type), None
        image, nsfw = self.pipe.run_safety_checker(image, self.device, dtype)
        denormalize = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
        return self.pipe.image_processor.postprocess(image, output_type=call.output_type,
                                                     do_denormalize=denormalize), nsfw

    def _settings(self, call: _Call) -> dict:
        import diffusers

        from .. import __version__

        ctrl = self.controller
        return {
            "prompt": call.prompt, "negative_prompt": call.negative_prompt, "steps": call.steps,
            "custom_schedule": "timesteps" if call.timesteps is not None else "sigmas" if call.sigmas is not None else None,
            "guidance_scale": call.guidance_scale, "height": call.height, "width": call.width,
            "num_images": call.num_images, "seed": call.seed, "output_type": call.output_type,
            "clip_skip": call.clip_skip, "ip_adapter": call.ip_image is not None or call.ip_embeds is not None,
            "controlnet": type(_controlnet_of(self.pipe)).__name__ if self.family.controlnet else None,
            "scheduler": type(self.scheduler).__name__, "model": type(self.pipe).__name__,
            "dtype": str(self.dtype).replace("torch.", ""), "device": _device_name(self.device),
            "cuda_graphs": self.cuda_graphs, "controller": type(ctrl).__name__ if ctrl else None,
            "accelerated": hasattr(self.unet, "_stattn"),
            "versions": {"stattn": __version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__},
        }


@dataclass
class _PreparedControl:
    image: Any                        # prepared tensor, or a list of them (MultiControlNet)
    scale: Any                        # float, or a list per ControlNet
    guess: bool
    multi: bool
    start: list
    end: list
    keep: Optional[list] = None       # per step: 1.0 / 0.0 (a list per ControlNet when multi)

    def scale_at(self, i: int):
        if self.multi:
            return [c * s for c, s in zip(self.scale, self.keep[i])]
        scale = self.scale[0] if isinstance(self.scale, list) else self.scale
        return scale * self.keep[i]


def _controlnet_keep(control: _PreparedControl, n: int) -> list:
    """Which ControlNets act at each of the n steps (control_guidance_start / end), as the stock call."""
    keep = []
    for i in range(n):
        keeps = [1.0 - float(i / n < s or (i + 1) / n > e) for s, e in zip(control.start, control.end)]
        keep.append(keeps if control.multi else keeps[0])
    return keep


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_finite(name: str, x) -> None:
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        raise TypeError(f"{name}: expected a real number, got {x!r}")
    if not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite number, got {x!r}")


# ---------------------------------------------------------------------- UNet evaluation
def _eager_unet(unet, model_in, t, cond: _Conditioning, key=None, residuals=None):
    """One UNet evaluation with the arguments the stock loop passes (``residuals``: the ControlNet's)."""
    return unet(model_in, t, encoder_hidden_states=cond.context, timestep_cond=cond.timestep_cond,
                cross_attention_kwargs=cond.attention_kwargs, added_cond_kwargs=cond.added,
                return_dict=False, **(residuals or {}))[0]


class _GraphCache:
    """CUDA graphs of one UNet evaluation for the current conditioning and controller, per (input
    shape, dtype, controller ``graph_key``).

    The first step with a new key runs eagerly (the warm-up: Triton compiles, cuBLAS workspaces,
    controller state, all on real data); the next one captures, then every later step replays.
    Inputs are copied into static buffers. The processors' K/V of the conditioning and the
    controller's Python path are baked into a graph, so a new conditioning or controller drops
    the graphs (the objects are held, so their ids cannot be reused meanwhile)."""

    def __init__(self):
        self.owner = None     # (conditioning, accelerate state, its processor revision, weights) of the graphs
        self.entries: dict = {}
        self.warm: set = set()
        self.pool = None

    def begin(self, unet, cond: _Conditioning) -> None:
        """Once per run: drop the graphs when what they baked in changed — the conditioning, the
        accelerate state, a processor installed since (the state's revision; the pre-hook that
        notices it does not run under replay, so it is checked here), or any UNet weight (the
        processors' cached text K/V are baked into the graphs)."""
        state = getattr(unet, "_stattn", None)
        if state is not None:
            state.check()
        owner = (cond, state, getattr(state, "revision", None), _weights_key(unet))
        if self.owner is None or owner[0] is not self.owner[0] or owner[1] is not self.owner[1] \
                or owner[2:] != self.owner[2:]:
            self.owner, self.entries, self.warm = owner, {}, set()

    def step(self, unet, model_in, t, cond: _Conditioning, key, residuals=None):
        if residuals is not None:   # Runner refuses cuda_graphs with a ControlNet: its residuals are per-step inputs
            raise RuntimeError("cuda_graphs: ControlNet residuals are not captured")
        if not model_in.is_cuda:
            raise RuntimeError("cuda_graphs=True needs the model on a CUDA device")
        if self.owner is None or self.owner[0] is not cond:
            self.begin(unet, cond)
        full_key = (tuple(model_in.shape), model_in.dtype, key)
        entry = self.entries.get(full_key)
        if entry is None:
            if full_key not in self.warm:
                self.warm.add(full_key)
                return _eager_unet(unet, model_in, t, cond)
            entry = self.entries[full_key] = self._capture(unet, model_in, t, cond)
        graph, static_in, static_t, static_out = entry
        static_in.copy_(model_in)
        static_t.copy_(_as_tensor(t, static_t))
        graph.replay()
        return static_out.clone()  # graphs share a pool: the output may be reused by another graph

    def _capture(self, unet, model_in, t, cond):
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        static_in = model_in.clone()
        static_t = _as_tensor(t, None).to(model_in.device).clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = _eager_unet(unet, static_in, static_t, cond)
        return graph, static_in, static_t, static_out


def _weights_key(module) -> tuple:
    """Identity, storage and version of every parameter and buffer: changes with an in-place edit,
    a dtype/device move or a replaced tensor (not with writes through ``.data``)."""
    return tuple((id(p), p.data_ptr(), p._version) for p in (*module.parameters(), *module.buffers()))


def _encoder_key(pipe) -> Optional[tuple]:
    """What the prompt embeddings depend on besides the prompt: the text encoders' weights; None
    (do not cache) when an encoder holds PEFT layers, whose scales and adapters change its output
    without touching a tensor."""
    key = []
    for name in ("text_encoder", "text_encoder_2"):
        enc = getattr(pipe, name, None)
        if enc is None:
            continue
        if any(hasattr(m, "active_adapters") and hasattr(m, "scaling") for m in enc.modules()):
            return None
        key.append(_weights_key(enc))
    return tuple(key)


def _as_tensor(t, like):
    t = t if isinstance(t, torch.Tensor) else torch.tensor(t)
    return t.to(like.dtype) if like is not None else t


class _StepTimer:
    """Per-step wall time: CUDA events on a GPU (read once at the end: no sync inside the loop),
    perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks = []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append([e, None])
        else:
            self.marks.append([time.perf_counter(), None])

    def stop(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks[-1][1] = e
        else:
            self.marks[-1][1] = time.perf_counter()

    def elapsed_ms(self) -> list:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.marks]
        return [(b - a) * 1e3 for a, b in self.marks]


# ---------------------------------------------------------------------- profiling
class _Profile:
    trace: Optional[str] = None
    table: Optional[str] = None


@contextlib.contextmanager
def _profiling(out_dir, unet):
    """torch.profiler around the call, with a named range per UNet block and per stattn kernel
    launch (profiler + NVTX on CUDA)."""
    if out_dir is None:
        yield None
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if unet.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    handles = _block_ranges(unet)
    result = _Profile()
    from stattn.kernels import launch

    launch.RANGES = True
    try:
        with torch.profiler.profile(activities=acts) as prof:
            yield result
        result.trace = str(out / "trace.json")
        prof.export_chrome_trace(result.trace)
        sort = "cuda_time_total" if len(acts) > 1 else "cpu_time_total"
        result.table = prof.key_averages().table(sort_by=sort, row_limit=40)
        (out / "ops.txt").write_text(result.table)
    finally:
        launch.RANGES = False
        for h in handles:
            h.remove()


def _block_ranges(unet) -> list:
    """Forward hooks opening a profiler range (and an NVTX range on CUDA) per UNet block."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    nvtx = unet.device.type == "cuda"
    handles = []
    for name, block in blocks:
        stack = []

        def pre(_m, _a, name=name, stack=stack):
            rf = torch.profiler.record_function(f"unet.{name}")
            rf.__enter__()
            stack.append(rf)
            if nvtx:
                torch.cuda.nvtx.range_push(f"unet.{name}")

        def post(_m, _a, _o, stack=stack):
            if nvtx:
                torch.cuda.nvtx.range_pop()
            stack.pop().__exit__(None, None, None)

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    return handles


# ---------------------------------------------------------------------- helpers
def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


def _device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def save_report(result: RunResult, path: Union[str, Path]) -> None:
    Path(path).write_text(json.dumps(result.report(), indent=2, default=str))
