"""Public API: clear errors for bad input, torch.library registration (opcheck), torch.compile."""
import pytest
import torch

import stattn

B, H, h, w, D, R, N = 2, 2, 3, 4, 8, 2, 11
M = h * w


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, M, D, generator=g, dtype=dtype)
    k = torch.randn(B, R, H, N, D, generator=g, dtype=dtype)
    v = torch.randn(B, R, H, N, D, generator=g, dtype=dtype)
    return q, k, v


def _offset(T=2, tokens=(1, 4), pinned=(0,), grid=(h, w), batch=B, heads=H):
    gy, gx = stattn.gaussian_basis(*grid, sigma=1)
    theta = torch.randn(batch, heads, T, gy.shape[1], gx.shape[1])
    return stattn.ScoreOffset(theta, tokens, (gy, gx), pinned=pinned)


def test_readme_quickstart():
    q = torch.randn(2, 8, 64 * 64, 40)                         # [B, H, M, D], M = 64x64 pixels
    k = torch.randn(2, 3, 8, 77, 40)                           # [B, R, H, N, D], 3 regions
    v = torch.randn(2, 3, 8, 77, 40)
    masks = torch.rand(3, 64 * 64) > 0.5                       # region masks
    weights = torch.tensor([1.0, 0.6, 0.4])                    # per-region (timestep) weights
    gy, gx = stattn.gaussian_basis(64, 64)
    theta = torch.zeros(2, 8, 2, gy.shape[1], gx.shape[1], requires_grad=True)
    offset = stattn.ScoreOffset(theta, tokens=[2, 5], basis=(gy, gx), pinned=[0, 7])
    out = stattn.region_attention(q, k, v, masks=masks, region_weights=weights, affine=True, offset=offset)
    out.square().mean().backward()
    assert out.shape == q.shape and theta.grad.shape == theta.shape and torch.isfinite(theta.grad).all()


@pytest.mark.parametrize("mutate,exc,words", [
    (lambda a: a.update(q=a["q"][0]), ValueError, "q must have shape [B, H, M, D]"),
    (lambda a: a.update(k=a["k"][:, :, :1]), ValueError, "k must have shape"),
    (lambda a: a.update(v=a["v"][:, :1]), ValueError, "v must have k's shape"),
    (lambda a: a.update(k=a["k"].half()), TypeError, "k must have q's dtype"),
    (lambda a: a.update(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), TypeError, "q must be float16"),
    (lambda a: a.update(v=a["v"].to("meta")), ValueError, "v must be on q's device"),
    (lambda a: a.update(masks=torch.ones(R + 1, M)), ValueError, "masks must have shape"),
    (lambda a: a.update(masks=torch.ones(R, M, dtype=torch.int64)), TypeError, "masks must be bool or floating"),
    (lambda a: a.update(region_weights=torch.ones(R + 1)), ValueError, "region_weights must have shape"),
    (lambda a: a.update(region_weights=torch.tensor([1.0, float("nan")])), ValueError, "region_weights contains NaN"),
    (lambda a: a.update(masks=torch.full((R, M), float("inf"))), ValueError, "masks contains NaN or inf"),
    (lambda a: a.update(region_weights=[1.0, 2.0]), TypeError, "region_weights must be a tensor"),
    (lambda a: a.update(scale=-1.0), ValueError, "scale must be a positive"),
    (lambda a: a.update(affine=1), TypeError, "affine must be a bool"),
    (lambda a: a.update(offset=_offset(tokens=(1, N))), ValueError, "offset.tokens [11] out of range"),
    (lambda a: a.update(offset=_offset(pinned=(N + 3,))), ValueError, "offset.pinned [14] out of range"),
    (lambda a: a.update(offset=_offset(grid=(h + 1, w))), ValueError, "does not match M"),
    (lambda a: a.update(offset=_offset(heads=H + 1)), ValueError, "offset.theta must have shape"),
    (lambda a: a.update(offset="theta"), TypeError, "offset must be a stattn.ScoreOffset"),
])
def test_bad_input_is_named(mutate, exc, words):
    q, k, v = _inputs()
    args = dict(q=q, k=k, v=v)
    mutate(args)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc) as info:
        stattn.region_attention(q, k, v, **args)
    assert words in str(info.value)


