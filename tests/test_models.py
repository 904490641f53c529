"""Offline models: the shipped tokenizer (and its generator), tiny pipelines, save/load round trips,
the published parameter counts of the full-size configs (meta device), `resolve` and errors.

Regenerate the shipped tokenizer with ``python tests/test_models.py --write-tokenizer``.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTokenizer, CLIPTokenizerFast

from stattn.integration import models

# ~300 common prompt words, each a single token of the shipped vocabulary.
COMMON_WORDS = """
a an the of and or on in at by for from with without to into onto over under above below
beside between behind near next left right top bottom front back side middle center corner
inside outside around across along up down far close this that these those its their his her
is are was were be being has have one two three four five six seven eight nine ten many some
red blue green yellow orange purple pink brown black white gray grey golden silver dark light
bright pale colorful striped wooden metal glass plastic stone paper leather
cat cats dog dogs frog bird birds horse cow sheep pig duck chicken rabbit mouse bear lion tiger
elephant giraffe zebra monkey fox wolf deer fish shark whale turtle snake owl bee butterfly
spider penguin panda squirrel goat camel
car cars bus truck bike bicycle motorcycle train plane boat ship apple apples banana orange
lemon cherry strawberry grape pear cake pizza bread sandwich donut cup mug bowl plate bottle
glass vase chair bench table sofa couch bed lamp clock book books phone laptop computer tv
television umbrella bag backpack hat shirt dress shoe shoes glasses ball kite box basket
flower flowers tree trees plant grass leaf rose sun moon star sky cloud clouds mountain river
lake sea ocean beach sand snow rain forest field road street city house building tower bridge
window door wall floor room kitchen garden park
man woman boy girl child person people baby king queen robot astronaut
photo photograph picture image painting drawing sketch portrait illustration render style art
realistic detailed high quality beautiful cute small big large tiny huge tall short long round
square old new young happy sad wearing holding sitting standing running flying eating playing
lying looking riding
"""


def words() -> list:
    return list(dict.fromkeys(COMMON_WORDS.split()))


def bytes_to_unicode() -> dict:
    """CLIP/GPT-2 byte-level map: every byte to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: list, ranks: dict) -> list:
    """CLIP's BPE: repeatedly merge the lowest-ranked adjacent pair (all its occurrences)."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                out.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def merges_for(word_list: list) -> list:
    """Merges that make every word one token. A word's missing merges are appended (lowest
    priority), which cannot change how the words before it tokenize: those end as one token
    through higher-priority merges before any appended merge could apply."""
    merges, ranks = [], {}
    for w in word_list:
        symbols = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    return merges


def write_tokenizer_files(out_dir) -> Path:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    merges = merges_for(words())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]        # last, as in CLIP: EOS has the largest id
    assert len(set(tokens)) == len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}                # SD pads with EOS
    config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "add_prefix_space": False, "errors": "replace"}
    for name, content in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
        (out_dir / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out_dir


# ----------------------------------------------------------------------------------------------
# tokenizer

def test_shipped_tokenizer_is_the_generated_one(tmp_path):
    write_tokenizer_files(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (models.TOKENIZER_DIR / name).read_bytes(), name


@pytest.mark.parametrize("cls", [CLIPTokenizer, CLIPTokenizerFast])
def test_tokenizer_loads_and_pads_to_77(cls):
    tok = cls.from_pretrained(models.TOKENIZER_DIR)
    vocab = json.loads((models.TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert len(tok) == len(vocab) < 49408                       # ids fit the published text encoders
    assert tok.model_max_length == 77
    sos, eos = tok.bos_token_id, tok.eos_token_id
    assert (sos, eos) == (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (len(vocab) - 2, len(vocab) - 1)
    ids = tok("a red cat on the left", padding="max_length", max_length=tok.model_max_length,
              truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == sos and ids[7] == eos
    assert tok.pad_token_id == eos and ids[8:] == [eos] * 69     # SD 1.x pads with <|endoftext|>
    assert tok.convert_ids_to_tokens(ids[1:7]) == ["a</w>", "red</w>", "cat</w>", "on</w>", "the</w>", "left</w>"]


def test_openclip_style_padding():
    tok = models.tokenizer(pad_token="!")
    ids = tok("a dog", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [tok.bos_token_id, *tok("a dog", add_special_tokens=False).input_ids, tok.eos_token_id]
    assert tok.pad_token_id == tok.convert_tokens_to_ids("!") and ids[4:] == [tok.pad_token_id] * 73


def test_common_words_are_single_tokens():
    tok = models.tokenizer()
    ws = words()
    assert len(ws) >= 280
    ids = tok(ws, add_special_tokens=False).input_ids
    assert [w for w, i in zip(ws, ids) if len(i) != 1] == []
    assert len(set(i[0] for i in ids)) == len(ws)
    # also inside a prompt, with capitals and punctuation
    prompt = tok("A Photo of a red Cat, next to the blue bench.", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(prompt) == ["a</w>", "photo</w>", "of</w>", "a</w>", "red</w>", "cat</w>",
                                                 ",</w>", "next</w>", "to</w>", "the</w>", "blue</w>", "bench</w>",
                                                 ".</w>"]


@pytest.mark.parametrize("word", ["xylophone", "hummingbird", "zzz", "crocodile"])
def test_unknown_words_split_and_round_trip(word):
    tok = models.tokenizer()
    ids = tok(word, add_special_tokens=False).input_ids
    assert len(ids) > 1 and tok.eos_token_id not in ids           # no unknown token
    assert tok.decode(ids) == word


def test_bpe_simulation_matches_tokenizer():
    """The generator's BPE is the tokenizer's: compare on words that are not in the list."""
    tok = models.tokenizer()
    vocab = json.loads((models.TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (models.TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split()): r for r, line in enumerate(lines)}
    for w in ["xylophone", "catdog", "redder", "treehouse", "bluebird"]:
        expected = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        assert tok(w, add_special_tokens=False).input_ids == [vocab[t] for t in expected], w


# ----------------------------------------------------------------------------------------------
# tiny pipelines

def _images(pipe, seed=0, steps=2, prompt="a photo of a red cat", latents=None):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                latents=latents, output_type="np").images


def _latents(seed):
    """x_T of a 64 px tiny-model image, drawn as the pipeline draws it (fp32), to give an fp64 copy."""
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def assert_same_weights(a, b):
    """Every model of pipeline b holds a's parameters bit for bit: saving and loading copies bits."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(a, name, None) is not None:
            sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name


