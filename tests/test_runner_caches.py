"""The Runner's caches are never stale: prompt embeddings follow the text encoders' weights (and
are not cached under PEFT layers), CUDA graphs follow processor changes and UNet weights."""
import torch

import stattn
from stattn.integration import models
from stattn.integration.runner import _encoder_key, _weights_key

PROMPT = "a photo of a cat and a frog"


def _stock(pipe, **kw):
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
                **kw).images


def _ran(runner):
    return runner(PROMPT, steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").latents


def test_prompt_cache_follows_text_encoder_edits():
    pipe = models.tiny(0)
    runner = stattn.Runner(pipe, accelerate=False)
    first = _ran(runner)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight.mul_(1.5)    # an in-place edit: a new version
    again = _ran(runner)
    torch.testing.assert_close(again, _stock(pipe), rtol=1e-5, atol=1e-6)
    assert (again - first).abs().max() > 1e-3


def test_prompt_cache_is_off_under_peft_layers():
    peft = __import__("pytest").importorskip("peft")
    pipe = models.tiny(0)
    assert _encoder_key(pipe) is not None
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pipe.text_encoder.add_adapter(config)
    assert _encoder_key(pipe) is None
    runner = stattn.Runner(pipe, accelerate=False)
    a = _ran(runner)
    for m in pipe.text_encoder.modules():                              # a scale change touches no tensor
        if hasattr(m, "scaling") and isinstance(m.scaling, dict):
            m.scaling = {k: 3 * v for k, v in m.scaling.items()}
    b = _ran(runner)
    torch.testing.assert_close(b, _stock(pipe), rtol=1e-5, atol=1e-6)
    assert (a - b).abs().max() > 1e-4


def test_weights_key_changes_with_an_edit_and_a_move():
    pipe = models.tiny(0)
    k0 = _weights_key(pipe.unet)
    assert _weights_key(pipe.unet) == k0
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1.0)
    k1 = _weights_key(pipe.unet)
    assert k1 != k0
    pipe.unet.to(torch.float64)
    assert _weights_key(pipe.unet) != k1
