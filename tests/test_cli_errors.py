"""`stattn generate`: bad input fails in one line (exit 2) before generating and writes nothing;
files are written atomically, report.json last; a non-empty --out needs --overwrite."""
import json
import os
import signal
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from stattn import cli

PROMPT = "a photo of a cat and a frog"


def run(*argv):
    return cli.main([str(a) for a in argv])


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: read-only permissions, or (as root, whom
    permissions do not stop) /proc."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        fd, probe = tempfile.mkstemp(dir=ro)
    except OSError:
        return ro
    os.close(fd)
    os.unlink(probe)
    return Path("/proc")


@pytest.mark.parametrize("case, message", [
    ("out_is_file", "is not a directory"),
    ("out_under_file", "is a file, not a directory"),
    ("out_unwritable", "cannot write in"),
    ("out_not_empty", "--overwrite"),
    (["--device", "foo"], "--device foo: unknown device"),
    (["--device", "cuda:99"], "--device cuda:99"),
    (["--device", "cpu", "--cuda-graphs"], "--cuda-graphs needs a CUDA --device"),
    (["--prompt", ""], "--prompt: expected some text"),
    (["--prompt", "  \t "], "--prompt: expected some text"),
    (["--prompt", "a cat " * 80 + "and a frog", "--targets", "frog"], "truncated to the text encoder's 77"),
    (["--size", "2048"], "--height/--width 2048x2048: too large for the attention heatmaps"),
    (["--height", "64", "--width", "8192"], "--height/--width 64x8192: too large for the attention heatmaps"),
    (["--size", "64", "--height", "64"], "--size sets both --height and --width"),
    (["--width", "100"], "--width: width: expected a positive multiple of 16"),
    (["--height", "0"], "--height: expected pixels"),
    (["--scheduler", "Foo"], "--scheduler Foo"),
    (["--seed", "-1"], "--seed: expected an integer in [0, 2**64)"),
    (["--seed", str(2 ** 64)], "--seed: expected an integer in [0, 2**64)"),
    (["--guidance", "nan"], "--guidance-scale: expected a finite number"),
    (["--guidance-scale", "inf"], "--guidance-scale: expected a finite number"),
    (["--num-images", "0"], "--num-images-per-prompt must be at least 1"),
    (["--num-inference-steps", "0"], "--num-inference-steps must be at least 1"),
    (["--prompts", "prompts.txt"], "--prompt / --prompts: give exactly one"),
    (["--from-report", "nothing.json"], "--from-report: every setting comes from the report; do not give "
                                        "--model, --num-inference-steps, --prompt"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case, message):
    out = tmp_path / "out"
    extra = []
    if case == "out_is_file":
        out.write_text("x")
    elif case == "out_under_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif case == "out_unwritable":
        out = unwritable_dir(tmp_path) / "out"
    elif case == "out_not_empty":
        out.mkdir()
        (out / "image_0.png").write_bytes(b"earlier run")
    else:
        extra = case
    before = tree(tmp_path)
    argv = ["generate", "--model", "tiny", "--prompt", PROMPT, "--steps", 1, "--out", out, "--no-progress"]
    code = run(*argv, *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err, err
    assert err.startswith("stattn generate: error:") and "\n" not in err
    assert tree(tmp_path) == before  # nothing written, nothing removed
    assert not out.exists() or out.is_file() or case == "out_not_empty"


def test_a_prompt_over_77_tokens_is_truncated_and_generates(tmp_path, capsys):
    prompt = "a cat " + "and a frog " * 40  # 122 tokens: the later frogs are cut off
    assert run("generate", "--model", "tiny", "--prompt", prompt, "--steps", 1, "--out", tmp_path / "plain",
               "--no-progress", "--no-maps") == 0
    assert run("generate", "--model", "tiny", "--prompt", prompt, "--steps", 1, "--out", tmp_path / "maps",
               "--no-progress") == 0
    labels = json.loads((tmp_path / "maps" / "report.json").read_text())["items"][0]["heatmap_tokens"]
    # SOS, "a cat" and 24 whole "and a frog" in 77 tokens (with EOS): the frogs that survive the cut
    assert labels == ["cat"] + ["frog"] * 24
    assert run("generate", "--model", "tiny", "--prompt", prompt, "--steps", 1, "--targets", "cat", "frog",
               "--out", tmp_path / "targets", "--no-progress") == 0


def test_a_sigint_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    real_save = Image.Image.save

    def interrupted_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n partial")  # some bytes reach the file, then Ctrl-C arrives
        os.kill(os.getpid(), signal.SIGINT)
        real_save(self, fp, *args, **kwargs)      # Python raises KeyboardInterrupt on its way here

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        run("generate", "--model", "tiny", "--prompt", PROMPT, "--steps", 1, "--out", tmp_path / "out",
            "--no-progress")
    # no image_0.png, no temporary; the report says the run did not finish
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.json"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["finished"] is False and report["items"][0]["images"] == ["image_0.png", "attention_0.png"]


def test_report_is_written_last_and_records_finished(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(Path(dst).name), real_replace(src, dst)))
    assert run("generate", "--model", "tiny", "--prompt", PROMPT, "--steps", 1, "--num-images", 2,
               "--out", tmp_path, "--no-progress") == 0
    assert replaced == ["report.json", "image_0.png", "image_1.png", "attention_0.png", "attention_1.png",
                        "report.json"]
    assert json.loads((tmp_path / "report.json").read_text())["finished"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(replaced))  # no temporaries left
    assert oct((tmp_path / "report.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_overwrite_replaces_the_earlier_run_and_keeps_other_files(tmp_path, capsys):
    base = ["generate", "--model", "tiny", "--prompt", PROMPT, "--steps", 1, "--out", tmp_path, "--no-progress"]
    assert run(*base, "--num-images", 2) == 0
    (tmp_path / "notes.txt").write_text("mine")
    first = tree(tmp_path)
    assert run(*base) == 2 and "--overwrite" in capsys.readouterr().err
    assert tree(tmp_path) == first
    assert run(*base, "--seed", 5, "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention_0.png", "image_0.png", "notes.txt",
                                                          "report.json"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["items"][0]["seed"] == 5 and report["finished"] is True
    assert (tmp_path / "notes.txt").read_text() == "mine"
