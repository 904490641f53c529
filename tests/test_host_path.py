"""The op's host path: eager calls that autograd, tracing, modes and the profiler need not see go
to the backend directly (the same computation as through the custom op, minus its dispatch), eager
calls autograd records go through one autograd.Function with the custom op's formula (minus
torch.library's per-call dispatch); the cached checks and default masks behave as uncached ones."""
import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import stattn
from stattn import _validate as V
from stattn import ops
from helpers import OP_BACKENDS

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


def test_eager_autograd_takes_the_function_not_the_custom_op(counted, monkeypatch):
    """An eager call autograd records runs _EagerRegionAttention (the custom op's formula without
    torch.library's per-call dispatch), forward and backward; no-grad calls stay direct."""
    backward_calls = []
    real_bw = ops._region_attention_backward_op
    monkeypatch.setattr(ops, "_region_attention_backward_op", lambda *a: backward_calls.append(1) or real_bw(*a))
    q, k, v = qkv(grad=True)
    o = stattn.region_attention(q, k, v)
    assert type(o.grad_fn).__name__ == "_EagerRegionAttentionBackward"
    o.sum().backward()
    assert counted == [] and backward_calls == [] and q.grad is not None and k.grad is not None
    with torch.no_grad():                 # requires_grad, but no graph is recorded: direct
        assert stattn.region_attention(q, k, v).grad_fn is None


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _controlled_call(grad: bool, seed: int):
    """A call with every differentiable input (R = 2, float masks, weights, an offset's theta), key
    lengths and the maps asked for: (o, P, leaves)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = qkv(R=2, grad=grad, seed=seed)
    masks = torch.rand(B, 2, M, generator=g).requires_grad_(grad)
    weights = (0.5 + torch.rand(B, 2, generator=g)).requires_grad_(grad)
    gy, gx = stattn.gaussian_basis(3, 3, sigma=1)
    theta = torch.randn(B, H, 2, gy.shape[1], gx.shape[1], generator=g).requires_grad_(grad)
    offset = stattn.ScoreOffset(theta, (1, 4), (gy, gx), pinned=(0,))
    o, P = stattn.region_attention(q, k, v, masks=masks, region_weights=weights, offset=offset,
                                   key_lengths=(N, N - 2), return_probs=True)
    return o, P, (q, k, v, masks, weights, theta)


@pytest.mark.parametrize("backend", OP_BACKENDS, indirect=True)
def test_eager_function_and_the_custom_op_give_the_same_values_and_gradients(backend, counted):
    """The same call eagerly (the Function) and under a function mode (which takes the custom op and
    its torch.library autograd): one forward kernel and one backward kernel on the same inputs, so
    the results agree to the rounding of the kernels' own reductions."""
    results = []
    for mode in (None, _PassThrough()):
        with mode or contextlib.nullcontext():
            o, P, leaves = _controlled_call(grad=True, seed=3)
        g = torch.Generator().manual_seed(4)
        loss = (o * torch.randn(o.shape, generator=g)).sum() + (P * torch.randn(P.shape, generator=g)).sum()
        results.append((o.detach(), P.detach(), torch.autograd.grad(loss, leaves)))
    assert counted == [1]                                  # the function mode's call only
    (o0, P0, g0), (o1, P1, g1) = results
    for a, b in zip((o0, P0, *g0), (o1, P1, *g1)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert o0.stride() == o1.stride() and g0[0].stride() == g1[0].stride()


def test_torch_func_grad_and_vjp_give_eager_autograds_gradients(counted):
    """torch.func transforms take an autograd.Function only with a setup_context staticmethod (the
    custom op's torch.library autograd has none): _TransformedRegionAttention, the same formula."""
    q, k, v = qkv()
    dq = torch.func.grad(lambda q: stattn.region_attention(q, k, v).square().sum())(q)
    o, vjp = torch.func.vjp(lambda k: stattn.region_attention(q, k, v), k)
    dk, = vjp(torch.ones_like(o))
    assert counted == []
    q2, k2 = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    stattn.region_attention(q2, k, v).square().sum().backward()
    stattn.region_attention(q, k2, v).sum().backward()
    torch.testing.assert_close(dq, q2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dk, k2.grad, rtol=1e-5, atol=1e-6)


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


# ------------------------------------------------------------------ the all-defaults call (_plain)

def test_the_all_defaults_call_equals_the_general_path(counted):
    """region_attention(q, k, v) takes _plain; explicit default masks / weights take the general
    path: the same kernel on the same inputs, and the same checks (a bad shape is named)."""
    q, k, v = qkv()
    with torch.no_grad():
        plain = stattn.region_attention(q, k, v)
        general = stattn.region_attention(q, k, v, masks=torch.ones(1, M), region_weights=torch.ones(1))
    torch.testing.assert_close(plain, general, rtol=1e-6, atol=1e-7)
    assert plain.stride() == general.stride() and counted == []
    with pytest.raises(ValueError, match="v must have k's shape"):
        stattn.region_attention(q, k, v[:, :, :, :-1])
    with pytest.raises(ValueError, match="scale must be a positive finite float"):
        stattn.region_attention(q, k, v, scale=-1.0)
    qg, kg, vg = qkv(grad=True)
    assert type(stattn.region_attention(qg, kg, vg).grad_fn).__name__ == "_EagerRegionAttentionBackward"
    with _PassThrough():
        stattn.region_attention(q, k, v)
    assert counted == [1]                 # a function mode sees the custom op on the plain call too


# ------------------------------------------------------------------ the processor's host path

def _cross_layer():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, dropout=0.5).eval()
    return attn, torch.randn(2, 9, 32), torch.randn(2, 7, 24)


