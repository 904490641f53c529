"""Stable Diffusion models: tiny random pipelines for tests and demos, full-size random
architectures for benchmarks, and loading of diffusers directories, single-file checkpoints and
Hugging Face Hub repo ids.

Nothing here downloads anything except a Hub repo id (or a single file's configs) that is not
in the Hugging Face cache, and only while downloads are on (not HF_HUB_OFFLINE, not
local_files_only). The tokenizer is a small CLIP BPE vocabulary shipped in
``stattn/data/tokenizer`` (about 300 common prompt words are single tokens; other words split
into sub-word / byte tokens). The full-size configs in ``stattn/configs/<name>/`` are copies of the
published ones (SD 1.5, SD 2-base, SD 2 768-v, SDXL base 1.0).

- :func:`tiny` — a tiny random SD 1.x / SD 2.x / SDXL pipeline, deterministic from ``seed``;
- :func:`full` — the real architecture with random weights (timing does not depend on the values);
- :func:`save` / :func:`load` — a normal diffusers directory (``model_index.json``; load: any
  pipeline class diffusers knows);
- :func:`resolve` — what the ``--model`` option of the ``stattn`` command accepts (also a
  single-file checkpoint and a Hub repo id).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import diffusers
import diffusers.utils.deprecation_utils
import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.errors
import huggingface_hub.utils
import torch
from diffusers import (AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers.loaders import FromSingleFileMixin
from diffusers.loaders.single_file_utils import (LDM_UNET_KEY, SingleFileComponentError, fetch_diffusers_config,
                                                infer_diffusers_model_type, load_single_file_checkpoint)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import DummyObject
from huggingface_hub.utils import httpx as hf_httpx          # httpx under the name huggingface_hub exports
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = ["tiny", "tiny_clip", "random_clip", "full", "save", "load", "resolve", "tokenizer", "TINY_KINDS", "FULL_NAMES",
           "TOKENIZER_DIR", "CONFIGS_DIR", "CHECKPOINT_SUFFIXES"]

PACKAGE_DIR = Path(__file__).resolve().parent.parent   # stattn/: data/ and configs/ ship with the package
TOKENIZER_DIR = PACKAGE_DIR / "data" / "tokenizer"
CONFIGS_DIR = PACKAGE_DIR / "configs"

# diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns); detect which.
_DTYPE_KWARG = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"

PIPELINES = {cls.__name__: cls for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline)}
TEXT_ENCODERS = {cls.__name__: cls for cls in (CLIPTextModel, CLIPTextModelWithProjection)}

# The published model each name reproduces; the pad token is each tokenizer's as published
# (SD 1.5 and SDXL's first tokenizer pad with <|endoftext|>, OpenCLIP's tokenizers with "!").
FULL_NAMES = ("sd15", "sd2-base", "sd2", "sdxl")
EOS = "<|endoftext|>"
_PAD_TOKENS = {
    "sd15": {"tokenizer": EOS},
    "sd2-base": {"tokenizer": "!"},
    "sd2": {"tokenizer": "!"},
    "sdxl": {"tokenizer": EOS, "tokenizer_2": "!"},
}

# A tiny kind takes its scheduler config and tokenizer padding from the full model it imitates.
TINY_KINDS = {"sd": "sd15", "sd2": "sd2", "sdxl": "sdxl"}
_TINY_FORMS = {"tiny": "sd", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}     # resolve()'s names
_TINY_TEXT_WIDTH = 32
_TINY_TIME_EMBED = 8


# ----------------------------------------------------------------------------------------------
# tokenizer and schedulers

def tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """The shipped small CLIP tokenizer (model_max_length 77)."""
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=pad_token, local_files_only=True)


def random_clip(text: Optional[dict] = None, vision: Optional[dict] = None, *, seed: int = 0,
                dtype: torch.dtype = torch.float32, device="cpu", **config):
    """A random-weight transformers ``CLIPModel`` on the shipped tokenizer, and that tokenizer.
    ``text`` / ``vision`` / ``config`` override transformers' CLIPConfig defaults, which are the
    ViT-B/32 architecture (the released spatial-temporal loss model; its cost does not depend on
    the weights)."""
    from transformers import CLIPConfig, CLIPModel

    tok = tokenizer()
    text = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **(text or {}))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision or {}, **config))
    return model.eval().to(device=device, dtype=dtype), tok


def tiny_clip(seed: int = 0, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """A tiny random CLIP (ViT 224 px, patch 32, width 32) and the shipped tokenizer: the loss model
    of spatial-temporal control in tests and demos."""
    return random_clip(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=77, pad_token_id=1),
                       dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=224, patch_size=32),
                       projection_dim=16, seed=seed, dtype=dtype, device=device)


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _base_scheduler(name: str) -> SchedulerMixin:
    config = _read_json(CONFIGS_DIR / name / "scheduler" / "scheduler_config.json")
    return _scheduler_class(config["_class_name"]).from_config(config)


def _scheduler_class(name: str) -> type:
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"scheduler must be a diffusers scheduler class name such as 'DDIMScheduler' or "
                         f"'DPMSolverMultistepScheduler', got {name!r}")
    return cls


def _with_scheduler(pipe: DiffusionPipeline, scheduler) -> DiffusionPipeline:
    """None keeps the pipeline's scheduler; a class (or its name) is built from the pipeline's
    scheduler config so that prediction_type, betas and timestep spacing carry over; an instance
    is used as given."""
    if scheduler is None:
        return pipe
    if isinstance(scheduler, SchedulerMixin):
        pipe.scheduler = scheduler
        return pipe
    if isinstance(scheduler, type):
        if not issubclass(scheduler, SchedulerMixin):
            raise TypeError(f"scheduler must be a diffusers scheduler class, name or instance, got {scheduler!r}")
        cls = scheduler
    elif isinstance(scheduler, str):
        cls = _scheduler_class(scheduler)
    else:
        raise TypeError(f"scheduler must be None, a diffusers scheduler class name, class or instance, "
                        f"got {type(scheduler).__name__}")
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


def _check_dtype(dtype, allow_none: bool = False) -> None:
    if dtype is None and allow_none:
        return
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float16), got {dtype!r}")


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed the generator of `device` without disturbing the caller's random state."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def _pipeline(cls: type, parts: dict, pads: dict, force_zeros_for_empty_prompt: bool = True) -> DiffusionPipeline:
    """Assemble the pipeline with the shipped tokenizer(s); no safety checker, no watermarker."""
    for name, pad in pads.items():
        parts[name] = tokenizer(pad)
    if cls is StableDiffusionPipeline:
        return cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return cls(**parts, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=False)


# ----------------------------------------------------------------------------------------------
# tiny

def _tiny_text_config(hidden_act: str, tok: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=_TINY_TEXT_WIDTH, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                          hidden_act=hidden_act, projection_dim=_TINY_TEXT_WIDTH,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=1)


def _tiny_unet_config(kind: str) -> dict:
    """Two resolutions (latent 8x8 and 4x4) with cross-attention at both and in the mid block."""
    config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(32, 64), norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=_TINY_TEXT_WIDTH)
    if kind == "sd":
        # SD 1.x: `attention_head_dim` is really a head count; head dims 16 and 32 as 40..160 in SD 1.5
        return {**config, "attention_head_dim": 2}
    # SD 2.x / SDXL: per-level head counts, head dim 16 at every level; linear projections
    config = {**config, "attention_head_dim": (2, 4), "use_linear_projection": True}
    if kind == "sdxl":
        config.update(cross_attention_dim=2 * _TINY_TEXT_WIDTH,          # both encoders concatenated
                      transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
                      addition_time_embed_dim=_TINY_TIME_EMBED,
                      # pooled text (projection_dim) + 6 time ids (original size, crop, target size)
                      projection_class_embeddings_input_dim=_TINY_TEXT_WIDTH + 6 * _TINY_TIME_EMBED)
    return config


def _tiny_vae_config(kind: str) -> dict:
    """Four levels as in SD, so the latent is 8x smaller than the image."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                scaling_factor=0.13025 if kind == "sdxl" else 0.18215)


