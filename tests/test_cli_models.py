"""`stattn generate --model` end to end in each form: a hub repo id offline (a clear one-line
error, or the cached snapshot), a single-file checkpoint the test writes itself, an img2img
directory."""
import huggingface_hub.constants
import numpy as np
import pytest
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image

import ldm_checkpoint
from stattn import cli, models

PROMPT = "a photo of a cat and a frog"
COMMIT = "0123456789abcdef0123456789abcdef01234567"      # a snapshot's name in the Hub cache


def run(*argv):
    return cli.main([str(a) for a in argv])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache under tmp_path, downloads off (huggingface_hub reads its
    constants at call time, the environment at import: both are set)."""
    home = tmp_path / "hf"
    for name, value in (("HF_HOME", home), ("HF_HUB_CACHE", home / "hub")):
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(huggingface_hub.constants, name, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


def generate(model, out, *extra):
    return run("generate", "--model", model, "--prompt", PROMPT, "--steps", 2, "--seed", 3, "--out", out,
               "--no-progress", "--no-maps", *extra)


def test_a_hub_id_offline_and_not_cached_is_one_line(tmp_path, offline_cache, capsys):
    assert generate("owner/name", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stattn generate: error: --model owner/name: model 'owner/name': not in the local "
                          "Hugging Face cache") and "HF_HUB_OFFLINE=1" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    assert generate("owner/name", tmp_path / "out", "--local-files-only") == 2
    assert "--local-files-only" in capsys.readouterr().err


def test_a_hub_id_in_the_cache_generates_offline(tmp_path, offline_cache):
    repo = offline_cache / "models--owner--tiny"
    models.tiny(seed=2).save_pretrained(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    models.save(models.tiny(seed=2), tmp_path / "dir")
    assert generate("owner/tiny", tmp_path / "hub") == 0
    assert generate(tmp_path / "dir", tmp_path / "local") == 0
    # the same weights and computation: the same pixels (±1 level for a rounding at the boundary)
    assert np.abs(pixels(tmp_path / "hub" / "image_0.png") - pixels(tmp_path / "local" / "image_0.png")).max() <= 1


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_single_file_checkpoint_generates(tmp_path, suffix):
    tiny = models.tiny(seed=1)
    models.save(tiny, tmp_path / "dir")
    path = tmp_path / f"tiny{suffix}"
    (ldm_checkpoint.save_safetensors if suffix == ".safetensors" else ldm_checkpoint.save_ckpt)(tiny, path)
    assert generate(path, tmp_path / "file", "--config", tmp_path / "dir") == 0
    assert generate(tmp_path / "dir", tmp_path / "local") == 0
    assert np.abs(pixels(tmp_path / "file" / "image_0.png") - pixels(tmp_path / "local" / "image_0.png")).max() <= 1


def test_single_file_errors_are_one_line(tmp_path, offline_cache, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    assert generate(garbage, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "is not a checkpoint diffusers can read" in err and "\n" not in err
    ldm_checkpoint.save_safetensors(models.tiny(), tmp_path / "tiny.safetensors")
    assert generate(tmp_path / "tiny.safetensors", tmp_path / "out") == 2     # no --config, offline
    assert "give config=/--config a diffusers directory" in capsys.readouterr().err
    assert generate("tiny", tmp_path / "out", "--config", tmp_path) == 2
    assert "applies to a single-file checkpoint only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_img2img_directory_generates_text_to_image(tmp_path):
    tiny = models.tiny(seed=1)
    StableDiffusionImg2ImgPipeline(**tiny.components, requires_safety_checker=False).save_pretrained(tmp_path / "i2i")
    models.save(tiny, tmp_path / "t2i")
    assert generate(tmp_path / "i2i", tmp_path / "a") == 0
    assert generate(tmp_path / "t2i", tmp_path / "b") == 0
    assert np.abs(pixels(tmp_path / "a" / "image_0.png") - pixels(tmp_path / "b" / "image_0.png")).max() <= 1
