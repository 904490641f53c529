"""Random problem construction and error metrics shared by the tests."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch

import stattn
from stattn import reference as ref

# ||out - ref|| / ||ref|| bounds per device and dtype; GPU fp32 runs tl.dot in tf32.
TOL = {
    ("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 3e-4,
    ("cpu", torch.float16): 2e-3, ("cuda", torch.float16): 2e-3,
    ("cuda", torch.bfloat16): 1e-2,
}
# gradients go through one more low-precision product (dz cast to the input dtype)
GRAD_TOL_FACTOR = 2.5

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GPU = DEVICE == "cuda"
# the op tests' tolerance per dtype on this run's device; bf16 has no CPU entry in TOL: its bound is the
# inputs' bf16 rounding (as tests/test_native.py)
OP_TOL = {**{dt: TOL[(DEVICE, dt)] for dt in (F32, F16)}, BF16: TOL[("cuda", BF16)], F64: 1e-12}
# the backends this run's tensors can take (the native kernels run CPU tensors): the `backend` fixture's
OP_BACKENDS = ["reference", "triton"] + ([] if GPU else ["native"])


def op_dtypes(backend: str) -> tuple:
    """The dtypes a backend takes here: the Triton interpreter has neither bf16 nor (in the op) fp64
    (fp64 runs the reference on CUDA too)."""
    if backend == "triton":
        return (F32, F16, BF16) if GPU else (F32, F16)
    if backend == "native":
        return (F32, F16, BF16, F64)
    return (F32, F64)


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    out = out.double()
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@dataclass
class Case:
    B: int = 2
    H: int = 2
    h: int = 5
    w: int = 7
    D: int = 40
    R: int = 2
    N: int = 77
    T: int = 1
    pinned: tuple = ()              # shared indices, or B tuples (per batch row)
    affine: bool = False
    dtype: torch.dtype = torch.float32
    float_masks: bool = True
    row_tokens: bool = False        # draw each batch row's T target tokens separately
    key_lengths: Optional[tuple] = None   # R valid-key counts (None: all N)

    @property
    def M(self):
        return self.h * self.w

    @property
    def keys0(self) -> int:
        """Region 0's valid keys: where target tokens are drawn from."""
        return self.key_lengths[0] if self.key_lengths else self.N

    def pinned_rows(self) -> list:
        """Each batch row's pinned columns."""
        per_row = bool(self.pinned) and isinstance(self.pinned[0], tuple)
        return list(self.pinned) if per_row else [tuple(self.pinned)] * self.B


def pinned_targets(case: Case, tokens) -> bool:
    """Whether some row pins one of its own target tokens: the public op rejects that (the target
    would never get its own attention edited); the custom op below it computes it (the kernels'
    pinned-target path)."""
    rows = list(tokens) if tokens and isinstance(tokens[0], tuple) else [tuple(tokens)] * case.B
    return any(set(t) & set(p) for t, p in zip(rows, case.pinned_rows()))


def make_inputs(case: Case, device, seed: int = 0):
    """Fresh random inputs (fp64 masters): q, k, v, masks, weights, theta (or None), tokens, basis."""
    g = torch.Generator().manual_seed(seed)
    c = case
    dd = dict(dtype=torch.float64)
    q = torch.randn(c.B, c.H, c.M, c.D, generator=g, **dd)
    k = torch.randn(c.B, c.R, c.H, c.N, c.D, generator=g, **dd)
    v = torch.randn(c.B, c.R, c.H, c.N, c.D, generator=g, **dd)
    if c.float_masks:
        masks = torch.rand(c.B, c.R, c.M, generator=g, **dd)
    else:
        masks = torch.rand(c.R, c.M, generator=g) > 0.4
    weights = 0.25 + torch.rand(c.B, c.R, generator=g, **dd)
    gy, gx = stattn.gaussian_basis(c.h, c.w, sigma=1, dtype=torch.float64)
    theta = torch.randn(c.B, c.H, c.T, gy.shape[1], gx.shape[1], generator=g, **dd) if (c.T or c.pinned) else None
    # targets are drawn among the columns no row pins (the public op rejects a pinned target)
    pinned = {i for row in c.pinned_rows() for i in row}

    def draw():
        return tuple(i for i in torch.randperm(c.keys0, generator=g).tolist() if i not in pinned)[:c.T]

    tokens = draw() if c.T else ()
    if c.row_tokens:  # row 0 as the shared draw, the others drawn after it
        tokens = (tokens, *(draw() for _ in range(c.B - 1)))
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(q=to(q), k=to(k), v=to(v), masks=to(masks), weights=to(weights), theta=to(theta),
                tokens=tokens, basis=(to(gy), to(gx)))


