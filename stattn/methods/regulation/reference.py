"""Eager autograd reference of the released Attention Regulation algorithm, step for step.

This is the oracle the fused path (:func:`stattn.methods.regulation.core.inner_loop` + the offset in
:func:`stattn.region_attention`) is tested against, and the path ``AttentionRegulation(fused=False)``
runs. It follows the released code's own layout and order of operations:

- theta is flat, ``(n, K, T)`` with n = image * heads + head and the basis index k running over
  the column centre x in the outer loop and the row centre y in the inner loop; the basis is the
  full 2-D Gaussian ``G [K, h*w]`` built from its formula, not the separable factors;
- per layer call: logits of the conditional rows in fp32 (fp64 for fp64 input), then ``iters``
  iterations of autograd on L(theta) = w0 L_q + w1 L_m + w2 L_theta (+ beta * ||A' - A||, the
  paper's term, off by default), the best-iterate rule, then the blend with the carried best of
  the previous step and the 0.99^t decay, then the edited softmax with SOS and the first EOS
  pinned to their unedited probabilities, P V. Unconditional rows and steps >= edit_steps are
  plain attention.

Logits and softmax are always computed in fp32 here (fp64 for fp64 input), which is at least what
an attention module's ``upcast_attention`` / ``upcast_softmax`` flags ask for (the released code
computed fp16 logits whatever the flags said).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ...reference import compute_dtype

__all__ = ["released_basis", "to_flat", "from_flat", "initial_theta", "regulation_loss", "LossParts",
           "reference_inner_loop", "ReferenceInner", "edited_attention", "reference_layer_call",
           "ReferenceCall", "default_thr"]


def default_thr(T: int) -> float:
    """The mean-attention target thr: min(1, 0.2 T), so each target token's mean probability
    should reach thr / T."""
    return min(1.0, 0.2 * T)


# ------------------------------------------------------------------------------------------ basis

def released_basis(h: int, w: int, *, dtype=torch.float64, device=None) -> Tensor:
    """G [K, h*w]: G_k(r, c) = exp(-((c - x_k)^2 + (r - y_k)^2) / (2 sigma^2)), sigma = w // 16
    clamped to >= 1 (the release divides by zero at 8x8), centres 2 sigma, 4 sigma, ... < size,
    k = ix * Ky + iy (x outer, y inner, as the released loop), pixels row-major (m = r * w + c)."""
    sigma = max(1, w // 16)
    ys = torch.arange(2 * sigma, h, 2 * sigma, dtype=torch.float64)
    xs = torch.arange(2 * sigma, w, 2 * sigma, dtype=torch.float64)
    r = torch.arange(h, dtype=torch.float64)[:, None]
    c = torch.arange(w, dtype=torch.float64)[None, :]
    maps = [torch.exp(-((c - x) ** 2 + (r - y) ** 2) / (2.0 * sigma * sigma)).flatten()
            for x in xs for y in ys]
    if not maps:
        raise ValueError(f"grid: a {h}x{w} grid has no Gaussian centre at 2*sigma = {2 * sigma}")
    return torch.stack(maps).to(dtype=dtype, device=device)


def to_flat(theta: Tensor) -> Tensor:
    """[B, H, T, Ky, Kx] (stattn.ScoreOffset layout) -> released (B*H, K, T), k = ix * Ky + iy."""
    B, H, T, Ky, Kx = theta.shape
    return theta.permute(0, 1, 4, 3, 2).reshape(B * H, Kx * Ky, T)


def from_flat(theta: Tensor, B: int, H: int, Ky: int, Kx: int) -> Tensor:
    """Released (B*H, K, T) -> [B, H, T, Ky, Kx]."""
    T = theta.shape[-1]
    return theta.reshape(B, H, Kx, Ky, T).permute(0, 1, 4, 3, 2).contiguous()


def initial_theta(B: int, H: int, T: int, Ky: int, Kx: int, *, init: str = "uniform",
                  generator: Optional[torch.Generator] = None, device=None,
                  dtype=torch.float32) -> Tensor:
    """theta_0 [B, H, T, Ky, Kx] of one layer call. ``"uniform"`` draws U[0, 1) exactly as the
    release does (``torch.rand(B*H, K, T)``, so the same RNG state gives the same coefficients),
    from ``generator`` or the global RNG of ``device``; a generator on another device draws there
    and is copied. ``"zeros"`` is the deterministic alternative."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if init == "zeros":
        return torch.zeros(B, H, T, Ky, Kx, dtype=dtype, device=device)
    if init != "uniform":
        raise ValueError(f"init: expected 'uniform' or 'zeros', got {init!r}")
    gen_device = generator.device if generator is not None else device
    flat = torch.rand(B * H, Kx * Ky, T, generator=generator, device=gen_device, dtype=torch.float32)
    return from_flat(flat.to(device=device, dtype=dtype), B, H, Ky, Kx)


