"""Triton kernels (CUDA, or the interpreter on CPU) against the fp64 reference on fresh random
inputs: odd pixel counts, N = 77 and N > 128, D in {40, 64, 80, 160}, R in {1, 2, 4},
T in {0, 1, 3}, pinned tokens, affine on/off, fp32/fp16 (bf16 on CUDA), outputs NaN-poisoned."""
import pytest
import torch

from helpers import GRAD_TOL_FACTOR, TOL, Case, make_inputs, reference_run, rel_err, run

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# Each factor's every value appears, with the risky combinations (offset + pins + affine, several
# regions, padded D, odd M) crossed; kept small because the interpreter is slow.
CASES = [
    Case(D=40, R=1, T=0),                                               # plain cross-attention
    Case(D=64, R=1, T=1, pinned=(0,)),
    Case(D=80, R=2, T=3, pinned=(0, 9), affine=True),
    Case(D=160, R=4, T=1, affine=True, h=3, w=5),
    Case(D=40, R=4, T=3, pinned=(0, 1), float_masks=False),
    Case(D=64, R=2, T=0, pinned=(0,), affine=True),                     # pins without an offset
    Case(D=40, R=2, T=1, dtype=F16, h=9, w=7),
    Case(D=80, R=1, T=3, pinned=(4,), dtype=F16),
    Case(D=64, R=4, T=1, pinned=(0, 3), affine=True, dtype=F16, h=6, w=6),
    Case(D=160, R=2, T=0, dtype=F16, h=4, w=5),
    Case(D=40, R=2, T=3, pinned=(0, 140), N=154, h=4, w=6),             # blocked keys: N > 128
    Case(D=64, R=1, T=1, pinned=(200,), N=231, dtype=F16, h=3, w=4),
    Case(D=96, R=2, T=1, pinned=(0,), affine=True, h=3, w=3),           # SD 2.x / SDXL head sizes
    Case(D=128, R=1, T=3, dtype=F16, h=4, w=4),
]
ON_GPU_ONLY = [Case(D=80, R=2, T=3, pinned=(0, 9), affine=True, dtype=BF16),
               Case(D=64, R=4, T=1, dtype=BF16, N=154)]


def _ids(c):
    return (f"D{c.D}-R{c.R}-T{c.T}-pin{len(c.pinned)}-{'aff' if c.affine else 'lin'}-M{c.M}-N{c.N}-"
            f"{str(c.dtype).split('.')[-1]}{'-bool' if not c.float_masks else ''}")


def _check(case, device):
    inp = make_inputs(case, device)
    out, grads = run(case, inp, case.dtype)
    ref_out, ref_grads = reference_run(case, inp)
    tol = TOL[(device, case.dtype)]
    assert out.dtype == case.dtype and out.shape == ref_out.shape
    assert rel_err(out, ref_out) < tol, "forward"
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert g.shape == ref_grads[name].shape, name
        assert rel_err(g, ref_grads[name]) < tol * GRAD_TOL_FACTOR, name


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_matches_reference(case, device, triton_backend, poisoned):
    _check(case, device)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ON_GPU_ONLY, ids=_ids)
def test_kernel_bf16(case, device, triton_backend, poisoned):
    if device != "cuda":
        pytest.skip("bfloat16 needs a GPU (the Triton interpreter has no bfloat16)")
    _check(case, device)


@pytest.mark.gpu
@pytest.mark.parametrize("wrt", [("q",), ("theta",), ("q", "weights"), ("masks",), ("k", "v"), ("v",)])
def test_kernel_computes_only_requested_gradients(wrt, device, triton_backend, poisoned):
    case = Case(D=40, R=2, T=1, pinned=(0,), h=3, w=5)
    inp = make_inputs(case, device, seed=3)
    out, grads = run(case, inp, torch.float32, wrt=wrt)
    ref_out, ref_grads = reference_run(case, inp, wrt=wrt)
    assert set(grads) == set(wrt)
    for name in wrt:
        assert rel_err(grads[name], ref_grads[name]) < TOL[(device, torch.float32)] * GRAD_TOL_FACTOR, name


@pytest.mark.gpu
def test_kernel_strided_q_and_grad(device, triton_backend, poisoned):
    """diffusers hands q as a transposed view [B, M, H, D] -> [B, H, M, D]; dO may be strided too."""
    case = Case(D=40, R=2, T=1, pinned=(0,), h=5, w=5)
    inp = make_inputs(case, device, seed=5)
    inp["q"] = inp["q"].transpose(1, 2).contiguous().transpose(1, 2)
    out, grads = run(case, inp, torch.float32, wrt=("q", "theta"))
    ref_out, ref_grads = reference_run(case, inp, wrt=("q", "theta"))
    tol = TOL[(device, torch.float32)]
    assert rel_err(out, ref_out) < tol
    assert all(rel_err(grads[n], ref_grads[n]) < tol * GRAD_TOL_FACTOR for n in grads)


@pytest.mark.gpu
def test_theta_gradient_is_deterministic(device, triton_backend):
    case = Case(D=64, R=2, T=3, pinned=(0,), h=6, w=6)
    inp = make_inputs(case, device, seed=7)
    first = run(case, inp, torch.float32, wrt=("theta", "weights"))[1]
    second = run(case, inp, torch.float32, wrt=("theta", "weights"))[1]
    for name in first:
        assert torch.equal(first[name], second[name]), name
