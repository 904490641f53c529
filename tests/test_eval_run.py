"""stattn eval end to end on the tiny model: files, resume, settings change, errors before any
generation, 2 processes (gloo, CPU) equal to 1, a SIGKILLed run resumed equal to an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stattn.evaluation import records as R, summary as S
from stattn.evaluation.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = "a cat to the left of a dog\na red car and a blue bowl\na frog above a turtle\n"
COMMON = ["--model", "tiny", "--seeds", "0-1", "--methods", "none,regulation", "--steps", "2", "--clip", "tiny",
          "--detector", "tiny", "--device", "cpu", "--quiet"]
# ROOT first, the caller's PYTHONPATH kept (the GPU check puts diffusers' wheel there)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
       "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}


def _args(prompts, out, *extra):
    return [*COMMON, "--prompts", str(prompts), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "three.txt"
    path.write_text(PROMPTS)
    return path


@pytest.fixture(scope="module")
def baseline(prompts, tmp_path_factory):
    """One uninterrupted one-process run, with one torch thread as the subprocess runs compared with
    it (ENV): Attention Regulation's inner loop (lr 100) amplifies the last-bit differences of
    another thread count's BLAS kernels into visibly different images."""
    out = tmp_path_factory.mktemp("eval") / "one"
    assert _run_one_thread(_args(prompts, out)) == 0
    return out


def _run_one_thread(argv) -> int:
    """run_cli in this process with one torch thread and the shipped HOST_BOUND_MACS, as the
    subprocesses (ENV) run."""
    from conftest import shipped_host_bound_macs
    from stattn.integration import processors

    processors.HOST_BOUND_MACS = shipped_host_bound_macs()   # (the autouse fixture sets 0 after the test)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cli(argv)
    finally:
        torch.set_num_threads(threads)


def _records(out):
    return [json.loads(line) for line in (out / R.MERGED).read_text().splitlines()]


def _same_run(a: Path, b: Path):
    """Record for record: the same keys in the same order, the same settings and scores (to float
    tolerance), images equal to uint8 rounding."""
    ra, rb = _records(a), _records(b)
    assert [R.key(r) for r in ra] == [R.key(r) for r in rb]
    for x, y in zip(ra, rb):
        assert x["settings"] == y["settings"] and x["method_settings"] == y["method_settings"]
        assert x["scores"].keys() == y["scores"].keys()
        for k, v in x["scores"].items():
            if isinstance(v, dict):
                assert v.keys() == y["scores"][k].keys()
            else:
                assert v == pytest.approx(y["scores"][k], abs=1e-4), k
        ia = np.asarray(Image.open(a / x["image"]), dtype=np.int16)
        ib = np.asarray(Image.open(b / y["image"]), dtype=np.int16)
        assert np.abs(ia - ib).max() <= 1


def test_run_writes_everything(baseline):
    records = _records(baseline)
    assert len(records) == 3 * 2 * 2
    h = records[0]["settings_hash"]
    assert {r["settings_hash"] for r in records} == {h}
    assert [(r["index"], r["seed"], r["method"]) for r in records] == \
        [(i, s, m) for i in range(3) for s in (0, 1) for m in ("none", "regulation")]
    for r in records:
        assert (baseline / r["image"]).is_file() and r["generate_ms"] > 0 and r["settings"]["steps"] == 2
        assert {"clip_score", "min_object_similarity", "detected"} <= set(r["scores"])
        assert ("relation" in r["scores"]) == (r["relation"] is not None)
        assert (r["method_settings"] is None) == (r["method"] == "none")
    assert records[0]["relation"] == ["cat", "left", "dog"] and records[4]["relation"] is None
    grids = sorted((baseline / "grids" / h).iterdir())
    assert len(grids) == 3 * 2
    for r in records[::2]:                      # the grid of each (prompt, seed): its two methods side by side
        name = Path(r["image"]).name.replace("-none.png", ".png")
        g = Image.open(baseline / "grids" / h / name)
        w, _ = Image.open(baseline / r["image"]).size
        assert g.size[0] == 2 * w
    # the summary's numbers, recomputed from records.jsonl
    saved = json.loads((baseline / "summary.json").read_text())
    assert saved["sets"] == json.loads(json.dumps(S.summarize(records)["sets"]))
    none = [r for r in records if r["method"] == "none"]
    per_prompt = [np.mean([r["scores"]["clip_score"] for r in none if r["prompt"] == p]) for p in PROMPTS.split("\n")[:3]]
    assert saved["sets"]["three"]["none"]["clip_score"]["mean"] == pytest.approx(np.mean(per_prompt))
    assert "| regulation | 6 |" in (baseline / "summary.md").read_text()


