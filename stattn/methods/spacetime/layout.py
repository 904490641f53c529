"""Object layouts for spatial-temporal attention control: regions, their masks per attention
resolution, LLM-style layout text, and a rule-based layout predictor that needs no downloads.

Coordinates are fractions of the image: x = column (left to right), y = row (top to bottom), both
in [0, 1]. A region is one of

- :class:`Centre` — the released code's disk: m(row j, col k) = [(k/w − x)² + (j/h − y)² < r²],
  r = 0.2, evaluated in float32 at the cells' top-left corners (k/w, not (k + ½)/w), as released;
- :class:`Box` — xyxy in [0, 1]: the cells whose centres lie in the box;
- :class:`Mask` — a user mask [H, W] at any resolution, area-resized to each grid (cells at least
  half covered).

A region too small for a coarse grid (a thin box at 8×8, the tiny model's 4×4 level) gets the single
cell nearest its centre, so every object attends somewhere at every resolution. :class:`Layout`
holds the objects' names and regions and builds the masks once per attention grid (cached per grid
and device). :class:`RuleLayoutPredictor` finds the object phrases of a prompt and places them from
the spatial relations it states; a trained text-to-layout model plugs in as another
:class:`LayoutPredictor`.
"""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["RADIUS", "CANVAS", "Region", "Centre", "Box", "Mask", "Layout", "as_region", "region_to_json", "region_from_json", "parse_layout_text",
           "LayoutPredictor", "RuleLayoutPredictor", "find_phrases", "find_objects", "Phrase"]

RADIUS = 0.2    # the released disk radius (fraction of the image side)
CANVAS = 512    # LLM-style layouts give pixel boxes on a 512 x 512 canvas


def _unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number in [0, 1], got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name}: expected a number in [0, 1] (a fraction of the image), got {value!r}")
    return value


def _slice(lo: float, hi: float, size: int) -> slice:
    """Pixel slice of [lo, hi] (fractions) on an axis of `size` pixels; at least one pixel."""
    a = min(int(lo * size), size - 1)
    return slice(a, max(int(hi * size), a + 1))


class Region:
    """One object's region. Subclasses give ``grid_mask(h, w)`` (bool [h, w] on the CPU, possibly
    empty), ``centre`` (x, y) and ``extent`` (x0, y0, x1, y1) for crops."""

    centre: tuple
    extent: tuple

    def grid_mask(self, h: int, w: int) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, h: int, w: int) -> torch.Tensor:
        """bool [h, w]: the region on an h x w grid, never empty (see the module docstring)."""
        m = self.grid_mask(h, w)
        if not bool(m.any()):
            m = torch.zeros(h, w, dtype=torch.bool)
            m[self._nearest(self.centre[1], h), self._nearest(self.centre[0], w)] = True
        return m

    @staticmethod
    def _nearest(t: float, n: int) -> int:
        """The cell of an n-cell axis containing fraction t (cells sampled at their centres)."""
        return min(int(t * n), n - 1)

    def crop(self, height: int, width: int) -> tuple:
        """(rows, cols) pixel slices of the region's crop on a height x width image."""
        x0, y0, x1, y1 = self.extent
        return _slice(y0, y1, height), _slice(x0, x1, width)


