"""Readable PyTorch reference of every stattn op: the oracle of the tests and the CPU path.

Everything is computed in float32 (float64 when the inputs are float64) and returned in q's dtype.
Semantics (docs/region-attention.md), per batch row b,
head h, pixel m (row-major, m = y*w + x) and region r with L_r valid keys (key_lengths, default N):
    z_r[n]  = scale * <q[b,h,m], k[b,r,h,n]>  for n < L_r, -inf for the padding n >= L_r
              (+ S[b,h,m,t] on column tokens[b][t], region 0 only)
    p_r     = softmax_n(z_r)                            (each region its own softmax over its own keys)
    p_0[n]  = softmax_n(z_0 without S)[n]  for pinned n (pinned[b]; their probability ignores the offset)
    alpha_r = region_weights[b,r] * masks[b,r,m];  affine: alpha_0 = 1 - sum_{r>=1} alpha_r
    o       = sum_r alpha_r * sum_n p_r[n] * v[b,r,h,n]
tokens / pinned are shared by all batch rows or given per row (ScoreOffset); padded keys and values
are ignored whatever they hold (their gradients are zero). Region 0's p_0 (edited, pinned columns
restored, 0 on its padding) is also an output of the op (return_probs): region0_probs; its gradient
G enters the backward beside alpha_0 dO v_0^T (region_attention_backward's grad_probs).
"""
from __future__ import annotations

import torch

