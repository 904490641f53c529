"""The fidelity metrics of `stattn eval`; every model is a local directory (never downloaded).

- CLIP score: the cosine similarity of the image's and the prompt's CLIP embeddings, raw (in
  [-1, 1], no ×100 or ×2.5 rescaling), as Attend-and-Excite's metrics/compute_clip_similarity.py
  reports it. Images are resized to the model's input size by exact area averaging
  (spacetime.clip_resize, no crop) and normalised with OpenAI CLIP's mean / std.
- Minimum object similarity: the minimum over the prompt's objects of the image's similarity to
  "a photo of a {object}".
- Detection (OWLv2 / OWL-ViT from transformers): an image counts when every target has a box
  scoring at least the threshold; for a relation prompt, also whether the best boxes' centres
  stand in the stated relation (image coordinates: y grows downwards).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECT_TEMPLATE = "a photo of a {}"
DEFAULT_THRESHOLD = 0.1       # transformers' post-processing default for OWL-ViT / OWLv2
DETECTOR_TYPES = ("owlv2", "owlvit")


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last dimension (broadcasting)."""
    return (F.normalize(a.double(), dim=-1) * F.normalize(b.double(), dim=-1)).sum(-1)


def min_similarity(image: Tensor, objects: Tensor) -> float:
    """min_i cos(image, objects[i]): image [E], objects [n, E]."""
    return float(cosine(image[None], objects).min())


def to_tensor(image) -> Tensor:
    """A PIL image -> [1, 3, H, W] float in [0, 1]."""
    import numpy as np

    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


class Clip:
    """CLIP score and minimum object similarity with a local transformers CLIPModel directory
    (or a (CLIPModel, tokenizer) pair, e.g. models.tiny_clip())."""

    def __init__(self, clip, name: Optional[str] = None):
        from ..methods.spacetime.controller import _load_clip

        self.model, self.tokenizer = _load_clip(clip)
        self.name = name or (os.fspath(clip) if not isinstance(clip, (tuple, list)) else "given CLIPModel")
        self.size = self.model.config.vision_config.image_size
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> Tensor:
        from ..methods.spacetime.controller import _features

        ids = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(**ids)).double()

    @torch.no_grad()
    def image_features(self, image) -> Tensor:
        from ..methods.spacetime.controller import _features, clip_pixels, clip_resize

        x = clip_pixels(clip_resize(to_tensor(image), self.size)).to(self.device, self.dtype)
        return _features(self.model.get_image_features(pixel_values=x))[0].double()

    def scores(self, image, prompt: str, objects: Sequence[str]) -> dict:
        img = self.image_features(image)
        text = self.text_features([prompt] + [OBJECT_TEMPLATE.format(o) for o in objects])
        out = {"clip_score": float(cosine(img, text[0]))}
        if objects:
            out["min_object_similarity"] = min_similarity(img, text[1:])
        return out


def check_detector_dir(folder) -> str:
    """The model_type of a detector directory (owlv2 / owlvit); ValueError naming what is wrong."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"the detector directory {os.fspath(folder)!r} does not exist (expected a local "
                         "transformers OWLv2 / OWL-ViT directory)")
    try:
        kind = json.loads((path / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{os.fspath(folder)!r} has no readable config.json with a model_type ({e})") from e
    if kind not in DETECTOR_TYPES:
        raise ValueError(f"{os.fspath(folder)!r} is a {kind!r} model; expected one of {', '.join(DETECTOR_TYPES)}")
    return kind


def best_boxes(scores: Tensor, labels: Tensor, boxes: Tensor, n: int) -> list:
    """For each of n queries, (score, box) of its highest-scoring detection, or None."""
    out = [None] * n
    for s, lab, box in zip(scores.tolist(), labels.tolist(), boxes.tolist()):
        if out[lab] is None or s > out[lab][0]:
            out[lab] = (s, box)
    return out


def relation_holds(box_a: Sequence[float], box_b: Sequence[float], relation: str) -> bool:
    """Whether A stands `relation` (left / right / above / below) of B, by the boxes' centres
    (boxes as x0, y0, x1, y1 in image coordinates, y downwards)."""
    ax, ay = (box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2
    bx, by = (box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2
    tests = {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}
    if relation not in tests:
        raise ValueError(f"relation: expected one of {', '.join(tests)}, got {relation!r}")
    return tests[relation]


class Detector:
    """Open-vocabulary detection with a local OWLv2 / OWL-ViT directory (model + processor), or a
    (model, processor) pair."""

    def __init__(self, source, threshold: float = DEFAULT_THRESHOLD, name: Optional[str] = None):
        import transformers

        if isinstance(source, (tuple, list)):
            self.model, self.processor = source
            kind = self.model.config.model_type
            if kind not in DETECTOR_TYPES:
                raise ValueError(f"detector: a {kind!r} model; expected one of {', '.join(DETECTOR_TYPES)}")
        else:
            kind = check_detector_dir(source)
            model_cls, proc_cls = {"owlv2": ("Owlv2ForObjectDetection", "Owlv2Processor"),
                                   "owlvit": ("OwlViTForObjectDetection", "OwlViTProcessor")}[kind]
            self.model = getattr(transformers, model_cls).from_pretrained(source, local_files_only=True).eval()
            self.processor = getattr(transformers, proc_cls).from_pretrained(source, local_files_only=True)
        self.name = name or (os.fspath(source) if not isinstance(source, (tuple, list)) else "given model")
        self.kind, self.threshold = kind, float(threshold)
        self._check_processor()

    def _check_processor(self):
        """Preprocess a blank image once, so a processor that cannot run here fails before the first
        generation, not after it (transformers' OWLv2 image processor needs scipy, checked only at
        its first call)."""
        from PIL import Image

        try:
            self.processor(text=[["object"]], images=Image.new("RGB", (32, 32)), return_tensors="pt")
        except ImportError as exc:
            raise ImportError(f"detector {self.name}: its processor cannot run here: {str(exc).strip()}" +
                              ' (stattn\'s eval extra has scipy: pip install "stattn[eval]")') from exc

    @torch.no_grad()
    def detect(self, image, names: Sequence[str]) -> list:
        """(score, box) of the best detection of each name (None: nothing scored above 0)."""
        inputs = self.processor(text=[list(names)], images=image, return_tensors="pt")
        outputs = self.model(**inputs)
        side = max(image.size)      # OWLv2 pads to a square: boxes are relative to the padded image
        size = (side, side) if self.kind == "owlv2" else (image.size[1], image.size[0])
        res = self.processor.post_process_grounded_object_detection(outputs, threshold=0.0, target_sizes=[size])[0]
        return best_boxes(res["scores"], res["labels"], res["boxes"], len(names))

    def scores(self, image, targets: Sequence[str], relation: Optional[Sequence] = None) -> dict:
        best = self.detect(image, targets)
        found = [b is not None and b[0] >= self.threshold for b in best]
        out = {"detected": float(all(found)),
               "detection_scores": {t: (b[0] if b else None) for t, b in zip(targets, best)}}
        if relation is not None:
            a, rel, b = relation
            ia, ib = list(targets).index(a), list(targets).index(b)
            out["relation"] = float(found[ia] and found[ib] and relation_holds(best[ia][1], best[ib][1], rel))
        return out
