"""Layouts: the released disk's check values, boxes, masks, per-grid caching, crops, LLM-style text,
the rule-based object chunker and layout predictor, and bad input."""
import pytest
import torch

from stattn.methods.spacetime.layout import (Box, Centre, Layout, LayoutPredictor, Mask, Phrase, RuleLayoutPredictor, as_region,
                           find_objects, find_phrases, parse_layout_text)

DIMS = (8, 16, 32, 64)


# ------------------------------------------------------------------------------ spec check values

@pytest.mark.parametrize("centre,counts", [((0.5, 0.5), (9, 37, 129, 509)), ((0.1, 0.9), (5, 19, 81, 326)),
                                           ((0.0, 0.0), (4, 13, 39, 140))])
def test_disk_pixel_counts(centre, counts):
    region = Centre(*centre)
    assert tuple(int(region.mask(d, d).sum()) for d in DIMS) == counts


def test_disk_x_is_the_column():
    m = Centre(0.25, 0.5).mask(8, 8)
    rows, cols = m.nonzero(as_tuple=True)
    assert set(rows.tolist()) == {3, 4, 5} and set(cols.tolist()) == {1, 2, 3} and int(m.sum()) == 9


@pytest.mark.parametrize("centre,rows,cols", [((0.5, 0.5), slice(153, 358), slice(153, 358)),
                                              ((0.1, 0.9), slice(358, 512), slice(0, 153))])
def test_clip_crop_slices(centre, rows, cols):
    assert Centre(*centre).crop(512, 512) == (rows, cols)
    assert Layout(["x"], [centre]).crops(512) == [(rows, cols)]


# ------------------------------------------------------------------------------ boxes, masks, layouts

def test_box_mask_cells_whose_centres_are_inside():
    m = Box(0.0, 0.5, 0.5, 1.0).mask(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:, :4] = True
    assert torch.equal(m, expected)
    assert Box(0.1, 0.2, 0.6, 0.9).crop(100, 200) == (slice(20, 90), slice(20, 120))


def test_small_region_gets_the_nearest_cell():
    m = Box(0.30, 0.30, 0.32, 0.32).mask(8, 8)          # contains no cell centre at 8x8
    assert int(m.sum()) == 1 and bool(m[2, 2])
    m = Centre(1.0, 1.0).mask(4, 4)                       # the disk misses every corner point at 4x4
    assert int(m.sum()) == 1 and bool(m[3, 3])
    assert int(Centre(1.0, 1.0).mask(8, 8).sum()) == 1    # the released rule itself: only (7, 7)


def test_user_mask_area_resized():
    full = torch.zeros(64, 64)
    full[:32, 32:] = 1.0                                  # the top-right quarter
    region = Mask(full)
    m = region.mask(8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, 4:] = True
    assert torch.equal(m, expected)
    assert region.centre == pytest.approx((0.75, 0.25))
    assert region.crop(512, 512) == (slice(0, 256), slice(256, 512))
    tiny = torch.zeros(64, 64, dtype=torch.bool)
    tiny[40, 10] = True                                   # 1 pixel: the most covered cell
    assert Mask(tiny).mask(8, 8).nonzero().tolist() == [[5, 1]]


def test_layout_masks_built_once_per_grid():
    layout = Layout(["a cat", "a dog"], [(0.25, 0.5), (0.1, 0.1, 0.4, 0.9)])
    m8 = layout.masks((8, 8))
    assert m8.shape == (2, 64) and m8.dtype == torch.float32
    assert layout.masks((8, 8)) is m8                     # cached
    m16 = layout.masks((16, 8))                           # a non-square grid
    assert m16.shape == (2, 128) and layout.masks((16, 8)) is m16
    assert torch.equal(m8[0].view(8, 8).bool(), Centre(0.25, 0.5).mask(8, 8))


def test_as_region_forms():
    assert isinstance(as_region((0.2, 0.3)), Centre)
    assert isinstance(as_region([0.1, 0.2, 0.3, 0.4]), Box)
    assert isinstance(as_region(torch.tensor([0.1, 0.2, 0.3, 0.4])), Box)
    assert isinstance(as_region(torch.ones(4, 4)), Mask)


@pytest.mark.parametrize("spec,match", [
    ((0.1, 0.2, 1.2, 0.5), "box outside|inside \\[0, 1\\]"), ((-0.1, 0.0, 0.5, 0.5), "inside \\[0, 1\\]"),
    ((0.5, 0.2, 0.4, 0.6), "x0 < x1"), ((1.5, 0.5), "centre x"), ((0.1, 0.2, 0.3), "expected a centre"),
])
def test_bad_regions(spec, match):
    with pytest.raises(ValueError, match=match):
        as_region(spec)


def test_bad_masks_and_layouts():
    with pytest.raises(ValueError, match="empty"):
        Mask(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="values in \\[0, 1\\]"):
        Mask(torch.full((8, 8), 2.0))
    with pytest.raises(ValueError, match="2-D"):
        Mask(torch.ones(1, 8, 8))
    with pytest.raises(TypeError, match="bool or float"):
        Mask(torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="2 names but 1 regions"):
        Layout(["a", "b"], [(0.5, 0.5)])
    with pytest.raises(ValueError, match="at least one object"):
        Layout([], [])


# ------------------------------------------------------------------------------ LLM-style text

