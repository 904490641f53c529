"""The call-signature cache on the stock processors accelerate leaves in place (self-attention):
inspect gets the answer it computes from the code (also after the class's ``__call__`` is replaced),
diffusers filters and warns about cross_attention_kwargs as without it, a call through it is the
processor's, copies and pickles stay correct, only stateless stock processors get it, processors
installed later get it at the next UNet call, and restore removes every one it added."""
import copy
import inspect
import logging
import pickle

import pytest
import torch
from diffusers.models.attention_processor import (
    Attention, AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0, SlicedAttnProcessor)

import stattn
from stattn.integration import models, signatures
from stattn.integration.signatures import SignedCall


def computed(proc):
    """inspect's answer without any cache: the class's __call__ bound to proc."""
    return inspect.signature(type(proc).__call__.__get__(proc, type(proc)))


def signed_count(unet):
    return sum(type(vars(m.processor).get("__call__")) is SignedCall
               for _, m in unet.named_modules() if hasattr(m, "processor") and hasattr(m.processor, "__dict__"))


def self_attention(unet):
    return [m for _, m in unet.named_modules() if hasattr(m, "processor") and not m.is_cross_attention]


@pytest.fixture
def unet():
    return models.tiny(0).unet


def _layer():
    torch.manual_seed(0)
    return Attention(query_dim=32, heads=2, dim_head=16).eval(), torch.randn(2, 9, 32)


@pytest.mark.parametrize("cls", [AttnProcessor2_0, AttnProcessor])
def test_signed_processor_answers_inspect_as_the_code_does_and_calls_itself(cls):
    proc = cls()
    stock_sig = inspect.signature(proc.__call__)
    assert signatures.sign(proc) and not signatures.sign(proc)        # once
    assert inspect.signature(proc.__call__) == stock_sig == computed(proc)
    assert list(stock_sig.parameters)[:2] == ["attn", "hidden_states"]
    attn, x = _layer()
    with torch.no_grad():
        torch.testing.assert_close(proc.__call__(attn, x), cls()(attn, x), rtol=0, atol=0)
    signatures.unsign(proc)
    assert "__call__" not in vars(proc)


def test_signed_signature_follows_a_replaced_class_call(monkeypatch):
    proc = AttnProcessor2_0()
    signatures.sign(proc)

    def other(self, attn, hidden_states, extra=None):
        return hidden_states

    monkeypatch.setattr(AttnProcessor2_0, "__call__", other)
    assert list(inspect.signature(proc.__call__).parameters) == ["attn", "hidden_states", "extra"]
    x = torch.randn(1, 2, 3)
    assert proc.__call__(None, x) is x


def test_only_stateless_stock_processors_are_signed():
    class Own(AttnProcessor2_0):
        pass

    stateful = AttnProcessor2_0()
    stateful.note = 1
    for proc in (Own(), stateful, SlicedAttnProcessor(2), IPAdapterAttnProcessor2_0(32, 32)):
        assert not signatures.signable(proc) and not signatures.sign(proc)
        assert "__call__" not in vars(proc)


def test_copies_and_pickles_of_a_signed_processor():
    proc = AttnProcessor2_0()
    signatures.sign(proc)
    deep = copy.deepcopy(proc)
    assert vars(deep)["__call__"].proc is deep                          # its own, not the original's
    loaded = pickle.loads(pickle.dumps(proc))
    assert vars(loaded)["__call__"].proc is loaded
    shallow = copy.copy(proc)                    # shares the original's: stateless, the same computation
    assert not signatures.signable(shallow) and inspect.signature(shallow.__call__) == computed(shallow)
    attn, x = _layer()
    with torch.no_grad():
        for p in (deep, loaded, shallow):
            torch.testing.assert_close(p.__call__(attn, x), proc(attn, x), rtol=0, atol=0)


def test_cross_attention_kwargs_filtered_and_warned_as_without_the_cache(caplog):
    """Attention.forward drops (and logs) kwargs the processor's signature does not take."""
    attn, x = _layer()
    outs, logs = [], []
    for signed in (False, True):
        proc = AttnProcessor2_0()
        if signed:
            signatures.sign(proc)
        attn.set_processor(proc)
        caplog.clear()
        with caplog.at_level(logging.WARNING), torch.no_grad():
            outs.append(attn(x, bogus=1))
        logs.append([r.getMessage() for r in caplog.records])
    assert logs[0] == logs[1] and any("bogus" in m for m in logs[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_accelerate_signs_the_self_attention_processors_and_restore_removes_them(unet):
    selfs = self_attention(unet)
    kept = [m.processor for m in selfs]
    assert len(selfs) == 11 and signed_count(unet) == 0
    stattn.accelerate(unet)
    assert [m.processor for m in selfs] == kept                  # the same objects stay installed
    assert signed_count(unet) == 11
    assert all(inspect.signature(p.__call__) == computed(p) for p in kept)
    stattn.restore(unet)
    assert signed_count(unet) == 0 and all(vars(p) == {} for p in kept)


def test_processors_installed_later_are_signed_at_the_next_unet_call_and_restored(unet):
    stattn.accelerate(unet)
    replaced = self_attention(unet)[0].processor
    fresh = AttnProcessor()
    self_attention(unet)[0].set_processor(fresh)
    assert "__call__" not in vars(fresh)
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), torch.tensor(500), torch.randn(2, 77, 32))
    assert type(vars(fresh)["__call__"]) is SignedCall
    unet.set_default_attn_processor()            # diffusers' class checks still see stock classes
    assert signed_count(unet) == 11 and len(stattn.status(unet).accelerated) == 11
    stattn.restore(unet)
    assert signed_count(unet) == 0
    assert vars(fresh) == {} and vars(replaced) == {}          # also the ones no longer installed
    stattn.accelerate(unet)                       # again after restore: signed again
    assert signed_count(unet) == 11
    stattn.restore(unet)
