"""The fp64 oracle of the Attention-Regulation inner loop and the comparison of a run against it.

The loop (stattn/methods/regulation/core.py) iterates theta_{i+1} = theta_i - lr n grad L(theta_i), lr n in the
hundreds: a map that amplifies rounding and that branches. The quantile's gradient goes to the pixels
holding the order statistics around rank q (M - 1), so where two of them swap places the step jumps
to other pixels; and best_iter is an argmin over the losses. Two runs in different arithmetic follow
one trajectory, to their rounding, only until the first iteration where that rounding can swap those
order statistics; after it they are two trajectories and no tolerance relates them.

Error model, in logit units (the softmax is shift invariant: absolute logit errors are what move P).
A run in arithmetic of unit roundoff eps errs at iteration j by u_j = eps (1 + max |E_j| + s_{j-1}) in
its logits E = Z + S(theta_j) and the others' log-sum-exp: their rounding at the scale of the largest,
and the rounding of the step that led there, s = lr max |S(|terms of the step|)| (step = n dL/dtheta;
what its cancellations cancel counted at full size: qv - q, mean - thr / T, g - sum_t P g, the sums).
The map carries an error from iteration j to i amplified by A_{j,i} = D_i / D_j, measured by running
the oracle a second time on logits perturbed by +-2^-40 (1 + max |Z|) (D: the largest logit difference
of the two runs). So at iteration i every logit is within K U_i of the oracle's, U_i = sum_{j <= i}
u_j max(1, A_{j,i}), K covering the operations per iteration; theta, made of the same errors, within
K U_i of itself relatively. Hence
- logit(P) = log P - log(1 - P) moves by at most 2 K U_i, so two order statistics can swap only where
  their logits are closer than 4 K U_i: the first such iteration n ends the comparable prefix (L_n
  is still comparable: the quantile interpolates between the order statistics, only its gradient jumps);
- for i <= n: |L_i - L_i(oracle)| <= K U_i sens_i (first order in the logits and theta), and the
  offset S(theta_i) of a returned iterate within K U_i;
- whatever the prefix: best_iter is the first strict minimum of the run's own losses, and theta_best
  the iterate it names, so L(theta_best) evaluated by the oracle is the run's losses[best_iter] to one
  evaluation's rounding;
- where the prefix is the whole run, best_iter is the oracle's, or a near-tie of it (a loss within the
  two tolerances of the minimum).
fp64 runs follow the same rules with eps = 2^-53: the prefix is then the whole run unless two order
statistics are within ~1e-12 (the tests assert how far their comparison reaches).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from stattn import reference as ref
from stattn.methods.regulation import core as rc

WEIGHTS = (1.0, 80.0, 0.09)
EPS = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
K = 8   # in units of U_i; measured on ~200 runs (fp32 and fp64; closed form, autograd, native, Triton): losses
        # within 1.4, offsets within 1.7
SHADOW = 2.0 ** -40     # logit perturbation of the amplification run, relative: far above fp64's 1e-16, linear


class Oracle(NamedTuple):
    losses: Tensor      # [iters] L(theta_i), fp64
    traj: Tensor        # [iters, B, H, T, Ky, Kx] theta_i
    best: int
    offsets: Tensor     # [iters, B, H, M, T] S(theta_i)
    logit_max: Tensor   # [iters] max |E_i| over the target logits and the others' log-sum-exp
    gap: Tensor         # [iters] smallest logit distance between the order statistics around the quantile rank
    sens: Tensor        # [iters] sum |dL/dE| + |dL/d rest| + 2 w2 mean theta^2: L's first-order sensitivity
    step: Tensor        # [iters] lr max |S(|terms of step_i|)|: the offset scale of step i's rounding
    amp: Tensor         # [iters] D_i: largest logit difference from the perturbed run (A_{j,i} = D_i / D_j)
    problem: dict       # fp64 z [B, H, M, N], tokens, basis, loop settings: to evaluate L at any theta


def _cpu64(t: Tensor) -> Tensor:
    return t.detach().cpu().double()


def _probs(E: Tensor, rest: Tensor) -> Tensor:
    c = torch.maximum(rest, E.amax(-1))
    ex = torch.exp(E - c[..., None])
    return ex / (torch.exp(rest - c) + ex.sum(-1))[..., None]                 # [B, H, M, T]


def _loss_of_logits(P, theta, p: dict) -> Tensor:
    """L from the probabilities (torch.quantile's own interpolation), for its gradients."""
    w0, w1, w2 = p["weights"]
    T = P.shape[-1]
    Pt = P.transpose(-1, -2)
    l_q = ((torch.quantile(Pt, p["quantile"], dim=-1) - p["quantile"]) ** 2).mean()
    l_m = ((Pt.mean(-1) - p["thr"] / T) ** 2).mean()
    return w0 * l_q + w1 * l_m + w2 * theta.square().mean()


def _logit_stats(theta: Tensor, p: dict, construction_ties: bool):
    """(S, max |E|, gap, sens, step) of one iterate (see Oracle)."""
    gy, gx = p["basis"]
    S = ref.score_offset(theta, gy, gx)
    E = (p["zt"] + S).requires_grad_(True)
    rest = p["rest"].clone().requires_grad_(True)
    P = _probs(E, rest)
    dE, drest = torch.autograd.grad(_loss_of_logits(P, theta, p), (E, rest))
    # theta's own term: theta carries an error relative to its size, bounded like the logits' (its
    # steps are made of the logits' errors): d(w2 mean theta^2) <= 2 w2 mean theta^2 * that
    w2 = p["weights"][2]
    sens = (dE.abs().sum() + drest.abs().sum()).item() + 2 * w2 * theta.square().mean().item()
    step = _step_rounding(P.detach(), theta, p)
    E = E.detach()
    finite = torch.cat([E.flatten(), p["rest"][torch.isfinite(p["rest"])]])
    Pt = P.transpose(-1, -2)                                                   # [B, H, T, M]
    lg = (torch.log(Pt) - torch.log1p(-Pt)).sort(-1).values
    lo, hi, _ = p["qpos"]
    ranks = sorted({r for r in (lo - 1, lo, hi, hi + 1) if 0 <= r < Pt.shape[-1]})
    d = torch.stack([lg[..., b] - lg[..., a] for a, b in zip(ranks, ranks[1:])])
    # both P exactly 1 (or 0) in fp64, logits inf - inf: moving the quantile's weight w between such
    # pixels changes dL/dE there by w P (1 - P) <= w 2^-53, a rounding: no branch
    d = torch.nan_to_num(d, nan=torch.inf)
    if construction_ties:   # equal logits from equal inputs stay equal in any arithmetic: no branch
        d = torch.where(d == 0, torch.inf, d)
    return S, finite.abs().max().item(), d.min().item(), sens, step


def _step_rounding(P: Tensor, theta: Tensor, p: dict) -> float:
    """lr max |S(step with every term replaced by its magnitude)|: the offset scale of the rounding
    of one step (regulation_core._terms' formulas), so that its cancellations count at the size of
    what cancels: qv - q, mean - thr / T, g - sum_t P g, the sums over pixels and the basis."""
    gy, gx = p["basis"]
    w0, w1, w2 = p["weights"]
    lo, hi, frac = p["qpos"]
    B, H, M, T = P.shape
    Pt = P.transpose(-1, -2)
    srt = Pt.sort(-1).values
    qv = torch.lerp(srt[..., lo], srt[..., hi], frac)
    eq_lo = (Pt == srt[..., lo, None]).double()
    eq_hi = (Pt == srt[..., hi, None]).double()
    wq = (1 - frac) * eq_lo / eq_lo.sum(-1, keepdim=True) + frac * eq_hi / eq_hi.sum(-1, keepdim=True)
    g = (2 * w0 / T) * (qv.abs() + p["quantile"])[..., None] * wq \
        + (2 * w1 / (T * M)) * (Pt.mean(-1) + p["thr"] / T)[..., None]
    g = g.transpose(-1, -2)
    dS = P * (g + (P * g).sum(-1, keepdim=True))
    step = torch.einsum("yi,bhyxt,xj->bhtij", gy, dS.reshape(B, H, gy.shape[0], gx.shape[0], T), gx) \
        + 2 * w2 / theta[0, 0].numel() * theta.abs()
    return p["lr"] * ref.score_offset(step, gy, gx).abs().max().item()


def oracle(q: Tensor, k: Tensor, tokens, theta0: Tensor, basis, *, scale: float, iters: int, lr: float = 100.0,
           quantile: float = 0.9, weights=WEIGHTS, thr: Optional[float] = None,
           construction_ties: bool = False) -> Oracle:
    """The closed-form loop in fp64 on the CPU on the run's own (possibly low-precision) inputs, with
    the run's quantile rank (computed in fp32 for every input but fp64, as torch.quantile on fp32 data).
    ``construction_ties``: the inputs make pixels tie exactly at iteration 0 (equal logits by
    construction, e.g. q = 0 rows and theta0 = 0): those ties are shared by every path alike."""
    rank_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, theta0 = _cpu64(q), _cpu64(k), _cpu64(theta0)
    tokens = torch.as_tensor(tokens).cpu()
    gy, gx = (_cpu64(g) for g in basis)
    M, T = q.shape[2], tokens.numel()
    thr = rc.default_thr(T) if thr is None else thr
    qpos = rc.quantile_position(quantile, M, rank_dtype)
    p = dict(tokens=tokens, basis=(gy, gx), quantile=quantile, weights=tuple(weights), thr=thr, lr=lr, qpos=qpos)
    p["z"] = torch.einsum("bhmd,bhnd->bhmn", q, k) * scale
    p["zt"], p["rest"] = rc.target_logits(p["z"], tokens)

    def run(zt, rest):     # regulation_core._loop_reference's loop, at the run's quantile rank
        theta, thetas, losses = theta0, [], []
        for _ in range(iters):
            l_q, l_m, l_th, step = rc._terms(zt, rest, theta, gy, gx, qpos, quantile, thr / T, p["weights"])
            losses.append(weights[0] * l_q.mean() + weights[1] * l_m.mean() + weights[2] * l_th.mean())
            thetas.append(theta)
            theta = theta - lr * step
        return torch.stack(losses), torch.stack(thetas)

    losses, traj = run(p["zt"], p["rest"])
    zt2, rest2 = rc.target_logits(p["z"] + SHADOW * (1 + p["z"].abs().max()) * _shadow_sign(q, k.shape[2]), tokens)
    _, traj2 = run(zt2, rest2)
    stats = [_logit_stats(th, p, construction_ties and i == 0) for i, th in enumerate(traj)]
    amp = torch.tensor([max((zt2 - p["zt"] + ref.score_offset(b - a, gy, gx)).abs().max().item(),
                            (rest2 - p["rest"]).abs().max().item()) for a, b in zip(traj, traj2)], dtype=torch.float64)
    best = first_strict_minimum(losses)
    col = lambda j: torch.tensor([s[j] for s in stats], dtype=torch.float64)  # noqa: E731
    return Oracle(losses, traj, best, torch.stack([s[0] for s in stats]), col(1), col(2), col(3), col(4), amp, p)


def _shadow_sign(q: Tensor, N: int) -> Tensor:
    """Random signs [B, H, M, N] of the amplification run's logit perturbation, equal for pixels with
    equal q rows (their logits stay equal, as in any arithmetic when they are exactly 0)."""
    B, H, M, _ = q.shape
    r = torch.randint(0, 2, (B, H, M, N), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    for b in range(B):
        for h in range(H):
            r[b, h] = r[b, h, torch.unique(q[b, h], dim=0, return_inverse=True)[1]]
    return r


def budget(o: Oracle, dtype: torch.dtype) -> Tensor:
    """U_i [iters]: a run's logit error at iteration i in units of K (see the module docstring)."""
    u = EPS[dtype] * (1 + o.logit_max + torch.cat([o.step.new_zeros(1), o.step[:-1]]))  # logits, and the step to them
    D = o.amp.clamp_min(torch.finfo(torch.float64).tiny)
    A = (D[None, :] / D[:, None]).clamp_min(1).triu()                         # A[j, i], j <= i
    return (u[:, None] * A).sum(0)


def prefix(o: Oracle, dtype: torch.dtype) -> int:
    """The last iteration whose loss a run in ``dtype`` must reproduce: the first near-branch, or the end."""
    near = (o.gap < 4 * K * budget(o, dtype)).nonzero()
    return int(near[0]) if len(near) else len(o.losses) - 1


def loss_at(o: Oracle, theta: Tensor) -> tuple[float, float, float]:
    """(L(theta), max |E|, sens) evaluated by the oracle at a given theta."""
    theta = _cpu64(theta)
    p = o.problem
    w0, w1, w2 = p["weights"]
    l_q, l_m, l_th, _ = rc._terms(p["zt"], p["rest"], theta, *p["basis"], p["qpos"], p["quantile"],
                                  p["thr"] / p["tokens"].numel(), p["weights"])
    _, emax, _, sens, _ = _logit_stats(theta, p, False)
    return (w0 * l_q.mean() + w1 * l_m.mean() + w2 * l_th.mean()).item(), emax, sens


def first_strict_minimum(losses: Tensor) -> int:
    values = [float("inf") if v != v else v for v in losses.tolist()]         # NaN never improves
    return min(range(len(values)), key=lambda i: (values[i], i))


def assert_matches(res, o: Oracle) -> int:
    """Check a run's (theta_best, best_iter, losses) against the oracle (float32 arithmetic for fp16,
    bf16 and fp32 inputs: their losses are fp32). Returns the last compared iteration."""
    res = type(res)(*(t.detach().cpu() for t in res))
    dtype = torch.float64 if res.losses.dtype == torch.float64 else torch.float32
    U = budget(o, dtype)
    n = prefix(o, dtype)
    got = res.losses.double()
    tol = K * U * o.sens
    bad = [(i, got[i].item(), o.losses[i].item(), tol[i].item()) for i in range(n + 1)
           if not abs(got[i] - o.losses[i]) <= tol[i]]
    assert not bad, f"losses (iteration, run, oracle, tolerance) before the first near-branch at {n}: {bad}"
    best = int(res.best_iter)
    assert best == first_strict_minimum(res.losses), (best, res.losses)      # the branch logic on its own losses
    L, emax, sens = loss_at(o, res.theta_best)
    one = 2 * K * EPS[dtype] * (1 + emax) * sens                              # one evaluation, z rounded too
    assert abs(L - got[best]) <= one, f"L(theta_best) = {L} but losses[{best}] = {got[best].item()} (tol {one})"
    if best <= n:    # the run's best is an iterate of the shared trajectory: its offset, and a best of the prefix
        err = (ref.score_offset(res.theta_best.double(), *o.problem["basis"]) - o.offsets[best]).abs().max()
        assert err <= K * U[best], f"offset of theta_best off by {err.item()} > {K * U[best].item()}"
        floor = min(range(n + 1), key=lambda i: o.losses[i].item())
        assert o.losses[best] - o.losses[floor] <= tol[best] + tol[floor], (best, floor, o.losses[: n + 1])
    if n == len(o.losses) - 1:  # the whole run shared: its best is the oracle's, or a near-tie of it
        assert best <= n and o.losses[best] - o.losses[o.best] <= tol[best] + tol[o.best], (best, o.best)
    return n
