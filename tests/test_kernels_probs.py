"""Region 0's probabilities as a side output of the Triton kernels, called directly (the op's
plumbing has its own tests): kernels.forward(want_probs=True)'s maps against the fp64
reference.region_probs, and kernels.backward(grad_probs=G)'s gradients against autograd of the
fp64 reference loss sum(o * dO) + sum(P * G). CUDA, or the interpreter on CPU (conftest sets
TRITON_INTERPRET=1 before anything imports the kernels); outputs NaN-poisoned; odd sizes (M not a
multiple of the pixel tile, N = 7 / 77, D = 13 / 40), R = 1 / 2, affine, target tokens, pins
(shared and per row, a pinned target), key lengths, fp32 / fp16."""
from types import SimpleNamespace

import pytest
import torch

from helpers import GRAD_TOL_FACTOR, TOL, Case, make_inputs, rel_err
from stattn import ops
from stattn import reference as ref

F32, F16 = torch.float32, torch.float16
GRADS = ("q", "k", "v", "weights", "masks", "theta")

# kept tiny: the interpreter runs every program in numpy
CASES = [
    Case(D=13, R=1, T=0, N=7, h=3, w=11),                                    # plain attention, M = 33
    Case(D=40, R=2, T=2, pinned=(3, 70), affine=True),                       # offset + pins, two key blocks
    Case(D=13, R=2, T=2, pinned=((1,), (65, 2)), row_tokens=True, key_lengths=(70, 40), h=4, w=9),
    Case(D=40, R=1, T=0, N=7, pinned=(0,)),                                  # pins without an offset
    Case(D=40, R=2, T=2, pinned=(5,), affine=True, key_lengths=(66, 77), dtype=F16),
    Case(D=13, R=1, T=1, N=7, dtype=F16, h=3, w=11),
]


def _ids(c):
    return (f"D{c.D}-R{c.R}-T{c.T}-pin{len(c.pinned)}{'-rows' if c.row_tokens else ''}-"
            f"{'aff' if c.affine else 'lin'}-M{c.M}-N{c.N}{'-len' if c.key_lengths else ''}-"
            f"{str(c.dtype).split('.')[-1]}")


def _kernel_args(case, inp, device):
    """kernels.forward's arguments (all but scale / lengths) in the case's dtype, as stattn.ops
    normalises them: weights / masks / theta / basis float32, tokens int32 [T] or [B, T], pin
    int32 flags [N] or [B, N]."""
    lowp = lambda t: t.to(case.dtype)  # noqa: E731
    theta = None if inp["theta"] is None else inp["theta"].float()
    gy, gx = (b.float().contiguous() for b in inp["basis"])
    tokens = pin = None
    if case.T:
        tokens = torch.tensor(inp["tokens"], dtype=torch.int32, device=device)
    if case.pinned:
        rows = case.pinned_rows()
        pin = torch.zeros(len(rows), case.N, dtype=torch.int32, device=device)
        for b, row in enumerate(rows):
            pin[b, list(row)] = 1
        pin = pin if isinstance(case.pinned[0], tuple) else pin[0]
    return (lowp(inp["q"]), lowp(inp["k"]), lowp(inp["v"]), inp["weights"].float(), inp["masks"].float(),
            case.affine, theta, tokens, gy, gx, pin)


def _lengths(case, device):
    return None if case.key_lengths is None else torch.tensor(case.key_lengths, dtype=torch.int32, device=device)


def _reference(case, inp, dO, G):
    """fp64 oracle: (o, P, grads of sum(o * dO) + sum(P * G) by autograd through the reference)."""
    leaves = {n: None if inp[n] is None else inp[n].double().detach().requires_grad_(True) for n in GRADS}
    offset = None
    if leaves["theta"] is not None:
        gy, gx = (b.double() for b in inp["basis"])
        offset = SimpleNamespace(theta=leaves["theta"], tokens=inp["tokens"], gy=gy, gx=gx, pinned=case.pinned)
    o = ref.region_attention(leaves["q"], leaves["k"], leaves["v"], leaves["masks"], leaves["weights"],
                             case.affine, offset, lengths=case.key_lengths)
    P = ref.region_probs(leaves["q"], leaves["k"], case.D ** -0.5, offset, case.key_lengths)[:, 0]
    loss = (o * dO.double()).sum() + (P * G.double()).sum()
    wanted = [n for n in GRADS if leaves[n] is not None]
    got = torch.autograd.grad(loss, [leaves[n] for n in wanted], allow_unused=True)
    grads = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(wanted, got)}
    return o.detach(), P.detach(), grads


def _run(case, inp, device, dO, G, needs=(True, True, True, True)):
    """The kernels' (o, P, {name: grad}) with the maps' gradient G (None: none)."""
    from stattn import kernels

    args = _kernel_args(case, inp, device)
    scale, lengths = case.D ** -0.5, _lengths(case, device)
    o, lse, P = kernels.forward(*args, scale, lengths, want_probs=True)
    dq, dk, dv, dbuf, dtheta = kernels.backward(dO.to(case.dtype), *args, scale, lse, *needs, lengths,
                                                grad_probs=G)
    grads = dict(q=dq, k=dk, v=dv, theta=dtheta)
    if needs[2]:  # (D also comes back for dK/dV alone)
        weights, masks = args[3], args[4]
        dalpha = ops._dalpha(dbuf, args[-1] is not None, case.affine)
        grads.update(weights=(dalpha * masks).sum(-1), masks=dalpha * weights[..., None])
    return o, P, {n: g for n, g in grads.items() if g is not None}


