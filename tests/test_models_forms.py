"""The forms of `--model` beyond the tiny / full models: a directory of any pipeline class diffusers
knows (img2img, inpainting ... run by the Runner as their txt2img pipeline), a Hugging Face Hub repo
id (offline: from the cache or one clear error), and a single-file checkpoint in the original
(LDM) layout, which the test writes itself from the tiny model (tests/ldm_checkpoint.py).

Nothing is downloaded: the Hub cache and its settings point into tmp_path, and the one test that
lets huggingface_hub go online points it at a local address."""
import http.server
import json
import threading

import huggingface_hub.constants
import huggingface_hub.hf_api
import numpy as np
import pytest
import torch
from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline,
                       StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES, convert_ldm_clip_checkpoint,
                                                 convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                 infer_diffusers_model_type)

import ldm_checkpoint
from stattn.integration import models
from stattn.integration.runner import Runner

PROMPT = "a red cat on the left"
COMMIT = "0123456789abcdef0123456789abcdef01234567"       # a snapshot's name in the Hub cache: 40 hex digits


def _runner(model, **kw):
    """The Runner on the stock attention processors: what is under test is the loading, and the
    fused processors (tested elsewhere) are slow under the Triton interpreter of a CPU-only run."""
    return Runner.from_pretrained(model, accelerate=False, **kw)


def _images(runner, seed=3):
    return runner(PROMPT, steps=2, seed=seed, output_type="np").images


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _assert_same_models(pipe, expected, names=("unet", "vae", "text_encoder", "text_encoder_2")):
    for name in names:
        if getattr(expected, name, None) is not None:
            assert _same_state(getattr(pipe, name), getattr(expected, name)), name


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """The tiny SD and SDXL models saved as txt2img directories, and the same components saved as
    other pipeline classes."""
    root = tmp_path_factory.mktemp("models")
    sd, xl = models.tiny(seed=1), models.tiny(seed=1, kind="sdxl")
    models.save(sd, root / "sd")
    models.save(xl, root / "sdxl")
    StableDiffusionImg2ImgPipeline(**sd.components, requires_safety_checker=False).save_pretrained(root / "sd-img2img")
    StableDiffusionInpaintPipeline(**sd.components, requires_safety_checker=False).save_pretrained(root / "sd-inpaint")
    StableDiffusionXLImg2ImgPipeline(**xl.components, add_watermarker=False).save_pretrained(root / "sdxl-img2img")
    StableDiffusionXLImg2ImgPipeline(**xl.components, add_watermarker=False,      # flagged as an SDXL refiner
                                     requires_aesthetics_score=True).save_pretrained(root / "sdxl-refiner")
    StableDiffusionInstructPix2PixPipeline(**sd.components, requires_safety_checker=False).save_pretrained(
        root / "sd-pix2pix")
    unet9 = UNet2DConditionModel(**{**models._tiny_unet_config("sd"), "in_channels": 9})     # an inpainting UNet
    StableDiffusionInpaintPipeline(**{**sd.components, "unet": unet9},
                                   requires_safety_checker=False).save_pretrained(root / "sd-inpaint9")
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache under tmp_path; huggingface_hub reads its constants at call time,
    the environment only at import, so both are set."""
    home = tmp_path / "hf"
    for name, value in (("HF_HOME", home), ("HF_HUB_CACHE", home / "hub")):
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(huggingface_hub.constants, name, str(value))
    return home / "hub"


def _offline(monkeypatch, on: bool = True):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if on else "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", on)


def _cache_repo(cache, repo_id: str, pipe) -> None:
    """`pipe` saved as the snapshot `main` points at, in the Hub cache layout."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    pipe.save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


# ----------------------------------------------------------------------------------------------
# directories of any pipeline class

@pytest.mark.parametrize("folder,cls,txt2img", [
    ("sd-img2img", StableDiffusionImg2ImgPipeline, "sd"),
    ("sd-inpaint", StableDiffusionInpaintPipeline, "sd"),
    ("sdxl-img2img", StableDiffusionXLImg2ImgPipeline, "sdxl"),
])
def test_other_pipeline_classes_load_and_run_as_txt2img(tiny_dirs, folder, cls, txt2img):
    pipe = models.load(tiny_dirs / folder)
    assert type(pipe) is cls
    _assert_same_models(pipe, models.load(tiny_dirs / txt2img))
    runner = _runner(tiny_dirs / folder)
    expected_cls = StableDiffusionXLPipeline if txt2img == "sdxl" else StableDiffusionPipeline
    assert type(runner.pipe) is expected_cls
    # The same weights through the same loop: equal up to the kernels' choice of summation order
    # (8 ulp of 1.0 in fp32; a wrong component or config moves pixels by 1e-2 and more).
    got, expected = _images(runner), _images(_runner(tiny_dirs / txt2img))
    assert np.abs(got - expected).max() <= 1e-6
    assert np.abs(_images(runner, seed=4) - expected).max() > 1e-2       # another seed, another image


