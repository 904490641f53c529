"""The shipped prompt sets of `stattn eval` (generated deterministically) and user prompt files.

Attend-and-Excite (Chefer et al., SIGGRAPH 2023, arXiv 2301.13826) evaluates on three sets built
from word lists; the lists below are the words its released evaluation prompts use (the prompt
list linked from github.com/yuval-alaluf/Attend-and-Excite README, "Evaluation Prompts", as
reproduced in public follow-up code): 12 animals, 12 objects, 11 colours. The sets are rebuilt
here from the lists and the templates, not copied: every unordered animal pair; every animal with
every object; every unordered object pair; the colours drawn by a fixed-seed RNG (random.Random
with a string seed is stable across Python versions). Targets are the nouns. The animal-object set
takes issue 18's single template "a {animal} with a {color} {object}"; the released list words
those prompts as "a {animal} with a {object}" or "a {animal} and a {color} {object}", sampled.

The spatial set pairs COCO's 80 category names (the detection categories of COCO 2017) under four
relations; targets are the two names, the layout is placed from the relation (spacetime's
default), and the relation is kept for the detector's check.
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ANIMALS = ("cat", "dog", "bird", "bear", "lion", "horse", "elephant", "monkey", "frog", "turtle", "rabbit", "mouse")
OBJECTS = ("backpack", "glasses", "crown", "suitcase", "chair", "balloon", "bow", "car", "bowl", "bench", "clock",
           "apple")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "gray", "black", "white")
COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush")
# the phrase of each relation in the prompt ("A <phrase> B")
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
SPATIAL_PAIRS_PER_RELATION = 25


@dataclass(frozen=True)
class Prompt:
    """One prompt of an evaluation: its text, the objects it names (targets), an optional layout
    and seed (a file's line), and the relation (A, relation, B) it states, if any."""
    text: str
    targets: tuple
    set: str
    layout: Optional[str] = None
    seed: Optional[int] = None
    relation: Optional[tuple] = None
    where: str = ""

    def to_json(self) -> dict:
        return {"prompt": self.text, "targets": list(self.targets), "set": self.set, "layout": self.layout,
                "relation": list(self.relation) if self.relation else None}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def ae_animals() -> list:
    """'a {animal} and a {animal}': the 66 unordered pairs."""
    return [Prompt(f"a {a} and a {b}", (a, b), "ae-animals") for a, b in itertools.combinations(ANIMALS, 2)]


def ae_animal_object() -> list:
    """'a {animal} with a {color} {object}': every animal with every object (144)."""
    rng = random.Random("stattn ae-animal-object")
    return [Prompt(f"a {a} with a {rng.choice(COLORS)} {o}", (a, o), "ae-animal-object")
            for a in ANIMALS for o in OBJECTS]


def ae_objects() -> list:
    """'a {color} {object} and a {color} {object}': the 66 unordered object pairs."""
    rng = random.Random("stattn ae-objects")
    return [Prompt(f"a {rng.choice(COLORS)} {a} and a {rng.choice(COLORS)} {b}", (a, b), "ae-objects")
            for a, b in itertools.combinations(OBJECTS, 2)]


def spatial(pairs_per_relation: int = SPATIAL_PAIRS_PER_RELATION) -> list:
    """'a {A} <relation> a {B}' over COCO category names: for each relation, distinct ordered pairs
    (A != B) drawn by a fixed-seed RNG."""
    out = []
    for rel, phrase in RELATIONS.items():
        rng = random.Random(f"stattn spatial {rel}")
        pairs = rng.sample(list(itertools.permutations(COCO_CATEGORIES, 2)), pairs_per_relation)
        out += [Prompt(f"{_article(a)} {a} {phrase} {_article(b)} {b}", (a, b), "spatial", relation=(a, rel, b))
                for a, b in pairs]
    return out


SETS = {"ae-animals": ae_animals, "ae-animal-object": ae_animal_object, "ae-objects": ae_objects,
        "spatial": spatial}
GROUPS = {"ae": ("ae-animals", "ae-animal-object", "ae-objects")}   # a name for several sets


def _objects_of(text: str) -> tuple:
    """The object phrases the prompt names, without their article (spacetime's object finder)."""
    from ..methods.spacetime.layout import find_objects

    words = [o.split() for o in find_objects(text)]
    return tuple(" ".join(w[1:] if len(w) > 1 and w[0].lower() in ("a", "an", "the") else w) for w in words)


def _relation_of(text: str, targets: tuple) -> Optional[tuple]:
    """(A, relation, B) when the prompt is exactly 'a A <relation> a B' for its two targets."""
    if len(targets) != 2:
        return None
    a, b = targets
    for rel, phrase in RELATIONS.items():
        if text.strip().lower() == f"{_article(a)} {a} {phrase} {_article(b)} {b}".lower():
            return (a, rel, b)
    return None


def read_file(path: Path) -> list:
    """A user file: one prompt a line, or JSON lines with prompt, targets, layout, seed (read by
    stattn generate's --prompts reader, which names the line of an error). A line without targets
    takes the objects its prompt names."""
    from .. import cli

    defaults = argparse.Namespace(seed=0, negative_prompt=None, targets=None, layout=None)
    items = cli._read_prompts(Path(path), defaults)
    # which lines gave a seed: the reader fills the default in, so look at the JSON lines again
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for item, line in zip(items, lines):
        seeded = False
        if item.prompt != line.strip():     # a JSON line
            seeded = "seed" in json.loads(line)
        if not isinstance(item.prompt, str) or not item.prompt.strip():
            raise cli.UsageError(f"{item.where}: expected some text, got {item.prompt!r}")
        if item.negative_prompt is not None:
            raise cli.UsageError(f"{item.where}: \"negative_prompt\": stattn eval uses none (every method gets "
                                 "the same conditioning)")
        targets = tuple(item.targets) if item.targets else _objects_of(item.prompt)
        out.append(Prompt(item.prompt, targets, Path(path).stem, item.layout, item.seed if seeded else None,
                          _relation_of(item.prompt, targets), item.where))
    return out


def load(spec: str) -> list:
    """The prompts of --prompts: a shipped set's name, several joined by commas, or a file."""
    from ..cli import UsageError

    prompts = []
    for name in spec.split(","):
        name = name.strip()
        if name in SETS:
            prompts += SETS[name]()
        elif name in GROUPS:
            prompts += [p for n in GROUPS[name] for p in SETS[n]()]
        elif Path(name).is_file():
            prompts += read_file(Path(name))
        else:
            raise UsageError(f"--prompts {name}: neither a shipped set ({', '.join([*SETS, *GROUPS])}) nor a file")
    seen = set()
    for p in prompts:
        if p.text in seen:
            raise UsageError(f"--prompts {spec}: the prompt {p.text!r} is given twice ({p.where or p.set})")
        seen.add(p.text)
    return prompts
