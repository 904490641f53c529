"""region_attention(return_probs=...): region 0's probabilities as applied (edited softmax, pinned
columns un-offset, 0 on padded keys), averaged over heads, beside o from the same pass, on every
backend (reference, native, Triton; the interpreter on CPU) with NaN-poisoned outputs: values and
gradients (a loss on P alone, on P and o) against autograd of the fp64 reference, all columns and
chosen ones, odd sizes, offsets, pins, per-row tokens, key lengths, R = 1 / 2, affine, zero alphas;
the no-grad direct path; the custom op's want_probs / grad_probs through opcheck, fake tensors and
torch.compile; gradcheck in fp64; bad return_probs values."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import stattn
from stattn import ops
from stattn import reference as ref
from helpers import (DEVICE, F32, F64, GPU, GRAD_TOL_FACTOR, OP_BACKENDS, OP_TOL, Case, make_inputs, op_args,
                     op_dtypes, rel_err)

GRADS = ("q", "k", "v", "weights", "masks", "theta")
MAP_GRADS = ("q", "k", "theta")          # what region 0's probabilities depend on


on_each_backend = pytest.mark.parametrize("backend", OP_BACKENDS, indirect=True)

# Odd sizes (no M, N, D a multiple of a tile). ALPHA0: bool masks, so some pixels have alpha_0 = 0
# (the maps do not depend on alpha); BLOCKS: two native pixel blocks (M = 143 > 128), N = 20 (padded
# to 32 in the native rows); not on the Triton interpreter (slow at that size).
PLAIN = Case(B=2, H=3, h=3, w=5, D=13, R=1, N=7, T=0)
CONTROL = Case(B=2, H=2, h=3, w=5, D=24, R=2, N=13, T=2, pinned=(0,), affine=True, key_lengths=(11, 13))
ROWS = Case(B=2, H=2, h=3, w=3, D=20, R=2, N=9, T=1, row_tokens=True, pinned=((1,), ()), key_lengths=(7, 9))
ALPHA0 = Case(B=1, H=2, h=3, w=5, D=13, R=2, N=7, T=0, pinned=(2,), float_masks=False)
BLOCKS = Case(B=1, H=2, h=13, w=11, D=16, R=2, N=20, T=1, pinned=(5,), affine=True, key_lengths=(17, 20))
CASES = {"plain": PLAIN, "control": CONTROL, "rows": ROWS, "alpha0": ALPHA0, "blocks": BLOCKS}
COLS = {"plain": [6, 0, 3], "control": [10, 1, 0, 4], "rows": [2, 6, 2], "alpha0": [2, 5], "blocks": [5, 16, 0]}

# (backend, dtype, case name, select, loss): all columns with a loss on P and o, chosen columns with a
# loss on P alone
VARIANTS = [("all", "P+o"), ("cols", "P")]
COMBOS = [(b, d, c, s, l) for b in OP_BACKENDS for d in op_dtypes(b) for c in CASES for s, l in VARIANTS
          if not (b == "triton" and c == "blocks")]


def _combo_id(c):
    b, d, name, s, l = c
    return f"{b}-{str(d).replace('torch.', '')}-{name}-{s}-{l}"


def _offset(case, inp, theta):
    if inp["theta"] is None:
        return None
    return stattn.ScoreOffset(theta, inp["tokens"], tuple(b.to(theta.dtype) for b in inp["basis"]),
                              pinned=case.pinned)


def _loss_weights(case, n_cols, device):
    """fp64 weights of the loss terms: W on P [B, M, n_cols], dO on o [B, H, M, D]."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(case.B, case.M, n_cols, generator=g, dtype=F64).to(device)
    dO = torch.randn(case.B, case.H, case.M, case.D, generator=g, dtype=F64).to(device)
    return W, dO


def _leaves(inp, dtype):
    tdt = F64 if dtype == F64 else F32
    cast = dict(q=dtype, k=dtype, v=dtype, weights=tdt, masks=tdt, theta=tdt)
    out = {}
    for n, dt in cast.items():
        t = inp[n]
        if t is not None:
            t = t.to(dt if t.dtype.is_floating_point else t.dtype, copy=True)
            if t.dtype.is_floating_point:
                t.requires_grad_(True)
        out[n] = t
    return out


