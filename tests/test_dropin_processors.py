"""stattn.accelerate as a drop-in on a UNet whose processors change: only the processors stattn
reproduces exactly are replaced (registry; IP-Adapter as one multi-region call), the others stay
and are reported; later changes
(slicing, QKV fusion, set_attn_processor, set_default_attn_processor, a pipeline installing its own
processors) are noticed at the next UNet call; restore puts back only what stattn still runs, also
through torch.compile. Every case is compared with the same UNet without stattn under the same
operations: outputs (fp32: the kernels differ from SDPA by rounding only, ~1e-6 relative through
a dozen layers), fused-call counts, and the processor classes left after restore."""
import copy
import warnings

import pytest
import torch
from diffusers.models.attention_processor import (
    Attention, AttnProcessor, AttnProcessor2_0, CustomDiffusionAttnProcessor2_0, IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0, SlicedAttnProcessor)

import stattn
from stattn.integration import models
from stattn.integration.processors import NotAcceleratedWarning, StattnAttnProcessor, exact_processors, status

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def base():
    return models.tiny(0).unet


@pytest.fixture
def pair(base):
    """(stock, accelerated candidate): two copies of one tiny UNet (11 cross-attention layers)."""
    return copy.deepcopy(base), copy.deepcopy(base)


def _inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 77, 32, generator=g)


X, CTX = _inputs()


def run(unet, ctx=CTX, **kw):
    with torch.no_grad():
        return unet(X, torch.tensor(500), ctx, **kw).sample


def cross_names(unet):
    return [n for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False)]


def classes(unet):
    return {n: type(p) for n, p in unet.attn_processors.items()}


def quiet_accelerate(x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotAcceleratedWarning)
        return stattn.accelerate(x, **kw)


def test_registry_names_the_exactly_reproduced_classes():
    from diffusers.pipelines.deprecated.stable_diffusion_attend_and_excite.pipeline_stable_diffusion_attend_and_excite \
        import AttendExciteAttnProcessor

    assert set(exact_processors()) == {AttnProcessor2_0, AttnProcessor, IPAdapterAttnProcessor2_0,
                                       IPAdapterAttnProcessor, AttendExciteAttnProcessor}
    assert all(e.why for e in exact_processors().values())


@pytest.mark.parametrize("proc_cls,scale_qk", [(AttnProcessor2_0, False), (AttnProcessor, False),
                                               (AttnProcessor, True)])
def test_each_registered_processor_uses_its_own_scale(proc_cls, scale_qk):
    # AttnProcessor2_0 runs SDPA's default head_dim ** -0.5 whatever attn.scale is; AttnProcessor uses attn.scale
    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=24, heads=2, dim_head=16, scale_qk=scale_qk, upcast_attention=True,
                     upcast_softmax=True, processor=proc_cls()).eval()
    x, ctx = torch.randn(2, 35, 32), torch.randn(2, 77, 24)
    with torch.no_grad():
        stock = attn(x, ctx)
        attn.set_processor(StattnAttnProcessor("attn2", attn.processor))
        fused = attn(x, ctx)
    assert attn.processor.counts.fused == 1
    torch.testing.assert_close(fused, stock, **TOL)


