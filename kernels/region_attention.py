"""Triton kernels of fused multi-region cross-attention with Gaussian-basis score offsets.

Forward: one program per (pixel block, batch*head). Q is read once, the R regions are visited in
turn (each its own online softmax over its own keys, blocked over N), alpha = weights * masks is
formed in-kernel, and O is written once. Region 0 may carry the offset S = Gy.Theta_t.Gx^T on
the target columns (built from Theta in registers, never materialised) and pinned columns
whose probability comes from the un-offset logits (a second softmax statistic).

Backward: `_bwd_dq_kernel` recomputes the probabilities from the saved log-sum-exps and
produces dQ, the per-(head, pixel) inner products D_r = <dO, O_r> (from which dalpha follows)
and per-pixel-block partials of dTheta (summed deterministically afterwards);
`_bwd_dkdv_kernel` (only when dK/dV are wanted) walks all pixels for a block of keys.

Per-row targets and pins: TOK / PIN advance by s_tokb / s_pinb per batch row (0 when shared).
Key lengths (HAS_LENGTHS): region r's columns >= LEN[r] are masked like those >= N (never loaded,
-inf logits, zero dK/dV) and its key loop stops at LEN[r].
Region 0's probabilities (WANT_PROBS, forward): after its online softmax a second pass over its
key blocks (Q's tile still loaded) writes exp(z - lse) as applied (edited softmax, pinned columns
from the un-offset one, 0 on padded keys) to PROBS [B, H, M, N] contiguous, fp32. Their gradient
(HAS_GP, backward): GP = dL/dP0 of the same layout adds to dp0 = alpha0 * dO.v0; the dQ kernel also
writes its row sums <p, GP> (edited / pinned part) to DG for the dK kernel. Without the flags the
kernels specialise exactly as before.
Every [B, H, M, D] tensor (Q, O, dO, dQ) is addressed by its four strides: the launcher writes O and
dQ in [B, M, H, D] memory order (rows H * D apart) and passes Q and dO as they come.
Semantics: stattn/reference.py.
"""
import triton
import triton.language as tl


@triton.jit
def _basis_rows(offs_m, m_mask, W, GY, s_gy, GX, s_gx, KY, KX,
                KYP: tl.constexpr, KXP: tl.constexpr):
    """gy[y(m), :] and gx[x(m), :] for the block's pixels, zero-padded to [BM, KYP] / [BM, KXP]."""
    y = offs_m // W
    x = offs_m % W
    ki = tl.arange(0, KYP)
    kj = tl.arange(0, KXP)
    gyr = tl.load(GY + y[:, None] * s_gy + ki[None, :], mask=m_mask[:, None] & (ki[None, :] < KY), other=0.0)
    gxr = tl.load(GX + x[:, None] * s_gx + kj[None, :], mask=m_mask[:, None] & (kj[None, :] < KX), other=0.0)
    return gyr.to(tl.float32), gxr.to(tl.float32)


@triton.jit
def _offset_for(t, gyr, gxr, TH, s_tt, s_ti, s_tj, KY, KX, KYP: tl.constexpr, KXP: tl.constexpr):
    """S[:, t] for the block's pixels: rowsum((gy_rows @ Theta_t) * gx_rows), in exact fp32."""
    ki = tl.arange(0, KYP)
    kj = tl.arange(0, KXP)
    th = tl.load(TH + t * s_tt + ki[:, None] * s_ti + kj[None, :] * s_tj,
                 mask=(ki[:, None] < KY) & (kj[None, :] < KX), other=0.0)
    return tl.sum(tl.dot(gyr, th, input_precision="ieee") * gxr, axis=1)