@dataclass(frozen=True)
class Centre(Region):
    """The released disk around an object centre; its CLIP crop is the square [x ± r] x [y ± r]
    clipped to the image."""
    x: float
    y: float
    radius: float = RADIUS

    @staticmethod
    def _nearest(t: float, n: int) -> int:
        return min(int(round(t * n)), n - 1)    # the disk samples cells at their corners k/n

    def __post_init__(self):
        object.__setattr__(self, "x", _unit("centre x", self.x))
        object.__setattr__(self, "y", _unit("centre y", self.y))
        if isinstance(self.radius, bool) or not isinstance(self.radius, (int, float)) or \
                not (0 < self.radius <= 2 and math.isfinite(self.radius)):
            raise ValueError(f"radius: expected a positive fraction of the image side, got {self.radius!r}")

    @property
    def centre(self) -> tuple:
        return (self.x, self.y)

    @property
    def extent(self) -> tuple:
        r = self.radius
        return (max(0.0, self.x - r), max(0.0, self.y - r), min(1.0, self.x + r), min(1.0, self.y + r))

    def grid_mask(self, h: int, w: int) -> torch.Tensor:
        # float32 throughout, as the released code (the check values depend on it)
        f32 = torch.float32
        cols = torch.arange(w, dtype=f32) / w
        rows = torch.arange(h, dtype=f32) / h
        r2 = torch.tensor(self.radius, dtype=f32) ** 2
        d2 = (cols[None, :] - torch.tensor(self.x, dtype=f32)) ** 2 + (rows[:, None] - torch.tensor(self.y, dtype=f32)) ** 2
        return d2 < r2


@dataclass(frozen=True)
class Box(Region):
    """An axis-aligned box, xyxy fractions in [0, 1] (x0 < x1, y0 < y1)."""
    x0: float
    y0: float
    x1: float
    y1: float

    def __post_init__(self):
        for n in ("x0", "y0", "x1", "y1"):
            v = getattr(self, n)
            try:
                object.__setattr__(self, n, _unit(f"box {n}", v))
            except ValueError:
                raise ValueError(f"box: expected xyxy inside [0, 1] (fractions of the image), got {n} = {v!r} "
                                 f"in {self._xyxy()}") from None
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise ValueError(f"box: expected x0 < x1 and y0 < y1 (xyxy), got {self._xyxy()}")

    def _xyxy(self) -> tuple:
        return (self.x0, self.y0, self.x1, self.y1)

    @property
    def centre(self) -> tuple:
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)

    @property
    def extent(self) -> tuple:
        return self._xyxy()

    def grid_mask(self, h: int, w: int) -> torch.Tensor:
        cols = (torch.arange(w, dtype=torch.float64) + 0.5) / w
        rows = (torch.arange(h, dtype=torch.float64) + 0.5) / h
        return ((rows >= self.y0) & (rows <= self.y1))[:, None] & ((cols >= self.x0) & (cols <= self.x1))[None, :]