def test_rerun_skips_and_a_new_setting_starts_new_records(baseline, prompts, capsys):
    before = (baseline / R.MERGED).read_bytes()
    files = {p: p.read_bytes() for p in R.rank_files(baseline)}
    assert run_cli(_args(prompts, baseline)) == 0
    assert "(12 before this run)" in capsys.readouterr().out
    assert (baseline / R.MERGED).read_bytes() == before
    assert {p: p.read_bytes() for p in R.rank_files(baseline)} == files      # nothing appended


def test_another_prompt_list_in_the_same_out_keeps_both(prompts, tmp_path):
    out = tmp_path / "run"
    other = tmp_path / "other.txt"
    other.write_text("a bird and a horse\n")
    argv = ["--seeds", "0", "--methods", "none", "--steps", "1"]
    assert run_cli([*COMMON, "--prompts", prompts, "--limit", "1", "--out", out, *argv]) == 0
    assert run_cli([*COMMON, "--prompts", other, "--out", out, *argv]) == 0
    records = _records(out)                 # both prompts sit at index 0 of their lists
    assert [r["prompt"] for r in records] == ["a bird and a horse", "a cat to the left of a dog"]
    assert len({r["image"] for r in records}) == 2 and all((out / r["image"]).is_file() for r in records)


def test_changed_setting_gives_new_records(prompts, tmp_path):
    out = tmp_path / "run"
    assert run_cli(_args(prompts, out, "--limit", "1", "--seeds", "0")) == 0
    assert run_cli(_args(prompts, out, "--limit", "1", "--seeds", "0", "--guidance-scale", "3")) == 0
    records = _records(out)
    assert len(records) == 4 and len({r["settings_hash"] for r in records}) == 2
    summary = json.loads((out / "summary.json").read_text())      # the summary: this run's settings only
    assert summary["sets"]["three"]["none"]["images"] == 1