def test_processor_signature_is_the_functions_own():
    """diffusers filters cross_attention_kwargs with inspect.signature(processor.__call__): the fixed
    __signature__ gives what inspect computes from the code, for every processor stattn installs."""
    import inspect

    from stattn.integration.ip_adapter import StattnIPAdapterProcessor
    from stattn.integration.processors import StattnAttnProcessor
    from stattn.methods.attend_excite.stock import SelfAttendExcite

    for cls in (StattnAttnProcessor, StattnIPAdapterProcessor, SelfAttendExcite):
        fixed = inspect.signature(cls.__call__)
        kept = cls.__call__.__signature__
        try:
            del cls.__call__.__signature__
            computed = inspect.signature(cls.__call__)
        finally:
            cls.__call__.__signature__ = kept
        assert fixed == computed and list(fixed.parameters)[:3] == ["self", "attn", "hidden_states"]
    bound = inspect.signature(StattnAttnProcessor().__call__)
    assert "self" not in bound.parameters and "encoder_hidden_states" in bound.parameters


def test_processor_module_calls_keep_hooks_and_training_dropout():
    """call_module is m(x) where nn.Module.__call__ adds nothing: hooks on to_q / to_out still run,
    a Dropout in training mode still drops, in eval mode the layer equals AttnProcessor2_0's."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from stattn.integration.processors import StattnAttnProcessor, call_module

    attn, x, ctx = _cross_layer()
    fused, stock = StattnAttnProcessor(), AttnProcessor2_0()
    with torch.no_grad():
        torch.testing.assert_close(fused(attn, x, ctx), stock(attn, x, ctx), rtol=1e-5, atol=1e-6)
        seen = []
        hooks = [attn.to_q.register_forward_hook(lambda m, a, o: seen.append("to_q")),
                 attn.to_out[0].register_forward_pre_hook(lambda m, a: seen.append("to_out"))]
        fused(attn, x, ctx)
        assert seen == ["to_q", "to_out"]
        for h in hooks:
            h.remove()
        attn.train()
        y = torch.ones(4, 1000)
        dropped = call_module(attn.to_out[1], y)
        assert 0.3 < (dropped == 0).float().mean() < 0.7          # p = 0.5: about half dropped
        attn.eval()
        assert call_module(attn.to_out[1], y) is y                  # eval: Dropout's identity
    lin = torch.nn.Linear(3, 2)
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(m))
    try:
        call_module(lin, torch.randn(1, 3))
    finally:
        handle.remove()
    assert calls == [lin]                                           # a global hook still runs


def _sdpa_and_op_calls(monkeypatch):
    """(calls of stattn's op from the processors, calls of torch's SDPA from them)."""
    from stattn.integration import processors

    op, sdpa = [], []
    real_op, real_sdpa = processors.region_attention, processors.F.scaled_dot_product_attention
    monkeypatch.setattr(processors, "region_attention", lambda *a, **kw: op.append(1) or real_op(*a, **kw))
    fake_f = type("F", (), {"scaled_dot_product_attention": staticmethod(
        lambda *a, **kw: sdpa.append(1) or real_sdpa(*a, **kw))})
    monkeypatch.setattr(processors, "F", fake_f)
    return op, sdpa


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_bound_plain_calls_run_sdpa_up_to_the_threshold_and_the_op_above(host_bound_sdpa, monkeypatch, dtype):
    """A plain CPU call of at most HOST_BOUND_MACS multiply-adds (B * H * M * N * D) runs SDPA, one
    more runs stattn's op, both equal to AttnProcessor2_0 (values and gradients); counted in sdpa."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from stattn.integration import processors
    from stattn.integration.processors import StattnAttnProcessor

    attn, x, ctx = _cross_layer()
    attn, x, ctx = attn.to(dtype), x.to(dtype), ctx.to(dtype)
    macs = 2 * 2 * 9 * 7 * 16                                  # B, H, M, N, D of _cross_layer
    assert host_bound_sdpa >= macs
    op, sdpa = _sdpa_and_op_calls(monkeypatch)
    stock, fused = AttnProcessor2_0(), StattnAttnProcessor()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    for threshold, want in ((macs, "sdpa"), (macs - 1, "op"), (0, "op")):
        processors.HOST_BOUND_MACS = threshold
        op.clear(), sdpa.clear()
        xs, xf = (x.clone().requires_grad_() for _ in range(2))
        ref, got = stock(attn, xs, ctx), fused(attn, xf, ctx)
        assert (len(sdpa), len(op)) == ((1, 0) if want == "sdpa" else (0, 1)), threshold
        torch.testing.assert_close(got, ref, **tol)
        g = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad(got, xf, g)[0], torch.autograd.grad(ref, xs, g)[0], **tol)
    assert fused.counts.sdpa == 1 and fused.counts.fused == 3