class Mask(Region):
    """A user mask [H, W] (bool, or float in [0, 1]) at any resolution."""

    def __init__(self, mask):
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a torch.Tensor [H, W], got {type(mask).__name__}")
        if mask.dim() != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
            raise ValueError(f"mask: expected a 2-D tensor [H, W], got shape {tuple(mask.shape)}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(f"mask: expected a bool or float tensor, got {mask.dtype}")
        m = mask.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
            raise ValueError("mask: expected values in [0, 1] (bool or float)")
        if not bool((m > 0).any()):
            raise ValueError(f"mask: the mask of shape {tuple(m.shape)} is empty (all zero); an object needs a region")
        self.full = m
        ys, xs = (m > 0).nonzero(as_tuple=True)
        H, W = m.shape
        self.extent = (int(xs.min()) / W, int(ys.min()) / H, (int(xs.max()) + 1) / W, (int(ys.max()) + 1) / H)
        cy, cx = (ys.float().mean() + 0.5) / H, (xs.float().mean() + 0.5) / W
        self.centre = (float(cx), float(cy))

    def grid_mask(self, h: int, w: int) -> torch.Tensor:
        cover = F.interpolate(self.full[None, None], size=(h, w), mode="area")[0, 0]
        m = cover >= 0.5
        if not bool(m.any()):   # a small region: the most covered cell
            m = torch.zeros(h, w, dtype=torch.bool)
            m.view(-1)[int(cover.flatten().argmax())] = True
        return m

    def __repr__(self) -> str:
        return f"Mask({tuple(self.full.shape)})"


RegionLike = Union[Region, Sequence[float], torch.Tensor]


def as_region(spec: RegionLike, name: str = "layout") -> Region:
    """A Region from a Region, a centre (x, y), a box (x0, y0, x1, y1) or a mask tensor [H, W]."""
    if isinstance(spec, Region):
        return spec
    if isinstance(spec, torch.Tensor):
        if spec.dim() == 2:
            return Mask(spec)
        if spec.dim() == 1 and spec.numel() in (2, 4):
            spec = spec.tolist()
        else:
            raise ValueError(f"{name}: a tensor must be a mask [H, W] or a centre/box of 2/4 numbers, "
                             f"got shape {tuple(spec.shape)}")
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        return Centre(*spec)
    if isinstance(spec, (list, tuple)) and len(spec) == 4:
        return Box(*spec)
    raise ValueError(f"{name}: expected a centre (x, y), a box (x0, y0, x1, y1) in [0, 1], a mask tensor [H, W] "
                     f"or a stattn.methods.spacetime.layout.Region, got {spec!r}")


def region_to_json(region: Region) -> dict:
    """A JSON-able form of a box or disk region ({"box": [x0, y0, x1, y1]} / {"centre": [x, y],
    "radius": r}, fractions as floats: round-trips exactly); a Mask has none (a tensor)."""
    if isinstance(region, Box):
        return {"box": [region.x0, region.y0, region.x1, region.y1]}
    if isinstance(region, Centre):
        return {"centre": [region.x, region.y], "radius": region.radius}
    raise TypeError(f"region: only Box and Centre regions have a JSON form, got {type(region).__name__}")


def region_from_json(data, name: str = "region") -> Region:
    """The inverse of :func:`region_to_json`."""
    if isinstance(data, dict) and set(data) == {"box"}:
        return Box(*data["box"])
    if isinstance(data, dict) and set(data) == {"centre", "radius"}:
        return Centre(*data["centre"], radius=data["radius"])
    raise ValueError(f"{name}: expected {{\"box\": [x0, y0, x1, y1]}} or {{\"centre\": [x, y], \"radius\": r}}, "
                     f"got {data!r}")


class Layout:
    """Named object regions, with their masks per attention grid (built once, cached)."""

    def __init__(self, names: Sequence[str], regions: Sequence[RegionLike]):
        names, regions = list(names), list(regions)
        if not names:
            raise ValueError("layout: expected at least one object")
        if len(names) != len(regions):
            raise ValueError(f"layout: {len(names)} names but {len(regions)} regions")
        for n in names:
            if not isinstance(n, str) or not n.strip():
                raise ValueError(f"layout: object names must be non-empty strings, got {n!r}")
        self.names = [n.strip() for n in names]
        self.regions = [as_region(r, f"layout[{n!r}]") for n, r in zip(self.names, regions)]
        self._masks: dict = {}

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"Layout({list(zip(self.names, self.regions))})"

    @classmethod
    def from_text(cls, text: str, canvas: Union[int, tuple] = CANVAS) -> "Layout":
        return parse_layout_text(text, canvas)

    def to_json(self) -> list:
        """[[name, region JSON], ...] (see :func:`region_to_json`); :meth:`from_json` inverts it."""
        return [[n, region_to_json(r)] for n, r in zip(self.names, self.regions)]

    @classmethod
    def from_json(cls, data) -> "Layout":
        if not isinstance(data, list) or not all(isinstance(e, list) and len(e) == 2 for e in data):
            raise ValueError(f"layout: expected [[name, region], ...], got {data!r}")
        return cls([n for n, _ in data], [region_from_json(r, f"layout[{n!r}]") for n, r in data])

    def masks(self, grid: tuple, device=None) -> torch.Tensor:
        """float32 [n, h*w] (row-major), one row per object, cached per (grid, device)."""
        h, w = int(grid[0]), int(grid[1])
        if h < 1 or w < 1:
            raise ValueError(f"grid: expected (h, w) >= 1, got {grid!r}")
        key = (h, w, str(torch.device(device)) if device is not None else "cpu")
        m = self._masks.get(key)
        if m is None:
            m = torch.stack([r.mask(h, w).reshape(-1) for r in self.regions]).to(torch.float32)
            m = self._masks[key] = m.to(device) if device is not None else m
        return m

    def crops(self, height: int, width: Optional[int] = None) -> list:
        """Per object, the (rows, cols) slices of its CLIP crop on a height x width image."""
        return [r.crop(height, width if width is not None else height) for r in self.regions]


# ---------------------------------------------------------------------------------------------
# LLM-style layout text: "name [x, y, w, h]" lines, pixels on a 512 canvas

_NUM = r"([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)"
_LINE = re.compile(r"^\s*(?:[-*\u2022]\s+|\d+[.)]\s+)?[(\s]*['\"]?(?P<name>[^\[\]'\"]*?[^\[\]'\"\s:,])['\"]?\s*[:,]?\s*"
                   r"\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]\s*\)?\s*,?\s*$")
_SKIP = re.compile(r"^\s*(#|background prompt\s*:|negative prompt\s*:)", re.IGNORECASE)


def parse_layout_text(text: str, canvas: Union[int, tuple] = CANVAS) -> Layout:
    """A Layout of boxes from lines ``name [x, y, w, h]`` (x, y the top-left corner; pixels on a
    ``canvas`` of 512 x 512, or (width, height)). Bullets, quotes, a trailing comma and the
    parentheses of ``('a cat', [x, y, w, h]),`` are accepted; blank lines, ``#`` comments and the
    "Background prompt:" / "Negative prompt:" lines of LLM-grounded diffusion outputs are skipped.
    Any other line that does not parse, or a box outside the canvas, raises ValueError naming it."""
    if not isinstance(text, str):
        raise TypeError(f"layout text: expected a string, got {type(text).__name__}")
    cw, ch = (canvas, canvas) if isinstance(canvas, int) else tuple(canvas)
    if not all(isinstance(c, int) and c > 0 for c in (cw, ch)):
        raise ValueError(f"canvas: expected a positive int or (width, height), got {canvas!r}")
    names, boxes = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or _SKIP.match(line):
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"layout text line {lineno}: expected 'name [x, y, w, h]' (pixels on a {cw}x{ch} "
                             f"canvas), got {line.strip()!r}")
        x, y, w, h = (float(g) for g in m.groups()[1:])
        if w <= 0 or h <= 0:
            raise ValueError(f"layout text line {lineno}: width and height must be positive, got {line.strip()!r}")
        if x < 0 or y < 0 or x + w > cw or y + h > ch:
            raise ValueError(f"layout text line {lineno}: box [x={x:g}, y={y:g}, w={w:g}, h={h:g}] is outside the "
                             f"{cw}x{ch} canvas (box outside [0, 1])")
        names.append(m.group("name").strip())
        boxes.append(Box(x / cw, y / ch, (x + w) / cw, (y + h) / ch))
    if not names:
        raise ValueError("layout text: no 'name [x, y, w, h]' line found")
    return Layout(names, boxes)


