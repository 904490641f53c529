"""The Attend-and-Excite denoising loop: diffusers' ``StableDiffusionAttendAndExcitePipeline.__call__``
with the whole batch at once.

Per loop turn i (the pipeline's, image by image; here every image of the batch in one UNet forward):

- i < max_iter_to_alter or i a threshold turn: a forward of the conditional rows on the latents as
  they are (not ``scale_model_input``'d, as the pipeline), the loss of each image from its maps;
- at a threshold turn, images whose loss > 1 - threshold are refined: repeat {forward, loss, latent
  step} while the loss before the step exceeds max(0, 1 - threshold), at most max_refinement_steps
  times, then one more forward for the loss at the refined latents;
- i < max_iter_to_alter: latents -= step_size[i] * d loss / d latents (images whose loss is 0 keep
  their latents);
- the guided UNet forward and the scheduler step, as in any SD pipeline.

Where the pipeline runs a forward it does not need, this loop does not: the refinement's first
iteration evaluates the very latents of the turn's first forward (reused, unless
``cross_attention_kwargs`` are given: the pipeline's refinement forwards go without them); from
max_iter_to_alter on, the pipeline still runs a forward with gradients every turn and discards its
loss (here none, or one without gradients at a threshold turn); the final refinement forward exists
only for an update that follows. Within a forward, layers after the last one whose map the loss
reads are not run (their output cannot change the loss). The UNet's parameters are frozen meanwhile,
so the backward computes only the latents' gradient.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from ...integration.control import Generation
from ...integration.processors import tracker_of
from . import core
from .controller import AttendAndExcite, Capture, MapsRead

__all__ = ["generate"]

# stock SD arguments that diffusers' Attend-and-Excite call does not take
_NOT_TAKEN = ("timesteps", "sigmas", "guidance_rescale", "ip_adapter_image", "ip_adapter_image_embeds",
              "callback_on_step_end", "callback_on_step_end_tensor_inputs")
_SETTINGS = ("token_indices", "max_iter_to_alter", "thresholds", "scale_factor", "attn_res", "max_refinement_steps")


@torch.no_grad()
def generate(ae: AttendAndExcite, pipe, prompt=None, *, height: Optional[int] = None, width: Optional[int] = None,
             num_inference_steps: int = 50, guidance_scale: float = 7.5, negative_prompt=None,
             num_images_per_prompt: int = 1, eta: float = 0.0, generator=None, latents: Optional[Tensor] = None,
             prompt_embeds: Optional[Tensor] = None, negative_prompt_embeds: Optional[Tensor] = None,
             output_type: Optional[str] = "pil", return_dict: bool = True, callback=None, callback_steps: int = 1,
             cross_attention_kwargs: Optional[dict] = None, clip_skip: Optional[int] = None, **others):
    """One Attend-and-Excite generation with ``pipe``'s components; the arguments are those of
    diffusers' ``StableDiffusionAttendAndExcitePipeline.__call__`` (keywords after ``prompt``), less
    the method's own (``ae``'s settings). Returns what that pipeline returns."""
    _check_others(others)
    unet = pipe.unet
    height = height or unet.config.sample_size * pipe.vae_scale_factor
    width = width or unet.config.sample_size * pipe.vae_scale_factor
    _check_inputs(prompt, height, width, callback_steps, negative_prompt, prompt_embeds, negative_prompt_embeds,
                  num_images_per_prompt)
    batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
    prompts = None if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
    indices = ae.indices_for(prompts, prompt_embeds, batch_size)

    device = pipe._execution_device
    cfg = guidance_scale > 1.0
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        prompt, device, num_images_per_prompt, cfg, negative_prompt, prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip)
    if cfg:
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])
    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    images = batch_size * num_images_per_prompt
    latents = pipe.prepare_latents(images, unet.config.in_channels, height, width, prompt_embeds.dtype, device,
                                   generator, latents)
    extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, eta)
    attn_res = ae.attn_res or (int(math.ceil(width / 32)), int(math.ceil(height / 32)))
    step_size = core.step_sizes(ae.scale_factor, len(timesteps))
    text = prompt_embeds[images:] if cfg else prompt_embeds
    rows = [ind for ind in indices for _ in range(num_images_per_prompt)]
    excite = _Excite(ae, unet, text, rows, attn_res, cross_attention_kwargs, latents.device)
    ae.losses, ae.refinement_iterations = {}, {}

    num_warmup_steps = len(timesteps) - num_inference_steps * scheduler.order
    tracker = tracker_of(unet)
    prompt_rows = None if prompts is None else [p for p in prompts for _ in range(num_images_per_prompt)]
    with _driven(tracker, Generation(cfg=cfg, prompts=prompt_rows, prompt_embeds=None if prompts else text,
                                     steps=len(timesteps), timesteps=timesteps, batch=prompt_embeds.shape[0],
                                     source="pipeline", pipeline=pipe)), \
            _frozen(unet), pipe.progress_bar(total=num_inference_steps) as progress_bar:
        for i, t in enumerate(timesteps):
            tracker.set_step(i, t, latents.device)
            latents = excite.turn(latents, i, t, step_size[i])
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            noise_pred = unet(model_in, t, encoder_hidden_states=prompt_embeds,
                              cross_attention_kwargs=cross_attention_kwargs).sample
            if cfg:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample
            if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % scheduler.order == 0):
                progress_bar.update()
                if callback is not None and i % callback_steps == 0:
                    callback(i // getattr(scheduler, "order", 1), t, latents)

    if not output_type == "latent":
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image, has_nsfw_concept = pipe.run_safety_checker(image, device, prompt_embeds.dtype)
    else:
        image, has_nsfw_concept = latents, None
    do_denormalize = [True] * image.shape[0] if has_nsfw_concept is None else [not n for n in has_nsfw_concept]
    image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
    pipe.maybe_free_model_hooks()
    if not return_dict:
        return image, has_nsfw_concept
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)


class _Excite:
    """The latent updates of one generation: maps forwards of any subset of the images, their
    losses, refinement and steps."""

    def __init__(self, ae: AttendAndExcite, unet, text: Tensor, rows: list, attn_res: tuple,
                 cross_attention_kwargs: Optional[dict], device):
        self.ae, self.unet, self.text, self.attn_res = ae, unet, text, attn_res
        self.cak = cross_attention_kwargs
        K = max(len(r) for r in rows)
        self.targets = torch.tensor([r + r[:1] * (K - len(r)) for r in rows], dtype=torch.int64, device=device)
        self.valid = torch.tensor([[j < len(r) for j in range(K)] for r in rows], dtype=torch.bool, device=device)
        self.stop_after: Optional[int] = None     # map layers per forward, counted on the first

    def loss(self, x: Tensor, t, rows: Optional[Tensor], cak: Optional[dict], grad: bool) -> tuple[Tensor, Tensor]:
        """(the latents as a leaf requiring grad when ``grad``, per-image losses [b]) of the images
        ``rows`` (None: all) at latents x [b, C, h, w] and timestep t."""
        text = self.text if rows is None else self.text[rows]
        targets = self.targets if rows is None else self.targets[rows]
        valid = self.valid if rows is None else self.valid[rows]
        # diffusers' UNet forward unscales a LoRA scale in a `finally` (older versions did not): a
        # forward with one runs to its end
        lora = (cak or {}).get("scale", 1.0) != 1.0
        cap = Capture(cells=self.attn_res[0] * self.attn_res[1], stop_after=None if lora else self.stop_after)
        with torch.set_grad_enabled(grad):
            x = x.detach().requires_grad_(grad)
            self.ae._capture = cap
            try:
                self.unet(x, t, encoder_hidden_states=text, cross_attention_kwargs=cak)
            except MapsRead:
                pass
            finally:
                self.ae._capture = None
            if not cap.maps:
                raise ValueError(f"attn_res: {tuple(self.attn_res)} ({cap.cells} pixels) is the grid of none of this "
                                 f"UNet's cross-attention layers at latents {tuple(x.shape[-2:])}; pass the "
                                 "(h, w) of one of its levels (the latent size halved per level, rounded up)")
            if self.stop_after is None:
                self.stop_after = len(cap.maps)
            maps = core.aggregate(cap.maps, cap.heads)
            maxima = core.max_attention_per_token(maps, self.attn_res, targets)
            return x, core.losses(maxima, valid)

    def turn(self, latents: Tensor, i: int, t, step: float) -> Tensor:
        """The latents after loop turn i's updates."""
        ae = self.ae
        alter, thr = i < ae.max_iter_to_alter, ae.thresholds.get(i)
        if not alter and thr is None:
            return latents
        reuse = not self.cak      # the refinement's first forward equals this one
        x, L = self.loss(latents, t, None, self.cak, grad=alter or (thr is not None and reuse))
        refine = torch.zeros_like(L, dtype=torch.bool) if thr is None else (L > 1.0 - thr)
        keep, R = ~refine, refine.nonzero().flatten()
        # the first forward's gradient, at once (its graph is freed before any refinement forward)
        g0 = _grad(L, x) if (alter and bool(keep.any())) or (reuse and len(R)) else None
        L = L.detach()
        del x
        out, used = latents.clone(), L.clone()        # used: the loss each image's update follows
        if thr is not None:
            ae.refinement_iterations[i] = [0] * len(L)
        if len(R):
            xr, counts = self._refine(latents[R], t, L[R], R, g0[R] if reuse else None, thr, step)
            for r, n in zip(R.tolist(), counts):
                ae.refinement_iterations[i][r] = n
            if alter:          # the loss at the refined latents, and its step
                xf, Lf = self.loss(xr, t, R, None, grad=True)
                out[R] = (xr - step * _grad(Lf, xf)).to(out.dtype)
                used[R] = Lf.detach()
            else:
                out[R] = xr
        if alter:
            if keep.any():
                out[keep] = (latents[keep] - step * g0[keep]).to(out.dtype)
            ae.losses[i] = used.tolist()
        return out

    def _refine(self, x: Tensor, t, L: Tensor, R: Tensor, g0: Optional[Tensor], thr: float,
                step: float) -> tuple[Tensor, list]:
        """The pipeline's _perform_iterative_refinement_step loop for images R (latents x, losses L
        and, when its first forward is reused, gradients g0 at them): while an image's loss before
        its step > max(0, 1 - thr), at most max_refinement_steps times. Returns the refined latents
        and each image's iteration count."""
        target = max(0, 1.0 - thr)
        x = x.clone()
        counts = torch.zeros(len(R), dtype=torch.int64)
        active = (L > target).cpu()
        while bool(active.any()):
            A = active.nonzero().flatten()
            Ad = A.to(x.device)
            if g0 is not None:                 # the first iteration: the turn's first forward
                La, g, g0 = L[Ad], g0[Ad], None
            else:
                xa, La = self.loss(x[Ad], t, R[Ad], None, grad=True)
                g = _grad(La, xa)
            x[Ad] = (x[Ad] - step * g).to(x.dtype)
            counts[A] += 1
            active[A] = (La > target).cpu() & (counts[A] < self.ae.max_refinement_steps)
        return x, counts.tolist()


