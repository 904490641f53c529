"""Per-row target tokens and pinned columns (ScoreOffset) and per-region key lengths
(region_attention(key_lengths=...)): the reference against independent computations (a loop over
batch rows with the shared-token reference; each region on its keys truncated to its length), the
Triton kernels (the interpreter on CPU) against the fp64 reference with NaN-poisoned outputs,
exact zeros on padded keys, gradcheck, opcheck, the native call convention and bad input."""
import re

import pytest
import torch

import stattn
from stattn import ops
from stattn import reference as ref
from helpers import GRAD_TOL_FACTOR, TOL, Case, make_inputs, reference_run, rel_err, run

F16 = torch.float16
NAMES = ("q", "k", "v", "masks", "weights")


def _offset(inp, case, theta=None):
    th = inp["theta"] if theta is None else theta
    return stattn.ScoreOffset(th, inp["tokens"], inp["basis"], pinned=case.pinned)


def _alpha_mix(alpha, outs):
    """sum_r alpha_r * o_r for alpha [B, R, M] and outs R x [B, H, M, D]."""
    return sum(alpha[:, r, None, :, None] * o for r, o in enumerate(outs))


# ---------------------------------------------------------------- the reference is the oracle

@pytest.mark.parametrize("affine", [False, True])
def test_reference_per_row_equals_a_loop_over_rows(affine):
    case = Case(B=3, H=2, h=3, w=4, D=8, R=2, N=11, T=2, row_tokens=True, pinned=((0,), (), (3, 5)),
                affine=affine)
    inp = make_inputs(case, "cpu")
    off = _offset(inp, case)
    assert off.tokens_per_row and off.pinned_per_row
    q, k, v, masks, weights = (inp[n] for n in NAMES)
    scale = case.D ** -0.5
    out = ref.region_attention(q, k, v, masks, weights, affine, off)
    lse = ref.region_lse(q, k, scale, off)
    do = torch.randn_like(out)
    grads = ref.region_attention_backward(do, q, k, v, masks, weights, affine, off)
    assert lse.shape[1] == case.R + 1
    for b in range(case.B):
        row = slice(b, b + 1)
        off_b = stattn.ScoreOffset(inp["theta"][row], off.row_tokens(b), inp["basis"], pinned=off.row_pinned(b))
        args = (q[row], k[row], v[row], masks[row], weights[row], affine, off_b)
        torch.testing.assert_close(out[row], ref.region_attention(*args), rtol=1e-12, atol=1e-12)
        lse_b = ref.region_lse(q[row], k[row], scale, off_b)
        torch.testing.assert_close(lse[row, :case.R], lse_b[:, :case.R])
        unedited = ref.region_lse(q[row], k[row], scale)[:, 0]    # slot R: region 0 without the offset
        torch.testing.assert_close(lse[row, case.R], unedited)
        for g, g_b in zip(grads, ref.region_attention_backward(do[row], *args)):
            torch.testing.assert_close(g[row], g_b, rtol=1e-12, atol=1e-12)


def _truncated(leaves, theta, case, inp):
    """The output built region by region on keys truncated to each region's length (region 0
    with the offset), mixed by alpha: independent of the reference's key masking."""
    q, k, v, masks, weights = leaves
    B, M = case.B, case.M
    off = _offset(inp, case, theta) if theta is not None else None
    ones_m, ones_w = torch.ones(B, 1, M, dtype=q.dtype), torch.ones(B, 1, dtype=q.dtype)
    outs = [ref.region_attention(q, k[:, r:r + 1, :, :L], v[:, r:r + 1, :, :L], ones_m, ones_w, False,
                                 off if r == 0 else None)
            for r, L in enumerate(case.key_lengths)]
    return _alpha_mix(ref.region_alpha(weights, masks, case.affine), outs), off