# ---------------------------------------------------------------------------------------------
# Rule-based object phrases and layout prediction

# spatial relations "A <rel> B": (dx, dy) of B's cell relative to A's
_RELATIONS = {
    "left": (1, 0), "right": (-1, 0), "above": (0, 1), "below": (0, -1), "next": (1, 0), "and": (1, 0),
}
# phrases, longest first when matched; each maps to a relation of the following object
_RELATION_PHRASES = [
    ("to the left of", "left"), ("on the left of", "left"), ("on the left side of", "left"), ("left of", "left"),
    ("to the right of", "right"), ("on the right of", "right"), ("on the right side of", "right"),
    ("right of", "right"),
    ("on top of", "above"), ("on the top of", "above"), ("on", "above"), ("onto", "above"), ("above", "above"),
    ("over", "above"), ("atop", "above"),
    ("below", "below"), ("under", "below"), ("underneath", "below"), ("beneath", "below"),
    ("at the bottom of", "below"), ("at the top of", "above"),
    ("next to", "next"), ("beside", "next"), ("besides", "next"), ("near", "next"), ("by", "next"),
    ("alongside", "next"), ("side by side with", "next"), ("close to", "next"),
    ("in front of", "next"), ("behind", "next"), ("and", "and"), ("with", "and"), ("or", "and"),
]
# absolute positions of the preceding object ("a cat on the left and a dog on the right")
_ABSOLUTE_PHRASES = [
    ("on the left", "left"), ("at the left", "left"), ("on the right", "right"), ("at the right", "right"),
    ("at the top", "top"), ("on the top", "top"), ("at the bottom", "bottom"), ("on the bottom", "bottom"),
]
_DETERMINERS = frozenset("a an the one two three four five some several many this that these those his her "
                         "its their my your our another each every".split())