def tiny(seed: int = 0, kind: str = "sd", *, scheduler=None, dtype: torch.dtype = torch.float32,
         device="cpu") -> DiffusionPipeline:
    """A tiny random SD pipeline (64 px images, 8x8 latents), deterministic from `seed`.

    kind: "sd" (SD 1.x-like, epsilon), "sd2" (SD 2.x-like: v-prediction, linear projections,
    per-level head counts) or "sdxl" (StableDiffusionXLPipeline: two text encoders, text_time
    added conditioning). The default scheduler is the imitated model's: PNDM for "sd", DDIM
    (v-prediction) for "sd2", Euler for "sdxl"; `scheduler` may name another diffusers scheduler
    class (built from that config) or be an instance.
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"kind must be one of {sorted(TINY_KINDS)}, got {kind!r}")
    _check_dtype(dtype)
    base = TINY_KINDS[kind]
    tok = tokenizer()
    with _seeded(seed, torch.device("cpu")):      # built on the CPU in fp32: same weights everywhere
        parts = dict(unet=UNet2DConditionModel(**_tiny_unet_config(kind)),
                     vae=AutoencoderKL(**_tiny_vae_config(kind)))
        # OpenAI CLIP (SD 1.x, SDXL's first encoder) uses quick_gelu, OpenCLIP (SD 2.x, SDXL's second) gelu
        parts["text_encoder"] = CLIPTextModel(_tiny_text_config("gelu" if kind == "sd2" else "quick_gelu", tok))
        if kind == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(_tiny_text_config("gelu", tok))
    parts["scheduler"] = _base_scheduler(base)
    for module in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if module in parts:
            parts[module].eval()
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = _pipeline(cls, parts, _PAD_TOKENS[base])
    return _placed(_with_scheduler(pipe, scheduler), device, dtype)


def _placed(pipe: DiffusionPipeline, device, dtype: Optional[torch.dtype]) -> DiffusionPipeline:
    if device is not None:
        pipe.to(torch.device(device))
    if dtype is not None and pipe.unet.dtype != dtype:   # a same-dtype .to() only prints warnings
        pipe.to(dtype=dtype)
    return pipe


# ----------------------------------------------------------------------------------------------
# save / load

def save(pipe: DiffusionPipeline, path: Union[str, os.PathLike]) -> Path:
    """Write `pipe` as a diffusers directory (model_index.json + one folder per component)."""
    if not isinstance(pipe, tuple(PIPELINES.values())):
        raise TypeError(f"pipe must be one of {sorted(PIPELINES)}, got {type(pipe).__name__}")
    path = Path(path)
    pipe.save_pretrained(path)
    return path


_DIRECTORY = ("a diffusers pipeline directory (model_index.json naming a diffusers pipeline class, "
              "one folder per component)")


def _pipeline_class(path: Path) -> type:
    """The diffusers pipeline class `path`'s model_index.json names, after checking what
    ``DiffusionPipeline.from_pretrained`` would otherwise report deep inside (or not at all)."""
    expected = _DIRECTORY
    if not path.exists():
        raise ValueError(f"model directory {path} does not exist; expected {expected}")
    if not path.is_dir():
        raise ValueError(f"model path {path} is not a directory; expected {expected}")
    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"model directory {path} has no model_index.json; expected {expected}")
    try:
        config = _read_json(index)
    except OSError as e:
        raise ValueError(f"{index} cannot be read ({e.strerror or e}); expected {expected}") from None
    except ValueError as e:     # not UTF-8 (UnicodeDecodeError) or not JSON (JSONDecodeError)
        raise ValueError(f"{index} is not a valid model_index.json ({e}); expected {expected}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{index} is not a valid model_index.json (a JSON {type(config).__name__}, not an object); "
                         f"expected {expected}")
    name = config.get("_class_name")
    if name is None:
        raise ValueError(f"{index} names no pipeline class (no \"_class_name\"); expected {expected}")
    cls = _diffusers_pipeline(name, f"model directory {path}")
    _check_components(path, config, cls)
    return cls


def _diffusers_pipeline(name, where: str) -> type:
    """The pipeline class diffusers exports under `name` (as from_pretrained finds it)."""
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if isinstance(cls, DummyObject):     # exported, but a backend it needs is not installed
        raise ValueError(f"{where} holds a {name}, which needs {', '.join(cls._backends)} installed")
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise ValueError(f"{where} holds a pipeline {name!r} that diffusers {diffusers.__version__} does not know; "
                         f"expected {_DIRECTORY}")
    return cls


def _check_components(path: Path, config: dict, cls: type) -> None:
    """Every component model_index.json lists with a class (``"unet": ["diffusers",
    "UNet2DConditionModel"]``; ``[null, null]`` means absent) must have its folder: diffusers
    would otherwise report a config.json missing from the root directory, or load a pipeline
    with the part silently None. And it must list every component `cls` cannot do without."""
    missing = [f"{key}/ ({spec[1]})" for key, spec in config.items()
               if not key.startswith("_") and isinstance(spec, (list, tuple)) and len(spec) == 2
               and spec[0] is not None and spec[1] is not None and not (path / key).is_dir()]
    if missing:
        raise ValueError(f"model directory {path} lacks {', '.join(missing)}, listed in its model_index.json; "
                         "copy the missing component folder(s) into it")
    expected, _ = cls._get_signature_keys(cls)
    unlisted = sorted(set(expected) - set(cls._optional_components) - set(config))
    if unlisted:
        raise ValueError(f"model directory {path}: its model_index.json names {cls.__name__}, which needs the "
                         f"component(s) {', '.join(unlisted)}, not listed there; expected {_DIRECTORY}")


def load(path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None, device=None,
         scheduler=None) -> DiffusionPipeline:
    """Load a local diffusers directory as ``DiffusionPipeline.from_pretrained(path,
    local_files_only=True)`` does: any pipeline class diffusers knows (SD, SDXL, img2img,
    inpainting, ControlNet ...), the class named by its model_index.json."""
    _check_dtype(dtype, allow_none=True)
    path = Path(path)
    _pipeline_class(path)
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, **_dtype_kwargs(dtype))
    return _placed(_with_scheduler(pipe, scheduler), device, None)


def _dtype_kwargs(dtype: Optional[torch.dtype]) -> dict:
    return {_DTYPE_KWARG: dtype} if dtype is not None else {}


# ----------------------------------------------------------------------------------------------
# full-size architectures with random weights

@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Create parameters in `dtype` directly (no fp32 copy to cast: halves the time and memory)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _text_encoder(folder: Path) -> torch.nn.Module:
    config = CLIPTextConfig.from_pretrained(folder, local_files_only=True)
    return TEXT_ENCODERS[config.architectures[0]](config)


def full(name: str, *, dtype: torch.dtype = torch.float16, device="cpu", seed: int = 0,
         scheduler=None) -> DiffusionPipeline:
    """The real architecture of `name` ("sd15", "sd2-base", "sd2" (768 px, v-prediction), "sdxl")
    with random weights, built from the configs in ``stattn/configs/<name>/`` directly on `device`
    in `dtype`, with the shipped tokenizer. For benchmarks (timing does not depend on weight
    values); ``device="meta"`` builds the shapes only."""
    if name not in FULL_NAMES:
        raise ValueError(f"name must be one of {list(FULL_NAMES)}, got {name!r}")
    _check_dtype(dtype)
    folder = CONFIGS_DIR / name
    index = _read_json(folder / "model_index.json")
    device = torch.device(device)
    with _seeded(seed, device), device, _default_dtype(dtype):
        parts = dict(unet=UNet2DConditionModel.from_config(_read_json(folder / "unet" / "config.json")),
                     vae=AutoencoderKL.from_config(_read_json(folder / "vae" / "config.json")))
        for encoder in ("text_encoder", "text_encoder_2"):
            if encoder in index:
                parts[encoder] = _text_encoder(folder / encoder)
    for module in parts.values():
        module.eval()
    parts["scheduler"] = _base_scheduler(name)
    pipe = _pipeline(PIPELINES[index["_class_name"]], parts, _PAD_TOKENS[name],
                     index.get("force_zeros_for_empty_prompt", True))
    return _with_scheduler(pipe, scheduler)


# ----------------------------------------------------------------------------------------------
# single-file checkpoints and Hugging Face Hub repo ids

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin", ".pth")
_CHECKPOINT = ("a single-file checkpoint in the original (LDM / A1111) layout: .safetensors, or a torch "
               ".ckpt / .pt / .bin / .pth state dict")
_SAME_ARCHITECTURE = "give config=/--config a diffusers directory of the same architecture"
# what fetching from the Hub raises (OSError covers HfHubHTTPError, LocalEntryNotFoundError,
# OfflineModeIsEnabled and requests' errors; httpx's and EntryNotFoundError are not OSErrors)
_HUB_ERRORS = (OSError, huggingface_hub.errors.EntryNotFoundError, huggingface_hub.errors.CachedRepoTreeNotFoundError,
               hf_httpx.HTTPError)


def _downloads_off(local_files_only) -> Optional[str]:
    """Why nothing may be downloaded, or None when downloads are on. None follows HF_HUB_OFFLINE
    as huggingface_hub holds it (looked up now, not at import)."""
    if local_files_only is None:
        return "HF_HUB_OFFLINE=1" if huggingface_hub.constants.HF_HUB_OFFLINE else None
    if not isinstance(local_files_only, bool):
        raise TypeError(f"local_files_only must be None (follow HF_HUB_OFFLINE) or a bool, got {local_files_only!r}")
    return "local_files_only / --local-files-only" if local_files_only else None


def _is_repo_id(model) -> bool:
    """"owner/name" by the Hub's repo-id rules (diffusers hands a repo id to huggingface_hub as is)."""
    if not isinstance(model, str) or model.count("/") != 1:
        return False
    try:
        huggingface_hub.utils.validate_repo_id(model)
    except huggingface_hub.errors.HFValidationError:
        return False
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _hub_failure(what: str, repo_id: str, e: BaseException, off: Optional[str], remedy: str) -> ValueError:
    """One line for what failed fetching `repo_id` (the causes diffusers and huggingface_hub chain)."""
    errors = huggingface_hub.errors
    chain = [e]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 16:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    cache = (f"the local Hugging Face cache (HF_HOME={huggingface_hub.constants.HF_HOME}, "
             f"hub cache {huggingface_hub.constants.HF_HUB_CACHE})")
    if any(isinstance(c, errors.GatedRepoError) for c in chain):
        return ValueError(f"{what}: the Hub repo {repo_id!r} is gated: accept its conditions on huggingface.co and "
                          f"log in (hf auth login); or {remedy}")
    if any(isinstance(c, errors.RepositoryNotFoundError) for c in chain):
        return ValueError(f"{what}: no Hub repo {repo_id!r} (or it is private: log in with hf auth login), and no "
                          f"local path of that name; {remedy}")
    offline = off or ("HF_HUB_OFFLINE=1" if any(isinstance(c, errors.OfflineModeIsEnabled) for c in chain) else None)
    if offline is not None:
        return ValueError(f"{what}: not in {cache} and downloads are off ({offline}); allow downloads, or {remedy}")
    return ValueError(f"{what}: cannot be fetched from the Hugging Face Hub ({_first_line(chain[-1])}) and is not "
                      f"in {cache}; check the network, or {remedy}")