@pytest.mark.parametrize("case", [
    Case(B=2, H=2, h=3, w=4, D=8, R=3, N=13, T=2, pinned=(0, 4), key_lengths=(7, 1, 13)),
    Case(B=2, H=1, h=3, w=5, D=8, R=3, N=77, T=1, key_lengths=(77, 4, 16), affine=True),
    Case(B=3, H=2, h=3, w=4, D=8, R=2, N=12, T=2, row_tokens=True, pinned=((1,), (), (0, 2)),
         key_lengths=(5, 9), affine=True),
], ids=["pins-odd", "ip-adapter", "rows-and-lengths"])
def test_reference_key_lengths_equal_truncated_keys(case):
    inp = make_inputs(case, "cpu")
    leaves = [inp[n].clone().requires_grad_() for n in NAMES]
    theta = inp["theta"].clone().requires_grad_()
    expected, off = _truncated(leaves, theta, case, inp)
    out = ref.region_attention(*leaves, case.affine, off, lengths=case.key_lengths)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    do = torch.randn_like(out)
    wrt = leaves + [theta]
    auto = torch.autograd.grad(out, wrt, do)
    truth = torch.autograd.grad(expected, wrt, do)      # slices: zero on the padded keys
    for a, t in zip(auto, truth):
        torch.testing.assert_close(a, t, rtol=1e-10, atol=1e-12)
    dq, dk, dv, dw, dm, dt = ref.region_attention_backward(do, *[t.detach() for t in leaves], case.affine, off,
                                                           lengths=case.key_lengths)
    for c, t in zip((dq, dk, dv, dm, dw, dt), truth):
        torch.testing.assert_close(c, t, rtol=1e-10, atol=1e-12)
    for r, L in enumerate(case.key_lengths):  # exact zeros, not merely small
        assert torch.equal(dk[:, r, :, L:], torch.zeros_like(dk[:, r, :, L:]))
        assert torch.equal(dv[:, r, :, L:], torch.zeros_like(dv[:, r, :, L:]))
    # each region's log-sum-exp is over its own keys
    lse = ref.region_lse(*[t.detach() for t in leaves[:2]], case.D ** -0.5, off, lengths=case.key_lengths)
    for r, L in enumerate(case.key_lengths):
        lse_r = ref.region_lse(leaves[0].detach(), leaves[1].detach()[:, r:r + 1, :, :L], case.D ** -0.5,
                               off if r == 0 else None)
        torch.testing.assert_close(lse[:, r], lse_r[:, 0])
        if r == 0 and case.pinned:
            torch.testing.assert_close(lse[:, case.R], lse_r[:, 1])


def test_gradcheck_public_op_rows_and_lengths_fp64(reference_backend):
    case = Case(B=2, H=1, h=3, w=4, D=4, R=2, N=7, T=2, row_tokens=True, pinned=((0, 2), ()),
                key_lengths=(5, 3), affine=True)
    inp = make_inputs(case, "cpu", seed=4)
    tokens, basis = inp["tokens"], inp["basis"]

    def f(q, k, v, masks, weights, theta):
        off = stattn.ScoreOffset(theta, tokens, basis, pinned=case.pinned)
        return stattn.region_attention(q, k, v, masks=masks, region_weights=weights, affine=True, offset=off,
                                       key_lengths=case.key_lengths)

    args = [inp[n].requires_grad_() for n in NAMES] + [inp["theta"].requires_grad_()]
    assert torch.autograd.gradcheck(f, args)


# ---------------------------------------------------------------- Triton against the fp64 reference

