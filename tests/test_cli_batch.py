"""`stattn generate` in diffusers' words: option names and aliases, non-square sizes, --prompts
batches (one bar, one report), every method setting in report.json, --from-report regenerating
the same images, `stattn profile` saving its image."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from stattn import cli

PROMPT = "a photo of a cat and a frog"
ST_PROMPT = "a cat to the left of a frog"


def run(*argv):
    return cli.main([str(a) for a in argv])


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def report_of(out) -> dict:
    return json.loads((out / "report.json").read_text())


def tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------ names, help, sizes
def test_help_shows_diffusers_names_aliases_and_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--num-inference-steps STEPS, --steps STEPS", "--guidance-scale GUIDANCE, --guidance GUIDANCE",
                   "--num-images-per-prompt NUM_IMAGES, --num-images NUM_IMAGES", "--height HEIGHT",
                   "--width WIDTH", "--negative-prompt", "--prompts PROMPTS", "--from-report", "--local-files-only"):
        assert option in text, option
    assert "(default: 50)" in text and "(default: 0)" in text and "(default: same_branch)" in text


def test_diffusers_names_and_aliases_give_the_same_run(tmp_path):
    long = ["--num-inference-steps", 2, "--guidance-scale", 5.0, "--num-images-per-prompt", 2,
            "--negative-prompt", "blurry", "--height", 64, "--width", 64]
    short = ["--steps", 2, "--guidance", 5.0, "--num-images", 2, "--negative-prompt", "blurry", "--size", 64]
    for name, opts in (("long", long), ("short", short)):
        assert run("generate", "--model", "tiny", "--prompt", PROMPT, *opts, "--out", tmp_path / name,
                   "--no-progress", "--no-maps") == 0
    a, b = report_of(tmp_path / "long"), report_of(tmp_path / "short")
    for key in ("steps", "guidance_scale", "num_images", "negative_prompt", "height", "width"):
        assert a["items"][0]["settings"][key] == b["items"][0]["settings"][key], key
    assert a["items"][0]["settings"]["guidance_scale"] == 5.0 and a["items"][0]["settings"]["num_images"] == 2
    for j in range(2):   # the same computation twice in one process: the same pixels
        assert np.array_equal(pixels(tmp_path / "long" / f"image_{j}.png"), pixels(tmp_path / "short" / f"image_{j}.png"))


def test_non_square_sizes(tmp_path):
    assert run("generate", "--model", "tiny", "--prompt", PROMPT, "--steps", 1, "--height", 64, "--width", 128,
               "--out", tmp_path, "--no-progress") == 0
    assert Image.open(tmp_path / "image_0.png").size == (128, 64)             # PIL: (width, height)
    assert Image.open(tmp_path / "attention_0.png").size == (3 * 128, 64 + 18)  # image + cat + frog, label strip
    s = report_of(tmp_path)["items"][0]["settings"]
    assert (s["height"], s["width"]) == (64, 128)


# ------------------------------------------------------------------ --prompts
def test_a_prompt_file_is_one_batch_with_one_bar_and_one_report(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\n\n  a cat and a dog  \n")
    assert run("generate", "--model", "tiny", "--prompts", tmp_path / "prompts.txt", "--steps", 2, "--seed", 3,
               "--out", tmp_path / "out") == 0
    err = capsys.readouterr().err
    # one bar over both prompts' UNet evaluations (the tiny model's PNDM takes 3 for 2 steps), not one per prompt
    assert set(re.findall(r"\| *(\d+)/(\d+) \[", err)[-1:]) == {("6", "6")}, err
    assert set(re.findall(r"\| *\d+/(\d+) \[", err)) == {"6"}, err
    report = report_of(tmp_path / "out")
    assert [e["prompt"] for e in report["items"]] == [PROMPT, "a cat and a dog"]
    assert [e["seed"] for e in report["items"]] == [3, 3] and report["finished"] is True
    assert report["items"][1]["images"] == ["image_1_0.png", "attention_1_0.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "attention_0_0.png", "attention_1_0.png", "image_0_0.png", "image_1_0.png", "report.json"]
    # an item of a batch is the image its prompt gives alone
    assert run("generate", "--model", "tiny", "--prompt", "a cat and a dog", "--steps", 2, "--seed", 3,
               "--out", tmp_path / "alone", "--no-progress") == 0
    assert np.array_equal(pixels(tmp_path / "out" / "image_1_0.png"), pixels(tmp_path / "alone" / "image_0.png"))


def test_jsonl_lines_carry_prompt_targets_layout_and_seed(tmp_path):
    lines = [{"prompt": PROMPT, "targets": ["cat", "frog"], "seed": 7},
             {"prompt": "a cat and a dog", "targets": "dog", "seed": 11, "negative_prompt": "blurry"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert run("generate", "--model", "tiny", "--prompts", tmp_path / "p.jsonl", "--method", "regulation",
               "--steps", 2, "--out", tmp_path / "out", "--no-progress") == 0
    items = report_of(tmp_path / "out")["items"]
    assert [e["seed"] for e in items] == [7, 11] and items[1]["negative_prompt"] == "blurry"
    assert items[0]["method"]["kwargs"]["targets"] == ["cat", "frog"] and items[0]["method"]["resolved"]["tokens"] == [5, 8]
    assert items[1]["method"]["kwargs"]["targets"] == ["dog"] and items[1]["heatmap_tokens"] == ["dog"]
    # spatial-temporal control takes each line's layout
    layout = "cat [0, 0, 256, 512]\nfrog [256, 0, 256, 512]"
    (tmp_path / "st.jsonl").write_text(json.dumps({"prompt": ST_PROMPT, "layout": layout}) + "\n")
    assert run("generate", "--model", "tiny", "--prompts", tmp_path / "st.jsonl", "--method", "spacetime",
               "--steps", 2, "--out", tmp_path / "st", "--no-progress") == 0
    resolved = report_of(tmp_path / "st")["items"][0]["method"]["resolved"]
    assert resolved["layout"] == [["cat", {"box": [0.0, 0.0, 0.5, 1.0]}], ["frog", {"box": [0.5, 0.0, 1.0, 1.0]}]]


@pytest.mark.parametrize("text, suffix, message", [
    ('{"prompt": "a cat"}\n{"prompt": "a cat", \n', ".jsonl", "line 2: not a JSON object"),
    ('{"prompt": "a cat", "colour": "red"}\n', ".jsonl", "line 1: unknown key(s) ['colour']"),
    ('{"targets": ["cat"]}\n', ".jsonl", "line 1: no \"prompt\""),
    ('{"prompt": "a cat", "seed": -3}\n', ".jsonl", "line 1: \"seed\": expected an integer in [0, 2**64)"),
    ('{"prompt": "a cat", "targets": [3]}\n', ".jsonl", "line 1: \"targets\": expected a word"),
    ('{"prompt": "a cat", "targets": ["cat"]}\n\n{"prompt": "a frog", "targets": ["cat"]}\n', ".jsonl",
     "line 3: targets: words: target 'cat' is not in the prompt 'a frog'"),
    ('["a cat"]\n', ".jsonl", "line 1: expected a JSON object"),
    ("\n  \n", ".txt", "no prompt in the file"),
    ("a cat\nan owl and a zebra\n", ".txt", "line 2: targets: words: target 'cat' is not in the prompt"),
])
def test_a_bad_prompt_file_is_named_with_its_line_before_generating(tmp_path, capsys, text, suffix, message):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(text)
    before = tree(tmp_path)
    assert run("generate", "--model", "tiny", "--prompts", path, "--targets", "cat", "--steps", 1,
               "--out", tmp_path / "out", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and str(path) in err, err
    assert tree(tmp_path) == before


def test_a_missing_prompt_file(tmp_path, capsys):
    assert run("generate", "--model", "tiny", "--prompts", tmp_path / "none.txt", "--out", tmp_path / "o") == 2
    assert "--prompts" in capsys.readouterr().err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ reproducible
def test_the_method_draws_follow_the_seed(tmp_path):
    """Attention Regulation's θ₀ is uniform noise: two identical runs are identical, and another
    seed changes it."""
    base = ["generate", "--model", "tiny", "--prompt", PROMPT, "--method", "regulation", "--targets", "cat",
            "--steps", 2, "--no-progress", "--no-maps"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run(*base, "--seed", seed, "--out", tmp_path / name) == 0
    a, b, c = (pixels(tmp_path / n / "image_0.png") for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_the_report_holds_every_setting_of_the_method(tmp_path):
    assert run("generate", "--model", "tiny", "--prompt", PROMPT, "--method", "regulation", "--targets", "cat",
               "frog", "--steps", 3, "--out", tmp_path, "--no-progress") == 0
    report = report_of(tmp_path)
    method = report["items"][0]["method"]
    assert set(method["kwargs"]) >= {"targets", "layers", "edit_steps", "iters", "lr", "init", "quantile",
                                     "loss_weights", "prev_weight", "decay", "renormalize", "subtokens"}
    assert method["kwargs"]["edit_steps"] == 3 and method["kwargs"]["iters"] == 20 and method["kwargs"]["lr"] == 100.0
    assert method["resolved"]["tokens"] == [5, 8] and method["resolved"]["eos"] == 9
    assert method["resolved"]["layer_names"]       # the layers edited, by name
    assert report["args"]["method"] == "regulation" and report["args"]["steps"] == 3
    assert report["command"][:2] == ["generate", "--model"]


@pytest.mark.parametrize("method", [
    ["--method", "regulation", "--targets", "cat", "frog"],
    ["--method", "spacetime", "--optimize", "--clip", "tiny", "--passes", 2],
    ["--method", "none", "--negative-prompt", "blurry", "--height", 64, "--width", 128],
])
def test_from_report_regenerates_the_same_images(tmp_path, method):
    prompt = ST_PROMPT if "spacetime" in method else PROMPT
    assert run("generate", "--model", "tiny", "--prompt", prompt, *method, "--steps", 3, "--seed", 4,
               "--num-images", 2, "--out", tmp_path / "first", "--no-progress") == 0
    assert run("generate", "--from-report", tmp_path / "first" / "report.json", "--out", tmp_path / "again",
               "--no-progress") == 0
    first, again = report_of(tmp_path / "first"), report_of(tmp_path / "again")
    a, b = (r["items"][0]["method"] for r in (first, again))
    if a is not None:           # the optimised weights included: the second run does not optimise
        assert a["kwargs"] == b["kwargs"] and a["resolved"].pop("optimized_for", None) in (None, ST_PROMPT)
        assert a["resolved"] == {k: v for k, v in b["resolved"].items() if k != "optimized_for"}
    for name in first["items"][0]["images"]:
        assert np.array_equal(pixels(tmp_path / "first" / name), pixels(tmp_path / "again" / name)), name


def test_from_report_of_a_batch(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": PROMPT, "seed": 2}) + "\n"
                                      + json.dumps({"prompt": "a cat and a dog", "targets": "dog", "seed": 9}) + "\n")
    assert run("generate", "--model", "tiny", "--prompts", tmp_path / "p.jsonl", "--steps", 2, "--targets", "cat",
               "--method", "regulation", "--out", tmp_path / "first", "--no-progress") == 0
    assert run("generate", "--from-report", tmp_path / "first" / "report.json", "--out", tmp_path / "again",
               "--no-progress") == 0
    names = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir()) and len(names) == 5
    for name in names:
        if name.endswith(".png"):
            assert np.array_equal(pixels(tmp_path / "first" / name), pixels(tmp_path / "again" / name)), name


def test_from_report_errors(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"items": []}')
    assert run("generate", "--from-report", tmp_path / "bad.json", "--out", tmp_path / "o") == 2
    assert "not a stattn generate report.json" in capsys.readouterr().err
    assert run("generate", "--from-report", tmp_path / "missing.json", "--out", tmp_path / "o") == 2
    assert "--from-report" in capsys.readouterr().err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------ profile
def test_profile_saves_the_image_it_profiled(tmp_path, capsys):
    assert run("profile", "--model", "tiny", "--prompt", PROMPT, "--steps", 2, "--seed", 5, "--out", tmp_path / "p") == 0
    assert "image(s):" in capsys.readouterr().out
    assert run("generate", "--model", "tiny", "--prompt", PROMPT, "--steps", 2, "--seed", 5, "--out", tmp_path / "g",
               "--no-progress", "--no-maps") == 0
    assert np.array_equal(pixels(tmp_path / "p" / "image_0.png"), pixels(tmp_path / "g" / "image_0.png"))