def _random_grads(case, device, seed=11):
    g = torch.Generator().manual_seed(seed)
    dO = torch.randn(case.B, case.H, case.M, case.D, generator=g, dtype=torch.float64)
    G = torch.randn(case.B, case.H, case.M, case.N, generator=g, dtype=torch.float64)
    return dO.to(device), G.float().to(device)


def _check_grads(case, device, grads, ref_grads, names):
    tol = TOL[(device, case.dtype)] * GRAD_TOL_FACTOR
    for name in names:
        assert grads[name].shape == ref_grads[name].shape, name
        assert rel_err(grads[name], ref_grads[name]) < tol, name


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_probs_and_their_gradient_match_reference(case, device, poisoned):
    inp = make_inputs(case, device)
    dO, G = _random_grads(case, device)
    o, P, grads = _run(case, inp, device, dO, G)
    ref_o, ref_P, ref_grads = _reference(case, inp, dO, G)
    tol = TOL[(device, case.dtype)]
    assert o.dtype == case.dtype and rel_err(o, ref_o) < tol, "forward"
    assert P.dtype == F32 and P.shape == (case.B, case.H, case.M, case.N) and P.is_contiguous()
    assert rel_err(P, ref_P) < tol, "probs"
    if case.key_lengths:  # padded keys: exact zeros
        assert not P[..., case.key_lengths[0]:].any()
    _check_grads(case, device, grads, ref_grads, [n for n in GRADS if inp[n] is not None and (n != "theta" or case.T)])


@pytest.mark.gpu
def test_pinned_target_probs_and_gradient(device, poisoned):
    """A target token that is also pinned keeps its un-offset probability (the kernels' pinned-
    target path; the public op rejects it): the edited softmax still counts its edited logit."""
    case = Case(B=1, D=13, R=1, T=2, N=7, pinned=(2,), affine=False, h=3, w=11)
    inp = make_inputs(case, device, seed=2)
    inp["tokens"] = (2, 5)
    dO, G = _random_grads(case, device, seed=4)
    o, P, grads = _run(case, inp, device, dO, G)
    ref_o, ref_P, ref_grads = _reference(case, inp, dO, G)
    assert rel_err(P, ref_P) < TOL[(device, F32)]
    _check_grads(case, device, grads, ref_grads, ("q", "k", "theta"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16], ids=["float32", "float16"])
def test_maps_gradient_alone(dtype, device, poisoned):
    """grad_out zero, G nonzero: dq, dk, dtheta are the maps' gradient alone; dv and dalpha zero."""
    case = Case(B=1, D=13, R=2, T=2, N=7, pinned=(4,), affine=True, key_lengths=(6, 7), dtype=dtype, h=3, w=11)
    inp = make_inputs(case, device, seed=5)
    dO, G = _random_grads(case, device, seed=6)
    dO = torch.zeros_like(dO)
    _, _, grads = _run(case, inp, device, dO, G)
    _, _, ref_grads = _reference(case, inp, dO, G)
    _check_grads(case, device, grads, ref_grads, ("q", "k", "theta"))
    assert ref_grads["k"][:, 1].abs().max() == 0      # region 1 does not enter the maps
    for name in ("v", "weights", "masks"):
        assert not torch.isnan(grads[name]).any() and not grads[name].any(), name


@pytest.mark.gpu
@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, False, True), (False, False, True, False)],
                         ids=["dq", "dkv", "dtheta", "dalpha"])
def test_maps_gradient_with_some_gradients(needs, device, poisoned):
    """Each gradient asked alone still gets the maps' part (dK's row sums come from the dQ kernel
    even when dq itself is not wanted)."""
    case = Case(B=1, D=13, R=2, T=1, N=7, pinned=(0,), affine=True, h=3, w=11)
    inp = make_inputs(case, device, seed=8)
    dO, G = _random_grads(case, device, seed=9)
    _, _, grads = _run(case, inp, device, dO, G, needs=needs)
    _, _, ref_grads = _reference(case, inp, dO, G)
    names = [n for n, want in zip((("q",), ("k", "v"), ("weights", "masks"), ("theta",)), needs) if want]
    names = [n for group in names for n in group]
    assert set(grads) == set(names)
    _check_grads(case, device, grads, ref_grads, names)


def test_plain_forward_returns_two_outputs(device):
    from stattn import kernels

    case = Case(D=13, R=1, T=0, N=7, h=3, w=11)
    args = _kernel_args(case, make_inputs(case, device), device)
    assert len(kernels.forward(*args, case.D ** -0.5)) == 2


def test_bad_grad_probs_is_named(device):
    from stattn import kernels

    case = Case(D=13, R=1, T=0, N=7, h=3, w=11)
    args = _kernel_args(case, make_inputs(case, device), device)
    o, lse = kernels.forward(*args, case.D ** -0.5)
    common = (torch.zeros_like(o), *args, case.D ** -0.5, lse, True, True, True, True, None)
    with pytest.raises(ValueError, match="grad_probs must have shape"):
        kernels.backward(*common, grad_probs=torch.zeros(case.B, case.H, case.M, case.N + 1, device=device))
    with pytest.raises(TypeError, match="grad_probs must be float32"):
        kernels.backward(*common, grad_probs=torch.zeros(case.B, case.H, case.M, case.N, device=device,
                                                         dtype=torch.float64))