def _load_from_hub(repo_id: str, *, dtype, device, scheduler, local_files_only) -> DiffusionPipeline:
    """``DiffusionPipeline.from_pretrained(repo_id, local_files_only=...)``, its download first so
    that a cache miss or a Hub failure is one clear error, and the directory checks of :func:`load`."""
    off = _downloads_off(local_files_only)
    try:
        folder = DiffusionPipeline.download(repo_id, local_files_only=off is not None)
    except _HUB_ERRORS as e:
        raise _hub_failure(f"model {repo_id!r}", repo_id, e, off, "give a local diffusers directory") from None
    _pipeline_class(Path(folder))
    pipe = DiffusionPipeline.from_pretrained(repo_id, local_files_only=True, **_dtype_kwargs(dtype))
    return _placed(_with_scheduler(pipe, scheduler), device, None)


def _read_checkpoint(path: Path) -> dict:
    """The state dict as diffusers' from_single_file reads it; an error unless diffusers recognises
    a model in it (infer_diffusers_model_type falls back to "v1" for anything, so a "v1" must hold
    the original UNet's weights)."""
    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"model file {path} is not a checkpoint diffusers can read ({_first_line(e)}); "
                         f"expected {_CHECKPOINT}") from None
    if not (isinstance(checkpoint, dict) and checkpoint and all(isinstance(k, str) for k in checkpoint)):
        raise ValueError(f"model file {path} holds a {type(checkpoint).__name__}, not a state dict; "
                         f"expected {_CHECKPOINT}")
    if infer_diffusers_model_type(checkpoint) == "v1" and not any(k.startswith(LDM_UNET_KEY) for k in checkpoint):
        raise ValueError(f"model file {path} holds no model diffusers recognises (no {LDM_UNET_KEY}* UNet weights "
                         f"nor another model type's keys); expected {_CHECKPOINT}")
    return checkpoint


