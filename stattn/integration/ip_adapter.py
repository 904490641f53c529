"""IP-Adapter's decoupled cross-attention as one :func:`stattn.region_attention` call.

diffusers' ``IPAdapterAttnProcessor2_0`` / ``IPAdapterAttnProcessor`` receive
``encoder_hidden_states = (text [B, N, C], [image-prompt states per adapter])`` and compute

    softmax(q k_text^T s) v_text + sum_j scale_j * softmax(q k_j^T s) v_j            (no mask)
    ... + sum_j sum_i scale_j[i] * mask_ji(m) * softmax(q k_ji^T s) v_ji             (ip_adapter_masks)

with k_j = to_k_ip[j](image states of adapter j) (its images' tokens concatenated without a mask,
one softmax per image with one), s the processor's logit scale, and zero scales skipped. That is a
multi-region attention: region 0 the text (weight 1), one region per image-prompt branch with its
scale folded into a float mask [B, M] (``IPAdapterMaskProcessor.downsample`` of the user's mask, cast
to the query dtype as stock casts it, or ones), each region softmax-normalised over its own keys
(``key_lengths``: 77 text keys and 4 / 16 image tokens in one padded [B, R, H, N, D] call).
Anything else (a tensor context, an attention mask, masks or scales stock rejects, a list of scales
without masks, which stock cannot multiply) goes to the stock processor, which then raises its own
error where it has one.

The wrapper subclasses the stock class (diffusers finds IP-Adapter processors by isinstance:
``set_ip_adapter_scale``, ``unload_ip_adapter``) and shares its ``to_k_ip`` / ``to_v_ip`` modules
(state_dict names and ``.to()`` moves unchanged); ``scale`` and ``num_tokens`` are the stock
processor's own, so scales set either way are seen by both.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._validate import value_checks
from ..ops import region_attention
from .processors import (_DTYPES, _NOT_REPRODUCED, _RESTORED, StattnAttnProcessor, _Counts, _exact_for, _heads,
                         _KVCache)
from .signatures import fixed_signature

__all__ = ["StattnIPAdapterProcessor", "wrapper_class"]


class StattnIPAdapterProcessor(StattnAttnProcessor):
    """Base of the per-stock-class wrappers made by :func:`wrapper_class` (never used alone)."""

    def __init__(self, name: Optional[str] = None, original=None, controller=None, tracker=None):
        if original is None:
            raise TypeError(f"{type(self).__name__} wraps an IP-Adapter processor: pass original=")
        torch.nn.Module.__init__(self)
        object.__setattr__(self, "original", original)   # not a submodule: its weights are ours too
        self.to_k_ip, self.to_v_ip = original.to_k_ip, original.to_v_ip
        self.name, self.controller, self.tracker = name, controller, tracker
        self.cache = _KVCache()
        self.counts = _Counts()
        self.owner = None
        self._exact = _exact_for(self, original)

    # the stock processor's own settings (set_ip_adapter_scale edits `scale` in place or assigns it)
    scale = property(lambda self: self.original.scale, lambda self, v: setattr(self.original, "scale", v))
    num_tokens = property(lambda self: self.original.num_tokens,
                          lambda self, v: setattr(self.original, "num_tokens", v))
    hidden_size = property(lambda self: self.original.hidden_size)
    cross_attention_dim = property(lambda self: self.original.cross_attention_dim)

    @fixed_signature
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale=1.0, ip_adapter_masks=None):
        plan = self._plan(hidden_states, encoder_hidden_states, attention_mask, ip_adapter_masks)
        if isinstance(plan, str):
            self.counts.stock_call(plan, self)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, scale,
                                 ip_adapter_masks)
        self.counts.fused += 1
        return self._fused_ip(attn, hidden_states, encoder_hidden_states[0], temb, plan)

    def _plan(self, x, context, attention_mask, masks):
        """The image-prompt branches [(states [B, T, C], to_k, to_v, scale, mask [1|B, h, w] | None)],
        or why this call goes to the stock processor. Mirrors the stock checks and loop (zip
        truncates to the shortest of states, scales, projections and masks, as stock's does)."""
        if self._exact is None:
            return _NOT_REPRODUCED
        if self.owner is not None and self.owner[0].closed:
            return _RESTORED
        if not (isinstance(context, tuple) and len(context) == 2 and isinstance(context[0], torch.Tensor)):
            return "encoder_hidden_states that are not a (text, image-prompt states) tuple"
        text, states = context
        B = x.shape[0]
        if attention_mask is not None:
            return "an attention mask"
        if text.shape[0] != B:
            return "encoder_hidden_states of another batch size"
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype}"
        scales = self.scale
        if masks is not None:
            if not isinstance(masks, list):
                masks = list(masks.unsqueeze(1))
            if not len(masks) == len(scales) == len(states):
                return "ip_adapter_masks that do not match the adapters"
            for mask, s, st in zip(masks, scales, states):
                if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim != 4 or
                                         mask.shape[1] != st.shape[1] or
                                         (isinstance(s, list) and len(s) != mask.shape[1])):
                    return "ip_adapter_masks that do not match the image prompts"
        else:
            masks = [None] * len(scales)
        branches = []
        for st, s, to_k, to_v, mask in zip(states, scales, self.to_k_ip, self.to_v_ip, masks):
            if (all(w == 0 for w in s) if isinstance(s, list) else s == 0):
                continue
            if not isinstance(st, torch.Tensor) or st.shape[0] != B or st.ndim not in (3, 4):
                return "image-prompt states of another shape"
            if mask is None:
                if isinstance(s, list):
                    return "a list of IP-Adapter scales without ip_adapter_masks"
                branches.append((st, to_k, to_v, float(s), None))
                continue
            if st.ndim != 4:
                return "image-prompt states of another shape"
            per_image = s if isinstance(s, list) else [s] * mask.shape[1]
            branches += [(st[:, i], to_k, to_v, float(per_image[i]), mask[:, i])
                         for i in range(mask.shape[1]) if per_image[i] != 0]
        return branches

    def _fused_ip(self, attn, hidden_states, text, temb, branches):
        from diffusers.image_processor import IPAdapterMaskProcessor

        q, frame = self._query(attn, hidden_states, temb)
        k0, v0 = self.cache.get(attn, text)               # _why_not: no norm_q / norm_k here
        H, D = attn.heads, k0.shape[-1]
        q = _heads(q, H, D)
        B, _, M, _ = q.shape
        scale = self._exact.scale(attn, D)
        keys, values, alphas = [], [], []
        for st, to_k, to_v, w, mask in branches:
            keys.append(_heads(to_k(st).reshape(B, -1, H * D), H, D))   # images' tokens concatenated
            values.append(_heads(to_v(st).reshape(B, -1, H * D), H, D))
            alpha = None
            if mask is not None:
                alpha = IPAdapterMaskProcessor.downsample(mask, B, M, 1)[..., 0].to(q.dtype)
            alphas.append((w, alpha))
        out = self._controlled(attn, q, k0, v0, text, frame, scale)
        if out is None and not branches:                  # every image scale 0: the text attention alone
            out = self._plain(q, k0, v0, scale)
        elif out is None:
            out = _regions(q, [k0[:, 0], *keys], [v0[:, 0], *values], [(1.0, None), *alphas], scale)
        elif branches:      # the controller's text attention plus the image prompts
            out = out + _regions(q, keys, values, alphas, scale)
        return self._output(attn, out.to(q.dtype), frame)


