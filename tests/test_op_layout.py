"""The op's memory layout on every backend (reference, native, Triton; the interpreter on CPU): o and
dq come in [B, M, H, D] memory order (stattn.ops.empty_output), so the processors'
o.transpose(1, 2).reshape(B, M, H * D) is a view; q and grad_out are read with their strides
(the processors' [B, M, H, D]-ordered q, a contiguous one, a slice of a fused projection, an
expanded grad_out) with values and every gradient against autograd of the fp64 reference; the fake
implementations give the same strides (FakeTensorMode, opcheck)."""
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch._subclasses.fake_tensor import FakeTensorMode

import stattn
from stattn import ops
from stattn import reference as ref
from stattn.integration.processors import StattnAttnProcessor
from helpers import (DEVICE, F32, F64, GRAD_TOL_FACTOR, OP_BACKENDS, OP_TOL, Case, make_inputs, op_args, op_dtypes,
                     rel_err)

GRADS = ("q", "k", "v", "weights", "masks", "theta")


def bmhd_strides(B, H, M, D):
    """Strides of a [B, H, M, D] tensor stored in [B, M, H, D] order."""
    return (M * H * D, D, H * D, 1)


BACKEND_DTYPES = [(b, d) for b in OP_BACKENDS for d in op_dtypes(b)]
on_each_backend = pytest.mark.parametrize("backend", OP_BACKENDS, indirect=True)


def with_layout(x, layout):
    """The values of x [B, H, M, D] in another memory layout:
    bmhd  - the processors' q: x.view(B, M, H, D).transpose(1, 2) of a contiguous [B, M, H * D];
    bhmd  - contiguous;
    fused - the middle third of a fused q/k/v projection [B, M, 3 * H * D] (not dense, rows 3 H D apart);
    dlast - D not the unit-stride dimension ([B, H, D, M] contiguous, transposed)."""
    B, H, M, D = x.shape
    if layout == "bhmd":
        return x.contiguous()
    if layout == "bmhd":
        return x.transpose(1, 2).reshape(B, M, H * D).view(B, M, H, D).transpose(1, 2)
    if layout == "fused":
        qkv = torch.zeros(B, M, 3 * H * D, dtype=x.dtype, device=x.device)
        qkv[..., H * D:2 * H * D] = x.transpose(1, 2).reshape(B, M, H * D)
        return qkv[..., H * D:2 * H * D].view(B, M, H, D).transpose(1, 2)
    if layout == "dlast":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    raise AssertionError(layout)


def _grad_out(case, layout, device):
    """fp64 values of dO [B, H, M, D] and the layout it is passed in ("expanded": one row for every
    pixel, stride 0, as from out.sum()-like losses)."""
    g = torch.Generator().manual_seed(1)
    if layout == "expanded":
        return torch.randn(1, 1, 1, case.D, generator=g, dtype=F64).to(device).expand(case.B, case.H, case.M, case.D)
    return with_layout(torch.randn(case.B, case.H, case.M, case.D, generator=g, dtype=F64).to(device), layout)


def _offset(case, inp, theta):
    if inp["theta"] is None:
        return None
    return stattn.ScoreOffset(theta, inp["tokens"], tuple(b.to(theta.dtype) for b in inp["basis"]),
                              pinned=case.pinned)


def _op(case, inp, dtype, q_layout, do_layout):
    """The public op in dtype on a q of the given layout, and its gradients for a dO of the given
    layout: (q, o, {name: grad})."""
    tdt = F64 if dtype == F64 else F32
    cast = lambda t, dt: None if t is None else t.to(dt, copy=True)  # noqa: E731  (inp stays as it is)
    leaves = dict(q=with_layout(cast(inp["q"], dtype), q_layout), k=cast(inp["k"], dtype), v=cast(inp["v"], dtype),
                  weights=cast(inp["weights"], tdt), masks=cast(inp["masks"], tdt), theta=cast(inp["theta"], tdt))
    assert leaves["q"].stride(-1) == 1 or q_layout == "dlast"
    for t in leaves.values():
        if t is not None:
            t.requires_grad_(True)
    o = stattn.region_attention(leaves["q"], leaves["k"], leaves["v"], masks=leaves["masks"],
                                region_weights=leaves["weights"], affine=case.affine,
                                offset=_offset(case, inp, leaves["theta"]), key_lengths=case.key_lengths)
    names = [n for n in GRADS if leaves[n] is not None]
    do = _grad_out(case, do_layout, o.device).to(o.dtype)
    grads = torch.autograd.grad(o, [leaves[n] for n in names], do)
    return leaves["q"], o, dict(zip(names, grads))