KERNEL_CASES = [
    Case(B=2, H=2, h=3, w=5, D=16, R=2, N=77, T=2, row_tokens=True),                        # per-row tokens
    Case(B=3, H=1, h=3, w=5, D=16, R=1, N=20, T=1, pinned=((0, 7), (), (3,))),              # per-row pins
    Case(B=2, H=2, h=3, w=5, D=16, R=3, N=77, T=0, key_lengths=(77, 4, 16)),                # IP-Adapter
    Case(B=2, H=2, h=3, w=5, D=40, R=3, N=77, T=2, row_tokens=True, pinned=((0, 9), (0,)),
         key_lengths=(33, 77, 5), affine=True),                                             # everything
    Case(B=2, H=1, h=4, w=4, D=16, R=2, N=77, T=1, row_tokens=True, pinned=((0,), ()),
         key_lengths=(61, 9), affine=True, dtype=F16),
    Case(B=2, H=1, h=3, w=3, D=16, R=2, N=77, T=1, pinned=(63,), key_lengths=(64, 65),
         float_masks=False),                                                                # block edges
]


def _ids(c):
    return (f"R{c.R}-T{c.T}{'-rowtok' if c.row_tokens else ''}-pin{c.pinned}-len{c.key_lengths}-"
            f"{'aff' if c.affine else 'lin'}-{str(c.dtype).split('.')[-1]}").replace(" ", "")


@pytest.mark.gpu
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_ids)
def test_kernel_matches_reference(case, device, triton_backend, poisoned):
    inp = make_inputs(case, device)
    if case.row_tokens:
        assert _offset(inp, case).tokens_per_row
    out, grads = run(case, inp, case.dtype)
    ref_out, ref_grads = reference_run(case, inp)
    tol = TOL[(device, case.dtype)]
    assert out.dtype == case.dtype and rel_err(out, ref_out) < tol, "forward"
    assert set(grads) == set(ref_grads) and ("theta" in grads) == bool(case.T)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < tol * GRAD_TOL_FACTOR, name
    for r, L in enumerate(case.key_lengths or ()):
        for name in ("k", "v"):
            pad = grads[name][:, r, :, L:]
            assert torch.equal(pad, torch.zeros_like(pad)), (name, r)


def _op_args(case, inp, dtype=torch.float32):
    """Raw op arguments (fp32) of a case, as region_attention builds them."""
    off = stattn.ScoreOffset(inp["theta"].float(), inp["tokens"], tuple(b.float() for b in inp["basis"]),
                             pinned=case.pinned)
    tokens, pin = off.device_tensors(case.N)
    masks = inp["masks"].float().expand(case.B, case.R, case.M).contiguous()
    lengths = torch.tensor(case.key_lengths, dtype=torch.int32, device=inp["q"].device)
    return (inp["q"].to(dtype), inp["k"].to(dtype), inp["v"].to(dtype), inp["weights"].float(), masks,
            case.affine, off.theta, tokens, off.gy, off.gx, pin if off.pinned else None, case.D ** -0.5), lengths


