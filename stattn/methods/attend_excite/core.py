"""Attend-and-Excite's loss on a batch of images at once, from the fused op's maps.

diffusers' ``StableDiffusionAttendAndExcitePipeline`` computes, per image (its loop runs one image at a
time): the conditional prompt's cross-attention probabilities at the layers whose M equals
``attn_res[0] * attn_res[1]``, averaged over heads and layers (``AttentionStore.aggregate_attention``),
reshaped to ``attn_res``; the start token and the last position dropped (``[:, :, 1:-1]``), times 100,
re-softmaxed over the remaining 75 tokens; each target token's map padded by reflection and smoothed by
a 3x3 Gaussian (``GaussianSmoothing``), its maximum taken; the loss is the largest
``max(0, 1 - max)`` over the targets. Here the same for a batch [B] with per-image targets: the maps
come in as [B, M, N - 2] (region 0's probabilities of the key columns 1 .. N-2, averaged over heads,
from ``region_attention(..., return_probs=cols)``) and the per-image losses go out as [B]; every
image's loss depends on its own latent only, so the gradient of their sum is each image's own.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SOFTMAX_SCALE", "smoothing_kernel", "aggregate", "max_attention_per_token", "losses", "step_sizes",
           "map_columns"]

SOFTMAX_SCALE = 100.0     # the maps times 100 before the softmax over tokens
KERNEL_SIZE = 3
SIGMA = 0.5


def map_columns(n_keys: int) -> range:
    """Key columns the loss reads: the start token (0) and the last position (N - 1) are dropped."""
    return range(1, n_keys - 1)


def smoothing_kernel(dtype=torch.float32, device=None) -> Tensor:
    """diffusers' ``GaussianSmoothing()`` weight [1, 1, 3, 3], computed as it does (in float32, then
    cast). Its quirk: exp(-((x - mean) / (2 sigma))^2) instead of exp(-(x - mean)^2 / (2 sigma^2)),
    so sigma = 0.5 acts as a Gaussian of standard deviation 1/sqrt(2) (neighbour weight e^-1, not e^-2)."""
    x = torch.arange(KERNEL_SIZE, dtype=torch.float32)
    mean = (KERNEL_SIZE - 1) / 2
    g = 1 / (SIGMA * math.sqrt(2 * math.pi)) * torch.exp(-(((x - mean) / (2 * SIGMA)) ** 2))
    kernel = g[:, None] * g[None, :]
    kernel = kernel / torch.sum(kernel)
    return kernel.view(1, 1, KERNEL_SIZE, KERNEL_SIZE).to(dtype=dtype, device=device)


def aggregate(maps: Sequence[Tensor], heads: Sequence[int]) -> Tensor:
    """The mean over layers and heads of per-layer head means [B, M, T]: weighted by each layer's
    head count, as the pipeline's mean over every (layer, head) map."""
    if not maps:
        raise ValueError("maps: no attention maps to aggregate")
    total = sum(heads)
    out = maps[0] * (heads[0] / total)
    for m, h in zip(maps[1:], heads[1:]):
        out = out + m * (h / total)
    return out


def max_attention_per_token(maps: Tensor, attn_res: tuple, targets: Tensor) -> Tensor:
    """maps [B, M, T] (the aggregated text columns 1 .. N-2, M = attn_res[0] * attn_res[1]) and
    targets [B, K] (key indices, >= 1) -> [B, K]: each target's maximum of its re-softmaxed,
    smoothed map. The flat M is reshaped to attn_res as the pipeline does (row-major, whatever the
    layer's real height and width)."""
    B, M, T = maps.shape
    r0, r1 = attn_res
    if M != r0 * r1:
        raise ValueError(f"maps: {M} pixels, but attn_res {tuple(attn_res)} has {r0 * r1}")
    text = F.softmax(maps.reshape(B, r0, r1, T) * SOFTMAX_SCALE, dim=-1)
    K = targets.shape[1]
    picked = torch.take_along_dim(text, (targets - 1).to(text.device)[:, None, None, :], dim=-1)   # [B, r0, r1, K]
    images = picked.permute(0, 3, 1, 2).reshape(B * K, 1, r0, r1)
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    smoothed = F.conv2d(padded, smoothing_kernel(text.dtype, text.device))
    return smoothed.reshape(B, K, r0 * r1).amax(dim=-1)


def losses(max_per_token: Tensor, valid: Tensor) -> Tensor:
    """[B, K] maxima and [B, K] which entries are real targets (rows may have fewer) -> [B]: the
    pipeline's max over targets of max(0, 1 - max) (exactly 0, with no gradient, where every target
    reaches 1)."""
    short = 1.0 - max_per_token
    short = torch.where(valid & (short > 0), short, torch.zeros_like(short))
    return short.amax(dim=1)


def step_sizes(scale_factor: float, n_timesteps: int) -> list:
    """The latent step size of each loop turn: scale_factor * sqrt(linspace(1, 0.5, n)) (numpy, as
    the released code and the pipeline compute it)."""
    import numpy as np

    return [float(s) for s in scale_factor * np.sqrt(np.linspace(1.0, 0.5, n_timesteps))]