def test_parse_layout_text():
    text = """Objects:
- a red car [0, 256, 256, 128]
  'a dog': [256, 0, 256, 512]
("a blue ball", [12.5, 20, 100, 50]),

# comment
Background prompt: a street
"""
    with pytest.raises(ValueError, match="line 1"):       # "Objects:" is not a box line
        parse_layout_text(text)
    layout = parse_layout_text(text.split("\n", 1)[1])
    assert layout.names == ["a red car", "a dog", "a blue ball"]
    assert layout.regions[0] == Box(0.0, 0.5, 0.5, 0.75)
    assert layout.regions[1] == Box(0.5, 0.0, 1.0, 1.0)
    assert layout.regions[2] == Box(12.5 / 512, 20 / 512, 112.5 / 512, 70 / 512)
    wide = parse_layout_text("a cat [0, 0, 1024, 384]", canvas=(1024, 768))
    assert wide.regions[0] == Box(0.0, 0.0, 1.0, 0.5)


@pytest.mark.parametrize("text,match", [
    ("a cat [10, 20, 30]", "line 1: expected 'name \\[x, y, w, h\\]'"),
    ("a cat [0, 0, 10, 10]\na dog (1, 2, 3, 4)", "line 2"),
    ("a cat [400, 0, 200, 100]", "outside the 512x512 canvas"),
    ("a cat [10, 10, 0, 100]", "positive"),
    ("\n\n", "no 'name"),
])
def test_bad_layout_text(text, match):
    with pytest.raises(ValueError, match=match):
        parse_layout_text(text)


# ------------------------------------------------------------------------------ object phrases

@pytest.mark.parametrize("prompt,objects", [
    ("a photo of a cat and a frog", ["a cat", "a frog"]),
    ("The cat is left of the dog.", ["The cat", "the dog"]),
    ("a red car on top of a blue truck", ["a red car", "a blue truck"]),
    ("a cup of coffee next to a laptop", ["a cup of coffee", "a laptop"]),
    ("A black cat sitting on a wooden chair with a red ball", ["A black cat", "a wooden chair", "a red ball"]),
    ("a painting of a man holding an umbrella", ["a man", "an umbrella"]),
    ("a cat is black and a dog is white", ["a cat", "a dog"]),
    ("two dogs, a cat and a bird", ["two dogs", "a cat", "a bird"]),
    ("a building next to a tree", ["a building", "a tree"]),
])
def test_find_objects(prompt, objects):
    assert find_objects(prompt) == objects
    for p in find_phrases(prompt):
        assert prompt[p.start:p.end] == p.text


def test_phrase_name_rule():
    assert Phrase("The Red Car", 0, 11).name == "red car"
    assert Phrase("a cat", 0, 5).name == "a cat"


# ------------------------------------------------------------------------------ layout predictor

def _centres(prompt):
    pred = RuleLayoutPredictor()
    layout = pred.predict(prompt, pred.objects(prompt))
    return {n.lower(): r.centre for n, r in zip(layout.names, layout.regions)}, layout


@pytest.mark.parametrize("prompt,a,rel,b", [
    ("The cat is left of the dog.", "the cat", "left", "the dog"),
    ("the apple is to the right of the banana", "the apple", "right", "the banana"),
    ("a bird above a horse", "a bird", "above", "a horse"),
    ("a red car on top of a blue truck", "a red car", "above", "a blue truck"),
    ("a dog under a table", "a dog", "below", "a table"),
    ("a lamp below a clock", "a lamp", "below", "a clock"),
    ("a cat next to a dog", "a cat", "left", "a dog"),
    ("a cat and a dog", "a cat", "left", "a dog"),
    ("a cat on the right and a dog on the left", "a cat", "right", "a dog"),
    ("a cup on a table", "a cup", "above", "a table"),
])
def test_predictor_relations(prompt, a, rel, b):
    c, layout = _centres(prompt)
    (ax, ay), (bx, by) = c[a], c[b]
    assert {"left": ax < bx, "right": ax > bx, "above": ay < by, "below": ay > by}[rel], (prompt, c)
    if rel in ("left", "right"):
        assert ay == by
    else:
        assert ax == bx


@pytest.mark.parametrize("prompt", [
    "a photo of a cat and a frog", "a horse above a bird, below a cloud",
    "A black cat sitting on a wooden chair with a red ball", "a cat, a dog, a bird, a fish and a frog",
    "a cat on the left and a dog on the right and a bird at the top",
])
def test_predictor_inside_canvas_distinct_deterministic(prompt):
    pred = RuleLayoutPredictor()
    objects = pred.objects(prompt)
    layout = pred.predict(prompt, objects)
    assert len(layout) == len(objects) >= 2
    for r in layout.regions:
        assert 0 <= r.x0 < r.x1 <= 1 and 0 <= r.y0 < r.y1 <= 1
    assert len(set(pred.cells(prompt, objects))) == len(objects)          # no two objects share a cell
    again = RuleLayoutPredictor().predict(prompt, find_phrases(prompt))
    assert again.regions == layout.regions and again.names == layout.names
    for m in layout.masks((8, 8)):
        assert m.sum() > 0


def test_predictor_disk_shape_and_interface():
    pred = RuleLayoutPredictor(shape="disk")
    layout = pred.predict("a cat left of a dog", find_phrases("a cat left of a dog"))
    assert all(isinstance(r, Centre) and r.radius == 0.2 for r in layout.regions)
    assert layout.regions[0].x < layout.regions[1].x
    with pytest.raises(NotImplementedError):
        LayoutPredictor().predict("a cat", find_phrases("a cat"))
    with pytest.raises(ValueError, match="no object phrase"):
        RuleLayoutPredictor().predict("on and under", [])
    with pytest.raises(ValueError, match="margin"):
        RuleLayoutPredictor(margin=0.7)
