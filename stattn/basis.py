"""Separable Gaussian basis for score offsets, and the ``ScoreOffset`` description.

S[b,h,(y,x),t] = sum_ij gy[y,i] * theta[b,h,t,i,j] * gx[x,j]: the offset added to the logits of
target token ``tokens[t]`` of region 0 (Attention Regulation, docs/attention-regulation.md).
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


def _is_row(v) -> bool:
    """Whether an element of ``tokens`` / ``pinned`` is a whole row (per-row form) rather than an index."""
    if isinstance(v, torch.Tensor):
        return v.dim() >= 1
    return hasattr(v, "__len__") and not isinstance(v, (str, bytes))


def collapse_rows(rows: tuple[tuple[int, ...], ...]):
    """Per-row index tuples -> the shared tuple when every row is equal (or there are none)."""
    if not rows or all(r == rows[0] for r in rows):
        return rows[0] if rows else ()
    return rows


def _index_rows(name: str, values, B: int):
    """``tokens`` / ``pinned`` -> a tuple of ints (shared by all rows) or a tuple of B tuples
    (per row), collapsed to the shared form when every row is equal."""
    if isinstance(values, torch.Tensor) and values.dim() == 2:
        if values.dtype.is_floating_point or values.dtype == torch.bool:
            raise TypeError(f"ScoreOffset: {name} must be an integer tensor, got {values.dtype}")
        values = values.tolist()
    elif isinstance(values, torch.Tensor) or not _is_row(values):
        return _int_tuple(name, values)
    values = list(values)
    kinds = {_is_row(v) for v in values}
    if kinds != {True}:
        if True in kinds:
            raise TypeError(f"ScoreOffset: {name} must be a sequence of ints (shared by all rows) or a "
                            f"sequence of B sequences of ints (one per batch row), not a mix: got {values!r}")
        return _int_tuple(name, values)
    if len(values) != B:
        raise ValueError(f"ScoreOffset: {name} given per batch row has {len(values)} rows but theta has "
                         f"B = {B} batch rows")
    return collapse_rows(tuple(_int_tuple(f"{name}[{b}]", row) for b, row in enumerate(values)))


def _per_row(idx) -> bool:
    return bool(idx) and isinstance(idx[0], tuple)


class ScoreOffset:
    """Gaussian-basis offset on region 0's logits for target tokens.

    theta  [B, H, T, Ky, Kx] float32 (float64 on the reference path): one coefficient set per image,
           head and target token.
    tokens T indices into region 0's keys (the target columns), shared by every batch row; or per
           row: B sequences of T indices, or an int tensor [B, T] (prompts of different lengths).
    basis  (gy [h, Ky], gx [w, Kx]) as from :func:`gaussian_basis`; h * w must equal M.
    pinned token indices of region 0 whose probability is taken from the un-offset logits
           (the released Attention Regulation pins SOS and the first EOS); shared, or per row
           as B sequences (a row may pin any number of columns, none included). A column may
           not be both a target and pinned in the same row (its own attention would never be
           edited).

    Read back: ``tokens`` / ``pinned`` are a tuple of ints when shared and a tuple of B tuples when
    given per row with rows that differ (equal rows collapse to the shared form);
    ``tokens_per_row`` / ``pinned_per_row`` say which, and ``row_tokens(b)`` / ``row_pinned(b)``
    give batch row b's indices in either form.
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
        B, H, T, Ky, Kx = theta.shape
        self.tokens = _index_rows("tokens", tokens, B)
        self.pinned = _index_rows("pinned", pinned, B)
        for b in range(B if self.tokens_per_row else 1):
            n = len(self.row_tokens(b))
            if T != n:
                row = f"tokens[{b}]" if self.tokens_per_row else "tokens"
                raise ValueError(f"ScoreOffset: theta has T = {T} token slots but {row} has {n} entries")
        self._check_pinned_targets(B)
        if (Ky, Kx) != (gy.shape[1], gx.shape[1]):
            raise ValueError(f"ScoreOffset: theta's basis dims (Ky, Kx) = {(Ky, Kx)} do not match the basis "
                             f"(gy [{gy.shape[0]}, {gy.shape[1]}], gx [{gx.shape[0]}, {gx.shape[1]}])")
        self.theta = theta
        self.gy = gy
        self.gx = gx
        self._device_cache: dict = {}

    def _check_pinned_targets(self, B: int) -> None:
        """A pinned column keeps its un-offset probability, so a target that is also pinned would
        never get its own attention edited (its offset would only rescale the other columns, through
        the edited softmax's sum): rejected, per row, as AttentionRegulation rejects it."""
        for b in range(B if self.per_row else 1):
            clash = sorted(set(self.row_tokens(b)) & set(self.row_pinned(b)))
            if clash:
                where = f" in batch row {b}" if self.per_row else ""
                raise ValueError(f"ScoreOffset: token indices {clash} are both targets (tokens) and pinned{where}; "
                                 "a pinned column keeps its un-offset probability, so its own attention would "
                                 "never be edited: drop them from tokens or from pinned")

    @property
    def tokens_per_row(self) -> bool:
        return _per_row(self.tokens)

    @property
    def pinned_per_row(self) -> bool:
        return _per_row(self.pinned)

    @property
    def per_row(self) -> bool:
        """Whether the target tokens or the pinned columns differ between batch rows."""
        return self.tokens_per_row or self.pinned_per_row

    def row_tokens(self, b: int) -> tuple[int, ...]:
        """Batch row b's target columns."""
        return self.tokens[b] if self.tokens_per_row else self.tokens

    def row_pinned(self, b: int) -> tuple[int, ...]:
        """Batch row b's pinned columns."""
        return self.pinned[b] if self.pinned_per_row else self.pinned

    @property
    def grid(self) -> tuple[int, int]:
        return self.gy.shape[0], self.gx.shape[0]

    def device_tensors(self, n_keys: int):
        """Token indices int32 [T] (shared) or [B, T] (per row) and pinned flags int32 [n_keys] or
        [B, n_keys] on theta's device, built once per ScoreOffset by scalar fills, not host-to-device
        copies, so that building them is legal inside CUDA-graph capture too."""
        key = (n_keys, self.theta.device)
        if key not in self._device_cache:
            dev = self.theta.device
            rows = self.tokens if self.tokens_per_row else (self.tokens,)
            tokens = torch.empty(len(rows), self.theta.shape[2], dtype=torch.int32, device=dev)
            for b, row in enumerate(rows):
                for i, tok in enumerate(row):
                    tokens[b, i] = tok
            rows = self.pinned if self.pinned_per_row else (self.pinned,)
            pin = torch.zeros(len(rows), n_keys, dtype=torch.int32, device=dev)
            for b, row in enumerate(rows):
                for i in row:
                    pin[b, i] = 1
            self._device_cache[key] = (tokens if self.tokens_per_row else tokens[0],
                                       pin if self.pinned_per_row else pin[0])
        return self._device_cache[key]

    def __repr__(self) -> str:
        h, w = self.grid
        return (f"ScoreOffset(theta={tuple(self.theta.shape)}, tokens={self.tokens}, grid={h}x{w}, "
                f"pinned={self.pinned})")
