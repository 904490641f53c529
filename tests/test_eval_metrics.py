"""stattn eval's metrics on hand-computed values and on tiny random CLIP / OWLv2 / OWL-ViT models."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stattn.integration import models
from stattn.evaluation import metrics as M, tiny
from stattn.methods.spacetime.controller import CLIP_MEAN, CLIP_STD


def test_cosine_and_min_similarity_by_hand():
    img = torch.tensor([3.0, 0.0])
    objs = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-2.0, 2.0]])
    assert M.cosine(img[None], objs).tolist() == pytest.approx([1.0, 1 / math.sqrt(2), -1 / math.sqrt(2)])
    assert M.min_similarity(img, objs) == pytest.approx(-1 / math.sqrt(2))


def test_relation_holds_by_hand():
    a, b = (0, 0, 10, 10), (20, 30, 40, 50)      # A's centre (5, 5), B's (30, 40): A left of and above B
    assert M.relation_holds(a, b, "left") and M.relation_holds(a, b, "above")
    assert not M.relation_holds(a, b, "right") and not M.relation_holds(a, b, "below")
    assert M.relation_holds(b, a, "right") and M.relation_holds(b, a, "below")
    with pytest.raises(ValueError, match="relation"):
        M.relation_holds(a, b, "behind")


def test_best_boxes_by_hand():
    scores, labels = torch.tensor([0.2, 0.9, 0.5]), torch.tensor([0, 0, 2])
    boxes = torch.tensor([[0.0, 0, 1, 1], [1.0, 1, 2, 2], [3.0, 3, 4, 4]])
    assert M.best_boxes(scores, labels, boxes, 3) == [(pytest.approx(0.9), [1, 1, 2, 2]), None,
                                                      (0.5, [3, 3, 4, 4])]


def test_clip_scores_equal_a_direct_computation():
    model, tok = models.tiny_clip()
    clip = M.Clip((model, tok))
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(224, 224, 3) * 255).astype("uint8"))   # at 224 px no resize
    got = clip.scores(image, "a cat and a dog", ["cat", "dog"])
    x = torch.from_numpy(np.asarray(image, dtype=np.float64) / 255).permute(2, 0, 1)[None]
    x = (x - torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        f = model.get_image_features(pixel_values=x.float())
        f = f if isinstance(f, torch.Tensor) else f.pooler_output
        ids = tok(["a cat and a dog", "a photo of a cat", "a photo of a dog"], padding=True, return_tensors="pt")
        t = model.get_text_features(**ids)
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
    cos = F.cosine_similarity(f.double(), t.double(), dim=-1)
    assert got["clip_score"] == pytest.approx(float(cos[0]), abs=1e-5)
    assert got["min_object_similarity"] == pytest.approx(float(cos[1:].min()), abs=1e-5)
    assert -1 <= got["min_object_similarity"] <= got["clip_score"] + 2


def test_clip_from_a_saved_directory(tmp_path):
    folder = tiny.save_clip(tmp_path / "clip")
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    a = M.Clip(str(folder)).scores(image, "a red cat", ["cat"])
    b = M.Clip(models.tiny_clip()).scores(image, "a red cat", ["cat"])
    assert a == pytest.approx(b, abs=1e-6)


def test_detector_scores_threshold_and_relation(monkeypatch, tmp_path):
    det = M.Detector(tiny.save_detector(tmp_path / "owl"), threshold=0.5)
    boxes = {"cat": (0.6, [0, 0, 10, 10]), "dog": (0.7, [20, 0, 30, 10])}
    monkeypatch.setattr(det, "detect", lambda image, names: [boxes.get(n) for n in names])
    image = Image.new("RGB", (64, 64))
    assert det.scores(image, ["cat", "dog"], ("cat", "left", "dog"))["relation"] == 1.0
    assert det.scores(image, ["cat", "dog"], ("cat", "right", "dog"))["relation"] == 0.0
    s = det.scores(image, ["cat", "dog"])
    assert s["detected"] == 1.0 and "relation" not in s
    boxes["dog"] = (0.4, [20, 0, 30, 10])       # under the threshold
    s = det.scores(image, ["cat", "dog"], ("cat", "left", "dog"))
    assert s["detected"] == 0.0 and s["relation"] == 0.0
    assert det.scores(image, ["cat", "bird"])["detected"] == 0.0     # nothing found for bird


@pytest.mark.parametrize("kind", ["owlv2", "owlvit"])
def test_tiny_detectors_run(tmp_path, kind):
    det = M.Detector(tiny.save_detector(tmp_path / kind, kind), threshold=0.1)
    assert det.kind == kind
    image = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype("uint8"))
    best = det.detect(image, ["cat", "dog"])
    assert len(best) == 2 and all(b is None or (0 <= b[0] <= 1 and len(b[1]) == 4) for b in best)
    s = det.scores(image, ["cat", "dog"], ("cat", "above", "dog"))
    assert s["detected"] in (0.0, 1.0) and s["relation"] in (0.0, 1.0)


def test_a_processor_that_cannot_run_fails_at_construction(tmp_path):
    """transformers' OWLv2 image processor without scipy raises ImportError at its first call: the
    Detector calls it once when built, so the error comes before any image is generated."""
    model, processor = tiny.detector()

    def no_scipy(*args, **kwargs):
        raise ImportError("Owlv2ImageProcessorPil requires the scipy library")

    with pytest.raises(ImportError, match=r"detector given model: its processor cannot run here: .*scipy.*eval"):
        M.Detector((model, no_scipy))
    M.Detector((model, processor))      # the real one runs


def test_detector_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        M.check_detector_dir(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        M.check_detector_dir(tmp_path / "empty")
    folder = tiny.save_clip(tmp_path / "clip")
    with pytest.raises(ValueError, match="'clip' model"):
        M.check_detector_dir(folder)