@pytest.mark.parametrize("choice", ["native", "reference"])
def test_host_bound_dispatch_only_on_the_auto_backend(host_bound_sdpa, monkeypatch, choice):
    """STATTN_BACKEND chosen explicitly: every plain call runs stattn's op on that backend."""
    from stattn.integration.processors import StattnAttnProcessor

    if choice == "native":
        from conftest import require_native

        require_native()
    attn, x, ctx = _cross_layer()
    op, sdpa = _sdpa_and_op_calls(monkeypatch)
    monkeypatch.setenv("STATTN_BACKEND", choice)
    with torch.no_grad():
        StattnAttnProcessor()(attn, x, ctx)
    assert (len(sdpa), len(op)) == (0, 1)


def test_host_bound_tiny_pipeline_equals_stock_and_counts_its_sdpa_calls(host_bound_sdpa):
    """The tiny model's every cross-attention call is host-bound: with the shipped threshold the
    accelerated pipeline runs SDPA there (K/V still cached) and equals stock; with 0, the op."""
    from stattn.integration import models, processors

    pipe = models.tiny()
    pipe.set_progress_bar_config(disable=True)

    def latents():
        return pipe("a cat and a frog", num_inference_steps=3, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    stock = latents()
    stattn.accelerate(pipe)
    try:
        got = latents()
        st = stattn.status(pipe)
        evaluations = len(pipe.scheduler.timesteps)                # (PNDM: one more than the steps)
        assert st.fused_calls == st.sdpa_calls == 11 * evaluations  # 11 layers, guidance in one batch
        torch.testing.assert_close(got, stock, rtol=1e-5, atol=1e-5)
        processors.HOST_BOUND_MACS = 0
        again = latents()
        assert stattn.status(pipe).sdpa_calls == st.sdpa_calls and stattn.status(pipe).fused_calls > st.fused_calls
        torch.testing.assert_close(again, stock, rtol=1e-4, atol=1e-5)
    finally:
        stattn.restore(pipe)


def test_host_bound_sdpa_takes_the_stock_processors_scale(host_bound_sdpa, monkeypatch):
    """AttnProcessor uses attn.scale (here 1, scale_qk=False), AttnProcessor2_0 SDPA's D^-1/2: the
    SDPA path of each wrapper equals its stock processor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from stattn.integration.processors import StattnAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, scale_qk=False).eval()
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 7, 24)
    op, sdpa = _sdpa_and_op_calls(monkeypatch)
    with torch.no_grad():
        for stock in (AttnProcessor(), AttnProcessor2_0()):
            torch.testing.assert_close(StattnAttnProcessor(original=stock)(attn, x, ctx), stock(attn, x, ctx),
                                       rtol=1e-5, atol=1e-6)
        classic, sdpa_scaled = (StattnAttnProcessor(original=p)(attn, x, ctx) for p in (AttnProcessor(), AttnProcessor2_0()))
    assert (len(sdpa), len(op)) == (4, 0)
    assert (classic - sdpa_scaled).abs().max() > 1e-3          # the two scales differ: the case tests something
