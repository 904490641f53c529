"""The one small interface through which attention-control methods plug into a UNet.

A :class:`Controller` sees every accelerated cross-attention call of a UNet (stock diffusers
pipeline or :class:`stattn.Runner` alike) as a :class:`CrossAttentionCall` and may return the
attention output itself (usually through :func:`stattn.region_attention` with regions, weights or
an offset); returning None means plain cross-attention. The step bookkeeping is done by a UNet
forward pre-hook (:class:`StepTracker`), so the same controller works with any pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional

import torch


@dataclass
class CrossAttentionCall:
    """One cross-attention layer call, after the projections and before ``to_out``."""

    name: str                     # dotted module name, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    attn: torch.nn.Module         # the diffusers Attention module (heads, scale, to_q / to_k / to_v, flags)
    q: torch.Tensor               # [B, H, M, D]
    k: torch.Tensor               # [B, 1, H, N, D]: the prompt's keys as region 0
    v: torch.Tensor               # [B, 1, H, N, D]
    context: torch.Tensor         # encoder_hidden_states [B, N, C] the keys were projected from
    grid: Optional[tuple]         # (h, w) of this layer's feature map (M = h * w), None if unknown
    step: int                     # index of the UNet evaluation in the current generation (0-based)
    timestep: Optional[torch.Tensor]
    scale: float                  # the layer's logit scale (attn.scale)
    step_tensor: Optional[torch.Tensor] = None  # 0-d int64 on q's device holding `step`

    # Under CUDA-graph replay (stattn.Runner(cuda_graphs=True)) Python runs only at capture, so
    # `step` is the step the graph was captured at. Per-step arithmetic must read `step_tensor`
    # (updated in place before every replay) and step-dependent control flow must be declared via
    # Controller.graph_key, which selects the graph. Persistent state must be updated in place.

    def project(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [B, 1, H, N, D] of another context (e.g. an object's own description) through this
        layer's to_k / to_v, shaped as one more region."""
        return project_kv(self.attn, context)


class Controller:
    """Base controller: plain attention everywhere. Subclass and override what you need."""

    def reset(self) -> None:
        """A new generation starts (the first UNet call of a run)."""

    def begin_step(self, step: int, timestep) -> None:
        """Called before every UNet evaluation with its index in the run."""

    def attention(self, call: CrossAttentionCall) -> Optional[torch.Tensor]:
        """Return the attention output [B, H, M, D] for this call, or None for plain attention."""
        return None

    def graph_key(self, step: int) -> Hashable:
        """Steps with equal keys run the same Python path in `attention` (CUDA-graph mode captures
        one graph per key). The default says every step behaves alike."""
        return None


def cond_start(call: CrossAttentionCall, cfg: bool) -> int:
    """First conditional row of the batch: B/2 under classifier-free guidance (diffusers orders the
    batch [uncond; cond]), else 0. A method cannot tell the two apart from an even batch, hence `cfg`."""
    B = call.q.shape[0]
    if not cfg:
        return 0
    if B % 2:
        raise ValueError(f"cfg: with classifier-free guidance the batch is [uncond; cond], an even number of "
                         f"rows, but layer {call.name} got {B}; pass cfg=False when generating without "
                         "guidance (guidance_scale <= 1)")
    return B // 2


def project_kv(attn, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """to_k / to_v of `context` [B, N, C] as [B, 1, H, N, D] (norm_cross / norm_k honoured)."""
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    B, N, _ = context.shape
    k, v = attn.to_k(context), attn.to_v(context)
    D = k.shape[-1] // attn.heads
    k = k.view(B, N, attn.heads, D).transpose(1, 2)
    v = v.view(B, N, attn.heads, D).transpose(1, 2)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k.unsqueeze(1).contiguous(), v.unsqueeze(1).contiguous()


def layer_grid(latent_hw: Optional[tuple], M: int) -> Optional[tuple]:
    """(h, w) of a UNet level with M pixels, from the latent size: each downsampling is a stride-2
    convolution with padding 1, so sizes go n -> ceil(n / 2)."""
    if latent_hw is None:
        return None
    h, w = latent_hw
    while h * w > M and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    return (h, w) if h * w == M else None


class StepTracker:
    """UNet forward pre-hook: counts evaluations per generation and records the latent size.

    A generation starts when the timestep does not decrease (samplers walk timesteps downwards),
    or when `reset()` is called (the runner does so explicitly)."""

    def __init__(self, controller: Optional[Controller] = None):
        self.controller = controller
        self.step = -1
        self.timestep = None
        self.latent_hw = None
        self.step_tensor = None  # 0-d int64 on the UNet's device, = step
        self._last_t = None
        self.driven = False      # set by the runner, which then calls `set_step` itself

    def reset(self) -> None:
        self.step, self._last_t = -1, None
        if self.controller is not None:
            self.controller.reset()

    def set_step(self, step: int, timestep, device) -> None:
        """Make `step` current: outside any graph capture (fill_ of a Python scalar is baked in)."""
        if self.step_tensor is None or self.step_tensor.device != torch.device(device):
            self.step_tensor = torch.zeros((), dtype=torch.int64, device=device)
        self.step_tensor.fill_(step)
        self.step, self.timestep = step, timestep
        if self.controller is not None:
            self.controller.begin_step(step, timestep)

    def __call__(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.latent_hw = tuple(sample.shape[-2:])
        if self.driven:
            return
        t_val = float(t.flatten()[0]) if isinstance(t, torch.Tensor) and not _capturing(t) else t
        if isinstance(t_val, (int, float)):
            if self._last_t is not None and t_val >= self._last_t:
                self.reset()
            self._last_t = t_val
        self.set_step(self.step + 1, t, sample.device)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