def test_nan_theta_is_rejected_and_checks_can_be_turned_off():
    q, k, v = _inputs()
    off = _offset()
    off.theta[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="offset.theta contains NaN"):
        stattn.region_attention(q, k, v, offset=off)
    previous = stattn.set_value_checks(False)
    try:
        assert torch.isnan(stattn.region_attention(q, k, v, offset=off)).any()
    finally:
        stattn.set_value_checks(previous)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_value_check_finds_one_bad_element_and_passes_extremes(dtype):
    from stattn import _validate as V

    big = torch.finfo(dtype).max
    V.check_finite("x", torch.tensor([big, -big, 0.0, torch.finfo(dtype).tiny], dtype=dtype))
    V.check_finite("x", torch.empty(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(5, 37).to(dtype)
        x[3, 29] = bad
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            V.check_finite("x", x)


def test_value_checks_of_leaves_that_require_grad_warn_nothing():
    import warnings

    q, k, v = _inputs()
    off = _offset()
    off.theta.requires_grad_(True)
    weights = torch.ones(R, requires_grad=True)
    masks = torch.rand(R, M, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stattn.region_attention(q, k, v, masks=masks, region_weights=weights, offset=off).sum().backward()


@pytest.mark.parametrize("make,exc,words", [
    (lambda gy, gx: stattn.ScoreOffset(torch.zeros(B, H, 3, gy.shape[1], gx.shape[1]), (1, 2), (gy, gx)),
     ValueError, "theta has T = 3 token slots but tokens has 2"),
    (lambda gy, gx: stattn.ScoreOffset(torch.zeros(B, H, 1, 9, gx.shape[1]), (1,), (gy, gx)),
     ValueError, "do not match the basis"),
    (lambda gy, gx: stattn.ScoreOffset(torch.zeros(B, H, 1, gy.shape[1]), (1,), (gy, gx)),
     ValueError, "theta must have shape [B, H, T, Ky, Kx]"),
    (lambda gy, gx: stattn.ScoreOffset(torch.zeros(B, H, 1, gy.shape[1], gx.shape[1], dtype=torch.float16), (1,), (gy, gx)),
     TypeError, "theta must be float32"),
    (lambda gy, gx: stattn.ScoreOffset(torch.zeros(B, H, 2, gy.shape[1], gx.shape[1]), (1, 1), (gy, gx)),
     ValueError, "must not repeat"),
    (lambda gy, gx: stattn.ScoreOffset(torch.zeros(B, H, 1, gy.shape[1], gx.shape[1]), (-1,), (gy, gx)),
     ValueError, "non-negative"),
    (lambda gy, gx: stattn.ScoreOffset(torch.zeros(B, H, 1, gy.shape[1], gx.shape[1]), (1,), gy),
     TypeError, "basis must be a pair"),
    (lambda gy, gx: stattn.gaussian_basis(2, 2), ValueError, "no Gaussian centre"),
    (lambda gy, gx: stattn.gaussian_basis(0, 4), ValueError, "h must be a positive int"),
])
def test_bad_offset_is_named(make, exc, words):
    gy, gx = stattn.gaussian_basis(h, w, sigma=1)
    with pytest.raises(exc) as info:
        make(gy, gx)
    assert words in str(info.value)


def test_interpreter_has_no_bfloat16(triton_backend):
    if torch.cuda.is_available():
        pytest.skip("on a GPU bfloat16 runs in the kernels (tests/test_kernels.py)")
    q, k, v = (t.bfloat16() for t in _inputs())
    with pytest.raises(TypeError, match="no bfloat16"):
        stattn.region_attention(q, k, v)


@pytest.fixture
def interpreter_probe(monkeypatch):
    """stattn.ops.interpreter_problem with the Triton version and numpy's int() answer chosen."""
    import triton

    from stattn import ops

    def set_(triton_version, numpy_takes_1_element):
        ops.interpreter_problem.cache_clear()
        monkeypatch.setattr(triton, "__version__", triton_version)
        monkeypatch.setattr(ops, "_numpy_int_of_1_element_array", lambda: numpy_takes_1_element)
    yield set_
    ops.interpreter_problem.cache_clear()


def test_interpreter_with_a_strict_numpy_is_a_clear_error(triton_backend, interpreter_probe, monkeypatch):
    """Triton 3.6's interpreter cannot run on numpy >= 2.4: named at the call, not deep inside a kernel."""
    if torch.cuda.is_available():
        pytest.skip("the interpreter runs only without a GPU")
    from stattn import doctor, ops

    interpreter_probe("3.6.0", False)
    with pytest.raises(RuntimeError, match=r"STATTN_BACKEND=triton on CPU: Triton 3\.6\.0's interpreter needs numpy < 2\.4"):
        stattn.region_attention(*_inputs())
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "unusable" in doctor.triton_report()[0] and "numpy < 2.4" in doctor.triton_report()[0]
    interpreter_probe("3.7.0", False)    # other releases are not judged
    assert ops.interpreter_problem() is None
    interpreter_probe("3.6.0", True)
    assert ops.interpreter_problem() is None
    assert torch.isfinite(stattn.region_attention(*_inputs())).all()


def test_the_interpreter_probe_matches_numpy():
    """The probe is numpy's real behaviour here (numpy < 2.4 in the test extra: int() takes it)."""
    import numpy as np

    from stattn import ops

    strict = tuple(int(x) for x in np.__version__.split(".")[:2]) >= (2, 4)
    assert ops._numpy_int_of_1_element_array() is (not strict)


def _op_args(requires_grad):
    q, k, v = _inputs()
    off = _offset()
    tokens, pin = off.device_tensors(N)
    weights = torch.rand(B, R)
    masks = torch.rand(B, R, M)
    for t in (q, k, v, weights, masks, off.theta):
        t.requires_grad_(requires_grad)
    return (q, k, v, weights, masks, True, off.theta, tokens, off.gy, off.gx, pin, D ** -0.5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend, monkeypatch):
    monkeypatch.setenv("STATTN_BACKEND", backend)
    torch.library.opcheck(torch.ops.stattn.region_attention.default, _op_args(True))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_matches_eager(backend, monkeypatch):
    monkeypatch.setenv("STATTN_BACKEND", backend)
    q, k, v = _inputs()
    off = _offset()

    def f(q, theta, weights):
        o = stattn.ScoreOffset(theta, off.tokens, (off.gy, off.gx), pinned=off.pinned)
        return stattn.region_attention(q, k, v, region_weights=weights, offset=o, affine=True)

    weights = torch.rand(R)
    args = [t.clone().requires_grad_() for t in (q, off.theta, weights)]
    eager = f(*args)
    eager_grads = torch.autograd.grad(eager.sum(), args)
    cargs = [t.clone().requires_grad_() for t in (q, off.theta, weights)]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(*cargs)
    compiled_grads = torch.autograd.grad(compiled.sum(), cargs)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_value_checks_block_restores_the_previous_state():
    from stattn import _validate as V

    before = V._value_checks
    with stattn.value_checks(False):
        assert V._value_checks is False
        with stattn.value_checks(True):
            assert V._value_checks is True
        assert V._value_checks is False
    assert V._value_checks is before
    with pytest.raises(KeyError):
        with stattn.value_checks(False):
            raise KeyError("inside")
    assert V._value_checks is before