def run(case: Case, inp: dict, dtype, wrt=("q", "k", "v", "weights", "masks", "theta"), grad_seed=1):
    """Run the public op in `dtype` (theta stays fp32/fp64) and return (out, {name: grad}); a case
    with a pinned target, which the public op rejects, runs the custom op instead (op_call)."""
    lowp = lambda t: t.to(dtype)  # noqa: E731
    tdtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {
        "q": lowp(inp["q"]), "k": lowp(inp["k"]), "v": lowp(inp["v"]),
        "weights": inp["weights"].to(tdtype),
        "masks": inp["masks"].to(tdtype) if inp["masks"].dtype.is_floating_point else inp["masks"],
        "theta": None if inp["theta"] is None else inp["theta"].to(tdtype),
    }
    for name in wrt:
        t = leaves[name]
        if t is not None and t.dtype.is_floating_point:
            t.requires_grad_(True)
    gy, gx = (b.to(tdtype) for b in inp["basis"])
    if inp["theta"] is not None and pinned_targets(case, inp["tokens"]):
        out = op_call(case, leaves, inp["tokens"], (gy, gx))
    else:
        offset = None
        if inp["theta"] is not None:
            offset = stattn.ScoreOffset(leaves["theta"], inp["tokens"], (gy, gx), pinned=case.pinned)
        out = stattn.region_attention(leaves["q"], leaves["k"], leaves["v"], masks=leaves["masks"],
                                      region_weights=leaves["weights"], affine=case.affine, offset=offset,
                                      key_lengths=case.key_lengths)
    grads = {}
    wanted = [n for n in wrt if leaves[n] is not None and leaves[n].requires_grad]
    if wanted:
        g = torch.Generator().manual_seed(grad_seed)
        do = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
        got = torch.autograd.grad(out, [leaves[n] for n in wanted], do.to(out.dtype))
        grads = dict(zip(wanted, got))
    return out, grads


def op_call(case: Case, leaves: dict, tokens, basis):
    """The custom op torch.ops.stattn.region_attention with the arguments region_attention
    builds (float32 / float64 masks [B, R, M] and weights [B, R], int32 tokens and pin flags),
    for offsets the public op rejects: a pinned target keeps its un-offset probability."""
    q, k = leaves["q"], leaves["k"]
    B, H, M, D = q.shape
    R, N, dev = k.shape[1], k.shape[3], q.device
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    masks = leaves["masks"].to(ct)
    masks = (masks if masks.dim() == 3 else masks[None]).expand(B, R, M)
    weights = leaves["weights"].to(ct).expand(B, R)
    rows = case.pinned_rows()
    pin = torch.zeros(len(rows), N, dtype=torch.int32)
    for b, row in enumerate(rows):
        pin[b, list(row)] = 1
    pin = (pin if isinstance(case.pinned[0], tuple) else pin[0]).to(dev)
    tok = torch.tensor(tokens, dtype=torch.int32, device=dev)
    gy, gx = (b.to(ct).contiguous() for b in basis)
    lengths = None if case.key_lengths is None else torch.tensor(case.key_lengths, dtype=torch.int32, device=dev)
    save = stattn.ops._save_logits(q, k, leaves["v"], weights, masks, leaves["theta"])
    o, _, _, _ = torch.ops.stattn.region_attention(q, k, leaves["v"], weights, masks, case.affine, leaves["theta"], tok,
                                                gy, gx, pin, D ** -0.5, save, lengths)
    return o


def reference_run(case: Case, inp: dict, wrt=("q", "k", "v", "weights", "masks", "theta"), grad_seed=1):
    """The fp64 oracle: autograd through the readable reference (not the op's own backward)."""
    leaves = {n: (None if inp[n] is None else inp[n].double().detach()) for n in
              ("q", "k", "v", "weights", "masks", "theta")}
    if not inp["masks"].dtype.is_floating_point:  # bool masks carry no gradient
        leaves["masks"] = inp["masks"].double()
        wrt = tuple(n for n in wrt if n != "masks")
    for n in wrt:
        if leaves[n] is not None:
            leaves[n].requires_grad_(True)
    B, R, M = case.B, case.R, case.M
    masks = leaves["masks"] if leaves["masks"].dim() == 3 else leaves["masks"].expand(B, R, M)
    offset = None
    if leaves["theta"] is not None:  # a plain namespace: the reference also takes pinned targets
        gy, gx = (b.double() for b in inp["basis"])
        offset = SimpleNamespace(theta=leaves["theta"], tokens=inp["tokens"], gy=gy, gx=gx, pinned=case.pinned)
    out = ref.region_attention(leaves["q"], leaves["k"], leaves["v"], masks, leaves["weights"],
                               case.affine, offset, lengths=case.key_lengths)
    g = torch.Generator().manual_seed(grad_seed)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)
    wanted = [n for n in wrt if leaves[n] is not None]
    got = torch.autograd.grad(out, [leaves[n] for n in wanted], do, allow_unused=True)
    # theta with no target token does not enter the output: its gradient is zero
    return out, {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(wanted, got)}


def op_args(q_layout=lambda q: q, device="cpu") -> tuple:
    """Small arguments of the stattn::region_attention custom op (R = 2, offset with pins, affine),
    for opcheck and fake-tensor tests; ``q_layout`` maps the contiguous q to the layout under test."""
    B, H, h, w, D, R, N = 2, 2, 3, 4, 8, 2, 11
    g = torch.Generator().manual_seed(0)
    q = q_layout(torch.randn(B, H, h * w, D, generator=g))
    k, v = (torch.randn(B, R, H, N, D, generator=g) for _ in range(2))
    gy, gx = stattn.gaussian_basis(h, w, sigma=1)
    off = stattn.ScoreOffset(torch.randn(B, H, 2, gy.shape[1], gx.shape[1], generator=g), (1, 4), (gy, gx),
                             pinned=(0,))
    tokens, pin = off.device_tensors(N)
    weights, masks = torch.rand(B, R, generator=g), torch.rand(B, R, h * w, generator=g)
    args = (q, k, v, weights, masks, True, off.theta, tokens, gy, gx, pin, D ** -0.5)
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
