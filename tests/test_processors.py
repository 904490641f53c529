"""stattn.accelerate: the fused processor equals diffusers' AttnProcessor2_0 under every
convention, falls back for what it does not accelerate, caches K/V, and restores cleanly."""
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import stattn
from stattn.integration.processors import StattnAttnProcessor

TOL = dict(rtol=1e-5, atol=1e-5)


def _attn(**kw):
    torch.manual_seed(0)
    a = Attention(query_dim=kw.pop("query_dim", 32), heads=kw.pop("heads", 2), dim_head=kw.pop("dim_head", 16),
                  processor=AttnProcessor2_0(), **kw).eval()
    return a


def _both(attn, *args, **kwargs):
    stock = attn.processor(attn, *args, **kwargs)
    fused = StattnAttnProcessor("attn2", attn.processor)(attn, *args, **kwargs)
    return stock, fused


CONVENTIONS = {
    "plain": (dict(cross_attention_dim=24), lambda: torch.randn(2, 35, 32)),
    "residual-rescale": (dict(cross_attention_dim=32, residual_connection=True, rescale_output_factor=2.0),
                         lambda: torch.randn(2, 35, 32)),
    "norm_cross": (dict(cross_attention_dim=24, cross_attention_norm="layer_norm"), lambda: torch.randn(2, 35, 32)),
    "group_norm-4d": (dict(cross_attention_dim=24, norm_num_groups=8), lambda: torch.randn(2, 32, 5, 7)),
    "qk_norm": (dict(cross_attention_dim=24, qk_norm="layer_norm"), lambda: torch.randn(2, 35, 32)),
    "head_dim_40": (dict(cross_attention_dim=24, heads=3, dim_head=40), lambda: torch.randn(2, 35, 32)),
}


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_processor_equals_stock(name):
    kw, make = CONVENTIONS[name]
    attn = _attn(**kw)
    x = make()
    ctx = torch.randn(2, 77, kw["cross_attention_dim"])
    with torch.no_grad():
        stock, fused = _both(attn, x, ctx)
    torch.testing.assert_close(fused, stock, **TOL)


def test_spatial_norm_convention():
    attn = _attn(query_dim=32, cross_attention_dim=24, spatial_norm_dim=16)
    x, ctx, temb = torch.randn(2, 32, 4, 4), torch.randn(2, 77, 24), torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        stock, fused = _both(attn, x, ctx, temb=temb)
    torch.testing.assert_close(fused, stock, **TOL)


def test_falls_back_for_self_attention_and_masks():
    attn = _attn(cross_attention_dim=None)
    calls = []

    class Spy(AttnProcessor2_0):
        def __call__(self, *a, **k):
            calls.append(1)
            return super().__call__(*a, **k)

    proc = StattnAttnProcessor("attn1", Spy())
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        proc(attn, x)                                                   # self-attention
        cross = _attn(cross_attention_dim=24)
        proc(cross, x, torch.randn(2, 77, 24), attention_mask=torch.ones(2, 77))
    assert len(calls) == 2


def _tiny_unet(sdxl=False):
    torch.manual_seed(0)
    kw = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
    if sdxl:
        kw.update(cross_attention_dim=64, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=32 + 6 * 8)
    else:
        kw.update(cross_attention_dim=32, attention_head_dim=8)
    return UNet2DConditionModel(**kw).eval()


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd", "sdxl"])
def test_accelerate_unet_equals_stock_and_restores(sdxl):
    unet = _tiny_unet(sdxl)
    x, t = torch.randn(2, 4, 16, 12), torch.tensor(500)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim)
    extra = {}
    if sdxl:
        extra = dict(added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)})
    stock_procs = dict(unet.attn_processors)
    with torch.no_grad():
        stock = unet(x, t, ctx, **extra).sample
        stattn.accelerate(unet)
        n_fused = sum(isinstance(p, StattnAttnProcessor) for p in unet.attn_processors.values())
        fused = unet(x, t, ctx, **extra).sample
    assert n_fused == sum(1 for n in stock_procs if n.endswith("attn2.processor"))
    torch.testing.assert_close(fused, stock, **TOL)
    stattn.restore(unet)
    assert all(unet.attn_processors[n] is p for n, p in stock_procs.items())


def test_kv_projected_once_per_context_and_controller_sees_steps(monkeypatch):
    unet = _tiny_unet()
    seen = []

    class Record(stattn.Controller):
        def attention(self, call):
            seen.append((call.name, call.step, call.grid, tuple(call.q.shape)))
            return None

    stattn.accelerate(unet, controller=Record())
    to_k_calls = []
    project = stattn.integration.processors.project_kv     # (a hook on to_k would rightly turn the cache off)
    monkeypatch.setattr(stattn.integration.processors, "project_kv", lambda *a: (to_k_calls.append(1), project(*a))[1])
    ctx = torch.randn(2, 77, 32)
    x = torch.randn(2, 4, 16, 12)
    with torch.no_grad():
        for t in (900, 600, 300):
            unet(x, torch.tensor(t), ctx)
    n_layers = sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))
    assert len(to_k_calls) == n_layers                                  # once per layer, not per step
    assert sorted({s for _, s, _, _ in seen}) == [0, 1, 2]
    assert {g for _, _, g, _ in seen} == {(16, 12), (8, 6)}
    assert all(g[0] * g[1] == q[2] for _, _, g, q in seen)
    with torch.no_grad():
        unet(x, torch.tensor(900), ctx)                                 # a new generation restarts the count
    assert seen[-1][1] == 0
    stattn.restore(unet)


def test_controller_output_is_used():
    unet = _tiny_unet()

    class Zero(stattn.Controller):
        def attention(self, call):
            return torch.zeros_like(call.q)

    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        plain = unet(x, torch.tensor(10), ctx).sample
        stattn.accelerate(unet, controller=Zero())
        zeroed = unet(x, torch.tensor(10), ctx).sample
    assert not torch.allclose(plain, zeroed)


def test_accelerate_rejects_non_unets():
    with pytest.raises(TypeError, match="expected a diffusers pipeline or UNet"):
        stattn.accelerate(torch.nn.Linear(2, 2))