def _single_file_configs(path: Path, config, checkpoint: dict, off: Optional[str]) -> Path:
    """The local diffusers directory with the component configs and tokenizer(s) for `path`:
    `config` when it is a directory; else those files of the Hub repo `config`, or (config None)
    of the repo diffusers' fetch_diffusers_config names for the checkpoint's model type, fetched
    as from_single_file fetches them (json, txt and tokenizer files only)."""
    from diffusers.loaders.single_file import _download_diffusers_model_config_from_hub

    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise TypeError(f"config must be a diffusers directory or a Hub repo id (str or path), got "
                        f"{type(config).__name__}")
    if config is not None and os.path.isdir(config):
        return Path(config)
    if config is None:
        repo_id = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
        what = (f"model file {path}: the component configs and tokenizer(s) of a "
                f"{infer_diffusers_model_type(checkpoint)!r} checkpoint (diffusers takes them from the Hub repo "
                f"{repo_id!r})")
    else:
        repo_id = os.fspath(config)
        if not _is_repo_id(repo_id):
            raise ValueError(f"config {repo_id!r} (for model file {path}) is neither an existing diffusers directory "
                             "nor a Hub repo id ('owner/name')")
        what = f"model file {path}: config {repo_id!r}"
    try:
        folder = _download_diffusers_model_config_from_hub(repo_id, cache_dir=None, revision=None, proxies=None,
                                                           local_files_only=off is not None)
    except _HUB_ERRORS as e:
        raise _hub_failure(what, repo_id, e, off, _SAME_ARCHITECTURE) from None
    return Path(folder)


