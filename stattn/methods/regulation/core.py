"""The inner optimisation of Attention Regulation: closed form, fused kernels and dispatch.

``inner_loop`` runs the released algorithm's per-layer-call gradient descent on the score-offset
coefficients theta (docs/attention-regulation.md), for n = B*H (image, head) pairs at once:

    Z_t = scale * q . k[tokens[t]]            (fp32, fp64 for fp64 inputs; once per call)
    logZ_rest = logsumexp of Z over the non-target columns      (once per call)
    S_t = Gy . theta_t . Gx^T,  P_t = exp(Z_t + S_t) / (exp(logZ_rest) + sum_t' exp(Z_t' + S_t'))
    L = w0 * mean_{n,t} (quantile_q(P_t) - q)^2 + w1 * mean_{n,t} (mean_p(P_t) - thr/T)^2
        + w2 * mean_{n,t,k} theta^2
    for i < iters: keep theta_i if L(theta_i) < best (strictly, best starts at +inf; one best for
    all heads), then theta_{i+1} = theta_i - lr * n * grad L(theta_i).

The quantile level q is also its target (the paper's phi(A, 0.9) - 0.9; the spec fixes both at 0.9).
Heads are independent except for the best-iterate choice (L is a mean over n and the step lr*n undoes
it), which is what lets the Triton path (kernels/regulation.py) run all iterations of one head in one
program and pick the best iteration in a second launch.

Gradient of the quantile: torch.quantile interpolates between the order statistics lo = floor(pos)
and hi = ceil(pos), pos = q*(M-1) in the compute dtype, with weights (1-frac, frac). Where several
pixels tie with an order statistic, its weight is shared equally among them (autograd would give it
to whichever one the sort put there; without ties, which is the generic case, both agree).
If every loss is NaN (e.g. invalid device tokens) nothing improves on +inf and best_iter is 0.

``inner_loop_blend`` adds the across-steps blend theta_eff = decay^step (w_prev theta_state +
(1 - w_prev) theta_best) and the update of the carried state to the same two launches, so a whole
edited layer call is three launches with stattn.region_attention.

Conditioning: with lr = 100 the 20-step trajectory amplifies rounding; float32 runs (kernels or
PyTorch) typically stay within ~1e-4..1e-3 of the float64 loop after 20 iterations and can pick
another best iteration where two losses are that close.

Registration: ``stattn::regulation_inner_loop`` and ``stattn::regulation_inner_loop_blend``
(torch.library, with fake implementations) serve torch.compile and tensor subclasses; plain eager
calls run the same implementation without the dispatcher, whose Python cost per call is of the
order of the kernels' own time.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ... import _validate as V
from ... import reference as ref
from ...ops import backend_for

__all__ = ["InnerResult", "BlendResult", "RegulationLoss", "inner_loop", "inner_loop_blend", "regulation_loss",
           "quantile_position", "target_logits", "default_thr", "key_order", "permute_keys"]


class InnerResult(NamedTuple):
    theta_best: Tensor   # [B, H, T, Ky, Kx]
    best_iter: Tensor    # 0-d int64
    losses: Tensor       # [iters]: L(theta_i)


class BlendResult(NamedTuple):
    theta_eff: Tensor    # [B, H, T, Ky, Kx]: decay^step (w_prev theta_state + (1 - w_prev) theta_best)
    theta_best: Tensor
    best_iter: Tensor
    losses: Tensor


class RegulationLoss(NamedTuple):
    loss: Tensor      # 0-d: w0 * l_q + w1 * l_m + w2 * l_theta
    l_q: Tensor       # 0-d: mean_{n,t} (quantile - q)^2
    l_m: Tensor       # 0-d: mean_{n,t} (mean_p P - thr/T)^2 (before its weight)
    l_theta: Tensor   # 0-d: mean theta^2
    grad: Tensor      # d loss / d theta, closed form, theta's shape


def default_thr(T: int) -> float:
    return min(1.0, 0.2 * T)


@functools.lru_cache(maxsize=64)
def quantile_position(quantile: float, M: int, dtype: torch.dtype = torch.float32) -> tuple[int, int, float]:
    """(lo, hi, frac) of torch.quantile's linear interpolation over M values: the rank
    quantile*(M-1) is computed in ``dtype`` as torch does (the Python float becomes a tensor of
    the input's dtype), so the kernels use the same weights as torch.quantile on fp32 data."""
    f = np.float64 if dtype == torch.float64 else np.float32
    pos = f(quantile) * f(M - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    return lo, hi, float(pos - f(lo))


def target_logits(z: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(Z_t [B, H, M, T], logZ_rest [B, H, M]) from logits z [B, H, M, N]: the only parts of the
    logits the loop needs, since the offset touches only the T target columns."""
    N = z.shape[-1]
    zt = z.index_select(-1, tokens)
    is_target = torch.zeros(N, dtype=torch.bool, device=z.device).index_fill_(0, tokens, True)
    rest = z.masked_fill(is_target, float("-inf")).logsumexp(-1)
    return zt, rest


def _terms(zt, rest, theta, gy, gx, qpos, quantile, m_target, weights):
    """Per-head loss terms and step direction, closed form (all in the compute dtype).

    Returns (l_q [B, H, T], l_m [B, H, T], l_theta [B, H], step [B, H, T, Ky, Kx]) where
    step = n * dL/dtheta: the gradient of head (b, h)'s own terms, as the kernel computes it."""
    B, H, M, T = zt.shape
    h, w = gy.shape[0], gx.shape[0]
    w0, w1, w2 = weights
    lo, hi, frac = qpos
    e = zt + ref.score_offset(theta, gy, gx)                              # [B, H, M, T]
    c = torch.maximum(rest, e.amax(-1))                                   # stabiliser per pixel
    ex = torch.exp(e - c[..., None])
    P = ex / (torch.exp(rest - c) + ex.sum(-1))[..., None]
    Pt = P.transpose(-1, -2)                                              # [B, H, T, M]
    srt = Pt.sort(-1).values
    v_lo, v_hi = srt[..., lo], srt[..., hi]
    qv = torch.lerp(v_lo, v_hi, frac)                                     # as torch.quantile
    mean = Pt.mean(-1)
    eq_lo = (Pt == v_lo[..., None]).to(P.dtype)
    eq_hi = (Pt == v_hi[..., None]).to(P.dtype)
    wq = ((1 - frac) * eq_lo / eq_lo.sum(-1, keepdim=True).clamp_min(1)
          + frac * eq_hi / eq_hi.sum(-1, keepdim=True).clamp_min(1))
    g = (2 * w0 / T) * (qv - quantile)[..., None] * wq + (2 * w1 / (T * M)) * (mean - m_target)[..., None]
    g = g.transpose(-1, -2)                                               # n * dL/dP  [B, H, M, T]
    dS = P * (g - (P * g).sum(-1, keepdim=True))                          # through the softmax
    dS = dS.reshape(B, H, h, w, T)
    K = theta.shape[-1] * theta.shape[-2]
    step = torch.einsum("yi,bhyxt,xj->bhtij", gy, dS, gx) + (2 * w2 / (K * T)) * theta
    return (qv - quantile) ** 2, (mean - m_target) ** 2, theta.square().mean((-3, -2, -1)), step


def regulation_loss(z: Tensor, tokens, theta: Tensor, basis, *, quantile: float = 0.9,
                    loss_weights: Sequence[float] = (1.0, 80.0, 0.09), thr: Optional[float] = None
                    ) -> RegulationLoss:
    """The loss L(theta) of one layer call from the conditional logits z [B, H, M, N] (already
    scaled; fp32 or fp64), with its parts and the closed-form gradient d L / d theta."""
    V.check_tensor("z", z, 4, "[B, H, M, N]")
    if not z.dtype.is_floating_point:
        raise TypeError(f"z must be floating point, got {z.dtype}")
    B, H, M, N = z.shape
    tokens_t = _check_tokens(tokens, N, z.device)
    gy, gx = _check_basis(basis, M, z.device)
    _check_theta(theta, B, H, tokens_t.numel(), gy, gx, z)
    weights, thr = _check_loss_args(quantile, loss_weights, thr, tokens_t.numel())
    ct = ref.compute_dtype(z)
    T = tokens_t.numel()
    zt, rest = target_logits(z.to(ct), tokens_t)
    l_q, l_m, l_th, step = _terms(zt, rest, theta.to(ct), gy.to(ct), gx.to(ct),
                                  quantile_position(quantile, M, ct), quantile, thr / T, weights)
    l_q, l_m, l_th = l_q.mean(), l_m.mean(), l_th.mean()
    loss = weights[0] * l_q + weights[1] * l_m + weights[2] * l_th
    return RegulationLoss(loss, l_q, l_m, l_th, step / (B * H))


# ---------------------------------------------------------------------------------------------
# argument checks (errors name the argument and what was expected, as stattn/_validate.py)

def _check_tokens(tokens, N: int, device) -> Tensor:
    """tokens -> int tensor [T] on ``device``, its values checked where they are on the host. Values of a
    tensor already on an accelerator (or traced by torch.compile) are not read, that would be a
    host sync: the kernel flags an out-of-range or repeated index there by NaN losses instead."""
    if isinstance(tokens, Tensor):
        if tokens.dim() != 1 or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an int64 (or int32) tensor of shape [T], got a {tokens.dtype} "
                            f"tensor of shape {tuple(tokens.shape)}")
        readable = tokens.device.type == "cpu" and not torch.compiler.is_compiling()
        values = tokens.tolist() if readable else None
    else:
        try:
            values = [int(v) for v in tokens]
        except TypeError:
            raise TypeError(f"tokens must be an int64 tensor [T] or a sequence of ints, got {tokens!r}") from None
        if any(isinstance(v, (float, bool)) for v in tokens):
            raise TypeError(f"tokens must hold ints, got {tokens!r}")
        tokens = torch.tensor(values, dtype=torch.int64)
    if tokens.numel() == 0:
        raise ValueError("tokens must hold at least one target token index (T >= 1), got none")
    if values is not None:
        bad = [v for v in values if not 0 <= v < N]
        if bad:
            raise ValueError(f"tokens {bad} out of range: k has N = {N} keys")
        if len(set(values)) != len(values):
            raise ValueError(f"tokens must not repeat a token index, got {values}")
    if tokens.device != device:
        tokens = tokens.to(device)   # a host-to-device copy: pass device tokens under graph capture
    return tokens


def key_order(rows: Sequence[Sequence[int]], N: int) -> Optional[list]:
    """Per-row target columns -> per-row key orders (None when every row has row 0's columns).

    The loss of one layer call depends on a row's keys only through the logits of its target
    columns and the log-sum-exp of the others, so permuting a row's key columns changes nothing but
    the order of a sum. Row b's order puts its targets at row 0's target columns (the other columns
    fill the remaining places in their own order), so one shared ``tokens`` serves a batch of
    different prompts. Use with :func:`permute_keys`."""
    rows = [list(r) for r in rows]
    shared = rows[0]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"tokens: every row needs the same number of target columns, got {[len(r) for r in rows]}")
    for r in rows:
        if len(set(r)) != len(r) or not all(0 <= c < N for c in r):
            raise ValueError(f"tokens: a row's target columns must be distinct and in [0, {N}), got {r}")
    if all(r == shared for r in rows):
        return None
    orders = []
    for r in rows:
        order = [-1] * N
        for c0, c in zip(shared, r):
            order[c0] = c
        taken = set(r)
        rest = iter(c for c in range(N) if c not in taken)
        orders.append([c if c >= 0 else next(rest) for c in order])
    return orders


def permute_keys(k: Tensor, order: Tensor) -> Tensor:
    """k [B, H, N, D] with row b's key columns taken in ``order[b]`` (int64 [B, N] on k's device)."""
    return torch.take_along_dim(k, order[:, None, :, None], dim=2)


def _per_row(k: Tensor, tokens):
    """(k, tokens) with per-row tokens ([B, T] tensor or B sequences) turned into shared ones."""
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2:
            return k, tokens
        rows = tokens.tolist()      # a host read: the controller passes shared tokens and permuted keys
    elif len(tokens) and not isinstance(tokens[0], (int, np.integer)) and hasattr(tokens[0], "__len__"):
        rows = [list(r) for r in tokens]
    else:
        return k, tokens
    if len(rows) != k.shape[0]:
        raise ValueError(f"tokens: per-row target columns need one row per batch row of q/k ({k.shape[0]}), "
                         f"got {len(rows)}")
    order = key_order(rows, k.shape[2])
    if order is None:
        return k, rows[0]
    return permute_keys(k, torch.tensor(order, dtype=torch.int64, device=k.device)), rows[0]


def _check_basis(basis, M: int, device) -> tuple[Tensor, Tensor]:
    try:
        gy, gx = basis
    except (TypeError, ValueError):
        raise TypeError("basis must be a pair (gy [h, Ky], gx [w, Kx]) from stattn.gaussian_basis") from None
    for name, g in (("basis gy", gy), ("basis gx", gx)):
        if not isinstance(g, Tensor) or g.dim() != 2 or not g.dtype.is_floating_point:
            raise TypeError(f"{name} must be a 2-D float tensor, got {getattr(g, 'shape', type(g).__name__)}")
        if g.device != device:
            raise ValueError(f"{name} must be on q's device {device}, got {g.device}")
        if 0 in g.shape:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(g.shape)}")
    if gy.shape[0] * gx.shape[0] != M:
        raise ValueError(f"basis grid {gy.shape[0]}x{gx.shape[0]} = {gy.shape[0] * gx.shape[0]} pixels does not "
                         f"match M = {M} query pixels")
    return gy, gx