def _op(case, inp, dtype, return_probs):
    """The public op in dtype: (leaves, o, P)."""
    L = _leaves(inp, dtype)
    o, P = stattn.region_attention(L["q"], L["k"], L["v"], masks=L["masks"], region_weights=L["weights"],
                                   affine=case.affine, offset=_offset(case, inp, L["theta"]),
                                   key_lengths=case.key_lengths, return_probs=return_probs)
    return L, o, P


def _oracle(case, inp, cols):
    """fp64 reference: (leaves, o, P) with P = region 0's probabilities, mean over heads (cols: those)."""
    L = {n: None if inp[n] is None else inp[n].double().detach() for n in GRADS}
    for n in GRADS:
        if L[n] is not None and inp[n].dtype.is_floating_point:
            L[n].requires_grad_(True)
    masks = L["masks"] if L["masks"].dim() == 3 else L["masks"].expand(case.B, case.R, case.M)
    off = _offset(case, inp, L["theta"]) if L["theta"] is not None else None
    o = ref.region_attention(L["q"], L["k"], L["v"], masks, L["weights"], case.affine, off,
                             lengths=case.key_lengths)
    P = ref.region0_probs(L["q"], L["k"], case.D ** -0.5, off, case.key_lengths).mean(1)
    return L, o, (P if cols is None else P[..., cols])


def _grads(loss, leaves, names):
    """{name: d loss / d leaf} for the leaves that exist and take a gradient (unused ones: zeros)."""
    names = [n for n in names if leaves[n] is not None and leaves[n].requires_grad]
    got = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(names, got)}


@pytest.mark.gpu
@pytest.mark.parametrize("backend, dtype, name, select, loss", COMBOS, indirect=["backend"], ids=map(_combo_id, COMBOS))
def test_probs_values_and_gradients(backend, dtype, name, select, loss):
    case = CASES[name]
    cols = COLS[name] if select == "cols" else None
    inp = make_inputs(case, DEVICE, seed=3)
    L, o, P = _op(case, inp, dtype, True if cols is None else cols)
    RL, ro, rP = _oracle(case, inp, cols)
    tol = OP_TOL[dtype]
    assert P.shape == rP.shape == (case.B, case.M, len(cols) if cols else case.N)
    assert P.dtype == (F64 if dtype == F64 else F32) and o.dtype == dtype
    assert rel_err(P, rP) < tol, "P"
    assert rel_err(o, ro) < tol, "o"
    if cols is None and case.key_lengths:       # padded keys: probability exactly 0
        pad = P[..., case.key_lengths[0]:]
        assert torch.equal(pad, torch.zeros_like(pad))
    W, dO = _loss_weights(case, P.shape[-1], DEVICE)
    with_o = loss == "P+o"
    got = _grads((P.double() * W).sum() + ((o.double() * dO).sum() if with_o else 0), L, GRADS)
    want = _grads((rP * W).sum() + ((ro * dO).sum() if with_o else 0), RL, GRADS)
    assert set(got) == set(want)
    for n in got:
        assert got[n].shape == want[n].shape, n
        if not with_o and n not in MAP_GRADS:   # v, weights, masks: the maps do not depend on them
            assert torch.equal(got[n], torch.zeros_like(got[n])), n
        else:
            assert rel_err(got[n], want[n]) < tol * GRAD_TOL_FACTOR, n


