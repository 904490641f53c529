"""Every ```python block of README.md (and of the docs/ pages) runs as written, on the tiny
offline model.

Design:
- Each block runs in a fresh namespace (a user copies one block at a time, so every block
  carries its own imports and definitions), in a temporary working directory (blocks write
  files such as ``out.png`` and ``prof/``).
- The blocks name a real model the way a user would ("path/to/sd-model", a CLIP directory). The
  test makes those paths real inside the temporary directory: the tiny SD pipeline
  (``stattn.integration.models.tiny(0)``) is saved at ``path/to/sd-model`` and the tiny CLIP
  (``stattn.integration.models.tiny_clip()``) at ``path/to/clip-vit-b-32``, so the model-loading lines run
  unchanged.
- The only text changes are the ones in ``SUBSTITUTIONS``: the CPU instead of "cuda", fp32
  instead of fp16 (the CPU path of the tiny model), and 2 denoising steps (2 edited ones for
  Attention Regulation, which refuses more edited steps than the call runs) / 2 optimisation
  passes instead of the real counts, to keep the test fast. Substitutions replace whole tokens
  only, and each must match some block, so the table cannot go stale silently.
- Bash blocks are not run.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import stattn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))

SUBSTITUTIONS = [            # (text in a block, what the test runs instead)
    ('"cuda"', '"cpu"'),
    ("torch.float16", "torch.float32"),
    ("num_inference_steps=50", "num_inference_steps=2"),
    ("steps=50", "steps=2"),
    ("edit_steps=25", "edit_steps=2"),
    ("passes=3", "passes=2"),
]

MODEL_DIR = "path/to/sd-model"
CLIP_DIR = "path/to/clip-vit-b-32"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, source) of every ```python block."""
    blocks = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, flags=re.S | re.M):
        blocks.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return blocks


def all_blocks() -> list[tuple[str, str]]:
    """("page:line", source) of every ```python block of README.md and docs/*.md."""
    return [(f"{page.relative_to(ROOT)}:{line}", src) for page in PAGES
            for line, src in python_blocks(page.read_text(encoding="utf-8"))]


def substituted(src: str) -> str:
    for old, new in SUBSTITUTIONS:
        src = re.sub(r"(?<![\w.])" + re.escape(old) + r"(?!\w)", new, src)
    return src


BLOCKS = all_blocks()
README_BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_blocks_found_and_every_substitution_is_used():
    assert len(README_BLOCKS) >= 4, "README.md: expected the quickstart, runner, regulation and spatial-temporal blocks"
    text = "".join(src for _, src in BLOCKS)
    for old, _ in SUBSTITUTIONS:
        assert re.search(r"(?<![\w.])" + re.escape(old) + r"(?!\w)", text), f"substitution {old!r} matches no block"
    for path in (MODEL_DIR, CLIP_DIR):
        assert path in text, f"{path!r} is no longer used by any block: update the test's fixture"


def test_substitution_is_whole_token():
    assert substituted("runner(p, steps=50); pipe(p, num_inference_steps=50); X(edit_steps=25)") == \
        "runner(p, steps=2); pipe(p, num_inference_steps=2); X(edit_steps=2)"
    assert substituted("steps=500") == "steps=500"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from stattn.integration import models

    root = tmp_path_factory.mktemp("readme")
    models.save(models.tiny(0), root / MODEL_DIR)
    clip, tok = models.tiny_clip()
    clip.save_pretrained(root / CLIP_DIR)
    tok.save_pretrained(root / CLIP_DIR)
    return root


@pytest.mark.parametrize("where,src", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_block_runs(where, src, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    code = compile(substituted(src), where, "exec")
    exec(code, {"__name__": "__readme__"})
