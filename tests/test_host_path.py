"""The op's host path: eager calls that autograd, tracing, modes and the profiler need not see go
to the backend directly (the same computation as through the custom op, minus its dispatch); the
cached checks and default masks behave as uncached ones."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import stattn
from stattn import _validate as V
from stattn import ops

B, H, M, D, N = 2, 3, 9, 8, 7


def qkv(R=1, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, M, D, generator=g)
    k, v = (torch.randn(B, R, H, N, D, generator=g) for _ in range(2))
    return [t.requires_grad_(grad) for t in (q, k, v)]


@pytest.fixture
def counted(monkeypatch):
    """How many calls went through the custom op."""
    calls = []
    real = ops._region_attention_op
    monkeypatch.setattr(ops, "_region_attention_op", lambda *a: calls.append(1) or real(*a))
    return calls


def test_no_grad_and_grad_free_calls_skip_the_custom_op_with_the_same_result(counted):
    q, k, v = qkv(R=2)
    masks = torch.rand(2, M)
    with torch.no_grad():
        direct = stattn.region_attention(q, k, v, masks=masks)
    direct_grad_mode = stattn.region_attention(q, k, v, masks=masks)     # grad mode, nothing requires grad
    assert counted == []
    o, _, _, _ = ops._region_attention_op(q, k, v, torch.ones(B, 2), masks.expand(B, 2, M), False, None, None, None,
                                       None, None, D ** -0.5)
    assert torch.equal(direct, o) and torch.equal(direct_grad_mode, o)   # one kernel, the same inputs
    assert direct.stride() == o.stride()


def test_autograd_goes_through_the_custom_op(counted):
    q, k, v = qkv(grad=True)
    stattn.region_attention(q, k, v).sum().backward()
    assert counted == [1] and q.grad is not None and k.grad is not None
    with torch.no_grad():                 # requires_grad, but no graph is recorded: direct
        stattn.region_attention(q, k, v)
    assert counted == [1]


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_and_the_profiler_see_the_op_by_name():
    q, k, v = qkv()
    with torch.no_grad(), _Seen() as seen:
        stattn.region_attention(q, k, v)
    assert any("stattn.region_attention" in op for op in seen.ops), seen.ops
    with torch.no_grad(), torch.profiler.profile() as prof:
        stattn.region_attention(q, k, v)
    assert "stattn::region_attention" in {e.key for e in prof.key_averages()}


def test_torch_compile_traces_the_custom_op():
    q, k, v = qkv()
    f = torch.compile(lambda q, k, v: stattn.region_attention(q, k, v), backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(f(q, k, v), stattn.region_attention(q, k, v), rtol=0, atol=1e-6)


def test_cached_default_masks_are_not_inference_tensors_outside_inference_mode():
    q, k, v = qkv()
    with torch.inference_mode():
        stattn.region_attention(q, k, v)         # fills the inference-mode entry
    q, k, v = qkv(grad=True)
    stattn.region_attention(q, k, v).sum().backward()   # saves the default masks for backward
    assert q.grad is not None


def test_cached_shape_checks_raise_as_before():
    q, k, v = qkv()
    for _ in range(2):                           # the second call would hit a cache if errors were cached
        with pytest.raises(ValueError, match="v must have k's shape"):
            V.check_qkv(q, k, v[:, :, :, :-1])
        with pytest.raises(TypeError, match="k must have q's dtype"):
            V.check_qkv(q, k.double(), v)
    assert V.check_qkv(q, k, v) == (B, H, M, D, 1, N) == V.check_qkv(q, k, v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        V.check_qkv(None, k, v)


def test_backend_choice_follows_the_environment_at_every_call(monkeypatch):
    q, _, _ = qkv()
    monkeypatch.setenv("STATTN_BACKEND", "Reference")
    assert ops.backend_for(q) == "reference"
    monkeypatch.setenv("STATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="STATTN_BACKEND must be"):
        ops.backend_for(q)