@pytest.mark.parametrize("case, message", [
    ("unknown_set", "--prompts nope: neither a shipped set"),
    ("bad_line", "bad.jsonl line 2: not a JSON object"),
    ("no_objects", "needs targets"),
    ("target_not_in_prompt", "line 1: targets:"),
    ("no_clip", "--clip"),
    ("no_detector", "--detector"),
    ("bad_method", "--methods"),
    ("bad_seeds", "--seeds"),
])
def test_errors_before_any_generation(tmp_path, capsys, case, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a cat"}\n{"prompt": \n')
    empty = tmp_path / "empty.txt"
    empty.write_text("!!!\n")
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a cat and a dog", "targets": ["zebra"]}\n')
    out = tmp_path / "out"
    args = {"unknown_set": ["--prompts", "nope"], "bad_line": ["--prompts", bad],
            "no_objects": ["--prompts", empty], "target_not_in_prompt": ["--prompts", missing],
            "no_clip": ["--prompts", "ae", "--clip", tmp_path / "none"],
            "no_detector": ["--prompts", "ae", "--detector", tmp_path / "none"],
            "bad_method": ["--prompts", "ae", "--methods", "none,magic"],
            "bad_seeds": ["--prompts", "ae", "--seeds", "3-1"]}[case]
    argv = [*COMMON, *args, "--out", out]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("stattn eval: error: ") and message in err
    assert not (out / "images").exists() and not (out / "records").exists()


def test_two_processes_equal_one(baseline, prompts, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "stattn.evaluation", *map(str, _args(prompts, out))]
    done = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [len(R.read([p])) for p in R.rank_files(out)] == [6, 6]      # each process did its share
    _same_run(baseline, out)


def test_sigkill_then_resume_equals_uninterrupted(baseline, prompts, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "stattn.evaluation", *map(str, _args(prompts, out))]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rank0 = R.rank_path(out, 0)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if rank0.exists() and rank0.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(R.read([rank0]))
    assert 3 <= kept < 12 and not (out / R.MERGED).exists()
    assert _run_one_thread(_args(prompts, out)) == 0
    assert len(R.read([rank0])) == 12          # the finished ones were not redone
    _same_run(baseline, out)


def test_spacetime_on_the_spatial_set_and_a_line_seed(tmp_path):
    out = tmp_path / "st"
    argv = ["--model", "tiny", "--prompts", "spatial", "--limit", "1", "--seeds", "0", "--methods", "none,spacetime",
            "--steps", "2", "--clip", "tiny", "--device", "cpu", "--quiet", "--out", out]
    assert run_cli(argv) == 0
    none, st = _records(out)
    assert st["method"] == "spacetime" and st["relation"][1] in ("left", "right", "above", "below")
    assert json.dumps(st["targets"][0]) in json.dumps(st["method_settings"])     # the targets are its objects
    assert st["seed"] == none["seed"] == 0 and "detected" not in st["scores"]
    seeded = tmp_path / "seeded.jsonl"
    seeded.write_text(json.dumps({"prompt": "a cat and a dog", "seed": 5}) + "\n")
    out2 = tmp_path / "seeded"
    assert run_cli(["--model", "tiny", "--prompts", seeded, "--seeds", "0-2", "--methods", "none", "--steps", "1",
                    "--device", "cpu", "--quiet", "--out", out2]) == 0
    assert [r["seed"] for r in _records(out2)] == [5]


def test_add_parser_wires_eval_into_a_stattn_parser(tmp_path, capsys):
    import argparse

    from stattn.evaluation import cli as eval_cli

    p = argparse.ArgumentParser(prog="stattn")
    sub = p.add_subparsers(dest="command", required=True)
    eval_cli.add_parser(sub)
    p.format_help()
    sub.choices["eval"].format_help()       # the help strings format (no stray %)
    args = p.parse_args(["eval", "--model", "tiny", "--prompts", "nope", "--out", str(tmp_path / "o")])
    assert eval_cli.main(args) == 2 and "neither a shipped set" in capsys.readouterr().err


def test_stattn_eval_is_a_subcommand_of_the_stattn_command(tmp_path, capsys):
    from stattn import cli

    assert cli.main(["eval", "--model", "tiny", "--prompts", "nope", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stattn eval: error:") and "neither a shipped set" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
    assert cli.main(["eval", "--model", "tiny", "--prompts", "ae", "--limit", "1", "--methods", "none",
                     "--seeds", "0", "--steps", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "ok")]) == 0
    assert len(_records(tmp_path / "ok")) == 1


def test_python_m_stattn_runs_the_command():
    """`python -m stattn eval ...` is what `accelerate launch -m stattn eval` / `torchrun -m stattn eval` run."""
    out = subprocess.run([sys.executable, "-m", "stattn", "eval", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "usage: stattn eval" in out.stdout, out.stderr[-2000:]


def test_the_composed_method_is_evaluated_and_needs_targets(tmp_path, capsys):
    out = tmp_path / "both"
    argv = ["--model", "tiny", "--prompts", "spatial", "--limit", "1", "--seeds", "0", "--methods",
            "regulation+spacetime", "--steps", "2", "--clip", "tiny", "--device", "cpu", "--quiet", "--out", out]
    assert run_cli(argv) == 0
    rec, = _records(out)
    assert rec["method"] == "regulation+spacetime"
    assert [p["method"] for p in rec["method_settings"]["parts"]] == ["regulation", "spacetime"]
    bare = tmp_path / "bare.txt"
    bare.write_text("!!!\n")                     # no object to find in it
    assert run_cli(["--model", "tiny", "--prompts", bare, "--methods", "regulation+spacetime", "--steps", "1",
                    "--device", "cpu", "--quiet", "--out", tmp_path / "x"]) == 2
    assert "needs targets" in capsys.readouterr().err
