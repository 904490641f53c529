"""docs/writing-a-method.md: its python blocks run as written, and its example method, BoxBoost,
does what the page says.

- The blocks are extracted as tests/test_readme.py extracts them and each runs in a fresh
  namespace (a reader copies one block at a time); the example block's namespace gives the test
  its ``BoxBoost``, ``box_basis`` and tiny pipeline.
- One layer call against plain float64 PyTorch written here (logits, the gain added at the words'
  columns for the pixels inside the box, counted row-major from the grid, softmax, ·v) on a
  non-square grid, with and without guidance, for two prompts whose word sits at different
  columns: float64 to rounding, float32 within the op's tolerance; the unconditional rows and the
  pixels outside the box equal plain attention, the inside does not; the recorded share is the
  reference's.
- Generations on the tiny pipeline: strength 0 is the plain accelerated pipeline; a boost moves the
  word's attention into the box at every boosted step and changes the image; the stock pipeline
  and the Runner give the same latents and shares.
- CUDA-graph mode equals eager (GPU only).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import stattn
from helpers import TOL, rel_err
from stattn.integration.control import CrossAttentionCall, Generation
from test_readme import python_blocks

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-method.md"
PROMPTS = ["a photo of a cat and a frog", "a frog and a big cat"]   # "cat" at key columns 5 and 6


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    """Every block of the page run in its own namespace; returns the example's namespace."""
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 2, "docs/writing-a-method.md: expected the op block and the example block"
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("writing-a-method"))
    try:
        spaces = []
        for line, src in blocks:
            ns = {"__name__": "__doc__"}
            exec(compile(src, f"{DOC.name}:{line}", "exec"), ns)
            spaces.append(ns)
    finally:
        os.chdir(here)
    example = [ns for ns in spaces if "BoxBoost" in ns]
    assert len(example) == 1, "docs/writing-a-method.md: expected one block defining BoxBoost"
    return example[0]


def test_blocks_run_and_the_example_boosts(doc):
    share = doc["boost"].share          # the Runner's run, the last one of the block
    assert share.shape == (3,) and (share > 0.75).all(), share
    assert doc["boost"].columns == [[5]]    # "a photo of a cat ...": SOS a photo of a cat


# ------------------------------------------------------------------------------ one layer call