@triton.jit
def _logits(q, K, s_kn, s_kd, cols, c_mask, offs_d, d_mask, scale,
            gyr, gxr, TOK, T, TH, s_tt, s_ti, s_tj, KY, KX,
            HAS_OFFSET: tl.constexpr, KYP: tl.constexpr, KXP: tl.constexpr):
    """(z, z_edited) for one key block; padded columns are -inf."""
    k = tl.load(K + cols[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=c_mask[:, None] & d_mask[None, :], other=0.0)
    z = tl.dot(q, tl.trans(k)) * scale
    z = tl.where(c_mask[None, :], z, float("-inf"))
    ze = z
    if HAS_OFFSET:
        for t in range(T):
            tok = tl.load(TOK + t)
            s = _offset_for(t, gyr, gxr, TH, s_tt, s_ti, s_tj, KY, KX, KYP, KXP)
            ze = ze + tl.where(cols[None, :] == tok, s[:, None], 0.0)
    return k, z, ze


@triton.jit
def _keys_of(LEN, r, N, HAS_LENGTHS: tl.constexpr):
    """Region r's number of valid keys: LEN[r] with key lengths, else all N."""
    n = N
    if HAS_LENGTHS:
        n = tl.load(LEN + r)
    return n


@triton.jit
def _alpha(Wt, Mk, b, r, s_wb, s_wr, s_mb, s_mr, s_mm, offs_m, m_mask):
    w = tl.load(Wt + b * s_wb + r * s_wr)
    return w * tl.load(Mk + b * s_mb + r * s_mr + offs_m * s_mm, mask=m_mask, other=0.0)


@triton.jit
def _alpha_of(Wt, Mk, b, r, R, s_wb, s_wr, s_mb, s_mr, s_mm, offs_m, m_mask,
              AFFINE: tl.constexpr, BLOCK_M: tl.constexpr):
    """alpha of region r; with AFFINE region 0 gets 1 - sum of the others."""
    if AFFINE:
        if r == 0:
            a = tl.full([BLOCK_M], 1.0, tl.float32)
            for rr in range(1, R):
                a -= _alpha(Wt, Mk, b, rr, s_wb, s_wr, s_mb, s_mr, s_mm, offs_m, m_mask)
        else:
            a = _alpha(Wt, Mk, b, r, s_wb, s_wr, s_mb, s_mr, s_mm, offs_m, m_mask)
    else:
        a = _alpha(Wt, Mk, b, r, s_wb, s_wr, s_mb, s_mr, s_mm, offs_m, m_mask)
    return a


@triton.jit
def _region_fwd(q, K, V, s_kn, s_kd, s_vn, s_vd, N, scale, offs_d, d_mask,
                gyr, gxr, TOK, T, TH, s_tt, s_ti, s_tj, KY, KX, PIN,
                HAS_OFFSET: tl.constexpr, HAS_PIN: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                KYP: tl.constexpr, KXP: tl.constexpr):
    """One region's attention output [BM, BD] (fp32) and log-sum-exps (edited, un-offset) over
    its first N keys (the region's own count); PIN and TOK already point at the batch row."""
    m_e = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_e = tl.zeros([BLOCK_M], tl.float32)
    acc_e = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_0 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_0 = tl.zeros([BLOCK_M], tl.float32)
    acc_0 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_mask = cols < N
        k, z, ze = _logits(q, K, s_kn, s_kd, cols, c_mask, offs_d, d_mask, scale,
                           gyr, gxr, TOK, T, TH, s_tt, s_ti, s_tj, KY, KX, HAS_OFFSET, KYP, KXP)
        v = tl.load(V + cols[:, None] * s_vn + offs_d[None, :] * s_vd,
                    mask=c_mask[:, None] & d_mask[None, :], other=0.0)
        m_new = tl.maximum(m_e, tl.max(ze, axis=1))
        corr = tl.exp(m_e - m_new)
        p = tl.exp(ze - m_new[:, None])
        l_e = l_e * corr + tl.sum(p, axis=1)
        if HAS_PIN:
            pin = tl.load(PIN + cols, mask=c_mask, other=0) != 0
            p = tl.where(pin[None, :], 0.0, p)
        acc_e = acc_e * corr[:, None] + tl.dot(p.to(v.dtype), v)
        m_e = m_new
        if HAS_PIN:
            m0_new = tl.maximum(m_0, tl.max(z, axis=1))
            corr0 = tl.exp(m_0 - m0_new)
            p0 = tl.exp(z - m0_new[:, None])
            l_0 = l_0 * corr0 + tl.sum(p0, axis=1)
            p0 = tl.where(pin[None, :], p0, 0.0)
            acc_0 = acc_0 * corr0[:, None] + tl.dot(p0.to(v.dtype), v)
            m_0 = m0_new
    o = acc_e / l_e[:, None]
    lse_e = m_e + tl.log(l_e)
    lse_0 = lse_e
    if HAS_PIN:
        o += acc_0 / l_0[:, None]
        lse_0 = m_0 + tl.log(l_0)
    return o, lse_e, lse_0


@triton.jit
def _store_probs(q, K, s_kn, s_kd, n_keys, N, scale, offs_d, d_mask, lse_e, lse_0,
                 gyr, gxr, TOK, T, TH, s_tt, s_ti, s_tj, KY, KX, PIN, P, offs_m, m_mask,
                 HAS_OFFSET: tl.constexpr, HAS_PIN: tl.constexpr, BLOCK_N: tl.constexpr,
                 KYP: tl.constexpr, KXP: tl.constexpr):
    """Region 0's probabilities as applied over all N columns (exact zeros past n_keys) into P,
    its [M, N] rows of the (b, h) pair: a second pass over the keys with the final statistics."""
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_mask = cols < n_keys
        k, z, ze = _logits(q, K, s_kn, s_kd, cols, c_mask, offs_d, d_mask, scale,
                           gyr, gxr, TOK, T, TH, s_tt, s_ti, s_tj, KY, KX, HAS_OFFSET, KYP, KXP)
        pin = tl.zeros([BLOCK_N], tl.int32) != 0
        if HAS_PIN:
            pin = tl.load(PIN + cols, mask=c_mask, other=0) != 0
        pe, p0 = _probs(z, ze, lse_e, lse_0, pin, HAS_PIN)
        p = pe
        if HAS_PIN:
            p = tl.where(pin[None, :], p0, pe)
        tl.store(P + offs_m[:, None] * N + cols[None, :], p, mask=m_mask[:, None] & (cols < N)[None, :])


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, Wt, Mk, TOK, TH, GY, GX, PIN, LEN, PROBS,
                s_qb, s_qh, s_qm, s_qd,
                s_kb, s_kr, s_kh, s_kn, s_kd,
                s_vb, s_vr, s_vh, s_vn, s_vd,
                s_ob, s_oh, s_om, s_od,
                s_lb, s_lr, s_lh, s_lm,
                s_wb, s_wr, s_mb, s_mr, s_mm,
                s_tb, s_th, s_tt, s_ti, s_tj, s_gy, s_gx, s_tokb, s_pinb,
                H, R, M, N, D, T, W, KY, KX, scale,
                AFFINE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_PIN: tl.constexpr,
                HAS_LENGTHS: tl.constexpr, WANT_PROBS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                KYP: tl.constexpr, KXP: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    gyr = tl.zeros([BLOCK_M, KYP], tl.float32)
    gxr = tl.zeros([BLOCK_M, KXP], tl.float32)
    if HAS_OFFSET:
        gyr, gxr = _basis_rows(offs_m, m_mask, W, GY, s_gy, GX, s_gx, KY, KX, KYP, KXP)
    TH_bh = TH + b * s_tb + h * s_th
    TOK_b = TOK + b * s_tokb
    PIN_b = PIN + b * s_pinb
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lse_ptr = LSE + b * s_lb + h * s_lh + offs_m * s_lm
    for r in range(0, R):
        Kr = K + b * s_kb + r * s_kr + h * s_kh
        Vr = V + b * s_vb + r * s_vr + h * s_vh
        n_r = _keys_of(LEN, r, N, HAS_LENGTHS)
        a = _alpha_of(Wt, Mk, b, r, R, s_wb, s_wr, s_mb, s_mr, s_mm, offs_m, m_mask, AFFINE, BLOCK_M)
        if r == 0:
            o_r, lse_e, lse_0 = _region_fwd(q, Kr, Vr, s_kn, s_kd, s_vn, s_vd, n_r, scale, offs_d, d_mask,
                                            gyr, gxr, TOK_b, T, TH_bh, s_tt, s_ti, s_tj, KY, KX, PIN_b,
                                            HAS_OFFSET, HAS_PIN, BLOCK_M, BLOCK_N, BLOCK_D, KYP, KXP)
            if HAS_PIN:
                tl.store(lse_ptr + R * s_lr, lse_0, mask=m_mask)
            if WANT_PROBS:
                P_bh = PROBS + (b * H + h).to(tl.int64) * M * N
                _store_probs(q, Kr, s_kn, s_kd, n_r, N, scale, offs_d, d_mask, lse_e, lse_0,
                             gyr, gxr, TOK_b, T, TH_bh, s_tt, s_ti, s_tj, KY, KX, PIN_b, P_bh, offs_m, m_mask,
                             HAS_OFFSET, HAS_PIN, BLOCK_N, KYP, KXP)
        else:
            o_r, lse_e, lse_0 = _region_fwd(q, Kr, Vr, s_kn, s_kd, s_vn, s_vd, n_r, scale, offs_d, d_mask,
                                            gyr, gxr, TOK_b, T, TH_bh, s_tt, s_ti, s_tj, KY, KX, PIN_b,
                                            False, False, BLOCK_M, BLOCK_N, BLOCK_D, KYP, KXP)
        tl.store(lse_ptr + r * s_lr, lse_e, mask=m_mask)
        acc += a[:, None] * o_r
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od,
             acc.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


@triton.jit
def _probs(z, ze, lse_e, lse_0, pin, HAS_PIN: tl.constexpr):
    """(p_edited over all columns, p_unedited over all columns) from the saved statistics."""
    pe = tl.exp(ze - lse_e[:, None])
    p0 = pe
    if HAS_PIN:
        p0 = tl.exp(z - lse_0[:, None])
    return pe, p0


@triton.jit
def _dlogits(pe, p0, dpv, a, De, D0, g, Ge, G0, pin, HAS_PIN: tl.constexpr, HAS_GP: tl.constexpr):
    """(dz, dz_edited): softmax backward of both statistics; dp = a * dpv, plus g (the maps'
    gradient, its row sums Ge / G0 over the edited / pinned columns) with HAS_GP."""
    if HAS_GP:
        if HAS_PIN:
            dze = pe * (a[:, None] * (tl.where(pin[None, :], 0.0, dpv) - De[:, None])
                        + tl.where(pin[None, :], 0.0, g) - Ge[:, None])
            dz = dze + p0 * (a[:, None] * (tl.where(pin[None, :], dpv, 0.0) - D0[:, None])
                             + tl.where(pin[None, :], g, 0.0) - G0[:, None])
        else:
            dze = pe * (a[:, None] * (dpv - De[:, None]) + g - Ge[:, None])
            dz = dze
    elif HAS_PIN:
        dze = pe * a[:, None] * (tl.where(pin[None, :], 0.0, dpv) - De[:, None])
        dz = dze + p0 * a[:, None] * (tl.where(pin[None, :], dpv, 0.0) - D0[:, None])
    else:
        dze = pe * a[:, None] * (dpv - De[:, None])
        dz = dze
    return dz, dze


@triton.jit
def _gp_tile(GP, s_gpm, offs_m, m_mask, cols, c_mask):
    """The maps' gradient on one (pixel block, key block) tile; 0 outside the valid keys."""
    return tl.load(GP + offs_m[:, None] * s_gpm + cols[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0)


@triton.jit
def _bwd_tile(q, do, K, V, s_kn, s_kd, s_vn, s_vd, n0, N, scale, offs_d, d_mask,
              lse_e, lse_0, gyr, gxr, TOK, T, TH, s_tt, s_ti, s_tj, KY, KX, PIN,
              HAS_OFFSET: tl.constexpr, HAS_PIN: tl.constexpr, BLOCK_N: tl.constexpr,
              KYP: tl.constexpr, KXP: tl.constexpr):
    """One key block recomputed for the backward: columns, keys, pinned flags, both
    probabilities and dpv = dO . v^T."""
    cols = n0 + tl.arange(0, BLOCK_N)
    c_mask = cols < N
    k, z, ze = _logits(q, K, s_kn, s_kd, cols, c_mask, offs_d, d_mask, scale,
                       gyr, gxr, TOK, T, TH, s_tt, s_ti, s_tj, KY, KX, HAS_OFFSET, KYP, KXP)
    v = tl.load(V + cols[:, None] * s_vn + offs_d[None, :] * s_vd,
                mask=c_mask[:, None] & d_mask[None, :], other=0.0)
    pin = tl.zeros([BLOCK_N], tl.int32) != 0
    if HAS_PIN:
        pin = tl.load(PIN + cols, mask=c_mask, other=0) != 0
    pe, p0 = _probs(z, ze, lse_e, lse_0, pin, HAS_PIN)
    return cols, k, pin, pe, p0, tl.dot(do, tl.trans(v))


@triton.jit
def _region_bwd_dq(q, do, a, K, V, s_kn, s_kd, s_vn, s_vd, N, scale, offs_d, d_mask,
                   lse_e, lse_0, gyr, gxr, TOK, T, TH, s_tt, s_ti, s_tj, KY, KX, PIN, DTH, s_dt,
                   GP, s_gpm, offs_m, m_mask,
                   HAS_OFFSET: tl.constexpr, HAS_PIN: tl.constexpr, NEED_DTHETA: tl.constexpr,
                   HAS_GP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   KYP: tl.constexpr, KXP: tl.constexpr):
    """dQ contribution of one region, D = <dO, O_r> split into edited / pinned parts, and (HAS_GP)
    the maps' gradient's row sums Ge = <pe, g> (edited columns) and G0 = <p0, g> (pinned ones)."""
    De = tl.zeros([BLOCK_M], tl.float32)
    D0 = tl.zeros([BLOCK_M], tl.float32)
    Ge = tl.zeros([BLOCK_M], tl.float32)
    G0 = tl.zeros([BLOCK_M], tl.float32)
    # pass 1: D over all key blocks (needed by every column's softmax backward)
    for n0 in range(0, N, BLOCK_N):
        cols, k, pin, pe, p0, dpv = _bwd_tile(q, do, K, V, s_kn, s_kd, s_vn, s_vd, n0, N, scale, offs_d, d_mask,
                                              lse_e, lse_0, gyr, gxr, TOK, T, TH, s_tt, s_ti, s_tj, KY, KX, PIN,
                                              HAS_OFFSET, HAS_PIN, BLOCK_N, KYP, KXP)
        if HAS_PIN:
            De += tl.sum(tl.where(pin[None, :], 0.0, pe * dpv), axis=1)
            D0 += tl.sum(tl.where(pin[None, :], p0 * dpv, 0.0), axis=1)
        else:
            De += tl.sum(pe * dpv, axis=1)
        if HAS_GP:
            g = _gp_tile(GP, s_gpm, offs_m, m_mask, cols, cols < N)
            if HAS_PIN:
                Ge += tl.sum(tl.where(pin[None, :], 0.0, pe * g), axis=1)
                G0 += tl.sum(tl.where(pin[None, :], p0 * g, 0.0), axis=1)
            else:
                Ge += tl.sum(pe * g, axis=1)
    # pass 2: dz, dQ and dTheta
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols, k, pin, pe, p0, dpv = _bwd_tile(q, do, K, V, s_kn, s_kd, s_vn, s_vd, n0, N, scale, offs_d, d_mask,
                                              lse_e, lse_0, gyr, gxr, TOK, T, TH, s_tt, s_ti, s_tj, KY, KX, PIN,
                                              HAS_OFFSET, HAS_PIN, BLOCK_N, KYP, KXP)
        g = dpv
        if HAS_GP:
            g = _gp_tile(GP, s_gpm, offs_m, m_mask, cols, cols < N)
        dz, dze = _dlogits(pe, p0, dpv, a, De, D0, g, Ge, G0, pin, HAS_PIN, HAS_GP)
        dq += tl.dot(dz.to(k.dtype), k)
        if NEED_DTHETA:
            ki = tl.arange(0, KYP)
            kj = tl.arange(0, KXP)
            for t in range(T):
                tok = tl.load(TOK + t)
                if (tok >= n0) & (tok < n0 + BLOCK_N):
                    ds = tl.sum(tl.where(cols[None, :] == tok, dze, 0.0), axis=1)
                    dth = tl.dot(tl.trans(gyr * ds[:, None]), gxr, input_precision="ieee")
                    tl.store(DTH + t * s_dt + ki[:, None] * KX + kj[None, :], dth,
                             mask=(ki[:, None] < KY) & (kj[None, :] < KX))
    return dq * scale, De, D0, Ge, G0


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DB, Wt, Mk, TOK, TH, GY, GX, PIN, LEN, DTH, GP, DG,
                   s_qb, s_qh, s_qm, s_qd,
                   s_kb, s_kr, s_kh, s_kn, s_kd,
                   s_vb, s_vr, s_vh, s_vn, s_vd,
                   s_ob, s_oh, s_om, s_od,
                   s_lb, s_lr, s_lh, s_lm,
                   s_wb, s_wr, s_mb, s_mr, s_mm,
                   s_tb, s_th, s_tt, s_ti, s_tj, s_gy, s_gx, s_tokb, s_pinb,
                   s_dqb, s_dqh, s_dqm, s_dqd,
                   H, R, M, N, D, T, W, KY, KX, scale,
                   AFFINE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_PIN: tl.constexpr,
                   HAS_LENGTHS: tl.constexpr, NEED_DQ: tl.constexpr, STORE_D: tl.constexpr, NEED_DTHETA: tl.constexpr,
                   HAS_GP: tl.constexpr, STORE_DG: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   KYP: tl.constexpr, KXP: tl.constexpr):
    """DO is read through the O stride slots (its own strides), DQ through its own (the launcher
    allocates it in [B, M, H, D] memory order, as O); DB [B, R + HAS_PIN, H, M] like LSE;
    DTH partials [B, H, n_mblocks, T, KY, KX] contiguous; GP [B, H, M, N] contiguous (HAS_GP);
    DG like DB, slots 0 and R (pins) only: region 0's Ge / G0 for the dK kernel (STORE_DG)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    io_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=io_mask, other=0.0)
    do = tl.load(DO + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=io_mask, other=0.0)
    gyr = tl.zeros([BLOCK_M, KYP], tl.float32)
    gxr = tl.zeros([BLOCK_M, KXP], tl.float32)
    if HAS_OFFSET:
        gyr, gxr = _basis_rows(offs_m, m_mask, W, GY, s_gy, GX, s_gx, KY, KX, KYP, KXP)
    TH_bh = TH + b * s_tb + h * s_th
    TOK_b = TOK + b * s_tokb
    PIN_b = PIN + b * s_pinb
    DTH_blk = DTH + ((b * H + h) * tl.num_programs(0) + pid_m) * T * KY * KX
    lse_ptr = LSE + b * s_lb + h * s_lh + offs_m * s_lm
    db_ptr = DB + b * s_lb + h * s_lh + offs_m * s_lm
    GP_bh = GP + (b * H + h).to(tl.int64) * M * N
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r in range(0, R):
        Kr = K + b * s_kb + r * s_kr + h * s_kh
        Vr = V + b * s_vb + r * s_vr + h * s_vh
        n_r = _keys_of(LEN, r, N, HAS_LENGTHS)
        a = _alpha_of(Wt, Mk, b, r, R, s_wb, s_wr, s_mb, s_mr, s_mm, offs_m, m_mask, AFFINE, BLOCK_M)
        lse_e = tl.load(lse_ptr + r * s_lr, mask=m_mask, other=0.0)
        if r == 0:
            lse_0 = lse_e
            if HAS_PIN:
                lse_0 = tl.load(lse_ptr + R * s_lr, mask=m_mask, other=0.0)
            dq_r, De, D0, Ge, G0 = _region_bwd_dq(
                q, do, a, Kr, Vr, s_kn, s_kd, s_vn, s_vd, n_r, scale, offs_d, d_mask,
                lse_e, lse_0, gyr, gxr, TOK_b, T, TH_bh, s_tt, s_ti, s_tj, KY, KX,
                PIN_b, DTH_blk, KY * KX, GP_bh, N, offs_m, m_mask, HAS_OFFSET, HAS_PIN, NEED_DTHETA, HAS_GP,
                BLOCK_M, BLOCK_N, BLOCK_D, KYP, KXP)
            if STORE_D and HAS_PIN:
                tl.store(db_ptr + R * s_lr, D0, mask=m_mask)
            if STORE_DG:
                dg_ptr = DG + b * s_lb + h * s_lh + offs_m * s_lm
                tl.store(dg_ptr, Ge, mask=m_mask)
                if HAS_PIN:
                    tl.store(dg_ptr + R * s_lr, G0, mask=m_mask)
        else:
            dq_r, De, D0, Ge, G0 = _region_bwd_dq(
                q, do, a, Kr, Vr, s_kn, s_kd, s_vn, s_vd, n_r, scale, offs_d, d_mask,
                lse_e, lse_e, gyr, gxr, TOK_b, T, TH_bh, s_tt, s_ti, s_tj, KY, KX,
                PIN_b, DTH_blk, KY * KX, GP_bh, N, offs_m, m_mask, False, False, False, False,
                BLOCK_M, BLOCK_N, BLOCK_D, KYP, KXP)
        if STORE_D:
            tl.store(db_ptr + r * s_lr, De, mask=m_mask)
        dq += dq_r
    if NEED_DQ:
        tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqm + offs_d[None, :] * s_dqd,
                 dq.to(DQ.dtype.element_ty), mask=io_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DB, Wt, Mk, TOK, TH, GY, GX, PIN, LEN, GP, DG,
                     s_qb, s_qh, s_qm, s_qd,
                     s_kb, s_kr, s_kh, s_kn, s_kd,
                     s_vb, s_vr, s_vh, s_vn, s_vd,
                     s_ob, s_oh, s_om, s_od,
                     s_lb, s_lr, s_lh, s_lm,
                     s_wb, s_wr, s_mb, s_mr, s_mm,
                     s_tb, s_th, s_tt, s_ti, s_tj, s_gy, s_gx, s_tokb, s_pinb,
                     H, R, R_FIRST, R_COUNT, M, N, D, T, W, KY, KX, scale,
                     AFFINE: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_PIN: tl.constexpr,
                     HAS_LENGTHS: tl.constexpr, HAS_GP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     KYP: tl.constexpr, KXP: tl.constexpr):
    """dK, dV of one key block of region r for (b, h); DK/DV share strides with K/V.
    Launched once for region 0 (with its offset / pins) and once for the R_COUNT regions from
    R_FIRST = 1 on. Keys past the region's length (HAS_LENGTHS) get exact zeros; a block of
    them only (m_end = 0) skips the pixel loop. HAS_GP (region 0's launch only): the maps'
    gradient GP and its row sums DG from the dQ kernel enter dK."""
    pid_n = tl.program_id(0)
    brh = tl.program_id(1)
    b = brh // (R_COUNT * H)
    r = R_FIRST + (brh // H) % R_COUNT
    h = brh % H
    n_r = _keys_of(LEN, r, N, HAS_LENGTHS)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = cols < n_r
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    kv_mask = c_mask[:, None] & d_mask[None, :]
    store_mask = kv_mask
    m_end = M
    if HAS_LENGTHS:
        store_mask = (cols < N)[:, None] & d_mask[None, :]
        m_end = tl.where(pid_n * BLOCK_N < n_r, M, 0)
    Kr = K + b * s_kb + r * s_kr + h * s_kh
    Vr = V + b * s_vb + r * s_vr + h * s_vh
    v = tl.load(Vr + cols[:, None] * s_vn + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    pin = tl.zeros([BLOCK_N], tl.int32) != 0
    if HAS_PIN:
        pin = tl.load(PIN + b * s_pinb + cols, mask=c_mask, other=0) != 0
    TH_bh = TH + b * s_tb + h * s_th
    TOK_b = TOK + b * s_tokb
    GP_bh = GP + (b * H + h).to(tl.int64) * M * N
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for m0 in range(0, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        io_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=io_mask, other=0.0)
        do = tl.load(DO + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_d[None, :] * s_od, mask=io_mask, other=0.0)
        gyr = tl.zeros([BLOCK_M, KYP], tl.float32)
        gxr = tl.zeros([BLOCK_M, KXP], tl.float32)
        if HAS_OFFSET:
            gyr, gxr = _basis_rows(offs_m, m_mask, W, GY, s_gy, GX, s_gx, KY, KX, KYP, KXP)
        a = _alpha_of(Wt, Mk, b, r, R, s_wb, s_wr, s_mb, s_mr, s_mm, offs_m, m_mask, AFFINE, BLOCK_M)
        lse_ptr = LSE + b * s_lb + h * s_lh + offs_m * s_lm
        db_ptr = DB + b * s_lb + h * s_lh + offs_m * s_lm
        lse_e = tl.load(lse_ptr + r * s_lr, mask=m_mask, other=0.0)
        De = tl.load(db_ptr + r * s_lr, mask=m_mask, other=0.0)
        lse_0 = lse_e
        D0 = De
        if HAS_PIN:
            lse_0 = tl.load(lse_ptr + R * s_lr, mask=m_mask, other=0.0)
            D0 = tl.load(db_ptr + R * s_lr, mask=m_mask, other=0.0)
        k, z, ze = _logits(q, Kr, s_kn, s_kd, cols, c_mask, offs_d, d_mask, scale,
                           gyr, gxr, TOK_b, T, TH_bh, s_tt, s_ti, s_tj, KY, KX, HAS_OFFSET, KYP, KXP)
        pe, p0 = _probs(z, ze, lse_e, lse_0, pin, HAS_PIN)
        p = pe
        if HAS_PIN:
            p = tl.where(pin[None, :], p0, pe)
        dv += tl.dot(tl.trans((p * a[:, None]).to(do.dtype)), do)
        dpv = tl.dot(do, tl.trans(v))
        g = dpv
        Ge = De
        G0 = D0
        if HAS_GP:
            g = _gp_tile(GP_bh, N, offs_m, m_mask, cols, c_mask)
            dg_ptr = DG + b * s_lb + h * s_lh + offs_m * s_lm
            Ge = tl.load(dg_ptr + r * s_lr, mask=m_mask, other=0.0)
            if HAS_PIN:
                G0 = tl.load(dg_ptr + R * s_lr, mask=m_mask, other=0.0)
        dz, dze = _dlogits(pe, p0, dpv, a, De, D0, g, Ge, G0, pin, HAS_PIN, HAS_GP)
        dk += tl.dot(tl.trans(dz.to(q.dtype)), q)
    tl.store(DK + b * s_kb + r * s_kr + h * s_kh + cols[:, None] * s_kn + offs_d[None, :] * s_kd,
             (dk * scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + b * s_vb + r * s_vr + h * s_vh + cols[:, None] * s_vn + offs_d[None, :] * s_vd,
             dv.to(DV.dtype.element_ty), mask=store_mask)
