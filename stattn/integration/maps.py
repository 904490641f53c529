"""Cross-attention maps of chosen prompt tokens, recorded during generation, and a heatmap figure.

:class:`AttentionMaps` is a :class:`stattn.Controller` that records, at every accelerated
cross-attention call, the softmax probability of the chosen key columns for the conditional rows,
averaged over heads; per grid size it keeps a running sum on the device (no host sync), and
:meth:`AttentionMaps.maps` resizes every grid to the largest and averages. It can wrap the
controller of a method (``inner``), whose output it passes through unchanged, so the maps of an
edited generation are recorded along the edited trajectory (the probabilities recorded are those of
the unedited logits of each call). The maps are the fused op's probability side output
(``region_attention(..., return_probs=tokens)``), never an eager softmax.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..ops import region_attention
from .control import Controller, CrossAttentionCall, cond_start

__all__ = ["AttentionMaps", "heatmap_figure"]


class AttentionMaps(Controller):
    def __init__(self, tokens: Sequence[int], *, cfg: Optional[bool] = None, inner: Optional[Controller] = None,
                 max_pixels: int = 32 * 32):
        tokens = [int(t) for t in tokens]
        if not tokens or min(tokens) < 0:
            raise ValueError(f"tokens: expected a non-empty list of key indices >= 0, got {tokens}")
        self.tokens = tokens
        self.cfg = cfg              # None: the call's guidance (rows [uncond, cond]: record the second half)
        self.inner = inner
        self.max_pixels = max_pixels  # layers with more pixels are skipped (cost; P2P uses 16x16)
        self.reset()

    # the wrapped controller sees everything it would see alone
    def reset(self) -> None:
        self._sums: dict = {}
        self._counts: dict = {}
        if self.inner is not None:
            self.inner.reset()

    def begin_generation(self, generation) -> None:
        if self.inner is not None:
            self.inner.begin_generation(generation)

    def begin_step(self, step, timestep) -> None:
        if self.inner is not None:
            self.inner.begin_step(step, timestep)

    def graph_key(self, step):
        return self.inner.graph_key(step) if self.inner is not None else None

    def attention(self, call: CrossAttentionCall):
        out = self.inner.attention(call) if self.inner is not None else None
        if call.grid is not None and call.grid[0] * call.grid[1] <= self.max_pixels:
            out = self._record(call, out)
        return out

    def _record(self, call: CrossAttentionCall, out):
        """The maps from the op's probability side output: where the layer is plain (``out`` None)
        the recorder makes the layer's call itself and takes output and maps from that one pass;
        where the inner controller computed the output, one call on the conditional rows."""
        N = call.k.shape[-2]
        if max(self.tokens) >= N:
            raise ValueError(f"tokens: index {max(self.tokens)} is out of range for {N} prompt keys")
        c0 = cond_start(call, self.cfg)
        if out is None:
            out, p = region_attention(call.q, call.k, call.v, scale=call.scale, return_probs=self.tokens)
            p = p[c0:]                                                 # [b, M, T]
        else:
            _, p = region_attention(call.q[c0:], call.k[c0:], call.v[c0:], scale=call.scale,
                                    return_probs=self.tokens)
        p = p.float()
        h, w = call.grid
        m = p.transpose(1, 2).reshape(p.shape[0], len(self.tokens), h, w)
        if call.grid in self._sums:
            self._sums[call.grid] += m
            self._counts[call.grid] += 1
        else:
            self._sums[call.grid], self._counts[call.grid] = m.clone(), 1
        return out

    def maps(self) -> torch.Tensor:
        """[images, T, h, w] on the CPU: the average over steps, layers and heads, at the largest
        recorded grid. Raises if nothing was recorded."""
        if not self._sums:
            raise RuntimeError("AttentionMaps: nothing recorded (no cross-attention layer within "
                               f"max_pixels={self.max_pixels}, or no generation ran)")
        grid = max(self._sums, key=lambda g: g[0] * g[1])
        total = sum(F.interpolate(s, size=grid, mode="bilinear", align_corners=False) for s in self._sums.values())
        return (total / sum(self._counts.values())).float().cpu()


# ----------------------------------------------------------------------------- figure
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float32)  # inferno


def _colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB uint8 by linear interpolation between inferno anchor colours."""
    pos = np.clip(x, 0, 1) * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    return (_ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac).astype(np.uint8)


def heatmap_figure(image, maps: torch.Tensor, labels: Sequence[str], alpha: float = 0.6):
    """One row: the image, then per token its attention map (min-max normalised, inferno colours)
    blended over the image, with the token's label underneath. `maps` [T, h, w]; returns a PIL image."""
    from PIL import Image, ImageDraw

    if maps.ndim != 3 or maps.shape[0] != len(labels):
        raise ValueError(f"maps: expected [T, h, w] with T = len(labels) = {len(labels)}, got {tuple(maps.shape)}")
    image = image.convert("RGB")
    W, H = image.size
    base = np.asarray(image, dtype=np.float32)
    panels = [image]
    for m in maps:
        m = F.interpolate(m[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0].numpy()
        span = m.max() - m.min()
        m = (m - m.min()) / span if span > 0 else np.zeros_like(m)
        panels.append(Image.fromarray((base * (1 - alpha) + _colormap(m) * alpha).astype(np.uint8)))
    pad = 18
    fig = Image.new("RGB", (W * len(panels), H + pad), "white")
    draw = ImageDraw.Draw(fig)
    for i, (panel, label) in enumerate(zip(panels, ["image", *labels])):
        fig.paste(panel, (i * W, 0))
        draw.text((i * W + 4, H + 3), str(label), fill="black")
    return fig
