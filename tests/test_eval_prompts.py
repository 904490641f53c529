"""stattn eval's prompt sets (counts, contents, determinism) and its --prompts errors."""
import argparse
import itertools
import json

import pytest

from stattn.cli import UsageError
from stattn.evaluation import prompts as P


def test_word_lists_sizes():
    assert (len(P.ANIMALS), len(P.OBJECTS), len(P.COLORS), len(P.COCO_CATEGORIES)) == (12, 12, 11, 80)
    for words in (P.ANIMALS, P.OBJECTS, P.COLORS, P.COCO_CATEGORIES):
        assert len(set(words)) == len(words)


def test_ae_sets_counts_and_contents():
    animals, animal_object, objects = P.ae_animals(), P.ae_animal_object(), P.ae_objects()
    assert (len(animals), len(animal_object), len(objects)) == (66, 144, 66)
    assert {p.targets for p in animals} == set(itertools.combinations(P.ANIMALS, 2))
    assert animals[0].text == "a cat and a dog" and animals[0].targets == ("cat", "dog")
    for p in animal_object:
        a, o = p.targets
        color = p.text.split()[-2]
        assert p.text == f"a {a} with a {color} {o}" and color in P.COLORS
    assert {p.targets for p in animal_object} == set(itertools.product(P.ANIMALS, P.OBJECTS))
    for p in objects:
        w = p.text.split()
        assert w[0] == w[4] == "a" and w[3] == "and" and w[1] in P.COLORS and w[5] in P.COLORS
        assert (w[2], w[6]) == p.targets
    assert {p.targets for p in objects} == set(itertools.combinations(P.OBJECTS, 2))
    assert P.load("ae") == animals + animal_object + objects


def test_sets_are_deterministic():
    for make in P.SETS.values():
        assert make() == make()


def test_spatial_set():
    ps = P.spatial()
    assert len(ps) == 4 * P.SPATIAL_PAIRS_PER_RELATION and len({p.text for p in ps}) == len(ps)
    for p in ps:
        a, rel, b = p.relation
        assert (a, b) == p.targets and a != b and a in P.COCO_CATEGORIES and b in P.COCO_CATEGORIES
        assert P.RELATIONS[rel] in p.text and p.text.endswith(b)
        assert P._relation_of(p.text, p.targets) == p.relation
    assert [sum(p.relation[1] == r for p in ps) for r in P.RELATIONS] == [P.SPATIAL_PAIRS_PER_RELATION] * 4
    assert P.spatial()[0].text == ps[0].text


def test_user_files(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("a cat to the left of a dog\n\na red car and a blue bowl\n")
    a, b = P.load(str(text))
    assert a.targets == ("cat", "dog") and a.relation == ("cat", "left", "dog") and a.seed is None
    assert b.targets == ("red car", "blue bowl") and b.set == "mine" and "line 3" in b.where
    jl = tmp_path / "mine.jsonl"
    jl.write_text(json.dumps({"prompt": "a cat and a frog", "targets": ["frog"], "seed": 7}) + "\n"
                  + json.dumps({"prompt": "a bird", "layout": "bird [0, 0, 256, 256]"}) + "\n")
    c, d = P.load(str(jl))
    assert (c.targets, c.seed) == (("frog",), 7) and (d.targets, d.seed, d.layout) == (("bird",), None,
                                                                                        "bird [0, 0, 256, 256]")


def test_errors(tmp_path):
    with pytest.raises(UsageError, match="--prompts nope: neither a shipped set"):
        P.load("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "colour": 1}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl line 3: unknown key"):
        P.load(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a cat"}\n{"prompt": \n')
    with pytest.raises(UsageError, match=r"broken.jsonl line 2: not a JSON object"):
        P.load(str(broken))
    twice = tmp_path / "twice.txt"
    twice.write_text("a cat\na cat\n")
    with pytest.raises(UsageError, match="given twice"):
        P.load(str(twice))


def test_every_shipped_prompt_resolves_for_every_method():
    """Each shipped prompt's targets are found in it as the pipeline's tokenizer splits it, and
    spacetime places its objects (what `stattn eval` checks before any image)."""
    from stattn import cli
    from stattn.evaluation import run as R
    from stattn.integration.runner import Runner

    runner = Runner.from_pretrained("tiny", device="cpu")
    args = argparse.Namespace(method=None, spacetime_mode="same_branch", steps=2, optimize=False, clip=None)
    prompts = P.load("ae,spatial")
    assert len(prompts) == 376
    for method in cli.METHODS:
        margs = R.method_args(args, method)
        for g in R.groups(prompts, [0]):
            cli._resolve(runner, margs, R.item(g))