def _load_single_file(path: Path, *, config, dtype, device, scheduler, local_files_only) -> DiffusionPipeline:
    """``<class>.from_single_file(path, config=..., local_files_only=...)``, the class the config
    directory's model_index.json names (diffusers' own configs for the model type when config is None)."""
    off = _downloads_off(local_files_only)
    checkpoint = _read_checkpoint(path)
    folder = _single_file_configs(path, config, checkpoint, off)
    del checkpoint                       # from_single_file reads it again (memory-mapped where it can)
    try:
        cls = _pipeline_class(folder)
    except ValueError as e:
        raise ValueError(f"model file {path}: its config {folder} is not usable ({e}); {_SAME_ARCHITECTURE}") from None
    if not issubclass(cls, FromSingleFileMixin):
        raise ValueError(f"model file {path}: {cls.__name__} (named by {folder / 'model_index.json'}) has no "
                         f"from_single_file in diffusers; {_SAME_ARCHITECTURE} whose pipeline can load single files")
    try:
        pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=off is not None,
                                    **_dtype_kwargs(dtype))
    except (ValueError, OSError, KeyError, RuntimeError, TypeError, SingleFileComponentError) as e:
        raise ValueError(f"model file {path}: diffusers cannot load it as the {cls.__name__} of config {folder} "
                         f"({_first_line(e)}); {_SAME_ARCHITECTURE} as the checkpoint") from None
    return _placed(_with_scheduler(pipe, scheduler), device, None)