def _oracle(case, inp, do_layout):
    """Autograd through the fp64 reference (not the op's backward), for the same dO values."""
    leaves = {n: None if inp[n] is None else inp[n].double().detach().requires_grad_() for n in GRADS}
    masks = leaves["masks"].expand(case.B, case.R, case.M)
    o = ref.region_attention(leaves["q"], leaves["k"], leaves["v"], masks, leaves["weights"], case.affine,
                             _offset(case, inp, leaves["theta"]), lengths=case.key_lengths)
    names = [n for n in GRADS if leaves[n] is not None]
    grads = torch.autograd.grad(o, [leaves[n] for n in names], _grad_out(case, do_layout, o.device))
    return o, dict(zip(names, grads))


# Small sizes (the interpreter is slow), none of M, N, D a multiple of a tile: plain attention, two
# regions with an offset, pins, affine and key lengths, per-row tokens; (q layout, dO layout) pairs.
PLAIN = Case(B=2, H=3, h=5, w=7, D=40, R=1, N=77, T=0)
CONTROL = Case(B=2, H=2, h=3, w=5, D=24, R=2, N=13, T=2, pinned=(0,), affine=True, key_lengths=(11, 13))
ROWS = Case(B=2, H=2, h=3, w=3, D=20, R=2, N=9, T=1, row_tokens=True)
CASES = [
    (PLAIN, "bmhd", "bmhd"), (PLAIN, "bhmd", "bhmd"), (PLAIN, "bmhd", "bhmd"), (PLAIN, "fused", "expanded"),
    (CONTROL, "bmhd", "bmhd"), (CONTROL, "bhmd", "bmhd"), (CONTROL, "dlast", "bhmd"),
    (ROWS, "fused", "bmhd"),
]


def _case_id(c):
    case, ql, dl = c
    name = "plain" if case is PLAIN else "control" if case is CONTROL else "rows"
    return f"{name}-q_{ql}-do_{dl}"


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES, indirect=["backend"],
                         ids=[f"{b}-{str(d).replace('torch.', '')}" for b, d in BACKEND_DTYPES])
@pytest.mark.parametrize("layouts", CASES, ids=_case_id)
def test_layout_values_and_gradients(layouts, dtype, backend):
    case, q_layout, do_layout = layouts
    inp = make_inputs(case, DEVICE, seed=2)
    q, o, grads = _op(case, inp, dtype, q_layout, do_layout)
    B, H, M, D = q.shape
    assert o.shape == (B, H, M, D) and o.dtype == dtype
    assert o.stride() == bmhd_strides(B, H, M, D), "o in [B, M, H, D] order"
    hidden = o.transpose(1, 2).reshape(B, M, H * D)
    assert hidden.is_contiguous() and hidden.data_ptr() == o.data_ptr(), "the processors' reshape is a view"
    assert grads["q"].stride() == bmhd_strides(B, H, M, D), "dq in o's layout"
    want, want_grads = _oracle(case, inp, do_layout)
    tol = OP_TOL[dtype]
    assert rel_err(o, want) < tol, "forward"
    for name, g in grads.items():
        assert g.shape == want_grads[name].shape, name
        assert rel_err(g, want_grads[name]) < tol * GRAD_TOL_FACTOR, name


@pytest.mark.gpu
@on_each_backend
def test_q_layouts_agree(backend):
    """A [B, M, H, D]-ordered q and a contiguous one: the same result (to the dtype's tolerance:
    the two may take different BLAS paths) and the same output strides."""
    inp = make_inputs(CONTROL, DEVICE, seed=4)
    _, o1, g1 = _op(CONTROL, inp, F32, "bmhd", "bmhd")
    _, o2, g2 = _op(CONTROL, inp, F32, "bhmd", "bhmd")
    assert o1.stride() == o2.stride()
    tol = OP_TOL[F32]
    assert rel_err(o1, o2.double()) < tol
    for name in g1:
        assert g1[name].stride() == g2[name].stride(), name
        assert rel_err(g1[name], g2[name].double()) < tol * GRAD_TOL_FACTOR, name