@pytest.mark.gpu
def test_kernel_lse_matches_reference(device, triton_backend, poisoned):
    case = KERNEL_CASES[3]
    inp = make_inputs(case, device, seed=2)
    args, lengths = _op_args(case, inp)
    assert args[7].dim() == 2 and args[10].dim() == 2
    _, lse, _, _ = torch.ops.stattn.region_attention(*args, lengths=lengths)
    off = stattn.ScoreOffset(inp["theta"], inp["tokens"], inp["basis"], pinned=case.pinned)
    expected = ref.region_lse(inp["q"], inp["k"], case.D ** -0.5, off, lengths=case.key_lengths)
    assert lse.shape == expected.shape == (case.B, case.R + 1, case.H, case.M)
    assert rel_err(lse, expected.double()) < TOL[(device, torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_padded_keys_are_ignored_and_get_exact_zero_gradients(backend, device, monkeypatch, poisoned):
    """Padding may hold anything (NaN here): it is never read into the output or the gradients."""
    monkeypatch.setenv("STATTN_BACKEND", backend)
    case = Case(B=2, H=1, h=3, w=4, D=16, R=3, N=20, T=1, pinned=(0,), key_lengths=(7, 20, 1), affine=True)
    inp = make_inputs(case, device, seed=6)
    clean = {n: inp[n].clone() for n in ("k", "v")}
    for r, L in enumerate(case.key_lengths):
        for n in ("k", "v"):
            inp[n][:, r, :, L:] = float("nan")
    out, grads = run(case, inp, torch.float32)
    ref_out, ref_grads = reference_run(case, {**inp, **clean})
    tol = TOL[(device, torch.float32)]
    assert rel_err(out, ref_out) < tol
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < tol * GRAD_TOL_FACTOR, name
    for r, L in enumerate(case.key_lengths):
        for name in ("k", "v"):
            pad = grads[name][:, r, :, L:]
            assert torch.equal(pad, torch.zeros_like(pad)), (name, r)


# ---------------------------------------------------------------- op level: opcheck, native convention

B, H, h, w, D, R, N = 2, 2, 3, 4, 8, 3, 11
M = h * w


def _small_op_args(per_row_tokens, per_row_pin, lengths):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, M, D, generator=g)
    k = torch.randn(B, R, H, N, D, generator=g)
    v = torch.randn(B, R, H, N, D, generator=g)
    gy, gx = stattn.gaussian_basis(h, w, sigma=1)
    theta = torch.randn(B, H, 2, gy.shape[1], gx.shape[1], generator=g)
    tokens = ((1, 4), (5, 2)) if per_row_tokens else (1, 4)
    pinned = ((0,), ()) if per_row_pin else (0, 3)
    off = stattn.ScoreOffset(theta, tokens, (gy, gx), pinned=pinned)
    tok, pin = off.device_tensors(N)
    assert tok.dim() == 1 + per_row_tokens and pin.dim() == 1 + per_row_pin
    weights, masks = torch.rand(B, R, generator=g), torch.rand(B, R, M, generator=g)
    for t in (q, k, v, weights, masks, theta):
        t.requires_grad_(True)
    lens = torch.tensor(lengths, dtype=torch.int32) if lengths else None
    return (q, k, v, weights, masks, True, theta, tok, gy, gx, pin, D ** -0.5), lens


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rows,lengths", [((True, False), (6, 11, 1)), ((False, True), None),
                                          ((True, True), (11, 3, 7))], ids=["tok2d-len", "pin2d", "both-len"])
def test_opcheck(backend, rows, lengths, monkeypatch):
    monkeypatch.setenv("STATTN_BACKEND", backend)
    args, lens = _small_op_args(*rows, lengths)
    torch.library.opcheck(torch.ops.stattn.region_attention.default, args, {"lengths": lens})


def test_native_gets_lengths_only_when_given(monkeypatch):
    """The native ops take ``lengths`` as a new last argument; without it the call is as before."""
    calls = []

    def fwd(*a):
        calls.append(("fwd", len(a), a[-1]))
        o = ops.ref.region_attention(a[0], a[1], a[2], a[4], a[3], a[5], None, a[11])
        return o, a[0].new_zeros(a[0].shape[0], a[1].shape[1] + (a[10] is not None), a[0].shape[1],
                                 a[0].shape[2]), a[0].new_empty(0)

    def bwd(*a):
        calls.append(("bwd", len(a), a[-1]))
        return [None] * 6

    monkeypatch.setattr(ops, "backend_for", lambda t: "native")
    monkeypatch.setattr(ops.native, "forward", fwd)
    monkeypatch.setattr(ops.native, "backward", bwd)
    args, lens = _small_op_args(False, False, (6, 11, 1))
    for given in (None, lens):
        calls.clear()
        o, _, _, _ = torch.ops.stattn.region_attention(*args, lengths=given)
        torch.autograd.grad(o.sum(), args[0])
        n_fwd, n_bwd = 13 + (given is not None), 16 + (given is not None)
        assert [c[:2] for c in calls] == [("fwd", n_fwd), ("bwd", n_bwd)]
        if given is not None:
            assert all(c[2] is given for c in calls)