# ------------------------------------------------------------------------------------------- loss

class LossParts(NamedTuple):
    loss: Tensor     # w0 * l_q + w1 * l_m + w2 * l_theta + beta * l_dev
    l_q: Tensor      # mean_{n,t} (quantile_q over pixels of P_t - q)^2
    l_m: Tensor      # mean_{n,t} (mean over pixels of P_t - thr/T)^2 (before its weight)
    l_theta: Tensor  # mean_{n,k,t} theta^2
    l_dev: Tensor    # mean_n ||A' - A||_F over all N columns (the paper's term; 0 unless beta)
    probs: Tensor    # P [n, M, T] at the target columns


def row_columns(tokens, n: int, device) -> Tensor:
    """Target columns per flattened row [n, T] from ``tokens``: T ints shared by every row, or one
    list of T ints per image (B lists; row b*H + h belongs to image b, H = n / B)."""
    t = torch.as_tensor([list(r) for r in tokens] if _per_image(tokens) else [list(tokens)], device=device)
    return t.repeat_interleave(n // t.shape[0], dim=0)


def _per_image(tokens) -> bool:
    return len(tokens) > 0 and not isinstance(tokens[0], int)


def _edited_logits(z: Tensor, tokens, theta_flat: Tensor, G: Tensor) -> Tensor:
    """z [n, M, N] with S = sum_k theta[n, k, t] G_k added to column tokens[t] (of the row's image)."""
    S = torch.einsum("km,nkt->nmt", G.to(z.dtype), theta_flat.to(z.dtype))
    onehot = torch.nn.functional.one_hot(row_columns(tokens, z.shape[0], z.device), z.shape[-1])  # [n, T, N]
    return z + torch.bmm(S, onehot.to(z.dtype))


def regulation_loss(z: Tensor, tokens, theta_flat: Tensor, G: Tensor, *,
                    quantile: float = 0.9, loss_weights=(1.0, 80.0, 0.09), thr: Optional[float] = None,
                    beta: float = 0.0) -> LossParts:
    """The loss of the released code for conditional logits z [n, M, N] (already scaled, fp32 or
    fp64), flat theta (n, K, T) and basis G [K, M]; differentiable in theta by autograd.
    P = softmax over all N keys (SOS, EOS, padding included) of the edited logits. ``tokens``: T
    target columns, or one list of T per image (a batch of different prompts)."""
    cols = row_columns(tokens, z.shape[0], z.device)               # [n, T]
    T = cols.shape[1]
    thr = default_thr(T) if thr is None else thr
    w0, w1, w2 = loss_weights
    P = torch.softmax(_edited_logits(z, tokens, theta_flat, G), dim=-1)
    Pt = P.gather(-1, cols[:, None, :].expand(-1, P.shape[1], -1))  # [n, M, T]
    qv = torch.quantile(Pt, quantile, dim=1)                       # linear interpolation, as released
    l_q = ((qv - quantile) ** 2).mean()
    l_m = ((Pt.mean(dim=1) - thr / T) ** 2).mean()
    l_theta = theta_flat.to(z.dtype).square().mean()
    loss = w0 * l_q + w1 * l_m + w2 * l_theta
    l_dev = z.new_zeros(())
    if beta:
        l_dev = (P - torch.softmax(z, dim=-1)).flatten(1).norm(dim=1).mean()
        loss = loss + beta * l_dev
    return LossParts(loss, l_q, l_m, l_theta, l_dev, Pt)


# ------------------------------------------------------------------------------------- inner loop

class ReferenceInner(NamedTuple):
    theta_best: Tensor   # [B, H, T, Ky, Kx]
    best_iter: Tensor    # 0-d int64
    losses: Tensor       # [iters]: L(theta_i)


def _cond_logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """z [B*H, M, N] = scale * q k^T in the compute dtype (fp32, fp64 for fp64 input)."""
    ct = compute_dtype(q)
    B, H, M, _ = q.shape
    z = torch.einsum("bhmd,bhnd->bhmn", q.to(ct), k.to(ct)) * scale
    return z.reshape(B * H, M, k.shape[2])


def reference_inner_loop(q: Tensor, k: Tensor, tokens: Sequence[int], theta0: Tensor, grid, *, scale: float,
                         iters: int = 20, lr: float = 100.0, quantile: float = 0.9,
                         loss_weights=(1.0, 80.0, 0.09), thr: Optional[float] = None,
                         beta: float = 0.0) -> ReferenceInner:
    """The released per-layer-call optimisation with autograd. q [B, H, M, D] (conditional rows),
    k [B, H, N, D], theta0 [B, H, T, Ky, Kx], grid (h, w) with h*w = M.

    For i in 0 .. iters-1: evaluate L(theta_i); keep theta_i if L(theta_i) < best (strictly, best
    starts at +inf, one best for all images and heads); theta_{i+1} = theta_i - lr * n * dL/dtheta
    (n = B*H undoes the mean over heads). The last update is never evaluated."""
    B, H, M, _ = q.shape
    h, w = grid
    Ky, Kx = theta0.shape[-2:]
    ct = compute_dtype(q)
    z = _cond_logits(q, k, scale)
    G = released_basis(h, w, dtype=ct, device=q.device)
    n = B * H
    theta = to_flat(theta0.to(ct))
    best = torch.full((), float("inf"), dtype=ct, device=q.device)
    best_iter = torch.zeros((), dtype=torch.int64, device=q.device)
    theta_best = theta.clone()
    losses = []
    for i in range(iters):
        theta = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            L = regulation_loss(z, tokens, theta, G, quantile=quantile, loss_weights=loss_weights,
                                thr=thr, beta=beta).loss
            (grad,) = torch.autograd.grad(L, theta)
        L = L.detach()
        losses.append(L)
        better = L < best                                  # NaN never improves
        best = torch.where(better, L, best)
        best_iter = torch.where(better, torch.full_like(best_iter, i), best_iter)
        theta_best = torch.where(better, theta.detach(), theta_best)
        theta = theta.detach() - lr * n * grad
    return ReferenceInner(from_flat(theta_best, B, H, Ky, Kx), best_iter, torch.stack(losses))


# ----------------------------------------------------------------------------------------- output

def edited_attention(q: Tensor, k: Tensor, v: Tensor, tokens: Sequence[int], theta: Optional[Tensor], grid, *,
                     scale: float, pinned: Sequence[int] = (), renormalize: bool = False) -> tuple[Tensor, Tensor]:
    """(o [B, H, M, D] in q's dtype, P [B, H, M, N]): softmax of the edited logits over all N keys,
    then (released behaviour) the ``pinned`` columns overwritten with their unedited
    probabilities, then P V. ``tokens`` / ``pinned``: shared columns, or one list per image. ``renormalize=True`` keeps the plain softmax of the edited logits.
    ``theta`` None (or all-zero) is plain attention."""
    ct = compute_dtype(q)
    B, H, M, _ = q.shape
    z = _cond_logits(q, k, scale)                                             # [n, M, N]
    P = torch.softmax(z, dim=-1)
    if theta is not None:
        G = released_basis(*grid, dtype=ct, device=q.device)
        Pe = torch.softmax(_edited_logits(z, tokens, to_flat(theta), G), dim=-1)
        if not renormalize and pinned:
            pin = torch.zeros(B, z.shape[-1], dtype=torch.bool, device=q.device)
            for b in range(B):
                pin[b, list(pinned[b] if _per_image(pinned) else pinned)] = True
            pin = pin.repeat_interleave(H, dim=0)[:, None, :]                 # [n, 1, N]
            Pe = torch.where(pin, P, Pe)
        P = Pe
    P = P.reshape(B, H, M, -1)
    o = torch.einsum("bhmn,bhnd->bhmd", P, v.to(ct))
    return o.to(q.dtype), P


class ReferenceCall(NamedTuple):
    out: Tensor                   # [B, H, M, D]: the layer's attention output (before to_out)
    theta_best: Optional[Tensor]  # [Bc, H, T, Ky, Kx]: this step's best, the state carried to the next step
    theta_eff: Optional[Tensor]   # [Bc, H, T, Ky, Kx]: the applied coefficients
    cond_probs: Tensor            # [Bc, H, M, N]: the conditional rows' attention as applied


def reference_layer_call(q: Tensor, k: Tensor, v: Tensor, *, step: int, theta0: Tensor,
                         theta_prev: Optional[Tensor], tokens, eos, grid,
                         scale: float, cfg: bool = True, edit_steps: int = 25, iters: int = 20,
                         lr: float = 100.0, quantile: float = 0.9, loss_weights=(1.0, 80.0, 0.09),
                         thr: Optional[float] = None, beta: float = 0.0, prev_weight: float = 0.25,
                         decay: float = 0.99, renormalize: bool = False) -> ReferenceCall:
    """One call of an edited cross-attention layer, the whole released algorithm.

    q [B, H, M, D], k, v [B, H, N, D] for the whole batch ([uncond; cond] when ``cfg``).
    theta0 [Bc, H, T, Ky, Kx] is this call's initial theta; theta_prev the best theta this layer
    found at the previous step (None at step 0, where the release carries S(theta0)). Returns the
    output and the new carried state. Steps >= edit_steps and unconditional rows are plain attention.
    ``tokens`` (T columns) and ``eos`` (the first end-of-text column) may instead be given per
    conditional image (lists of Bc), for a batch of different prompts.
    """
    B = q.shape[0]
    if not renormalize and eos is None:
        raise ValueError("eos: the first end-of-text column is needed to pin it (or pass renormalize=True)")
    if cfg and B % 2:
        raise ValueError(f"cfg: a classifier-free-guidance batch has an even number of rows, got {B}")
    c0 = B // 2 if cfg else 0
    if step >= edit_steps:
        out, P = edited_attention(q, k, v, tokens, None, grid, scale=scale)
        return ReferenceCall(out, theta_prev, None, P[c0:])
    qc, kc, vc = q[c0:], k[c0:], v[c0:]
    inner = reference_inner_loop(qc, kc, tokens, theta0, grid, scale=scale, iters=iters, lr=lr,
                                 quantile=quantile, loss_weights=loss_weights, thr=thr, beta=beta)
    prev = theta0.to(inner.theta_best.dtype) if theta_prev is None else theta_prev
    # S_eff(t) = decay^t (0.25 S_best(t-1) + 0.75 S_best(t)); S is linear in theta
    theta_eff = decay ** step * (prev_weight * prev + (1.0 - prev_weight) * inner.theta_best)
    pinned = () if renormalize else ([(0, e) for e in eos] if isinstance(eos, (list, tuple)) else (0, eos))
    out_c, Pc = edited_attention(qc, kc, vc, tokens, theta_eff, grid, scale=scale, pinned=pinned,
                                 renormalize=renormalize)
    if c0:
        out_u, _ = edited_attention(q[:c0], k[:c0], v[:c0], tokens, None, grid, scale=scale)
        out_c = torch.cat([out_u, out_c])
    return ReferenceCall(out_c, inner.theta_best, theta_eff, Pc)
