"""The cached text K/V never go stale: every change of a layer's effective K/V projection (PEFT LoRA
adapters through diffusers' peft integration on attn2.to_k / to_v: set_adapters, the `scale` of
cross_attention_kwargs, disable / enable, fuse / unfuse, unload, delete; in-place edits of base or
LoRA weights; dtype moves) gives the output of the same UNet without stattn. The context is one
tensor across calls, as stattn.Runner and a pipeline's denoising loop pass it, so a stale cache
entry would be hit. fp32 tolerance as in test_dropin_processors."""
import copy

import pytest
import torch

import stattn
from stattn.integration import models
from stattn.integration.processors import StattnAttnProcessor, status

peft = pytest.importorskip("peft")   # the LoRA cases need diffusers' PEFT backend
from peft import LoraConfig  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
TARGET = r".*attn2\.to_[kv]"
g = torch.Generator().manual_seed(0)
X, CTX = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)


@pytest.fixture(scope="module")
def base():
    return models.tiny(0).unet


def add_lora(unet, name="a", seed=1):
    torch.manual_seed(seed)                    # init_lora_weights=False: random A and B, so B @ A != 0
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGET, init_lora_weights=False), name)


def run(unet, **kw):
    with torch.no_grad():
        return unet(X.to(unet.dtype), torch.tensor(500), CTX.to(unet.dtype), **kw).sample


def check(stock, unet, **kw):
    torch.testing.assert_close(run(unet, **kw), run(stock, **kw), **TOL)


def procs(unet):
    return [p for p in unet.attn_processors.values() if isinstance(p, StattnAttnProcessor)]


def lora_B(unet, name="a"):
    return [m.lora_B[name].weight for m in unet.modules() if hasattr(m, "lora_B") and name in m.lora_B]


def edit_(tensors, by):
    with torch.no_grad():
        for t in tensors:
            t.add_(by)


OPS = {
    "set_adapters": [lambda u: u.set_adapters(["a"], [0.3])],
    "two_adapters_mixed": [lambda u: add_lora(u, "b", seed=2), lambda u: u.set_adapters(["a", "b"], [0.5, 1.5])],
    "disable_then_enable": [lambda u: u.disable_lora(), lambda u: u.enable_lora()],
    "fuse_then_unfuse": [lambda u: u.fuse_lora(lora_scale=0.7), lambda u: u.unfuse_lora()],
    "fuse_then_unload": [lambda u: (u.fuse_lora(), u.unload_lora())],
    "unload": [lambda u: u.unload_lora()],
    "delete_adapters": [lambda u: u.delete_adapters("a")],
    "edit_lora_weights": [lambda u: edit_(lora_B(u), 0.05)],
    "edit_base_weights": [lambda u: edit_([m.base_layer.weight for m in u.modules() if hasattr(m, "lora_B")], 0.05)],
    "half_round_trip": [lambda u: u.to(torch.float16).to(torch.float32)],
}


@pytest.mark.parametrize("op", list(OPS))
def test_lora_operation_between_calls(base, op):
    stock, unet = copy.deepcopy(base), copy.deepcopy(base)
    for u in (stock, unet):
        add_lora(u)
    stattn.accelerate(unet)
    check(stock, unet)                                  # K/V of CTX computed (and cached where cacheable)
    for step in OPS[op]:
        for u in (stock, unet):
            step(u)
        check(stock, unet)
    check(stock, unet)
    n = len(procs(unet))
    assert n == 11 and status(unet).fused_calls == (2 + len(OPS[op])) * n


def test_lora_scale_in_cross_attention_kwargs(base):
    stock, unet = copy.deepcopy(base), copy.deepcopy(base)
    for u in (stock, unet):
        add_lora(u)
    stattn.accelerate(unet)
    check(stock, unet)
    check(stock, unet, cross_attention_kwargs={"scale": 0.4})
    check(stock, unet)                                  # unscaled again after the call
    assert status(unet).fused_calls == 3 * 11


def test_lora_added_fused_and_unloaded_without_a_call_in_between(base):
    # the cache was filled on plain layers; PEFT's merge edits the base weight through `.data`,
    # unseen by version counters, and unload puts the very same Linear back
    stock, unet = copy.deepcopy(base), copy.deepcopy(base)
    stattn.accelerate(unet)
    check(stock, unet)
    check(stock, unet)
    assert all(p.cache.hits == 1 for p in procs(unet))           # plain layers: the cache is in use
    for u in (stock, unet):
        add_lora(u)
        u.fuse_lora()
        u.unload_lora()
    check(stock, unet)
    assert all(p.cache.hits == 1 for p in procs(unet))           # missed after the change
    check(stock, unet)
    assert all(p.cache.hits == 2 for p in procs(unet))


def test_peft_layers_are_not_cached(base):
    unet = copy.deepcopy(base)
    add_lora(unet)
    stattn.accelerate(unet)
    run(unet)
    run(unet)
    assert all(p.cache.hits == 0 and p.cache.entry is None for p in procs(unet))


@pytest.mark.parametrize("edit", ["add_", "load_state_dict", "float64_and_back"])
def test_plain_weight_changes_between_calls(base, edit):
    stock, unet = copy.deepcopy(base), copy.deepcopy(base)
    stattn.accelerate(unet)
    check(stock, unet)
    if edit == "float64_and_back":
        for dtype in (torch.float64, torch.float32):
            for u in (stock, unet):
                u.to(dtype)
            check(stock, unet)
        return
    for u in (stock, unet):
        ks = [m.to_k for n, m in u.named_modules() if n.endswith("attn2")]
        if edit == "add_":
            edit_([k.weight for k in ks], 0.05)
        else:
            for k in ks:
                k.load_state_dict({"weight": k.weight.detach() * 1.5})
    check(stock, unet)


def test_adapter_weights_changed_in_callback_on_step_end():
    stock, pipe = models.tiny(0), models.tiny(0)
    for p in (stock, pipe):
        add_lora(p.unet)
    stattn.accelerate(pipe)

    def callback(p, i, t, kw):
        p.unet.set_adapters(["a"], [0.25 + i])
        return kw

    kw = dict(num_inference_steps=2, output_type="np", guidance_scale=5.0, callback_on_step_end=callback)
    images = [p("a cat", generator=torch.Generator().manual_seed(0), **kw).images for p in (pipe, stock)]
    torch.testing.assert_close(torch.from_numpy(images[0]), torch.from_numpy(images[1]), **TOL)
    assert status(pipe).fused_calls > 0