_FRAME_WORDS = frozenset("photo photograph picture image painting drawing illustration render rendering sketch "
                         "portrait view scene shot closeup close-up".split())
_BREAKERS = frozenset(
    # conjunctions, prepositions, auxiliaries, pronouns and common verbs: never part of an object phrase
    "and or but with without of on in at to into onto from by for over under above below beneath underneath "
    "near beside besides behind next left right top bottom front between among around across along against "
    "inside outside through atop alongside upon while which that who whose where when there here it they them "
    "itself each other is are was were be been being am has have had does do did looks look looking appears "
    "sits sit stands stand lies lie holds hold wears wear eats eat plays play flies fly runs run rides ride "
    "jumps jump walks walk carries carry contains contain shows show very together side close".split())
_COPULAS = frozenset("is are was were be been being looks look appears seems".split())
_ING_NOUNS = frozenset("building painting ceiling ring king wing string thing evening morning clothing swing "
                       "spring wedding pudding stocking sibling ping railing awning icing frosting "
                       "sing bing".split())


@dataclass(frozen=True)
class Phrase:
    """An object phrase of a prompt: its text (as written), character span, and CLIP name."""
    text: str
    start: int
    end: int

    @property
    def name(self) -> str:
        """Lower-cased, without a leading "the " (the released CLIP crop prompt's rule)."""
        n = self.text.lower()
        return n[4:] if n.startswith("the ") else n


def _word_char(c: str) -> bool:
    """A letter or digit of any script, or a combining mark (the accent of a decomposed "é", an
    Indic vowel sign): a word never ends inside a letter's marks, so a phrase cut at word ends
    tokenises as the same run of tokens inside the prompt."""
    return c.isalnum() or unicodedata.category(c).startswith("M")


def _words(prompt: str) -> list:
    """(lower-cased word, start, end) of each word: a letter or digit (any script) followed by
    letters, digits, combining marks, apostrophes and hyphens."""
    words, i, n = [], 0, len(prompt)
    while i < n:
        if not prompt[i].isalnum():
            i += 1
            continue
        j = i + 1
        while j < n and (_word_char(prompt[j]) or prompt[j] in "'-"):
            j += 1
        words.append((prompt[i:j].lower(), i, j))
        i = j
    return words


def _match_phrase(words, i, phrases):
    """The longest of `phrases` (word sequences) starting at word i: (value, length) or None."""
    best = None
    for text, value in phrases:
        parts = text.split()
        if [w for w, _, _ in words[i:i + len(parts)]] == parts and (best is None or len(parts) > best[1]):
            best = (value, len(parts))
    return best