def _call(doc, dtype, cfg, step, h=5, w=7, H=2, D=8, seed=0):
    """A hand-made layer call for PROMPTS (rows [uncond; cond] with guidance) on an h x w grid; q
    with the processors' strides (a view of [B, M, H * D])."""
    g = torch.Generator().manual_seed(seed)
    B, M, N = len(PROMPTS) * (2 if cfg else 1), h * w, 77
    q = torch.randn(B, M, H * D, generator=g, dtype=torch.float64).to(dtype).view(B, M, H, D).transpose(1, 2)
    k, v = (torch.randn(B, 1, H, N, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    gen = Generation(cfg=cfg, prompts=list(PROMPTS), steps=6, batch=B, source="pipeline", pipeline=doc["pipe"])
    return gen, CrossAttentionCall(name="mid_block.attentions.0.transformer_blocks.0.attn2", attn=None, q=q, k=k,
                                   v=v, context=None, grid=(h, w), step=step, timestep=None, scale=0.4,
                                   step_tensor=torch.tensor(step), generation=gen)


def _reference(call, columns, box, gain, c0):
    """float64 (output [B, H, M, D], the words' probabilities [B, M, T] head-averaged, inside [M])."""
    q, k, v = (t.double() for t in (call.q, call.k[:, 0], call.v[:, 0]))
    h, w = call.grid
    x0, y0, x1, y1 = box
    inside = torch.tensor([y0 <= (m // w + 0.5) / h < y1 and x0 <= (m % w + 0.5) / w < x1 for m in range(h * w)])
    z = torch.einsum("bhmd,bhnd->bhmn", q, k) * call.scale
    for b in range(c0, q.shape[0]):
        for n in columns[b - c0]:
            z[b, :, inside, n] += gain
    p = z.softmax(-1)
    words = torch.stack([p[b].mean(0)[:, columns[b - c0]] for b in range(c0, q.shape[0])])
    return p @ v, words, inside


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_call_equals_the_fp64_reference(doc, dtype, cfg):
    box, strength, steps, step = (0.2, 0.1, 0.75, 0.6), 3.0, 4, 1
    boost = doc["BoxBoost"](["cat"], box, strength=strength, steps=steps)
    gen, call = _call(doc, dtype, cfg, step)
    boost.reset()
    boost.begin_generation(gen)
    assert boost.columns == [[5], [6]]          # per row, from each prompt
    out = boost.attention(call)
    c0 = call.q.shape[0] // 2 if cfg else 0
    expect, words, inside = _reference(call, boost.columns, box, strength * (1 - step / steps), c0)
    assert 0 < inside.sum() < inside.numel()
    assert out.shape == call.q.shape and out.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(out, expect, rtol=0, atol=1e-12)
    else:
        assert rel_err(out, expect) <= TOL[("cpu", dtype)]
    # where it acts and where not: plain attention on the unconditional rows and outside the box
    plain, _, _ = _reference(call, boost.columns, box, 0.0, c0)
    untouched = [(out[:c0], plain[:c0]), (out[c0:, :, ~inside], plain[c0:, :, ~inside])] if cfg else \
        [(out[:, :, ~inside], plain[:, :, ~inside])]
    for got, want in untouched:
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        else:
            assert rel_err(got, want) <= TOL[("cpu", dtype)]
    assert (out[c0:, :, inside].double() - plain[c0:, :, inside]).abs().amax() > 1e-2
    # the recorded share: the words' attention inside the box / anywhere, mean over the images
    share = ((words * inside[:, None]).sum((1, 2)) / words.sum((1, 2))).mean()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(boost.share[step].item() - share.item()) <= tol
    assert torch.isnan(boost.share[:step]).all()     # no call recorded at the other steps (0 / 0)


def test_after_the_boost_attention_is_plain(doc):
    boost = doc["BoxBoost"](["cat"], (0.0, 0.0, 0.5, 0.5), steps=2)
    gen, call = _call(doc, torch.float32, True, step=2)
    boost.begin_generation(gen)
    assert boost.attention(call) is None
    assert [boost.graph_key(s) for s in range(4)] == [True, True, False, False]


@pytest.mark.parametrize("bad,match", [
    (dict(words="cat"), "words"), (dict(box=(0.5, 0.0, 0.2, 1.0)), "box"), (dict(box=(0, 0, 1)), "box"),
    (dict(steps=0), "steps"), (dict(steps=2.0), "steps")])
def test_bad_settings_name_the_argument(doc, bad, match):
    kw = dict(words=["cat"], box=(0.0, 0.0, 0.5, 1.0), steps=2) | bad
    with pytest.raises(ValueError, match=match):
        doc["BoxBoost"](kw.pop("words"), kw.pop("box"), **kw)


def test_a_word_missing_from_the_prompt_is_an_error(doc):
    boost = doc["BoxBoost"](["dog"], (0.0, 0.0, 0.5, 1.0))
    gen, _ = _call(doc, torch.float32, True, step=0)
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        boost.begin_generation(gen)


# ------------------------------------------------------------------------------ generations

@pytest.fixture(scope="module")
def pipe64():
    """The doc's tiny pipeline in float64: two paths that differ only in rounding agree to ~1e-12
    (in float32 the random UNet amplifies the op's 1e-7 differences over the steps)."""
    from stattn.integration import models

    pipe = models.tiny(0, scheduler="DDIMScheduler", dtype=torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock(pipe, prompts, steps=3, **kw):
    return pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
                **kw).images


def test_generation_on_a_stock_pipeline_and_the_runner(doc, pipe64):
    pipe, BoxBoost = pipe64, doc["BoxBoost"]
    box = (0.0, 0.0, 0.5, 1.0)
    stattn.accelerate(pipe)
    plain = _stock(pipe, PROMPTS)
    shares, latents = {}, {}
    for strength in (0.0, 4.0):
        boost = BoxBoost(["cat"], box, strength=strength, steps=2)     # 2 of the 3 steps boosted
        stattn.accelerate(pipe, controller=boost)
        latents[strength] = _stock(pipe, PROMPTS)
        shares[strength] = boost.share.clone()
        status = stattn.status(pipe)
        assert status.stock_calls == 0 and status.fused_calls > 0 and status.controller is boost
    stattn.restore(pipe)
    torch.testing.assert_close(latents[0.0], plain, rtol=1e-10, atol=1e-10)     # strength 0 is plain attention
    assert (shares[4.0] > shares[0.0] + 0.2).all(), shares                     # the word moves into the box
    assert rel_err(latents[4.0], plain.double()) > 1e-3                         # and the image changes
    # the same controller on the Runner: the same latents and shares
    runner = stattn.Runner(pipe)
    boost = BoxBoost(["cat"], box, strength=4.0, steps=2)
    stattn.accelerate(runner, controller=boost)
    ran = runner(PROMPTS, steps=3, generator=torch.Generator().manual_seed(0), output_type="latent").latents
    stattn.restore(runner)
    torch.testing.assert_close(ran, latents[4.0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(boost.share, shares[4.0], rtol=1e-10, atol=1e-10)


def test_without_guidance_every_row_is_boosted(doc, pipe64):
    pipe, BoxBoost = pipe64, doc["BoxBoost"]
    shares = []
    for strength in (0.0, 4.0):
        boost = BoxBoost(["cat"], (0.5, 0.0, 1.0, 1.0), strength=strength, steps=2)
        stattn.accelerate(pipe, controller=boost)
        _stock(pipe, PROMPTS[0], steps=2, guidance_scale=1.0)
        shares.append(boost.share.clone())
    stattn.restore(pipe)
    assert (shares[1] > shares[0] + 0.2).all(), shares


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_equal_eager(doc):
    from stattn.integration import models

    pipe = models.tiny(0, scheduler="DDIMScheduler", dtype=torch.float16, device="cuda")
    pipe.set_progress_bar_config(disable=True)
    out = []
    for graphs in (False, True):
        runner = stattn.Runner(pipe, cuda_graphs=graphs)
        boost = doc["BoxBoost"](["cat"], (0.0, 0.0, 0.5, 1.0), strength=4.0, steps=3)
        stattn.accelerate(runner, controller=boost)
        for _ in range(1 + graphs):             # graphs: capture and replay, then replay only
            lat = runner(PROMPTS, steps=5, seed=0, output_type="latent").latents
            out.append((lat.float(), boost.share.clone()))
        stattn.restore(runner)
    for lat, share in out[1:]:
        torch.testing.assert_close(lat, out[0][0], rtol=0, atol=2e-3)
        torch.testing.assert_close(share, out[0][1], rtol=0, atol=1e-3)