def _check_theta(theta, B: int, H: int, T: int, gy: Tensor, gx: Tensor, like: Tensor) -> None:
    V.check_tensor("theta0", theta, 5, "[B, H, T, Ky, Kx]")
    expected = (B, H, T, gy.shape[1], gx.shape[1])
    if tuple(theta.shape) != expected:
        raise ValueError(f"theta0 must have shape [B={B}, H={H}, T={T}, Ky={gy.shape[1]}, Kx={gx.shape[1]}], "
                         f"got {tuple(theta.shape)}")
    if theta.dtype == torch.float64 and like.dtype != torch.float64:
        raise TypeError(f"theta0 must be float32 for {like.dtype} inputs (float64 only with float64 q)")
    if theta.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"theta0 must be float32, got {theta.dtype}")
    if theta.device != like.device:
        raise ValueError(f"theta0 must be on q's device {like.device}, got {theta.device}")
    if theta.device.type == "cpu":   # free to read here; on a GPU a NaN shows up in the losses
        V.check_finite("theta0", theta)


def _finite_float(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, (Tensor, bool)) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a {'positive ' if positive else ''}finite float, got {value}")
    return float(value)


def check_loss_weights(loss_weights) -> tuple:
    """(w_quantile, w_mean, w_theta) as finite floats, or a TypeError/ValueError naming them."""
    try:
        weights = tuple(loss_weights)
    except TypeError:
        raise TypeError(f"loss_weights must be three floats (w_quantile, w_mean, w_theta), got {loss_weights!r}") from None
    if len(weights) != 3:
        raise ValueError(f"loss_weights must be three floats (w_quantile, w_mean, w_theta), got {loss_weights!r}")
    return tuple(_finite_float(f"loss_weights[{i}]", w) for i, w in enumerate(weights))