def find_phrases(prompt: str) -> list:
    """The object noun phrases of ``prompt`` (light rule-based chunker, no model): maximal runs of
    determiners / adjectives / nouns, split at conjunctions, prepositions, relation words, verbs and
    punctuation; a determiner starts a new phrase; "a photo of" style framing is dropped; "X of Y"
    stays one phrase ("a cup of coffee"); runs right after a copula with no determiner are
    attributes ("the cat is black"), not objects."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected a string, got {type(prompt).__name__}")
    words = _words(prompt)
    phrases, cur = [], []
    prev_copula = False

    def close():
        nonlocal cur
        if cur:
            keep = not (cur[0][3] and cur[0][0] not in _DETERMINERS)   # cur[0][3]: after a copula
            content = [w for w in cur if w[0] not in _DETERMINERS]
            if keep and content:
                phrases.append(Phrase(prompt[cur[0][1]:cur[-1][2]], cur[0][1], cur[-1][2]))
        cur = []

    i = 0
    while i < len(words):
        w, s, e = words[i]
        gap = prompt[words[i - 1][2]:s] if i else ""
        if any(c in gap for c in ",.;:!?()"):
            close()
        nxt = words[i + 1][0] if i + 1 < len(words) else None
        if w == "of" and cur and nxt not in (None,) and cur[-1][0] not in _FRAME_WORDS \
                and _match_phrase(words, i, _RELATION_PHRASES) is None and nxt not in _BREAKERS:
            cur.append((w, s, e, False))          # "a cup of coffee": one phrase
            i += 1
            continue
        if w in _FRAME_WORDS and nxt == "of" and (not cur or all(x[0] in _DETERMINERS for x in cur)):
            cur = []                              # "a photo of ..." frames the scene
            i += 2
            prev_copula = False
            continue
        is_ing_verb = w.endswith("ing") and len(w) > 4 and w not in _ING_NOUNS
        if w in _BREAKERS or is_ing_verb or w.isdigit() and w not in _DETERMINERS:
            close()
            prev_copula = w in _COPULAS
            i += 1
            continue
        if w in _DETERMINERS and cur and any(x[0] not in _DETERMINERS for x in cur):
            close()
        cur.append((w, s, e, prev_copula if not cur else cur[0][3]))
        prev_copula = False
        i += 1
    close()
    return phrases


def find_objects(prompt: str) -> list:
    """The object phrases' texts (see :func:`find_phrases`)."""
    return [p.text for p in find_phrases(prompt)]


def _locate(prompt: str, objects: Sequence[str]) -> list:
    """Character spans of user-given objects in the prompt (whole words, case-insensitive; a
    repeated object takes successive occurrences). Raises naming an object not in the prompt."""
    spans, taken = [], []
    for obj in objects:
        if not isinstance(obj, str) or not obj.strip():
            raise ValueError(f"objects: expected non-empty strings, got {obj!r}")
        hits = _whole_word_matches(prompt, obj)
        hit = next((m for m in hits if (m.start(), m.end()) not in taken), None)
        if hit is None:
            raise ValueError(f"objects: {obj!r} is not in the prompt {prompt!r}"
                             + (" (or occurs fewer times than asked)" if hits else ""))
        taken.append((hit.start(), hit.end()))
        spans.append(Phrase(prompt[hit.start():hit.end()], hit.start(), hit.end()))
    return spans


def _name_key(text: str) -> tuple:
    """An object name's words, lower-cased, without leading determiners: "A black cat" ->
    ("black", "cat")."""
    words = [w for w, _, _ in _words(text)]
    i = 0
    while i < len(words) - 1 and words[i] in _DETERMINERS:
        i += 1
    return tuple(words[i:])


def _contains(words: tuple, part: tuple) -> bool:
    n = len(part)
    return n > 0 and any(words[i:i + n] == part for i in range(len(words) - n + 1))


