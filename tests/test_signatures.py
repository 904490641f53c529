"""The call-signature cache for the diffusers processors accelerate leaves in place (self-attention):
while held, the class's ``__call__`` carries inspect's own answer, diffusers filters and warns about
cross_attention_kwargs as without it, holds count over accelerate states, the last release removes
it (not a signature someone else set), only diffusers' own functions get it, processors installed
later get it at the next UNet call, and torch.compile still takes the whole UNet in one graph."""
import inspect
import logging

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import stattn
from stattn.integration import models, signatures

CALL = AttnProcessor2_0.__call__


def fixed(cls) -> bool:
    return "__signature__" in cls.__call__.__dict__


def computed(cls):
    """inspect's answer from the code, with any cache out of the way."""
    kept = cls.__call__.__dict__.pop("__signature__", None)
    try:
        return inspect.signature(cls.__call__)
    finally:
        if kept is not None:
            cls.__call__.__signature__ = kept


@pytest.fixture(autouse=True)
def nothing_left_behind():
    assert not fixed(AttnProcessor2_0) and not fixed(AttnProcessor)
    yield
    assert not fixed(AttnProcessor2_0) and not fixed(AttnProcessor) and not signatures._HELD


@pytest.fixture
def unet():
    return models.tiny(0).unet


def self_attention(unet):
    return [m for _, m in unet.named_modules() if hasattr(m, "processor") and not m.is_cross_attention]


def _layer():
    torch.manual_seed(0)
    return Attention(query_dim=32, heads=2, dim_head=16).eval(), torch.randn(2, 9, 32)


@pytest.mark.parametrize("cls", [AttnProcessor2_0, AttnProcessor])
def test_held_signature_is_inspects_own_and_counted_over_holders(cls):
    stock = inspect.signature(cls().__call__)
    a, b = set(), set()
    signatures.hold(cls(), a)
    signatures.hold(cls(), a)                                   # once per holder
    signatures.hold(cls(), b)
    assert fixed(cls) and signatures._HELD[cls.__call__][1] == 2
    assert cls.__call__.__signature__ == computed(cls)
    assert inspect.signature(cls().__call__) == stock and list(stock.parameters)[:2] == ["attn", "hidden_states"]
    signatures.release(a)
    assert fixed(cls) and a == set()
    signatures.release(b)
    assert not fixed(cls)


def test_a_signature_someone_else_set_is_neither_taken_nor_removed():
    mine = inspect.signature(lambda attn, hidden_states: None)
    CALL.__signature__ = mine
    try:
        holder = set()
        signatures.hold(AttnProcessor2_0(), holder)
        assert holder == set() and CALL.__signature__ is mine
    finally:
        del CALL.__signature__
    holder = set()
    signatures.hold(AttnProcessor2_0(), holder)
    CALL.__signature__ = mine                                   # replaced while held: left as it is
    signatures.release(holder)
    assert CALL.__signature__ is mine
    del CALL.__signature__


def test_only_diffusers_own_call_functions_are_held():
    class Own(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, **kwargs):
            return hidden_states

    class Module(torch.nn.Module):                              # nn.Module.__call__: torch's, not held
        pass

    for proc in (Own(), Module(), lambda attn, x: x):
        assert signatures.holdable(proc) is None
    assert signatures.holdable(AttnProcessor2_0()) is CALL


def test_cross_attention_kwargs_filtered_and_warned_as_without_the_cache(caplog):
    """Attention.forward drops (and logs) kwargs the processor's signature does not take."""
    attn, x = _layer()
    attn.set_processor(AttnProcessor2_0())
    outs, logs, holder = [], [], set()
    for held in (False, True):
        if held:
            signatures.hold(attn.processor, holder)
        caplog.clear()
        with caplog.at_level(logging.WARNING), torch.no_grad():
            outs.append(attn(x, bogus=1))
        logs.append([r.getMessage() for r in caplog.records])
    signatures.release(holder)
    assert logs[0] == logs[1] and any("bogus" in m for m in logs[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_accelerate_holds_the_self_attention_signatures_until_the_last_restore(unet):
    other = models.tiny(1).unet
    kept = [m.processor for m in self_attention(unet)]
    assert len(kept) == 11
    stattn.accelerate(unet)
    stattn.accelerate(other)
    assert [m.processor for m in self_attention(unet)] == kept and all(vars(p) == {} for p in kept)
    assert fixed(AttnProcessor2_0) and signatures._HELD[CALL][1] == 2
    stattn.restore(unet)
    assert fixed(AttnProcessor2_0)                              # the other UNet still holds it
    stattn.restore(other)
    assert not fixed(AttnProcessor2_0)


def test_processors_installed_later_are_held_at_the_next_unet_call(unet):
    stattn.accelerate(unet)
    self_attention(unet)[0].set_processor(AttnProcessor())
    assert not fixed(AttnProcessor)
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 77, 32))
    assert fixed(AttnProcessor) and fixed(AttnProcessor2_0)
    unet.set_default_attn_processor()            # diffusers' class checks still see stock classes
    assert len(stattn.status(unet).accelerated) == 11
    stattn.restore(unet)
    assert not fixed(AttnProcessor) and not fixed(AttnProcessor2_0)


def test_torch_compile_takes_the_accelerated_unet_in_one_graph(unet):
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        stock = unet(x, torch.tensor(500), ctx).sample
        stattn.accelerate(unet)
        try:
            compiled = torch.compile(unet, backend="eager", fullgraph=True)
            torch.testing.assert_close(compiled(x, torch.tensor(500), ctx).sample, stock, rtol=1e-5, atol=1e-5)
        finally:
            stattn.restore(unet)
            torch._dynamo.reset()


def test_a_unet_dropped_without_restore_releases_its_hold():
    import gc

    unet = models.tiny(0).unet
    stattn.accelerate(unet)
    assert fixed(AttnProcessor2_0)
    del unet
    gc.collect()
    assert not fixed(AttnProcessor2_0)
