"""Triton kernels of the Attention-Regulation inner optimisation (two launches per layer call).

`_inner_loop_kernel`, one program per (image, head): computes the target logits Z_t and the
log-sum-exp of the other keys from q and k once (tensor-core dots over pixel blocks, parked in a
small scratch in the grid's layout), then runs every iteration on-chip on [T, h, w] tiles:
S_t = Gy.theta_t.Gx^T, P_t, the quantile (bitonic top-k over the pixels), the mean, the loss terms,
the closed-form gradient back through the softmax and the basis, and the update. It writes each
iteration's per-head loss and theta (small). `_best_kernel`, one program per head: sums the
per-head losses of each iteration in a fixed order (every program the same way, so no atomics and
a deterministic result), takes the first minimum (= the strict `<` rule) and gathers theta_best;
optionally it also blends theta_eff for the layer's output and updates the carried theta_best.
Semantics and the closed form: stattn/methods/regulation/core.py.
"""
import math

import torch
import triton
import triton.language as tl

from . import launch


# Bitonic top-k as in triton.language.standard.sort_impl, with the partner of each element found
# by an int32 sum over the size-2 hypercube axis (s - x, exact with wrap-around) instead of an
# xor reduction: the same one reduction per compare-and-swap compiled, and plain numpy sums under
# the interpreter (its generic reduce runs a Python call per element, 100x slower).
@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    ar = tl.arange(0, 2)
    return tl.reshape(ar, [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_and_swap(x, flip, i: tl.constexpr):
    n_dims: tl.constexpr = len(x.shape)
    ix = x.to(tl.int32, bitcast=True)
    y = (tl.sum(ix, axis=n_dims - 1 - i, keep_dims=True) - ix).to(tl.float32, bitcast=True)
    return tl.where((x > y) != (flip ^ _indicator(n_dims, i)), y, x)


@triton.jit
def _bitonic_merge(x, stage: tl.constexpr, order: tl.constexpr):
    """order 0 ascending, 1 descending, 2 alternating with stride 2**stage"""
    if order == 2:
        flip = _indicator(len(x.shape), stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        x = _compare_and_swap(x, flip, stage - 1 - i)
    return x


@triton.jit
def _topk(x, LOG_R: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
    """The 2**LOG_K largest of each row of x [2**LOG_R, 2**LOG_N], descending."""
    h = tl.reshape(x, [2] * (LOG_R + LOG_N))
    for i in tl.static_range(1, LOG_K + 1):
        h = _bitonic_merge(h, i, 2 if i < LOG_N else 1)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = tl.max(h, axis=len(h.shape) - 1 - LOG_K)
        h = _bitonic_merge(h, LOG_K, 2 if i < LOG_N else 1)
    return tl.reshape(h, [x.shape[0], 2 ** LOG_K])


@triton.jit
def _target_logits(Q, K, TOK, ZS, LRS, q_base, k_base, s_qm, s_qd, s_kn, s_kd, s_tok, zs_base, s_zt, lrs_base,
                   M, N, D, T, WG, scale,
                   TP: tl.constexpr, WP: tl.constexpr, BLOCK_MQ: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, TQ: tl.constexpr, IEEE: tl.constexpr):
    """Z_t and logZ_rest of every pixel into the scratch at grid position y*WP + x. An invalid
    token index (out of range or repeated: not checked on the host for device tokens) turns
    everything into NaN, so the losses say so without a host sync."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    tq = tl.arange(0, TQ)
    t_ok = tq < T
    tok = tl.load(TOK + tq * s_tok, mask=t_ok, other=-1).to(tl.int32)
    bad = t_ok & ((tok < 0) | (tok >= N))
    dup = (tok[:, None] == tok[None, :]) & (tq[:, None] < tq[None, :]) & t_ok[None, :]
    n_bad = tl.sum(bad.to(tl.int32), axis=0) + tl.sum(tl.sum(dup.to(tl.int32), axis=1), axis=0)
    poison = tl.where(n_bad > 0, float("nan"), 0.0)
    kt = tl.load(K + k_base + tok[:, None] * s_kn + offs_d[None, :] * s_kd,
                 mask=(t_ok & ~bad)[:, None] & d_mask[None, :], other=0.0)           # target keys [TQ, BD]
    for m0 in range(0, M, BLOCK_MQ):
        offs_m = m0 + tl.arange(0, BLOCK_MQ)
        m_mask = offs_m < M
        q = tl.load(Q + q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        mx = tl.full([BLOCK_MQ], float("-inf"), tl.float32)
        sm = tl.zeros([BLOCK_MQ], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kb = tl.load(K + k_base + cols[:, None] * s_kn + offs_d[None, :] * s_kd,
                         mask=(cols < N)[:, None] & d_mask[None, :], other=0.0)
            if IEEE:
                z = tl.dot(q, tl.trans(kb), input_precision="tf32x3") * scale
            else:
                z = tl.dot(q, tl.trans(kb)) * scale
            is_t = tl.sum(((cols[None, :] == tok[:, None]) & t_ok[:, None]).to(tl.int32), axis=0) > 0
            z = tl.where(((cols < N) & ~is_t)[None, :], z, float("-inf"))
            new_mx = tl.maximum(mx, tl.max(z, axis=1))
            safe = tl.where(new_mx == float("-inf"), 0.0, new_mx)      # no -inf - -inf
            sm = sm * tl.exp(mx - safe) + tl.sum(tl.exp(z - safe[:, None]), axis=1)
            mx = new_mx
        rest = mx + tl.log(sm) + poison                                  # -inf when every key is a target
        if IEEE:
            zt = tl.dot(q, tl.trans(kt), input_precision="tf32x3") * scale
        else:
            zt = tl.dot(q, tl.trans(kt)) * scale                       # [BMQ, TQ]
        pix = (offs_m // WG) * WP + offs_m % WG
        tl.store(LRS + lrs_base + pix, rest, mask=m_mask)
        tl.store(ZS + zs_base + tq[None, :] * s_zt + pix[:, None], zt + poison,
                 mask=m_mask[:, None] & t_ok[None, :])


@triton.jit
def _inner_loop_kernel(
        Q, K, TOK, TH0, GY, GX, ZS, LRS, LOSS, THS,
        s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_tok,
        s_0b, s_0h, s_0t, s_0i, s_0j, s_gy, s_gx,
        H, M, N, D, T, HG, WG, KY, KX, iters,
        scale, lr, frac, J_LO, J_HI, q_target, m_target, w0, w1, w2,
        TP: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, KYP: tl.constexpr, KXP: tl.constexpr,
        TOPK: tl.constexpr, BLOCK_MQ: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        TQ: tl.constexpr, IEEE: tl.constexpr, LOG_TP: tl.constexpr, LOG_G: tl.constexpr,
        LOG_K: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    G: tl.constexpr = HP * WP
    zs_base = pid * (TP * G)
    _target_logits(Q, K, TOK, ZS, LRS, b * s_qb + h * s_qh, b * s_kb + h * s_kh, s_qm, s_qd, s_kn, s_kd, s_tok,
                   zs_base, G, pid * G, M, N, D, T, WG, scale,
                   TP, WP, BLOCK_MQ, BLOCK_N, BLOCK_D, TQ, IEEE)
    tl.debug_barrier()  # the scratch written above is read below in another layout

    # [T, h, w] tiles of the grid, padded to powers of two
    t3 = tl.arange(0, TP)[:, None, None]
    y3 = tl.arange(0, HP)[None, :, None]
    x3 = tl.arange(0, WP)[None, None, :]
    t_ok3 = t3 < T
    p_ok3 = (y3 < HG) & (x3 < WG)
    zt = tl.load(ZS + zs_base + t3 * G + y3 * WP + x3, mask=t_ok3 & p_ok3, other=float("-inf"))
    rest = tl.load(LRS + pid * G + tl.arange(0, HP)[:, None] * WP + tl.arange(0, WP)[None, :],
                   mask=(tl.arange(0, HP)[:, None] < HG) & (tl.arange(0, WP)[None, :] < WG), other=0.0)
    # the basis, and its transposes, broadcast over t for batched dots
    yy = tl.arange(0, HP)
    xx = tl.arange(0, WP)
    ki = tl.arange(0, KYP)
    kj = tl.arange(0, KXP)
    gy = tl.load(GY + yy[:, None] * s_gy + ki[None, :], mask=(yy[:, None] < HG) & (ki[None, :] < KY), other=0.0)
    gx = tl.load(GX + xx[:, None] * s_gx + kj[None, :], mask=(xx[:, None] < WG) & (kj[None, :] < KX), other=0.0)
    gy_b = tl.broadcast_to(gy[None, :, :], (TP, HP, KYP))
    gx_b = tl.broadcast_to(gx[None, :, :], (TP, WP, KXP))
    gyt_b = tl.broadcast_to(tl.trans(gy)[None, :, :], (TP, KYP, HP))
    gxt_b = tl.broadcast_to(tl.trans(gx)[None, :, :], (TP, KXP, WP))
    i3 = tl.arange(0, KYP)[None, :, None]
    j3 = tl.arange(0, KXP)[None, None, :]
    th_ok = t_ok3 & (i3 < KY) & (j3 < KX)
    theta = tl.load(TH0 + b * s_0b + h * s_0h + t3 * s_0t + i3 * s_0i + j3 * s_0j, mask=th_ok, other=0.0)
    theta = theta.to(tl.float32)
    KT = KY * KX
    th_off = t3 * KT + i3 * KX + j3                                   # theta_i store: [n, iters, T, Ky, Kx]
    tf = T * 1.0                                                      # ints equal to 1 arrive as constexprs
    mf = M * 1.0
    c_q = 2.0 * w0 / tf                                                # n * dL/d(quantile_t)
    c_m = 2.0 * w1 / (tf * mf)                                         # n * dL/dP via the mean, per pixel
    c_th = 2.0 * w2 / (KT * tf)
    jj = tl.arange(0, TOPK)[None, :]
    t1 = tl.arange(0, TP)
    for it in range(iters):
        tl.store(THS + (pid * iters + it) * (T * KT) + th_off, theta, mask=th_ok)
        s = tl.dot(tl.dot(gy_b, theta, input_precision="ieee"), gxt_b, input_precision="ieee")   # [TP, HP, WP]
        e = zt + s
        c = tl.maximum(rest, tl.max(e, axis=0))
        ex = tl.exp(e - c[None, :, :])
        den = tl.exp(rest - c) + tl.sum(ex, axis=0)
        p = ex / den[None, :, :]                                       # 0 on padded t and pixels
        # quantile: the two order statistics from a top-k of the pixels (padding sorts last)
        top = _topk(tl.reshape(tl.where(p_ok3, p, -1.0), (TP, G)), LOG_TP, LOG_G, LOG_K)
        # reductions stacked with join (one pass each): a reduction across warps costs a barrier
        v_lo, v_hi = tl.split(tl.sum(tl.join(tl.where(jj == J_LO, top, 0.0), tl.where(jj == J_HI, top, 0.0)), axis=1))
        qv = tl.where(frac < 0.5, v_lo + frac * (v_hi - v_lo), v_hi - (v_hi - v_lo) * (1.0 - frac))
        # n * dL/dP: the quantile's weight on its order statistics (shared among ties), the mean's
        eq_lo = ((p == v_lo[:, None, None]) & p_ok3).to(tl.float32)
        eq_hi = ((p == v_hi[:, None, None]) & p_ok3).to(tl.float32)
        sums = tl.sum(tl.join(tl.join(tl.reshape(p, (TP, G)), tl.reshape(eq_lo, (TP, G))),
                              tl.join(tl.reshape(eq_hi, (TP, G)), tl.zeros((TP, G), tl.float32))), axis=1)
        sums_a, sums_b = tl.split(sums)
        mean, n_lo = tl.split(sums_a)
        n_hi, _unused = tl.split(sums_b)
        mean = mean / mf
        n_lo = tl.maximum(n_lo, 1.0)
        n_hi = tl.maximum(n_hi, 1.0)
        dq = tl.where(t1 < T, qv - q_target, 0.0)
        dm = tl.where(t1 < T, mean - m_target, 0.0)
        loss = (w0 * tl.sum(dq * dq, axis=0) + w1 * tl.sum(dm * dm, axis=0)) / tf \
            + w2 * tl.sum(tl.reshape(theta * theta, (TP * KYP * KXP,)), axis=0) / (KT * tf)
        tl.store(LOSS + pid * iters + it, loss)
        w_lo = c_q * dq * (1.0 - frac) / n_lo
        w_hi = c_q * dq * frac / n_hi
        g = w_lo[:, None, None] * eq_lo + w_hi[:, None, None] * eq_hi + (c_m * dm)[:, None, None]
        g = tl.where(p_ok3, g, 0.0)
        ds = p * (g - tl.sum(p * g, axis=0)[None, :, :])               # through the softmax
        grad = tl.dot(tl.dot(gyt_b, ds, input_precision="ieee"), gx_b, input_precision="ieee")
        theta = theta - lr * (grad + c_th * theta)


@triton.jit
def _best_kernel(LOSS, THS, THB, LOSSES, BEST, THP, THE, STEP, NH, iters, KTOT, factor, log2_decay, w_prev,
                 ITP: tl.constexpr, NB: tl.constexpr, KTP: tl.constexpr, BLEND: tl.constexpr,
                 STEP_T: tl.constexpr):
    pid = tl.program_id(0)
    its = tl.arange(0, ITP)
    it_ok = its < iters
    acc = tl.zeros([ITP], tl.float32)
    for n0 in range(0, NH, NB):          # fixed order: every program gets the same sums
        rows = n0 + tl.arange(0, NB)
        tile = tl.load(LOSS + rows[:, None] * iters + its[None, :], mask=(rows < NH)[:, None] & it_ok[None, :],
                       other=0.0)
        acc += tl.sum(tile, axis=0)
    mean = acc / (NH * 1.0)
    cand = tl.where(it_ok & (mean == mean), mean, float("inf"))     # NaN never improves on best
    best = tl.argmin(cand, axis=0, tie_break_left=True)              # first minimum: the strict '<'
    if pid == 0:
        tl.store(LOSSES + its, mean, mask=it_ok)
        tl.store(BEST, best.to(tl.int64))
    kk = tl.arange(0, KTP)
    th = tl.load(THS + (pid * iters + best) * KTOT + kk, mask=kk < KTOT)
    tl.store(THB + pid * KTOT + kk, th, mask=kk < KTOT)
    if BLEND:  # theta_eff = decay^step (w_prev theta_state + (1 - w_prev) theta_best); state <- theta_best
        if STEP_T:
            factor = tl.exp2(tl.load(STEP).to(tl.float32) * log2_decay)
        prev = tl.load(THP + pid * KTOT + kk, mask=kk < KTOT)
        tl.store(THE + pid * KTOT + kk, factor * (w_prev * prev + (1.0 - w_prev) * th), mask=kk < KTOT)
        tl.store(THP + pid * KTOT + kk, th, mask=kk < KTOT)


def _log2(n: int) -> int:
    return n.bit_length() - 1


def config(M: int, N: int, D: int, T: int, h: int, w: int, Ky: int, Kx: int, lo: int, fp32: bool) -> dict:
    """Tile sizes and warps, from sm_90 compiles (python -m bench.regulation --aot): 8 warps keep
    grids up to 32x32 free of spills; fp32 logits (3xTF32 dots) need the smaller pixel blocks."""
    TP = triton.next_power_of_2(T)
    HP = max(16, triton.next_power_of_2(h))
    WP = max(16, triton.next_power_of_2(w))
    elems = TP * HP * WP
    return dict(TP=TP, HP=HP, WP=WP,
                KYP=max(16, triton.next_power_of_2(Ky)), KXP=max(16, triton.next_power_of_2(Kx)),
                TOPK=triton.next_power_of_2(M - lo), LOG_TP=_log2(TP), LOG_G=_log2(HP * WP),
                LOG_K=_log2(triton.next_power_of_2(M - lo)),
                BLOCK_MQ=16 if fp32 else 64, BLOCK_N=max(16, min(128, triton.next_power_of_2(N))),
                BLOCK_D=max(16, triton.next_power_of_2(D)), TQ=max(16, TP),
                num_warps=8 if elems <= 4096 else 16, num_stages=1)


def inner_loop(q, k, tokens, theta0, gy, gx, scale, iters, lr, qpos, q_target, m_target, weights, blend=None):
    """(theta_best [B, H, T, Ky, Kx] fp32, best_iter 0-d int64, losses [iters] fp32) in two
    launches; arguments are validated by stattn.methods.regulation.core. With ``blend = (theta_state,
    step, decay, w_prev)`` (state contiguous fp32, step a 0-d int tensor or an int) the second
    launch also returns theta_eff = decay^step (w_prev state + (1 - w_prev) theta_best) and
    overwrites the state with theta_best: (theta_eff, theta_best, best_iter, losses); a 5th
    element ``eff_out`` (contiguous fp32 of theta0's shape) receives theta_eff in place."""
    B, H, M, D = q.shape
    N, T = k.shape[2], tokens.numel()
    h, w = gy.shape[0], gx.shape[0]
    Ky, Kx = gy.shape[1], gx.shape[1]
    lo, hi, frac = qpos
    cfg = config(M, N, D, T, h, w, Ky, Kx, lo, q.dtype == torch.float32)
    n = B * H
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    zs = launch._empty(n, cfg["TP"], cfg["HP"] * cfg["WP"], **f32)      # scratch: Z_t on the grid
    lrs = launch._empty(n, cfg["HP"] * cfg["WP"], **f32)                # scratch: logZ_rest
    loss = launch._empty(n, iters, **f32)                              # per-head loss terms
    ths = launch._empty(n, iters, T, Ky, Kx, **f32)                    # theta_i of every iteration
    gy = gy.to(torch.float32)
    gx = gx.to(torch.float32)
    launch._launch(_inner_loop_kernel, (n,), (
        q, k, tokens, theta0, gy, gx, zs, lrs, loss, ths,
        *q.stride(), *k.stride(), tokens.stride(0), *theta0.stride(), gy.stride(0), gx.stride(0),
        H, M, N, D, T, h, w, Ky, Kx, iters,
        float(scale), float(lr), float(frac), M - 1 - lo, M - 1 - hi, float(q_target), float(m_target),
        *(float(x) for x in weights)),
        dict(IEEE=q.dtype == torch.float32, **cfg))  # IEEE: fp32 logits via 3xTF32
    theta_best = launch._empty(B, H, T, Ky, Kx, **f32)
    losses = launch._empty(iters, **f32)
    best = launch._empty((), device=dev, dtype=torch.int64)
    state = theta_eff = step_t = None
    factor, log2_decay, w_prev = 1.0, 0.0, 0.0
    if blend is not None:
        state, step, decay, w_prev, *eff_out = blend
        theta_eff = eff_out[0] if eff_out and eff_out[0] is not None else launch._empty(B, H, T, Ky, Kx, **f32)
        if isinstance(step, torch.Tensor):
            step_t, log2_decay = step, math.log2(decay)
        else:
            factor = float(decay) ** step
    launch._launch(_best_kernel, (n,), (
        loss, ths, theta_best, losses, best, state if blend else loss, theta_eff if blend else loss,
        step_t if step_t is not None else best, n, iters, T * Ky * Kx, factor, log2_decay, float(w_prev)),
        dict(ITP=triton.next_power_of_2(iters), NB=16, KTP=triton.next_power_of_2(T * Ky * Kx),
             BLEND=blend is not None, STEP_T=step_t is not None, num_warps=4, num_stages=1))
    if blend is not None:
        return theta_eff, theta_best, best, losses
    return theta_best, best, losses
