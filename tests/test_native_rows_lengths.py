"""Native CPU kernels (csrc/, stattn.native) with per-row target tokens / pinned columns (tokens
[B, T], pin [B, N], either with the other shared) and per-region key lengths (lengths [R]: region
r attends to its first lengths[r] keys), forward and every gradient, against an fp64 oracle built
here from the shared-token reference: a loop over batch rows (each with its own tokens and pins),
each region computed on its truncated keys and the regions combined with alpha. Outputs
NaN-poisoned; saved logits on and off; dk / dv exactly 0 on padding keys; both fp32 instruction
paths; bad arguments rejected."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

import stattn
from stattn import native
from stattn import reference as ref
from helpers import GRAD_TOL_FACTOR, rel_err
from test_native import NATIVE_TOL

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
GRADS = ("q", "k", "v", "weights", "masks", "theta")

if not native.load():
    if os.environ.get("STATTN_REQUIRE_NATIVE") == "1":
        pytest.fail(f"native extension unavailable: {native._state.get('error')}", pytrace=False)
    pytest.skip(f"native extension unavailable: {native._state.get('error')}", allow_module_level=True)


@dataclass
class RowCase:
    """tokens / pins: a tuple of ints (shared by the rows: a 1-D tensor) or a tuple of B tuples
    (one row each: 2-D); pins None: no pin tensor. lengths None: every region uses all N keys."""
    tokens: tuple = ()
    pins: Optional[tuple] = None
    lengths: Optional[tuple] = None
    B: int = 3
    H: int = 2
    h: int = 5
    w: int = 7
    D: int = 40
    R: int = 2
    N: int = 77
    affine: bool = False
    dtype: torch.dtype = F32
    theta_scale: float = 1.0

    @property
    def M(self):
        return self.h * self.w

    def rows(self, x) -> tuple[list, bool]:
        """(row b's columns for every b, given per row?)"""
        per_row = len(x) > 0 and isinstance(x[0], tuple)
        return (list(x) if per_row else [tuple(x)] * self.B), per_row

    @property
    def T(self):
        return len(self.rows(self.tokens)[0][0])


def _id(c: RowCase) -> str:
    tok = "tokrows" if c.rows(c.tokens)[1] else f"tok{c.T}"
    pin = "nopin" if c.pins is None else ("pinrows" if c.rows(c.pins)[1] else f"pin{len(c.pins)}")
    lens = "all" if c.lengths is None else "-".join(map(str, c.lengths))
    return (f"{tok}-{pin}-len{lens}-R{c.R}-N{c.N}-D{c.D}-M{c.M}-{'aff' if c.affine else 'lin'}"
            f"{'-x' + str(c.theta_scale) if c.theta_scale != 1 else ''}-{str(c.dtype).split('.')[-1]}")


ROWS3 = ((3, 5), (0, 7), (9, 1))
CASES = [
    RowCase(tokens=ROWS3),                                                    # per-row tokens only
    RowCase(tokens=ROWS3, pins=(0,), affine=True),      # 2-D tokens, 1-D pin; 0 a target of row 1 only
    RowCase(tokens=(2, 6), pins=((0,), (), (6, 11)), affine=True),            # 1-D tokens, 2-D pin (row 1: none)
    RowCase(tokens=ROWS3, pins=((3, 10), (), (1, 4))),                        # pinned targets in rows 0 and 2
    RowCase(tokens=(), pins=((0, 3), ()), B=2, lengths=(20, 9)),              # pins without an offset
    RowCase(tokens=(1, 3), pins=(0,), R=3, lengths=(77, 4, 16)),              # lengths only
    RowCase(tokens=((3, 30), (0, 7)), pins=((0,), ()), B=2, R=3, lengths=(33, 77, 5), affine=True),  # both
    RowCase(tokens=((2, 6), (1, 9), (4, 0)), pins=((0, 6), (), (3,)), lengths=(21, 50), theta_scale=40.0,
            affine=True),                                   # offsets of +-100: the two-pass / general rows
    RowCase(tokens=(tuple(range(1, 18)), tuple(range(20, 37))), pins=(0,), B=2, lengths=(40, 9)),  # 17 targets
    RowCase(tokens=((3, 30), (0, 7)), pins=((0,), ()), B=2, R=3, lengths=(33, 77, 5), h=13, w=11,
            affine=True),                                   # M = 143: a partial second pixel block
    RowCase(tokens=((2, 5), (0, 6)), pins=((), (1,)), B=2, N=13, D=36, lengths=(7, 13)),  # tails of the transpose
    RowCase(tokens=((3, 30), (0, 7)), pins=((0,), ()), B=2, R=3, lengths=(33, 77, 5), affine=True, dtype=F64),
    RowCase(tokens=ROWS3, pins=((3, 10), (), (1, 4)), lengths=(31, 77), dtype=F64),
    RowCase(tokens=((2, 6), (1, 9), (4, 0)), pins=((0, 6), (), (3,)), lengths=(21, 50), theta_scale=40.0,
            dtype=F64),
    RowCase(tokens=((3, 30), (0, 7)), pins=((0,), ()), B=2, R=3, lengths=(33, 77, 5), affine=True, dtype=BF16),
    RowCase(tokens=ROWS3, pins=((3, 10), (), (1, 4)), lengths=(31, 77), dtype=F16),
]


def make_row_inputs(c: RowCase, seed: int = 0) -> dict:
    """fp64 masters: q, k, v, weights [B, R], masks [B, R, M], theta (None without tokens), basis, do."""
    g = torch.Generator().manual_seed(seed)
    dd = dict(generator=g, dtype=F64)
    gy, gx = stattn.gaussian_basis(c.h, c.w, sigma=1, dtype=F64)
    return dict(q=torch.randn(c.B, c.H, c.M, c.D, **dd), k=torch.randn(c.B, c.R, c.H, c.N, c.D, **dd),
                v=torch.randn(c.B, c.R, c.H, c.N, c.D, **dd), weights=0.25 + torch.rand(c.B, c.R, **dd),
                masks=torch.rand(c.B, c.R, c.M, **dd),
                theta=c.theta_scale * torch.randn(c.B, c.H, c.T, gy.shape[1], gx.shape[1], **dd) if c.T else None,
                basis=(gy, gx), do=torch.randn(c.B, c.H, c.M, c.D, **dd))


def oracle(c: RowCase, inp: dict):
    """(o, lse [B, R + has_pin, H, M], {name: grad}) in fp64 by autograd through the reference: per
    batch row with its own tokens and pins, each region on its first lengths[r] keys."""
    leaves = {n: inp[n].clone().requires_grad_() for n in GRADS if inp[n] is not None}
    q, k, v, theta = leaves["q"], leaves["k"], leaves["v"], leaves.get("theta")
    gy, gx = inp["basis"]
    alpha = ref.region_alpha(leaves["weights"], leaves["masks"], c.affine)       # [B, R, M]
    tokens, pins = c.rows(c.tokens)[0], c.rows(c.pins or ())[0]
    lengths = c.lengths or (c.N,) * c.R
    scale, ones_m, ones_w = c.D ** -0.5, q.new_ones(1, 1, c.M), q.new_ones(1, 1)
    outs, lses = [], []
    for b in range(c.B):
        o_b, lse_b = 0, []
        for r in range(c.R):
            off = None
            if r == 0 and (tokens[b] or pins[b]):
                off = SimpleNamespace(theta=None if theta is None else theta[b:b + 1], gy=gy, gx=gx,
                                      tokens=tokens[b], pinned=pins[b])
            kr, vr = (x[b:b + 1, r:r + 1, :, :lengths[r]] for x in (k, v))
            o_r = ref.region_attention(q[b:b + 1], kr, vr, ones_m, ones_w, False, off, scale)
            o_b = o_b + alpha[b:b + 1, r, None, :, None] * o_r
            z, z0_edited = ref.region_logits(q[b:b + 1].detach(), kr.detach(), scale, off)
            lse_b.append((z[:, 0] if z0_edited is None else z0_edited).logsumexp(-1))
            if r == 0:
                lse_un = z[:, 0].logsumexp(-1)                                  # slot R: region 0 without S
        outs.append(o_b)
        lses.append(torch.stack(lse_b + ([lse_un] if c.pins is not None else []), 1))
    o = torch.cat(outs)
    got = torch.autograd.grad(o, list(leaves.values()), inp["do"], allow_unused=True)
    return o.detach(), torch.cat(lses), {n: torch.zeros_like(leaves[n]) if g is None else g
                                          for n, g in zip(leaves, got)}


def native_args(c: RowCase, inp: dict) -> tuple:
    """The native op's arguments (q .. scale) in the case's dtype, and lengths."""
    ct = F64 if c.dtype == F64 else F32
    q, k, v = (inp[n].to(c.dtype) for n in ("q", "k", "v"))
    theta = tokens = gy = gx = pin = lengths = None
    if c.T:
        theta = inp["theta"].to(ct)
        gy, gx = (b.to(ct) for b in inp["basis"])
        rows, per_row = c.rows(c.tokens)
        tokens = torch.tensor(rows if per_row else rows[0], dtype=torch.int32)
    if c.pins is not None:
        rows, per_row = c.rows(c.pins)
        pin = torch.zeros(c.B, c.N, dtype=torch.int32)
        for b, cols in enumerate(rows):
            pin[b, list(cols)] = 1
        pin = pin if per_row else pin[0].contiguous()
    if c.lengths is not None:
        lengths = torch.tensor(c.lengths, dtype=torch.int32)
    return (q, k, v, inp["weights"].to(ct), inp["masks"].to(ct), c.affine, theta, tokens, gy, gx, pin,
            c.D ** -0.5), lengths


def native_run(c: RowCase, inp: dict, save_logits: bool):
    """(o, lse, {name: grad}) of native.forward / backward (every gradient the case has)."""
    args, lengths = native_args(c, inp)
    o, lse, logits = native.forward(*args, save_logits, lengths)
    assert logits.numel() == (c.B * c.H * c.M * c.R * c.N if save_logits else 0)
    needs = [True] * 5 + [args[6] is not None]
    grads = native.backward(inp["do"].to(c.dtype), *args, lse, needs, logits if save_logits else None, lengths)
    return o, lse, {n: g for n, g in zip(GRADS, grads) if g is not None}


def check(c: RowCase, got, expected):
    tol = NATIVE_TOL[c.dtype]
    (o, lse, grads), (ref_o, ref_lse, ref_grads) = got, expected
    assert o.dtype == c.dtype and o.shape == ref_o.shape
    assert rel_err(o, ref_o) < tol, "forward"
    assert lse.dtype == F32 and lse.shape == ref_lse.shape and not lse.isnan().any()
    if c.dtype in (F32, F64):  # (low-precision inputs move the lse by their own rounding)
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert g.shape == ref_grads[name].shape, name
        assert rel_err(g, ref_grads[name]) < tol * GRAD_TOL_FACTOR, name
    for r, n in enumerate(c.lengths or ()):  # padding keys: gradients exactly 0
        assert (grads["k"][:, r, :, n:] == 0).all() and (grads["v"][:, r, :, n:] == 0).all(), f"region {r}"


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setenv("STATTN_NATIVE_POISON", "1")  # every native output starts NaN-filled


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_native_rows_and_lengths_match_the_oracle(case, poison):
    inp = make_row_inputs(case)
    expected = oracle(case, inp)
    saved, recomputed = native_run(case, inp, True), native_run(case, inp, False)
    check(case, saved, expected)
    check(case, recomputed, expected)
    # the saved logits are what the backward's own product gives (the same product): equal gradients
    assert torch.equal(saved[0], recomputed[0])
    for name, g in saved[2].items():
        assert torch.equal(g, recomputed[2][name]), name


def test_native_per_row_form_with_equal_rows_is_the_shared_form(poison):
    """tokens [B, T] and pin [B, N] whose rows are all equal: the shared op exactly (the same work)."""
    shared = RowCase(tokens=(3, 5), pins=(0, 3), lengths=(60, 77))
    per_row = RowCase(tokens=((3, 5),) * 3, pins=((0, 3),) * 3, lengths=(60, 77))
    inp = make_row_inputs(shared, seed=1)
    a, b = native_run(shared, inp, False), native_run(per_row, inp, False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for name in a[2]:
        assert torch.equal(a[2][name], b[2][name]), name


@pytest.mark.parametrize("dtype", [F32, F64])
def test_native_padding_keys_are_never_read(dtype, poison):
    """NaN and inf in the keys and values beyond each region's length change nothing."""
    case = RowCase(tokens=((3, 30), (0, 7)), pins=((0,), ()), B=2, R=3, lengths=(33, 77, 5), affine=True,
                   dtype=dtype)
    inp = make_row_inputs(case, seed=2)
    expected = oracle(case, inp)
    for r, n in enumerate(case.lengths):
        inp["k"][:, r, :, n:] = float("nan")
        inp["v"][:, r, :, n:] = float("inf")
    check(case, native_run(case, inp, True), expected)
    check(case, native_run(case, inp, False), expected)


def test_native_saved_logits_hold_minus_inf_on_padding(poison):
    case = RowCase(tokens=(1, 3), pins=(0,), B=2, R=3, lengths=(77, 4, 16))
    inp = make_row_inputs(case, seed=3)
    args, lengths = native_args(case, inp)
    _, _, logits = native.forward(*args, True, lengths)
    z = torch.einsum("bhmd,brhnd->bhmrn", inp["q"], inp["k"]) * case.D ** -0.5
    for r, n in enumerate(case.lengths):
        z[..., r, n:] = -float("inf")
    torch.testing.assert_close(logits.double(), z.flatten(3), rtol=1e-5, atol=1e-5)


def _bad(c: RowCase, **changes):
    """The native arguments of case c with some replaced (by name), and lengths."""
    args, lengths = native_args(c, make_row_inputs(c))
    names = ("q", "k", "v", "weights", "masks", "affine", "theta", "tokens", "gy", "gx", "pin", "scale")
    full = dict(zip(names, args), lengths=lengths)
    full.update(changes)
    return [full[n] for n in names], full["lengths"]


I32 = torch.int32
BAD = [
    (dict(lengths=torch.tensor([77, 0], dtype=I32)), ValueError, r"lengths\[1\] = 0 must be in \[1, N = 77\]"),
    (dict(lengths=torch.tensor([78, 4], dtype=I32)), ValueError, r"lengths\[0\] = 78 must be in \[1, N = 77\]"),
    (dict(lengths=torch.tensor([77, 4, 4], dtype=I32)), ValueError, r"lengths must have shape \[R\] = \[2\]"),
    (dict(lengths=torch.tensor([[77, 4]], dtype=I32)), ValueError, r"lengths must have shape \[R\]"),
    (dict(lengths=torch.tensor([77.0, 4.0])), TypeError, "lengths must be an integer tensor"),
    (dict(lengths=torch.tensor([5, 77], dtype=I32)), ValueError, r"tokens of row 0: index 5 out of range \[0, 5\)"),
    (dict(lengths=torch.tensor([10, 77], dtype=I32)), ValueError, "pin of row 0 flags column 10, a padding key"),
    (dict(tokens=torch.tensor([[3, 5], [7, 7], [9, 1]], dtype=I32)), ValueError, "tokens of row 1: index 7 repeated"),
    (dict(tokens=torch.tensor([[3, 5], [0, 7]], dtype=I32)), ValueError, r"tokens must have shape \[T\] or \[B, T\]"),
    (dict(tokens=torch.tensor([[3, 5, 1]] * 3, dtype=I32)), ValueError, r"= \[2\] or \[3, 2\], got \[3, 3\]"),
    (dict(tokens=torch.tensor([77, 5], dtype=I32)), ValueError, r"tokens: index 77 out of range \[0, 77\) \(N\)"),
    (dict(pin=torch.zeros(3, 76, dtype=I32)), ValueError, r"pin must have shape \[N\] or \[B, N\]"),
    (dict(pin=torch.zeros(2, 77, dtype=I32)), ValueError, r"pin must have shape"),
    (dict(pin=torch.zeros(3, 77)), TypeError, "pin must be an integer tensor"),
]


@pytest.mark.parametrize("changes,error,match", BAD, ids=[m for _, _, m in BAD])
def test_native_rejects_bad_rows_and_lengths(changes, error, match):
    case = RowCase(tokens=ROWS3, pins=((3, 10), (), (1, 4)))
    args, lengths = _bad(case, **changes)
    with pytest.raises(error, match=match):
        native.forward(*args, False, lengths)


def max_err(case_index: int) -> float:
    """Largest error ratio (error / tolerance) of CASES[case_index], forward and gradients, saved
    logits on and off: < 1 passes (for the subprocess of test_native_8_lane_path)."""
    c = CASES[case_index]
    inp = make_row_inputs(c)
    (ref_o, _, ref_grads), tol = oracle(c, inp), NATIVE_TOL[c.dtype]
    errs = []
    for save in (True, False):
        o, _, grads = native_run(c, inp, save)
        errs += [rel_err(o, ref_o) / tol] + [rel_err(g, ref_grads[n]) / (tol * GRAD_TOL_FACTOR)
                                            for n, g in grads.items()]
    return max(errs)


def test_native_8_lane_path():
    """STATTN_NATIVE_V4=0 (read once: a fresh process) runs the fp32 row work with 8 lanes, as on
    AVX2 or baseline machines: per-row tokens and pins with lengths (case 6) and the large offsets'
    fallback rows (case 7), forward and every gradient."""
    assert CASES[6].lengths and CASES[7].theta_scale == 40.0 and CASES[6].dtype == CASES[7].dtype == F32
    code = ("import sys; sys.path.insert(0, 'tests')\n"
            "import test_native_rows_lengths as t\n"
            "print(max(t.max_err(6), t.max_err(7)))\n")
    env = dict(os.environ, STATTN_NATIVE_V4="0", STATTN_NATIVE_POISON="1", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip().splitlines()[-1]) < 1
