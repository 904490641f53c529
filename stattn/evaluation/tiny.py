"""Tiny random metric models, built from configs and saved as local directories: the offline
stand-ins for `--clip tiny` / `--detector tiny` and for the tests (their scores mean nothing)."""
from __future__ import annotations

from pathlib import Path

import torch

_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def save_clip(folder, seed: int = 0) -> Path:
    """models.tiny_clip() saved with its tokenizer: a CLIPModel directory."""
    from ..integration import models

    model, tok = models.tiny_clip(seed)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def detector(kind: str = "owlv2", seed: int = 0, image_size: int = 64) -> tuple:
    """A random OWLv2 (kind "owlv2") or OWL-ViT ("owlvit") detector on the shipped CLIP
    tokenizer, and its processor."""
    import transformers

    from ..integration import models

    names = {"owlv2": ("Owlv2Config", "Owlv2ForObjectDetection", "Owlv2ImageProcessor", "Owlv2Processor"),
             "owlvit": ("OwlViTConfig", "OwlViTForObjectDetection", "OwlViTImageProcessor", "OwlViTProcessor")}
    if kind not in names:
        raise ValueError(f"kind: expected one of {', '.join(names)}, got {kind!r}")
    config_cls, model_cls, image_cls, proc_cls = (getattr(transformers, n) for n in names[kind])
    tok = models.tokenizer()
    text = dict(_TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, max_position_embeddings=tok.model_max_length)
    vision = dict(_VISION, image_size=image_size, patch_size=16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config_cls(text_config=text, vision_config=vision, projection_dim=32)).eval()
    size = {"height": image_size, "width": image_size}
    extra = {} if kind == "owlv2" else {"crop_size": size, "do_center_crop": False}
    return model, proc_cls(image_processor=image_cls(size=size, **extra), tokenizer=tok)


def save_detector(folder, kind: str = "owlv2", seed: int = 0, image_size: int = 64) -> Path:
    """detector() saved: a transformers OWLv2 / OWL-ViT directory with its processor."""
    model, processor = detector(kind, seed, image_size)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
