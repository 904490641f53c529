"""Separable Gaussian basis for score offsets, and the ``ScoreOffset`` description.

S[b,h,(y,x),t] = sum_ij gy[y,i] * theta[b,h,t,i,j] * gx[x,j]: the offset added to the logits of
target token ``tokens[t]`` of region 0 (Attention Regulation, spec: attention-regulation.md).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["gaussian_basis", "ScoreOffset"]


def _axis_basis(size: int, sigma: int, dtype, device) -> torch.Tensor:
    centres = torch.arange(2 * sigma, size, 2 * sigma, dtype=torch.float64)
    pos = torch.arange(size, dtype=torch.float64)
    g = torch.exp(-((pos[:, None] - centres[None, :]) ** 2) / (2.0 * sigma * sigma))
    return g.to(dtype=dtype, device=device)


def gaussian_basis(h: int, w: int, sigma: int | None = None, *, dtype=torch.float32, device=None):
    """Return ``(gy [h, Ky], gx [w, Kx])``: unnormalised Gaussians (peak 1) on the latent grid.

    Rule of the released Attention Regulation code: sigma = w // 16, clamped to >= 1 (the release
    crashes at 8x8 where it becomes 0); centres at 2*sigma, 4*sigma, ... < size along each axis.
    G_k(r, c) = gy[r, i] * gx[c, j] with row r and column c 0-based.
    """
    for name, val in (("h", h), ("w", w)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"gaussian_basis: {name} must be a positive int, got {val!r}")
    if sigma is None:
        sigma = max(1, w // 16)
    if not isinstance(sigma, int) or isinstance(sigma, bool) or sigma < 1:
        raise ValueError(f"gaussian_basis: sigma must be a positive int, got {sigma!r}")
    if 2 * sigma >= min(h, w):
        raise ValueError(
            f"gaussian_basis: a {h}x{w} grid has no Gaussian centre at 2*sigma = {2 * sigma}; "
            "use a larger grid or a smaller sigma")
    return _axis_basis(h, sigma, dtype, device), _axis_basis(w, sigma, dtype, device)


def _int_tuple(name: str, values) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype.is_floating_point or values.dtype == torch.bool:
            raise TypeError(f"ScoreOffset: {name} must be a 1-D integer tensor or a sequence of ints, "
                            f"got a {values.dtype} tensor of shape {tuple(values.shape)}")
        values = values.tolist()
    try:
        out = tuple(int(v) for v in values)
    except TypeError:
        raise TypeError(f"ScoreOffset: {name} must be a sequence of ints, got {values!r}") from None
    if any(isinstance(v, float) for v in values):
        raise TypeError(f"ScoreOffset: {name} must hold ints, got {values!r}")
    if any(v < 0 for v in out):
        raise ValueError(f"ScoreOffset: {name} must be non-negative token indices, got {out}")
    if len(set(out)) != len(out):
        raise ValueError(f"ScoreOffset: {name} must not repeat a token index, got {out}")
    return out


class ScoreOffset:
    """Gaussian-basis offset on region 0's logits for target tokens.

    theta  [B, H, T, Ky, Kx] float32 (float64 on the reference path): one coefficient set per image,
           head and target token.
    tokens T indices into region 0's keys (the target columns).
    basis  (gy [h, Ky], gx [w, Kx]) as from :func:`gaussian_basis`; h * w must equal M.
    pinned token indices of region 0 whose probability is taken from the un-offset logits
           (the released Attention Regulation pins SOS and the first EOS).
    """

    def __init__(self, theta: torch.Tensor, tokens: Sequence[int], basis, pinned: Sequence[int] = ()):
        if not isinstance(theta, torch.Tensor):
            raise TypeError(f"ScoreOffset: theta must be a tensor, got {type(theta).__name__}")
        if theta.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"ScoreOffset: theta must be float32 (or float64), got {theta.dtype}")
        if theta.dim() != 5:
            raise ValueError(f"ScoreOffset: theta must have shape [B, H, T, Ky, Kx], got {tuple(theta.shape)}")
        try:
            gy, gx = basis
        except (TypeError, ValueError):
            raise TypeError("ScoreOffset: basis must be a pair (gy [h, Ky], gx [w, Kx])") from None
        for name, g in (("basis gy", gy), ("basis gx", gx)):
            if not isinstance(g, torch.Tensor) or g.dim() != 2 or not g.dtype.is_floating_point:
                raise TypeError(f"ScoreOffset: {name} must be a 2-D float tensor, got "
                                f"{getattr(g, 'shape', type(g).__name__)}")
            if g.device != theta.device:
                raise ValueError(f"ScoreOffset: {name} is on {g.device} but theta is on {theta.device}")
        self.tokens = _int_tuple("tokens", tokens)
        self.pinned = _int_tuple("pinned", pinned)
        B, H, T, Ky, Kx = theta.shape
        if T != len(self.tokens):
            raise ValueError(f"ScoreOffset: theta has T = {T} token slots but tokens has {len(self.tokens)} entries")
        if (Ky, Kx) != (gy.shape[1], gx.shape[1]):
            raise ValueError(f"ScoreOffset: theta's basis dims (Ky, Kx) = {(Ky, Kx)} do not match the basis "
                             f"(gy [{gy.shape[0]}, {gy.shape[1]}], gx [{gx.shape[0]}, {gx.shape[1]}])")
        self.theta = theta
        self.gy = gy
        self.gx = gx
        self._device_cache: dict = {}

    @property
    def grid(self) -> tuple[int, int]:
        return self.gy.shape[0], self.gx.shape[0]

    def device_tensors(self, n_keys: int):
        """Token indices int32 [T] and pinned flags int32 [n_keys] on theta's device, built once
        per ScoreOffset by scalar fills, not host-to-device copies, so that building them is
        legal inside CUDA-graph capture too."""
        key = (n_keys, self.theta.device)
        if key not in self._device_cache:
            dev = self.theta.device
            tokens = torch.empty(len(self.tokens), dtype=torch.int32, device=dev)
            for i, tok in enumerate(self.tokens):
                tokens[i] = tok
            pin = torch.zeros(n_keys, dtype=torch.int32, device=dev)
            for i in self.pinned:
                pin[i] = 1
            self._device_cache[key] = (tokens, pin)
        return self._device_cache[key]

    def __repr__(self) -> str:
        h, w = self.grid
        return (f"ScoreOffset(theta={tuple(self.theta.shape)}, tokens={self.tokens}, grid={h}x{w}, "
                f"pinned={self.pinned})")