def test_txt2img_conversion_shares_the_components(tiny_dirs):
    pipe = models.load(tiny_dirs / "sd-img2img")
    text2image = Runner._text2image(pipe)
    assert type(text2image) is StableDiffusionPipeline
    assert all(getattr(text2image, k) is v for k, v in pipe.components.items() if k in text2image.components)


@pytest.mark.parametrize("folder,words", [
    ("sd-pix2pix", "StableDiffusionInstructPix2PixPipeline runs another loop"),
    ("sd-inpaint9", "StableDiffusionInpaintPipeline has a UNet of 9 input channels"),
    ("sdxl-refiner", r"StableDiffusionXLImg2ImgPipeline \(requires_aesthetics_score, an SDXL refiner\)"),
])
def test_pipelines_without_a_txt2img_runner_are_rejected(tiny_dirs, folder, words):
    assert type(models.load(tiny_dirs / folder)).__name__ == words.split()[0]      # loads as itself
    with pytest.raises(TypeError, match=words):
        _runner(tiny_dirs / folder)


def test_directory_errors(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "NoSuchPipeline"}))
    with pytest.raises(ValueError, match=r"holds a pipeline 'NoSuchPipeline' that diffusers [\d.]+\S* does not know"):
        models.load(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionImg2ImgPipeline"}))
    with pytest.raises(ValueError, match=r"names StableDiffusionImg2ImgPipeline, which needs the component\(s\) "
                                         r"scheduler, text_encoder, tokenizer, unet, vae, not listed there"):
        models.load(tmp_path)


# ----------------------------------------------------------------------------------------------
# Hub repo ids

def test_hub_id_offline_and_not_cached(hub_cache, monkeypatch):
    _offline(monkeypatch)
    cache = f"the local Hugging Face cache (HF_HOME={hub_cache.parent}, hub cache {hub_cache})"
    with pytest.raises(ValueError) as info:
        models.resolve("owner/name")
    assert str(info.value) == (f"model 'owner/name': not in {cache} and downloads are off (HF_HUB_OFFLINE=1); "
                               "allow downloads, or give a local diffusers directory")
    assert info.value.__cause__ is None and info.value.__suppress_context__        # no chain through the hub
    _offline(monkeypatch, False)
    with pytest.raises(ValueError, match=r"downloads are off \(local_files_only / --local-files-only\)"):
        _runner("owner/name", local_files_only=True)


def test_hub_id_from_the_cache_offline(hub_cache, monkeypatch):
    _offline(monkeypatch)
    _cache_repo(hub_cache, "owner/tiny", models.tiny(seed=2))
    pipe = models.resolve("owner/tiny")
    assert type(pipe) is StableDiffusionPipeline and pipe.config._name_or_path == "owner/tiny"
    _assert_same_models(pipe, models.tiny(seed=2))
    _offline(monkeypatch, False)                      # local_files_only alone keeps it offline too
    runner = _runner("owner/tiny", local_files_only=True)
    img = _images(runner)
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all() and img.std() > 0


class _RepoNotFound(http.server.BaseHTTPRequestHandler):
    """What the Hub answers for a repo that does not exist (or that the caller may not see)."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint(monkeypatch):
    """Point huggingface_hub at `url` (its module-level client captured the endpoint at import)."""
    def point(url):
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)
    return point


def test_hub_id_without_network(hub_cache, monkeypatch, endpoint):
    _offline(monkeypatch, False)
    endpoint("http://127.0.0.1:9")                    # the discard port: connection refused
    with pytest.raises(ValueError, match=r"^model 'owner/name': cannot be fetched from the Hugging Face Hub "
                                         r"\(ConnectionRefusedError: .*\) and is not in the local Hugging Face cache "
                                         r".*; check the network, or give a local diffusers directory$") as info:
        models.resolve("owner/name")
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_hub_id_not_found(hub_cache, monkeypatch, endpoint):
    _offline(monkeypatch, False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RepoNotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(ValueError) as info:
            models.resolve("owner/name", local_files_only=False)
    finally:
        server.shutdown()
        server.server_close()
    assert str(info.value) == ("model 'owner/name': no Hub repo 'owner/name' (or it is private: log in with hf auth "
                               "login), and no local path of that name; give a local diffusers directory")


@pytest.mark.parametrize("model", ["owner/name/extra", "owner//name", "-owner/name", "owner/na me"])
def test_strings_that_are_no_repo_id_keep_the_unknown_model_error(model, hub_cache):
    with pytest.raises(ValueError, match="is neither a known model nor an existing directory; expected 'tiny'"):
        models.resolve(model)


def test_bad_keywords(tmp_path):
    with pytest.raises(TypeError, match="local_files_only must be None"):
        models.resolve("tiny", local_files_only="yes")
    with pytest.raises(ValueError, match=r"config \(--config\) applies to a single-file checkpoint only"):
        models.resolve("tiny", config=str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is neither a diffusers model directory nor a single-file checkpoint"):
        models.resolve(tmp_path / "notes.txt")


# ----------------------------------------------------------------------------------------------
# single-file checkpoints

def test_ldm_layout_is_what_diffusers_converts_at_sd15_scale():
    """The helper's layout at SD 1.5's own architecture (meta tensors: names and shapes only):
    diffusers' detection keys are where diffusers looks, and its converters give every parameter
    back under its own name."""
    pipe = models.full("sd15", device="meta")
    state = ldm_checkpoint.sd_state_dict(pipe)
    assert CHECKPOINT_KEY_NAMES["v1"] in state and CHECKPOINT_KEY_NAMES["clip"] in state
    # where the released SD 1.5 checkpoint keeps what diffusers' converters would also accept
    # elsewhere: the upsamplers after the attention (none in the lowest-resolution level), the VAE
    # levels numbered from the highest resolution, its attention as 1x1 convolutions
    for key in ("output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
                "input_blocks.3.0.op.weight", "input_blocks.7.1.proj_in.weight", "middle_block.2.in_layers.0.bias"):
        assert ldm_checkpoint.UNET_PREFIX + key in state, key
    for key in ("decoder.up.3.upsample.conv.weight", "decoder.up.0.block.0.nin_shortcut.weight",
                "encoder.down.0.downsample.conv.weight", "encoder.down.1.block.0.nin_shortcut.weight"):
        assert ldm_checkpoint.VAE_PREFIX + key in state, key
    assert state[ldm_checkpoint.VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert infer_diffusers_model_type(state) == "v1"
    for name, back in (("unet", convert_ldm_unet_checkpoint(state, pipe.unet.config)),
                       ("vae", convert_ldm_vae_checkpoint(state, pipe.vae.config)),
                       ("text_encoder", {k.removeprefix("text_model."): v
                                         for k, v in convert_ldm_clip_checkpoint(state).items()})):
        own = getattr(pipe, name).state_dict()
        assert back.keys() == own.keys(), name
        assert all(back[k].shape == own[k].shape for k in own), name


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint(tiny_dirs, tmp_path, suffix):
    tiny = models.tiny(seed=1)                         # what tiny_dirs / "sd" holds
    path = tmp_path / f"tiny{suffix}"
    (ldm_checkpoint.save_safetensors if suffix == ".safetensors" else ldm_checkpoint.save_ckpt)(tiny, path)
    pipe = models.resolve(path, config=tiny_dirs / "sd")
    assert type(pipe) is StableDiffusionPipeline
    _assert_same_models(pipe, tiny, ("unet", "vae", "text_encoder"))    # a rename: exact
    assert type(pipe.scheduler) is type(tiny.scheduler) and pipe.tokenizer.pad_token == tiny.tokenizer.pad_token
    runner = _runner(path, config=tiny_dirs / "sd", dtype=torch.float64)
    assert runner.dtype == torch.float64


def test_single_file_with_a_hub_config_from_the_cache(tiny_dirs, tmp_path, hub_cache, monkeypatch):
    _offline(monkeypatch)
    tiny = models.tiny(seed=1)
    _cache_repo(hub_cache, "owner/tiny-configs", tiny)
    ldm_checkpoint.save_safetensors(tiny, tmp_path / "tiny.safetensors")
    pipe = models.resolve(tmp_path / "tiny.safetensors", config="owner/tiny-configs")
    _assert_same_models(pipe, tiny, ("unet", "vae", "text_encoder"))


def test_single_file_errors(tiny_dirs, tmp_path, hub_cache, monkeypatch):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=rf"^model file {garbage} is not a checkpoint diffusers can read \(.*\); "
                                         r"expected a single-file checkpoint in the original \(LDM / A1111\) layout"):
        models.resolve(garbage, config=tiny_dirs / "sd")
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other.safetensors holds no model diffusers recognises \(no "
                                         r"model\.diffusion_model\.\* UNet weights"):
        models.resolve(tmp_path / "other.safetensors")

    path = tmp_path / "tiny.safetensors"
    ldm_checkpoint.save_safetensors(models.tiny(), path)
    _offline(monkeypatch)
    with pytest.raises(ValueError) as info:           # no config: diffusers' default repo, not cached
        models.resolve(path)
    assert str(info.value) == (
        f"model file {path}: the component configs and tokenizer(s) of a 'v1' checkpoint (diffusers takes them "
        f"from the Hub repo 'stable-diffusion-v1-5/stable-diffusion-v1-5'): not in the local Hugging Face cache "
        f"(HF_HOME={hub_cache.parent}, hub cache {hub_cache}) and downloads are off (HF_HUB_OFFLINE=1); allow "
        f"downloads, or give config=/--config a diffusers directory of the same architecture")
    with pytest.raises(ValueError, match=r"config 'owner/missing': not in the local Hugging Face cache"):
        models.resolve(path, config="owner/missing")
    with pytest.raises(ValueError, match=r"diffusers cannot load it as the StableDiffusionXLPipeline of config .*"
                                         r"give config=/--config a diffusers directory of the same architecture"):
        models.resolve(path, config=tiny_dirs / "sdxl")
    with pytest.raises(ValueError, match=r"config 'no/such/dir' \(for model file .*\) is neither an existing "
                                         r"diffusers directory nor a Hub repo id"):
        models.resolve(path, config="no/such/dir")