def _regions(q, keys, values, alphas, scale):
    """sum_r alpha_r * softmax(q k_r^T scale) v_r over regions of their own lengths, in one call:
    keys / values [B, H, L_r, D]; alphas (weight, mask [B, M] | None)."""
    B, H, M, D = q.shape
    lengths = tuple(k.shape[2] for k in keys)
    N, R = max(lengths), len(keys)
    if R == 1 and alphas[0][1] is None and alphas[0][0] == 1.0:
        return region_attention(q, keys[0][:, None], values[0][:, None], scale=scale)
    k = q.new_zeros((B, R, H, N, D))
    v = q.new_zeros((B, R, H, N, D))
    mask_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    masks = torch.ones((B, R, M), dtype=mask_dtype, device=q.device)
    for r, (kr, vr, (w, alpha)) in enumerate(zip(keys, values, alphas)):
        k[:, r, :, :kr.shape[2]] = kr
        v[:, r, :, :vr.shape[2]] = vr
        if alpha is not None:
            masks[:, r] = alpha
        if w != 1.0:
            masks[:, r] *= w
    # value checks off: the masks come from the call's ip_adapter_masks, which diffusers' processor
    # multiplies in unchecked (a NaN reaches its output as it does stock's); reading them back here
    # would sync the host at every layer call on CUDA
    with value_checks(False):
        return region_attention(q, k, v, masks=masks, scale=scale,
                                key_lengths=lengths if min(lengths) < N else None)


_CLASSES: dict = {}


def wrapper_class(stock_cls: type) -> type:
    """The stattn wrapper of one IP-Adapter processor class: a subclass of both."""
    cls = _CLASSES.get(stock_cls)
    if cls is None:
        name = f"Stattn{stock_cls.__name__}"
        cls = _CLASSES[stock_cls] = type(name, (StattnIPAdapterProcessor, stock_cls),
                                         {"__module__": __name__, "__qualname__": name})
    return cls