@on_each_backend
def test_all_columns_and_chosen_columns_agree(backend):
    """return_probs=True and return_probs=cols (a list, a CPU tensor, a device tensor, repeats): the
    chosen columns of the same maps, and the same o as without return_probs."""
    case = CONTROL
    inp = make_inputs(case, DEVICE, seed=5)
    with torch.no_grad():
        L, o, P = _op(case, inp, F32, True)
        plain = stattn.region_attention(L["q"], L["k"], L["v"], masks=L["masks"], region_weights=L["weights"],
                                        affine=case.affine, offset=_offset(case, inp, L["theta"]),
                                        key_lengths=case.key_lengths)
        for cols in ([4, 0, 4], torch.tensor([4, 0, 4]), torch.tensor([4, 0, 4], device=DEVICE, dtype=torch.int32),
                     range(3)):
            _, o_c, P_c = _op(case, inp, F32, cols)
            idx = list(cols.tolist() if isinstance(cols, torch.Tensor) else cols)
            torch.testing.assert_close(P_c, P[..., idx], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(o_c, o, rtol=1e-6, atol=1e-7)
    assert rel_err(o, plain.double()) < OP_TOL[F32]      # asking for the maps leaves o as it was
    for off in (False, None):                               # the plain path returns o alone
        assert isinstance(stattn.region_attention(L["q"], L["k"], L["v"], return_probs=off), torch.Tensor)


@on_each_backend
def test_no_grad_goes_direct_with_the_same_values(backend, monkeypatch):
    """Under torch.no_grad return_probs skips autograd's Function (the direct path) and gives what
    the Function gives for the same inputs (one kernel, the same arguments)."""
    calls = []
    real = ops._EagerRegionAttention.apply
    monkeypatch.setattr(ops._EagerRegionAttention, "apply", lambda *a: calls.append(a[-1]) or real(*a))
    case = ROWS
    inp = make_inputs(case, DEVICE, seed=7)
    with torch.no_grad():
        _, o_direct, P_direct = _op(case, inp, F32, [1, 6, 0])
    assert calls == []
    L, o, P = _op(case, inp, F32, [1, 6, 0])
    assert calls == [True] and P.requires_grad
    assert torch.equal(o_direct, o.detach()) and torch.equal(P_direct, P.detach())
    assert o_direct.stride() == o.stride()


# ------------------------------------------------------------------------- the custom op

def _probs_args():
    return op_args(device=DEVICE)


@on_each_backend
def test_opcheck_with_want_probs(backend, monkeypatch):
    """torch.library.opcheck of the forward with want_probs (schema, autograd registration with the
    maps' gradient, fake tensors, AOT dispatch) and of the backward with grad_probs."""
    monkeypatch.delenv("STATTN_NATIVE_POISON", raising=False)
    args = _probs_args()
    for i in (0, 1, 2, 3, 4, 6):
        args[i].requires_grad_(True)
    torch.library.opcheck(torch.ops.stattn.region_attention.default, args, {"want_probs": True})
    with torch.no_grad():
        o, lse, _, probs = torch.ops.stattn.region_attention(*args, want_probs=True)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    g = torch.Generator().manual_seed(2)
    G = torch.randn(probs.shape, generator=g).to(DEVICE)
    torch.library.opcheck(torch.ops.stattn.region_attention_backward.default,
                          (torch.randn_like(o), *detached, lse, [True, True, False, True, False, True]),
                          {"grad_probs": G})


@on_each_backend
def test_probs_output_and_fake_shapes(backend):
    """The 4th output: [B, H, M, N] contiguous in the compute dtype with want_probs (the reference's
    per-head maps), empty without; the fake
    implementations give the same shapes, strides and dtypes."""
    args = _probs_args()
    B, H, M, _ = args[0].shape
    N = args[1].shape[3]
    with torch.no_grad():
        real = torch.ops.stattn.region_attention(*args, want_probs=True)
        plain = torch.ops.stattn.region_attention(*args)
    probs = real[3]
    assert probs.shape == (B, H, M, N) and probs.dtype == F32 and probs.is_contiguous()
    assert plain[3].numel() == 0
    q, k, theta, tokens, gy, gx, pin = args[0], args[1], args[6], args[7], args[8], args[9], args[10]
    off = ops._ref_offset(theta.double(), tokens, gy.double(), gx.double(), pin)
    want = ref.region0_probs(q.double(), k.double(), args[11], off)
    assert rel_err(probs, want) < OP_TOL[F32]
    with FakeTensorMode() as mode:
        fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = torch.ops.stattn.region_attention(*fargs, want_probs=True)
        fake_plain = torch.ops.stattn.region_attention(*fargs)
    for r, f in zip((*real, *plain), (*fake, *fake_plain)):
        assert (f.shape, f.stride(), f.dtype) == (r.shape, r.stride(), r.dtype)


def test_probs_under_torch_compile(reference_backend):
    """return_probs traced by torch.compile (the fake implementation's 4th output, the head mean and
    column gather as graph ops): the eager values and gradients."""
    case = ROWS
    inp = make_inputs(case, "cpu", seed=8)
    k, v = inp["k"].float(), inp["v"].float()

    def f(q, theta):
        off = _offset(case, inp, theta)
        o, P = stattn.region_attention(q, k, v, offset=off, key_lengths=case.key_lengths, return_probs=[1, 0])
        return o, P

    eager_args = [inp["q"].float().requires_grad_(), inp["theta"].float().requires_grad_()]
    compiled_args = [t.detach().clone().requires_grad_() for t in eager_args]
    eager = f(*eager_args)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*compiled_args)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
    loss = lambda o, P: o.square().sum() + (P * torch.arange(1, 3)).sum()  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(*compiled), compiled_args), torch.autograd.grad(loss(*eager), eager_args)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference"] + ([] if GPU else ["native"]), indirect=True)