def assert_same_images(got, expected, exact):
    """got, expected: fp32 images of two pipelines holding the same weights; exact: their fp64 copy's.
    Not bit for bit: a loaded copy lays its tensors out otherwise, and BLAS picks its kernels (so its
    summation orders) by layout and CPU. Each fp32 image is its rounding error from the exact one, and
    |expected - exact| measures it; another summation order rounds about as much, so |got - expected|
    <= |got - exact| + |expected - exact| stays within 4 |expected - exact| (the other order's rounding
    up to 3x this one's), plus an ulp of 1 for the final fp32 rounding. A wrong weight, config or
    scheduler moves pixels by 1e-2 and more."""
    bound = 4 * np.abs(expected - exact).max() + np.finfo(np.float32).eps
    assert np.abs(got - expected).max() <= bound, (np.abs(got - expected).max(), bound)


def _attention_heads(unet):
    """{(latent resolution divisor, heads, head dim)} of the cross-attention (attn2) layers."""
    out = set()
    for name, m in unet.named_modules():
        if name.endswith("attn2"):
            level = int(name.split(".")[1]) if name.startswith(("down_blocks", "up_blocks")) else "mid"
            if name.startswith("up_blocks"):
                level = len(unet.up_blocks) - 1 - level
            out.add((level, m.heads, m.to_q.out_features // m.heads))
    return out


@pytest.mark.parametrize("kind,cls,scheduler,prediction,linear,heads", [
    ("sd", StableDiffusionPipeline, "PNDMScheduler", "epsilon", False, {(0, 2, 16), (1, 2, 32), ("mid", 2, 32)}),
    ("sd2", StableDiffusionPipeline, "DDIMScheduler", "v_prediction", True, {(0, 2, 16), (1, 4, 16), ("mid", 4, 16)}),
    ("sdxl", StableDiffusionXLPipeline, "EulerDiscreteScheduler", "epsilon", True,
     {(0, 2, 16), (1, 4, 16), ("mid", 4, 16)}),
])
def test_tiny_architecture(kind, cls, scheduler, prediction, linear, heads):
    pipe = models.tiny(kind=kind)
    assert type(pipe) is cls and type(pipe.scheduler).__name__ == scheduler
    assert pipe.scheduler.config.prediction_type == prediction
    unet = pipe.unet
    assert unet.config.use_linear_projection is linear
    assert _attention_heads(unet) == heads                      # cross-attention at 2 resolutions + mid
    assert unet.config.sample_size * pipe.vae_scale_factor == 64 and pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    for enc in encoders:
        assert enc.config.num_hidden_layers == 2 and enc.config.hidden_size == 32
        assert enc.config.vocab_size == len(pipe.tokenizer) and enc.config.max_position_embeddings == 77
    assert unet.config.cross_attention_dim == 32 * len(encoders)
    if kind == "sdxl":
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert unet.config.addition_embed_type == "text_time"
        assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    img = _images(pipe)
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all() and img.std() > 0


def test_tiny_is_deterministic_from_seed():
    a, b, c = (models.tiny(seed=s).unet.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)                # the same draws from the same seed
    assert not all(torch.equal(a[k], c[k]) for k in a)
    state = torch.random.get_rng_state()
    models.tiny(seed=3)
    assert torch.equal(state, torch.random.get_rng_state())     # the caller's random state is untouched


def test_tiny_dtype_and_bad_arguments():
    pipe = models.tiny(dtype=torch.float64)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float64
    with pytest.raises(ValueError, match="kind must be one of"):
        models.tiny(kind="sd3")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        models.tiny(dtype="float16")
    with pytest.raises(TypeError, match="seed must be an int"):
        models.tiny(seed=1.5)


def test_scheduler_forms():
    pipe = models.tiny(kind="sd2", scheduler="DPMSolverMultistepScheduler")
    assert type(pipe.scheduler) is DPMSolverMultistepScheduler
    assert pipe.scheduler.config.prediction_type == "v_prediction"             # carried over
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    pipe = models.tiny(scheduler=DDIMScheduler)
    assert type(pipe.scheduler) is DDIMScheduler and pipe.scheduler.config.steps_offset == 1
    mine = DDIMScheduler(prediction_type="sample")
    assert models.tiny(scheduler=mine).scheduler is mine                       # an instance is used as is
    with pytest.raises(ValueError, match="scheduler must be a diffusers scheduler class name"):
        models.tiny(scheduler="NoSuchScheduler")
    with pytest.raises(ValueError, match="scheduler must be a diffusers scheduler class name"):
        models.tiny(scheduler="UNet2DConditionModel")
    with pytest.raises(TypeError, match="scheduler must be"):
        models.tiny(scheduler=3)


@pytest.mark.parametrize("kind", ["sd", "sd2", "sdxl"])
@pytest.mark.parametrize("scheduler", [None, "DPMSolverMultistepScheduler"])
def test_save_load_round_trip(tmp_path, kind, scheduler):
    pipe = models.tiny(seed=5, kind=kind, scheduler=scheduler)
    models.save(pipe, tmp_path / "m")
    loaded = models.load(tmp_path / "m", scheduler=scheduler)
    assert type(loaded) is type(pipe) and type(loaded.scheduler) is type(pipe.scheduler)
    assert loaded.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    assert_same_weights(pipe, loaded)
    x_T = _latents(7)
    expected = _images(pipe, latents=x_T)
    exact = _images(models.load(tmp_path / "m", scheduler=scheduler, dtype=torch.float64), latents=x_T.double())
    assert_same_images(_images(loaded, latents=x_T), expected, exact)
    assert np.abs(_images(pipe, latents=_latents(8)) - expected).max() > 1e-2      # another x_T, another image


def test_load_dtype_device(tmp_path):
    models.save(models.tiny(), tmp_path)
    pipe = models.load(str(tmp_path), dtype=torch.float64, device="cpu")
    assert pipe.unet.dtype == torch.float64 and pipe.unet.device.type == "cpu"


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist; expected a diffusers pipeline directory"):
        models.load(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        models.load(tmp_path / "file")
    with pytest.raises(ValueError, match="has no model_index.json"):
        models.load(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match=r"names KandinskyPipeline, which needs the component\(s\) movq, scheduler, "
                                         r"text_encoder, tokenizer, unet, not listed there"):
        models.load(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid model_index.json"):
        models.load(tmp_path)
    with pytest.raises(TypeError, match="pipe must be one of"):
        models.save(object(), tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# full-size configs (meta device: shapes only, nothing allocated)

PUBLISHED = {   # parameter counts of the released checkpoints
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2-base": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("name", models.FULL_NAMES)
def test_full_configs_have_published_parameter_counts(name):
    pipe = models.full(name, device="meta")
    counts = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in PUBLISHED[name]}
    assert counts == PUBLISHED[name]
    assert pipe.unet.device.type == "meta" and pipe.unet.dtype == pipe.text_encoder.dtype == torch.float16
    assert torch.get_default_dtype() == torch.float32                          # restored
    size = {"sd15": 512, "sd2-base": 512, "sd2": 768, "sdxl": 1024}[name]
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == size
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if name == "sd2" else "epsilon")


def test_full_bad_name():
    with pytest.raises(ValueError, match=r"name must be one of \['sd15', 'sd2-base', 'sd2', 'sdxl'\]"):
        models.full("sd3")


# ----------------------------------------------------------------------------------------------
# resolve

def test_resolve_forms(tmp_path):
    assert type(models.resolve("tiny")) is StableDiffusionPipeline
    sd2 = models.resolve("tiny-sd2", seed=2, scheduler="DDIMScheduler")
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert type(models.resolve("tiny-sdxl")) is StableDiffusionXLPipeline
    assert models.resolve("full:sd15", device="meta").unet.config.cross_attention_dim == 768
    models.save(models.tiny(seed=4), tmp_path)
    loaded = models.resolve(str(tmp_path), dtype=torch.float64)
    assert loaded.unet.dtype == torch.float64
    x_T = _latents(0)
    assert_same_images(_images(models.resolve(tmp_path), latents=x_T), _images(models.tiny(seed=4), latents=x_T),
                       _images(loaded, latents=x_T.double()))


@pytest.mark.parametrize("model,exc,words", [
    ("tiny-sd3", ValueError, "neither a known model nor an existing directory; expected 'tiny', 'tiny-sd2'"),
    ("full:sd3", ValueError, "unknown full-size model 'sd3'"),
    ("/no/such/dir", ValueError, "neither a known model nor an existing directory"),
    (3, TypeError, "model must be a str or path"),
])
def test_resolve_errors(model, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        models.resolve(model)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-tokenizer"]:
        sys.exit("usage: python tests/test_models.py --write-tokenizer")
    print(write_tokenizer_files(models.TOKENIZER_DIR))