# ----------------------------------------------------------------------------------------------
# --model forms of the stattn command

def resolve(model: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None, device=None,
            scheduler=None, seed: int = 0, local_files_only: Optional[bool] = None,
            config: Union[None, str, os.PathLike] = None) -> DiffusionPipeline:
    """"tiny" / "tiny-sd2" / "tiny-sdxl" → :func:`tiny`; "full:<name>" → :func:`full`; an existing
    directory → :func:`load`; an existing file ending in .safetensors / .ckpt / .pt / .bin / .pth →
    ``from_single_file`` of the pipeline class its configs name; "owner/name" (a Hub repo id) →
    ``DiffusionPipeline.from_pretrained``.

    `seed` only seeds the random models. `dtype` None means each builder's default (float32 tiny,
    float16 full, the stored dtype otherwise). `local_files_only` (hub ids and single files): None
    follows HF_HUB_OFFLINE, True never downloads. `config` (single files only, diffusers' own
    ``config`` argument): a diffusers directory or Hub repo id of the same architecture holding the
    component configs and tokenizer(s); None takes diffusers' default repo for the checkpoint's
    model type (from the Hub cache, or downloaded when downloads are on)."""
    forms = (f"'tiny', 'tiny-sd2', 'tiny-sdxl', 'full:<name>' with name in {list(FULL_NAMES)}, an existing "
             f"diffusers model directory, a single-file checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) or a Hugging "
             f"Face Hub repo id ('owner/name')")
    _downloads_off(local_files_only)                      # its TypeError first, whatever the form
    single_file = (isinstance(model, (str, os.PathLike)) and os.path.isfile(model)
                   and str(model).lower().endswith(CHECKPOINT_SUFFIXES))
    if config is not None and not single_file:
        raise ValueError(f"config (--config) applies to a single-file checkpoint only; model {str(model)!r} is not "
                         f"an existing file ending in {', '.join(CHECKPOINT_SUFFIXES)}")
    if isinstance(model, str) and model in _TINY_FORMS:
        return tiny(seed, _TINY_FORMS[model], scheduler=scheduler, device=device or "cpu",
                    **({"dtype": dtype} if dtype is not None else {}))
    if isinstance(model, str) and model.startswith("full:"):
        name = model[len("full:"):]
        if name not in FULL_NAMES:
            raise ValueError(f"model {model!r}: unknown full-size model {name!r}; expected one of {forms}")
        return full(name, scheduler=scheduler, device=device or "cpu", seed=seed,
                    **({"dtype": dtype} if dtype is not None else {}))
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a str or path ({forms}), got {type(model).__name__}")
    _check_dtype(dtype, allow_none=True)
    if single_file:
        return _load_single_file(Path(model), config=config, dtype=dtype, device=device, scheduler=scheduler,
                                 local_files_only=local_files_only)
    if os.path.isfile(model):
        raise ValueError(f"model file {model} is neither a diffusers model directory nor a single-file checkpoint "
                         f"(a name ending in {', '.join(CHECKPOINT_SUFFIXES)}); expected {forms}")
    if os.path.exists(model):
        return load(model, dtype=dtype, device=device, scheduler=scheduler)
    if _is_repo_id(model):
        return _load_from_hub(model, dtype=dtype, device=device, scheduler=scheduler,
                              local_files_only=local_files_only)
    raise ValueError(f"model {str(model)!r} is neither a known model nor an existing directory; expected {forms}")