@pytest.mark.parametrize("return_probs", [True, [0, 3, 1]], ids=["all", "cols"])
def test_gradcheck_fp64(backend, return_probs, monkeypatch):
    """Finite differences of (o, P) and of P alone w.r.t. every input, fp64, offset with per-row pins,
    key lengths, affine."""
    monkeypatch.delenv("STATTN_NATIVE_POISON", raising=False)
    case = Case(B=2, H=2, h=3, w=4, D=4, R=2, N=7, T=2, row_tokens=True, pinned=((0, 2), ()),
                key_lengths=(5, 3), affine=True)
    inp = make_inputs(case, "cpu", seed=4)

    def f(q, k, v, masks, weights, theta):
        off = stattn.ScoreOffset(theta, inp["tokens"], inp["basis"], pinned=case.pinned)
        return stattn.region_attention(q, k, v, masks=masks, region_weights=weights, affine=True, offset=off,
                                       key_lengths=case.key_lengths, return_probs=return_probs)

    args = [inp[n].requires_grad_() for n in ("q", "k", "v", "masks", "weights", "theta")]
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradcheck(lambda *a: f(*a)[1], args)


# ------------------------------------------------------------------------- bad input

_QKV_CASE = Case(B=2, H=2, h=3, w=4, D=8, R=2, N=11, T=0)


@pytest.mark.parametrize("value,kwargs,exc,words", [
    (1, {}, TypeError, "return_probs must be a bool or region 0's column indices"),
    (0.5, {}, TypeError, "return_probs must be a bool or region 0's column indices"),
    ("all", {}, TypeError, "got str"),
    ([1, 2.0], {}, TypeError, "got [1, 2.0]"),
    ([True], {}, TypeError, "got [True]"),
    (torch.tensor([1.0]), {}, TypeError, "got a torch.float32 tensor of shape (1,)"),
    (torch.tensor([[1]]), {}, TypeError, "got a torch.int64 tensor of shape (1, 1)"),
    (torch.tensor([True]), {}, TypeError, "got a torch.bool tensor"),
    ([], {}, ValueError, "the column list is empty"),
    (torch.tensor([], dtype=torch.long), {}, ValueError, "the column list is empty"),
    ([0, 11], {}, ValueError, "return_probs columns [11] out of range: region 0's columns are [0, N = 11)"),
    ([-1], {}, ValueError, "return_probs columns [-1] out of range"),
    (torch.tensor([3, 12]), {}, ValueError, "return_probs columns [12] out of range"),
    ([5], dict(key_lengths=(5, 11)), ValueError,
     "return_probs columns [5] out of range: region 0's columns are [0, key_lengths[0] = 5)"),
])
def test_bad_return_probs_is_named(value, kwargs, exc, words, reference_backend):
    inp = make_inputs(_QKV_CASE, "cpu")
    with pytest.raises(exc) as info:
        stattn.region_attention(inp["q"].float(), inp["k"].float(), inp["v"].float(), return_probs=value, **kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("bad,exc,words", [
    (lambda G: G[:, :1], ValueError, "grad_probs must have shape [B=2, H=2, M=12, N=11]"),
    (lambda G: G.double(), TypeError, "grad_probs must be torch.float32"),
])
def test_bad_grad_probs_is_named(bad, exc, words, reference_backend):
    args = op_args()
    with torch.no_grad():
        o, lse, _, probs = torch.ops.stattn.region_attention(*args, want_probs=True)
    with pytest.raises(exc) as info:
        torch.ops.stattn.region_attention_backward(torch.ones_like(o), *args, lse, [True] * 6,
                                                   grad_probs=bad(torch.ones_like(probs)))
    assert words in str(info.value)