def _grad(losses: Tensor, x: Tensor) -> Tensor:
    """d sum(losses) / d x: each image's own gradient (its loss depends on its latents only)."""
    with torch.enable_grad():
        return torch.autograd.grad(losses.sum(), x)[0]


@contextlib.contextmanager
def _driven(tracker, generation: Generation):
    """The loop tells the step tracker its turns (every UNet forward of turn i is step i)."""
    driven, tracker.driven = tracker.driven, True
    tracker.begin_generation(generation)
    try:
        yield
    finally:
        tracker.driven = driven


@contextlib.contextmanager
def _frozen(module):
    """No gradient to the parameters: the backward computes the latents' gradient only."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _check_others(others: dict) -> None:
    if not others:
        return
    name = next(iter(others))
    if name in _SETTINGS:
        raise TypeError(f"{name}: an AttendAndExcite setting; give it to stattn.AttendAndExcite(...), not to the call")
    if name in _NOT_TAKEN:
        raise TypeError(f"{name}: diffusers' StableDiffusionAttendAndExcitePipeline does not take it, nor does "
                        "Attend-and-Excite here")
    raise TypeError(f"{name}: not an argument of the Attend-and-Excite call (those of diffusers' "
                    "StableDiffusionAttendAndExcitePipeline, less the method's settings)")


def _check_inputs(prompt, height, width, callback_steps, negative_prompt, prompt_embeds, negative_prompt_embeds,
                  num_images_per_prompt) -> None:
    """The pipeline's check_inputs (the indices are the controller's)."""
    if height % 8 != 0 or width % 8 != 0:
        raise ValueError(f"`height` and `width` have to be divisible by 8 but are {height} and {width}.")
    if not isinstance(callback_steps, int) or isinstance(callback_steps, bool) or callback_steps <= 0:
        raise ValueError(f"`callback_steps` has to be a positive integer but is {callback_steps} of type "
                         f"{type(callback_steps)}.")
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or \
            num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt: expected an int >= 1, got {num_images_per_prompt!r}")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("Cannot forward both `prompt` and `prompt_embeds`. Please make sure to only forward one of "
                         "the two.")
    if prompt is None and prompt_embeds is None:
        raise ValueError("Provide either `prompt` or `prompt_embeds`. Cannot leave both `prompt` and "
                         "`prompt_embeds` undefined.")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise ValueError(f"`prompt` has to be of type `str` or `list` but is {type(prompt)}")
    if isinstance(prompt, list) and not prompt:
        raise ValueError("prompt: an empty list of prompts")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Cannot forward both `negative_prompt` and `negative_prompt_embeds`. Please make sure to "
                         "only forward one of the two.")
    if prompt_embeds is not None and negative_prompt_embeds is not None and \
            prompt_embeds.shape != negative_prompt_embeds.shape:
        raise ValueError("`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, "
                         f"but got: `prompt_embeds` {prompt_embeds.shape} != `negative_prompt_embeds` "
                         f"{negative_prompt_embeds.shape}.")