@pytest.mark.parametrize("bad,words", [
    (dict(tokens=torch.zeros(B + 1, 2, dtype=torch.int32)), "tokens must have shape [T=2] or [B=2, T=2]"),
    (dict(pin=torch.zeros(B, N - 1, dtype=torch.int32)), "pin must have shape [N=11] or [B=2, N=11]"),
    (dict(lengths=torch.ones(B, R, dtype=torch.int32)), "lengths must have shape [R=3]"),
])
def test_op_rejects_bad_index_shapes(bad, words, reference_backend):
    args, _ = _small_op_args(False, False, None)
    names = ["q", "k", "v", "weights", "masks", "affine", "theta", "tokens", "gy", "gx", "pin", "scale"]
    kw = dict(zip(names, args))
    lengths = bad.pop("lengths", None)
    kw.update(bad)
    with pytest.raises(ValueError, match=re.escape(words)):
        torch.ops.stattn.region_attention(*kw.values(), lengths=lengths)


def test_torch_compile_with_rows_and_lengths(reference_backend):
    args, _ = _small_op_args(True, True, None)
    q, k, v = (a.detach() for a in args[:3])
    gy, gx = args[8], args[9]

    def f(q, theta):
        off = stattn.ScoreOffset(theta, ((1, 4), (5, 2)), (gy, gx), pinned=((0,), ()))
        return stattn.region_attention(q, k, v, offset=off, key_lengths=(6, 11, 1))

    eager_args = [q.clone().requires_grad_(), args[6].detach().clone().requires_grad_()]
    eager = f(*eager_args)
    compiled_args = [t.detach().clone().requires_grad_() for t in eager_args]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*compiled_args)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), compiled_args), torch.autograd.grad(eager.sum(), eager_args)):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- ScoreOffset's per-row forms

def _theta(batch=B, T=2):
    gy, gx = stattn.gaussian_basis(h, w, sigma=1)
    return torch.randn(batch, H, T, gy.shape[1], gx.shape[1]), (gy, gx)


def test_score_offset_per_row_forms():
    theta, basis = _theta()
    off = stattn.ScoreOffset(theta, [[1, 4], [5, 2]], basis, pinned=[[0], []])
    assert off.tokens == ((1, 4), (5, 2)) and off.pinned == ((0,), ())
    assert off.per_row and off.tokens_per_row and off.pinned_per_row
    assert off.row_tokens(1) == (5, 2) and off.row_pinned(0) == (0,) and off.row_pinned(1) == ()
    tok, pin = off.device_tensors(N)
    assert tok.dtype == pin.dtype == torch.int32
    assert tok.tolist() == [[1, 4], [5, 2]]
    assert pin.shape == (B, N) and pin.nonzero().tolist() == [[0, 0]]
    assert off.device_tensors(N)[0] is tok                              # built once
    as_tensor = stattn.ScoreOffset(theta, torch.tensor([[1, 4], [5, 2]]), basis)
    assert as_tensor.tokens == off.tokens and as_tensor.pinned == () and not as_tensor.pinned_per_row
    same = stattn.ScoreOffset(theta, [(3, 1), (3, 1)], basis, pinned=[(0, 7), (0, 7)])  # equal rows: shared
    assert same.tokens == (3, 1) and same.pinned == (0, 7) and not same.per_row
    assert same.row_tokens(1) == (3, 1)
    tok, pin = same.device_tensors(N)
    assert tok.shape == (2,) and pin.shape == (N,)
    mixed = stattn.ScoreOffset(theta, (1, 4), basis, pinned=[(0,), (0, 9)])
    assert not mixed.tokens_per_row and mixed.pinned_per_row and mixed.device_tensors(N)[1].shape == (B, N)