def test_accelerate_reports_every_layer_and_counts_fused_calls(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    names = cross_names(unet)
    s = status(unet)
    assert s.accelerated == names and s.left == {} and s.fused_calls == 0
    torch.testing.assert_close(run(unet), run(stock), **TOL)
    torch.testing.assert_close(run(unet), run(stock), **TOL)
    assert status(unet).fused_calls == 2 * len(names) and status(unet).stock_calls == 0
    stattn.restore(unet)
    assert classes(unet) == classes(stock) and status(unet) is None


def test_stock_fallback_for_an_attention_mask_is_counted_and_warned(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    mask = torch.ones(2, 77)
    mask[:, 60:] = 0
    with pytest.warns(NotAcceleratedWarning, match="attention mask"):
        out = run(unet, encoder_attention_mask=mask)
    torch.testing.assert_close(out, run(stock, encoder_attention_mask=mask), **TOL)
    s = status(unet)
    assert s.fused_calls == 0 and s.stock_calls == len(s.accelerated)


def test_nothing_to_accelerate_raises_and_changes_nothing(pair):
    _, unet = pair
    unet.set_attention_slice("auto")
    before = dict(unet.attn_processors)
    with pytest.raises(ValueError, match="SlicedAttnProcessor: sliced attention"):
        stattn.accelerate(unet)
    assert unet.attn_processors == before and not hasattr(unet, "_stattn")
    unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="FusedAttnProcessor2_0: fused K/V"):
        stattn.accelerate(unet)


def test_some_layers_sliced_before_accelerate_are_left_and_reported(pair):
    stock, unet = pair
    sliced = cross_names(unet)[:3]
    for u in (stock, unet):
        mods = dict(u.named_modules())
        for n in sliced:
            mods[n].set_attention_slice(1)
    with pytest.warns(NotAcceleratedWarning, match=r"SlicedAttnProcessor: sliced attention .*" + sliced[0]):
        stattn.accelerate(unet)
    s = status(unet)
    assert sorted(s.left) == sorted(sliced) and len(s.accelerated) == len(cross_names(unet)) - 3
    torch.testing.assert_close(run(unet), run(stock), **TOL)
    assert status(unet).fused_calls == len(s.accelerated)
    stattn.restore(unet)
    assert classes(unet) == classes(stock)


def test_slicing_after_accelerate_is_noticed_then_taken_back(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    for u in (stock, unet):
        u.set_attention_slice("auto")
    with pytest.warns(NotAcceleratedWarning, match="SlicedAttnProcessor"):
        out = run(unet)
    torch.testing.assert_close(out, run(stock), **TOL)
    s = status(unet)
    assert s.accelerated == [] and len(s.left) == len(cross_names(unet)) and s.fused_calls == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotAcceleratedWarning)     # the same left set warns once
        run(unet)
    for u in (stock, unet):
        u.set_attention_slice(None)                                # back to AttnProcessor2_0
    torch.testing.assert_close(run(unet), run(stock), **TOL)
    s = status(unet)
    assert s.left == {} and s.fused_calls == len(s.accelerated)
    stattn.restore(unet)
    assert classes(unet) == classes(stock)


def test_restore_keeps_a_later_slicing(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    for u in (stock, unet):
        u.set_attention_slice("max")
    stattn.restore(unet)                                   # no UNet call in between
    assert classes(unet) == classes(stock)
    assert all(isinstance(unet.attn_processors[n + ".processor"], SlicedAttnProcessor) for n in cross_names(unet))


def test_qkv_fusion_after_accelerate_and_unfuse(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    for u in (stock, unet):
        u.fuse_qkv_projections()
    with pytest.warns(NotAcceleratedWarning, match="FusedAttnProcessor2_0: fused K/V"):
        torch.testing.assert_close(run(unet), run(stock), **TOL)
    assert status(unet).accelerated == []
    for u in (stock, unet):
        u.unfuse_qkv_projections()                          # puts stattn's own processors back
    torch.testing.assert_close(run(unet), run(stock), **TOL)
    s = status(unet)
    assert s.left == {} and s.fused_calls == len(cross_names(unet))
    stattn.restore(unet)
    assert classes(unet) == classes(stock)


def test_restore_while_fused_then_unfuse_gives_the_stock_processors(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    for u in (stock, unet):
        u.fuse_qkv_projections()
    stattn.restore(unet)
    for u in (stock, unet):
        u.unfuse_qkv_projections()
    assert classes(unet) == classes(stock)
    torch.testing.assert_close(run(unet), run(stock), **TOL)


def test_set_attn_processor_after_accelerate(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    for u in (stock, unet):
        u.set_attn_processor(AttnProcessor())                # the classic processor: reproduced too
    torch.testing.assert_close(run(unet), run(stock), **TOL)
    s = status(unet)
    assert s.left == {} and s.fused_calls == len(cross_names(unet))
    assert all(type(unet.attn_processors[n + ".processor"].original) is AttnProcessor for n in cross_names(unet))
    stattn.restore(unet)
    assert classes(unet) == classes(stock)


def test_set_default_attn_processor_on_an_accelerated_unet(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    for u in (stock, unet):
        u.set_default_attn_processor()
    torch.testing.assert_close(run(unet), run(stock), **TOL)
    assert status(unet).left == {}
    stattn.restore(unet)
    assert classes(unet) == classes(stock) and set(classes(unet).values()) == {AttnProcessor}
    assert "set_default_attn_processor" not in vars(unet)


class Halve(AttnProcessor2_0):
    """A user's processor: a subclass with its own __call__ (never taken for its base class)."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 0.5 * super().__call__(attn, hidden_states, *args, **kwargs)


def _custom_diffusion(attn, seed):
    torch.manual_seed(seed)
    proc = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=attn.inner_dim,
                                           cross_attention_dim=attn.cross_attention_dim)
    for p in proc.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return proc


@pytest.mark.parametrize("kind", ["user", "custom_diffusion"])
def test_a_user_or_custom_diffusion_processor_stays_and_is_reported(pair, kind):
    stock, unet = pair
    name = cross_names(unet)[4]
    for u in (stock, unet):
        attn = dict(u.named_modules())[name]
        attn.set_processor(Halve() if kind == "user" else _custom_diffusion(attn, 3))
    match = "Halve: a processor stattn does not reproduce" if kind == "user" else "Custom Diffusion"
    with pytest.warns(NotAcceleratedWarning, match=match):
        stattn.accelerate(unet)
    torch.testing.assert_close(run(unet), run(stock), **TOL)
    s = status(unet)
    assert list(s.left) == [name] and s.fused_calls == len(cross_names(unet)) - 1
    stattn.restore(unet)
    assert classes(unet) == classes(stock)


def test_processors_installed_at_every_call_are_noticed_once(pair):
    # as StableDiffusionAttendAndExcitePipeline does in __call__ (register_attention_control)
    stock, unet = pair
    stattn.accelerate(unet)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            for u in (stock, unet):
                u.set_attn_processor(Halve())
            torch.testing.assert_close(run(unet), run(stock), **TOL)
    ours = [w for w in seen if issubclass(w.category, NotAcceleratedWarning)]
    assert len(ours) == 1 and "Halve" in str(ours[0].message)          # once per change, not per call
    s = status(unet)
    assert s.accelerated == [] and s.fused_calls == 0 and len(s.left) == len(cross_names(unet))
    stattn.restore(unet)
    assert classes(unet) == classes(stock)


def test_a_processor_of_another_accelerate_call_is_taken_for_what_it_stands_for(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    old = dict(unet.attn_processors)
    stattn.accelerate(unet)                    # a new state; the old processors are foreign now
    unet.set_attn_processor(old)
    torch.testing.assert_close(run(unet), run(stock), **TOL)
    assert status(unet).left == {} and status(unet).fused_calls == len(cross_names(unet))
    stattn.restore(unet)
    assert classes(unet) == classes(stock)


def test_a_restored_processor_installed_again_behaves_as_its_stock_one(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    ours = dict(unet.attn_processors)
    stattn.restore(unet)
    unet.set_attn_processor(ours)
    torch.testing.assert_close(run(unet), run(stock), **TOL)
    assert all(p.counts.fused == 0 for p in unet.attn_processors.values() if isinstance(p, StattnAttnProcessor))


def test_default_constructible_as_diffusers_loaders_expect():
    # unload_ip_adapter / load_ip_adapter build `type(processor)()` for the processors they keep
    proc = StattnAttnProcessor()
    assert type(proc.original) is AttnProcessor2_0


def test_torch_compile_then_restore(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    compiled = torch.compile(unet, backend="eager")
    assert status(compiled).left == {}
    stattn.restore(compiled)
    assert classes(unet) == classes(stock) and not hasattr(unet, "_stattn")
    stattn.accelerate(compiled)                # accelerating the compiled module reaches the UNet too
    assert len(status(unet).accelerated) == len(cross_names(unet))
    stattn.restore(compiled)
    assert classes(unet) == classes(stock)


def test_torch_compiled_unet_runs_accelerated(pair):
    stock, unet = pair
    stattn.accelerate(unet)
    compiled = torch.compile(unet, backend="eager")
    torch.testing.assert_close(run(compiled), run(stock), **TOL)
    assert status(compiled).fused_calls == len(cross_names(unet))
    stattn.restore(compiled)
    assert classes(unet) == classes(stock)


def test_pipeline_accelerated_equals_stock():
    stock, pipe = models.tiny(0), models.tiny(0)
    kw = dict(num_inference_steps=2, output_type="np", guidance_scale=5.0)
    stattn.accelerate(pipe)
    pipe.enable_attention_slicing()          # after accelerate: noticed at the first UNet call
    stock.enable_attention_slicing()
    pipe.disable_attention_slicing()
    stock.disable_attention_slicing()
    a = pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    evals = []
    stock.unet.register_forward_pre_hook(lambda *_: evals.append(1))
    b = stock("a cat", generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), **TOL)
    s = status(pipe)
    assert s.left == {} and s.fused_calls == len(evals) * len(s.accelerated)   # PNDM: 3 UNet calls
    stattn.restore(pipe)
    assert classes(pipe.unet) == classes(stock.unet)


# ---------------------------------------------------------------------- IP-Adapter
IMAGE_DIM = 24


def _ip_state_dict(unet, seed):
    """A random IP-Adapter (base: 4 image tokens) in the checkpoint layout diffusers loads."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config.cross_attention_dim
    sd = {"image_proj": {"proj.weight": 0.2 * torch.randn(4 * c, IMAGE_DIM, generator=g),
                         "proj.bias": 0.1 * torch.randn(4 * c, generator=g),
                         "norm.weight": torch.ones(c), "norm.bias": torch.zeros(c)}, "ip_adapter": {}}
    for i, (name, m) in enumerate((n, m) for n, m in unet.named_modules() if n.endswith("attn2")):
        for proj in ("to_k_ip", "to_v_ip"):
            sd["ip_adapter"][f"{2 * i + 1}.{proj}.weight"] = 0.3 * torch.randn(m.inner_dim, c, generator=g)
    return sd


def _with_ip_adapters(pipe, n=2):
    pipe.unet._load_ip_adapter_weights([_ip_state_dict(pipe.unet, s) for s in range(1, n + 1)])
    return pipe


g = torch.Generator().manual_seed(1)
IMAGE_EMBEDS = [torch.randn(2, 2, IMAGE_DIM, generator=g), torch.randn(2, 1, IMAGE_DIM, generator=g)]  # [neg; pos]


def run_ip(pipe, **kw):
    return run(pipe.unet, added_cond_kwargs={"image_embeds": IMAGE_EMBEDS}, **kw)


@pytest.fixture
def ip_pair():
    return _with_ip_adapters(models.tiny(0)), _with_ip_adapters(models.tiny(0))


def _classic(pipe):
    """The same adapters on the non-SDPA IPAdapterAttnProcessor (attn.scale, get_attention_scores)."""
    procs = {}
    for name, p in pipe.unet.attn_processors.items():
        if isinstance(p, IPAdapterAttnProcessor2_0):
            classic = IPAdapterAttnProcessor(p.hidden_size, p.cross_attention_dim, p.num_tokens, p.scale)
            classic.load_state_dict(p.state_dict())
            p = classic
        procs[name] = p
    pipe.unet.set_attn_processor(procs)
    return pipe


@pytest.mark.parametrize("kind", ["sdpa", "classic"])
def test_ip_adapter_scales_per_adapter_and_block_in_one_call(ip_pair, monkeypatch, kind):
    stock, pipe = ip_pair if kind == "sdpa" else map(_classic, ip_pair)
    stattn.accelerate(pipe)
    calls = []
    op = stattn.integration.ip_adapter.region_attention
    monkeypatch.setattr(stattn.integration.ip_adapter, "region_attention", lambda *a, **k: (calls.append(1), op(*a, **k))[1])
    torch.testing.assert_close(run_ip(pipe), run_ip(stock), **TOL)
    for p in (stock, pipe):            # set on stattn's processors: diffusers finds them by isinstance
        p.set_ip_adapter_scale([0.6, {"up": {"block_0": [0.0, 1.0, 0.0]}, "down": 0.3}])
    torch.testing.assert_close(run_ip(pipe), run_ip(stock), **TOL)
    n = len(cross_names(pipe.unet))
    s = status(pipe)
    assert s.left == {} and s.fused_calls == 2 * n and s.stock_calls == 0 and len(calls) == 2 * n
    assert set(pipe.unet.state_dict()) == set(stock.unet.state_dict())     # IP weights under their names
    stattn.restore(pipe)
    assert classes(pipe.unet) == classes(stock.unet)


def test_ip_adapter_masks_with_per_image_scales(ip_pair):
    stock, pipe = ip_pair
    stattn.accelerate(pipe)
    masks = [(torch.rand(1, 2, 64, 64, generator=torch.Generator().manual_seed(2)) > 0.5).float(), None]
    for scales in ([[0.7, 0.4], 0.5], [[0.0, 0.9], 0.0], [[0.0, 0.0], 1.2]):   # zero scales skipped
        for p in (stock, pipe):
            p.set_ip_adapter_scale(scales)
        kw = dict(cross_attention_kwargs={"ip_adapter_masks": masks})
        torch.testing.assert_close(run_ip(pipe, **kw), run_ip(stock, **kw), **TOL)
    s = status(pipe)
    assert s.fused_calls == 3 * len(cross_names(pipe.unet)) and s.stock_calls == 0


def test_ip_adapter_masks_are_not_read_back_and_nan_propagates_as_stock(ip_pair, value_reads):
    """Stock multiplies ip_adapter_masks in unchecked: stattn neither reads them back (a host sync per
    layer call on CUDA) nor raises on a NaN; the NaN reaches the output as it does stock's."""
    stock, pipe = ip_pair
    stattn.accelerate(pipe)
    mask = (torch.rand(1, 2, 64, 64, generator=torch.Generator().manual_seed(3)) > 0.5).float()
    for p in (stock, pipe):
        p.set_ip_adapter_scale([[0.7, 0.4], 0.5])
    kw = dict(cross_attention_kwargs={"ip_adapter_masks": [mask, None]})
    torch.testing.assert_close(run_ip(pipe, **kw), run_ip(stock, **kw), **TOL)
    assert value_reads == [] and status(pipe).fused_calls > 0
    mask[0, 0, :8, :8] = float("nan")
    got, want = run_ip(pipe, **kw), run_ip(stock, **kw)
    assert torch.isnan(want).any() and torch.equal(torch.isnan(got), torch.isnan(want))


def test_ip_adapter_calls_stock_rejects_go_to_stock(ip_pair):
    stock, pipe = ip_pair
    stattn.accelerate(pipe)
    for p in (stock, pipe):
        p.set_ip_adapter_scale([[0.7, 0.4], 0.5])       # per-image scales without masks: stock's TypeError
    for p in (stock, pipe):
        with pytest.raises(TypeError):
            run_ip(p)
    with pytest.raises(ValueError, match="Number of masks"):
        with pytest.warns(NotAcceleratedWarning, match="ip_adapter_masks"):
            run_ip(pipe, cross_attention_kwargs={"ip_adapter_masks": [torch.ones(1, 3, 8, 8), None]})
    assert status(pipe).fused_calls == 0 and status(pipe).stock_calls == 2


def test_ip_adapter_loaded_and_unloaded_after_accelerate():
    stock, pipe = models.tiny(0), models.tiny(0)
    stattn.accelerate(pipe)
    for p in (stock, pipe):
        _with_ip_adapters(p)
    torch.testing.assert_close(run_ip(pipe), run_ip(stock), **TOL)
    assert status(pipe).left == {} and status(pipe).fused_calls == len(cross_names(pipe.unet))
    for p in (stock, pipe):
        p.unload_ip_adapter()
    torch.testing.assert_close(run(pipe.unet), run(stock.unet), **TOL)
    assert status(pipe).left == {} and status(pipe).fused_calls == 2 * len(cross_names(pipe.unet))
    stattn.restore(pipe)
    assert classes(pipe.unet) == classes(stock.unet)


def test_ip_adapter_with_a_controller(ip_pair):
    stock, pipe = ip_pair

    class Plain(stattn.Controller):      # its own text attention: the image prompts are added to it
        def attention(self, call):
            return stattn.region_attention(call.q, call.k, call.v, scale=call.scale)

    stattn.accelerate(pipe, controller=Plain())
    torch.testing.assert_close(run_ip(pipe), run_ip(stock), **TOL)
    stattn.restore(pipe)