@on_each_backend
def test_single_pixel_and_single_head(backend):
    """Size-1 dimensions (M = 1, H = 1): strides still those of [B, M, H, D] order."""
    case = Case(B=1, H=1, h=1, w=1, D=8, R=1, N=5, T=0)
    g = torch.Generator().manual_seed(6)
    inp = {n: torch.randn(*shape, generator=g, dtype=F64).to(DEVICE) for n, shape in
           (("q", (1, 1, 1, 8)), ("k", (1, 1, 1, 5, 8)), ("v", (1, 1, 1, 5, 8)), ("weights", (1, 1)),
            ("masks", (1, 1, 1)))}
    inp.update(theta=None, tokens=())   # (a 1 x 1 grid has no Gaussian basis: no offset)
    q, o, grads = _op(case, inp, F32, "bmhd", "bhmd")
    assert o.stride() == bmhd_strides(1, 1, 1, 8) and grads["q"].stride() == bmhd_strides(1, 1, 1, 8)
    want, want_grads = _oracle(case, inp, "bhmd")
    assert rel_err(o, want) < OP_TOL[F32]
    assert rel_err(grads["q"], want_grads["q"]) < OP_TOL[F32] * GRAD_TOL_FACTOR


# ------------------------------------------------------------------------- the processor path

@pytest.mark.gpu
@on_each_backend
def test_processor_hidden_states_are_a_view_of_the_op_output(backend, monkeypatch):
    """StattnAttnProcessor: the op gets to_q's output as a view (no copy of q) and to_out gets a view
    of the op's output (no copy of o), and the result equals the stock processor's."""
    torch.manual_seed(0)
    H, D = 3, 40
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=H, dim_head=D, processor=AttnProcessor2_0()).eval()
    attn = attn.to(DEVICE)
    seen = {}
    real_op = stattn.integration.processors.region_attention

    def op(q, k, v, **kw):
        seen["q"] = q
        seen["o"] = real_op(q, k, v, **kw)
        return seen["o"]

    monkeypatch.setattr(stattn.integration.processors, "region_attention", op)
    attn.to_q.register_forward_hook(lambda m, a, out: seen.__setitem__("to_q", out))
    attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("to_out_in", a[0]))
    x, ctx = torch.randn(2, 35, 32, device=DEVICE), torch.randn(2, 77, 24, device=DEVICE)
    with torch.no_grad():
        stock = attn.processor(attn, x, ctx)
        fused = StattnAttnProcessor("attn2", attn.processor)(attn, x, ctx)
    storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert storage(seen["q"]) == storage(seen["to_q"]), "q is a view of to_q's output"
    assert seen["o"].stride() == bmhd_strides(2, H, 35, D)
    hidden = seen["to_out_in"]
    assert hidden.shape == (2, 35, H * D) and hidden.is_contiguous()
    assert storage(hidden) == storage(seen["o"]), "to_out's input is a view of the op's output"
    torch.testing.assert_close(fused, stock, rtol=OP_TOL[F32] * 10, atol=1e-5)


# ------------------------------------------------------------------------- fake tensors, opcheck

def _op_args(q_layout):
    return op_args(lambda q: with_layout(q, q_layout), DEVICE)


@pytest.mark.parametrize("q_layout", ["bmhd", "bhmd"])
@on_each_backend
def test_fake_strides_equal_real(q_layout, backend):
    """The register_fake implementations give the strides the backend gives (forward, backward)."""
    args = _op_args(q_layout)
    o, lse, logits, _ = torch.ops.stattn.region_attention(*args)
    do = with_layout(torch.randn_like(o), "bmhd")
    needs = [True, True, True, True, True, True]
    grads = torch.ops.stattn.region_attention_backward(do, *args, lse, needs)
    with FakeTensorMode() as mode:
        fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fo, flse, flogits, _ = torch.ops.stattn.region_attention(*fargs)
        fgrads = torch.ops.stattn.region_attention_backward(mode.from_tensor(do), *fargs, mode.from_tensor(lse), needs)
    for real, fake in zip((o, lse, logits, *grads), (fo, flse, flogits, *fgrads)):
        assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype)
    assert o.stride() == grads[0].stride() == bmhd_strides(*o.shape)


@pytest.mark.parametrize("q_layout", ["bmhd", "bhmd"])
@on_each_backend
def test_opcheck(q_layout, backend, monkeypatch):
    """torch.library.opcheck (schema, autograd registration, fake tensors, AOT dispatch with dynamic
    shapes) of both custom ops with the new strides."""
    monkeypatch.delenv("STATTN_NATIVE_POISON", raising=False)
    args = _op_args(q_layout)
    for i in (0, 1, 2, 3, 4, 6):
        args[i].requires_grad_(True)
    torch.library.opcheck(torch.ops.stattn.region_attention.default, args)
    with torch.no_grad():
        o, lse, _, _ = torch.ops.stattn.region_attention(*args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    do = with_layout(torch.randn_like(o), "bmhd")
    torch.library.opcheck(torch.ops.stattn.region_attention_backward.default,
                          (do, *detached, lse, [True, True, False, True, False, True]))
