"""diffusers' ``StableDiffusionAttendAndExcitePipeline`` under :func:`stattn.accelerate`: its own loop,
unchanged, with its attention through stattn.

At every call the pipeline installs ``AttendExciteAttnProcessor(attnstore, place)`` on every attention
layer (``register_attention_control``): eager softmax(q k^T attn.scale) v, and, when the probabilities
require grad, ``attnstore(probs [B*H, M, N], is_cross, place)`` — which counts every layer and keeps
the cross-attention maps at ``attn_res``. Here:

- cross-attention (``attn2``): :class:`StattnAttendExciteProcessor` (registered in
  :func:`stattn.integration.processors.exact_processors`, so the accelerate watcher wraps the
  pipeline's processors at the next UNet call): the fused op; at the layers the store keeps, with
  ``return_probs=True`` — the head mean repeated per head, so the store's mean over its [B*H, M, N]
  items is the same — cast to the model dtype as the stock probabilities are;
- self-attention (``attn1``): :class:`SelfAttendExcite`, installed by the pipeline instance's
  ``register_attention_control`` (patched by ``accelerate(pipe)``, put back by ``restore``): SDPA with
  ``scale=attn.scale``, and the store told of the layer as the stock processor tells it.

The pipeline's loop, losses, refinement and updates are its own; the latents equal the stock
pipeline's within fp32 rounding (tests/test_attend_excite.py).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ...integration.processors import StattnAttnProcessor, _heads
from ...integration.signatures import fixed_signature
from ...ops import region_attention

__all__ = ["StattnAttendExciteProcessor", "SelfAttendExcite", "MODULE", "processor_class", "is_pipeline",
           "attach", "detach", "module_reason"]

MODULE = "diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite"


def processor_class() -> type:
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite \
        import AttendExciteAttnProcessor

    return AttendExciteAttnProcessor


def is_pipeline(pipe) -> bool:
    """Whether ``pipe`` is diffusers' Attend-and-Excite pipeline (or a subclass)."""
    return any(c.__module__ == MODULE and c.__name__ == "StableDiffusionAttendAndExcitePipeline"
               for c in type(pipe).__mro__)


def module_reason(attn):
    """Why the stock processor's plain to_q / to_k / to_v attention would differ from stattn's
    processor on this module (None: it does not)."""
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross:
        return "AttendExciteAttnProcessor ignores the module's spatial / group / cross norm"
    if attn.residual_connection or attn.rescale_output_factor != 1.0:
        return "AttendExciteAttnProcessor ignores the module's residual connection / output rescale"
    return None


def _recorded(q, k) -> bool:
    """Whether the stock probabilities would require grad (it feeds the store only then)."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)


class StattnAttendExciteProcessor(StattnAttnProcessor):
    """AttendExciteAttnProcessor on a cross-attention layer through the fused op (see the module)."""

    def _stock_reason(self, hidden_states, context, attention_mask):
        why = super()._stock_reason(hidden_states, context, attention_mask)
        if why is None and hidden_states.ndim != 3:
            why = "4-D hidden states"
        if why is None and self.controller is not None:
            why = "a controller (the Attend-and-Excite pipeline's maps are those of its plain attention)"
        return why

    def _fused(self, attn, hidden_states, context, temb):
        store, place = self.original.attnstore, self.original.place_in_unet
        q, frame = self._query(attn, hidden_states, temb)      # module_reason: to_q alone here
        k, v = self.cache.get(attn, context)
        q = _heads(q, attn.heads, k.shape[-1])
        B, H, M, _ = q.shape
        scale = self._exact.scale(attn, q.shape[-1])
        recorded = _recorded(q, k)
        if recorded and store.cur_att_layer >= 0 and M == np.prod(store.attn_res):
            out, P = region_attention(q, k, v, scale=scale, return_probs=True)
            N = P.shape[-1]
            maps = P.to(q.dtype)[:, None].expand(B, H, M, N).reshape(B * H, M, N)
        else:
            out = self._plain(q, k, v, scale)
            maps = q.new_empty((0, M, 0))      # what the store reads of a map it does not keep: shape[1]
        if recorded:
            store(maps, True, place)
        return self._output(attn, out.to(q.dtype), frame)


class SelfAttendExcite:
    """AttendExciteAttnProcessor on a self-attention layer with SDPA instead of its eager softmax."""

    def __init__(self, original):
        self.original = original

    @fixed_signature
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3 or \
                attn.inner_kv_dim != attn.inner_dim:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        B, M, HD = q.shape
        H = attn.heads
        q, k, v = (_heads(x, H, HD // H) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        if _recorded(q, k):
            self.original.attnstore(None, False, self.original.place_in_unet)   # counted, not kept
        out = out.transpose(1, 2).reshape(B, M, HD).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _register_attention_control(pipe) -> None:
    """The pipeline's own registration, then SDPA on its self-attention layers."""
    type(pipe).register_attention_control(pipe)
    cls = processor_class()
    for _, m in pipe.unet.named_modules():
        proc = getattr(m, "processor", None)
        if type(proc) is cls and not m.is_cross_attention:
            m.set_processor(SelfAttendExcite(proc))


def attach(pipe) -> None:
    object.__setattr__(pipe, "register_attention_control", functools.partial(_register_attention_control, pipe))


def detach(pipe) -> None:
    patched = vars(pipe).get("register_attention_control")
    if isinstance(patched, functools.partial) and patched.func is _register_attention_control:
        del vars(pipe)["register_attention_control"]