@pytest.mark.parametrize("tokens,pinned,exc,words", [
    ([[1, 4], [5, 2], [0, 3]], (), ValueError, "tokens given per batch row has 3 rows but theta has B = 2"),
    ([[1, 4], [5]], (), ValueError, "theta has T = 2 token slots but tokens[1] has 1 entries"),
    ([[1, 4], [5, 5]], (), ValueError, "tokens[1] must not repeat"),
    ([[1, 4], 5], (), TypeError, "not a mix"),
    (torch.zeros(2, 2), (), TypeError, "tokens must be an integer tensor"),
    ((1, 4), [[0], [-1]], ValueError, "pinned[1] must be non-negative"),
    ((1, 4), [[0]], ValueError, "pinned given per batch row has 1 rows but theta has B = 2"),
])
def test_bad_per_row_offset_is_named(tokens, pinned, exc, words):
    theta, basis = _theta()
    with pytest.raises(exc) as info:
        stattn.ScoreOffset(theta, tokens, basis, pinned=pinned)
    assert words in str(info.value)


def _qkv():
    args, _ = _small_op_args(False, False, None)
    return [a.detach() for a in args[:3]]


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(key_lengths=(11, 11)), ValueError, "key_lengths must hold R = 3 lengths"),
    (dict(key_lengths=(11, 0, 4)), ValueError, "key_lengths must lie in [1, N = 11]"),
    (dict(key_lengths=(11, 12, 4)), ValueError, "key_lengths must lie in [1, N = 11]"),
    (dict(key_lengths=(11, 2.0, 4)), TypeError, "key_lengths must hold ints"),
    (dict(key_lengths=(11, True, 4)), TypeError, "key_lengths must hold ints"),
    (dict(key_lengths=5), TypeError, "key_lengths must be a sequence of R ints"),
    (dict(key_lengths=torch.ones(1, 3, dtype=torch.int64)), TypeError, "key_lengths must be a 1-D integer tensor"),
    (dict(key_lengths=torch.ones(3)), TypeError, "key_lengths must be a 1-D integer tensor"),
    (dict(key_lengths=torch.tensor([11, 3])), ValueError, "key_lengths must hold R = 3 lengths"),
    (dict(offset_tokens=[[1, 4], [5, 11]]), ValueError, "offset.tokens[1] [11] out of range: region 0 has N = 11"),
    (dict(offset_tokens=(1, 4), key_lengths=(4, 11, 11)), ValueError,
     "offset.tokens [4] out of range: region 0 has key_lengths[0] = 4 keys"),
    (dict(offset_pinned=[[0], [9]], key_lengths=(9, 11, 11)), ValueError,
     "offset.pinned[1] [9] out of range: region 0 has key_lengths[0] = 9 keys"),
])
def test_bad_rows_and_lengths_are_named(kwargs, exc, words):
    q, k, v = _qkv()
    if "offset_tokens" in kwargs:
        theta, basis = _theta()
        kwargs["offset"] = stattn.ScoreOffset(theta, kwargs.pop("offset_tokens"), basis)
    if "offset_pinned" in kwargs:
        theta, basis = _theta()
        kwargs["offset"] = stattn.ScoreOffset(theta, (1, 4), basis, pinned=kwargs.pop("offset_pinned"))
    with pytest.raises(exc) as info:
        stattn.region_attention(q, k, v, **kwargs)
    assert words in str(info.value)


def test_key_lengths_forms(reference_backend):
    from stattn import _validate as V

    assert V.key_lengths((11, 11, 11), R, N, torch.device("cpu")) is None      # all N: the plain path
    assert V.key_lengths(torch.tensor([6, 11, 1]), R, N, torch.device("cpu")) == (6, 11, 1)
    q, k, v = _qkv()
    plain = stattn.region_attention(q, k, v)
    torch.testing.assert_close(stattn.region_attention(q, k, v, key_lengths=[N] * R), plain)
    short = stattn.region_attention(q, k, v, key_lengths=torch.tensor([6, 11, 1]))
    expected = sum(stattn.region_attention(q, k[:, r:r + 1, :, :L], v[:, r:r + 1, :, :L])
                   for r, L in enumerate((6, 11, 1)))
    torch.testing.assert_close(short, expected)
