"""Drop-in diffusers attention processor running cross-attention through stattn's fused kernel.

``stattn.accelerate(pipe_or_unet, controller=None)`` installs :class:`StattnAttnProcessor` on
every cross-attention module (``attn2``) and keeps the originals for ``stattn.restore``. The
processor follows every convention of diffusers' ``AttnProcessor2_0`` (spatial/group norm,
``norm_cross``, 4-D inputs, residual connection, ``rescale_output_factor``) and hands anything it
does not accelerate (self-attention, an attention mask, head sizes over 256) to the original
processor. The text keys/values are constant over the denoising loop, so they are projected once
per context and layer and reused (stock diffusers recomputes them at every call).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import pipeline_calls
from .control import Controller, CrossAttentionCall, StepTracker, layer_grid, project_kv
from .ops import region_attention

__all__ = ["StattnAttnProcessor", "accelerate", "restore", "unet_of"]

MAX_HEAD_DIM = 256


class _KVCache:
    """K/V of the last context seen by one layer. Holding the context itself keeps its memory from
    being reused by another tensor; the version counters catch in-place edits."""

    def __init__(self):
        self.entry = None

    @staticmethod
    def _key(attn, context):
        try:
            versions = (context._version, attn.to_k.weight._version, attn.to_v.weight._version)
        except RuntimeError:  # inference tensors carry no version counter
            versions = None
        return versions

    def get(self, attn, context):
        if torch.is_grad_enabled() and (context.requires_grad or attn.to_k.weight.requires_grad):
            return project_kv(attn, context)  # gradients must reach the projections: no caching
        e = self.entry
        key = self._key(attn, context)
        if e is not None and e[0] is context and e[1] == key and key is not None:
            return e[2], e[3]
        k, v = project_kv(attn, context)
        self.entry = (context, key, k, v)
        return k, v


class StattnAttnProcessor:
    """Cross-attention through :func:`stattn.region_attention`, with an optional controller."""

    def __init__(self, name: str, original, controller: Optional[Controller] = None,
                 tracker: Optional[StepTracker] = None):
        self.name = name
        self.original = original
        self.controller = controller
        self.tracker = tracker
        self.cache = _KVCache()

    def _accelerates(self, attn, hidden_states, context, attention_mask) -> bool:
        if context is None or attention_mask is not None:
            return False
        head_dim = attn.to_q.out_features // attn.heads
        return (head_dim <= MAX_HEAD_DIM and hidden_states.shape[0] == context.shape[0]
                and hidden_states.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64))

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if not self._accelerates(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        B, M, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        D = q.shape[-1] // attn.heads
        q = q.view(B, M, attn.heads, D).transpose(1, 2)  # a view: the kernel takes strides
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        k, v = self.cache.get(attn, encoder_hidden_states)
        out = None
        if self.controller is not None:
            t = self.tracker
            grid = layer_grid(t.latent_hw if t else None, M) if input_ndim == 3 else (height, width)
            call = CrossAttentionCall(self.name, attn, q, k, v, encoder_hidden_states, grid,
                                      t.step if t else -1, t.timestep if t else None, attn.scale,
                                      t.step_tensor if t else None, t.generation if t else None)
            out = self.controller.attention(call)
        if out is None:
            out = region_attention(q, k, v, scale=attn.scale)
        hidden_states = out.transpose(1, 2).reshape(B, M, attn.heads * D).to(q.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def unet_of(pipe_or_unet) -> torch.nn.Module:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    if not hasattr(unet, "attn_processors"):
        raise TypeError(f"expected a diffusers pipeline or UNet, got {type(pipe_or_unet).__name__}")
    return unet


def _pipeline_of(x):
    """The diffusers pipeline to hook for generation boundaries: ``x`` itself, a Runner's pipe, or
    None for a bare UNet."""
    pipe = getattr(x, "pipe", x)              # stattn.Runner keeps its pipeline as .pipe
    if pipe is unet_of(x) or not hasattr(pipe, "unet"):
        return None
    return pipe


def accelerate(pipe_or_unet, controller: Optional[Controller] = None):
    """Install the fused cross-attention processor on every ``attn2`` (cross-attention) module.

    With a controller, a UNet pre-hook tracks the step and latent size and the controller sees
    every call; given a pipeline (or a Runner), its calls are hooked so that every call starts a
    new generation (:mod:`stattn.pipeline_calls`). Calling again replaces the controller;
    :func:`restore` undoes everything. Returns the pipeline or UNet it was given."""
    unet = unet_of(pipe_or_unet)
    restore(unet)
    tracker = StepTracker(controller) if controller is not None else None
    originals = {}
    for name, module in unet.named_modules():
        if getattr(module, "is_cross_attention", False) and hasattr(module, "processor"):
            originals[name] = module.processor
            module.set_processor(StattnAttnProcessor(name, module.processor, controller, tracker))
    if not originals:
        raise ValueError("accelerate: this UNet has no cross-attention module to accelerate")
    handle = unet.register_forward_pre_hook(tracker, with_kwargs=True) if tracker is not None else None
    pipe = _pipeline_of(pipe_or_unet) if tracker is not None else None
    if pipe is not None:
        pipeline_calls.attach(pipe, tracker)
    unet._stattn = (originals, handle, tracker, pipe)
    return pipe_or_unet


def restore(pipe_or_unet):
    """Put back the processors :func:`accelerate` replaced and remove its hook."""
    unet = unet_of(pipe_or_unet)
    state = getattr(unet, "_stattn", None)
    if state is None:
        return pipe_or_unet
    originals, handle, tracker, pipe = state
    modules = dict(unet.named_modules())
    for name, proc in originals.items():
        modules[name].set_processor(proc)
    if handle is not None:
        handle.remove()
    if pipe is not None:
        pipeline_calls.detach(pipe, tracker)
    del unet._stattn
    return pipe_or_unet


def tracker_of(pipe_or_unet) -> Optional[StepTracker]:
    state = getattr(unet_of(pipe_or_unet), "_stattn", None)
    return state[2] if state else None