def check_layout_names(prompt: str, names: Sequence[str]) -> None:
    """Every name of a layout that supplies the objects must name an object of the prompt: its
    last word (the noun of an English noun phrase) is a word of the prompt ("a red cat" names the
    cat of "a cat and a frog"; "zebra" names nothing there). Raises naming the others."""
    words = {w for w, _, _ in _words(prompt)}
    missing = [n for n in names if not _name_key(n) or _name_key(n)[-1] not in words]
    if missing:
        raise ValueError(f"layout: objects {missing} are not in the prompt {prompt!r} (a layout name's last word, "
                         "its noun, must be a word of the prompt); name the prompt's objects")


def match_layout_names(names: Sequence[str], objects: Sequence[str], phrases: Sequence[str]) -> list:
    """For each object (as the user gave it, and the prompt phrase it widened to), the index of
    the layout name that names it: a name equal to the object or to its phrase (ignoring case and
    leading determiners: "a cat" names "cat") before a name that contains the object's words
    ("a black cat" names "cat"); ties go to the earlier name, so repeated objects take successive
    names. Regions are thus assigned by name, whatever the order of the layout's lines. Raises
    naming an object that no remaining name matches."""
    keys = [_name_key(n) for n in names]
    free, order = list(range(len(names))), []
    for obj, phrase in zip(objects, phrases):
        own = _name_key(obj)
        exact = {own, _name_key(phrase)}

        def score(j: int) -> int:
            return 2 if keys[j] in exact else 1 if _contains(keys[j], own) else 0

        best = max(free, key=score, default=None)
        if best is None or score(best) == 0:
            raise ValueError(f"layout: no region is named for object {obj!r} (the phrase {phrase!r}) among the "
                             f"layout's names {[names[j] for j in free]}; name each region after its object "
                             f"(e.g. {obj!r} or {phrase!r}), or pass a list of regions in object order")
        order.append(best)
        free.remove(best)
    return order


def _whole_word_matches(prompt: str, text: str) -> list:
    """Matches of ``text`` (its words separated by any whitespace, case-insensitive) in the
    prompt that start and end at word boundaries (letters of any script)."""
    pat = re.compile(r"\s+".join(map(re.escape, text.split())), re.IGNORECASE)
    hits, pos = [], 0
    while (m := pat.search(prompt, pos)) is not None:
        inside = (m.start() > 0 and _word_char(prompt[m.start() - 1])) or \
                 (m.end() < len(prompt) and _word_char(prompt[m.end()]))
        if inside:
            pos = m.start() + 1
        else:
            hits.append(m)
            pos = m.end()
    return hits


def expand_to_phrase(prompt: str, span: Phrase) -> Phrase:
    """The object phrase of the prompt containing ``span`` (e.g. "cat" -> "a black cat"), or ``span``."""
    for p in find_phrases(prompt):
        if p.start <= span.start and span.end <= p.end:
            return p
    return span


def _relation_between(prompt: str, a: Phrase, b: Phrase) -> str:
    """The relation stated between two consecutive objects: the last relation phrase in the text
    between them ("and" if none)."""
    words = _words(prompt[a.end:b.start])
    rel, i = "and", 0
    while i < len(words):
        hit = _match_phrase(words, i, _ABSOLUTE_PHRASES)
        if hit is not None and not (i + hit[1] < len(words) and words[i + hit[1]][0] == "of"):
            i += hit[1]        # "on the left": where the previous object is, not a relation
            continue
        hit = _match_phrase(words, i, _RELATION_PHRASES)
        if hit is not None:
            rel = hit[0]
            i += hit[1]
        else:
            i += 1
    return rel


def _absolute_after(prompt: str, a: Phrase, stop: int) -> Optional[str]:
    """An absolute position stated right after object `a` ("on the left"), not followed by "of"."""
    words = _words(prompt[a.end:stop])
    for i in range(len(words)):
        hit = _match_phrase(words, i, _ABSOLUTE_PHRASES)
        if hit is not None and not (i + hit[1] < len(words) and words[i + hit[1]][0] == "of"):
            return hit[0]
        if _match_phrase(words, i, _RELATION_PHRASES) is not None and words[i][0] not in ("on", "at"):
            return None
    return None