__all__ = ["score_offset", "region_alpha", "alpha_backward", "index_rows", "key_valid", "pinned_mask",
           "region_logits", "region_probs", "region0_probs", "region_attention", "region_lse", "region_attention_backward"]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype stattn computes logits and softmax in for inputs like ``t``: fp64 for fp64, else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def score_offset(theta: torch.Tensor, gy: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
    """S [B, H, M, T] = G_y . Theta_t . G_x^T per (b, h, t), flattened row-major over the grid."""
    B, H, T = theta.shape[:3]
    S = torch.einsum("yi,bhtij,xj->bhyxt", gy.to(theta.dtype), theta, gx.to(theta.dtype))
    return S.reshape(B, H, gy.shape[0] * gx.shape[0], T)


def region_alpha(region_weights: torch.Tensor, masks: torch.Tensor, affine: bool) -> torch.Tensor:
    """alpha [B, R, M] from weights [B, R] and masks [B, R, M]."""
    alpha = region_weights[..., None] * masks
    if affine:
        rest = alpha[:, 1:]
        alpha = torch.cat([1 - rest.sum(1, keepdim=True), rest], dim=1)
    return alpha


def alpha_backward(d_alpha: torch.Tensor, affine: bool) -> torch.Tensor:
    """Gradient w.r.t. the free alphas (weights * masks) from dL/dalpha_r = sum_h <dO, O_r>:
    with affine, alpha_0 = 1 - sum_{r>=1} alpha_r, so region r >= 1 sees D_r - D_0 and region
    0's own mask and weight get none."""
    if not affine:
        return d_alpha
    return torch.cat([torch.zeros_like(d_alpha[:, :1]), d_alpha[:, 1:] - d_alpha[:, :1]], dim=1)


def index_rows(idx) -> tuple:
    """The rows of a ScoreOffset's ``tokens`` / ``pinned``: B tuples when per row, one when shared."""
    return tuple(idx) if idx and isinstance(idx[0], tuple) else (tuple(idx),)


def key_valid(lengths, n_keys: int, device):
    """[R, N] bool, True on region r's first lengths[r] keys; None when every key is valid."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=device).long()
    return torch.arange(n_keys, device=device) < lengths[:, None]


def pinned_mask(offset, n_keys: int, device):
    """[B or 1, N] bool, True on each row's pinned columns; None without pins."""
    if offset is None or not offset.pinned:
        return None
    rows = index_rows(offset.pinned)
    pin = torch.zeros(len(rows), n_keys, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        pin[b, list(row)] = True
    return pin


def _drop_padding(kv, valid):
    """k or v [B, R, H, N, D] with the padded keys zeroed: ignored whatever they hold."""
    return kv if valid is None else kv.masked_fill(~valid[None, :, None, :, None], 0)


def region_logits(q, k, scale, offset=None, lengths=None):
    """Scaled logits z [B, R, H, M, N] (padded keys -inf) and, with an offset, region 0's edited
    logits [B, H, M, N]."""
    ct = compute_dtype(q)
    valid = key_valid(lengths, k.shape[3], q.device)
    z = torch.einsum("bhmd,brhnd->brhmn", q.to(ct), _drop_padding(k, valid).to(ct)) * scale
    if valid is not None:
        z = z.masked_fill(~valid[None, :, None, None, :], float("-inf"))
    if offset is None or not offset.tokens:
        return z, None
    S = score_offset(offset.theta.to(ct), offset.gy, offset.gx)            # [B, H, M, T]
    tokens = torch.tensor(index_rows(offset.tokens), device=q.device)      # [B or 1, T]
    onehot = torch.nn.functional.one_hot(tokens, z.shape[-1]).to(ct)     # [B or 1, T, N]
    return z, z[:, 0] + S @ onehot[:, None]


def region_probs(q, k, scale, offset=None, lengths=None):
    """Attention probabilities p [B, R, H, M, N] with region 0 edited and pinned columns restored."""
    z, z0_edited = region_logits(q, k, scale, offset, lengths)
    p = z.softmax(-1)
    pin = pinned_mask(offset, z.shape[-1], q.device)
    if z0_edited is not None or pin is not None:
        p0 = p[:, 0] if z0_edited is None else z0_edited.softmax(-1)
        if pin is not None:
            p0 = torch.where(pin[:, None, None, :], p[:, 0], p0)
        p = torch.cat([p0[:, None], p[:, 1:]], dim=1)
    return p


def region0_probs(q, k, scale, offset=None, lengths=None):
    """Region 0's probabilities as applied [B, H, M, N] (compute dtype): region_probs of region 0
    alone (its keys only, so no other region's product is computed)."""
    return region_probs(q, k[:, :1], scale, offset, None if lengths is None else tuple(lengths)[:1])[:, 0]


def region_attention(q, k, v, masks, region_weights, affine=False, offset=None, scale=None, lengths=None):
    """Reference of :func:`stattn.region_attention` on already-normalised arguments:
    masks [B, R, M] float, region_weights [B, R] float, lengths R ints or None (see the module
    docstring)."""
    ct = compute_dtype(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    p = region_probs(q, k, scale, offset, lengths)
    v = _drop_padding(v, key_valid(lengths, v.shape[3], q.device))
    o_r = torch.einsum("brhmn,brhnd->brhmd", p, v.to(ct))
    alpha = region_alpha(region_weights.to(ct), masks.to(ct), affine)
    return torch.einsum("brm,brhmd->bhmd", alpha, o_r).to(q.dtype)


def region_lse(q, k, scale, offset=None, lengths=None):
    """Log-sum-exp of each region's logits over its own keys [B, R, H, M], plus slot R (region 0
    without the offset) when region 0 has pinned columns: the statistics the fused backward re-uses."""
    z, z0_edited = region_logits(q, k, scale, offset, lengths)
    lse = z.logsumexp(-1)
    first = lse[:, :1] if z0_edited is None else z0_edited.logsumexp(-1)[:, None]
    extra = [lse[:, :1]] if offset is not None and offset.pinned else []
    return torch.cat([first, lse[:, 1:], *extra], dim=1).float()


def region_attention_backward(grad_out, q, k, v, masks, region_weights, affine=False, offset=None, scale=None,
                              lengths=None, grad_probs=None):
    """Closed-form gradients of :func:`region_attention`: (dq, dk, dv, d_region_weights, d_masks,
    d_theta | None), in the compute dtype. The same algebra as the fused backward kernels:
    dp_r = alpha_r * dO . v_r^T, D_r = <dO, O_r>, dz_r = p_r * (dp_r - <p_r, dp_r>); region 0's
    pinned columns back-propagate through the un-offset softmax, the others through the edited one.
    grad_probs: None or G [B, H, M, N], the gradient w.r.t. region 0's probabilities as applied
    (region0_probs); it adds to region 0's dp (dp_0 = alpha_0 dO . v_0^T + G), so it reaches dq, dk
    and dtheta, not dv, the weights or the masks."""
    ct = compute_dtype(q)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    valid = key_valid(lengths, k.shape[3], q.device)
    q, do = q.to(ct), grad_out.to(ct)
    k, v = (_drop_padding(t, valid).to(ct) for t in (k, v))
    weights, masks = region_weights.to(ct), masks.to(ct)
    alpha = region_alpha(weights, masks, affine)                              # [B, R, M]
    a = alpha[:, :, None, :, None]                                            # [B, R, 1, M, 1]
    z, z0_edited = region_logits(q, k, scale, offset, lengths)
    p = z.softmax(-1)                                                         # un-offset probabilities
    dpv = torch.einsum("bhmd,brhnd->brhmn", do, v)                            # <dO, v_n>
    pin = pinned_mask(offset, z.shape[-1], q.device)
    pin = (torch.zeros(1, z.shape[-1], dtype=torch.bool, device=q.device) if pin is None else pin)[:, None, None]
    pe0 = p[:, 0] if z0_edited is None else z0_edited.softmax(-1)             # region 0, edited softmax
    p_used = torch.cat([torch.where(pin, p[:, 0], pe0)[:, None], p[:, 1:]], 1)
    D = (p_used * dpv).sum(-1)                                                # <dO, O_r>  [B, R, H, M]
    dp = dpv * a                                                              # dL/dp_r from the output
    dp0 = dp[:, 0] if grad_probs is None else dp[:, 0] + grad_probs.to(ct)
    # softmax backward; region 0 splits into its edited (non-pinned) and un-offset (pinned) parts
    dz = p * (dp - (p * dp).sum(-1, keepdim=True))
    dze0 = pe0 * (dp0 * ~pin - (pe0 * dp0 * ~pin).sum(-1, keepdim=True))
    dz0 = dze0 + p[:, 0] * (dp0 * pin - (p[:, 0] * dp0 * pin).sum(-1, keepdim=True))
    dz = torch.cat([dz0[:, None], dz[:, 1:]], 1)                              # [B, R, H, M, N]
    dq = torch.einsum("brhmn,brhnd->bhmd", dz, k) * scale
    dk = torch.einsum("brhmn,bhmd->brhnd", dz, q) * scale
    dv = torch.einsum("brhmn,bhmd->brhnd", p_used * a, do)
    dalpha = alpha_backward(D.sum(2), affine)                                 # [B, R, M]
    dweights = (dalpha * masks).sum(-1)
    dmasks = dalpha * weights[..., None]
    dtheta = None
    if z0_edited is not None:
        tokens = torch.tensor(index_rows(offset.tokens), device=q.device)  # [B or 1, T]
        dS = dze0.gather(-1, tokens[:, None, None].expand(*dze0.shape[:3], -1))  # [B, H, M, T]
        h, w = offset.gy.shape[0], offset.gx.shape[0]
        dS = dS.reshape(*dS.shape[:2], h, w, dS.shape[-1])
        dtheta = torch.einsum("yi,bhyxt,xj->bhtij", offset.gy.to(ct), dS, offset.gx.to(ct))
    return dq, dk, dv, dweights, dmasks, dtheta