def _check_loss_args(quantile, loss_weights, thr, T: int):
    """(weights, thr) of the loss, checked; thr None -> min(1, 0.2 T)."""
    q = _finite_float("quantile", quantile)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    weights = check_loss_weights(loss_weights)
    thr = default_thr(T) if thr is None else _finite_float("thr", thr)
    return weights, thr


def _check_qk(q, k) -> tuple[int, int, int, int]:
    V.check_tensor("q", q, 4, "[B, H, M, D]")
    V.check_tensor("k", k, 4, "[B, H, N, D]")
    if q.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on q's device {q.device}, got {k.device}")
    B, H, M, D = q.shape
    N = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k must have shape [B={B}, H={H}, N, D={D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    for name, size in (("B", B), ("H", H), ("M", M), ("D", D), ("N (keys)", N)):
        if size == 0:
            raise ValueError(f"q/k: {name} must be at least 1, got 0 (q {tuple(q.shape)}, k {tuple(k.shape)})")
    return B, H, M, D


def _check_loop_args(q, k, tokens, theta0, basis, scale, iters, lr, quantile, loss_weights, thr):
    """Every argument of the loop checked and normalised: (tokens, gy, gx, scale, weights, thr)."""
    B, H, M, D = _check_qk(q, k)
    tokens_t = _check_tokens(tokens, k.shape[2], q.device)
    T = tokens_t.numel()
    gy, gx = _check_basis(basis, M, q.device)
    _check_theta(theta0, B, H, T, gy, gx, q)
    scale = V.scale_of(scale, D)   # None -> D^-1/2
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    _finite_float("lr", lr)
    weights, thr = _check_loss_args(quantile, loss_weights, thr, T)
    return tokens_t, gy, gx, scale, weights, thr


# ---------------------------------------------------------------------------------------------
# the loop: closed-form PyTorch (CPU, fp64) and the custom op that dispatches to the kernels

def _loop_reference(q, k, tokens, theta0, gy, gx, scale, iters, lr, quantile, weights, thr,
                    trajectory: bool = False):
    """The loop in vectorised PyTorch (no host sync). With ``trajectory`` also returns every
    evaluated theta_i [iters, B, H, T, Ky, Kx] (the tests use it)."""
    ct = ref.compute_dtype(q)
    B, H, M, _ = q.shape
    T = tokens.numel()
    z = torch.einsum("bhmd,bhnd->bhmn", q.to(ct), k.to(ct)) * scale
    zt, rest = target_logits(z, tokens)
    gy, gx = gy.to(ct), gx.to(ct)
    qpos = quantile_position(quantile, M, ct)
    theta = theta0.to(ct)
    losses, thetas = [], []
    for _ in range(iters):
        l_q, l_m, l_th, step = _terms(zt, rest, theta, gy, gx, qpos, quantile, thr / T, weights)
        losses.append(weights[0] * l_q.mean() + weights[1] * l_m.mean() + weights[2] * l_th.mean())
        thetas.append(theta)
        theta = theta - lr * step
    losses = torch.stack(losses)
    traj = torch.stack(thetas)
    best = torch.where(torch.isnan(losses), torch.inf, losses).argmin()   # first minimum = strict '<'
    theta_best = traj.index_select(0, best.view(1))[0]
    out = (theta_best.contiguous(), best, losses)
    return out + (traj,) if trajectory else out


def _inner_loop_impl(q: Tensor, k: Tensor, tokens: Tensor, theta0: Tensor, gy: Tensor, gx: Tensor,
                     scale: float, iters: int, lr: float, quantile: float, w0: float, w1: float, w2: float,
                     thr: float) -> tuple[Tensor, Tensor, Tensor]:
    backend = backend_for(q)
    if backend == "triton":
        from stattn.kernels import regulation as kreg  # installed from the repo's kernels/

        return kreg.inner_loop(q, k, tokens, theta0, gy, gx, scale, iters, lr,
                               quantile_position(quantile, q.shape[2], torch.float32), quantile,
                               thr / tokens.numel(), (w0, w1, w2))
    if backend == "native":  # csrc/regulation.cpp: the 20 iterations in one native call
        from ... import native

        return native.inner_loop(q, k, tokens, theta0, gy, gx, scale, iters, lr,
                                 quantile_position(quantile, q.shape[2], ref.compute_dtype(q)), quantile,
                                 thr / tokens.numel(), (w0, w1, w2))
    theta_best, best, losses = _loop_reference(q, k, tokens, theta0, gy, gx, scale, iters, lr, quantile,
                                               (w0, w1, w2), thr)
    dt = ref.compute_dtype(q)
    return theta_best.to(dt), best, losses.to(dt)


_inner_loop_op = torch.library.custom_op("stattn::regulation_inner_loop", _inner_loop_impl, mutates_args=())


def _call(op, impl, q: Tensor, *args):
    """Eager calls skip the custom-op dispatcher (tens of microseconds of Python per call, the
    whole budget of this launch-bound op); torch.compile and tensor subclasses (fake tensors)
    go through the registered op."""
    if torch.compiler.is_compiling() or type(q) is not Tensor:
        return op(q, *args)
    with torch.no_grad():
        return impl(q, *args)


@_inner_loop_op.register_fake
def _(q, k, tokens, theta0, gy, gx, scale, iters, lr, quantile, w0, w1, w2, thr):
    dt = ref.compute_dtype(q)
    return (q.new_empty(theta0.shape, dtype=dt), q.new_empty((), dtype=torch.int64),
            q.new_empty((iters,), dtype=dt))


def inner_loop(q: Tensor, k: Tensor, tokens, theta0: Tensor, basis, *, scale, iters: int = 20,
               lr: float = 100.0, quantile: float = 0.9, loss_weights=(1.0, 80.0, 0.09),
               thr: Optional[float] = None) -> InnerResult:
    """The inner optimisation of one Attention-Regulation layer call (see the module docstring).

    q [B, H, M, D] (the conditional rows), k [B, H, N, D], fp16/bf16/fp32 (fp64 on the reference
    path); tokens int64 [T] target key columns; theta0 [B, H, T, Ky, Kx] float32; basis (gy, gx)
    with h*w = M; scale the logit scale (None: D^-1/2); thr None -> min(1, 0.2*T).
    Returns InnerResult(theta_best [B, H, T, Ky, Kx], best_iter 0-d int64, losses [iters]),
    float32 (float64 for float64 q), on q's device, without host synchronisation: CUDA runs two
    Triton launches, CPU the native kernels of csrc/ (the closed-form PyTorch loop with
    STATTN_BACKEND=reference or when the extension is unavailable; the kernels under the interpreter
    with STATTN_BACKEND=triton, as stattn.ops.backend_for).
    Values of device-resident tokens are not read: an out-of-range or repeated index there gives
    NaN losses (and best_iter 0); CPU tokens are checked and raise. Per-row tokens (an int tensor
    [B, T] or B sequences: a batch of different prompts) are served by :func:`key_order`.
    """
    k, tokens = _per_row(k, tokens)
    tokens_t, gy, gx, scale, weights, thr = _check_loop_args(q, k, tokens, theta0, basis, scale, iters, lr,
                                                             quantile, loss_weights, thr)
    theta_best, best, losses = _call(_inner_loop_op, _inner_loop_impl, q, k, tokens_t, theta0, gy, gx, scale,
                                     iters, float(lr), float(quantile), *weights, float(thr))
    return InnerResult(theta_best, best, losses)


# ---------------------------------------------------------------------------------------------
# the loop plus the across-steps blend, fused into the loop's second launch

def _blend_reference(theta_best, state, step, step_int, decay, w_prev):
    factor = decay ** step_int if step is None else torch.pow(decay, step.to(theta_best.dtype))
    theta_eff = factor * (w_prev * state + (1 - w_prev) * theta_best)
    state.copy_(theta_best)
    return theta_eff


def _inner_loop_blend_impl(q: Tensor, k: Tensor, tokens: Tensor, theta0: Tensor, gy: Tensor, gx: Tensor,
                         theta_state: Tensor, step: Optional[Tensor], step_int: int, decay: float, w_prev: float,
                         scale: float, iters: int, lr: float, quantile: float, w0: float, w1: float, w2: float,
                         thr: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if backend_for(q) == "triton":
        from stattn.kernels import regulation as kreg

        return kreg.inner_loop(q, k, tokens, theta0, gy, gx, scale, iters, lr,
                               quantile_position(quantile, q.shape[2], torch.float32), quantile,
                               thr / tokens.numel(), (w0, w1, w2),
                               blend=(theta_state, step if step is not None else step_int, decay, w_prev))
    theta_best, best, losses = _inner_loop_impl(q, k, tokens, theta0, gy, gx, scale, iters, lr, quantile,
                                              w0, w1, w2, thr)
    theta_eff = _blend_reference(theta_best, theta_state, step, step_int, decay, w_prev)
    return theta_eff, theta_best, best, losses


_inner_loop_blend_op = torch.library.custom_op("stattn::regulation_inner_loop_blend", _inner_loop_blend_impl,
                                               mutates_args=("theta_state",))


@_inner_loop_blend_op.register_fake
def _(q, k, tokens, theta0, gy, gx, theta_state, step, step_int, decay, w_prev, scale, iters, lr, quantile,
      w0, w1, w2, thr):
    dt = ref.compute_dtype(q)
    return (q.new_empty(theta0.shape, dtype=dt), q.new_empty(theta0.shape, dtype=dt),
            q.new_empty((), dtype=torch.int64), q.new_empty((iters,), dtype=dt))


def _inner_loop_blend_out_impl(q: Tensor, k: Tensor, tokens: Tensor, theta0: Tensor, gy: Tensor, gx: Tensor,
                               theta_state: Tensor, theta_eff: Tensor, step: Optional[Tensor], step_int: int,
                               decay: float, w_prev: float, scale: float, iters: int, lr: float, quantile: float,
                               w0: float, w1: float, w2: float, thr: float) -> tuple[Tensor, Tensor, Tensor]:
    """The blend writing theta_eff into a given buffer (e.g. the cond rows of the layer's offset θ,
    so no copy launch follows): a custom op may not return an alias of its input, hence its own op."""
    if backend_for(q) == "triton":
        from stattn.kernels import regulation as kreg

        _, theta_best, best, losses = kreg.inner_loop(
            q, k, tokens, theta0, gy, gx, scale, iters, lr, quantile_position(quantile, q.shape[2], torch.float32),
            quantile, thr / tokens.numel(), (w0, w1, w2),
            blend=(theta_state, step if step is not None else step_int, decay, w_prev, theta_eff))
        return theta_best, best, losses
    theta_best, best, losses = _inner_loop_impl(q, k, tokens, theta0, gy, gx, scale, iters, lr, quantile,
                                                w0, w1, w2, thr)
    theta_eff.copy_(_blend_reference(theta_best, theta_state, step, step_int, decay, w_prev))
    return theta_best, best, losses


_inner_loop_blend_out_op = torch.library.custom_op("stattn::regulation_inner_loop_blend_out",
                                                   _inner_loop_blend_out_impl,
                                                   mutates_args=("theta_state", "theta_eff"))


@_inner_loop_blend_out_op.register_fake
def _(q, k, tokens, theta0, gy, gx, theta_state, theta_eff, step, step_int, decay, w_prev, scale, iters, lr,
      quantile, w0, w1, w2, thr):
    dt = ref.compute_dtype(q)
    return (q.new_empty(theta0.shape, dtype=dt), q.new_empty((), dtype=torch.int64),
            q.new_empty((iters,), dtype=dt))


def inner_loop_blend(q: Tensor, k: Tensor, tokens, theta0: Tensor, basis, theta_state: Tensor, step, *, scale,
                     iters: int = 20, lr: float = 100.0, quantile: float = 0.9, loss_weights=(1.0, 80.0, 0.09),
                     thr: Optional[float] = None, decay: float = 0.99, w_prev: float = 0.25,
                     out: Optional[Tensor] = None) -> BlendResult:
    """:func:`inner_loop` plus the released across-steps blend in the same two launches:
    theta_eff = decay^step * (w_prev * theta_state + (1 - w_prev) * theta_best), then theta_state
    is overwritten with theta_best (in place: the layer's carried state; at the first edited
    step the caller fills it with theta0, the spec's "S_best(-1)").

    theta_state: contiguous [B, H, T, Ky, Kx] in the result dtype (float32; float64 for float64 q)
    on q's device; step: a 0-d integer tensor on q's device (read on the device: CUDA-graph safe,
    e.g. CrossAttentionCall.step_tensor) or a Python int >= 0; out: optional buffer like theta_state
    (contiguous; may be a row slice of a bigger tensor) that receives theta_eff in place."""
    _, _, M, D = _check_qk(q, k)
    if not isinstance(theta_state, Tensor):
        raise TypeError(f"theta_state must be a tensor, got {type(theta_state).__name__}")
    dt = ref.compute_dtype(q)
    if theta_state.dtype != dt or tuple(theta_state.shape) != tuple(getattr(theta0, "shape", ())) \
            or not theta_state.is_contiguous() or theta_state.device != q.device:
        raise ValueError(f"theta_state must be a contiguous {dt} tensor of theta0's shape "
                         f"{tuple(getattr(theta0, 'shape', ()))} on q's device {q.device}, got {theta_state.dtype} "
                         f"{tuple(theta_state.shape)} on {theta_state.device}")
    step_t, step_int = None, 0
    if isinstance(step, Tensor):
        if step.dim() != 0 or step.dtype.is_floating_point or step.dtype == torch.bool or step.device != q.device:
            raise TypeError(f"step must be a 0-d integer tensor on q's device {q.device} or an int, got a "
                            f"{step.dtype} tensor of shape {tuple(step.shape)} on {step.device}")
        step_t = step
    elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0 or a 0-d integer tensor, got {step!r}")
    else:
        step_int = step
    decay = _finite_float("decay", decay, positive=True)
    w_prev = _finite_float("w_prev", w_prev)
    k, tokens = _per_row(k, tokens)
    tokens_t, gy, gx, scale, weights, thr = _check_loop_args(q, k, tokens, theta0, basis, scale, iters, lr,
                                                             quantile, loss_weights, thr)
    rest = (step_t, step_int, decay, w_prev, scale, iters, float(lr), float(quantile), *weights, float(thr))
    if out is None:
        return BlendResult(*_call(_inner_loop_blend_op, _inner_loop_blend_impl, q, k, tokens_t, theta0, gy, gx,
                                  theta_state, *rest))
    if not isinstance(out, Tensor) or out.dtype != dt or out.shape != theta_state.shape \
            or not out.is_contiguous() or out.device != q.device:
        raise ValueError(f"out must be a contiguous {dt} tensor of theta0's shape {tuple(theta_state.shape)} on "
                         f"q's device {q.device}, got {getattr(out, 'dtype', type(out).__name__)} "
                         f"{tuple(getattr(out, 'shape', ()))}")
    theta_best, best, losses = _call(_inner_loop_blend_out_op, _inner_loop_blend_out_impl, q, k, tokens_t, theta0,
                                     gy, gx, theta_state, out, *rest)
    return BlendResult(out, theta_best, best, losses)