class LayoutPredictor:
    """Text-to-layout interface: ``predict(prompt, objects)`` returns a :class:`Layout` with one
    region per object phrase (``objects``: the phrases, in the prompt's order, as character-span
    :class:`Phrase` objects). A trained model (the released RoBERTa + Gaussian-mixture centre
    predictor) plugs in by subclassing and returning :class:`Centre` regions."""

    def predict(self, prompt: str, objects: Sequence[Phrase]) -> Layout:
        raise NotImplementedError

    def objects(self, prompt: str) -> list:
        """The object phrases of a prompt (default: the rule-based chunker)."""
        return find_phrases(prompt)


class RuleLayoutPredictor(LayoutPredictor):
    """Places objects on a grid of cells from the relations stated between consecutive objects
    ("A left of B": B one cell right of A; "above" / "on top of" / "on": B below A; "and", "with",
    "next to": side by side), plus absolute positions ("on the left", "at the top"); then each
    object gets its cell's box shrunk by ``margin`` (a fraction of the cell) on every side.
    Deterministic; every box lies inside the canvas. ``shape="disk"`` returns the released disk
    (:class:`Centre`) at each box centre instead."""

    def __init__(self, margin: float = 0.1, shape: str = "box"):
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 0.5:
            raise ValueError(f"margin: expected a fraction of a cell in [0, 0.5), got {margin!r}")
        if shape not in ("box", "disk"):
            raise ValueError(f"shape: expected 'box' or 'disk', got {shape!r}")
        self.margin, self.shape = float(margin), shape

    def cells(self, prompt: str, objects: Sequence[Phrase]) -> list:
        """Integer (col, row) per object, from the stated relations; no two objects share a cell."""
        order = sorted(range(len(objects)), key=lambda i: objects[i].start)
        pos: dict = {}
        for n, i in enumerate(order):
            if n == 0:
                pos[i] = (0, 0)
                continue
            prev = order[n - 1]
            dx, dy = _RELATIONS[_relation_between(prompt, objects[prev], objects[i])]
            c, r = pos[prev][0] + dx, pos[prev][1] + dy
            used = set(pos.values())
            while (c, r) in used:        # keep moving the same way (sideways for "and")
                c, r = c + (dx or 0) + (0 if dx or dy else 1), r + dy
            pos[i] = (c, r)
        # absolute positions: to the extreme column / row
        for n, i in enumerate(order):
            stop = objects[order[n + 1]].start if n + 1 < len(order) else len(prompt)
            where = _absolute_after(prompt, objects[i], stop)
            if where is None:
                continue
            c, r = pos[i]
            cs, rs = [p[0] for p in pos.values()], [p[1] for p in pos.values()]
            target = {"left": (min(cs) - 1, r), "right": (max(cs) + 1, r),
                      "top": (c, min(rs) - 1), "bottom": (c, max(rs) + 1)}[where]
            pos[i] = target
        return [pos[i] for i in range(len(objects))]

    def predict(self, prompt: str, objects: Sequence[Phrase]) -> Layout:
        if not objects:
            raise ValueError(f"prompt: no object phrase found in {prompt!r}; pass objects=[...] explicitly")
        cells = self.cells(prompt, objects)
        cols = sorted({c for c, _ in cells})
        rows = sorted({r for _, r in cells})
        nc, nr = len(cols), len(rows)
        regions = []
        for c, r in cells:
            ci, ri = cols.index(c), rows.index(r)
            m = self.margin
            box = Box((ci + m) / nc, (ri + m) / nr, (ci + 1 - m) / nc, (ri + 1 - m) / nr)
            regions.append(box if self.shape == "box" else Centre(*box.centre))
        return Layout([o.text for o in objects], regions)
